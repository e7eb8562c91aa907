"""weightd on a GPU node, side by side in one run: ``python benchmarks/gpu.py [--size-gb 4 --small-size-gb 0.5
--repetitions 3 --json out.json]``.

Local-directory models (files in the page cache, so the numbers are memory and bus, not disk), no storage
server and no network. Each measurement runs in a fresh process with its imports done, interleaved over the
repetitions (medians reported):
  a  safetensors.torch.load_file(shard, device="cuda") for every shard
  b  runai SafetensorsStreamer.stream_files(paths, device="cuda")
  c  weightd host cold: a fresh --memory host daemon, attach(device="cpu")
  d  one pinned host -> GPU pass of the model's bytes (what a registered host arena feeds the GPU at)
  e  weightd GPU cold: a fresh --memory cuda daemon, attach(device="cuda:0") until every tensor is usable;
     target: e <= 1.05 x (c + d)
  f  weightd GPU warm attach from a new process, at two model sizes; target: <= 5 ms and flat in size
  g  GPU memory for weights with 4 engines attached: the daemon's arena plus what each engine's attach took
     from the GPU, against one model's bytes (4 engines loading their own copies: 4x); target: <= 1.02x
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from weightd import client  # noqa: E402
from weightd.daemon.synthetic import write_synthetic_model  # noqa: E402

from benchmarks.daemon import Daemon  # noqa: E402

SAFETENSORS_TO_GPU = r"""
import json, sys, time, torch
from safetensors.torch import load_file
torch.empty(0, device="cuda")
t0 = time.perf_counter()
tensors = {}
for path in sys.argv[1:]:
    tensors.update(load_file(path, device="cuda"))
torch.cuda.synchronize()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""

STREAMER_TO_GPU = r"""
import json, sys, time, torch
from runai_model_streamer import SafetensorsStreamer
torch.empty(0, device="cuda")
t0 = time.perf_counter()
tensors = {}
with SafetensorsStreamer() as streamer:
    streamer.stream_files(sys.argv[1:], device="cuda")
    for name, tensor in streamer.get_tensors():
        tensors[name] = tensor
torch.cuda.synchronize()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""

ATTACH = r"""
import json, sys, time, torch
from weightd import client
device = sys.argv[3]
if device != "cpu":
    torch.empty(0, device=device)  # an engine has its CUDA context before it loads weights
    import cupy, cuda.bindings.driver, weightd.client._cuda  # imports done, as for torch and weightd
free_before = torch.cuda.mem_get_info(0)[0] if device != "cpu" else 0
t0 = time.perf_counter()
model = client.attach(sys.argv[2], target=sys.argv[1], device=device, timeout=1200)
if device != "cpu":
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
taken = free_before - torch.cuda.mem_get_info(0)[0] if device != "cpu" else 0
print(json.dumps({"seconds": seconds, "gpu_bytes_taken": taken,
                  "model_bytes": sum(t.nbytes for t in model.tensors.values())}), flush=True)
if len(sys.argv) > 4:
    sys.stdin.read()  # hold the lease until told to go
