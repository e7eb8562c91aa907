"""Where the cold path spends its time beyond the streamer: cProfile over one cold load, in-process.

    .venv/bin/python benchmarks/profile_cold.py [--geometry small|qwen2.5-0.5b|llama3-8b|llama3-8b-fp8|qwen3-moe]
        [--size-gb 1.0 (small only)] [--tp-size 4 [--rank 1]] [--storage seaweedfs|fake-gcs|local]
        [--page-cache cold|warm (local)] [--shm-dir DIR]

Runs the daemon's own phases (resolve: list + metadata + headers; plan; stream into host arenas) against a
local object store (as benchmarks/run.py serves it), on one thread with the collector paused as in the daemon,
after one unprofiled load; prints each phase's time, the load's steps (STEPS below) and the functions with the
most own time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightd.daemon import loader, plan, source, streaming  # noqa: E402
from weightd.daemon.config import SETTINGS  # noqa: E402
from weightd.daemon.gc_pause import collection_paused  # noqa: E402
from weightd.daemon.memory.host import HostMemory  # noqa: E402
from weightd.daemon.storage.base import parse_model_uri  # noqa: E402

from benchmarks.geometries import GEOMETRIES  # noqa: E402
from benchmarks.run import STORES, Bench, add_page_cache_option, cold_page_cache, start_store, stop_store  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--geometry", default="small", choices=["small", *GEOMETRIES])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=None, help="one rank alone (default: all ranks)")
    parser.add_argument("--storage", choices=sorted(STORES), default="seaweedfs")
    parser.add_argument("--shm-dir", type=Path, default=Path("/dev/shm"), help="where the arenas go")
    add_page_cache_option(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weightd-profile-"))
    bench = Bench(start_store(args.storage, work), work, 1, [args.shm_dir], cold_page_cache=cold_page_cache(args))
    arenas = []
    try:
        os.environ.update(bench.env)  # the settings run.py gives the streamer and the daemon
        location = parse_model_uri(bench.geometry(args.geometry, args.size_gb)["uri"])
        memory = HostMemory(directory=args.shm_dir, namespace=f"profile-{os.getpid()}")
        settings = loader.LoadSettings(memory_limit=next(s.default for s in SETTINGS if s.name == "memory_limit"))
        # One unprofiled load first: the server's first read after an upload is slow for every reader.
        warm = loader.prepare(location, cache_dir=work / "warm-cache", tp_size=1, ranks=[0], rules=(),
                              settings=settings)
        for rank in loader.stream(warm, memory, settings=settings, on_progress=lambda n: None):
            rank.arena.release()
        profiler = cProfile.Profile()
        ranks = [args.rank] if args.rank is not None else list(range(args.tp_size))
        bench.before_step()
        with collection_paused():  # as the daemon's load runs: a full collection would land in whatever runs then
            profiler.enable()
            t0 = time.perf_counter()
            prepared = loader.prepare(location, cache_dir=work / "cache", tp_size=args.tp_size, ranks=ranks,
                                      rules=(), settings=settings, host_only=True,  # as the daemon would
                                      group_arena=args.tp_size > 1 and args.rank is None)
            t1 = time.perf_counter()
            arenas = loader.stream(prepared, memory, settings=settings, on_progress=lambda n: None)
            t2 = time.perf_counter()
            profiler.disable()
        phases = {"prepare (list, metadata, headers, plan)": t1 - t0, "stream into arena": t2 - t1}
        for name, seconds in phases.items():
            print(f"{name:40s} {seconds:7.3f} s")
        stats = pstats.Stats(profiler)
        for name, seconds in steps(stats).items():
            print(f"  {name:38s} {seconds:7.3f} s")
        stats.sort_stats("tottime").print_stats(15)
    finally:
        for rank in arenas:
            rank.arena.release()
        stop_store(bench.store)
        shutil.rmtree(work, ignore_errors=True)
    return 0


# The load's steps, by the function that runs each on the loading thread: the profiler sees only this thread,
# so work on other threads (faulting in the arena, the scatter's copies) shows as the wait of the step that
# started it.
STEPS: dict[str, Callable[..., object]] = {
    "resolve: listing, metadata, headers": source.resolve,
    "plan": plan.build_plan,
    "reserve the arenas": loader._allocate,
    "wait for the streamer's ranges": streaming._RangeReader.wait,
    "wait for scatters and replicas' copies": streaming._Scatters.wait,
    # Replicas whose source a staged run fills; the others are copied on the scatter's threads as they land.
    "replicas copied after the stream": streaming._copy_duplicates,
}


def steps(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of each of STEPS in a profile (0 for a step that did not run)."""
    profiled = stats.stats  # type: ignore[attr-defined]  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    return {
        name: profiled.get((f.__code__.co_filename, f.__code__.co_firstlineno, f.__code__.co_name), (0, 0, 0, 0.0))[3]
        for name, f in STEPS.items()
    }


if __name__ == "__main__":
    sys.exit(main())
