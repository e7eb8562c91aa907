"""weightd against the Run:ai streamer alone and against download-then-load, side by side in one run.

    .venv/bin/python benchmarks/run.py [--size-gb 1.0 --small-size-gb 0.25 --repetitions 3 --json out.json]

Serves a synthetic safetensors model (mixed bf16/fp16/fp32, several shards) from a local SeaweedFS S3 server
and measures, interleaved over repetitions (medians reported), each in a fresh process with imports done:
  a  runai-model-streamer SafetensorsStreamer reading the model (vLLM/SGLang's runai_streamer load format)
  b  boto3 download to a local disk + safetensors load
  c  weightd cold: fresh daemon (once its start-up work is done), attach (= LoadModel + map) until every
     tensor is usable
  d  weightd warm: attach of the resident model from a new process
  e  TP=4: all-ranks load (time, storage bytes) against one full load; a lone rank's cold attach against its share
  f  4 client processes attached to one model: node memory (shared arena + every process's private growth)
     against 4 processes each streaming the model into their own memory
  g  a load with its own concurrency (streams in a helper process) against the same concurrency daemon-wide
  h  daemon killed (SIGKILL) with the model resident, restarted: start until serving, and the first attach
     (the restarted daemon adopts the arena; no storage read), against a cold load (c)
  i  10 loads and evictions of the model by one daemon: its private memory (RssAnon) after the first and
     after the tenth
c and d are also measured for a second, smaller model to show d stays flat as the model grows.

    .venv/bin/python benchmarks/run.py --geometries qwen2.5-0.5b,llama3-8b,small,qwen3-moe [--json out.json]

measures a, c and d, interleaved, and e (TP=4), on checkpoints shaped like real ones (benchmarks/geometries.py)
instead, and reports per geometry its size, tensor count, median tensor size and the ratios, with every sample.
With --sizes-gb 0.25,1,4 the synthetic "small" geometry is measured at each size (cold time against bytes).

--shm-dirs DIR[,DIR...] (default /dev/shm) says where daemons keep their arenas: the first directory serves
every scenario, and each further one adds c and d with arenas there to the interleaving (say, /dev/shm against
a tmpfs mounted huge=within_size: 4 KiB against 2 MiB pages, side by side in one run).

--storage fake-gcs (with --geometries) serves the models from fake-gcs-server, in memory, instead of SeaweedFS:
a store whose ranged reads cost little per request, where SeaweedFS reads about a whole 4 MiB chunk for each.
--storage local (with --geometries) loads them from a directory on this machine's disk (a model on a node's
NVMe): no store's CPU shares the cores, so weightd's own costs show most. The streamer alone reads local files
with O_DIRECT, not through the page cache, and so does weightd for host memory unless the page cache holds most
of a file. --page-cache cold (the default there; root) empties the page cache before every measured step, so
that each reads the disk, as a node's first load of a model does; --page-cache warm leaves it as the steps
before left it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightd import client  # noqa: E402
from weightd.daemon.memory.host import HugePagePool, huge_page_policy  # noqa: E402
from weightd.daemon.synthetic import write_synthetic_model  # noqa: E402

from benchmarks.daemon import Daemon  # noqa: E402
from benchmarks.geometries import GEOMETRIES, write_geometry  # noqa: E402
from tests.storage_servers import GcsServer, S3Server, free_port, start_gcs, start_seaweedfs, stop_process  # noqa: E402

BUCKET = "bench"
# --storage choices, and how the output names them.
STORES = {"seaweedfs": "SeaweedFS S3 on loopback", "fake-gcs": "fake-gcs-server (GCS JSON API, in memory) on loopback",
          "local": "a local directory on this machine's disk"}

# Each scenario runs in a fresh interpreter; it times only the work (imports excluded) and prints JSON.
STREAMER_ALONE = r"""
import json, sys, time
import torch
from runai_model_streamer import SafetensorsStreamer
paths = sys.argv[1:]
t0 = time.perf_counter()
tensors = {}
with SafetensorsStreamer() as streamer:
    streamer.stream_files(paths)
    for name, tensor in streamer.get_tensors():
        tensors[name] = tensor
