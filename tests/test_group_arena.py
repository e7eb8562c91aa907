"""All ranks of a tensor-parallel group loaded into host memory together share one arena (weightd.daemon.plan's
group arena): the registry counts it once in the budget, frees it with the last entry holding it, evicts it only
with all of them, and a restarted daemon adopts it once for every rank. Run on the real registry, host memory
and streamer, from a local directory."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import torch
from weightd.daemon import streaming
from weightd.daemon.errors import ModelInUseError, OutOfMemoryError
from weightd.daemon.loader import LoadSettings
from weightd.daemon.manifests import ManifestStore
from weightd.daemon.memory.host import HostMemory
from weightd.daemon.metrics import Metrics
from weightd.daemon.registry import Entry, EntryKey, Registry
from weightd.daemon.service import status_name
from weightd.daemon.synthetic import write_synthetic_model

from tests.test_gpu_paths import expected_slices, read_slot

TP_SIZE = 4
KV_HEADS = 2  # weightd.daemon.synthetic's


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict[str, torch.Tensor]]]:
    found = []
    for seed in range(2):
        directory = tmp_path_factory.mktemp(f"model{seed}")
        found.append((directory, write_synthetic_model(directory, total_bytes=4 << 20, shards=2, hidden=256,
                                                       seed=seed)))
    return found


def make_registry(shm: Path, cache: Path, *, host_budget: int = 1 << 30) -> Registry:
    return Registry(
        HostMemory(directory=shm, namespace="host"), host_budget=host_budget, manifests=ManifestStore(cache / "arenas"),
        cache_dir=cache, settings=LoadSettings(memory_limit=64 << 20), max_parallel_loads=2,
        metrics=Metrics(status_of=status_name),
    )


def with_registry(shm: Path, cache: Path, scenario: Callable[[Registry], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` against a fresh registry, closed after it (its arenas freed) whether it passes or not."""

    async def run() -> None:
        registry = make_registry(shm, cache)
        try:
            await scenario(registry)
        finally:
            await registry.close(keep_arenas=False, timeout=30)

    asyncio.run(run())


def group_keys(registry: Registry, directory: Path) -> list[EntryKey]:
    return [registry.key(str(directory), tp_size=TP_SIZE, rank=r, rules=()) for r in range(TP_SIZE)]


