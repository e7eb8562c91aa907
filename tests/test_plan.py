"""Fetch plans, checked by executing them against an in-memory file: every rank's slice equals
``padded.narrow(d, r*part, part)``, and the bytes fetched are what the rules promise."""

from __future__ import annotations

import json
import struct
from itertools import pairwise

import pytest
import torch
from safetensors.torch import save
from weightd.daemon.errors import InvalidRequestError, UnsupportedModelError
from weightd.daemon.plan import ALIGNMENT, DIRECT_IO_BLOCK, LoadPlan, Rearranged, align, build_plan
from weightd.daemon.safetensors_header import header_length, parse_header
from weightd.daemon.sharding import Architecture, ShardRule, Split, llama_family_plan, select_rules, split_for
from weightd.daemon.storage.base import PrefixedObjects
from weightd.daemon.streaming import (
    COALESCE_MAX_BYTES,
    STAGED_RUN_PIECE_MAX,
    Scratch,
    _batches,
    _coalesce,
    _copy_duplicates,
    _Direct,
    _Duplicate,
    _duplicates_by_source,
    _requests,
    _route,
    _scatter_staged,
    _staging_slots,
    rearrange,
)

from tests.conftest import fp8_linear

OBJECT_STORE_PIECE_MIN = PrefixedObjects.min_separate_read_bytes
OBJECT_STORE_GAP = PrefixedObjects.read_through_gap_bytes

RULES = (ShardRule(r"vocab", 0, 8), ShardRule(r"padrow", 1, 4), ShardRule(r"col", 0), ShardRule(r"row", 1),
         ShardRule(r"deep", 2), ShardRule(r"whole", None))
SPLIT = ("vocab", "row", "col", "deep")
PADDED = {"vocab.weight": (0, 8), "padrow.weight": (1, 4)}  # (dim, pad_multiple), padded at every tp_size


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "col.weight": torch.randn(8, 12, generator=g).to(torch.bfloat16),
        "col.bias": torch.randn(8, generator=g),
        "col.wide.weight": torch.randn(16, 64, generator=g),  # slices of whole 256-byte multiples: a group shares them
        "row.weight": torch.randn(12, 16, generator=g).to(torch.float16),
        # Tensors shaped like earlier ones (an MoE's experts): their blocks reuse the earlier ones' targets.
        "col.expert.weight": torch.randn(8, 12, generator=g).to(torch.bfloat16),
        "row.expert.weight": torch.randn(12, 16, generator=g).to(torch.float16),
        "norm.expert.weight": torch.randn(12, generator=g),
        "row3d.weight": torch.randn(4, 8, 3, generator=g),  # "row" matches: split dim 1 of 3-D
        "deep.weight": torch.randn(2, 3, 8, generator=g).to(torch.float64),
        "whole.weight": torch.randn(5, 7, generator=g),
        "norm.weight": torch.randn(12, generator=g),
        "empty.weight": torch.zeros(0, 4),
        "flag": torch.tensor([True, False, True]),
        # Padded before splitting: 10 rows to 16 (rank 3 of 4 holds only zeros), 10 columns to 12.
        "vocab.weight": torch.randn(10, 6, generator=g),
        "padrow.weight": torch.randn(3, 10, generator=g).to(torch.bfloat16),
    }


