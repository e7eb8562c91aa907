"""The daemon's load against the Run:ai streamer alone, alternated in one process.

    .venv/bin/python benchmarks/inprocess.py [--geometries small,qwen2.5-0.5b,llama3-8b] [--storage fake-gcs]
        [--repetitions 5] [--shm-dir /dev/shm] [--page-cache cold|warm] [--json out.json]

benchmarks/run.py measures each scenario in a fresh process, as a user meets them. On a VM that hands freed
memory back to its host (free page reporting), a fresh process's first touch of memory costs what the host
charges for it, and that depends on what ran and freed memory before; the fresh-process ratios then move by
more than the targets' margins from run to run (docs/benchmarks.md). Here every step runs in this one process,
in an order rotated per repetition, after one unmeasured pass of each has warmed the store:

  a    the streamer alone: SafetensorsStreamer over the shards (run.py's a)
  c    weightd's load phases: prepare (listing, metadata, headers, plan), then stream into a host arena, as the
       daemon's load thread runs them (collector paused); tp_size 1
  all  the same for all ranks of TP=4, in one group arena (as the daemon loads a group into host memory)
  apart  all ranks of TP=4 in an arena each (as a GPU load's host tier; every host load before the group arena)
  lone the same for rank 1 of 4 alone
  lone-unjoined  (object stores) rank 1 of 4 alone with every read its own request (the store's
       read_through_gap_bytes 0: no small reads joined across the other ranks' bytes between them, as before
       2026-12-06)
  c-buffered  (local files) c as a GPU's host tier is laid out (every tensor aligned), which the streamer reads
       through the page cache, as every load was read before 2026-12-06 (docs/benchmarks.md, "last"); c reads
       with O_DIRECT unless the page cache holds most of a file

It reports each step's median time, this process's CPU and the storage server's CPU (medians), every sample,
and the bytes each load fetched. No daemon, gRPC or client is involved: the difference is what the load's own
code costs against the streamer's on this machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runai_model_streamer import SafetensorsStreamer  # noqa: E402
from weightd.daemon import loader  # noqa: E402
from weightd.daemon.config import SETTINGS  # noqa: E402
from weightd.daemon.gc_pause import collection_paused  # noqa: E402
from weightd.daemon.memory.host import HostMemory  # noqa: E402
from weightd.daemon.storage.base import parse_model_uri  # noqa: E402

from benchmarks.daemon import cpu_seconds  # noqa: E402
from benchmarks.geometries import GEOMETRIES  # noqa: E402
from benchmarks.run import (  # noqa: E402
    STORES,
    Bench,
    LocalFiles,
    add_page_cache_option,
    arena_dir,
    cold_page_cache,
    machine,
    start_store,
    stop_store,
    storage_label,
)

# step -> (tp_size, ranks, group arena, small reads joined across gaps, host only); "a" is the streamer alone.
LOADS = {"c": (1, [0], False, True, True), "all": (4, [0, 1, 2, 3], True, True, True),
         "apart": (4, [0, 1, 2, 3], False, True, True), "lone": (4, [1], False, True, True)}
# The step each kind of store adds: what the last change made different there.
EXTRA_LOADS = {"object store": ("lone-unjoined", (4, [1], False, False, True)),
               "local": ("c-buffered", (1, [0], False, True, False))}


def store_cpu_seconds(pid: int | None) -> float:
    """The store's CPU so far (each runs as one process, started by tests.storage_servers); 0 for local files."""
    return 0.0 if pid is None else cpu_seconds(pid)


