"""The WeightService servicer: protobuf <-> domain types, and the one map from errors to gRPC status codes."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from weightd.daemon import errors
from weightd.daemon.descriptors import Exportable, SealedBytes
from weightd.daemon.loader import LoadSettings
from weightd.daemon.memory.base import CUDA, HOST, ArenaHandle
from weightd.daemon.metrics import Metrics
from weightd.daemon.placement import Fusion
from weightd.daemon.registry import Entry, EntryKey, Registry, State, all_rank_keys
from weightd.daemon.sharding import ShardRule
from weightd.v1 import weightd_pb2 as pb
from weightd.v1 import weightd_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WeightService"].full_name
logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[errors.WeightdError], grpc.StatusCode] = {
    errors.ConfigurationError: grpc.StatusCode.FAILED_PRECONDITION,  # raised at start, not by requests
    errors.InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AccessDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.StorageUnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.ShuttingDownError: grpc.StatusCode.UNAVAILABLE,
    errors.InvalidModelError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.CorruptModelError: grpc.StatusCode.DATA_LOSS,
    errors.UnsupportedModelError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ModelInUseError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfMemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.MemoryUnavailableError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DeviceError: grpc.StatusCode.INTERNAL,
}

_STATE_TO_PB = {
    State.LOADING_METADATA: pb.MODEL_STATE_LOADING_METADATA,
    State.LOADING_WEIGHTS: pb.MODEL_STATE_LOADING_WEIGHTS,
    State.READY: pb.MODEL_STATE_READY,
}

_MEMORY_KIND_TO_PB = {HOST: pb.MEMORY_KIND_HOST, CUDA: pb.MEMORY_KIND_CUDA}

PROGRESS_INTERVAL_S = 0.25
# A grant's tensor table of this many serialized bytes or more reaches the client as a descriptor
# (SharedTensorTable). A new client waited 20-30 ms for gRPC to carry a 100k-tensor table (4.7 MB).
SHARED_TABLE_MIN_BYTES = 64 << 10


def status_for(error_type: type[errors.WeightdError]) -> grpc.StatusCode:
    """The status of the nearest class in ``error_type``'s ancestry that has one: a new subclass inherits its
    parent's status instead of falling through to INTERNAL."""
    return next((STATUS_BY_ERROR[c] for c in error_type.__mro__ if c in STATUS_BY_ERROR), grpc.StatusCode.INTERNAL)


def status_name(error: BaseException) -> str:
    """The name of the gRPC status a caller gets for ``error`` (for metrics labels)."""
    if isinstance(error, errors.WeightdError):
        return status_for(type(error)).name
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "INTERNAL"


async def abort_with(context: grpc.aio.ServicerContext[object, object], error: Exception) -> NoReturn:
    if isinstance(error, errors.WeightdError):
        await context.abort(status_for(type(error)), str(error))
    logger.exception("unexpected error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in weightd: {type(error).__name__}: {error}")


def _rule_to_pb(rule: ShardRule) -> pb.ShardRule:
    if rule.split_dim is None:
        return pb.ShardRule(pattern=rule.pattern, replicate=True)
    return pb.ShardRule(pattern=rule.pattern, split_dim=rule.split_dim, pad_multiple=rule.pad_multiple,
                        heads=rule.heads)


def _rules(selector: pb.ModelSelector) -> list[ShardRule]:
    return [
        ShardRule(r.pattern, None if r.WhichOneof("action") == "replicate" else r.split_dim, r.pad_multiple or 1,
                  r.heads)
        for r in selector.shard_rules
    ]


def _key(registry: Registry, selector: pb.ModelSelector) -> EntryKey:
    return registry.key(selector.model_uri, tp_size=selector.tp_size or 1, rank=selector.rank,
                        rules=_rules(selector), device_uuid=selector.device_uuid,
                        fusions=[Fusion(f.fused, tuple(f.parts)) for f in selector.fusions])


def _group_keys(registry: Registry, request: pb.LoadModelRequest) -> list[EntryKey]:
    """The entries a LoadModel fills: one rank, or every rank (each on its own GPU when the request says so)."""
    key = _key(registry, request.model)
    if not request.all_ranks:
        if request.rank_device_uuids:
            raise errors.InvalidRequestError("rank_device_uuids needs all_ranks; set model.device_uuid instead")
        return [key]
    keys = all_rank_keys(key)
    if not request.rank_device_uuids:
        return keys
    if len(request.rank_device_uuids) != key.tp_size:
        raise errors.InvalidRequestError(
            f"rank_device_uuids has {len(request.rank_device_uuids)} entries; give one GPU per rank ({key.tp_size})"
        )
    if not all(request.rank_device_uuids):
        raise errors.InvalidRequestError("rank_device_uuids: every rank needs a GPU UUID (or leave the list empty)")
    return [
        registry.key(k.model_uri, tp_size=k.tp_size, rank=k.rank, rules=k.rules, device_uuid=uuid, fusions=k.fusions)
        for k, uuid in zip(keys, request.rank_device_uuids, strict=True)
    ]


