"""Phase (b) of a load: fetch exactly a plan's byte ranges with runai-model-streamer, which writes them
straight into the destination arenas; only tensor-parallel slices that scatter, and small reads cheaper read
as one (runs the arena breaks, object-store reads across small gaps), pass through a bounded staging buffer.
Blocking; runs in the daemon's load threads or in a streaming helper process.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from operator import attrgetter

import numpy
import torch
from runai_model_streamer import FileStreamer
from runai_model_streamer.libstreamer.libstreamer import (
    SUCCESS_ERROR_CODE,
    runai_end,
    runai_request,
    runai_response,
    runai_response_str,
)
from weightd.daemon.config import DEFAULT_STAGING_BYTES
from weightd.daemon.errors import StorageUnavailableError, WeightdError
from weightd.daemon.plan import (
    ALIGNMENT,
    DIRECT_IO_BLOCK,
    SMALLEST_DIRECT_IO_BLOCK,
    Block,
    LoadPlan,
    Rearranged,
    Target,
    align,
)
from weightd.daemon.storage.base import ObjectStore

_LIBC = ctypes.CDLL(None)  # the C library this process already uses


class StreamingError(Exception):
    """The streamer could not deliver a range (it says little more than "File access error"); ``explain``
    asks storage what is wrong."""


def _return_freed_heap() -> None:
    """Give the C heap's free pages back to the OS.

    The streamer's workers and S3 clients free tens of MB of buffers when a streamer ends, and glibc keeps
    them in its per-thread arenas: without this the daemon grew by about 50 MB per 1 GB load, with it 15 MB
    (benchmark f). Other C libraries may not have malloc_trim; they keep their own policy.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _end_in_background(session: FileStreamer) -> None:
    """End a streamer whose ranges have all landed on a thread of its own, off the load's critical path.

    What is left is stopping its storage clients and freeing their buffers: 0.03-0.06 s after a 0.25 GB load
    and 0.09-0.11 s after 1 GB on this project's 2-core machine, which the load's caller need not wait for.
    """
    handle, session.streamer = session.streamer, None  # FileStreamer.__exit__ now leaves the handle alone
    threading.Thread(target=_end, args=(handle,), name="weightd-streamer-end").start()


def _end(handle: object) -> None:
    runai_end(handle)
    _return_freed_heap()


@dataclass(frozen=True)
class _Direct:
    """Bytes the streamer writes straight into an arena: no buffer, no copy."""

    file_index: int
    file_offset: int
    length: int
    arena_index: int
    dst_offset: int


@dataclass(frozen=True)
class _Staged:
    """One read into the staging buffer, then copied out: a block whose bytes scatter (row slices for several
    ranks), or several small reads of one file joined with the bytes between them (read and dropped)."""

    file_index: int
    blocks: tuple[Block, ...]  # in file order, apart

    @property
    def file_offset(self) -> int:
        return self.blocks[0].file_offset

    @property
    def length(self) -> int:
        """The bytes read, gaps between blocks included."""
        last = self.blocks[-1]
        return last.file_offset + last.length - self.file_offset

    @property
    def fetched(self) -> int:
        """The plan's bytes among them."""
        return sum(block.length for block in self.blocks)


@dataclass(frozen=True)
class _Duplicate:
    """A replicated tensor's bytes, fetched once into one rank's arena and copied to another's."""

    src_arena: int
    src_offset: int
    dst_arena: int
    dst_offset: int
    length: int


def _route(plan: LoadPlan, *, direct_piece_min: int) -> tuple[list[_Direct], list[_Staged], list[_Duplicate]]:
    """Split the plan's blocks into direct writes, staged scatters and in-memory duplicates.

    Exactly the plan's bytes are fetched, each once. A single-row block whose targets' windows tile it is read
    as one direct range per window (a replicated tensor's one window: one range, then copies), unless it has
    several windows under ``direct_piece_min`` bytes each (each lands in another arena, so each would be a
    request of its own: the streamer merges only ranges back to back in memory too); a block of whole rows for
    one rank is one direct range; anything else is staged and scattered. A block under ``direct_piece_min``
    bytes that lies back to back with staged ones is staged too: read directly, such a block (a norm, a lone
    rank's quarter of a small tensor) would split the staged run around it into separate requests.
    """
    direct: list[_Direct] = []
    staged: list[_Staged] = []
    duplicates: list[_Duplicate] = []
    for file_index, file_plan in enumerate(plan.files):
        blocks = sorted(file_plan.blocks, key=lambda b: b.file_offset)
        for block, directly in zip(blocks, _direct_reads(blocks, direct_piece_min), strict=True):
            if not directly:
                staged.append(_Staged(file_index, (block,)))
                continue
            fetched: dict[tuple[int, int], Target] = {}
            for t in block.targets:  # one row (or whole rows for one rank: one target of the block's full width)
                if (t.column, t.width) in fetched:
                    src = fetched[(t.column, t.width)]
                    duplicates.append(_Duplicate(src.arena_index, block.dst_offset(src),
                                                 t.arena_index, block.dst_offset(t), t.width))
                else:
                    fetched[(t.column, t.width)] = t
                    direct.append(_Direct(file_index, block.file_offset + t.column, block.rows * t.width,
                                          t.arena_index, block.dst_offset(t)))
    return direct, staged, duplicates