print(json.dumps({"seconds": time.perf_counter() - t0, "tensors": len(tensors)}))
"""

DOWNLOAD_THEN_LOAD = r"""
import json, os, sys, tempfile, time
import boto3
from botocore.config import Config
from safetensors.torch import load_file
bucket, prefix, names = sys.argv[1], sys.argv[2], sys.argv[3:]
s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DISK")) as tmp:
    t0 = time.perf_counter()
    tensors = {}
    for name in names:
        s3.download_file(bucket, prefix + name, f"{tmp}/{name}")
        tensors.update(load_file(f"{tmp}/{name}"))
    seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "tensors": len(tensors)}))
"""

ATTACH = r"""
import gc, json, sys, time
from weightd import client
uri, target, rank, tp_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# An engine attaches after its own start-up, which has run the interpreter's first full garbage collection;
# in a bare interpreter that collection (tens of ms after importing torch) would land inside the attach.
gc.collect()
t0 = time.perf_counter()
model = client.attach(uri, rank, tp_size=tp_size, target=target)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "tensors": len(model.tensors)}))
"""

LOAD = r"""
import json, sys, time
from weightd import client
uri, target, tp_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
concurrency = int(sys.argv[4]) if len(sys.argv) > 4 else None
t0 = time.perf_counter()
client.load(uri, tp_size=tp_size, all_ranks=tp_size > 1, concurrency=concurrency, target=target)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""

# Holds its tensors and reports private memory growth, then waits to be told to exit (stdin closes).
HOLD = r"""
import json, sys
def anon():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("RssAnon:"))) * 1024
mode = sys.argv[1]
import torch
if mode == "attach":
    from weightd import client
    before = anon()
    model = client.attach(sys.argv[2], target=sys.argv[3])
    tensors = dict(model.tensors)
else:  # what an engine does without weightd: stream the model into its own memory
    from runai_model_streamer import SafetensorsStreamer
    before = anon()
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(sys.argv[2:])
        tensors = dict(streamer.get_tensors())
touched = sum(int(t.reshape(-1).view(torch.uint8)[:: 4096].sum()) for t in tensors.values() if t.numel())
print(json.dumps({"private_growth": anon() - before}), flush=True)
sys.stdin.read()
"""


