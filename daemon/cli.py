"""``weightd serve|load|ls|metadata|evict|demo``.

The only place that reads flags, configures logging or writes os.environ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from weightd import client
from weightd.daemon.config import SETTINGS, DaemonConfig, parse_size
from weightd.daemon.errors import WeightdError


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (WeightdError, client.WeightdError) as e:
        print(f"weightd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightd", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", type=Path, help="TOML file (default: $WEIGHTD_CONFIG or /etc/weightd/weightd.toml)")
    for setting in SETTINGS:
        described = f"{setting.help} [env {setting.env}; default {_shown(setting.default)}]"
        serve.add_argument(f"--{setting.name.replace('_', '-')}", dest=setting.name, default=None,
                           help=described.replace("%", "%%"))  # argparse %-formats help
    serve.set_defaults(run=_serve)

    target_help = "daemon address: unix:///path.sock or HOST:PORT [env WEIGHTD_TARGET; default unix:///run/weightd/weightd.sock]"
    load = commands.add_parser("load", help="make a model resident, with a progress bar")
    load.add_argument("model_uri")
    load.add_argument("--tp-size", type=int, default=1, help="tensor-parallel size; without --rank, loads all ranks")
    load.add_argument("--rank", type=int, default=None, help="load only this rank")
    load.add_argument("--memory-limit", type=parse_size, default=None, help="staging buffer for this load")
    load.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                      help="the streamer's distributed mode for this load (needs CUDA; ignored without it)")
    load.add_argument("--concurrency", type=int, default=None,
                      help="storage clients (threads) for this load (default: the daemon's --concurrency)")
    load.add_argument("--device", default=None,
                      help="GPU to load into, by UUID (nvidia-smi -L) or as cuda:N; with several ranks, one per rank, "
                      "comma-separated (default: host memory)")
    load.add_argument("--target", help=target_help)
    load.set_defaults(run=_load)

    ls = commands.add_parser("ls", help="list resident models")
    ls.add_argument("--json", action="store_true", help="print a JSON list of objects")
    ls.add_argument("--target", help=target_help)
    ls.set_defaults(run=_ls)

    metadata = commands.add_parser("metadata", help="download a model's config/tokenizer files once; print their dir")
    metadata.add_argument("model_uri")
    metadata.add_argument("--target", help=target_help)
    metadata.set_defaults(run=_metadata)

    evict = commands.add_parser("evict", help="free a model's unleased memory")
    evict.add_argument("model_uri")
    evict.add_argument("--target", help=target_help)
    evict.set_defaults(run=_evict)

    demo = commands.add_parser("demo", help="generate a small model, serve it, attach it from two processes")
    demo.add_argument("--size-mb", type=int, default=256, help="approximate model size")
    demo.set_defaults(run=_demo)
    return parser


def _shown(default: object) -> str:
    if isinstance(default, frozenset):
        return ",".join(map(str, sorted(default))) or "(none)"
    return str(default) if default != "" else "(none)"


def _serve(args: argparse.Namespace) -> int:
    from weightd.daemon.server import serve

    flags = {s.name: getattr(args, s.name) for s in SETTINGS}
    config = DaemonConfig.load(flags, os.environ, config_file=args.config)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.update(config.streamer_environment(os.environ))
    asyncio.run(serve(config))
    return 0


def _load(args: argparse.Namespace) -> int:
    all_ranks = args.tp_size > 1 and args.rank is None
    devices = [d.strip() for d in (args.device or "").split(",") if d.strip()]
    bar = _ProgressBar(sys.stderr)
    result = client.load(
        args.model_uri,
        tp_size=args.tp_size,
        rank=args.rank or 0,
        all_ranks=all_ranks,
        memory_limit=args.memory_limit,
        distributed=args.distributed,
        concurrency=args.concurrency,
        device=devices[0] if len(devices) == 1 else None,
        rank_devices=devices if len(devices) > 1 else None,
        target=args.target,
        on_progress=bar.update,
    )
    bar.finish()
    ranks = f"all {args.tp_size} ranks" if all_ranks else f"rank {args.rank or 0} of {args.tp_size}"
    print(f"{args.model_uri}: {result.state} ({ranks}, {_human(result.bytes_total)})")
    return 0


def _ls(args: argparse.Namespace) -> int:
    models = client.list_models(target=args.target)
    if args.json:
        print(json.dumps([asdict(m) for m in models], indent=2))
        return 0
    for budget in client.memory_budgets(target=args.target):
        memory = f"GPU {budget.device_uuid}" if budget.device_uuid else budget.kind
        print(f"{memory} memory: {_human(budget.used_bytes)} used of a {_human(budget.limit_bytes)} budget "
              f"({_human(budget.capacity_bytes)} in all)")
    header = ("MODEL", "TP", "RANK", "LAYOUT", "MEMORY", "DEVICE", "STATE", "RESIDENT", "READ", "LEASES",
              "LAST USED")
    now = time.time()
    rows = [
        (m.model_uri, str(m.tp_size), str(m.rank), _layout(m), m.memory_kind, m.device_uuid or "-", m.state,
         _human(m.resident_bytes), _human(m.storage_bytes_read), str(m.leases),
         _ago(now - m.last_used) if m.last_used else "-")
        for m in models
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _layout(model: client.ResidentModel) -> str:
    """'default', or how many rules and fusions the entry was asked for (an engine's layout)."""
    parts = [f"rules={len(model.shard_rules)}"] if model.shard_rules else []
    parts += [f"fusions={len(model.fusions)}"] if model.fusions else []
    return ",".join(parts) or "default"


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


def _metadata(args: argparse.Namespace) -> int:
    print(client.fetch_metadata(args.model_uri, target=args.target).directory)
    return 0


def _evict(args: argparse.Namespace) -> int:
    freed = client.evict(args.model_uri, target=args.target)
    print(f"{args.model_uri}: evicted, {_human(freed)} freed")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from weightd.daemon.demo import run_demo

    logging.basicConfig(level=logging.WARNING)
    return run_demo(size_bytes=args.size_mb * 2**20)


class _ProgressBar:
    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def update(self, progress: client.LoadProgress) -> None:
        done = progress.bytes_done / progress.bytes_total if progress.bytes_total else 0.0
        filled = int(done * self.WIDTH)
        line = (f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done:6.1%} "
                f"{_human(progress.bytes_done)}/{_human(progress.bytes_total)} {progress.state}")
        print(line, end="", file=self._stream, flush=True)

    def finish(self) -> None:
        print(file=self._stream)


def _human(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


if __name__ == "__main__":
    sys.exit(main())