def _direct_reads(blocks: Sequence[Block], direct_piece_min: int) -> list[bool]:
    """For one file's blocks in file order: whether each is read directly. A small block back to back with a
    staged one is staged with it, and so is a chain of them: one pass forward, one back. Small is by the run a
    block is read in: blocks each written whole to one place, back to back in the file and in their arena (a
    group arena's shared tensors), are one request together."""
    direct = [_reads_directly(block, direct_piece_min) for block in blocks]
    if all(direct):
        return direct
    touches_next = [a.file_offset + a.length == b.file_offset for a, b in pairwise(blocks)]
    small = [run < direct_piece_min for run in _run_lengths(blocks, direct, touches_next)]
    for i in range(1, len(blocks)):
        if direct[i] and small[i] and touches_next[i - 1] and not direct[i - 1]:
            direct[i] = False
    for i in range(len(blocks) - 2, -1, -1):
        if direct[i] and small[i] and touches_next[i] and not direct[i + 1]:
            direct[i] = False
    return direct


def _run_lengths(blocks: Sequence[Block], direct: Sequence[bool], touches_next: Sequence[bool]) -> list[int]:
    """For each block, the bytes of the run of direct reads it belongs to (its own length outside one)."""
    lengths = [block.length for block in blocks]
    start = 0
    for end in range(1, len(blocks) + 1):
        if end < len(blocks) and direct[end - 1] and direct[end] and touches_next[end - 1] and _continues(
            blocks[end - 1], blocks[end]
        ):
            continue
        if end - start > 1:
            lengths[start:end] = [sum(lengths[start:end])] * (end - start)
        start = end
    return lengths


def _continues(before: Block, after: Block) -> bool:
    """Whether ``after``, one place in one arena, is written right where ``before``, one too, ends."""
    if not (_lands_in_one_piece(before) and _lands_in_one_piece(after)):
        return False
    a, b = before.targets[0], after.targets[0]
    return a.arena_index == b.arena_index and before.dst_offset(a) + before.length == after.dst_offset(b)


def _lands_in_one_piece(block: Block) -> bool:
    """Whether ``block`` goes to one place, as it lies in the file: one target of whole rows (a lone rank's, or a
    group arena's)."""
    if len(block.targets) != 1:
        return False
    only = block.targets[0]
    return only.width == block.width and (block.rows == 1 or only.dst_row_stride == block.width)


def _reads_directly(block: Block, direct_piece_min: int) -> bool:
    """Whether the streamer can write ``block`` straight into arenas, each distinct window once."""
    if len(block.targets) == 1:  # one place: its one window must be the whole block (whole rows, if several)
        return _lands_in_one_piece(block)
    if block.rows > 1:  # several ranks' columns of each row: scattered
        return False
    windows = {(t.column, t.width) for t in block.targets}
    small_pieces = len(windows) > 1 and block.width < direct_piece_min * len(windows)
    return sum(width for _, width in windows) == block.width and not small_pieces


# Direct ranges back to back in their file and their arena are handed to the streamer as one range up to this
# size: the streamer reads them as one request either way, but each range costs a response and a Python
# callback (100k tensors: 1 s of a 2.4 s stream). Small, so that a range's response (the load's progress, a GPU
# load's copy on) comes about as early as one tensor's did: with 16 MiB, a load reported its first bytes when
# a third of it had landed.
COALESCE_MAX_BYTES = 1 << 20


def _coalesce(ordered: list[_Direct]) -> list[_Direct]:
    """``ordered`` (in file order, as ``_stage_broken_runs`` returns it) with each run of ranges back to back in
    one file and one arena merged, up to ``COALESCE_MAX_BYTES`` a range (a larger range stays as it is)."""
    merged: list[_Direct] = []
    for run in _direct_runs(ordered):
        start = 0
        while start < len(run):
            first = run[start]
            length, end = first.length, start + 1
            while end < len(run) and length + run[end].length <= COALESCE_MAX_BYTES:
                length += run[end].length
                end += 1
            merged.append(first if end == start + 1 else _Direct(first.file_index, first.file_offset, length,
                                                                 first.arena_index, first.dst_offset))
            start = end
    return merged


# Ranges back to back in their file but not in their arena are a request each: after a tensor whose size is not a
# multiple of ALIGNMENT the next slot starts on the next aligned offset, not where the tensor ended (an FP8
# checkpoint's 4-byte scales, 5,760-byte norms). A run of such ranges under this size each is read as one staged
# block (of up to COALESCE_MAX_BYTES) and copied into the slots: a copy of 64 KiB takes less than a request.
STAGED_RUN_PIECE_MAX = 64 << 10


