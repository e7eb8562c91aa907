"""From validated headers and a sharding to (a) each rank's arena layout and (b) the byte ranges to fetch.

Every tensor is seen as a byte matrix: ``outer`` rows of ``row_bytes`` (outer = product of the dimensions
before the split dim). Rank r owns columns [r*piece, (r+1)*piece) of every row, piece = the split's ``part``
entries of the split dim; a replicated tensor is one row that every rank owns whole. Rank r's slice is then
exactly ``full.narrow(d, r*part, part)`` of the tensor zero-padded to N*part along d (no padding when N divides
the dim), stored contiguously in its arena. Columns past the end of a row are never fetched: they stay zero.

What is fetched:
- a tensor split on dim 0 (or replicated) is a single row, so any rank's share is one contiguous range;
- a tensor split on a later dim, for all ranks, is read whole (each byte once) and scattered;
- for one rank alone, each row's slice is a separate range when it is at least ``row_range_min_bytes``
  (large enough that a ranged GET runs near full throughput); below that the whole tensor is read and sliced
  in memory, because thousands of tiny GETs cost more than the extra bytes.
A read of whole rows larger than ``max_range_bytes`` is split into several blocks, which bounds the staging
buffer that scattered blocks pass through. (The streamer itself reads runs of back-to-back ranges as one
stream, so small tensors need no coalescing here.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from weightd.daemon.safetensors_header import SafetensorsHeader, TensorEntry
from weightd.daemon.sharding import ShardRule, Split, split_for

# Tensor start alignment inside an arena (covers every dtype and CUDA's 256-byte allocation granularity).
ALIGNMENT = 256
ROW_RANGE_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class Slot:
    """Where one tensor (or one rank's slice of it) lives in a rank's arena."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class RankLayout:
    rank: int
    slots: tuple[Slot, ...]
    size: int
    # (tensor name, split dim or None for replicated), in slot order; empty when tp_size is 1.
    shards: tuple[tuple[str, int | None], ...]
    # (offset, length) of the zeros that pad split dimensions: no block fills them, a fresh arena holds them.
    padding: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Target:
    """Copy ``width`` bytes per row from column ``column`` of a block into a rank's arena."""

    layout_index: int
    column: int
    width: int
    dst_offset: int
    dst_row_stride: int


@dataclass(frozen=True)
class Block:
    """``rows`` x ``width`` bytes, contiguous in the file from ``file_offset``, and where they go."""

    file_offset: int
    rows: int
    width: int
    targets: tuple[Target, ...]

    @property
    def length(self) -> int:
        return self.rows * self.width


@dataclass(frozen=True)
class FilePlan:
    file: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class LoadPlan:
    tp_size: int
    layouts: tuple[RankLayout, ...]
    files: tuple[FilePlan, ...]
    # Fetched bytes attributed to each layout; they add up to the total fetched.
    fetched_bytes_by_layout: tuple[int, ...]

    @property
    def fetched_bytes(self) -> int:
        return sum(self.fetched_bytes_by_layout)


def align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def build_plan(
    headers: Sequence[SafetensorsHeader],
    *,
    tp_size: int,
    ranks: Sequence[int],
    rules: Sequence[ShardRule],
    max_range_bytes: int,
    row_range_min_bytes: int = ROW_RANGE_MIN_BYTES,
) -> LoadPlan:
    builder = _PlanBuilder(tp_size, tuple(ranks), max_range_bytes, row_range_min_bytes)
    files = []
    for header in headers:
        blocks: list[Block] = []
        for tensor in header.tensors:
            split = split_for(tensor.name, tensor.shape, rules, tp_size=tp_size)
            blocks.extend(builder.add_tensor(tensor, split))
        files.append(FilePlan(file=header.file, blocks=tuple(blocks)))
    return builder.finish(tuple(files))


class _PlanBuilder:
    def __init__(self, tp_size: int, ranks: tuple[int, ...], max_range: int, row_range_min: int) -> None:
        self.tp_size = tp_size
        self.ranks = ranks
        self.max_range = max(1, max_range)
        self.row_range_min = row_range_min
        self.cursors = [0] * len(ranks)
        self.slots: list[list[Slot]] = [[] for _ in ranks]
        self.shards: list[tuple[str, int | None]] = []
        self.padding: list[list[tuple[int, int]]] = [[] for _ in ranks]
        self.fetched = [0] * len(ranks)

    def add_tensor(self, tensor: TensorEntry, split: Split | None) -> list[Block]:
        """Place ``tensor`` in every rank's layout; return the blocks to fetch for it."""
        shape = list(tensor.shape)
        outer = 1 if split is None else math.prod(tensor.shape[: split.dim])
        row_bytes = tensor.nbytes // max(outer, 1)
        if split is None:
            piece = row_bytes
            if self.tp_size > 1:
                self.shards.append((tensor.name, None))
        else:
            piece = row_bytes // shape[split.dim] * split.part if shape[split.dim] else 0
            shape[split.dim] = split.part
            self.shards.append((tensor.name, split.dim))
        slots = []
        for i, rank in enumerate(self.ranks):
            offset = align(self.cursors[i])
            slot = Slot(tensor.name, tensor.dtype, tuple(shape), offset, piece * outer)
            self.slots[i].append(slot)
            self.cursors[i] = offset + slot.nbytes
            window = 0 if split is None else rank * piece
            slots.append((i, slot, window))
            if window + piece > row_bytes:
                start = max(window, row_bytes) - window
                self.padding[i].extend((slot.offset + row * piece + start, piece - start) for row in range(outer))

        def block_at(row: int, rows: int, column: int, width: int) -> Block:
            targets = []
            for i, slot, window in slots:
                lo, hi = max(column, window), min(column + width, window + piece)
                if lo < hi:
                    dst = slot.offset + row * piece + (lo - window)
                    targets.append(Target(i, lo - column, hi - lo, dst, piece))
            self._attribute(rows * width, targets, rows)
            return Block(tensor.begin + row * row_bytes + column, rows, width, tuple(targets))

        windows = [window for _, _, window in slots]
        # Padding (columns past row_bytes) is never fetched: a rank holding only padding reads nothing.
        lo, hi = min(windows), min(max(windows) + piece, row_bytes)
        if lo >= hi:
            return []
        if outer == 1:
            return [block_at(0, 1, c, min(self.max_range, hi - c)) for c in range(lo, hi, self.max_range)]
        if len(slots) == 1 and piece >= self.row_range_min:
            return [block_at(row, 1, lo, hi - lo) for row in range(outer)]
        rows_per_range = max(1, self.max_range // row_bytes)
        return [
            block_at(row, min(rows_per_range, outer - row), 0, row_bytes)
            for row in range(0, outer, rows_per_range)
        ]

    def _attribute(self, length: int, targets: list[Target], rows: int) -> None:
        """Split a block's fetched bytes between its targets by what each received (remainder to the first)."""
        received = [t.width * rows for t in targets]
        total = sum(received)
        shares = [length * r // total for r in received]
        shares[0] += length - sum(shares)
        for target, share in zip(targets, shares, strict=True):
            self.fetched[target.layout_index] += share

    def finish(self, files: tuple[FilePlan, ...]) -> LoadPlan:
        layouts = tuple(
            RankLayout(rank=rank, slots=tuple(self.slots[i]), size=align(self.cursors[i]), shards=tuple(self.shards),
                       padding=tuple(self.padding[i]))
            for i, rank in enumerate(self.ranks)
        )
        return LoadPlan(
            tp_size=self.tp_size, layouts=layouts, files=files, fetched_bytes_by_layout=tuple(self.fetched)
        )
