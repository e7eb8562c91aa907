"""Issue [2/5] on a machine without a GPU: everything about GPU memory that is not CUDA itself.

The CUDA calls are tested for real only in tests/gpu/. Here run for real: GPU UUID mapping; the copy schedule
(the loader's fill events, merged and copied on in order, leave every tensor's final bytes on the "device");
the registry's GPU paths (cold load with its host tier, refill from the host tier with no storage reads,
``--host-tier drop``, a budget and LRU per GPU); and the errors a daemon or client without CUDA gives.

``HostBackedGpu`` stands in for a GPU behind the ``DeviceBackend`` seam: its "device memory" is host memory and
its asynchronous copies are synchronous, which keeps the one property the mirror relies on (copies land in the
order they are queued).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

import grpc
import pytest
import torch
from weightd import client
from weightd.daemon import loader
from weightd.daemon.devices import GpuDevice, canonical_uuid, pick
from weightd.daemon.errors import (
    DeviceError,
    InvalidRequestError,
    MemoryUnavailableError,
    OutOfMemoryError,
    WeightdError,
)
from weightd.daemon.loader import LoadSettings
from weightd.daemon.manifests import ManifestStore
from weightd.daemon.memory.base import CUDA, ArenaHandle, FillableArena
from weightd.daemon.memory.host import HostArena, HostMemory, populate
from weightd.daemon.metrics import Metrics
from weightd.daemon.mirror import CopyCoalescer, DeviceMirror
from weightd.daemon.registry import Registry
from weightd.daemon.service import status_name
from weightd.daemon.sharding import ShardRule
from weightd.daemon.storage.base import PrefixedObjects, parse_model_uri
from weightd.daemon.streaming import _duplicates_by_source, _requests
from weightd.daemon.synthetic import write_synthetic_model
from weightd.v1 import weightd_pb2 as pb
from weightd.v1 import weightd_pb2_grpc as pb_grpc

GPU0 = GpuDevice("GPU-00000000-1111-2222-3333-444444444444", 0, "test GPU 0", 64 << 20)
GPU1 = GpuDevice("GPU-55555555-6666-7777-8888-999999999999", 1, "test GPU 1", 64 << 20)


class HostBackedArena:
    """A "device" arena in host memory; copies land at once (so, in order)."""

    kind = CUDA

    def __init__(self, host: HostArena, device: GpuDevice, log: list[tuple[int, int]]) -> None:
        self.host = host
        self._device = device
        self.copies = log
        self.copy_failure: BaseException | None = None

    name = property(lambda self: self.host.name)
    size = property(lambda self: self.host.size)
    device_uuid = property(lambda self: self._device.uuid)

    def handle(self) -> ArenaHandle:
        return ArenaHandle("cuda_vmm", self.size, device_uuid=self.device_uuid)

    def export(self) -> int:
        return self.host.export()

    def copy_from(self, source: FillableArena, offset: int, length: int, *, source_offset: int | None = None) -> None:
        if self.copy_failure is not None:
            raise self.copy_failure
        start = offset if source_offset is None else source_offset
        self.copies.append((offset, length))
        self.host.tensor()[offset : offset + length] = source.tensor()[start : start + length]

    def finish_copies(self) -> None:
        pass

    def release(self) -> None:
        self.host.release()

    def detach(self) -> None:
        self.host.release()


class HostBackedGpu:
    kind = CUDA

    def __init__(self, device: GpuDevice, directory: Path, pinned: set[str]) -> None:
        self.device = device
        self._host = HostMemory(directory=directory, namespace=f"gpu{device.ordinal}")
        self.pinned = pinned  # shared by every GPU, as CUDA's (portable) host registrations are
        self.copies: list[tuple[int, int]] = []
        self.pin_seconds = 0.0
        self.pin_failure: BaseException | None = None
        self.filled_when_pinned: dict[str, tuple[bool, int]] = {}  # arena -> (any byte filled, copies made)

    @property
    def device_uuid(self) -> str:
        return self.device.uuid

    def capacity(self) -> int:
        return self.device.total_bytes

    def allocate(self, size: int, *, label: str) -> HostBackedArena:
        return HostBackedArena(self._host.allocate(size, label=label), self.device, self.copies)

    def adopt(self, name: str, size: int) -> HostBackedArena:
        raise AssertionError("GPU arenas are never adopted")

    def remove_orphans(self, keep: Collection[str]) -> list[str]:
        return []

    def pin(self, source: FillableArena) -> None:
        time.sleep(self.pin_seconds)  # what page-locking a fresh arena takes, while the streamer fills it
        if self.pin_failure is not None:
            raise self.pin_failure
        self.filled_when_pinned[source.name] = (bool(source.tensor().any()), len(self.copies))
        self.pinned.add(source.name)

    def unpin(self, source: FillableArena) -> None:
        self.pinned.discard(source.name)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path_factory.mktemp("small")
    tensors = write_synthetic_model(directory, total_bytes=6 << 20, shards=2, dtypes=("bf16", "fp32"), hidden=256)
    return directory, tensors


def expected_slices(full: dict[str, torch.Tensor], layout_shards: dict[str, int | None], rank: int,
                    tp_size: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in full.items():
        dim = layout_shards.get(name)
        if dim is None or tp_size == 1:
            out[name] = tensor
        else:
            size = tensor.shape[dim] // tp_size
            out[name] = tensor.narrow(dim, rank * size, size)
    return out


def read_slot(arena: torch.Tensor, slot) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from weightd.client._mapping import TORCH_DTYPES

    dtype = TORCH_DTYPES[pb.DataType.Value(f"DATA_TYPE_{slot.dtype}")]
    return arena[slot.offset : slot.offset + slot.nbytes].view(dtype).reshape(slot.shape)


# --- UUIDs -------------------------------------------------------------------------------------------------


def test_gpu_uuids_in_any_spelling_map_to_the_daemons_device() -> None:
    body = "5b6b5a1e-0c2d-4e5f-8a9b-0c1d2e3f4a5b"
    for spelling in (f"GPU-{body}", body.upper(), f"gpu-{body}", body.replace("-", "")):
        assert canonical_uuid(spelling) == f"GPU-{body}"
    assert pick([GPU0, GPU1], GPU1.uuid.lower().removeprefix("gpu-"), unavailable="") is GPU1
    with pytest.raises(InvalidRequestError, match="not a GPU UUID"):
        canonical_uuid("cuda:0")
    with pytest.raises(InvalidRequestError, match=f"the daemon sees {GPU0.uuid} \\(test GPU 0\\), {GPU1.uuid}"):
        pick([GPU0, GPU1], f"GPU-{body}", unavailable="")
    with pytest.raises(MemoryUnavailableError, match="host memory only: no driver here; attach with device='cpu'"):
        pick([], GPU0.uuid, unavailable="no driver here")


# --- copy schedule -----------------------------------------------------------------------------------------


def test_coalescer_merges_neighbours_and_padding_and_emits_each_region_after_it_filled() -> None:
    emitted: list[tuple[int, int, int]] = []
    coalescer = CopyCoalescer(2, lambda *region: emitted.append(region), min_copy_bytes=1000)
    coalescer.filled(0, 0, 100)
    coalescer.filled(0, 256, 100)  # the next tensor, after alignment padding: merged -> [0, 356)
    coalescer.filled(1, 0, 10)  # another layout: never merged with layout 0
    coalescer.filled(0, 456, 50)  # not adjacent yet: a run of its own
    coalescer.filled(0, 356, 100)  # fills the gap: [0, 356) + [356, 456) + [456, 506)
    assert emitted == []
    coalescer.filled(0, 512, 600)  # after padding again: [0, 1112) reaches 1000 bytes
    assert emitted == [(0, 0, 1112)]
    coalescer.flush()
    assert emitted == [(0, 0, 1112), (1, 0, 10)]
    coalescer.flush()  # nothing is emitted twice
    assert len(emitted) == 2


def test_populate_faults_in_a_fresh_arena_before_it_is_pinned(shm: Path) -> None:
    """What the CUDA backend does before page-locking a host arena: every page present (zeroed) afterwards,
    across several 64 MiB pieces and a partial last page; doing it again adds nothing. (An arena reserved with
    posix_fallocate, as on a huge-page tmpfs or after adoption: its pages exist but are not mapped yet.)"""

    def resident_shared() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssShmem:"))) * 1024

    arena = HostArena(shm / "fresh", (150 << 20) + 100, create=True)
    try:
        before = resident_shared()
        assert populate(arena.tensor())
        grown = resident_shared() - before
        assert arena.size <= grown <= arena.size + (1 << 20), grown
        assert populate(arena.tensor()) and resident_shared() - before == grown
        assert not bool(arena.tensor().any())
    finally:
        arena.release()


# Only the MLP is split: attention and embeddings are replicated, each read once and copied as it lands.
MLP_ONLY = (ShardRule(r"mlp\.down_proj", 1), ShardRule(r"mlp\.(gate|up)_proj", 0))


@pytest.mark.parametrize("concurrency", [None, 3], ids=["in-process", "helper-process"])
@pytest.mark.parametrize("min_copy_bytes", [1, 8 << 20], ids=["every-region", "merged"])
@pytest.mark.parametrize("rules", [(), MLP_ONLY], ids=["default-plan", "mlp-only"])
@pytest.mark.parametrize("object_store_costs", [False, True], ids=["local-reads", "object-store-reads"])
def test_a_mirrored_load_leaves_every_tensor_on_the_device(
    small_model: tuple[Path, dict[str, torch.Tensor]], shm: Path, tmp_path: Path, concurrency: int | None,
    min_copy_bytes: int, rules: tuple[ShardRule, ...], object_store_costs: bool,
) -> None:
    """An all-ranks TP=2 load (direct ranges, scattered dim-1 slices, replicated tensors copied in memory),
    ranges capped at 1 MiB so large tensors land in pieces: every slot's bytes reach its rank's device arena.
    With an object store's costs, small reads are staged and joined (several blocks to one read), and each
    block's regions are reported once it has been copied out."""
    directory, full = small_model
    settings = LoadSettings(memory_limit=4 << 20, concurrency=concurrency)
    prepared = loader.prepare(parse_model_uri(str(directory)), cache_dir=tmp_path, tp_size=2, ranks=[0, 1],
                              rules=rules, settings=settings)
    if object_store_costs:  # this load's store object only: the local files read as an object store's would be
        prepared.store.min_separate_read_bytes = PrefixedObjects.min_separate_read_bytes
        prepared.store.read_through_gap_bytes = PrefixedObjects.read_through_gap_bytes
        _, staged, _ = _requests(prepared.plan, direct_piece_min=prepared.store.min_separate_read_bytes,
                                 read_through_gap=prepared.store.read_through_gap_bytes)
        assert any(len(item.blocks) > 1 for item in staged)
    elif rules:  # the replicas are copied beside the stream, as their source ranges land
        direct, _, duplicates = _requests(prepared.plan, direct_piece_min=prepared.store.min_separate_read_bytes,
                                           read_through_gap=prepared.store.read_through_gap_bytes)
        copied_on_landing, copied_at_end = _duplicates_by_source(direct, duplicates)
        assert sum(map(len, copied_on_landing)) == len(duplicates) > 0 and not copied_at_end
    pinned: set[str] = set()
    gpus = [HostBackedGpu(GPU0, shm, pinned), HostBackedGpu(GPU1, shm, pinned)]
    targets = [gpu.allocate(layout.size, label=f"r{layout.rank}") for gpu, layout in
               zip(gpus, prepared.plan.layouts, strict=True)]
    mirror = DeviceMirror(targets, gpus, min_copy_bytes=min_copy_bytes)
    loaded = loader.stream(prepared, HostMemory(directory=shm, namespace="host"), settings=settings,
                           on_progress=lambda n: None, listener=mirror)
    try:
        for rank, (layout, target, gpu) in enumerate(zip(prepared.plan.layouts, targets, gpus, strict=True)):
            expected = expected_slices(full, dict(layout.shards), rank, 2)
            for slot in layout.slots:
                assert torch.equal(read_slot(target.host.tensor(), slot), expected[slot.name]), slot.name
            assert loaded[rank].arena.name in gpu.pinned  # pinned while resident (the host tier)
            if min_copy_bytes > 1:
                assert len(gpu.copies) < len(layout.slots) / 4  # small tensors' regions were merged
    finally:
        for rank_loaded, target in zip(loaded, targets, strict=True):
            rank_loaded.arena.release()
            target.release()