def _stage_broken_runs(direct: list[_Direct]) -> tuple[list[_Direct], list[_Staged]]:
    """Split ``direct`` into the ranges that stay direct (in file order) and staged blocks for runs of small
    ranges back to back in one file that the arena breaks (see STAGED_RUN_PIECE_MAX); every byte is still
    fetched once."""
    kept: list[_Direct] = []
    staged: list[_Staged] = []
    run: list[_Direct] = []
    run_bytes = 0
    for d in sorted(direct, key=attrgetter("file_index", "file_offset")):
        if d.length >= STAGED_RUN_PIECE_MAX:
            _end_run(run, kept, staged)
            run, run_bytes = [], 0
            kept.append(d)
            continue
        last = run[-1] if run else None
        if (last is None or d.file_index != last.file_index or d.file_offset != last.file_offset + last.length
                or run_bytes + d.length > COALESCE_MAX_BYTES):
            _end_run(run, kept, staged)
            run, run_bytes = [], 0
        run.append(d)
        run_bytes += d.length
    _end_run(run, kept, staged)
    return kept, staged


def _end_run(run: list[_Direct], kept: list[_Direct], staged: list[_Staged]) -> None:
    """A run of ranges back to back in one file: staged as one block if the arena breaks it, else kept."""
    if len(_direct_runs(run)) <= 1:  # one request already
        kept.extend(run)
        return
    start = run[0].file_offset
    targets = tuple(Target(d.arena_index, d.file_offset - start, d.length, d.dst_offset, d.length) for d in run)
    block = Block(start, 1, run[-1].file_offset + run[-1].length - start, 0, targets)
    staged.append(_Staged(run[0].file_index, (block,)))


def _bridge_gaps(
    direct: list[_Direct], staged: list[_Staged], *, gap_max: int, small: int, length_max: int
) -> tuple[list[_Direct], list[_Staged]]:
    """Join small reads of one file at most ``gap_max`` bytes apart into one staged read, the bytes between them
    read and dropped: under that gap another request costs more than the bytes (a lone rank's quarter of each
    small tensor, the other ranks' three quarters between). Small: a staged read, or a run of direct ranges
    (back to back in file and arena: one request) under ``small`` bytes; a larger run stays direct, as staging
    it would copy all its bytes once more to save one request. A joined read spans at most ``length_max``.
    Returns the direct ranges left (in file order) and the staged reads."""
    if gap_max <= 0:
        return direct, staged
    # (file index, offset, the read as a staged one if small, the direct run it is, if one), in file order
    reads: list[tuple[int, int, _Staged | None, list[_Direct]]] = []
    for run in _direct_runs(direct):
        first, length = run[0], sum(d.length for d in run)
        joinable = None
        if length < small:  # the run as one block landing where its ranges would
            landing = Target(first.arena_index, 0, length, 0, length)
            joinable = _Staged(first.file_index, (Block(first.file_offset, 1, length, first.dst_offset, (landing,)),))
        reads.append((first.file_index, first.file_offset, joinable, run))
    reads += [(item.file_index, item.file_offset, item, []) for item in staged]
    reads.sort(key=lambda read: read[:2])
    kept: list[_Direct] = []
    joined: list[_Staged] = []
    group: list[tuple[_Staged, list[_Direct]]] = []

    def close_group() -> None:
        if len(group) == 1 and group[0][1]:  # a direct run alone stays direct
            kept.extend(group[0][1])
        elif group:
            joined.append(_Staged(group[0][0].file_index, tuple(b for item, _ in group for b in item.blocks)))
        group.clear()

    for file_index, file_offset, item, run in reads:
        if item is None:
            close_group()
            kept.extend(run)
            continue
        if group:
            opening, last = group[0][0], group[-1][0]
            if (file_index != last.file_index or file_offset - (last.file_offset + last.length) > gap_max
                    or file_offset + item.length - opening.file_offset > length_max):
                close_group()
        group.append((item, run))
    close_group()
    return kept, joined


def _direct_runs(direct: list[_Direct]) -> list[list[_Direct]]:
    """``direct`` (in file order) in runs back to back in one file and one arena: a request each."""
    runs: list[list[_Direct]] = []
    for d in direct:
        last = runs[-1][-1] if runs else None
        if (last is not None and d.file_index == last.file_index and d.arena_index == last.arena_index
                and d.file_offset == last.file_offset + last.length and d.dst_offset == last.dst_offset + last.length):
            runs[-1].append(d)
        else:
            runs.append([d])
    return runs


