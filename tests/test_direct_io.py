"""Local files read with O_DIRECT for host memory (weightd.daemon.plan.DIRECT_IO_BLOCK), as the streamer reads a
local checkpoint alone: no second copy of the model is left in the page cache, unless the file was mostly there
already. Checked with the real streamer on this machine's disk, by which of a file's pages are cached."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from runai_model_streamer import FileStreamer
from runai_model_streamer.libstreamer.libstreamer import runai_request, runai_response
from weightd.daemon import loader
from weightd.daemon.memory.host import HostMemory
from weightd.daemon.plan import DIRECT_IO_BLOCK
from weightd.daemon.storage.base import parse_model_uri
from weightd.daemon.storage.local import page_cache_share

from tests.conftest import Model, copy_model, run_client
from tests.test_staging import check_rank


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages stay cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def uncached_model(llama_model: Model, tmp_path: Path) -> Model:
    """A copy of the model whose shards are out of the page cache; skips where the filesystem keeps files in
    memory anyway (a tmpfs) or the streamer could not read them directly."""
    directory = copy_model(llama_model, tmp_path / "model")
    for shard in directory.glob("*.safetensors"):
        evict(shard)
    if max(page_cache_share(shard) for shard in directory.glob("*.safetensors")) > 0.01:
        pytest.skip("this filesystem keeps files in memory")
    return Model(directory, llama_model.tensors)


def shards_cached(model: Model) -> float:
    """The share of the model's shards' bytes in the page cache."""
    shards = list(model.directory.glob("*.safetensors"))
    sizes = [shard.stat().st_size for shard in shards]
    return sum(page_cache_share(shard) * size for shard, size in zip(shards, sizes, strict=True)) / sum(sizes)


def test_the_page_cache_share_of_a_file_follows_what_was_read(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(64 * 4096))
    evict(path)
    if page_cache_share(path) > 0.01:
        pytest.skip("this filesystem keeps files in memory")
    with path.open("rb") as f:
        f.seek(16 * 4096)
        f.read(16 * 4096)
    assert 0.25 <= page_cache_share(path) < 1  # what was read, and what the kernel read ahead
    path.read_bytes()
    assert page_cache_share(path) == 1


def test_a_local_file_mostly_in_the_page_cache_is_read_through_it_and_one_mostly_out_directly(
    uncached_model: Model, tmp_path: Path
) -> None:
    """Read from the page cache, a file loads at memory speed; read directly, it leaves no second copy there."""
    def plan_files() -> list[bool]:
        prepared = loader.prepare(parse_model_uri(str(uncached_model.directory)), cache_dir=tmp_path / "cache",
                                  tp_size=1, ranks=[0], rules=(), settings=loader.LoadSettings(memory_limit=4 << 20),
                                  host_only=True)
        return [f.direct_io for f in prepared.plan.files]

    assert all(plan_files())
    shards = sorted(uncached_model.directory.glob("*.safetensors"))
    shards[0].read_bytes()
    assert plan_files() == [False] + [True] * (len(shards) - 1)


def test_a_direct_read_of_a_range_that_starts_and_ends_inside_blocks_writes_only_the_range(tmp_path: Path) -> None:
    """What a file-congruent layout relies on: its first tensor begins inside a block, right after the previous
    file's last one, which the streamer's read of the block around it must leave alone (it reads such edges
    through a buffer of its own)."""
    data = os.urandom(3 * DIRECT_IO_BLOCK)
    path = tmp_path / "blob"
    path.write_bytes(data)
    evict(path)
    start, length = 1000, 2 * DIRECT_IO_BLOCK + 100  # inside the first block, to inside the third
    buffer = torch.full((5 * DIRECT_IO_BLOCK,), 0xAB, dtype=torch.uint8)
    base = -(-buffer.data_ptr() // DIRECT_IO_BLOCK) * DIRECT_IO_BLOCK - buffer.data_ptr()  # a block-aligned start
    with FileStreamer() as session:
        runai_request(session.streamer, [str(path)], [1], [start], [length], [buffer.data_ptr() + base + start])
        assert runai_response(session.streamer)[0] == 0
    inside = buffer[base + start : base + start + length]
    assert bytes(inside.numpy()) == data[start : start + length]
    assert bool((buffer[: base + start] == 0xAB).all()) and bool((buffer[base + start + length :] == 0xAB).all())
    assert page_cache_share(path) == 0  # read directly: nothing of the file went through the page cache


@pytest.mark.parametrize(("tp_size", "ranks", "group_arena"), [(1, [0], False), (4, [1], False),
                                                        (4, [0, 1, 2, 3], True), (2, [0, 1], False)])
def test_a_host_load_of_local_files_reads_them_directly_and_a_gpu_host_tier_through_the_page_cache(
    uncached_model: Model, shm: Path, tmp_path: Path, tp_size: int, ranks: list[int], group_arena: bool
) -> None:
    """The same load twice: for host memory (engines attach the arena) the shards stay out of the page cache,
    whatever the ranks (their slices read through the staging buffer); as a GPU's host tier (every tensor
    aligned for the device) its reads straight into the arena go through the page cache. Both hold every rank's
    tensors."""
    settings = loader.LoadSettings(memory_limit=4 << 20)
    memory = HostMemory(directory=shm, namespace="direct")
    for host_only in (True, False):
        if not host_only:
            group_arena = False  # a GPU's host tier is an arena per rank
        prepared = loader.prepare(parse_model_uri(str(uncached_model.directory)), cache_dir=tmp_path / "cache",
                                  tp_size=tp_size, ranks=ranks, rules=(), settings=settings, host_only=host_only,
                                  group_arena=group_arena)
        loaded = loader.stream(prepared, memory, settings=settings, on_progress=lambda n: None)
        try:
            arenas = {id(rank.arena): rank.arena.tensor().clone() for rank in loaded}
        finally:
            for rank in loaded:
                rank.arena.release()
        for rank in loaded:
            check_rank(arenas[id(rank.arena)], rank.layout, uncached_model.tensors, tp_size)
        if host_only:
            assert shards_cached(uncached_model) < 0.05, "read through the page cache"  # the header probes only
        else:  # the reads that land in the arena (its staged reads, placed to agree, may go directly)
            assert shards_cached(uncached_model) > 0.1
        for shard in uncached_model.directory.glob("*.safetensors"):
            evict(shard)


ATTACH_AND_HASH = r"""
import hashlib, json, sys
import torch
from weightd import client
model = client.attach(sys.argv[1], target=sys.argv[2], timeout=120)
print(json.dumps({n: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
                  for n, t in model.tensors.items()}))
"""


def test_the_daemon_loads_a_local_model_for_engines_without_filling_the_page_cache(
    daemon_factory, uncached_model: Model
) -> None:
    daemon = daemon_factory()
    hashes = run_client(ATTACH_AND_HASH, str(uncached_model.directory), daemon.target)
    want = {n: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for n, t in uncached_model.tensors.items()}
    assert hashes == want
    assert shards_cached(uncached_model) < 0.05  # what the daemon reads itself: each shard's header probe