def run_script(script: str, *args: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark step failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@dataclass(frozen=True)
class LocalFiles:
    """``--storage local``: models copied into a directory, loaded by path. No server: no process, no settings."""

    root: Path
    process: None = None

    def env(self) -> dict[str, str]:
        return {}

    def upload(self, directory: Path, bucket: str, prefix: str) -> None:
        shutil.copytree(directory, self.root / bucket / prefix)


Store = S3Server | GcsServer | LocalFiles


def stop_store(store: Store) -> None:
    if store.process is not None:
        stop_process(store.process)


def drop_page_cache() -> None:
    """Empty the kernel's page cache (root only): what a step reads of a local model then comes from the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


class Bench:
    def __init__(
        self, store: Store, work: Path, repetitions: int, shm_dirs: list[Path], *, cold_page_cache: bool = False
    ) -> None:
        self.store = store
        self.cold_page_cache = cold_page_cache
        # Where the benchmark's bucket is: models are "<root><name>/", their shards "<root><name>/<shard>".
        if isinstance(store, LocalFiles):
            self.root = f"{store.root}/{BUCKET}/"
        else:
            self.root = f"{'s3' if isinstance(store, S3Server) else 'gs'}://{BUCKET}/"
        self.work = work
        self.repetitions = repetitions
        # Interleaved cold/warm steps, by name: "cd" on the first arena directory, "cd@DIR" on each further one.
        self.cold_steps = {"cd": shm_dirs[0], **{f"cd@{d}": d for d in shm_dirs[1:]}}
        # The same streamer settings for every contender (the daemon would default the timeout to 30 s anyway;
        # at the streamer's 1 s, four concurrent streams on two cores fail with "File access error").
        self.env = {**os.environ, **store.env(), "BENCH_DISK": str(work),
                    "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0", "RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS": "30000"}
        self.daemons = 0

    def before_step(self) -> None:
        """Right before a measured step: with ``cold_page_cache``, empty the page cache."""
        if self.cold_page_cache:
            drop_page_cache()

    def daemon(self, *, concurrency: int | None = None, shm_dir: Path | None = None) -> Daemon:
        self.daemons += 1
        extra = ["--shm-dir", str(shm_dir or self.cold_steps["cd"])]
        if concurrency is not None:
            extra += ["--concurrency", str(concurrency)]
        daemon = Daemon(self.work / f"daemon{self.daemons}", self.env, extra_args=extra)
        daemon.wait_until_idle()
        return daemon

    def model(self, size_gb: float, name: str) -> dict[str, Any]:
        directory = self.work / name
        tensors = write_synthetic_model(directory, total_bytes=int(size_gb * 1e9), shards=4,
                                        dtypes=("bf16", "fp16", "fp32"))
        self.store.upload(directory, BUCKET, f"{name}/")
        shards = sorted(p.name for p in directory.glob("*.safetensors"))
        return {"uri": f"{self.root}{name}/", "prefix": f"{name}/", "directory": directory,
                "shards": shards, "bytes": sum(t.nbytes for t in tensors.values()), "tensors": len(tensors)}

    def geometry(self, name: str, size_gb: float) -> dict[str, Any]:
        directory = self.work / name
        if name == "small":
            sizes = {n: t.nbytes for n, t in write_synthetic_model(
                directory, total_bytes=int(size_gb * 1e9), shards=4, dtypes=("bf16", "fp16", "fp32")).items()}
        else:
            sizes = write_geometry(directory, GEOMETRIES[name])
        self.store.upload(directory, BUCKET, f"{name}/")
        shards = sorted(p.name for p in directory.glob("*.safetensors"))
        shutil.rmtree(directory)  # the bucket holds it; the disk and page cache need not
        return {"uri": f"{self.root}{name}/", "prefix": f"{name}/", "shards": shards,
                "bytes": sum(sizes.values()), "tensors": len(sizes),
                "median_tensor_bytes": statistics.median(sizes.values()), "largest_tensor_bytes": max(sizes.values())}

    def shard_uris(self, model: dict[str, Any]) -> list[str]:
        return [f"{self.root}{model['prefix']}{s}" for s in model["shards"]]

    def streamer_against_cold(self, model: dict[str, Any]) -> dict[str, list[float]]:
        """a, c and d interleaved (order rotated per repetition); the first pass warms the storage for both."""
        paths = self.shard_uris(model)
        run_script(STREAMER_ALONE, *paths, env=self.env)  # warm: the store's own caches, same objects
        samples: dict[str, list[float]] = {"a": []}
        steps = ["a", *self.cold_steps]
        for repetition in range(self.repetitions):
            for step in steps[repetition % len(steps) :] + steps[: repetition % len(steps)]:
                if step == "a":
                    self.before_step()
                    samples["a"].append(run_script(STREAMER_ALONE, *paths, env=self.env)["seconds"])
                else:
                    self.record_cold_and_warm(samples, step, model)
            print(f"  rep {repetition + 1} done", file=sys.stderr)
        return samples

    def record_cold_and_warm(self, samples: dict[str, list[float]], step: str, model: dict[str, Any]) -> None:
        """c and d of cold step ``step`` ("cd" or "cd@DIR"), as samples "c" and "d" (or "c@DIR" and "d@DIR")."""
        cold, warm, read = self.cold_and_warm(model, shm_dir=self.cold_steps[step])
        assert read == model["bytes"], f"weightd read {read} bytes of a {model['bytes']}-byte model"
        samples.setdefault("c" + step[2:], []).append(cold)
        samples.setdefault("d" + step[2:], []).append(warm)

    def cold_and_warm(self, model: dict[str, Any], *, shm_dir: Path | None = None) -> tuple[float, float, int]:
        daemon = self.daemon(shm_dir=shm_dir)
        try:
            self.before_step()
            cold = run_script(ATTACH, model["uri"], daemon.target, "0", "1", env=self.env)["seconds"]
            warm = run_script(ATTACH, model["uri"], daemon.target, "0", "1", env=self.env)["seconds"]
            read = sum(m.storage_bytes_read for m in client.list_models(target=daemon.target))
        finally:
            daemon.stop()
        return cold, warm, read

    def interleaved(self, model: dict[str, Any]) -> dict[str, list[float]]:
        paths = self.shard_uris(model)
        steps: dict[str, Callable[[], float]] = {
            "a": lambda: run_script(STREAMER_ALONE, *paths, env=self.env)["seconds"],
            "b": lambda: run_script(DOWNLOAD_THEN_LOAD, BUCKET, model["prefix"], *model["shards"],
                                    env=self.env)["seconds"],
        }
        samples: dict[str, list[float]] = {"a": [], "b": []}
        names = [*steps, *self.cold_steps]
        for repetition in range(self.repetitions):
            # Rotate the order so no scenario always runs first (warm caches, server state).
            for name in names[repetition % len(names) :] + names[: repetition % len(names)]:
                if name in self.cold_steps:
                    self.record_cold_and_warm(samples, name, model)
                else:
                    samples[name].append(steps[name]())
                print(f"  rep {repetition + 1}: {name} done", file=sys.stderr)
        return samples

    def tensor_parallel(self, model: dict[str, Any]) -> dict[str, float]:
        """TP=4 all ranks, a full load and a lone rank, each into a fresh daemon, in an order rotated per
        repetition."""
        scenarios = {
            "all_ranks": (LOAD, model["uri"], "{target}", "4"),
            "full_load": (LOAD, model["uri"], "{target}", "1"),
            "lone_rank": (ATTACH, model["uri"], "{target}", "1", "4"),
        }
        samples: dict[str, list[float]] = {name: [] for name in scenarios}
        read: dict[str, int] = {}
        for repetition in range(self.repetitions):
            names = list(scenarios)
            for name in names[repetition % 3 :] + names[: repetition % 3]:
                script, *args = scenarios[name]
                daemon = self.daemon()
                try:
                    self.before_step()
                    result = run_script(script, *(a.format(target=daemon.target) for a in args), env=self.env)
                    samples[name].append(result["seconds"])
                    read[name] = sum(m.storage_bytes_read for m in client.list_models(target=daemon.target))
                finally:
                    daemon.stop()
        return {
            **{f"{name}_s": statistics.median(values) for name, values in samples.items()},
            "all_ranks_bytes": read["all_ranks"], "lone_rank_bytes": read["lone_rank"], "samples": samples,
        }

    def per_load_concurrency(self, model: dict[str, Any], concurrency: int = 8) -> dict[str, float]:
        """The same number of storage clients, from a daemon started with it and from a per-load override."""
        in_process, in_helper = [], []
        for _ in range(self.repetitions):
            for samples, daemon_concurrency, load_args in (
                (in_process, concurrency, ()),
                (in_helper, None, (str(concurrency),)),
            ):
                daemon = self.daemon(concurrency=daemon_concurrency)
                try:
                    samples.append(run_script(LOAD, model["uri"], daemon.target, "1", *load_args,
                                              env=self.env)["seconds"])
                finally:
                    daemon.stop()
        return {"concurrency": concurrency, "in_process_s": statistics.median(in_process),
                "in_helper_s": statistics.median(in_helper)}

    def restart(self, model: dict[str, Any]) -> dict[str, float]:
        """Kill the daemon with the model resident, start it again on the same cache directory, attach."""
        serving, attach = [], []
        for _ in range(self.repetitions):
            root = self.work / f"restart{self.daemons}"
            self.daemons += 1
            extra = ("--shm-dir", str(self.cold_steps["cd"]))
            first = Daemon(root, self.env, extra_args=extra)
            try:
                client.load(model["uri"], target=first.target)
            finally:
                first.kill()
            second = Daemon(root, self.env, extra_args=extra)  # returns once it answers
            try:
                serving.append(time.perf_counter() - second.started)
                attach.append(run_script(ATTACH, model["uri"], second.target, "0", "1", env=self.env)["seconds"])
                read = sum(m.storage_bytes_read for m in client.list_models(target=second.target))
                assert read == model["bytes"], "the restarted daemon should report the first load's bytes only"
            finally:
                second.stop()
        return {"serving_s": statistics.median(serving), "first_attach_s": statistics.median(attach)}

    def churn(self, model: dict[str, Any], cycles: int = 10) -> dict[str, Any]:
        """Load and evict the same model ``cycles`` times in one daemon; its private memory after each cycle."""
        daemon = self.daemon()
        after: list[int] = []
        try:
            for _ in range(cycles):
                client.load(model["uri"], target=daemon.target)
                client.evict(model["uri"], target=daemon.target)
                after.append(daemon.settled_private_bytes())
        finally:
            daemon.stop()
        return {"cycles": cycles, "daemon_private_bytes_after_each": after}

    def memory(self, model: dict[str, Any], processes: int = 4) -> dict[str, float]:
        def hold(args: list[str]) -> tuple[list[subprocess.Popen[str]], int]:
            procs = [subprocess.Popen([sys.executable, "-c", HOLD, *args], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=self.env) for _ in range(processes)]
            growth = 0
            for p in procs:
                assert p.stdout is not None
                growth += json.loads(p.stdout.readline())["private_growth"]
            return procs, growth

        def release(procs: list[subprocess.Popen[str]]) -> None:
            for p in procs:
                assert p.stdin is not None
                p.stdin.close()
                p.wait()

        daemon = self.daemon()
        try:
            idle = daemon.private_bytes()
            client.load(model["uri"], target=daemon.target)
            procs, client_growth = hold(["attach", model["uri"], daemon.target])
            shared = sum(m.resident_bytes for m in client.list_models(target=daemon.target))
            daemon_growth = daemon.settled_private_bytes() - idle
            release(procs)
        finally:
            daemon.stop()
        weightd_total = shared + client_growth + max(daemon_growth, 0)
        procs, baseline = hold(["stream", *self.shard_uris(model)])
        release(procs)
        return {"weightd_node_bytes": weightd_total, "weightd_shared_bytes": shared,
                "weightd_daemon_private_bytes": max(daemon_growth, 0), "weightd_clients_private_bytes": client_growth,
                "baseline_node_bytes": baseline}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--small-size-gb", type=float, default=0.25, help="second size, to show d stays flat")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--geometries", help=f"comma-separated, of: small, {', '.join(GEOMETRIES)}")
    parser.add_argument("--sizes-gb", help="with --geometries small: comma-separated sizes (default: --size-gb)")
    parser.add_argument("--shm-dirs", default="/dev/shm",
                        help="arena directories: the first for every scenario, each further one adds c and d")
    parser.add_argument("--storage", choices=STORES, default="seaweedfs",
                        help="what serves the models (fake-gcs, local: with --geometries only)")
    add_page_cache_option(parser)
    args = parser.parse_args()
    args.shm_dirs = [Path(d) for d in args.shm_dirs.split(",")]
    cold_page_cache(args)  # refuses a --page-cache it cannot honour before anything starts
    if args.geometries:
        return run_geometries(args)
    if args.storage != "seaweedfs":
        parser.error(f"--storage {args.storage} needs --geometries (scenario b downloads with boto3)")

    work = Path(tempfile.mkdtemp(prefix="weightd-bench-"))
    s3 = start_store("seaweedfs", work)
    try:
        bench = Bench(s3, work, args.repetitions, args.shm_dirs)
        big = bench.model(args.size_gb, "big")
        small = bench.model(args.small_size_gb, "small")
        print(f"models: {big['bytes'] / 1e9:.2f} GB ({big['tensors']} tensors), "
              f"{small['bytes'] / 1e9:.2f} GB; {args.repetitions} repetitions", file=sys.stderr)
        samples = bench.interleaved(big)
        small_cd = [bench.cold_and_warm(small) for _ in range(args.repetitions)]
        tp = bench.tensor_parallel(big)
        per_load = bench.per_load_concurrency(big)
        memory = bench.memory(big)
        restart = bench.restart(big)
        churn = bench.churn(big)
    finally:
        stop_process(s3.process)
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in samples.items()}
    small_c = statistics.median(c for c, _, _ in small_cd)
    small_d = statistics.median(d for _, d, _ in small_cd)
    results = {
        "machine": machine(), "arena_dirs": arena_dirs(args.shm_dirs),
        "model_bytes": big["bytes"], "model_tensors": big["tensors"], "small_model_bytes": small["bytes"],
        "repetitions": args.repetitions, "median_seconds": med, "samples": samples,
        "small_model": {"c": small_c, "d": small_d},
        "ratios": {
            "c/a": med["c"] / med["a"], **cold_ratios(med), "c/b": med["c"] / med["b"], "d/c": med["d"] / med["c"],
            "d/c small": small_d / small_c,
            **tp_ratios(tp, big["bytes"]),
            "f weightd node memory/model": memory["weightd_node_bytes"] / big["bytes"],
            "f 4 loaders node memory/model": memory["baseline_node_bytes"] / big["bytes"],
            "g per-load concurrency (helper) / daemon-wide": per_load["in_helper_s"] / per_load["in_process_s"],
            "h restart: first attach / cold (c)": restart["first_attach_s"] / med["c"],
        },
        "tensor_parallel": tp, "memory": memory, "per_load_concurrency": per_load, "restart": restart,
        "churn": churn,
    }
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def cold_ratios(med: dict[str, float]) -> dict[str, float]:
    """c/a with arenas in each further directory (--shm-dirs)."""
    return {f"{key}/a": value / med["a"] for key, value in med.items() if key.startswith("c@")}


def arena_dirs(shm_dirs: list[Path]) -> list[dict[str, Any]]:
    return [arena_dir(d) for d in shm_dirs]


def arena_dir(directory: Path) -> dict[str, Any]:
    """Where arenas go and which pages they get: a tmpfs's huge= policy, or a hugetlbfs's page size."""
    pool = HugePagePool.of(directory)
    pages = {"hugetlbfs_page_bytes": pool.page_size} if pool else {}
    return {"path": str(directory), "tmpfs_huge": huge_page_policy(directory) or "not a tmpfs", **pages}


def tp_ratios(tp: dict[str, Any], model_bytes: int) -> dict[str, float]:
    return {
        "e all-ranks bytes/model": tp["all_ranks_bytes"] / model_bytes,
        "e all-ranks time/full load": tp["all_ranks_s"] / tp["full_load_s"],
        "e lone-rank bytes/model": tp["lone_rank_bytes"] / model_bytes,
        "e lone-rank time/full load": tp["lone_rank_s"] / tp["full_load_s"],
    }


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("torch", "runai-model-streamer"))
    # Streamer settings given to this run apply to every contender; the record names them.
    settings = "".join(f", {k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("RUNAI_STREAMER_"))
    return (f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {versions}{settings}")


def add_page_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--page-cache", choices=("cold", "warm"),
                        help="with --storage local: empty the page cache before every measured step (cold, the "
                             "default; root only) or leave it as the first pass filled it (warm)")


def cold_page_cache(args: argparse.Namespace) -> bool:
    """Whether to empty the page cache before each step; refuses what cannot be done."""
    if args.storage != "local":
        if args.page_cache is not None:
            raise SystemExit("--page-cache is for --storage local: an object store's reads never use the page cache")
        return False
    if args.page_cache == "warm":
        return False
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        raise SystemExit("--page-cache cold (the default for --storage local) empties the page cache, which needs "
                         "root; run as root, or pass --page-cache warm")
    return True


def storage_label(args: argparse.Namespace) -> str:
    if args.storage != "local":
        return STORES[args.storage]
    return f"{STORES['local']}, page cache {'emptied before every step' if cold_page_cache(args) else 'warm'}"


def start_store(name: str, work: Path) -> Store:
    """The store of ``--storage``: an object store on loopback with the benchmark's bucket, or a directory."""
    if name == "local":
        (work / "local").mkdir()
        return LocalFiles(work / "local")
    if name == "fake-gcs":
        (work / "fake-gcs").mkdir()
        return start_gcs(work / "fake-gcs", free_port())  # its upload creates the bucket
    s3 = start_seaweedfs(work / "seaweedfs")
    s3.client().create_bucket(Bucket=BUCKET)
    return s3


def run_geometries(args: argparse.Namespace) -> int:
    names = args.geometries.split(",")
    unknown = set(names) - {"small", *GEOMETRIES}
    if unknown:
        raise SystemExit(f"unknown geometries {sorted(unknown)}")
    if args.storage == "fake-gcs" and "qwen3-moe" in names:
        # Measured: fake-gcs-server reached 22.6 GB of memory uploading it after the other three, and was killed.
        raise SystemExit("fake-gcs-server keeps several in-memory copies of each upload: the 5 GB qwen3-moe "
                         "does not fit a 24 GiB machine; measure it on --storage seaweedfs")
    sizes = [float(s) for s in args.sizes_gb.split(",")] if args.sizes_gb else [args.size_gb]
    runs = [(name, size) for name in names for size in (sizes if name == "small" else [args.size_gb])]
    work = Path(tempfile.mkdtemp(prefix="weightd-bench-"))
    store = start_store(args.storage, work)
    results: dict[str, Any] = {"machine": machine(), "storage": storage_label(args),
                               "arena_dirs": arena_dirs(args.shm_dirs), "repetitions": args.repetitions,
                               "geometries": {}}
    try:
        bench = Bench(store, work, args.repetitions, args.shm_dirs, cold_page_cache=cold_page_cache(args))
        for name, size_gb in runs:
            model = bench.geometry(name, size_gb)
            if name == "small" and len(sizes) > 1:
                name = f"small {size_gb:g} GB"
            print(f"{name}: {model['bytes'] / 1e9:.2f} GB, {model['tensors']} tensors", file=sys.stderr)
            samples = bench.streamer_against_cold(model)
            med = {k: statistics.median(v) for k, v in samples.items()}
            tp = bench.tensor_parallel(model)
            results["geometries"][name] = {
                **{k: v for k, v in model.items() if k not in ("uri", "prefix", "shards")},
                "samples": samples, "median_seconds": med, "tensor_parallel": tp,
                "ratios": {
                    "c/a": med["c"] / med["a"], **cold_ratios(med), "d/c": med["d"] / med["c"],
                    **tp_ratios(tp, model["bytes"]),
                },
            }
            print(f"  {name}: a {med['a']:.2f} s, c {med['c']:.2f} s (c/a {med['c'] / med['a']:.3f}), "
                  f"d {med['d'] * 1000:.1f} ms; {cold_ratios(med)}; TP=4 all ranks {tp['all_ranks_s']:.2f} s, "
                  f"full load {tp['full_load_s']:.2f} s, lone rank {tp['lone_rank_s']:.2f} s", file=sys.stderr)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    finally:
        stop_store(store)
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"weightd per geometry: {results['storage']}; {results['machine']}; arenas "
             f"{results['arena_dirs']}; medians of {args.repetitions}", "",
             "| geometry | size | tensors | median tensor | largest | a. streamer | c. weightd cold | c/a | "
             "d. warm attach | TP=4 all ranks / full load | lone rank: time / bytes (of a full load) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, g in results["geometries"].items():
        m, r = g["median_seconds"], g["ratios"]
        lines.append(f"| {name} | {g['bytes'] / 1e9:.2f} GB | {g['tensors']} | {g['median_tensor_bytes'] / 1e6:.2f} MB "
                     f"| {g['largest_tensor_bytes'] / 1e6:.0f} MB | {m['a']:.2f} s | {m['c']:.2f} s | {r['c/a']:.3f} "
                     f"| {m['d'] * 1000:.1f} ms | {r['e all-ranks time/full load']:.2f} "
                     f"| {r['e lone-rank time/full load']:.2f} / {r['e lone-rank bytes/model']:.2f} |")
    for name, g in results["geometries"].items():
        for key, value in cold_ratios(g["median_seconds"]).items():
            lines.append(f"{name}: {key} {value:.3f} ({g['median_seconds'][key.removesuffix('/a')]:.2f} s)")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def render(r: dict[str, Any]) -> str:
    gb = r["model_bytes"] / 1e9
    m = r["median_seconds"]
    lines = [
        f"weightd benchmark: {gb:.2f} GB model, {r['model_tensors']} tensors, {STORES['seaweedfs']}; "
        f"{r['machine']}; arenas {r['arena_dirs']}; medians of {r['repetitions']}",
        "",
        "| scenario | median |",
        "|---|---|",
        f"| a. runai streamer alone (SafetensorsStreamer from S3) | {m['a']:.2f} s |",
        f"| b. boto3 download to disk + safetensors load | {m['b']:.2f} s |",
        f"| c. weightd cold (fresh daemon: load + attach) | {m['c']:.2f} s |",
        f"| d. weightd warm (attach from a new process) | {m['d'] * 1000:.1f} ms |",
        *(f"| {key}. weightd cold, arenas there | {value:.2f} s |" for key, value in m.items() if key.startswith("c@")),
        f"| c / d at {r['small_model_bytes'] / 1e9:.2f} GB | {r['small_model']['c']:.2f} s / "
        f"{r['small_model']['d'] * 1000:.1f} ms |",
        f"| e. TP=4 all-ranks load / one full load | {r['tensor_parallel']['all_ranks_s']:.2f} s / "
        f"{r['tensor_parallel']['full_load_s']:.2f} s |",
        f"| e. TP=4 lone rank 1 cold attach | {r['tensor_parallel']['lone_rank_s']:.2f} s |",
        f"| g. full load, concurrency {r['per_load_concurrency']['concurrency']}: per load (helper) / daemon-wide "
        f"| {r['per_load_concurrency']['in_helper_s']:.2f} s / {r['per_load_concurrency']['in_process_s']:.2f} s |",
        f"| h. after kill -9: restarted daemon serving / first attach | {r['restart']['serving_s']:.2f} s / "
        f"{r['restart']['first_attach_s'] * 1000:.1f} ms |",
        f"| i. daemon RssAnon after load+evict 1 / {r['churn']['cycles']} | "
        f"{r['churn']['daemon_private_bytes_after_each'][0] / 1e6:.1f} MB / "
        f"{r['churn']['daemon_private_bytes_after_each'][-1] / 1e6:.1f} MB (target: within 50 MB) |",
        "",
        "| ratio | value | target |",
        "|---|---|---|",
    ]
    targets = {"c/a": "<= 1.05", "d/c": "<= 0.01", "d/c small": "<= 0.01", "e all-ranks bytes/model": "<= 1.02",
               "e lone-rank bytes/model": "~ its share (0.25) + what it must read whole",
               "f weightd node memory/model": "<= 1.05", "f 4 loaders node memory/model": "(baseline)"}
    for name, value in r["ratios"].items():
        lines.append(f"| {name} | {value:.3f} | {targets.get(name, '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