def _requests(
    plan: LoadPlan, *, direct_piece_min: int, read_through_gap: int
) -> tuple[list[_Direct], list[_Staged], list[_Duplicate]]:
    """What the streamer is asked for: the plan routed, the reads of files read with O_DIRECT that would land
    where they disagree with the file staged, runs the arena breaks staged, small reads close together joined,
    direct runs merged."""
    direct, staged, duplicates = _route(plan, direct_piece_min=direct_piece_min)
    direct, disagreeing = _stage_disagreeing(direct, _direct_io_files(plan))
    direct, staged_runs = _stage_broken_runs(direct)
    direct, staged = _bridge_gaps(direct, staged + disagreeing + staged_runs, gap_max=read_through_gap,
                                  small=direct_piece_min, length_max=plan.max_range_bytes)
    return _coalesce(direct), staged, duplicates


def _direct_io_files(plan: LoadPlan) -> set[int]:
    return {index for index, file_plan in enumerate(plan.files) if file_plan.direct_io}


def _stage_disagreeing(direct: list[_Direct], direct_io_files: set[int]) -> tuple[list[_Direct], list[_Staged]]:
    """Split ``direct`` into the ranges kept and a staged read for each range of a file in ``direct_io_files``
    whose destination disagrees with its file offset modulo DIRECT_IO_BLOCK: one such range would make the
    streamer read the whole file through the page cache. The staging buffer places each read to agree."""
    kept: list[_Direct] = []
    staged: list[_Staged] = []
    for d in direct:
        if d.file_index in direct_io_files and (d.dst_offset - d.file_offset) % DIRECT_IO_BLOCK:
            landing = Target(d.arena_index, 0, d.length, d.dst_offset, d.length)
            staged.append(_Staged(d.file_index, (Block(d.file_offset, 1, d.length, 0, (landing,)),)))
        else:
            kept.append(d)
    return kept, staged


def fetch_into(
    destinations: list[torch.Tensor],
    paths: list[str],
    plan: LoadPlan,
    *,
    memory_limit: int,
    direct_piece_min: int,
    read_through_gap: int,
    on_progress: Callable[[int], None],
    on_filled: FillCallback | None = None,
) -> None:
    """Drive the streamer's range API directly so that it writes into the arenas themselves.

    ``paths`` are the streamer's paths of ``plan.files``. ``memory_limit`` bounds only the staging buffer
    that scattered blocks pass through; a block whose per-rank pieces are under ``direct_piece_min`` bytes
    passes through it too, read once (the storage's ``min_separate_read_bytes``), and so do small reads at
    most ``read_through_gap`` bytes apart, read as one with the bytes between them (the storage's
    ``read_through_gap_bytes``). ``on_progress`` gets the plan's bytes of each fetched range as it lands;
    ``on_filled`` each destination region (arena index, offset, length) once its final bytes are in place. Both
    are called from this thread. A replicated tensor read into one rank's arena is copied to the others' as its
    range lands, beside the ranges still to come, and a group arena's rows are rearranged into their slices
    likewise (such a plan takes no ``on_filled``). A storage failure raises StreamingError.
    """
    if plan.rearranged and on_filled is not None:
        raise ValueError("a group arena's regions are final only once rearranged: follow it without on_filled")
    filled = on_filled or _ignore_filled
    direct, staged, duplicates = _requests(plan, direct_piece_min=direct_piece_min, read_through_gap=read_through_gap)
    if not direct and not staged:
        return
    bases = [d.data_ptr() for d in destinations]
    scratch = Scratch()
    slots = _staging_slots(staged, memory_limit)
    buffer = STAGING_BUFFERS.take(staging_buffer_bytes(slots))
    staging = buffer[-buffer.data_ptr() % DIRECT_IO_BLOCK :]  # from a block's start: reads are placed to agree
    # Leaving this block waits for every scatter, so none writes after a failed load's arenas are released.
    with ThreadPoolExecutor(max_workers=SCATTER_THREADS, thread_name_prefix="weightd-scatter") as pool:
        scatters = _Scatters(pool)
        try:
            # The streamer session owns the C handle and applies object-store credentials once.
            with FileStreamer() as session:
                session.handle_object_store(paths[0], session.streamer)
                reader = _RangeReader(session.streamer, paths)
                copied_on_landing, copied_at_end = _duplicates_by_source(direct, duplicates)
                rearranged_on_landing, rearranged_at_end = _rearranged_by_source(direct, plan.rearranged)
                reader.feed([
                    _Range(d.file_index, d.file_offset, d.length, bases[d.arena_index] + d.dst_offset,
                           functools.partial(_direct_landed, d, copies, rearranged, destinations, scratch,
                                             scatters, on_progress, filled))
                    for d, copies, rearranged in zip(direct, copied_on_landing, rearranged_on_landing, strict=True)
                ])
                in_flight: list[tuple[int, list[int]]] = []  # each slot's batch and its submissions, oldest first
                for index, batch in enumerate(_batches(staged, slots[0], _direct_io_files(plan))):
                    if len(in_flight) == len(slots):
                        # A slot is free once its batch has landed and every block of it has scattered.
                        oldest, submissions = in_flight.pop(0)
                        reader.wait(submissions)
                        scatters.wait(oldest)
                    slot = staging[(index % len(slots)) * slots[0] :]
                    in_flight.append((index, reader.submit([
                        _staged_range(item, slot[cursor:], destinations, scatters, index, on_progress, filled)
                        for cursor, item in batch
                    ])))
                reader.wait()
                _end_in_background(session)
            scatters.wait(None)
        except ValueError as e:  # how the streamer's Python layer reports a failed start or request
            _return_freed_heap()
            raise StreamingError(str(e)) from e
        except BaseException:
            _return_freed_heap()  # the streamer ended with the failure and freed its buffers
            raise
    # Only now, every range answered and every scatter done: a failed load's buffer is dropped, not reused.
    STAGING_BUFFERS.give_back(buffer)
    _copy_duplicates(copied_at_end, destinations)
    _duplicates_filled(copied_at_end, filled)
    for item in rearranged_at_end:
        rearrange(destinations[0], item, scratch)