def _memory_handle(handle: ArenaHandle, descriptor_slot: int) -> pb.MemoryHandle:
    if handle.transport == "cuda_vmm":
        return pb.MemoryHandle(cuda_vmm=pb.CudaVmmMemory(device_uuid=handle.device_uuid), size_bytes=handle.size,
                               descriptor_slot=descriptor_slot)
    if handle.transport == "cuda_ipc":
        return pb.MemoryHandle(
            cuda_ipc=pb.CudaIpcMemory(device_uuid=handle.device_uuid, ipc_handle=handle.ipc_handle),
            size_bytes=handle.size,
        )
    return pb.MemoryHandle(host=pb.HostMemory(), size_bytes=handle.size, descriptor_slot=descriptor_slot)


def _split_dim(dim: int | None) -> int:
    return -1 if dim is None else dim  # the wire's "replicated"


@dataclass(frozen=True)
class _GrantTemplate:
    """An entry's grant, built once: the serialized AttachModelResponse without a lease id, and what a lease's
    client receives on the descriptor channel, in the grant's slot order (the arena if it goes by descriptor,
    then the shared tensor table if the grant has one)."""

    response: bytes
    descriptors: tuple[Exportable, ...]


def _grant_template(entry: Entry, descriptor_socket: Path) -> _GrantTemplate:
    assert entry.arena is not None and entry.layout is not None
    handle = entry.arena.handle()
    grant = pb.Grant(
        model_uri=entry.key.model_uri,
        revision=entry.revision,
        tp_size=entry.key.tp_size,
        rank=entry.key.rank,
        metadata_dir=str(entry.metadata_dir),
        arenas=[_memory_handle(handle, descriptor_slot=0)],
        descriptor_socket=str(descriptor_socket),
    )
    slots = entry.layout.slots
    split = dict(entry.layout.shards)
    table = pb.TensorTable(
        names=[slot.name for slot in slots],
        dtypes=[f"DATA_TYPE_{slot.dtype}" for slot in slots],
        ndims=[len(slot.shape) for slot in slots],
        dims=[d for slot in slots for d in slot.shape],
        arena_indices=[0] * len(slots),
        byte_offsets=[slot.offset for slot in slots],
        byte_lengths=[slot.nbytes for slot in slots],
        split_dims=[_split_dim(split[slot.name]) for slot in slots] if split else [],
    )
    descriptors: list[Exportable] = [entry.arena] if handle.by_descriptor else []
    serialized = table.SerializeToString()
    if len(serialized) < SHARED_TABLE_MIN_BYTES:
        grant.tensors.CopyFrom(table)
    else:
        shared = SealedBytes(serialized, name="weightd-tensor-table")
        grant.shared_tensors.descriptor_slot = len(descriptors)
        grant.shared_tensors.size_bytes = shared.size
        descriptors.append(shared)
    return _GrantTemplate(pb.AttachModelResponse(grant=grant).SerializeToString(), tuple(descriptors))


def _timestamp(unix_seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(unix_seconds * 1e9))
    return stamp


