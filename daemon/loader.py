"""One load, from a model location to filled arenas: the use case the registry runs for a missing entry.

``prepare`` resolves the model (weightd.daemon.source), picks the sharding rules and plans every rank's arena
layout and the byte ranges to fetch; the registry then makes room for ``arena_bytes`` in its budget, and
``stream`` allocates the arenas and fills them (weightd.daemon.streaming), in a helper process when the load
asks for its own concurrency (weightd.daemon.stream_helper). Both are blocking: the registry runs them on a
worker thread. Nothing touches local disk but the metadata cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from weightd.daemon.memory.base import FillableArena, HostBackend
from weightd.daemon.placement import Fusion
from weightd.daemon.plan import LoadPlan, RankLayout, build_plan
from weightd.daemon.sharding import ShardRule, select_rules
from weightd.daemon.source import ModelSource, resolve
from weightd.daemon.storage.base import ModelLocation, ObjectStore, open_store
from weightd.daemon.stream_helper import fetch_in_helper, process_concurrency_is
from weightd.daemon.streaming import StreamingError, explain, fetch_into

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSettings:
    memory_limit: int
    # Accepted for parity with the streamer's extra config; without CUDA, streaming is never distributed.
    distributed: bool = False
    concurrency: int | None = None  # None: the daemon-wide setting


@dataclass(frozen=True)
class PreparedLoad:
    """A resolved model and the plan for the ranks being loaded; nothing allocated yet."""

    store: ObjectStore
    source: ModelSource
    plan: LoadPlan

    @property
    def arena_bytes(self) -> int:
        return sum(self.plan.arena_sizes)


@dataclass(frozen=True)
class LoadedRank:
    layout: RankLayout
    arena: FillableArena  # the rank's own, or the group arena every rank of the load shares
    fetched_bytes: int


class FillListener(Protocol):
    """Follows a load's host arenas as they fill (weightd.daemon.mirror.DeviceMirror copies them to GPUs)."""

    def started(self, arenas: Sequence[FillableArena]) -> None:
        """The arenas exist, one per layout of the plan (a plan without a group arena), and nothing is in them
        yet."""
        ...

    def filled(self, layout_index: int, offset: int, length: int) -> None:
        """These bytes of arena ``layout_index`` are final."""
        ...

    def stopped(self, *, completed: bool) -> None:
        """Streaming ended (completed, or failed and the arenas are released next)."""
        ...