# (arena index, offset, length) of a destination region whose bytes are final.
FillCallback = Callable[[int, int, int], None]


def _ignore_filled(arena_index: int, offset: int, length: int) -> None:
    pass


def _direct_landed(
    d: _Direct,
    copies: list[_Duplicate],
    rearranged: list[Rearranged],
    destinations: list[torch.Tensor],
    scratch: Scratch,
    scatters: _Scatters,
    on_progress: Callable[[int], None],
    on_filled: FillCallback,
) -> None:
    on_progress(d.length)
    on_filled(d.arena_index, d.dst_offset, d.length)
    if copies or rearranged:  # the replicas of what just landed, or its slices, made beside the ranges to come
        scatters.start(_Scatters.UNBATCHED,
                       functools.partial(_after_landing, copies, rearranged, destinations, scratch),
                       functools.partial(_duplicates_filled, copies, on_filled))
        scatters.finish_done()


def _after_landing(
    copies: list[_Duplicate], rearranged: list[Rearranged], destinations: list[torch.Tensor], scratch: Scratch
) -> None:
    _copy_duplicates(copies, destinations)
    for item in rearranged:
        rearrange(destinations[0], item, scratch)


_Region = tuple[int, int, int]  # (arena index, offset, length)


def _by_source(direct: list[_Direct], regions: Sequence[_Region]) -> tuple[list[list[int]], list[int]]:
    """For each direct range, the indices of the ``regions`` it writes whole; and the indices of the rest."""
    starts = sorted((d.arena_index, d.dst_offset, i) for i, d in enumerate(direct))
    keys = [(arena, offset) for arena, offset, _ in starts]
    on_landing: list[list[int]] = [[] for _ in direct]
    at_end: list[int] = []
    for index, (arena, offset, length) in enumerate(regions):
        k = bisect.bisect_right(keys, (arena, offset)) - 1
        source = direct[starts[k][2]] if k >= 0 else None
        if source is not None and source.arena_index == arena and offset + length <= source.dst_offset + source.length:
            on_landing[starts[k][2]].append(index)
        else:
            at_end.append(index)
    return on_landing, at_end


def _duplicates_by_source(
    direct: list[_Direct], duplicates: list[_Duplicate]
) -> tuple[list[list[_Duplicate]], list[_Duplicate]]:
    """For each direct range, the duplicates whose source it writes whole (copied once it lands); and the
    rest, whose source a staged run fills (copied after the stream)."""
    on_landing, at_end = _by_source(direct, [(d.src_arena, d.src_offset, d.length) for d in duplicates])
    return [[duplicates[i] for i in found] for found in on_landing], [duplicates[i] for i in at_end]


def _rearranged_by_source(
    direct: list[_Direct], rearranged: Sequence[Rearranged]
) -> tuple[list[list[Rearranged]], list[Rearranged]]:
    """For each direct range, the group arena's regions it writes whole (rearranged once it lands); and the
    rest, which a staged run fills (rearranged after the stream)."""
    on_landing, at_end = _by_source(direct, [(0, r.offset, r.length) for r in rearranged])
    return [[rearranged[i] for i in found] for found in on_landing], [rearranged[i] for i in at_end]


def _duplicates_filled(duplicates: list[_Duplicate], on_filled: FillCallback) -> None:
    for d in duplicates:
        on_filled(d.dst_arena, d.dst_offset, d.length)


@dataclass(frozen=True)
class _Range:
    file_index: int
    file_offset: int
    length: int
    address: int  # where the streamer writes it
    landed: Callable[[], None]


