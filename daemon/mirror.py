"""Copying host arenas on to GPU memory while the loader fills them.

A GPU load streams into pinned host arenas (the same layout as the GPU arenas) and, as each region's final
bytes land, queues its copy to the GPU on a CUDA stream, so the bus works while storage is still being read.
Small regions (small tensors) are merged first, so the copy count follows bytes rather than tensors. Pure
bookkeeping on top of the ``DeviceArena``/``DeviceBackend`` seam: nothing here imports CUDA.

Pinning a fresh host arena faults in and page-locks every page (0.24 s per GiB on an H200, 0.16 s of it the
faulting): that runs in a thread beside the streamer, which fills the same pages meanwhile, and the copies of
what landed before it finished wait for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from weightd.daemon.memory.base import DeviceArena, DeviceBackend, FillableArena
from weightd.daemon.plan import ALIGNMENT, RankLayout, align

# A queued copy costs a few microseconds; at tens of GB/s, 8 MiB takes well over a hundred.
MIN_COPY_BYTES = 8 << 20


class _Run:
    __slots__ = ("end", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end


class CopyCoalescer:
    """Merges each layout's filled regions that touch, or lie within one alignment gap (padding between two
    tensors) of each other, and emits a merged run once it holds ``min_copy_bytes``; ``flush`` emits the rest.

    Every filled byte is emitted after it was filled, once; ``emit(layout, offset, length)`` may also cover
    padding between merged regions (bytes no tensor reads).
    """

    def __init__(self, layouts: int, emit: Callable[[int, int, int], None], *, min_copy_bytes: int) -> None:
        self._emit = emit
        self._min = min_copy_bytes
        self._runs: list[set[_Run]] = [set() for _ in range(layouts)]
        self._by_start: list[dict[int, _Run]] = [{} for _ in range(layouts)]
        self._by_end: list[dict[int, _Run]] = [{} for _ in range(layouts)]
        self._by_padded_end: list[dict[int, _Run]] = [{} for _ in range(layouts)]

    def filled(self, layout: int, offset: int, length: int) -> None:
        if length <= 0:
            return
        run = _Run(offset, offset + length)
        before = self._by_end[layout].get(run.start)
        if before is None and run.start % ALIGNMENT == 0:
            before = self._by_padded_end[layout].get(run.start)
        if before is not None:
            self._forget(layout, before)
            run.start = before.start
        after = self._by_start[layout].get(run.end) or self._by_start[layout].get(align(run.end))
        if after is not None:
            self._forget(layout, after)
            run.end = after.end
        if run.end - run.start >= self._min:
            self._emit(layout, run.start, run.end - run.start)
        else:
            self._remember(layout, run)

    def flush(self) -> None:
        for layout, runs in enumerate(self._runs):
            for run in sorted(runs, key=lambda r: r.start):
                self._emit(layout, run.start, run.end - run.start)
            runs.clear()
            self._by_start[layout].clear()
            self._by_end[layout].clear()
            self._by_padded_end[layout].clear()

    def _remember(self, layout: int, run: _Run) -> None:
        self._runs[layout].add(run)
        self._by_start[layout][run.start] = run
        self._by_end[layout][run.end] = run
        self._by_padded_end[layout][align(run.end)] = run

    def _forget(self, layout: int, run: _Run) -> None:
        self._runs[layout].discard(run)
        for index, key in ((self._by_start, run.start), (self._by_end, run.end), (self._by_padded_end, align(run.end))):
            if index[layout].get(key) is run:
                del index[layout][key]


class DeviceMirror:
    """Fills ``targets[i]`` from the loader's ``i``-th host arena as it is filled (weightd.daemon.loader's
    ``FillListener``). ``backends[i]`` owns ``targets[i]`` and pins the host arena it copies from."""

    def __init__(
        self, targets: Sequence[DeviceArena], backends: Sequence[DeviceBackend], *, min_copy_bytes: int = MIN_COPY_BYTES
    ) -> None:
        self._targets = targets
        self._backends = backends
        self._sources: Sequence[FillableArena] = ()
        self._coalescer = CopyCoalescer(len(targets), self._copy, min_copy_bytes=min_copy_bytes)
        self._lock = threading.Lock()
        self._pinned = False  # every source is pinned: copies go to the device as they are emitted
        self._waiting: list[tuple[int, int, int]] = []  # copies emitted before that, in order
        self._pinning: threading.Thread | None = None
        self._pin_error: BaseException | None = None  # of the pinning, or of the waiting copies it issued

    def started(self, sources: Sequence[FillableArena]) -> None:
        self._sources = sources  # first: a failed pin is undone by stopped()
        self._pinning = threading.Thread(target=self._pin_sources, name="weightd-pin", daemon=True)
        self._pinning.start()

    def filled(self, layout_index: int, offset: int, length: int) -> None:
        self._coalescer.filled(layout_index, offset, length)

    def stopped(self, *, completed: bool) -> None:
        """Wait for the pinning and every queued copy (they read the host arenas, which a failed load frees next);
        after a failure, unpin the host arenas too. A failed pin, or a failed copy among those that waited for it,
        fails a completed load."""
        try:
            if self._pinning is not None:
                self._pinning.join()
            if completed:
                if self._pin_error is not None:
                    raise self._pin_error
                self._coalescer.flush()
            for target in self._targets:
                target.finish_copies()
        finally:
            if not completed:
                for source, backend in zip(self._sources, self._backends, strict=False):
                    backend.unpin(source)

    def _pin_sources(self) -> None:
        try:
            for source, backend in zip(self._sources, self._backends, strict=True):
                backend.pin(source)
            with self._lock:
                for copy in self._waiting:
                    self._issue(*copy)
                self._waiting.clear()
                self._pinned = True
        except BaseException as e:  # raised by stopped(), in the loading thread
            self._pin_error = e

    def _copy(self, layout_index: int, offset: int, length: int) -> None:
        with self._lock:
            if not self._pinned:
                self._waiting.append((layout_index, offset, length))
                return
        self._issue(layout_index, offset, length)

    def _issue(self, layout_index: int, offset: int, length: int) -> None:
        self._targets[layout_index].copy_from(self._sources[layout_index], offset, length)


def copy_rearranged(
    sources: Sequence[FillableArena],
    source_layouts: Sequence[RankLayout],
    targets: Sequence[DeviceArena],
    target_layouts: Sequence[RankLayout],
    backends: Sequence[DeviceBackend],
) -> None:
    """Fill ``targets`` from full host arenas that lay the same tensors out elsewhere (a group arena, which the
    ranks share): one copy per run of slots that lie back to back in both (gaps under ALIGNMENT copied along).
    Leaves the sources pinned, as a mirror does, unless a copy fails."""
    completed = False
    try:
        for source, backend in zip(sources, backends, strict=True):
            backend.pin(source)
        for source, source_layout, target, target_layout in zip(
            sources, source_layouts, targets, target_layouts, strict=True
        ):
            for source_offset, offset, length in _runs(source_layout, target_layout):
                target.copy_from(source, offset, length, source_offset=source_offset)
        completed = True
    finally:
        try:
            for target in targets:
                target.finish_copies()
        finally:
            if not completed:
                for source, backend in zip(sources, backends, strict=True):
                    backend.unpin(source)


def _runs(source: RankLayout, target: RankLayout) -> list[tuple[int, int, int]]:
    """(source offset, target offset, length) of each run of ``target``'s slots back to back in both layouts."""
    where = {slot.name: slot.offset for slot in source.slots}
    runs: list[tuple[int, int, int]] = []
    for slot in target.slots:
        start = where[slot.name]
        if runs:
            last_start, last_offset, last_length = runs[-1]
            gap = slot.offset - (last_offset + last_length)
            if 0 <= gap < ALIGNMENT and start - (last_start + last_length) == gap:
                runs[-1] = (last_start, last_offset, last_length + gap + slot.nbytes)
                continue
        runs.append((start, slot.offset, slot.nbytes))
    return runs


def copy_whole(sources: Sequence[FillableArena], mirror: DeviceMirror) -> None:
    """Fill a mirror's targets from host arenas that are already full (the host tier)."""
    mirror.started(sources)
    completed = False
    try:
        for index, source in enumerate(sources):
            mirror.filled(index, 0, source.size)
        completed = True
    finally:
        mirror.stopped(completed=completed)