def prepare(
    location: ModelLocation,
    *,
    cache_dir: Path,
    tp_size: int,
    ranks: Sequence[int],
    rules: Sequence[ShardRule],
    fusions: Sequence[Fusion] = (),
    settings: LoadSettings,
    group_arena: bool = False,
    host_only: bool = False,
) -> PreparedLoad:
    """Resolve the model and plan the load; ``group_arena``: one arena the ranks share (build_plan's), which
    ``ranks`` must then be all of. ``host_only``: the arenas are what engines attach, no GPU copy follows (whose
    layout needs every tensor aligned): the files storage reads directly are then read with O_DIRECT."""
    store = open_store(location)
    source = resolve(store, cache_dir)
    if settings.distributed:
        logger.info("distributed streaming needs CUDA; this node streams %s non-distributed", location.uri)
    plan = build_plan(
        source.headers,
        tp_size=tp_size,
        ranks=ranks,
        rules=select_rules(source.architecture, rules, tp_size=tp_size),
        max_range_bytes=max(1 << 20, settings.memory_limit // 4),
        fusions=fusions,
        group_arena=group_arena,
        direct_io_files=frozenset(h.file for h in source.headers if host_only and store.reads_directly(h.file)),
    )
    return PreparedLoad(store, source, plan)


def stream(
    prepared: PreparedLoad,
    memory: HostBackend,
    *,
    settings: LoadSettings,
    on_progress: Callable[[int], None],
    listener: FillListener | None = None,
) -> list[LoadedRank]:
    """Allocate the plan's arenas (one per layout, or the group's) and fill them. On any failure every arena is
    released. A ``listener`` needs an arena per layout.

    A ``settings.concurrency`` of None, or what this process's streamer settings give anyway, streams in this
    process; another number streams in a helper process started with that concurrency.
    """
    store, plan = prepared.store, prepared.plan
    location = store.location
    label = f"{location.bucket}-{location.prefix.rstrip('/').rsplit('/', 1)[-1]}-tp{plan.tp_size}"
    paths = [store.streamer_path(f.file) for f in plan.files]
    concurrency = settings.concurrency
    helper_concurrency = None if concurrency is None or process_concurrency_is(concurrency) else concurrency
    arenas: list[FillableArena] = []
    started = time.monotonic()
    on_filled = listener.filled if listener is not None else None
    if listener is not None and plan.grouped:
        raise ValueError("a fill listener follows one arena per layout; plan the load without a group arena")
    try:
        arenas = _allocate(memory, plan, label)
        reserved = time.monotonic()
        if listener is not None:
            listener.started(arenas)
            for index, layout in enumerate(plan.layouts):
                for offset, length in layout.padding:  # zeros already, and the copy must carry them
                    listener.filled(index, offset, length)
        try:
            if helper_concurrency is None:
                fetch_into([a.tensor() for a in arenas], paths, plan, memory_limit=settings.memory_limit,
                           direct_piece_min=store.min_separate_read_bytes,
                           read_through_gap=store.read_through_gap_bytes, on_progress=on_progress,
                           on_filled=on_filled)
            else:
                fetch_in_helper(arenas, paths, plan, memory_limit=settings.memory_limit,
                                direct_piece_min=store.min_separate_read_bytes,
                                read_through_gap=store.read_through_gap_bytes, concurrency=helper_concurrency,
                                on_progress=on_progress, on_filled=on_filled)
        except StreamingError as e:
            raise explain(store, [f.file for f in plan.files], e) from e
        if listener is not None:
            listener.stopped(completed=True)
    except BaseException:
        if listener is not None and len(arenas) == len(plan.arena_sizes):
            listener.stopped(completed=False)
        for arena in arenas:
            arena.release()
        raise
    elapsed = time.monotonic() - started
    logger.info(
        "streamed %d bytes from %s in %.2f s (%.2f GB/s; arenas reserved in the first %.2f s; %s)",
        plan.fetched_bytes,
        location.uri,
        elapsed,
        plan.fetched_bytes / max(elapsed, 1e-9) / 1e9,
        reserved - started,
        "daemon-wide concurrency" if helper_concurrency is None else f"concurrency {helper_concurrency} in a helper",
    )
    return [
        LoadedRank(layout, arenas[plan.arena_of(index)], fetched)
        for index, (layout, fetched) in enumerate(zip(plan.layouts, plan.fetched_bytes_by_layout, strict=True))
    ]


def _allocate(memory: HostBackend, plan: LoadPlan, label: str) -> list[FillableArena]:
    """The plan's arenas, reserved side by side; if any fails, the others are released.

    Side by side for arenas that ``posix_fallocate`` zeroes on one thread under their file's lock (4 KiB pages on
    kernels before 5.14): a TP=4 load's four then took 0.14-0.17 s against 0.28-0.30 s one after another (1 GB,
    two cores). Arenas faulted in from every core gain nothing from it (0.51 s against 0.46 s).
    """
    if plan.grouped:
        return [memory.allocate(plan.arena_sizes[0], label=f"{label}-group")]
    layouts = plan.layouts
    if len(layouts) == 1:
        return [memory.allocate(layouts[0].size, label=f"{label}-r{layouts[0].rank}")]
    with ThreadPoolExecutor(max_workers=min(len(layouts), 8), thread_name_prefix="weightd-allocate") as pool:
        futures = [pool.submit(memory.allocate, layout.size, label=f"{label}-r{layout.rank}") for layout in layouts]
    arenas = [f.result() for f in futures if f.exception() is None]
    failure = next((f.exception() for f in futures if f.exception() is not None), None)
    if failure is not None:
        for arena in arenas:
            arena.release()
        raise failure
    return arenas