class InProcess:
    def __init__(self, bench: Bench, shm_dir: Path) -> None:
        self.bench = bench
        self.memory = HostMemory(directory=shm_dir, namespace=f"bench-inprocess-{os.getpid()}")
        self.settings = loader.LoadSettings(memory_limit=next(s.default for s in SETTINGS if s.name == "memory_limit"))
        self.loads = 0

    def streamer_alone(self, model: dict[str, Any]) -> int:
        tensors = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_files(self.bench.shard_uris(model))
            for name, tensor in streamer.get_tensors():
                tensors[name] = tensor
        return int(sum(t.nbytes for t in tensors.values()))

    def weightd_load(
        self, model: dict[str, Any], tp_size: int, ranks: list[int], group_arena: bool, joined: bool, host_only: bool
    ) -> int:
        self.loads += 1
        with collection_paused():
            prepared = loader.prepare(parse_model_uri(model["uri"]), cache_dir=self.bench.work / f"cache{self.loads}",
                                      tp_size=tp_size, ranks=ranks, rules=(), settings=self.settings,
                                      group_arena=group_arena, host_only=host_only)
            if not joined:
                prepared.store.read_through_gap_bytes = 0  # this store object only: every read a request
            loaded = loader.stream(prepared, self.memory, settings=self.settings, on_progress=lambda n: None)
        for rank in loaded:
            rank.arena.release()  # a group arena's ranks share it: released once, the rest do nothing
        return prepared.plan.fetched_bytes

    def measure(self, model: dict[str, Any], repetitions: int) -> dict[str, Any]:
        steps: dict[str, Callable[[], int]] = {"a": functools.partial(self.streamer_alone, model)}
        extra, extra_load = EXTRA_LOADS["local" if isinstance(self.bench.store, LocalFiles) else "object store"]
        for name, load in (*LOADS.items(), (extra, extra_load)):
            steps[name] = functools.partial(self.weightd_load, model, *load)
        for step in steps.values():  # the store's first reads of new objects are slow for every reader
            step()
        server = self.bench.store.process.pid if self.bench.store.process is not None else None
        samples: dict[str, dict[str, list[float]]] = {n: {"seconds": [], "cpu": [], "server_cpu": []} for n in steps}
        fetched: dict[str, int] = {}
        names = list(steps)
        for repetition in range(repetitions):
            for name in names[repetition % len(names) :] + names[: repetition % len(names)]:
                self.bench.before_step()
                own, served, started = os.times(), store_cpu_seconds(server), time.perf_counter()
                fetched[name] = steps[name]()
                seconds, after = time.perf_counter() - started, os.times()
                samples[name]["seconds"].append(seconds)
                samples[name]["cpu"].append(after.user + after.system - own.user - own.system)
                samples[name]["server_cpu"].append(store_cpu_seconds(server) - served)
            print(f"  rep {repetition + 1} done", file=sys.stderr)
        med = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
        return {
            "samples": samples, "medians": med, "fetched_bytes": fetched,
            "ratios": {
                "c/a": med["c"]["seconds"] / med["a"]["seconds"],
                "all ranks/c": med["all"]["seconds"] / med["c"]["seconds"],
                "all ranks apart/c": med["apart"]["seconds"] / med["c"]["seconds"],
                "lone rank/c": med["lone"]["seconds"] / med["c"]["seconds"],
                "lone rank bytes/c": fetched["lone"] / fetched["c"],
                f"{extra}/c": med[extra]["seconds"] / med["c"]["seconds"],
            },
            "extra_step": extra,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometries", default="small,qwen2.5-0.5b,llama3-8b",
                        help=f"comma-separated, of: small, {', '.join(GEOMETRIES)}")
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of the synthetic 'small' geometry")
    parser.add_argument("--storage", choices=sorted(STORES), default="seaweedfs")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--shm-dir", type=Path, default=Path("/dev/shm"), help="where the arenas go")
    add_page_cache_option(parser)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.geometries.split(",")
    unknown = set(names) - {"small", *GEOMETRIES}
    if unknown:
        raise SystemExit(f"unknown geometries {sorted(unknown)}")
    work = Path(tempfile.mkdtemp(prefix="weightd-inprocess-"))
    store = start_store(args.storage, work)
    results: dict[str, Any] = {
        "machine": machine(), "storage": storage_label(args), "repetitions": args.repetitions,
        "arena_dir": arena_dir(args.shm_dir),
        "geometries": {},
    }
    try:
        bench = Bench(store, work, args.repetitions, [args.shm_dir], cold_page_cache=cold_page_cache(args))
        # This process is the streamer and the loader: it gets the settings run.py gives their processes.
        os.environ.update(bench.env)
        in_process = InProcess(bench, args.shm_dir)
        for name in names:
            model = bench.geometry(name, args.size_gb)
            print(f"{name}: {model['bytes'] / 1e9:.2f} GB, {model['tensors']} tensors", file=sys.stderr)
            results["geometries"][name] = {
                **{k: v for k, v in model.items() if k not in ("uri", "prefix", "shards")},
                **in_process.measure(model, args.repetitions),
            }
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    finally:
        stop_store(store)
        shutil.rmtree(work, ignore_errors=True)
    print(render(results))
    return 0


def render(results: dict[str, Any]) -> str:
    lines = [f"weightd in one process: {results['storage']}; {results['machine']}; arenas in "
             f"{results['arena_dir']}; medians of {results['repetitions']} (time, then CPU: this process + the "
             "store's)", "",
             "| geometry | size | tensors | a. streamer | c. weightd | c/a | TP=4 all ranks | all / c | "
             "an arena each | apart / c | lone rank | lone / c: time, bytes | lone-unjoined or c-buffered | that / c |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(step: dict[str, float]) -> str:
        return f"{step['seconds']:.3f} s ({step['cpu']:.2f} + {step['server_cpu']:.2f})"

    for name, g in results["geometries"].items():
        m, r = g["medians"], g["ratios"]
        lines.append(f"| {name} | {g['bytes'] / 1e9:.2f} GB | {g['tensors']} | {cell(m['a'])} | {cell(m['c'])} "
                     f"| {r['c/a']:.3f} | {cell(m['all'])} | {r['all ranks/c']:.2f} | {cell(m['apart'])} "
                     f"| {r['all ranks apart/c']:.2f} | {cell(m['lone'])} "
                     f"| {r['lone rank/c']:.2f}, {r['lone rank bytes/c']:.2f} | {g['extra_step']}: "
                     f"{cell(m[g['extra_step']])} | {r[g['extra_step'] + '/c']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
