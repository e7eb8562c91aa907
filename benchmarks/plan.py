"""What a load computes before its first byte, for checkpoints with many tensors: parsing the headers, planning
the arenas and blocks (weightd.daemon.plan) and routing the blocks into the streamer's requests
(weightd.daemon.streaming), at tp_size 1, for all ranks of TP=4 and TP=8, and for rank 1 alone.

The headers are those of a geometry from benchmarks/geometries.py with its full number of layers (only the
headers: no tensor bytes are written), so Qwen3-30B-A3B is its published 48 layers, 18,867 tensors.
``--layers`` sets the count, say 260 for about 100k tensors (DeepSeek-V3-sized). The collector is paused, as
it is while the daemon loads (weightd.daemon.gc_pause).

    .venv/bin/python benchmarks/plan.py [--geometry qwen3-moe] [--layers N] [--repetitions 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightd.daemon.config import SETTINGS  # noqa: E402
from weightd.daemon.gc_pause import collection_paused  # noqa: E402
from weightd.daemon.plan import build_plan  # noqa: E402
from weightd.daemon.safetensors_header import LENGTH_PREFIX_BYTES, SafetensorsHeader, parse_header  # noqa: E402
from weightd.daemon.sharding import Architecture, select_rules  # noqa: E402
from weightd.daemon.storage.base import PrefixedObjects  # noqa: E402
from weightd.daemon.streaming import _requests  # noqa: E402

from benchmarks.geometries import GEOMETRIES  # noqa: E402

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
                      torch.float8_e4m3fn: "F8_E4M3"}
# The published checkpoints' layer counts, where benchmarks/geometries.py cuts them.
PUBLISHED_LAYERS = {"qwen3-moe": 48, "llama3-8b": 32, "llama3-8b-fp8": 32}
# What the daemon's loader gives build_plan with its default streaming memory limit (weightd.daemon.loader).
MAX_RANGE_BYTES = max(1 << 20, next(s.default for s in SETTINGS if s.name == "memory_limit") // 4)


def header_bytes(geometry: str, layers: int) -> tuple[bytes, int, Architecture]:
    """One safetensors header for every tensor of the geometry (one shard: the plan's cost is per tensor)."""
    chosen = GEOMETRIES[geometry]
    config = {**chosen.config, "num_hidden_layers": layers}
    entries: dict[str, object] = {}
    offset = 0
    for name, (shape, dtype) in chosen.specs(config).items():
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries).encode()
    architecture = Architecture(str(config["model_type"]), int(config["num_key_value_heads"]))  # type: ignore[call-overload]
    return raw, LENGTH_PREFIX_BYTES + len(raw) + offset, architecture


def timed(step: Callable[[], object], repetitions: int) -> list[float]:
    samples = []
    for _ in range(repetitions):
        with collection_paused():
            started = time.perf_counter()
            step()
            samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="qwen3-moe", choices=sorted(GEOMETRIES))
    parser.add_argument("--layers", type=int, help="the geometry's layers (default: its published count)")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cut_to = GEOMETRIES[args.geometry].config["num_hidden_layers"]
    layers = args.layers or PUBLISHED_LAYERS.get(args.geometry) or int(cut_to)  # type: ignore[call-overload]
    raw, file_size, architecture = header_bytes(args.geometry, layers)

    def parse() -> SafetensorsHeader:
        return parse_header(raw, file="model.safetensors", file_size=file_size)

    header = parse()
    count = len(header.tensors)
    results: dict[str, list[float]] = {"parse": timed(parse, args.repetitions)}
    # (tp_size, ranks, group arena): all ranks as the daemon loads them into host memory (a group arena) and as
    # a GPU load's host tier (an arena each).
    loads = [(1, [0], False), (4, [0, 1, 2, 3], True), (4, [0, 1, 2, 3], False), (4, [1], False),
             (8, list(range(8)), True), (8, list(range(8)), False), (8, [1], False)]
    for tp_size, ranks, group_arena in loads:
        rules = select_rules(architecture, (), tp_size=tp_size)
        label = f"tp{tp_size} " + ("all ranks" if len(ranks) == tp_size else f"rank {ranks[0]}")
        label += " (group arena)" if group_arena else " (arena each)" if len(ranks) > 1 else ""

        def plan(tp_size: int = tp_size, ranks: list[int] = ranks, rules: tuple = rules,
                 group_arena: bool = group_arena) -> object:
            return build_plan([header], tp_size=tp_size, ranks=ranks, rules=rules, max_range_bytes=MAX_RANGE_BYTES,
                              group_arena=group_arena)

        results[f"{label}: plan"] = timed(plan, args.repetitions)
        built = plan()
        results[f"{label}: route"] = timed(
            lambda built=built: _requests(built, direct_piece_min=PrefixedObjects.min_separate_read_bytes,
                                          read_through_gap=PrefixedObjects.read_through_gap_bytes),
            args.repetitions,
        )
    print(f"{args.geometry}, {layers} layers: {count} tensors, {file_size / 1e9:.1f} GB; median of "
          f"{args.repetitions}, collector paused")
    print(f"{'step':<40} {'seconds':>8} {'us/tensor':>10}")
    for step, samples in results.items():
        median = statistics.median(samples)
        print(f"{step:<40} {median:8.3f} {median / count * 1e6:10.1f}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"python": platform.python_version(), "processor": platform.processor(),
                        "cpus": os.cpu_count()},
            "geometry": args.geometry, "layers": layers, "tensors": count, "bytes": file_size,
            "samples": results,
        }, indent=2))


if __name__ == "__main__":
    main()
