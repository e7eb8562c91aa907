"""Where the cold path spends its time beyond the streamer: cProfile over one cold load, in-process.

    .venv/bin/python benchmarks/profile_cold.py [--geometry small|qwen2.5-0.5b|llama3-8b|llama3-8b-fp8|qwen3-moe]
        [--size-gb 1.0 (small only)] [--tp-size 4 [--rank 1]]

Runs the daemon's own phases (resolve: list + metadata + headers; plan; stream into a host arena) against a
local SeaweedFS server, on one thread, and prints the functions with the most own time.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightd.daemon import loader  # noqa: E402
from weightd.daemon.config import SETTINGS  # noqa: E402
from weightd.daemon.memory.host import HostMemory  # noqa: E402
from weightd.daemon.storage.base import parse_model_uri  # noqa: E402
from weightd.daemon.synthetic import write_synthetic_model  # noqa: E402

from benchmarks.geometries import GEOMETRIES, write_geometry  # noqa: E402
from tests.storage_servers import start_seaweedfs, stop_process  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--geometry", default="small", choices=["small", *GEOMETRIES])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=None, help="one rank alone (default: all ranks)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weightd-profile-"))
    s3 = start_seaweedfs(work / "seaweedfs")
    arenas = []
    try:
        os.environ.update(s3.env() | {"RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"})
        s3.client().create_bucket(Bucket="prof")
        if args.geometry == "small":
            write_synthetic_model(work / "m", total_bytes=int(args.size_gb * 1e9), shards=4,
                                  dtypes=("bf16", "fp16", "fp32"))
        else:
            write_geometry(work / "m", GEOMETRIES[args.geometry])
        s3.upload(work / "m", "prof", "m/")
        location = parse_model_uri("s3://prof/m/")
        memory = HostMemory(directory=Path("/dev/shm"), namespace=f"profile-{os.getpid()}")
        settings = loader.LoadSettings(memory_limit=next(s.default for s in SETTINGS if s.name == "memory_limit"))
        # One unprofiled load first: the server's first read after an upload is slow for every reader.
        warm = loader.prepare(location, cache_dir=work / "warm-cache", tp_size=1, ranks=[0], rules=(),
                              settings=settings)
        for rank in loader.stream(warm, memory, settings=settings, on_progress=lambda n: None):
            rank.arena.release()
        profiler = cProfile.Profile()
        phases = {}
        profiler.enable()
        t0 = time.perf_counter()
        ranks = [args.rank] if args.rank is not None else list(range(args.tp_size))
        prepared = loader.prepare(location, cache_dir=work / "cache", tp_size=args.tp_size, ranks=ranks, rules=(),
                                  settings=settings)
        t1 = time.perf_counter()
        arenas = loader.stream(prepared, memory, settings=settings, on_progress=lambda n: None)
        t2 = time.perf_counter()
        profiler.disable()
        phases = {"prepare (list, metadata, headers, plan)": t1 - t0, "stream into arena": t2 - t1}
        for name, seconds in phases.items():
            print(f"{name:40s} {seconds:7.3f} s")
        stats = pstats.Stats(profiler).sort_stats("tottime")
        stats.print_stats(15)
    finally:
        for rank in arenas:
            rank.arena.release()
        stop_process(s3.process)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