def expected_slice(full: torch.Tensor, dim: int | None, rule_pad: int, tp_size: int, rank: int) -> torch.Tensor:
    if dim is None:
        return full
    padded_size = -(-full.shape[dim] // rule_pad) * rule_pad
    part = padded_size // tp_size
    shape = list(full.shape)
    shape[dim] = padded_size
    padded = torch.zeros(shape, dtype=full.dtype)
    padded.narrow(dim, 0, full.shape[dim]).copy_(full)
    return padded.narrow(dim, rank * part, part).contiguous()


def execute(
    blob: bytes, plan: LoadPlan, direct_piece_min: int = OBJECT_STORE_PIECE_MIN, read_through_gap: int = 0
) -> list[torch.Tensor]:
    """Run the loader's own routing and copies, with an in-memory file standing in for the streamer; returns
    each layout's arena (with a group arena, the same one for every layout). Every byte is read at most once."""
    arenas = [torch.zeros(size, dtype=torch.uint8) for size in plan.arena_sizes]
    source = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    direct, staged, duplicates = _requests(plan, direct_piece_min=direct_piece_min, read_through_gap=read_through_gap)
    reads = sorted([(d.file_offset, d.length) for d in direct] + [(s.file_offset, s.length) for s in staged])
    assert all(a + n <= b for (a, n), (b, _) in pairwise(reads)), "a byte read twice"
    for d in direct:
        arenas[d.arena_index][d.dst_offset : d.dst_offset + d.length].copy_(
            source[d.file_offset : d.file_offset + d.length]
        )
    for item in staged:
        _scatter_staged(source[item.file_offset : item.file_offset + item.length].clone(), item, arenas)
    _copy_duplicates(duplicates, arenas)
    scratch = Scratch()
    for region in plan.rearranged:
        rearrange(arenas[0], region, scratch)
    return [arenas[plan.arena_of(index)] for index in range(len(plan.layouts))]


def header_of(blob: bytes):
    n = header_length(blob[:8], file="m.safetensors", file_size=len(blob))
    return parse_header(blob[8 : 8 + n], file="m.safetensors", file_size=len(blob))


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("max_range", [7, 64, 1 << 20])
@pytest.mark.parametrize("row_range_min", [1, 1 << 20])
# Each rank alone, all ranks in an arena each, all ranks in one group arena, rank 1 alone and then the others
# (the rest of a group whose rank 1 was loaded first).
@pytest.mark.parametrize("loading", ["lone", "all", "group", "gapped"])
# A local file's costs (every rank's piece of a shared block its own range, nothing read through); an object
# store's (these small blocks read once and copied, every gap read through up to a read of max_range); and reads
# joined across gaps of up to 100 bytes only.
@pytest.mark.parametrize(("direct_piece_min", "read_through_gap"),
                         [(1, 0), (OBJECT_STORE_PIECE_MIN, OBJECT_STORE_GAP), (OBJECT_STORE_PIECE_MIN, 100)])
def test_every_rank_gets_exactly_its_slice(
    tp_size: int, max_range: int, row_range_min: int, loading: str, direct_piece_min: int, read_through_gap: int
) -> None:
    tensors = model()
    blob = save(tensors)
    header = header_of(blob)
    lone = loading == "lone"
    groups = {"lone": [[r] for r in range(tp_size)], "gapped": [[1], [0, *range(2, tp_size)]] if tp_size > 2 else []
              }.get(loading, [list(range(tp_size))])
    fetched_total = 0
    for ranks in groups:
        plan = build_plan([header], tp_size=tp_size, ranks=ranks, rules=RULES, max_range_bytes=max_range,
                          row_range_min_bytes=row_range_min, group_arena=loading == "group" and tp_size > 1)
        arenas = execute(blob, plan, direct_piece_min, read_through_gap)
        for layout, arena in zip(plan.layouts, arenas, strict=True):
            for slot in layout.slots:
                full = tensors[slot.name]
                # A group arena's shared section packs tensors as the file does (host memory: element-aligned).
                assert slot.offset % (full.element_size() if plan.grouped else ALIGNMENT) == 0
                # Padded tensors are padded at tp_size 1 too (one part, the padded whole).
                dim = dict(layout.shards).get(slot.name) if tp_size > 1 else PADDED.get(slot.name, (None, 1))[0]
                pad = PADDED.get(slot.name, (0, 1))[1]
                want = expected_slice(full, dim, pad, tp_size, layout.rank)
                got = arena[slot.offset : slot.offset + slot.nbytes].view(full.dtype).view(slot.shape)
                assert torch.equal(got, want), (slot.name, layout.rank)
            # The padding regions are exactly what no block writes: filled with ones, the slices must differ.
            marked = arena.clone()
            for offset, length in layout.padding:
                marked[offset : offset + length] = 1
            for slot in layout.slots:
                if slot.name not in PADDED:
                    continue
                differs = not torch.equal(marked[slot.offset : slot.offset + slot.nbytes],
                                          arena[slot.offset : slot.offset + slot.nbytes])
                dim = PADDED[slot.name][0]
                holds_padding = (layout.rank + 1) * slot.shape[dim] > tensors[slot.name].shape[dim]
                assert differs == holds_padding, (slot.name, layout.rank)
        fetched_total += plan.fetched_bytes
        direct, staged, _ = _requests(plan, direct_piece_min=direct_piece_min, read_through_gap=read_through_gap)
        assert plan.fetched_bytes == sum(d.length for d in direct) + sum(s.fetched for s in staged)
        assert all(len(s.blocks) == 1 or s.length <= max_range for s in staged)  # joined reads span a block at most
    weights = sum(t.nbytes for t in tensors.values())
    if loading in ("all", "group"):
        assert fetched_total == weights  # every byte once for the whole group
    if lone and row_range_min == 1 and tp_size > 1:
        # Row ranges: each lone rank reads only its own slices plus the replicated tensors.
        replicated = sum(t.nbytes for n, t in tensors.items() if not any(k in n for k in SPLIT))
        assert fetched_total == weights - replicated + tp_size * replicated


def test_lone_rank_reads_whole_rows_below_the_row_range_threshold() -> None:
    tensors = {"row.weight": torch.randn(64, 64)}  # 64 B slices per row at tp 4: too small for row ranges
    header = header_of(save(tensors))
    plan = build_plan([header], tp_size=4, ranks=[1], rules=RULES, max_range_bytes=1 << 20)
    assert plan.fetched_bytes == tensors["row.weight"].nbytes
    assert plan.layouts[0].size == tensors["row.weight"].nbytes // 4


def test_tensors_of_one_shape_share_their_blocks_targets() -> None:
    """A large MoE's experts cost one rank's planning at any tp_size: each block names where its tensor lies
    (the same offset in every rank's arena) and shares the targets of every block of its shape."""
    experts = {f"experts.{e}.col.weight": torch.randn(8, 12) for e in range(16)}
    experts |= {f"experts.{e}.norm.weight": torch.randn(12) for e in range(16)}
    plan = build_plan([header_of(save(experts))], tp_size=4, ranks=[0, 1, 2, 3], rules=RULES,
                      max_range_bytes=1 << 20)
    blocks = plan.files[0].blocks
    assert len(blocks) == 32 and len({id(b.targets) for b in blocks}) == 2
    offsets = {slot.offset for slot in plan.layouts[0].slots}
    assert {b.dst_base for b in blocks} == offsets and len(offsets) == 32


def test_a_whole_model_is_written_directly_and_large_reads_split() -> None:
    tensors = {f"norm{i}": torch.randn(16) for i in range(10)} | {"whole": torch.randn(1000)}
    plan = build_plan([header_of(save(tensors))], tp_size=1, ranks=[0], rules=(), max_range_bytes=1024)
    direct, staged, duplicates = _route(plan, direct_piece_min=OBJECT_STORE_PIECE_MIN)
    assert staged == [] and duplicates == []  # no staging buffer and no copy for tp_size 1
    assert max(d.length for d in direct) <= 1024 and len(direct) == 10 + 4


def test_ranges_back_to_back_in_file_and_arena_are_merged_up_to_the_limit() -> None:
    """The streamer reads such a run as one request anyway; merged, it costs one response, not one per tensor.
    A tensor whose size leaves an alignment gap in the arena ends a run, and so does another file or arena."""
    tensors = {f"t{i:02d}": torch.randn(64) for i in range(6)} | {"u": torch.randn(10)} | {"v": torch.randn(64)}
    plan = build_plan([header_of(save(tensors))], tp_size=1, ranks=[0], rules=(), max_range_bytes=1 << 20)
    direct, _, _ = _route(plan, direct_piece_min=1)
    merged = _coalesce(sorted(direct, key=lambda d: (d.file_index, d.file_offset)))
    assert [d.length for d in merged] == [6 * 256 + 40, 256]  # "u" (40 B) ends the run: "v" starts aligned
    assert sum(d.length for d in merged) == sum(d.length for d in direct)
    first = _Direct(0, 0, 256, 0, 0)
    assert _coalesce([first, _Direct(0, 256, 256, 0, 256)]) == [_Direct(0, 0, 512, 0, 0)]
    for after in (_Direct(0, 256, 256, 0, 512),  # a gap in the arena
                  _Direct(0, 256, 256, 1, 256),  # another arena
                  _Direct(1, 256, 256, 0, 256)):  # another file
        assert _coalesce([first, after]) == [first, after]
    big = COALESCE_MAX_BYTES // 2
    assert [d.length for d in _coalesce([_Direct(0, i * big, big, 0, i * big) for i in range(3)])] == [2 * big, big]


def test_small_tensors_the_arena_breaks_apart_are_read_as_staged_runs() -> None:
    """An FP8 checkpoint's 4-byte scales lie back to back in the file, but each slot starts aligned, so read
    directly each would be a request. Such runs are read as staged blocks of up to COALESCE_MAX_BYTES and copied
    into their slots; ranges of STAGED_RUN_PIECE_MAX or more stay direct."""
    tensors = ({f"a.{i:03d}.weight_scale": torch.rand(()) for i in range(300)}
               | {f"b.{i:03d}.norm": torch.randn(1000) for i in range(600)}  # 4,000 B: not a multiple of 256
               | {"c.weight": torch.randn(STAGED_RUN_PIECE_MAX // 4)})
    blob = save(tensors)
    plan = build_plan([header_of(blob)], tp_size=1, ranks=[0], rules=(), max_range_bytes=1 << 20)
    direct, staged, duplicates = _requests(plan, direct_piece_min=1, read_through_gap=0)
    assert [d.length for d in direct] == [STAGED_RUN_PIECE_MAX] and duplicates == []
    assert all(s.length <= COALESCE_MAX_BYTES for s in staged)
    assert sum(len(s.blocks[0].targets) for s in staged) == 900 and len(staged) == 3  # 2.4 MB of runs: 3 reads
    assert sum(d.length for d in direct) + sum(s.length for s in staged) == plan.fetched_bytes
    (arena,) = execute(blob, plan, direct_piece_min=1)
    for slot in plan.layouts[0].slots:
        assert torch.equal(arena[slot.offset : slot.offset + slot.nbytes].view(torch.float32).view(slot.shape),
                           tensors[slot.name])


def test_a_block_shared_by_ranks_is_one_read_when_their_pieces_are_small() -> None:
    tensors = {"col.weight": torch.randn(64, 64), "norm.weight": torch.randn(64)}  # 4 KiB pieces at tp 4
    plan = build_plan([header_of(save(tensors))], tp_size=4, ranks=[0, 1, 2, 3], rules=RULES, max_range_bytes=1 << 20)
    direct, staged, duplicates = _route(plan, direct_piece_min=1)
    assert sorted(d.length for d in direct) == [256, 4096, 4096, 4096, 4096] and staged == []
    assert len(duplicates) == 3  # the replicated norm: read once into rank 0, copied to the others
    direct, staged, duplicates = _route(plan, direct_piece_min=4096)
    assert sorted(d.length for d in direct) == [256, 4096, 4096, 4096, 4096] and staged == []
    direct, staged, duplicates = _route(plan, direct_piece_min=4097)
    assert direct == [] and duplicates == []  # the norm too: staged beside the block, one request for both
    assert [item.length for item in staged] == [16384, 256]  # each read once, copied out to the 4 ranks


def test_a_lone_ranks_small_reads_close_together_are_joined_across_the_gaps() -> None:
    """Rank 1 of 4 alone: its quarter of each 16 KiB "col" tensor is 4 KiB, with 12 KiB of the other ranks' between
    it and the next. Where a request costs more than that (an object store), the quarters and the staged "row"
    between them are one read, the gaps read and dropped; a quarter worth a request of its own stays direct."""
    tensors = {f"a{i}.col.weight": torch.randn(64, 64) for i in range(6)} | {"b.row.weight": torch.randn(64, 64)}
    tensors |= {f"c{i}.col.weight": torch.randn(64, 64) for i in range(2)} | {"d.col.weight": torch.randn(1024, 64)}
    blob = save(tensors)
    plan = build_plan([header_of(blob)], tp_size=4, ranks=[1], rules=RULES, max_range_bytes=1 << 20)
    want = execute(blob, plan, direct_piece_min=8192, read_through_gap=0)[0]

    def reads(gap: int) -> tuple[list[int], list[tuple[int, int, int]]]:
        direct, staged, _ = _requests(plan, direct_piece_min=8192, read_through_gap=gap)
        assert execute(blob, plan, direct_piece_min=8192, read_through_gap=gap)[0].equal(want)
        return [d.length for d in direct], [(s.length, s.fetched, len(s.blocks)) for s in staged]

    # Gaps of 12 KiB, under a 16 KiB threshold: the nine small reads are one, from a0's quarter (at 4 KiB) to the
    # end of c1's (two quarters into the ninth tensor), holding 8 quarters and "row"; d's 64 KiB quarter stays direct.
    quarter = 4096
    assert reads(16384) == ([16 * quarter], [(8 * 16384 + 2 * quarter - quarter, 8 * quarter + 4 * quarter, 9)])
    # With 8 KiB, only "row" and the quarters 8 KiB before and 4 KiB after it, the gaps between them read too.
    assert reads(8192) == ([quarter] * 6 + [16 * quarter], [(9 * quarter, 6 * quarter, 3)])
    # Under every gap, nothing is joined: each quarter a request, "row" read whole and sliced.
    assert reads(quarter - 1) == ([quarter] * 8 + [16 * quarter], [(4 * quarter, 4 * quarter, 1)])
    # A joined read spans at most a block of the plan.
    capped = build_plan([header_of(blob)], tp_size=4, ranks=[1], rules=RULES, max_range_bytes=32768)
    _, staged, _ = _requests(capped, direct_piece_min=8192, read_through_gap=16384)
    assert max(s.length for s in staged) <= 32768 and len(staged) > 1


def test_small_direct_ranges_back_to_back_with_staged_blocks_are_staged_with_them() -> None:
    # A lone rank of 4: its quarter of "col" is one 4 KiB range, and "row" is read whole to be sliced in memory.
    # In the file: col, norm, row; rank 3's quarter ends where the norm starts, rank 1's touches nothing.
    tensors = {"col.weight": torch.randn(64, 64), "norm.weight": torch.randn(64), "row.weight": torch.randn(64, 64)}
    blob = save(tensors)
    for rank, direct_under, staged_under in ((1, [4096], [256, 16384]), (3, [], [256, 4096, 16384])):
        plan = build_plan([header_of(blob)], tp_size=4, ranks=[rank], rules=RULES, max_range_bytes=1 << 20)
        direct, staged, _ = _route(plan, direct_piece_min=1)
        assert sorted(d.length for d in direct) == [256, 4096] and [s.length for s in staged] == [16384]
        # Under the store's threshold, a range back to back with a staged block (the norm, and through it rank
        # 3's quarter, which with the norm is one run of 4,352 bytes in file and arena) is staged with it: one
        # request for the run.
        direct, staged, _ = _route(plan, direct_piece_min=8192)
        assert [d.length for d in direct] == direct_under
        assert sorted(s.length for s in staged) == staged_under
        assert execute(blob, plan, 8192)[0].equal(execute(blob, plan, 1)[0])
        # A run at the threshold is a request worth its own: it stays direct.
        at_threshold = _route(plan, direct_piece_min=4352)[0]
        assert sorted(d.length for d in at_threshold) == ([4096] if rank == 1 else [256, 4096])
    # A load that stages nothing keeps its small ranges direct.
    whole = build_plan([header_of(blob)], tp_size=1, ranks=[0], rules=RULES, max_range_bytes=1 << 20)
    assert _route(whole, direct_piece_min=4097)[1] == []


def test_a_group_arena_holds_the_file_as_it_is_and_stages_only_what_it_cannot() -> None:
    """All ranks of 4 in one arena: the dim-0 split "col", the replicated norm and the dim-1 split "row" lie once,
    as in the file, and are read straight in; "row" is then rearranged in place, its four slices one after the
    other. Only "row.big" (larger than a block) and the padded "vocab" go to the ranks' sections, through the
    staging buffer. The arena is smaller than four arenas by the replicas it does not hold."""
    tensors = {"col.weight": torch.randn(64, 64), "norm.weight": torch.randn(63), "row.weight": torch.randn(64, 64),
               "row.big.weight": torch.randn(128, 64), "vocab.weight": torch.randn(10, 64)}  # vocab: 16 padded rows
    blob = save(tensors)
    assert [t.name for t in header_of(blob).tensors] == sorted(tensors)  # the file's order
    block = 16384
    apart = build_plan([header_of(blob)], tp_size=4, ranks=range(4), rules=RULES, max_range_bytes=block)
    group = build_plan([header_of(blob)], tp_size=4, ranks=range(4), rules=RULES, max_range_bytes=block,
                       group_arena=True)
    shared = 16384 + 252 + 16384  # col, the norm right after it (252 bytes: no alignment gap), row
    section = 8192 + 4 * 64 * 4  # a quarter of row.big, then 4 of vocab's 16 padded rows
    assert group.arena_sizes == (align(shared) + 4 * section,)
    assert sum(apart.arena_sizes) == 4 * (4096 + 256 + 4096 + section)
    slots = [{slot.name: slot for slot in layout.slots} for layout in group.layouts]
    assert [s["col.weight"].offset for s in slots] == [0, 4096, 8192, 12288]
    assert {s["norm.weight"].offset for s in slots} == {16384}
    assert [s["row.weight"].offset for s in slots] == [16636 + r * 4096 for r in range(4)]
    assert [s["row.big.weight"].offset for s in slots] == [align(shared) + r * section for r in range(4)]
    assert group.rearranged == (Rearranged(16636, 64, 4, 64),)
    # (A store whose requests cost what 8 KiB do: the runs of 16 KiB are worth a request each.)
    direct, staged, duplicates = _requests(group, direct_piece_min=8192, read_through_gap=0)
    assert [d.length for d in direct] == [16636, 16384] and duplicates == []
    assert sorted(s.length for s in staged) == [2560, 16384, 16384]
    assert group.fetched_bytes == sum(t.nbytes for t in tensors.values())
    for layout, arena in zip(group.layouts, execute(blob, group, 8192), strict=True):
        for name, slot in slots[layout.rank].items():
            got = arena[slot.offset : slot.offset + slot.nbytes].view(torch.float32).view(slot.shape)
            want = expected_slice(tensors[name], dict(layout.shards)[name], PADDED.get(name, (0, 1))[1], 4,
                                  layout.rank)
            assert torch.equal(got, want), (name, layout.rank)
    # Each rank is credited its share of what was fetched (the norm, a quarter each).
    assert group.fetched_bytes_by_layout == apart.fetched_bytes_by_layout


def test_ranks_sharing_a_kv_head_share_its_bytes_in_a_group_arena() -> None:
    """At tp_size 4 with 2 KV heads, ranks 0 and 1 hold head 0: in a group arena both are served the same bytes,
    which lie once, as in the file."""
    tensors = {"l.k_proj.weight": torch.randn(2 * 64, 32), "l.k_proj.bias": torch.randn(2 * 64)}
    blob = save(tensors)
    plan = build_plan([header_of(blob)], tp_size=4, ranks=range(4), rules=llama_family_plan(2),
                      max_range_bytes=1 << 20, group_arena=True)
    assert plan.arena_sizes == (sum(t.nbytes for t in tensors.values()),)
    for layout, arena in zip(plan.layouts, execute(blob, plan), strict=True):
        for slot in layout.slots:
            head = layout.rank // 2
            assert slot.offset == plan.layouts[2 * head].slots[layout.slots.index(slot)].offset
            got = arena[slot.offset : slot.offset + slot.nbytes].view(torch.float32).view(slot.shape)
            assert torch.equal(got, tensors[slot.name].narrow(0, head * 64, 64))


def raw_safetensors(entries: list[tuple[str, str, list[int], bytes]]) -> bytes:
    """A safetensors file with its tensors exactly where ``entries`` put them, back to back (``save`` orders and
    aligns them itself); its data section starts at a byte offset that is no multiple of 512."""
    offsets, cursor = {}, 0
    for name, dtype, shape, data in entries:
        offsets[name] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + len(data)]}
        cursor += len(data)
    header = json.dumps(offsets).encode()
    header += b" " * (-len(header) % 8 + 8 * (((8 + len(header)) % 512) == 0))
    return struct.pack("<Q", len(header)) + header + b"".join(data for *_, data in entries)


def test_a_host_plan_of_local_files_lays_each_file_out_as_it_lies_in_the_file() -> None:
    """For O_DIRECT: every tensor's arena offset agrees with its file offset modulo DIRECT_IO_BLOCK, so that
    each file is one run of ranges back to back in file and arena (read as one), its tensors aligned to their
    elements only. A file with a tensor whose offset is no multiple of its element size keeps the aligned layout
    and is read through the page cache (a view of it could not be made), as does one not asked for (storage
    would rather read it buffered), and the next file does not depend on either."""
    tensors = model()
    odd = raw_safetensors([("odd.bytes", "U8", [3], b"abc"),
                           ("odd.weight", "F32", [5], torch.arange(5, dtype=torch.float32).numpy().tobytes())])
    headers = [parse_header(blob[8 : 8 + header_length(blob[:8], file=name, file_size=len(blob))], file=name,
                            file_size=len(blob))
               for name, blob in (("a.safetensors", save(tensors)), ("b.safetensors", odd),
                                  ("c.safetensors", save({"late.weight": torch.randn(7)})))]
    assert headers[0].data_start % 512 and headers[1].tensors[1].begin % 4
    plan = build_plan(headers, tp_size=1, ranks=[0], rules=(), max_range_bytes=1 << 20,
                      direct_io_files=frozenset({"a.safetensors", "b.safetensors"}))  # c: mostly cached, say
    assert [f.direct_io for f in plan.files] == [True, False, False]
    slots = {slot.name: slot for slot in plan.layouts[0].slots}
    by_file = [[slots[t.name] for t in h.tensors] for h in headers]
    for header, placed in zip(headers, by_file, strict=True):
        if header.file != "a.safetensors":
            assert all(slot.offset % ALIGNMENT == 0 for slot in placed)
            continue
        for tensor, slot in zip(header.tensors, placed, strict=True):
            assert slot.offset % DIRECT_IO_BLOCK == tensor.begin % DIRECT_IO_BLOCK, slot.name
        assert all(a.offset + a.nbytes == b.offset for a, b in pairwise(placed))  # as in the file: back to back
    ends = sorted((s.offset, s.offset + s.nbytes) for s in slots.values())
    assert all(end <= start for (_, end), (start, _) in pairwise(ends)) and ends[-1][1] <= plan.arena_sizes[0]
    blob = save(tensors)
    congruent = build_plan([header_of(blob)], tp_size=1, ranks=[0], rules=(), max_range_bytes=1 << 20,
                           direct_io_files=frozenset({"m.safetensors"}))
    direct, staged, _ = _requests(congruent, direct_piece_min=1, read_through_gap=0)
    assert len(direct) == 1 and staged == []  # the whole data section, one range
    aligned = build_plan([header_of(blob)], tp_size=1, ranks=[0], rules=(), max_range_bytes=1 << 20)
    assert _requests(aligned, direct_piece_min=1, read_through_gap=0)[1]  # gaps break it: staged runs
    (arena,) = execute(blob, congruent, direct_piece_min=1)
    for slot in congruent.layouts[0].slots:
        got = arena[slot.offset : slot.offset + slot.nbytes].view(tensors[slot.name].dtype).view(slot.shape)
        assert torch.equal(got, tensors[slot.name]), slot.name


@pytest.mark.parametrize(("tp_size", "ranks", "group_arena"), [
    (1, [0], False), (4, [0, 1, 2, 3], True), (4, [0, 1, 2, 3], False), (4, [1], False), (2, [1], False),
])
def test_every_read_of_a_file_read_with_direct_io_lands_where_it_agrees_with_the_file(
    tp_size: int, ranks: list[int], group_arena: bool
) -> None:
    """One read that disagrees would make the streamer read the whole file through the page cache: what cannot
    lie as in the file (slices for ranks, padded splits, a group's rank sections) is read through the staging
    buffer, each read placed there to agree with the file; every rank still gets exactly its slice."""
    tensors = model()
    blob = save(tensors)
    plan = build_plan([header_of(blob)], tp_size=tp_size, ranks=ranks, rules=RULES, max_range_bytes=256,
                      group_arena=group_arena, direct_io_files=frozenset({"m.safetensors"}))
    assert plan.files[0].direct_io
    direct, staged, _ = _requests(plan, direct_piece_min=1, read_through_gap=0)
    assert all((d.dst_offset - d.file_offset) % DIRECT_IO_BLOCK == 0 for d in direct)
    slots = _staging_slots(staged, 8192)
    assert all(size % DIRECT_IO_BLOCK == 0 for size in slots)
    batches = _batches(staged, slots[0], {0})
    assert all((start - item.file_offset) % DIRECT_IO_BLOCK == 0 and start + item.length <= slots[0]
               for batch in batches for start, item in batch)
    assert sum(len(b) for b in batches) == len(staged)
    for layout, arena in zip(plan.layouts, execute(blob, plan, direct_piece_min=1), strict=True):
        for slot in layout.slots:
            full = tensors[slot.name]
            dim = dict(layout.shards).get(slot.name) if tp_size > 1 else PADDED.get(slot.name, (None, 1))[0]
            want = expected_slice(full, dim, PADDED.get(slot.name, (0, 1))[1], tp_size, layout.rank)
            got = arena[slot.offset : slot.offset + slot.nbytes].view(full.dtype).view(slot.shape)
            assert torch.equal(got, want), (slot.name, layout.rank)


def test_a_lone_rank_s_large_slices_of_a_file_read_with_direct_io_are_placed_to_agree_and_read_straight_in() -> None:
    """A rank's slice of a dim-0 split is one range; from AGREEING_SLICE_MIN_BYTES it is placed where it agrees
    with the file (up to a block of padding before it) instead of going through the staging buffer; smaller
    slices, and a dim-1 split's rows, are staged."""
    tensors = {"col.weight": torch.randn(512, 256), "col.small.weight": torch.randn(16, 16),
               "row.weight": torch.randn(256, 256), "norm.weight": torch.randn(300)}
    blob = save(tensors)
    header = header_of(blob)
    begins = {t.name: t.begin for t in header.tensors}
    for rank in range(4):
        plan = build_plan([header], tp_size=4, ranks=[rank], rules=RULES, max_range_bytes=1 << 20,
                          direct_io_files=frozenset({"m.safetensors"}))
        slots = {slot.name: slot for slot in plan.layouts[0].slots}
        window = rank * 128 * 256 * 4
        assert (slots["col.weight"].offset - begins["col.weight"] - window) % DIRECT_IO_BLOCK == 0
        assert slots["col.small.weight"].offset % ALIGNMENT == 0  # 256-byte slices: staged
        direct, staged, _ = _requests(plan, direct_piece_min=1, read_through_gap=0)
        assert all((d.dst_offset - d.file_offset) % DIRECT_IO_BLOCK == 0 for d in direct)
        for wanted in (begins["col.weight"] + window, begins["norm.weight"]):  # read straight in (maybe as one)
            assert any(d.file_offset <= wanted < d.file_offset + d.length for d in direct)
        assert {s.file_offset for s in staged} == {begins["col.small.weight"] + rank * 4 * 16 * 4,
                                                   begins["row.weight"]}
        assert plan.arena_sizes[0] < sum(slot.nbytes for slot in slots.values()) + 2 * DIRECT_IO_BLOCK + 4 * ALIGNMENT
        (arena,) = execute(blob, plan, direct_piece_min=1)
        for name, slot in slots.items():
            want = expected_slice(tensors[name], dict(plan.layouts[0].shards)[name], 1, 4, rank)
            assert torch.equal(arena[slot.offset : slot.offset + slot.nbytes].view(torch.float32).view(slot.shape),
                               want), (name, rank)


def test_an_empty_tensor_after_an_odd_sized_one_is_placed_on_its_element_size_in_a_group_arena() -> None:
    """A group arena packs its shared section as the file does, each slot on a multiple of its element size, which
    a client's view needs: an empty F32 tensor too, after 3 bytes of U8."""
    blob = raw_safetensors([("a.bytes", "U8", [3], b"abc"), ("b.empty", "F32", [0], b""),
                            ("c.weight", "F32", [2], torch.ones(2).numpy().tobytes())])
    plan = build_plan([header_of(blob)], tp_size=2, ranks=[0, 1], rules=RULES, max_range_bytes=1 << 20,
                      group_arena=True)
    for layout in plan.layouts:
        assert all(slot.offset % (4 if slot.dtype == "F32" else 1) == 0 for slot in layout.slots), layout.slots


def test_a_group_arena_holds_every_rank_in_order() -> None:
    header = header_of(save({"col.weight": torch.randn(8, 8)}))
    for tp_size, ranks in ((1, [0]), (4, [1]), (4, [1, 0, 2, 3])):
        with pytest.raises(ValueError, match="every rank"):
            build_plan([header], tp_size=tp_size, ranks=ranks, rules=RULES, max_range_bytes=1 << 20, group_arena=True)


def test_a_replica_is_copied_when_the_range_holding_its_whole_source_lands() -> None:
    direct = [_Direct(0, 0, 100, 0, 0), _Direct(0, 100, 50, 1, 256)]
    inside, whole = _Duplicate(0, 10, 2, 0, 20), _Duplicate(1, 256, 3, 0, 50)
    across_the_end, in_no_range = _Duplicate(0, 90, 2, 0, 20), _Duplicate(1, 0, 2, 0, 8)  # staged sources
    on_landing, at_end = _duplicates_by_source(direct, [inside, whole, across_the_end, in_no_range])
    assert on_landing == [[inside], [whole]] and at_end == [across_the_end, in_no_range]


def test_staging_takes_two_slots_only_when_the_staged_blocks_exceed_the_limit_and_two_largest_fit() -> None:
    tensors = {f"row{i}.weight": torch.randn(64, 64) for i in range(8)}  # 16 KiB each, all scattered at tp 4
    plan = build_plan([header_of(save(tensors))], tp_size=4, ranks=[0, 1, 2, 3], rules=RULES, max_range_bytes=1 << 20)
    staged = _route(plan, direct_piece_min=OBJECT_STORE_PIECE_MIN)[1]
    assert [item.length for item in staged] == [16384] * 8
    # Each read may start up to DIRECT_IO_BLOCK into its place (where it agrees with its file offset).
    assert _staging_slots(staged, 1 << 20) == [8 * (16384 + DIRECT_IO_BLOCK)]  # all at once: one slot, one batch
    assert _staging_slots(staged, 16384) == [16384 + DIRECT_IO_BLOCK]  # two would not each hold a block
    slots = _staging_slots(staged, 48 << 10)
    assert slots == [24 << 10] * 2 and [len(b) for b in _batches(staged, slots[0], set())] == [1] * 8
    slots = _staging_slots(staged, (80 << 10) + 1)  # halves are rounded down to whole blocks
    assert slots == [40 << 10] * 2 and [len(b) for b in _batches(staged, slots[0], set())] == [2] * 4


def test_uneven_split_names_tensor_dim_size_and_tp_size() -> None:
    header = header_of(save({"col.weight": torch.zeros(6, 4)}))
    with pytest.raises(InvalidRequestError, match=r"'col.weight' dim 0 has size 6.*tp_size 4"):
        build_plan([header], tp_size=4, ranks=[0], rules=RULES, max_range_bytes=1 << 20)


def test_split_dim_beyond_rank_is_rejected() -> None:
    header = header_of(save({"col.bias": torch.zeros(8)}))
    with pytest.raises(InvalidRequestError, match="1 dimension"):
        build_plan([header], tp_size=2, ranks=[0], rules=(ShardRule("col", 1),), max_range_bytes=1 << 20)


def test_unknown_model_type_needs_rules() -> None:
    with pytest.raises(UnsupportedModelError, match="pass shard_rules"):
        select_rules(Architecture("bert", 12), (), tp_size=2)
    assert select_rules(Architecture("bert", 12), (), tp_size=1) == ()
    assert select_rules(Architecture("qwen2", 2), (), tp_size=2) == llama_family_plan(2)


def test_qwen_moe_experts_split_on_their_intermediate_dimension_and_the_router_is_replicated() -> None:
    rules = select_rules(Architecture("qwen3_moe", 4), (), tp_size=4)
    shape = (768, 2048)
    assert split_for("model.layers.0.mlp.experts.7.gate_proj.weight", shape, rules, tp_size=4) == Split(0, 192, 4)
    assert split_for("model.layers.0.mlp.experts.7.up_proj.weight", shape, rules, tp_size=4) == Split(0, 192, 4)
    assert split_for("model.layers.0.mlp.experts.7.down_proj.weight", shape[::-1], rules, tp_size=4) == Split(
        1, 192, 4)
    assert split_for("model.layers.0.mlp.gate.weight", (128, 2048), rules, tp_size=4) is None


def test_mixtral_experts_split_like_gate_up_and_down() -> None:
    rules = select_rules(Architecture("mixtral", 8), (), tp_size=2)
    moe = "model.layers.0.block_sparse_moe"
    shape = (14336, 4096)
    assert split_for(f"{moe}.experts.3.w1.weight", shape, rules, tp_size=2) == Split(0, 7168, 2)
    assert split_for(f"{moe}.experts.3.w3.weight", shape, rules, tp_size=2) == Split(0, 7168, 2)
    assert split_for(f"{moe}.experts.3.w2.weight", shape[::-1], rules, tp_size=2) == Split(1, 7168, 2)
    assert split_for(f"{moe}.gate.weight", (8, 4096), rules, tp_size=2) is None


def test_deepseek_mla_splits_its_up_projections_and_replicates_its_low_rank_ones() -> None:
    """DeepSeek-V3's shapes (128 heads, FP8 block scales) at tp_size 8, as vLLM's Column/Row/ReplicatedLinear."""
    rules = select_rules(Architecture("deepseek_v3", 128), (), tp_size=8)
    attn = "model.layers.3.self_attn"
    assert split_for(f"{attn}.q_b_proj.weight", (24576, 1536), rules, tp_size=8) == Split(0, 3072, 8)
    assert split_for(f"{attn}.q_b_proj.weight_scale_inv", (192, 12), rules, tp_size=8) == Split(0, 24, 8)
    assert split_for(f"{attn}.kv_b_proj.weight", (32768, 512), rules, tp_size=8) == Split(0, 4096, 8)
    assert split_for(f"{attn}.o_proj.weight", (7168, 16384), rules, tp_size=8) == Split(1, 2048, 8)
    for replicated in ("q_a_proj.weight", "kv_a_proj_with_mqa.weight", "q_a_layernorm.weight"):
        assert split_for(f"{attn}.{replicated}", (1536, 7168), rules, tp_size=8) is None
    assert split_for("model.layers.3.mlp.gate.e_score_correction_bias", (256,), rules, tp_size=8) is None
    assert split_for("model.layers.61.shared_head.head.weight", (129280, 7168), rules, tp_size=8) == Split(
        0, 16160, 8)


def test_fp8_weight_scales_follow_their_weights_and_per_tensor_scales_stay_whole() -> None:
    """As vLLM shards them: per-channel scales ([out, 1]) with column-parallel weights, block-wise scale_inv
    ([out/128, in/128]) on the weight's split dimension; per-tensor scales (one element) on every rank."""
    rules = llama_family_plan(8)
    layer = "model.layers.0"
    assert split_for(f"{layer}.self_attn.q_proj.weight_scale", (4096, 1), rules, tp_size=4) == Split(0, 1024, 4)
    assert split_for(f"{layer}.self_attn.k_proj.weight_scale", (1024, 1), rules, tp_size=4) == Split(0, 256, 4)
    assert split_for(f"{layer}.mlp.up_proj.weight_scale_inv", (112, 32), rules, tp_size=4) == Split(0, 28, 4)
    assert split_for(f"{layer}.mlp.down_proj.weight_scale_inv", (32, 112), rules, tp_size=4) == Split(1, 28, 4)
    assert split_for(f"{layer}.mlp.down_proj.weight_scale", (4096, 1), rules, tp_size=4) is None  # per output row
    for shape in [(), (1,), (1, 1)]:
        assert split_for(f"{layer}.mlp.gate_proj.weight_scale", shape, rules, tp_size=4) is None
        assert split_for(f"{layer}.mlp.gate_proj.input_scale", shape, rules, tp_size=4) is None
        assert split_for("x.scale", shape, (ShardRule(r"scale$", 0, pad_multiple=64),), tp_size=4) is None

    g = torch.Generator().manual_seed(3)
    tensors = fp8_linear(f"{layer}.mlp.gate_proj", 8, 6, g) | fp8_linear(f"{layer}.mlp.down_proj", 6, 8, g)
    blob = save(tensors)
    plan = build_plan([header_of(blob)], tp_size=2, ranks=range(2), rules=rules, max_range_bytes=1 << 20)
    for layout, arena in zip(plan.layouts, execute(blob, plan), strict=True):
        for slot in layout.slots:
            full = tensors[slot.name]
            dim = dict(layout.shards)[slot.name]
            want = full if dim is None else full.chunk(2, dim)[layout.rank]
            got = arena[slot.offset : slot.offset + slot.nbytes].view(full.dtype).view(slot.shape)
            assert got.reshape(-1).view(torch.uint8).equal(want.reshape(-1).view(torch.uint8)), (slot.name, layout.rank)


def test_fused_parts_lie_back_to_back_and_are_served_as_one_tensor() -> None:
    from weightd.daemon.placement import Fusion

    g = torch.Generator().manual_seed(1)
    tensors = {
        "l.v_proj.weight": torch.randn(2, 6, generator=g), "l.q_proj.weight": torch.randn(4, 6, generator=g),
        "l.norm.weight": torch.randn(6, generator=g), "l.k_proj.weight": torch.randn(2, 6, generator=g),
        "l.q_proj.bias": torch.randn(4, generator=g), "l.k_proj.bias": torch.randn(2, generator=g),  # no v bias
        "m.gate_proj.weight": torch.randn(4, 6, generator=g), "m.up_proj.weight": torch.randn(4, 6, generator=g).half(),
    }
    blob = save(tensors)
    fusions = (Fusion("qkv_proj", ("q_proj", "k_proj", "v_proj")), Fusion("gate_up_proj", ("gate_proj", "up_proj")))
    rules = (ShardRule(r"_proj\.", 0),)
    for tp_size in (1, 2):
        plan = build_plan([header_of(blob)], tp_size=tp_size, ranks=range(tp_size), rules=rules,
                          max_range_bytes=1 << 20, fusions=fusions)
        for layout, arena in zip(plan.layouts, execute(blob, plan), strict=True):
            served = {slot.name: slot for slot in layout.slots}
            # Fused: q|k|v weights. Not fused: biases (no v bias), gate/up (dtypes differ), the norm.
            assert sorted(served) == sorted(["l.qkv_proj.weight", "l.norm.weight", "l.q_proj.bias", "l.k_proj.bias",
                                             "m.gate_proj.weight", "m.up_proj.weight"])
            qkv = served["l.qkv_proj.weight"]
            got = arena[qkv.offset : qkv.offset + qkv.nbytes].view(torch.float32).view(qkv.shape)
            want = torch.cat([tensors[f"l.{p}_proj.weight"].chunk(tp_size)[layout.rank] for p in "qkv"])
            assert qkv.offset % ALIGNMENT == 0 and qkv.shape == tuple(want.shape) and torch.equal(got, want)
            assert dict(layout.shards).get("l.qkv_proj.weight") == (0 if tp_size > 1 else None)
        assert plan.fetched_bytes == sum(t.nbytes for t in tensors.values())  # each byte once, fused or not


@pytest.mark.parametrize("tp_size", [1, 2, 4, 8])
@pytest.mark.parametrize("max_range", [5, 1 << 20])
def test_kv_heads_stay_whole_and_are_shared_beyond_their_count(tp_size: int, max_range: int) -> None:
    """2 KV heads of 3 rows: up to 2 ranks split them; beyond, tp_size / 2 consecutive ranks share a head (as
    vLLM's tp_rank // num_kv_head_replicas), fused into q|k|v, and the group still fetches every byte once."""
    from weightd.daemon.placement import Fusion

    g = torch.Generator().manual_seed(2)
    heads, head_dim, hidden = 2, 3, 5
    tensors = {
        "l.q_proj.weight": torch.randn(8 * head_dim, hidden, generator=g),
        "l.k_proj.weight": torch.randn(heads * head_dim, hidden, generator=g),
        "l.v_proj.weight": torch.randn(heads * head_dim, hidden, generator=g),
        "l.k_proj.bias": torch.randn(heads * head_dim, generator=g),
    }
    blob = save(tensors)
    plan = build_plan([header_of(blob)], tp_size=tp_size, ranks=range(tp_size), rules=llama_family_plan(heads),
                      max_range_bytes=max_range, fusions=(Fusion("qkv_proj", ("q_proj", "k_proj", "v_proj")),))
    for layout, arena in zip(plan.layouts, execute(blob, plan), strict=True):
        served = {slot.name: slot for slot in layout.slots}
        head = layout.rank * min(heads, tp_size) // tp_size
        kv_rows = head_dim * heads // min(heads, tp_size)

        def kv(name: str, head: int = head, kv_rows: int = kv_rows) -> torch.Tensor:
            return tensors[name].narrow(0, head * kv_rows, kv_rows)

        qkv = served["l.qkv_proj.weight"]
        want = torch.cat([tensors["l.q_proj.weight"].chunk(tp_size)[layout.rank], kv("l.k_proj.weight"),
                          kv("l.v_proj.weight")])
        assert torch.equal(arena[qkv.offset : qkv.offset + qkv.nbytes].view(torch.float32).view(qkv.shape), want)
        bias = served["l.k_proj.bias"]
        got = arena[bias.offset : bias.offset + bias.nbytes].view(torch.float32)
        assert torch.equal(got, kv("l.k_proj.bias")), layout.rank
    assert plan.fetched_bytes == sum(t.nbytes for t in tensors.values())


def test_heads_that_tp_size_cannot_share_evenly_are_refused() -> None:
    header = header_of(save({"l.k_proj.weight": torch.zeros(6, 4)}))
    for tp_size in (4, 5):  # 3 heads: 4 and 5 neither divide 3 nor are multiples of it
        with pytest.raises(InvalidRequestError, match=r"'l.k_proj.weight' dim 0 \(size 6\) is 3 heads"):
            build_plan([header], tp_size=tp_size, ranks=[0], rules=llama_family_plan(3), max_range_bytes=1 << 20)
