"""From validated headers and a sharding to (a) each rank's arena layout and (b) the byte ranges to fetch.

Every tensor is seen as a byte matrix: ``outer`` rows of ``row_bytes`` (outer = product of the dimensions
before the split dim). Rank r owns columns [r*piece, (r+1)*piece) of every row, piece = the split's ``part``
entries of the split dim; a replicated tensor is one row that every rank owns whole. Rank r's slice is then
exactly ``full.narrow(d, r*part, part)`` of the tensor zero-padded to N*part along d (no padding when N divides
the dim), stored contiguously in its arena. Columns past the end of a row are never fetched: they stay zero.
Every rank's slice of a tensor has the same size, so one placement serves all ranks; the parts of a fusion
(weightd.daemon.placement) are placed back to back and served as one tensor.

All ranks of a group loaded together into host memory may share one arena (a group arena). It holds the
tensors whose slices tile them (no padding) once, as the file holds them, and is read straight in as a full
load reads a file, in long runs, instead of each slice going to one of N arenas (through the staging buffer,
when slices are small, so that each byte was written twice, and runs broke into many requests). A tensor
every rank holds whole, or split on dim 0, is served in place: rank r's slice is the r-th part. One split on a
later dim lands as its rows and is then rearranged in place, its slices one after the other (``Rearranged``),
if it is at most ``max_range_bytes`` (a larger one is few requests anyway); it and the rest (padded splits,
fusions) otherwise lie in a section per rank.

What is fetched:
- a tensor split on dim 0 (or replicated) is a single row, so any rank's share is one contiguous range;
- a tensor split on a later dim, for all ranks, is read whole (each byte once) and scattered;
- for one rank alone, each row's slice is a separate range when it is at least ``row_range_min_bytes``
  (large enough that a ranged GET runs near full throughput); below that the whole tensor is read and sliced
  in memory, because thousands of tiny GETs cost more than the extra bytes.
A read of whole rows larger than ``max_range_bytes`` is split into several blocks, which bounds the staging
buffer that scattered blocks pass through. (The streamer reads a run of ranges that lie back to back both in
the file and in memory as one request, so small tensors need no coalescing here: slots follow file order, and
one whose size is a multiple of ALIGNMENT ends where the next begins. After a tensor of another size the next
slot starts aligned, so the streaming reads runs of such small tensors through its staging buffer.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from weightd.daemon.placement import Fusion, fused_name
from weightd.daemon.safetensors_header import SafetensorsHeader, TensorEntry
from weightd.daemon.sharding import ShardRule, Split, split_for

# Tensor start alignment inside an arena (covers every dtype and CUDA's 256-byte allocation granularity).
ALIGNMENT = 256
# The streamer reads a local file with O_DIRECT only when every destination of the file agrees with its file
# offset modulo the mount's direct-I/O block (512 or 4096 bytes on the disks measured; agreeing modulo 4096
# implies it modulo every smaller power of two). A file read so (FilePlan.direct_io) has its tensors that lie
# whole placed to agree with it, and what cannot (a slice, a fused part) is read through the staging buffer,
# placed there to agree too.
DIRECT_IO_BLOCK = 4096
# The smallest direct-I/O block a mount reports (a 512-byte sector): a read that disagrees with its file modulo
# this is never read with O_DIRECT.
SMALLEST_DIRECT_IO_BLOCK = 512
# A lone rank's slice of a file read with O_DIRECT is placed to agree with it (up to a block of padding before
# it) from this size; a smaller one is read through the staging buffer (a copy, no padding).
AGREEING_SLICE_MIN_BYTES = 64 << 10
ROW_RANGE_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class Slot:
    """Where one tensor (or one rank's slice of it) lives in the arena its rank is served from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class RankLayout:
    rank: int
    slots: tuple[Slot, ...]
    size: int  # of the arena the slots lie in: the rank's own, or the group's that every rank shares
    # (tensor name, split dim or None for replicated), in slot order; empty when tp_size is 1.
    shards: tuple[tuple[str, int | None], ...]
    # (offset, length) of the zeros that pad split dimensions: no block fills them, a fresh arena holds them.
    padding: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Target:
    """Copy ``width`` bytes per row from column ``column`` of a block into arena ``arena_index`` of the plan
    (a rank's, or the group's), the first row at ``dst_from_base`` bytes past the block's ``dst_base``."""

    arena_index: int
    column: int
    width: int
    dst_from_base: int
    dst_row_stride: int


@dataclass(frozen=True)
class Block:
    """``rows`` x ``width`` bytes, contiguous in the file from ``file_offset``, and where they go.

    A tensor's slices lie at one offset in every rank's arena, so the plan's blocks give it as ``dst_base`` and
    their targets only what differs by rank: blocks of tensors of one shape share their targets (a large MoE's
    thousands of experts, at TP=8 eight targets each).
    """

    file_offset: int
    rows: int
    width: int
    dst_base: int
    targets: tuple[Target, ...]

    @property
    def length(self) -> int:
        return self.rows * self.width

    def dst_offset(self, target: Target) -> int:
        """Where ``target``'s first row goes in its arena."""
        return self.dst_base + target.dst_from_base


@dataclass(frozen=True)
class Rearranged:
    """``rows`` rows of ``parts`` slices of ``piece`` bytes each, at ``offset`` of a group arena as the file holds
    them, to be made slice after slice (slice i's rows at ``offset + i * rows * piece``) once they have landed."""

    offset: int
    rows: int
    parts: int
    piece: int

    @property
    def length(self) -> int:
        return self.rows * self.parts * self.piece


@dataclass(frozen=True)
class FilePlan:
    file: str
    blocks: tuple[Block, ...]
    # Read with O_DIRECT: every read of it lands where it agrees with the file modulo DIRECT_IO_BLOCK.
    direct_io: bool = False


@dataclass(frozen=True)
class LoadPlan:
    tp_size: int
    layouts: tuple[RankLayout, ...]
    files: tuple[FilePlan, ...]
    # Fetched bytes attributed to each layout; they add up to the total fetched.
    fetched_bytes_by_layout: tuple[int, ...]
    # The longest block: what a read passing through the staging buffer may span.
    max_range_bytes: int
    # Every layout lies in one arena, the group's (see build_plan's ``group_arena``); else one arena each.
    grouped: bool = False
    # Regions of the group arena to rearrange into their slices once their bytes have landed.
    rearranged: tuple[Rearranged, ...] = ()

    @property
    def fetched_bytes(self) -> int:
        return sum(self.fetched_bytes_by_layout)

    @property
    def arena_sizes(self) -> tuple[int, ...]:
        """The arenas the plan fills, by the index its targets name."""
        return (self.layouts[0].size,) if self.grouped else tuple(layout.size for layout in self.layouts)

    def arena_of(self, layout_index: int) -> int:
        return 0 if self.grouped else layout_index

    def held_bytes_by_layout(self) -> tuple[int, ...]:
        """What each layout's entry holds of the arenas: its own, or an even share of the group's (the remainder
        to the first), so that the shares add up to the arenas."""
        if not self.grouped:
            return self.arena_sizes
        return even_shares(self.arena_sizes[0], len(self.layouts))


def even_shares(total: int, parts: int) -> tuple[int, ...]:
    """``total`` split into ``parts`` integers, the remainder to the first."""
    share = total // parts
    return (total - share * (parts - 1), *(share,) * (parts - 1))


def align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def own_arena_layout(layout: RankLayout) -> RankLayout:
    """``layout``'s tensors as an arena of the rank's own holds them (a GPU's: each slot aligned, back to back in
    order), wherever ``layout`` puts them (a group arena). A layout of an arena of its own comes back the same,
    but for its padding list."""
    slots = []
    cursor = 0
    for slot in layout.slots:
        start = align(cursor)
        cursor = start + slot.nbytes
        slots.append(Slot(slot.name, slot.dtype, slot.shape, start, slot.nbytes))
    return RankLayout(layout.rank, tuple(slots), align(cursor), layout.shards)


def build_plan(
    headers: Sequence[SafetensorsHeader],
    *,
    tp_size: int,
    ranks: Sequence[int],
    rules: Sequence[ShardRule],
    max_range_bytes: int,
    row_range_min_bytes: int = ROW_RANGE_MIN_BYTES,
    fusions: Sequence[Fusion] = (),
    group_arena: bool = False,
    direct_io_files: frozenset[str] = frozenset(),
) -> LoadPlan:
    """Plan loading ``ranks`` of ``tp_size``: an arena each, or with ``group_arena`` (every rank, in order) one
    arena for the group, which the ranks share (see ``_place``). ``direct_io_files`` (arenas in host memory only,
    local files) are read with O_DIRECT where their tensors' offsets allow host views (``FilePlan.direct_io``,
    ``_place``)."""
    if group_arena and (tp_size == 1 or list(ranks) != list(range(tp_size))):
        raise ValueError("a group arena holds every rank of a tensor-parallel group, in rank order")
    tensors = [tensor for header in headers for tensor in header.tensors]
    splits = {t.name: split_for(t.name, t.shape, rules, tp_size=tp_size) for t in tensors}
    placement = _place(headers, splits, fusions, tp_size=tp_size, ranks=tuple(ranks),
                       group_arena_rearranged_max=max_range_bytes if group_arena else None,
                       direct_io_files=direct_io_files)
    builder = _PlanBuilder(tp_size, tuple(ranks), max_range_bytes, row_range_min_bytes, placement)
    files = [
        FilePlan(file=h.file, blocks=tuple(b for t in h.tensors for b in builder.add_tensor(t, splits[t.name])),
                 direct_io=h.file in placement.direct_io_files)
        for h in headers
    ]
    return builder.finish(tuple(files))


@dataclass(frozen=True)
class _Placement:
    """Where each tensor's bytes start in the arenas (all ranks' slices have one size), and what each loaded
    rank is served: each tensor, or in its place the fused tensor it is part of.

    Without a group arena every rank has an arena of its own and each tensor's slice lies at one offset in all
    of them (``offsets``). A group arena begins with a shared section, where a tensor in ``shared`` lies whole
    from its offset, as in the file, each rank's slice inside it; then one section per rank,
    ``rank_stride`` bytes apart, for the rest, whose offset is that of the first rank's slice.
    """

    offsets: dict[str, int]
    served: tuple[tuple[Slot, ...], ...]  # per loaded rank
    shards: tuple[tuple[str, int | None], ...]
    size: int
    grouped: bool = False
    shared: frozenset[str] = frozenset()
    rank_stride: int = 0
    direct_io_files: frozenset[str] = frozenset()


def _slot_shape(tensor: TensorEntry, split: Split | None) -> tuple[int, ...]:
    shape = list(tensor.shape)
    if split is not None:
        shape[split.dim] = split.part
    return tuple(shape)


def _lies_whole(tensor: TensorEntry, split: Split | None, rearranged_max: int) -> bool:
    """Whether a group arena holds ``tensor`` once, as the file does, every rank's slice inside it: a tensor every
    rank holds whole, or one whose slices tile it (no padding), on dim 0 or, up to ``rearranged_max`` bytes (one
    block), on a later dim."""
    if split is None:
        return True
    tiled = split.part * split.parts == tensor.shape[split.dim]
    return tiled and (split.dim == 0 or tensor.nbytes <= rearranged_max)


def _place(
    headers: Sequence[SafetensorsHeader], splits: dict[str, Split | None], fusions: Sequence[Fusion], *,
    tp_size: int, ranks: tuple[int, ...], group_arena_rearranged_max: int | None, direct_io_files: frozenset[str],
) -> _Placement:
    """Lay the arenas out in file order, so that tensors back to back in a file are back to back in memory.

    In a group arena the tensors that lie whole (``_lies_whole``) go to the shared section, as the file holds
    them: the streamer writes them straight in, a run of them one request, where in ranks' own arenas their
    slices go to N places (read through the staging buffer when small). A replicated tensor is held once, not
    once per rank. A group arena is host memory only, so its shared section's slots are aligned to their
    elements, not to ALIGNMENT.

    Each of ``direct_io_files`` whose every tensor's offset is a multiple of its element size (as host views
    need) is read with O_DIRECT, as the streamer reads a local file alone, instead of through the page
    cache (a second copy of the model in memory, and one more copy of each byte): its tensors that lie whole (at
    tp_size 1 unfused, or in a group arena's shared section) are placed where their offsets agree with the
    file's modulo DIRECT_IO_BLOCK, back to back as in the file, aligned to their elements only; so is a lone
    rank's slice of a tensor split on dim 0 (``_lone_slice_start``).
    """
    tensors = [tensor for header in headers for tensor in header.tensors]
    shapes: dict[str, tuple[int, ...]] = {}
    nbytes: dict[str, int] = {}
    for t in tensors:
        split = splits[t.name]
        if split is None:  # most tensors, and every one at tp_size 1: whole
            shapes[t.name], nbytes[t.name] = t.shape, t.nbytes
        else:
            shapes[t.name] = _slot_shape(t, split)
            nbytes[t.name] = math.prod(shapes[t.name]) * t.nbytes // max(math.prod(t.shape), 1)
    dims = {name: None if split is None else split.dim for name, split in splits.items()}
    groups: dict[str, list[TensorEntry | None]] = {}
    for tensor in tensors if fusions else ():
        found = fused_name(tensor.name, fusions)
        if found is not None:
            name, index, count = found
            groups.setdefault(name, [None] * count)[index] = tensor

    def fusable(parts: list[TensorEntry | None]) -> bool:
        if any(p is None for p in parts):
            return False
        first = parts[0]
        assert first is not None
        return all(
            p is not None and p.dtype == first.dtype and len(p.shape) == len(first.shape) >= 1
            and shapes[p.name][1:] == shapes[first.name][1:] and dims[p.name] == dims[first.name] in (None, 0)
            for p in parts
        )

    fused = {name: [p for p in parts if p is not None] for name, parts in groups.items() if fusable(parts)}
    group_of = {p.name: name for name, parts in fused.items() for p in parts}
    shared: frozenset[str] = frozenset()
    if group_arena_rearranged_max is not None:
        shared = frozenset(t.name for t in tensors
                           if t.name not in group_of and _lies_whole(t, splits[t.name], group_arena_rearranged_max))
    direct_io_files = frozenset(h.file for h in headers if h.file in direct_io_files
                                and all(t.begin % t.itemsize == 0 for t in h.tensors))

    def as_in_file(t: TensorEntry) -> bool:
        if group_arena_rearranged_max is not None:
            return t.name in shared
        return splits[t.name] is None and t.name not in group_of

    # The file offset each slot is placed to agree with.
    agree_with: dict[str, int] = {}
    lone_rank = ranks[0] if group_arena_rearranged_max is None and len(ranks) == 1 else None
    for h in headers:
        for t in h.tensors if h.file in direct_io_files else ():
            if as_in_file(t):
                agree_with[t.name] = t.begin
            elif lone_rank is not None and t.name not in group_of:
                start = _lone_slice_start(t, splits[t.name], lone_rank, tp_size)
                if start is not None:
                    agree_with[t.name] = start
    offsets: dict[str, int] = {}
    served: list[Slot] = []
    shards: list[tuple[str, int | None]] = []
    cursor = 0  # of the rank sections (the whole arena, without a group arena)
    shared_cursor = 0
    # Runs once per tensor of the model (100k for a large MoE): the unfused case stays a few steps.
    for tensor in tensors:
        name = tensor.name
        group = group_of.get(name) if group_of else None
        if group is None:
            if shared and name in shared:
                # Packed as in the file, where tensors lie back to back: aligned to their elements only (a host
                # arena's views need no more), so that a run of them stays one range whatever their sizes.
                if name in agree_with:
                    start = shared_cursor + (agree_with[name] - shared_cursor) % DIRECT_IO_BLOCK
                else:
                    start = -(-shared_cursor // tensor.itemsize) * tensor.itemsize
                offsets[name] = start
                shared_cursor = start + tensor.nbytes
            else:
                if name in agree_with:
                    start = cursor + (agree_with[name] - cursor) % DIRECT_IO_BLOCK
                else:
                    start = align(cursor)
                offsets[name] = start
                cursor = start + nbytes[name]
            served.append(Slot(name, tensor.dtype, shapes[name], start, nbytes[name]))
            if tp_size > 1:
                shards.append((name, dims[name]))
            continue
        if name in offsets:
            continue
        members = fused[group]
        start = cursor = align(cursor)
        for member in members:  # back to back: the fused tensor is their concatenation
            offsets[member.name] = cursor
            cursor += nbytes[member.name]
        shape = (sum(shapes[m.name][0] for m in members), *shapes[name][1:])
        served.append(Slot(group, tensor.dtype, shape, start, cursor - start))
        if tp_size > 1:
            shards.append((group, dims[name]))
    if group_arena_rearranged_max is None:
        return _Placement(offsets, (tuple(served),) * len(ranks), tuple(shards), align(cursor),
                          direct_io_files=direct_io_files)
    base, stride = align(shared_cursor), align(cursor)
    for name in offsets.keys() - shared:
        offsets[name] += base

    def parts_of(slot: Slot) -> int:
        """Where the slot's rank r lies, from where rank 0's does: a section apart (-1), its slice of ``parts``
        in place (Split.index), or in the same bytes (0: held whole)."""
        split = splits.get(slot.name)
        return -1 if slot.name not in shared else 0 if split is None else split.parts

    parts = [parts_of(slot) for slot in served]
    return _Placement(offsets, tuple(_group_slots(served, parts, tp_size, r, base + r * stride) for r in ranks),
                      tuple(shards), base + tp_size * stride, True, shared, stride, direct_io_files)


def _lone_slice_start(tensor: TensorEntry, split: Split | None, rank: int, tp_size: int) -> int | None:
    """Where in the file ``rank``'s slice of ``tensor`` starts, if it is one piece of a single row (a split on
    dim 0, read as one range however long) of at least AGREEING_SLICE_MIN_BYTES; else None."""
    if split is None or math.prod(tensor.shape[: split.dim]) != 1 or not tensor.shape[split.dim]:
        return None
    piece = tensor.nbytes // tensor.shape[split.dim] * split.part
    window = split.index(rank, tp_size) * piece
    if window >= tensor.nbytes or piece < AGREEING_SLICE_MIN_BYTES:
        return None
    return tensor.begin + window


def _group_slots(
    slots: Sequence[Slot], parts: Sequence[int], tp_size: int, rank: int, section: int
) -> tuple[Slot, ...]:
    """``rank``'s slots in a group arena, from ``slots`` placed as the shared section and one rank section (at 0)
    hold them; ``section`` is where ``rank``'s section starts."""
    placed = []
    for slot, slot_parts in zip(slots, parts, strict=True):
        shift = section if slot_parts < 0 else rank * slot_parts // tp_size * slot.nbytes  # Split.index
        placed.append(Slot(slot.name, slot.dtype, slot.shape, slot.offset + shift, slot.nbytes) if shift else slot)
    return tuple(placed)


# A block's targets and the fetched bytes each layout is credited with: (layout index, bytes).
_Pattern = tuple[tuple[Target, ...], tuple[tuple[int, int], ...]]


class _PlanBuilder:
    def __init__(
        self, tp_size: int, ranks: tuple[int, ...], max_range: int, row_range_min: int, placement: _Placement
    ) -> None:
        self.tp_size = tp_size
        self.ranks = ranks
        self.max_range = max(1, max_range)
        self.row_range_min = row_range_min
        self.placement = placement
        self.padding: list[list[tuple[int, int]]] = [[] for _ in ranks]
        self.rearranged: list[Rearranged] = []
        self.fetched = [0] * len(ranks)
        self._window_sets: dict[tuple[int, int], tuple[list[int], int, int, list[tuple[int, int]]]] = {}
        self._whole_windows = [0] * len(ranks)
        # Blocks of one shape have one pattern: computed once, it makes a tensor's blocks a lookup each.
        self._patterns: dict[tuple[int, int, int, int, int, bool], _Pattern] = {}

    def add_tensor(self, tensor: TensorEntry, split: Split | None) -> list[Block]:
        """Add ``tensor``'s padding to every rank's layout; return the blocks that fetch its slices."""
        whole = tensor.name in self.placement.shared
        if split is None:
            return self._whole(tensor, shared=whole)
        shape = tensor.shape
        outer = math.prod(shape[: split.dim])
        row_bytes = tensor.nbytes // max(outer, 1)
        piece = row_bytes // shape[split.dim] * split.part if shape[split.dim] else 0
        offset = self.placement.offsets[tensor.name]
        stride = self.placement.rank_stride
        windows, first, last, spans = self._windows(split, piece)
        if last + piece > row_bytes:
            for i, window in enumerate(windows):
                if window + piece > row_bytes:
                    start = max(window, row_bytes) - window
                    self.padding[i].extend((offset + i * stride + row * piece + start, piece - start)
                                           for row in range(outer))

        def block_at(row: int, rows: int, column: int, width: int) -> Block:
            pattern = self._pattern(split.parts, windows, piece, column, width, rows, shared=whole)
            return self._block(tensor.begin + row * row_bytes + column, rows, width, offset + row * piece, pattern)

        # Padding (columns past row_bytes) is never fetched: a rank holding only padding reads nothing.
        lo, hi = first, min(last + piece, row_bytes)
        if lo >= hi:
            return []
        if whole and outer > 1:  # lands as its rows, one block (see _lies_whole), then made slice after slice
            self.rearranged.append(Rearranged(offset, outer, split.parts, piece))
            return [block_at(0, outer, 0, row_bytes)]
        if outer == 1:  # each run of loaded slices that touch (all of them, unless a rank between is loaded already)
            blocks = []
            for start, end in spans:
                stop = min(end, row_bytes)
                blocks += [block_at(0, 1, c, min(self.max_range, stop - c)) for c in range(start, stop, self.max_range)]
            return blocks
        if len(windows) == 1 and piece >= self.row_range_min:
            return [block_at(row, 1, lo, hi - lo) for row in range(outer)]
        rows_per_range = max(1, self.max_range // row_bytes)
        return [
            block_at(row, min(rows_per_range, outer - row), 0, row_bytes)
            for row in range(0, outer, rows_per_range)
        ]

    def _whole(self, tensor: TensorEntry, *, shared: bool) -> list[Block]:
        """The blocks of a tensor every rank holds whole: one row of one window (``add_tensor``'s general case,
        without its per-rank arithmetic)."""
        offset, size = self.placement.offsets[tensor.name], tensor.nbytes
        blocks = []
        for column in range(0, size, self.max_range):
            width = min(self.max_range, size - column)
            pattern = self._pattern(0, self._whole_windows, size, column, width, 1, shared=shared)  # 0 parts: whole
            blocks.append(self._block(tensor.begin + column, 1, width, offset, pattern))
        return blocks

    def _block(self, file_offset: int, rows: int, width: int, dst_base: int, pattern: _Pattern) -> Block:
        targets, credits = pattern
        fetched = self.fetched
        for layout_index, credit in credits:
            fetched[layout_index] += credit
        return Block(file_offset, rows, width, dst_base, targets)

    def _pattern(
        self, parts: int, windows: Sequence[int], piece: int, column: int, width: int, rows: int, *, shared: bool
    ) -> _Pattern:
        """The targets of a block of ``rows`` x [column, column + width) of rows split into ``parts`` slices,
        of which rank i holds [windows[i], windows[i] + piece), and how its fetched bytes are split between
        them: by what each received, the remainder to the first. A ``shared`` block (of a tensor that lies whole
        in the group arena) has one target, the block itself. Computed once per shape."""
        key = (parts, piece, column, width, rows, shared)
        found = self._patterns.get(key)
        if found is not None:
            return found
        received: list[tuple[int, int, int]] = []  # (layout index, lo, hi)
        for i, window in enumerate(windows):
            lo, hi = max(column, window), min(column + width, window + piece)
            if lo < hi:
                received.append((i, lo, hi))
        if shared:
            targets = [Target(0, 0, width, column, width)]
        else:
            grouped, stride = self.placement.grouped, self.placement.rank_stride
            targets = [Target(0 if grouped else i, lo - column, hi - lo, lo - windows[i] + i * stride, piece)
                       for i, lo, hi in received]
        length = rows * width
        total = sum(hi - lo for _, lo, hi in received)
        shares = [length * (hi - lo) // total for _, lo, hi in received]
        shares[0] += length - sum(shares)
        found = self._patterns[key] = (
            tuple(targets), tuple((i, share) for (i, _, _), share in zip(received, shares, strict=True))
        )
        return found

    def _windows(self, split: Split, piece: int) -> tuple[list[int], int, int, list[tuple[int, int]]]:
        """Where each loaded rank's slice starts in a row split into ``split.parts`` pieces of ``piece`` bytes,
        the first and last of those starts, and the runs of slices that touch, as [start, end) (once per split
        and piece size: a model has few)."""
        key = (split.parts, piece)
        found = self._window_sets.get(key)
        if found is None:
            windows = [split.index(rank, self.tp_size) * piece for rank in self.ranks]
            spans: list[tuple[int, int]] = []
            for window in sorted(set(windows)):
                if spans and spans[-1][1] == window:
                    spans[-1] = (spans[-1][0], window + piece)
                else:
                    spans.append((window, window + piece))
            found = self._window_sets[key] = (windows, min(windows), max(windows), spans)
        return found

    def finish(self, files: tuple[FilePlan, ...]) -> LoadPlan:
        placement = self.placement
        layouts = tuple(
            RankLayout(rank=rank, slots=placement.served[i], size=placement.size, shards=placement.shards,
                       padding=tuple(self.padding[i]))
            for i, rank in enumerate(self.ranks)
        )
        return LoadPlan(tp_size=self.tp_size, layouts=layouts, files=files,
                        fetched_bytes_by_layout=tuple(self.fetched), max_range_bytes=self.max_range,
                        grouped=placement.grouped, rearranged=tuple(self.rearranged))