def check_values(entries: list[Entry], full: dict[str, torch.Tensor]) -> None:
    """Each rank's tensors are its slices; the synthetic model's 2 KV heads are shared by pairs of ranks."""
    for entry in entries:
        assert entry.layout is not None and entry.arena is not None
        rank = entry.key.rank
        want = expected_slices(full, dict(entry.layout.shards), rank, TP_SIZE)
        want |= expected_slices({n: t for n, t in full.items() if "k_proj" in n or "v_proj" in n},
                                dict(entry.layout.shards), rank // (TP_SIZE // KV_HEADS), KV_HEADS)
        arena = entry.arena.tensor()  # type: ignore[attr-defined]
        for slot in entry.layout.slots:
            assert torch.equal(read_slot(arena, slot), want[slot.name]), (slot.name, rank)


def test_a_group_shares_one_arena_counted_once_and_freed_with_its_last_entry(
    models: list[tuple[Path, dict[str, torch.Tensor]]], shm: Path, tmp_path: Path
) -> None:
    (directory, full), _ = models

    async def scenario(registry: Registry) -> None:
        entries = await registry.ensure(group_keys(registry, directory))
        arena = entries[0].arena
        assert arena is not None and all(e.arena is arena for e in entries)
        assert [p.name for p in shm.iterdir()] == [arena.name]
        check_values(entries, full)
        (usage,) = registry.memory_usage()
        assert usage.used_bytes == arena.size == sum(s.resident_bytes for s in registry.snapshot())
        assert sum(t.nbytes for t in full.values()) <= arena.size
        assert sorted(p.name for p in (tmp_path / "cache" / "arenas").iterdir()) == [
            f"{arena.name}.{rank}.json" for rank in range(TP_SIZE)
        ]

        # Rank 2 leased: evicting the model lets go of the other ranks, the arena stays for rank 2.
        lease = registry.acquire(entries[2])
        assert registry.evict(str(directory)) == (TP_SIZE - 1, 0)
        assert [s.key.rank for s in registry.snapshot()] == [2]
        assert registry.memory_usage()[0].used_bytes == arena.size == registry.snapshot()[0].resident_bytes
        assert [p.name for p in (tmp_path / "cache" / "arenas").iterdir()] == [f"{arena.name}.2.json"]
        check_values([entries[2]], full)
        with pytest.raises(ModelInUseError):
            registry.evict(str(directory))
        registry.release(lease)
        assert registry.evict(str(directory)) == (1, arena.size)
        assert registry.memory_usage()[0].used_bytes == 0 and list(shm.iterdir()) == []

    with_registry(shm, tmp_path / "cache", scenario)


def test_a_group_is_evicted_for_room_only_whole(
    models: list[tuple[Path, dict[str, torch.Tensor]]], shm: Path, tmp_path: Path
) -> None:
    (first, _), (second, full) = models

    async def scenario() -> None:
        probe = make_registry(shm, tmp_path / "probe")
        group_bytes = sum(e.arena.size for e in (await probe.ensure(group_keys(probe, first)))[:1])  # type: ignore[union-attr]
        await probe.close(keep_arenas=False, timeout=30)

        registry = make_registry(shm, tmp_path / "cache", host_budget=group_bytes * 3 // 2)
        entries = await registry.ensure(group_keys(registry, first))
        lease = registry.acquire(entries[1])
        # One leased rank keeps the whole arena: nothing can be evicted, and the error names the holder.
        with pytest.raises(OutOfMemoryError, match=r"rank 1 of 4.*1 lease"):
            await registry.ensure(group_keys(registry, second))
        assert len(registry.snapshot()) == TP_SIZE
        registry.release(lease)
        loaded = await registry.ensure(group_keys(registry, second))
        assert {s.key.model_uri for s in registry.snapshot()} == {loaded[0].key.model_uri}  # every rank went
        assert [p.name for p in shm.iterdir()] == [loaded[0].arena.name]  # type: ignore[union-attr]
        check_values(loaded, full)
        await registry.close(keep_arenas=False, timeout=30)

    asyncio.run(scenario())


def test_a_restarted_registry_adopts_a_group_arena_once_for_every_rank(
    models: list[tuple[Path, dict[str, torch.Tensor]]], shm: Path, tmp_path: Path
) -> None:
    (directory, full), _ = models

    async def scenario() -> None:
        first = make_registry(shm, tmp_path / "cache")
        name = (await first.ensure(group_keys(first, directory)))[0].arena.name  # type: ignore[union-attr]
        await first.close(keep_arenas=True, timeout=30)
        assert [p.name for p in shm.iterdir()] == [name]

        second = make_registry(shm, tmp_path / "cache")
        second.adopt()
        entries = await second.ensure(group_keys(second, directory))
        assert all(e.arena is entries[0].arena for e in entries) and entries[0].arena.name == name  # type: ignore[union-attr]
        assert sum(e.storage_bytes_read for e in entries) == sum(t.nbytes for t in full.values())  # the first load's
        check_values(entries, full)
        await second.close(keep_arenas=False, timeout=30)
        assert list(shm.iterdir()) == [] and list((tmp_path / "cache" / "arenas").iterdir()) == []

    asyncio.run(scenario())


def test_a_group_arena_filled_by_a_streaming_helper(
    models: list[tuple[Path, dict[str, torch.Tensor]]], shm: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A load with a concurrency of its own streams in a helper process, which rearranges the group arena too."""
    (directory, full), _ = models
    caplog.set_level(logging.INFO, logger="weightd.daemon.loader")

    async def scenario(registry: Registry) -> None:
        settings = LoadSettings(memory_limit=64 << 20, concurrency=3)
        entries = await registry.ensure(group_keys(registry, directory), settings=settings)
        check_values(entries, full)

    with_registry(shm, tmp_path / "cache", scenario)
    assert "concurrency 3 in a helper" in caplog.text


def test_a_changed_group_is_loaded_beside_the_old_one_which_a_leased_rank_keeps(
    models: list[tuple[Path, dict[str, torch.Tensor]]], shm: Path, tmp_path: Path
) -> None:
    """A new revision retires a group: its unleased ranks go at once, while the arena stays for the leased rank
    (retired) and is freed when that lease ends; the new revision loads into an arena of its own."""
    (source, full), _ = models
    directory = tmp_path / "model"
    shutil.copytree(source, directory)

    async def scenario(registry: Registry) -> None:
        keys = group_keys(registry, directory)
        old = await registry.ensure(keys)
        lease = registry.acquire(old[1])
        config = directory / "config.json"
        config.write_text(config.read_text() + " ")  # a new revision
        new = await registry.ensure(keys, revalidate_after=0)
        assert old[0].arena is None and old[1].arena is not None and new[0].arena is not old[1].arena
        assert all(e.arena is new[0].arena for e in new)
        check_values(new, full)
        check_values([old[1]], full)  # the leased rank still reads its tensors
        current = sorted((s.key.rank, s.current) for s in registry.snapshot())
        assert current == sorted([*((r, True) for r in range(TP_SIZE)), (1, False)])
        (usage,) = registry.memory_usage()
        assert usage.used_bytes == old[1].arena.size + new[0].arena.size  # type: ignore[union-attr]
        registry.release(lease)
        assert old[1].arena is None and registry.memory_usage()[0].used_bytes == new[0].arena.size  # type: ignore[union-attr]
        assert [p.name for p in shm.iterdir()] == [new[0].arena.name]  # type: ignore[union-attr]

    with_registry(shm, tmp_path / "cache", scenario)


def test_the_rest_of_a_group_whose_rank_is_resident_loads_in_an_arena_each(
    models: list[tuple[Path, dict[str, torch.Tensor]]], shm: Path, tmp_path: Path
) -> None:
    """Rank 1 attached alone first: loading the group then loads ranks 0, 2 and 3 (not adjacent), an arena each."""
    (directory, full), _ = models

    async def scenario(registry: Registry) -> None:
        keys = group_keys(registry, directory)
        (lone,) = await registry.ensure([keys[1]])
        entries = await registry.ensure(keys)
        assert entries[1] is lone and len({id(e.arena) for e in entries}) == TP_SIZE
        check_values(entries, full)

    with_registry(shm, tmp_path / "cache", scenario)


def test_loads_stream_their_direct_ranges_a_window_at_a_time(
    models: list[tuple[Path, dict[str, torch.Tensor]]], shm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows far smaller than the model (about 60 of them) still land every byte, for a group and for one rank
    alone."""
    (directory, full), _ = models
    monkeypatch.setattr(streaming, "DIRECT_WINDOW_BYTES", 64 << 10)

    async def scenario(registry: Registry) -> None:
        check_values(await registry.ensure(group_keys(registry, directory)), full)
        whole = registry.key(str(directory), tp_size=1, rank=0, rules=())
        (entry,) = await registry.ensure([whole])
        assert entry.layout is not None and entry.arena is not None
        for slot in entry.layout.slots:
            assert torch.equal(read_slot(entry.arena.tensor(), slot), full[slot.name])  # type: ignore[attr-defined]

    with_registry(shm, tmp_path / "cache", scenario)