def test_a_failed_mirrored_load_waits_for_its_copies_and_unpins(
    shm: Path, tmp_path: Path, small_model: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    directory = Path(shutil.copytree(small_model[0], tmp_path / "model"))
    settings = LoadSettings(memory_limit=4 << 20)
    prepared = loader.prepare(parse_model_uri(str(directory)), cache_dir=tmp_path / "cache", tp_size=1, ranks=[0],
                              rules=(), settings=settings)
    gpu = HostBackedGpu(GPU0, shm, set())
    target = gpu.allocate(prepared.plan.layouts[0].size, label="r0")
    mirror = DeviceMirror([target], [gpu])
    for shard in directory.glob("*.safetensors"):
        os.truncate(shard, 1000)  # after the headers were read: streaming fails once the listener started
    try:
        with pytest.raises(WeightdError):
            loader.stream(prepared, HostMemory(directory=shm, namespace="host"), settings=settings,
                          on_progress=lambda n: None, listener=mirror)
        assert gpu.pinned == set()
        assert [p.name for p in shm.iterdir()] == [target.name]  # the host arena is gone
    finally:
        target.release()


def test_pinning_runs_beside_the_streamer_and_copies_wait_for_it(
    shm: Path, tmp_path: Path, small_model: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    directory, full = small_model
    settings = LoadSettings(memory_limit=4 << 20)
    prepared = loader.prepare(parse_model_uri(str(directory)), cache_dir=tmp_path, tp_size=1, ranks=[0], rules=(),
                              settings=settings)
    gpu = HostBackedGpu(GPU0, shm, set())
    gpu.pin_seconds = 1.0
    target = gpu.allocate(prepared.plan.layouts[0].size, label="r0")
    (loaded,) = loader.stream(prepared, HostMemory(directory=shm, namespace="host"), settings=settings,
                              on_progress=lambda n: None, listener=DeviceMirror([target], [gpu], min_copy_bytes=1))
    try:
        assert gpu.filled_when_pinned == {loaded.arena.name: (True, 0)}  # bytes landed meanwhile; none copied
        for slot in prepared.plan.layouts[0].slots:
            assert torch.equal(read_slot(target.host.tensor(), slot), full[slot.name]), slot.name
    finally:
        loaded.arena.release()
        target.release()


@pytest.mark.parametrize("failing", ["pin", "waiting copy"])
def test_a_failed_pin_or_queued_copy_fails_the_load_and_leaves_nothing_pinned(
    shm: Path, tmp_path: Path, small_model: tuple[Path, dict[str, torch.Tensor]], failing: str
) -> None:
    settings = LoadSettings(memory_limit=4 << 20)
    prepared = loader.prepare(parse_model_uri(str(small_model[0])), cache_dir=tmp_path, tp_size=2, ranks=[0, 1],
                              rules=(), settings=settings)
    pinned: set[str] = set()
    gpus = [HostBackedGpu(GPU0, shm, pinned), HostBackedGpu(GPU1, shm, pinned)]
    targets = [gpu.allocate(layout.size, label=f"r{layout.rank}") for gpu, layout in
               zip(gpus, prepared.plan.layouts, strict=True)]
    if failing == "pin":
        failure: WeightdError = OutOfMemoryError("cuMemHostRegister of host arena x failed: CUDA_ERROR_OUT_OF_MEMORY")
        gpus[1].pin_failure = failure
    else:  # a copy queued while the pin ran, issued by the pinning thread
        failure = DeviceError("cuMemcpyHtoDAsync into x failed: CUDA_ERROR_INVALID_VALUE")
        gpus[1].pin_seconds = 1.0
        targets[0].copy_failure = failure
    try:
        with pytest.raises(type(failure), match=str(failure).split(" ", 1)[0]) as raised:
            loader.stream(prepared, HostMemory(directory=shm, namespace="host"), settings=settings,
                          on_progress=lambda n: None, listener=DeviceMirror(targets, gpus, min_copy_bytes=1))
        assert pinned == set()  # rank 0's pin was undone
        if failing == "pin":
            assert gpus[0].copies == gpus[1].copies == []
        else:
            assert any(entry.name == "_pin_sources" for entry in raised.traceback)  # issued by the pinning thread
        assert sorted(p.name for p in shm.iterdir()) == sorted(t.name for t in targets)  # host arenas gone
    finally:
        for target in targets:
            target.release()


# --- the registry's GPU paths ----------------------------------------------------------------------------


def make_registry(shm: Path, cache: Path, *, gpu_budget: int, keep_host_tier: bool = True,
                  host_budget: int = 1 << 30) -> tuple[Registry, list[HostBackedGpu]]:
    pinned: set[str] = set()
    gpus = [HostBackedGpu(GPU0, shm, pinned), HostBackedGpu(GPU1, shm, pinned)]
    registry = Registry(
        HostMemory(directory=shm, namespace="host"), host_budget=host_budget,
        gpus=[(gpu, gpu_budget) for gpu in gpus], keep_host_tier=keep_host_tier,
        manifests=ManifestStore(cache / "arenas"), cache_dir=cache, settings=LoadSettings(memory_limit=64 << 20),
        max_parallel_loads=2, metrics=Metrics(status_of=status_name),
    )
    return registry, gpus


def test_registry_gpu_entries_fill_from_the_host_tier(
    small_model: tuple[Path, dict[str, torch.Tensor]], shm: Path, tmp_path: Path
) -> None:
    directory, full = small_model
    model_bytes = sum(t.nbytes for t in full.values())

    async def scenario() -> None:
        registry, gpus = make_registry(shm, tmp_path / "cache", gpu_budget=model_bytes + (1 << 20))
        key = registry.key(str(directory), tp_size=1, rank=0, rules=(), device_uuid=GPU0.uuid.upper())
        (entry,) = await registry.ensure([key])
        assert entry.arena is not None and entry.arena.kind == CUDA and entry.storage_bytes_read == model_bytes
        assert {(s.memory_kind, s.key.device) for s in registry.snapshot()} == {("cuda", GPU0.uuid), ("host", "")}
        layout = entry.layout
        assert layout is not None
        for slot in layout.slots:
            assert torch.equal(read_slot(entry.arena.host.tensor(), slot), full[slot.name])  # type: ignore[attr-defined]
        usage = {u.device_uuid: u for u in registry.memory_usage()}
        assert usage[GPU0.uuid].used_bytes == layout.size == usage[""].used_bytes and usage[GPU1.uuid].used_bytes == 0

        # Evicted from the GPU (by the budget, below), or asked for on another GPU: one copy from the host
        # tier, no storage reads.
        key1 = registry.key(str(directory), tp_size=1, rank=0, rules=(), device_uuid=GPU1.uuid)
        (other,) = await registry.ensure([key1])
        assert other.storage_bytes_read == 0
        assert len(gpus[1].copies) == 1  # the whole arena in one copy
        assert gpus[1].pinned  # the host tier stays pinned for the next copy

        # A second model does not fit GPU 0's budget beside the first: the unleased one is evicted from GPU 0 only.
        lease = registry.acquire(other)
        second = tmp_path / "second"
        write_synthetic_model(second, total_bytes=6 << 20, shards=1, hidden=256, seed=1)
        key2 = registry.key(str(second), tp_size=1, rank=0, rules=(), device_uuid=GPU0.uuid)
        await registry.ensure([key2])
        devices = sorted((s.key.model_uri.rsplit("/", 1)[-1], s.key.device) for s in registry.snapshot())
        assert devices == sorted([(directory.name, ""), (directory.name, GPU1.uuid), ("second", ""),
                                  ("second", GPU0.uuid)])
        # On GPU 1 the leased entry leaves no room: RESOURCE_EXHAUSTED naming the GPU's budget and the holder.
        with pytest.raises(OutOfMemoryError, match=f"of GPU {GPU1.uuid} memory.*--gpu-memory-limit.*1 lease"):
            await registry.ensure([registry.key(str(second), tp_size=1, rank=0, rules=(), device_uuid=GPU1.uuid)])
        # The first model, evicted from GPU 0, comes back from its host tier.
        (again,) = await registry.ensure([key])
        assert again is not entry and again.storage_bytes_read == 0
        registry.release(lease)
        await registry.close(keep_arenas=False, timeout=30)
        assert gpus[0].pinned == set()  # every host arena unpinned before it was unmapped

    asyncio.run(scenario())


def test_gpu_entries_fill_from_a_group_arena_host_tier_rearranged(
    small_model: tuple[Path, dict[str, torch.Tensor]], shm: Path, tmp_path: Path
) -> None:
    """All ranks loaded into host memory share a group arena; the same ranks asked for on GPUs get arenas of their
    own, laid out as a cold GPU load lays them out, filled from the group arena by a copy per run of slots, with
    no storage reads."""
    directory, full = small_model

    async def scenario() -> None:
        registry, gpus = make_registry(shm, tmp_path / "cache", gpu_budget=1 << 30)
        host_keys = [registry.key(str(directory), tp_size=2, rank=r, rules=()) for r in range(2)]
        hosted = await registry.ensure(host_keys)
        assert hosted[0].arena is hosted[1].arena is not None
        keys = [registry.key(str(directory), tp_size=2, rank=r, rules=(), device_uuid=g.device.uuid)
                for r, g in enumerate(gpus)]
        entries = await registry.ensure(keys)
        prepared = loader.prepare(parse_model_uri(str(directory)), cache_dir=tmp_path / "cache", tp_size=2,
                                  ranks=[0, 1], rules=(), settings=LoadSettings(memory_limit=64 << 20))
        for entry, gpu, cold in zip(entries, gpus, prepared.plan.layouts, strict=True):
            layout = entry.layout
            assert layout is not None and entry.storage_bytes_read == 0 and entry.arena is not None
            assert layout.slots == cold.slots and entry.arena.size == cold.size  # as a cold GPU load's
            want = expected_slices(full, dict(layout.shards), layout.rank, 2)
            for slot in layout.slots:
                got = read_slot(entry.arena.host.tensor(), slot)  # type: ignore[attr-defined]
                assert torch.equal(got, want[slot.name]), (slot.name, layout.rank)
            assert 0 < len(gpu.copies) < len(layout.slots)  # runs of slots back to back in both arenas: merged
        assert {hosted[0].arena.name} <= gpus[0].pinned  # type: ignore[union-attr]
        await registry.close(keep_arenas=False, timeout=30)
        assert gpus[0].pinned == set()

    asyncio.run(scenario())


def test_host_tier_drop_frees_the_host_copy_after_a_gpu_load(
    small_model: tuple[Path, dict[str, torch.Tensor]], shm: Path, tmp_path: Path
) -> None:
    directory, _ = small_model

    async def scenario() -> None:
        registry, gpus = make_registry(shm, tmp_path / "cache", gpu_budget=1 << 30, keep_host_tier=False)
        keys = [registry.key(str(directory), tp_size=2, rank=r, rules=(), device_uuid=g.device.uuid)
                for r, g in enumerate(gpus)]
        entries = await registry.ensure(keys)
        assert [e.key.device for e in entries] == [GPU0.uuid, GPU1.uuid]
        assert [s.key.device for s in registry.snapshot()] == [GPU0.uuid, GPU1.uuid]
        assert {u.device_uuid: u.used_bytes for u in registry.memory_usage()}[""] == 0
        assert gpus[0].pinned == gpus[1].pinned == set() and not list((tmp_path / "cache" / "arenas").glob("*"))
        await registry.close(keep_arenas=False, timeout=30)

    asyncio.run(scenario())


# --- a daemon and a client without CUDA -----------------------------------------------------------------


def test_a_daemon_without_cuda_refuses_gpu_memory_and_keeps_serving(
    daemon_factory, small_model: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    directory, full = small_model
    for memory, reason in (("auto", "pip install 'weightd\\[cuda12\\]'"), ("host", "started with --memory host")):
        daemon = daemon_factory(name=memory, extra_args=("--memory", memory))
        with grpc.insecure_channel(daemon.target) as channel:
            stub = pb_grpc.WeightServiceStub(channel)
            selector = pb.ModelSelector(model_uri=str(directory), device_uuid=GPU0.uuid)
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.AttachModel(pb.AttachModelRequest(model=selector)))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"{GPU0.uuid} asked for GPU memory, but this daemon serves host memory only" in str(
                refused.value.details())
            assert re.search(reason, refused.value.details())
            bad = pb.ModelSelector(model_uri=str(directory), device_uuid="cuda:0")
            with pytest.raises(grpc.RpcError) as malformed:
                next(stub.AttachModel(pb.AttachModelRequest(model=bad)))
            assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as uneven:
                list(stub.LoadModel(pb.LoadModelRequest(model=pb.ModelSelector(model_uri=str(directory), tp_size=2),
                                                        all_ranks=True, rank_device_uuids=[GPU0.uuid])))
            assert uneven.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "one GPU per rank" in str(
                uneven.value.details())
        with client.attach(str(directory), target=daemon.target, device="cpu") as model:  # still serving
            assert model.device == torch.device("cpu") and torch.equal(model.tensors[next(iter(full))],
                                                                        full[next(iter(full))])
    # CUDA modules are imported only for GPU memory.
    assert not any(name == "cupy" or name.startswith("cuda.") for name in sys.modules)


def test_serve_memory_cuda_without_cuda_names_what_is_missing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "weightd.daemon", "serve", "--socket", str(tmp_path / "w.sock"),
         "--cache-dir", str(tmp_path / "cache"), "--memory", "cuda"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "--memory cuda: the CUDA driver bindings are not installed" in result.stderr
    assert "pip install 'weightd[cuda12]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_client_without_cuda_says_so(small_model: tuple[Path, dict[str, torch.Tensor]]) -> None:
    assert not torch.cuda.is_available()
    with pytest.raises(client.PreconditionFailedError, match="CUDA is not available in this process"):
        client.attach("/nowhere", device="cuda:0", target="unix:///nowhere.sock")
    with pytest.raises(client.InvalidRequestError, match=r"serves host memory .*'cpu'.* or CUDA memory"):
        client.attach("/nowhere", device="meta", target="unix:///nowhere.sock")
    with pytest.raises(client.InvalidRequestError, match="this process's torch device"):
        client.attach("/nowhere", device=GPU0.uuid, target="unix:///nowhere.sock")