def _staged_range(
    item: _Staged,
    buffer: torch.Tensor,
    destinations: list[torch.Tensor],
    scatters: _Scatters,
    batch: int,
    on_progress: Callable[[int], None],
    on_filled: FillCallback,
) -> _Range:
    view = buffer[: item.length]

    def scattered() -> None:
        on_progress(item.fetched)
        for block in item.blocks:
            for t in block.targets:
                # A target's rows lie dst_row_stride apart; the plan makes that its width, or gives it one row.
                on_filled(t.arena_index, block.dst_offset(t), (block.rows - 1) * t.dst_row_stride + t.width)

    def landed() -> None:
        scatters.start(batch, functools.partial(_scatter_staged, view, item, destinations), scattered)
        scatters.finish_done()

    return _Range(item.file_index, item.file_offset, item.length, view.data_ptr(), landed)


# Scatter threads per load. The copies release the GIL. In-process TP=4 loads of a local 1 GB model on two
# cores (three alternations, medians of 5): 0.78-0.85 s with every scatter on the response thread, 0.75-0.79 s
# with the pool; four threads measured the same as two.
SCATTER_THREADS = 4


class _Scatters:
    """Staged blocks' scatters and the copies of replicated ranges, run on a pool's threads beside the one
    collecting the streamer's responses.

    Each block's completion (progress, filled regions) runs on the fetching thread, as ``fetch_into``
    promises: in ``finish_done`` or ``wait``.
    """

    # The batch of copies that no staging slot waits for (a replicated tensor's): only ``wait(None)`` does.
    UNBATCHED = sys.maxsize

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool
        self.pending: deque[tuple[int, Future[None], Callable[[], None]]] = deque()  # (batch, scatter, completion)

    def start(self, batch: int, scatter: Callable[[], None], completion: Callable[[], None]) -> None:
        self.pending.append((batch, self.pool.submit(scatter), completion))

    def finish_done(self) -> None:
        """Complete the oldest scatters that have finished, without waiting."""
        while self.pending and self.pending[0][1].done():
            self._complete(self.pending.popleft())

    def wait(self, batch: int | None) -> None:
        """Wait for the scatters of ``batch`` and the batches before it (None: all), and complete them."""
        later = deque(p for p in self.pending if batch is not None and p[0] > batch)
        for entry in [p for p in self.pending if batch is None or p[0] <= batch]:
            self._complete(entry)
        self.pending = later

    @staticmethod
    def _complete(entry: tuple[int, Future[None], Callable[[], None]]) -> None:
        _, scatter, completion = entry
        scatter.result()  # re-raises a failed copy here, on the fetching thread
        completion()


# libstreamer 0.17 failed a request of 30,000 ranges (9 KB tensors of a local file) with "File access error"
# and served 10,000; larger models' ranges go in several requests.
MAX_RANGES_PER_REQUEST = 8192
# Direct ranges go in flight in windows of this many bytes, two at a time, the next submitted as the oldest
# lands: a load that stops (the daemon shutting down, a failed range) must wait for every range in flight
# before its arenas may go, and with a whole model in flight a SIGTERM waited for the rest of a 1 GB download
# (3.5-4 s from a SeaweedFS that had been paused), past the daemon's shutdown grace.
DIRECT_WINDOW_BYTES = 128 << 20
DIRECT_WINDOWS_IN_FLIGHT = 2


class _RangeReader:
    """Submit ranges to libstreamer and run each one's callback when its response arrives.

    Destinations are raw addresses: nothing may free them while a range is in flight, so ``wait`` drains
    every outstanding response even when it fails.
    """

    def __init__(self, handle: object, paths: list[str]) -> None:
        self.handle = handle
        self.paths = paths
        self.callbacks: dict[int, list[list[Callable[[], None]]]] = {}  # submission -> file -> range
        self.remaining: dict[int, int] = {}  # submission -> ranges not yet landed
        self.fed: deque[list[_Range]] = deque()  # windows of ``feed``'s ranges not yet submitted
        self.fed_in_flight: deque[list[int]] = deque()  # the submissions of those in flight, oldest first

    def feed(self, ranges: list[_Range]) -> None:
        """Put ``ranges`` in flight a window at a time (DIRECT_WINDOW_BYTES), keeping DIRECT_WINDOWS_IN_FLIGHT
        windows in flight as responses arrive."""
        window: list[_Range] = []
        size = 0
        for r in ranges:
            if window and size + r.length > DIRECT_WINDOW_BYTES:
                self.fed.append(window)
                window, size = [], 0
            window.append(r)
            size += r.length
        if window:
            self.fed.append(window)
        self._top_up()

    def _top_up(self) -> None:
        while self.fed_in_flight and not any(self.remaining[s] for s in self.fed_in_flight[0]):
            self.fed_in_flight.popleft()
        while self.fed and len(self.fed_in_flight) < DIRECT_WINDOWS_IN_FLIGHT:
            self.fed_in_flight.append(self.submit(self.fed.popleft()))

    def submit(self, ranges: list[_Range]) -> list[int]:
        """Put ``ranges`` in flight; returns the submissions carrying them."""
        return [self._submit(ranges[start : start + MAX_RANGES_PER_REQUEST])
                for start in range(0, len(ranges), MAX_RANGES_PER_REQUEST)]

    def _submit(self, ranges: list[_Range]) -> int:
        by_file: dict[int, list[_Range]] = {}
        for r in ranges:
            by_file.setdefault(r.file_index, []).append(r)
        files = sorted(by_file)
        grouped = [r for f in files for r in by_file[f]]
        submission: int = runai_request(
            self.handle,
            [self.paths[f] for f in files],
            [len(by_file[f]) for f in files],
            [r.file_offset for r in grouped],
            [r.length for r in grouped],
            [r.address for r in grouped],
        )
        self.callbacks[submission] = [[r.landed for r in by_file[f]] for f in files]
        self.remaining[submission] = len(ranges)
        return submission

    def wait(self, submissions: list[int] | None = None) -> None:
        """Run each range's callback as it lands (whichever submission it belongs to) until ``submissions``
        have landed whole; None waits for every range, fed windows submitted meanwhile included."""
        awaited = self.remaining.keys() if submissions is None else submissions
        try:
            while any(self.remaining[s] for s in awaited):
                response = runai_response(self.handle)
                if response is None:
                    raise StreamingError("the streamer stopped before every range arrived")
                status, submission, file_index, range_index, _ = response
                self.remaining[submission] -= 1
                if status != SUCCESS_ERROR_CODE:
                    raise StreamingError(f"libstreamer could not read a range: {runai_response_str(status)}")
                self.callbacks[submission][file_index][range_index]()
                if self.fed and not self.remaining[submission]:
                    self._top_up()
        except BaseException:
            while any(self.remaining.values()) and (response := runai_response(self.handle)) is not None:
                self.remaining[response[1]] -= 1
            raise


