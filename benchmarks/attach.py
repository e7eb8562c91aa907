"""Attach against tensor count and model bytes, from a process that already imported torch and weightd:

    .venv/bin/python benchmarks/attach.py [--counts 1000,10000,100000 --sizes-mb 256,1024 --repetitions 5]

Local-directory checkpoints (one shard of equal 1-D bf16 tensors, each a multiple of 256 bytes as real weights
are) in one daemon. Each attach runs in a fresh process that imports first and then times ``client.attach``
(grant, descriptor, mapping, views), then, separately, touching every tensor of ``model.tensors`` once (what an
engine that loads them all adds). Cold: the first attach (the daemon loads the model), alternated with the
Run:ai streamer alone reading the same file (SafetensorsStreamer, also in a fresh process), the model evicted
after each; warm: attaches of the resident model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from weightd import client  # noqa: E402

from benchmarks.daemon import Daemon  # noqa: E402
from benchmarks.run import STREAMER_ALONE, run_script  # noqa: E402

ATTACH = r"""
import gc, json, sys, time
import torch
from weightd import client
uri, target = sys.argv[1:3]
gc.collect()  # an engine's start-up has run its first full collection before it loads weights
t0 = time.perf_counter()
model = client.attach(uri, target=target)
t1 = time.perf_counter()
count = sum(1 for _ in model.tensors.values())
t2 = time.perf_counter()
print(json.dumps({"attach": t1 - t0, "every_tensor": t2 - t1, "tensors": count}))
"""


def write(directory: Path, count: int, total_bytes: int) -> None:
    directory.mkdir(parents=True)
    elements = max(128, total_bytes // 2 // count // 128 * 128)
    tensors = {f"model.layers.{i // 100}.experts.{i % 100}.weight": torch.zeros(elements, dtype=torch.bfloat16)
               for i in range(count)}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "synthetic"}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1000,10000,100000")
    parser.add_argument("--sizes-mb", default="256,1024")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weightd-attach-"))
    cases = [(int(c), int(mb)) for mb in args.sizes_mb.split(",") for c in args.counts.split(",")]
    daemon = Daemon(work / "daemon", extra_args=("--memory", "host"))
    results = []
    try:
        for count, mb in cases:
            directory = work / f"m-{count}-{mb}"
            write(directory, count, mb << 20)
            streamer, cold = [], []
            for _ in range(args.repetitions):
                streamer.append(run_script(STREAMER_ALONE, str(directory / "model.safetensors"),
                                           env=dict(os.environ))["seconds"])
                cold.append(run_script(ATTACH, str(directory), daemon.target, env=dict(os.environ))["attach"])
                client.evict(str(directory), target=daemon.target)
            client.load(str(directory), target=daemon.target)
            samples = [run_script(ATTACH, str(directory), daemon.target, env=dict(os.environ))
                       for _ in range(args.repetitions)]
            client.evict(str(directory), target=daemon.target)
            row = {"tensors": count, "model_mb": mb, "samples": samples, "cold_samples_s": cold,
                   "streamer_samples_s": streamer, "cold_s": statistics.median(cold),
                   "streamer_s": statistics.median(streamer),
                   "attach_ms": 1000 * statistics.median(s["attach"] for s in samples),
                   "every_tensor_ms": 1000 * statistics.median(s["every_tensor"] for s in samples)}
            results.append(row)
            print(f"{count:>7} tensors, {mb:>5} MB: cold {row['cold_s']:6.2f} s against the streamer alone "
                  f"{row['streamer_s']:6.2f} s ({row['cold_s'] / row['streamer_s']:.2f}x); warm attach "
                  f"{row['attach_ms']:7.1f} ms, then every tensor {row['every_tensor_ms']:7.1f} ms "
                  f"(medians of {args.repetitions})", flush=True)
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