"""

H2D_PASS = r"""
import json, sys, time, torch
size = int(sys.argv[1])
host = torch.empty(size, dtype=torch.uint8).pin_memory()
device = torch.empty(size, dtype=torch.uint8, device="cuda")
device.copy_(host, non_blocking=True); torch.cuda.synchronize()  # warm
t0 = time.perf_counter()
device.copy_(host, non_blocking=True)
torch.cuda.synchronize()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def run_json(script: str, *args: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark step failed:\n{result.stderr[-3000:]}")
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def cold_attach(work: Path, model: Path, memory: str, device: str) -> float:
    daemon = Daemon(Path(tempfile.mkdtemp(dir=work)), extra_args=("--memory", memory))
    try:
        return float(run_json(ATTACH, daemon.target, str(model), device)["seconds"])
    finally:
        daemon.stop()


def four_engines(work: Path, model: Path) -> dict[str, float]:
    daemon = Daemon(Path(tempfile.mkdtemp(dir=work)), extra_args=("--memory", "cuda"))
    engines: list[subprocess.Popen[str]] = []
    try:
        client.load(str(model), device="cuda:0", target=daemon.target)
        (row,) = [m for m in client.list_models(target=daemon.target) if m.memory_kind == "cuda"]
        taken = []
        for _ in range(4):
            engine = subprocess.Popen([sys.executable, "-c", ATTACH, daemon.target, str(model), "cuda:0", "hold"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            engines.append(engine)
            assert engine.stdout is not None
            report = json.loads(engine.stdout.readline())
            taken.append(max(0, int(report["gpu_bytes_taken"])))
            model_bytes = int(report["model_bytes"])
        return {"arena_bytes": row.resident_bytes, "engines_taken_bytes": sum(taken), "model_bytes": model_bytes,
                "ratio": (row.resident_bytes + sum(taken)) / model_bytes}
    finally:
        for engine in engines:
            engine.kill()
            engine.wait()
        daemon.stop()


def warm_attach(work: Path, model: Path, repetitions: int) -> float:
    daemon = Daemon(Path(tempfile.mkdtemp(dir=work)), extra_args=("--memory", "cuda"))
    try:
        client.load(str(model), device="cuda:0", target=daemon.target)
        return statistics.median(float(run_json(ATTACH, daemon.target, str(model), "cuda:0")["seconds"])
                                 for _ in range(repetitions))
    finally:
        daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--small-size-gb", type=float, default=0.5)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="weightd-gpu-bench-"))
    large, small = work / "large", work / "small"
    write_synthetic_model(large, total_bytes=int(args.size_gb * 1e9), shards=4, dtypes=("bf16", "fp16", "fp32"))
    write_synthetic_model(small, total_bytes=int(args.small_size_gb * 1e9), shards=2, dtypes=("bf16",))
    shards = sorted(str(p) for p in large.glob("*.safetensors"))
    model_bytes = sum(os.path.getsize(p) for p in shards)
    for path in shards:  # into the page cache
        Path(path).read_bytes()

    samples: dict[str, list[float]] = {k: [] for k in "abcde"}
    steps: dict[str, Callable[[], float]] = {
        "a": lambda: float(run_json(SAFETENSORS_TO_GPU, *shards)["seconds"]),
        "b": lambda: float(run_json(STREAMER_TO_GPU, *shards)["seconds"]),
        "c": lambda: cold_attach(work, large, "host", "cpu"),
        "d": lambda: float(run_json(H2D_PASS, str(model_bytes))["seconds"]),
        "e": lambda: cold_attach(work, large, "cuda", "cuda:0"),
    }
    for _ in range(args.repetitions):
        for key, step in steps.items():
            samples[key].append(step())
    median = {k: statistics.median(v) for k, v in samples.items()}
    warm = {"large": warm_attach(work, large, args.repetitions), "small": warm_attach(work, small, args.repetitions)}
    memory = four_engines(work, large)

    properties = torch.cuda.get_device_properties(0)
    result = {
        "machine": {"gpu": properties.name, "gpu_memory_bytes": properties.total_memory, "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "model_bytes": model_bytes, "samples": samples, "median_seconds": median, "warm_attach_seconds": warm,
        "four_engines": memory,
        "ratios": {
            "gpu_cold_vs_host_cold_plus_h2d": median["e"] / (median["c"] + median["d"]),
            "gpu_cold_vs_safetensors_load_file": median["e"] / median["a"],
            "gpu_cold_vs_runai_streamer": median["e"] / median["b"],
            "warm_attach_large_vs_small": warm["large"] / warm["small"],
            "four_engines_weight_memory_vs_one_model": memory["ratio"],
        },
    }
    gb = model_bytes / 1e9
    print(f"{properties.name}, model {gb:.2f} GB in {len(shards)} shards (page cache), medians of "
          f"{args.repetitions}")
    rows = [
        ("a safetensors load_file(device=cuda)", median["a"]),
        ("b runai stream_files(device=cuda)", median["b"]),
        ("c weightd host cold attach", median["c"]),
        ("d pinned H2D pass", median["d"]),
        ("e weightd GPU cold attach", median["e"]),
    ]
    for label, seconds in rows:
        print(f"  {label:<40} {seconds:7.3f} s  {gb / seconds:6.2f} GB/s")
    print(f"  e / (c + d) = {result['ratios']['gpu_cold_vs_host_cold_plus_h2d']:.3f}   (target <= 1.05)")
    print(f"  e / a = {result['ratios']['gpu_cold_vs_safetensors_load_file']:.3f}   e / b = "
          f"{result['ratios']['gpu_cold_vs_runai_streamer']:.3f}")
    print(f"  f warm attach: {warm['large'] * 1e3:.1f} ms ({args.size_gb} GB), {warm['small'] * 1e3:.1f} ms "
          f"({args.small_size_gb} GB)   (target <= 5 ms, flat)")
    print(f"  g 4 engines: weights take {memory['ratio']:.3f}x one model on the GPU   (target <= 1.02x; own copies: "
          "4x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