def staging_buffer_bytes(slots: list[int]) -> int:
    """The buffer that holds ``slots`` from a block's start, wherever it lies."""
    return sum(slots) + DIRECT_IO_BLOCK if sum(slots) else 0


def _staging_slots(staged: list[_Staged], memory_limit: int) -> list[int]:
    """The staging buffer's slots (bytes each, all the same size, whole blocks): one when every staged read
    fits within ``memory_limit`` at once, else two, so that one batch streams while the other's blocks scatter.
    Each read may start up to a block in, where it agrees with its file offset (``_batches``)."""
    largest = max((s.length + DIRECT_IO_BLOCK for s in staged), default=0)
    padded = sum(s.length for s in staged) + DIRECT_IO_BLOCK * len(staged)
    half = memory_limit // 2 // DIRECT_IO_BLOCK * DIRECT_IO_BLOCK  # the second slot starts on a block too
    if padded <= memory_limit or half < largest:
        return [-(-max(largest, min(memory_limit, padded)) // DIRECT_IO_BLOCK) * DIRECT_IO_BLOCK]
    return [half, half]


class StagingBuffers:
    """Staging memory kept from one load for the next: a fresh buffer's pages are each faulted in and cleared
    (a lone rank of 1,173 small tensors from local files: 20 of its 125 ms went to its 64 MiB). One buffer is kept,
    up to ``keep_max`` bytes (what the default ``--memory-limit`` stages in): loads seldom overlap, and one that
    finds it taken allocates its own. The kept buffer's old bytes never reach an arena: a read fills every byte it
    scatters."""

    def __init__(self, *, keep_max: int) -> None:
        self.keep_max = keep_max
        self._lock = threading.Lock()
        self._kept: torch.Tensor | None = None

    def take(self, size: int) -> torch.Tensor:
        """A buffer of at least ``size`` bytes, this caller's until ``give_back``."""
        if size == 0:  # a load that stages nothing leaves the kept buffer to one that does
            return torch.empty(0, dtype=torch.uint8)
        with self._lock:
            kept = self._kept
            if kept is not None and kept.numel() >= size:
                self._kept = None
                return kept
        return torch.empty(size, dtype=torch.uint8)

    def give_back(self, buffer: torch.Tensor) -> None:
        """Keep ``buffer`` for the next load if it is the largest one within ``keep_max``."""
        if not 0 < buffer.numel() <= self.keep_max:
            return
        with self._lock:
            if self._kept is None or self._kept.numel() < buffer.numel():
                self._kept = buffer


# A default limit's slots, and the block that their start is aligned to within the buffer.
STAGING_BUFFERS = StagingBuffers(keep_max=DEFAULT_STAGING_BYTES + DIRECT_IO_BLOCK)


def _batches(
    staged: list[_Staged], capacity: int, direct_io_files: set[int]
) -> list[list[tuple[int, _Staged]]]:
    """Pack staged reads into batches that fit a staging slot: (offset in the slot, read). A read of a file
    read with O_DIRECT starts where its offset agrees with its file offset modulo DIRECT_IO_BLOCK (slots start
    on blocks), as such a read needs; any other starts aligned (the scatter copies in 8-byte words) where it
    disagrees modulo SMALLEST_DIRECT_IO_BLOCK: a batch whose reads all agreed would be read directly,
    from the disk, past the copy the page cache holds."""
    batches: list[list[tuple[int, _Staged]]] = []
    cursor = capacity
    for item in staged:
        start = _staged_start(cursor, item, item.file_index in direct_io_files)
        if start + item.length > capacity:
            batches.append([])
            start = _staged_start(0, item, item.file_index in direct_io_files)
        batches[-1].append((start, item))
        cursor = start + item.length
    return batches


def _staged_start(cursor: int, item: _Staged, direct_io: bool) -> int:
    if direct_io:
        return cursor + (item.file_offset - cursor) % DIRECT_IO_BLOCK
    start = align(cursor)
    return start + ALIGNMENT if (start - item.file_offset) % SMALLEST_DIRECT_IO_BLOCK == 0 else start


# The copies below go through numpy, which copies on the calling thread. torch's copy_ uses its intra-op thread
# pool, whose OpenMP workers spin between copies: in a TP=4 load on two cores they took the streamer's CPU, and
# scattering 340 MB of row slices took 1.0-1.3 s where one thread takes 0.3-0.5 s.


def _copy_duplicates(duplicates: list[_Duplicate], destinations: list[torch.Tensor]) -> None:
    for d in duplicates:
        numpy.copyto(
            destinations[d.dst_arena][d.dst_offset : d.dst_offset + d.length].numpy(),
            destinations[d.src_arena][d.src_offset : d.src_offset + d.length].numpy(),
        )


# Strided copies run several times faster in 8-byte words than in bytes.
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


class Scratch(threading.local):
    """A load's buffers for rearranging, one per thread, kept for its next region (fresh pages cost to fault
    in) and freed with the load."""

    buffer: torch.Tensor | None = None

    def at_least(self, size: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < size:
            self.buffer = torch.empty(size, dtype=torch.uint8)
        return self.buffer


def rearrange(arena: torch.Tensor, item: Rearranged, scratch: Scratch) -> None:
    """Make ``item``'s rows, landed in ``arena`` as the file holds them, slice after slice: copied out to this
    thread's scratch buffer, then each slice's column of rows copied back (in words, where they allow)."""
    if item.length == 0:
        return
    region = arena[item.offset : item.offset + item.length]
    rows = scratch.at_least(item.length)[: item.length]
    ctypes.memmove(rows.data_ptr(), region.data_ptr(), item.length)
    word = next(w for w in _WORDS if item.piece % w == 0 and item.offset % w == 0 and region.data_ptr() % w == 0)
    width = item.piece // word
    source = rows.view(_WORDS[word]).view(item.rows, item.parts, width).numpy()
    numpy.copyto(region.view(_WORDS[word]).view(item.parts, item.rows, width).numpy(), source.transpose(1, 0, 2))


def _scatter_staged(data: torch.Tensor, item: _Staged, destinations: list[torch.Tensor]) -> None:
    """Copy each block of ``item``, read into the start of ``data``, to its targets."""
    for block in item.blocks:
        _scatter_block(data[block.file_offset - item.file_offset :], block, destinations)


def _scatter_block(data: torch.Tensor, block: Block, destinations: list[torch.Tensor]) -> None:
    """Copy each target's columns of the ``block.rows`` x ``block.width`` bytes at the start of ``data``."""
    raw = data[: block.length]
    if block.rows == 1:  # each target one contiguous piece: a plain copy, without numpy's views per target
        source = raw.data_ptr()
        for t in block.targets:
            dst = destinations[t.arena_index]
            dst_offset = block.dst_offset(t)
            if t.column + t.width > block.width or dst_offset + t.width > dst.numel():
                raise ValueError(f"a staged piece of {t.width} bytes lies outside its block or arena")
            ctypes.memmove(dst.data_ptr() + dst_offset, source + t.column, t.width)
        return
    for t in block.targets:
        dst = destinations[t.arena_index]
        dst_offset = block.dst_offset(t)
        geometry = (block.width, t.column, t.width, t.dst_row_stride, dst_offset, raw.data_ptr(), dst.data_ptr())
        word = next(w for w in _WORDS if all(v % w == 0 for v in geometry))
        rows = raw.view(_WORDS[word]).view(block.rows, block.width // word)
        target = dst.view(_WORDS[word]).as_strided(
            (block.rows, t.width // word), (t.dst_row_stride // word, 1), dst_offset // word
        )
        numpy.copyto(target.numpy(), rows[:, t.column // word : (t.column + t.width) // word].numpy())


def explain(store: ObjectStore, files: Sequence[str], error: StreamingError) -> WeightdError:
    """The streamer reports every storage failure as "File access error": ask storage what is wrong."""
    for name in files:
        try:
            store.stat(name)
        except WeightdError as cause:
            return cause
    return StorageUnavailableError(
        f"{store.location.uri}: streaming failed although every object is readable ({error}); "
        "this is usually transient: retry, or lower --concurrency"
    )