class WeightService(pb_grpc.WeightServiceServicer):
    def __init__(
        self,
        registry: Registry,
        *,
        settings: LoadSettings,
        revalidate_after: float,
        descriptor_socket: Path,
        shutdown: asyncio.Event,
        metrics: Metrics,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._settings = settings
        self._revalidate_after = revalidate_after
        self._descriptor_socket = descriptor_socket
        self._shutdown = shutdown
        # Each entry's grant lists every tensor: built once, dropped (with its shared table) with the entry.
        self._grants: weakref.WeakKeyDictionary[Entry, _GrantTemplate] = weakref.WeakKeyDictionary()

    def leased_descriptors(self, lease_id: str) -> tuple[Exportable, ...] | None:
        """What a live lease's client receives on the descriptor channel (its grant's descriptors); None when no
        such lease is live, or its arena was released."""
        entry = self._registry.leased_entry(lease_id)
        # The grant was built before its lease id was sent, so a live lease's template is there.
        template = self._grants.get(entry) if entry is not None and entry.arena is not None else None
        return None if template is None else template.descriptors

    async def _attach_response(self, entry: Entry, lease_id: str) -> bytes:
        """The serialized AttachModelResponse: the entry's grant plus this lease's id, appended as a second
        grant that protobuf merges into the first."""
        template = await self._grant_of(entry)
        return template.response + pb.AttachModelResponse(grant=pb.Grant(lease_id=lease_id)).SerializeToString()

    async def _grant_of(self, entry: Entry) -> _GrantTemplate:
        """The entry's grant (without a lease), built once, off the event loop: 150-260 ms for 100k tensors,
        which every other call would otherwise wait out."""
        template = self._grants.get(entry)
        if template is None:
            template = await asyncio.get_running_loop().run_in_executor(
                None, _grant_template, entry, self._descriptor_socket
            )
            self._grants[entry] = template
        return template

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.LoadModelResponse]:
        try:
            keys = _group_keys(self._registry, request)
            settings = self._load_settings(request.settings)
            # An explicit load always re-checks storage: it is how an operator picks up a changed model.
            load = asyncio.ensure_future(self._registry.ensure(keys, settings=settings, revalidate_after=0))
            try:
                while not load.done():
                    progress = self._registry.progress_of(keys[0])
                    if progress is not None:
                        yield pb.LoadModelResponse(
                            state=_STATE_TO_PB[progress.state],
                            bytes_done=progress.bytes_done,
                            bytes_total=progress.bytes_total,
                        )
                    await asyncio.wait({load}, timeout=PROGRESS_INTERVAL_S)
                entries = load.result()
            finally:
                load.cancel()  # if the client went away: stop waiting (the shared load itself is shielded)
            for entry in entries:  # built now, so that a preloaded model's first attach is as fast as the next
                if entry.arena is not None:  # not evicted meanwhile for another load's room
                    await self._grant_of(entry)
        except Exception as e:
            await abort_with(context, e)
        total = sum(e.progress.bytes_total for e in {id(e.progress): e for e in entries}.values())
        yield pb.LoadModelResponse(state=pb.MODEL_STATE_READY, bytes_done=total, bytes_total=total)

    async def AttachModel(
        self, request: pb.AttachModelRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[bytes]:  # a serialized AttachModelResponse
        started = time.monotonic()
        try:
            (entry,) = await self._registry.ensure(
                [_key(self._registry, request.model)], revalidate_after=self._revalidate_after
            )
            lease_id = self._registry.acquire(entry)
        except Exception as e:
            await abort_with(context, e)
        logger.info("lease %s granted on %s rank %d", lease_id, entry.key.model_uri, entry.key.rank)
        try:
            response = await self._attach_response(entry, lease_id)
            self._metrics.attached(time.monotonic() - started)
            yield response
            # The open stream is the lease: this returns (or is cancelled) when the client goes away,
            # or ends the stream itself when the daemon shuts down.
            await self._shutdown.wait()
        finally:
            self._registry.release(lease_id)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ResidentModel(
                    model_uri=s.key.model_uri,
                    revision=s.revision,
                    state=_STATE_TO_PB[s.state],
                    tp_size=s.key.tp_size,
                    rank=s.key.rank,
                    resident_bytes=s.resident_bytes,
                    leases=s.leases,
                    storage_bytes_read=s.storage_bytes_read,
                    bytes_done=s.bytes_done,
                    bytes_total=s.bytes_total,
                    metadata_bytes_downloaded=s.metadata_bytes_downloaded,
                    current=s.current,
                    memory_kind=_MEMORY_KIND_TO_PB[s.memory_kind],
                    last_used=_timestamp(s.last_used),
                    device_uuid=s.key.device,
                    shard_rules=[_rule_to_pb(r) for r in s.key.rules],
                    fusions=[pb.Fusion(fused=f.fused, parts=f.parts) for f in s.key.fusions],
                )
                for s in self._registry.snapshot()
            ],
            budgets=[
                pb.MemoryBudget(
                    kind=_MEMORY_KIND_TO_PB[u.kind],
                    limit_bytes=u.limit_bytes,
                    used_bytes=u.used_bytes,
                    capacity_bytes=u.capacity_bytes,
                    device_uuid=u.device_uuid,
                )
                for u in self._registry.memory_usage()
            ],
        )

    async def EvictModel(
        self, request: pb.EvictModelRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.EvictModelResponse:
        try:
            count, freed = self._registry.evict(request.model_uri)
        except Exception as e:
            await abort_with(context, e)
        return pb.EvictModelResponse(evicted_entries=count, freed_bytes=freed)

    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetModelMetadataResponse:
        try:
            metadata = await self._registry.metadata(request.model_uri)
        except Exception as e:
            await abort_with(context, e)
        return pb.GetModelMetadataResponse(
            metadata_dir=str(metadata.directory),
            revision=metadata.revision,
            files=metadata.files,
            downloaded_bytes=metadata.downloaded_bytes,
        )

    def _load_settings(self, settings: pb.StreamerSettings) -> LoadSettings:
        concurrency = settings.concurrency if settings.HasField("concurrency") else None
        if concurrency is not None and concurrency < 1:
            raise errors.InvalidRequestError(
                f"concurrency {concurrency}: must be at least 1; leave it unset for the daemon's --concurrency"
            )
        return LoadSettings(
            memory_limit=settings.memory_limit if settings.HasField("memory_limit") else self._settings.memory_limit,
            distributed=settings.distributed if settings.HasField("distributed") else self._settings.distributed,
            concurrency=concurrency,
        )


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in grpc-stubs


class _HandlerRecorder:
    """Stands in for the server while the generated code registers WeightService, to adjust one handler."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same table arrives through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self.handlers = handlers


def add_weight_service(servicer: WeightService, server: grpc.aio.Server) -> None:
    """Register ``servicer`` as the generated code does, except that AttachModel yields its response already
    serialized (see WeightService._attach_response): no serializer passes the bytes through."""
    recorder = _HandlerRecorder()
    pb_grpc.add_WeightServiceServicer_to_server(servicer, recorder)
    handlers = dict(recorder.handlers)
    handlers["AttachModel"] = handlers["AttachModel"]._replace(  # type: ignore[attr-defined]
        response_serializer=None
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    # grpc-stubs does not know the registered-method path that the generated code also takes.
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]
