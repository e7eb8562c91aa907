"""The staging buffer a load keeps for the next (weightd.daemon.streaming.StagingBuffers), with the real streamer
reading a local model directory."""

from __future__ import annotations

from pathlib import Path

import torch
from weightd.daemon import loader
from weightd.daemon.config import DEFAULT_STAGING_BYTES
from weightd.daemon.memory.host import HostMemory
from weightd.daemon.plan import Block, RankLayout, Target
from weightd.daemon.storage.base import parse_model_uri
from weightd.daemon.streaming import (
    STAGING_BUFFERS,
    StagingBuffers,
    _requests,
    _Staged,
    _staging_slots,
    staging_buffer_bytes,
)

from tests.conftest import Model


def check_rank(arena: torch.Tensor, layout: RankLayout, full: dict[str, torch.Tensor], tp_size: int) -> None:
    """Every slot of ``layout`` in ``arena`` equals its rank's slice of ``full``: on the dim its shape is cut, in
    as many slices as fit (fewer than ``tp_size`` for KV heads, which ranks then share)."""
    for slot in layout.slots:
        tensor = full[slot.name]
        for dim, (whole, part) in enumerate(zip(tensor.shape, slot.shape, strict=True)):
            if whole != part:
                tensor = tensor.narrow(dim, layout.rank * (whole // part) // tp_size * part, part)
        got = arena[slot.offset : slot.offset + slot.nbytes].view(tensor.dtype).reshape(tensor.shape)
        assert torch.equal(got, tensor), slot.name


def test_a_load_reuses_the_last_ones_staging_buffer_and_none_of_its_old_bytes_reach_the_arena(
    llama_model: Model, shm: Path, tmp_path: Path
) -> None:
    settings = loader.LoadSettings(memory_limit=4 << 20)
    prepared = loader.prepare(parse_model_uri(str(llama_model.directory)), cache_dir=tmp_path, tp_size=4, ranks=[1],
                              rules=(), settings=settings)
    _, staged, _ = _requests(prepared.plan, direct_piece_min=prepared.store.min_separate_read_bytes,
                             read_through_gap=prepared.store.read_through_gap_bytes)
    assert staged  # a lone rank reads its dim-1 tensors' rows whole and scatters its columns
    memory = HostMemory(directory=shm, namespace="staging")
    (first,) = loader.stream(prepared, memory, settings=settings, on_progress=lambda n: None)
    first.arena.release()
    kept = STAGING_BUFFERS.take(1)  # what the first load gave back
    kept.fill_(0xFF)  # stale bytes: none may reach the next load's arena
    STAGING_BUFFERS.give_back(kept)
    (second,) = loader.stream(prepared, memory, settings=settings, on_progress=lambda n: None)
    try:
        arena = second.arena.tensor().clone()  # a failure's report may print it after the mapping is gone
    finally:
        second.arena.release()
    check_rank(arena, second.layout, llama_model.tensors, 4)
    again = STAGING_BUFFERS.take(1)
    assert again.data_ptr() == kept.data_ptr()  # the second load staged in it, and gave it back
    STAGING_BUFFERS.give_back(again)


def test_a_default_limit_s_staging_buffer_is_kept_however_much_is_staged() -> None:
    """Two slots of half the default --memory-limit, and the block they are aligned to, are within what the
    daemon keeps: otherwise every such load would fault in a fresh buffer."""
    blocks = [Block(i * (8 << 20), 1, 8 << 20, 0, (Target(0, 0, 8 << 20, 0, 8 << 20),)) for i in range(20)]
    slots = _staging_slots([_Staged(0, (block,)) for block in blocks], DEFAULT_STAGING_BYTES)
    assert len(slots) == 2 and staging_buffer_bytes(slots) <= STAGING_BUFFERS.keep_max


def test_the_largest_buffer_within_the_limit_is_kept_and_a_taken_one_is_nobody_elses() -> None:
    buffers = StagingBuffers(keep_max=1 << 20)
    small, large, huge = (torch.empty(n, dtype=torch.uint8) for n in (1 << 10, 1 << 20, 2 << 20))
    buffers.give_back(small)
    buffers.give_back(large)
    buffers.give_back(huge)  # over the limit: freed with the load, not kept
    buffers.give_back(small)  # smaller than the kept one
    assert buffers.take(0).numel() == 0  # a load that stages nothing leaves it
    assert buffers.take(1 << 20).data_ptr() == large.data_ptr()
    fresh = buffers.take(10)  # the kept one is taken: a second load gets its own
    assert fresh.numel() == 10 and fresh.data_ptr() != large.data_ptr()
    assert buffers.take(1).data_ptr() != large.data_ptr()
