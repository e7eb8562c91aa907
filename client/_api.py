"""attach() and the small set of calls beside it (load, list_models, evict)."""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import grpc
import torch
from weightd.client._descriptors import receive_descriptors
from weightd.client._errors import (
    DeadlineExceededError,
    InvalidRequestError,
    PreconditionFailedError,
    UnavailableError,
    from_rpc_error,
)
from weightd.client._mapping import TensorViews, map_arena, tensor_table
from weightd.v1 import weightd_pb2 as pb
from weightd.v1 import weightd_pb2_grpc as pb_grpc

# grpc imports its channel module when the first channel is made (3 ms on a 2-core machine, 19 ms on a GPU node
# where it was compiled without bytecode): import it with the client, so an engine's first attach costs what
# the next ones do.
with contextlib.suppress(ImportError):
    importlib.import_module("grpc._channel")

DEFAULT_TARGET = "unix:///run/weightd/weightd.sock"
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 * 2**20)]
_MEMORY_KIND_NAMES = {pb.MEMORY_KIND_HOST: "host", pb.MEMORY_KIND_CUDA: "cuda"}
# A GPU: a torch device ("cuda:1", torch.device), a CUDA device index, or a UUID ("GPU-..."); "cpu" is host memory.
Device = torch.device | str | int
_STATE_NAMES = {
    pb.MODEL_STATE_LOADING_METADATA: "loading_metadata",
    pb.MODEL_STATE_LOADING_WEIGHTS: "loading_weights",
    pb.MODEL_STATE_READY: "ready",
}


@dataclass(frozen=True)
class ShardRule:
    """Tensors whose name matches ``pattern`` (``re.search``) split on ``split_dim``; None = replicate. A tensor
    of one element (a per-tensor scale) is replicated whatever the rule says.

    The split dimension is first padded with zeros to a multiple of ``pad_multiple``, as vLLM and SGLang pad a
    vocabulary to 64, so every rank's slice has the same size. ``heads`` > 0 says the dimension is that many
    heads, never cut: with tp_size > heads, tp_size / heads consecutive ranks get the same head, as engines
    replicate KV heads when tp_size > num_key_value_heads."""

    pattern: str
    split_dim: int | None
    pad_multiple: int = 1
    heads: int = 0


@dataclass(frozen=True)
class Fusion:
    """Serve the tensors ``<prefix>.<part>.<leaf>`` of ``parts`` as one tensor ``<prefix>.<fused>.<leaf>``, their
    concatenation along dim 0 (this rank's slices), the layout of an engine's fused parameter: e.g.
    ``Fusion("qkv_proj", ("q_proj", "k_proj", "v_proj"))``. Groups that cannot fuse are served unfused."""

    fused: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class LoadProgress:
    state: str
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class ResidentModel:
    model_uri: str
    revision: str
    state: str
    tp_size: int
    rank: int
    memory_kind: str  # "host" or "cuda"
    device_uuid: str  # the GPU, for "cuda" memory; empty for host memory
    resident_bytes: int
    leases: int
    storage_bytes_read: int
    metadata_bytes_downloaded: int
    current: bool
    last_used: float  # Unix time of the last attach (or of the load); least recently used is evicted first
    # What the entry was asked for; empty: the model's default plan, unfused (an engine's layout is its own entry).
    shard_rules: tuple[ShardRule, ...] = ()
    fusions: tuple[Fusion, ...] = ()


@dataclass(frozen=True)
class MemoryBudget:
    """How much of one memory (host, or one GPU) the daemon's arenas may hold (``limit_bytes``) and do hold."""

    kind: str
    device_uuid: str  # the GPU, for "cuda" memory; empty for host memory
    limit_bytes: int
    used_bytes: int
    capacity_bytes: int


@dataclass(frozen=True)
class ModelMetadata:
    directory: Path
    revision: str
    files: tuple[str, ...]
    downloaded_bytes: int


def resolve_target(target: str | None) -> str:
    return target or os.environ.get("WEIGHTD_TARGET") or DEFAULT_TARGET


def _channel(target: str) -> grpc.Channel:
    if not isinstance(target, str):
        raise InvalidRequestError(f"target must be a string such as 'unix:///run/weightd/weightd.sock', got "
                                  f"{target!r}", code=grpc.StatusCode.INVALID_ARGUMENT)
    return grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)


def _cuda_index(device: Device | None) -> int | None:
    """The CUDA device index ``device`` names in this process, or None for host memory. None means the current
    CUDA device when CUDA is available, else host memory."""
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if isinstance(device, str) and device.upper().startswith("GPU-"):
        raise InvalidRequestError(
            f"device {device!r}: attach takes this process's torch device (e.g. 'cuda:0'); UUIDs are for load()",
            code=grpc.StatusCode.INVALID_ARGUMENT,
        )
    try:
        parsed = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidRequestError(f"device {device!r}: {e}", code=grpc.StatusCode.INVALID_ARGUMENT) from e
    if parsed.type == "cpu":
        return None
    if parsed.type != "cuda":
        raise InvalidRequestError(
            f"device {device!r}: weightd serves host memory ('cpu') or CUDA memory ('cuda:N')",
            code=grpc.StatusCode.INVALID_ARGUMENT,
        )
    if not torch.cuda.is_available():
        raise PreconditionFailedError(
            f"device {device!r}: CUDA is not available in this process (torch {torch.__version__}); "
            "attach with device='cpu' for host memory", code=grpc.StatusCode.FAILED_PRECONDITION,
        )
    return parsed.index if parsed.index is not None else torch.cuda.current_device()


def _device_uuid(device: Device | None) -> str:
    """The UUID the daemon knows ``device`` by; empty for host memory (None or "cpu")."""
    if isinstance(device, str) and device.upper().startswith("GPU-"):
        return device
    index = None if device is None else _cuda_index(device)
    if index is None:
        return ""
    from weightd.client._cuda import device_uuid  # CUDA modules load only for GPU memory

    return device_uuid(index)


def _selector(
    model_uri: str, rank: int, tp_size: int, shard_rules: Sequence[ShardRule] | None,
    fusions: Sequence[Fusion] | None,
) -> pb.ModelSelector:
    # The wire's uint32 cannot carry these; the daemon checks rank < tp_size.
    if tp_size < 1:
        raise InvalidRequestError(f"tp_size must be at least 1, got {tp_size}", code=grpc.StatusCode.INVALID_ARGUMENT)
    if rank < 0:
        raise InvalidRequestError(f"rank must be >= 0, got {rank}", code=grpc.StatusCode.INVALID_ARGUMENT)
    with _arguments():
        rules = [
            pb.ShardRule(pattern=r.pattern, replicate=True)
            if r.split_dim is None
            else pb.ShardRule(pattern=r.pattern, split_dim=r.split_dim, pad_multiple=r.pad_multiple, heads=r.heads)
            for r in shard_rules or ()
        ]
        return pb.ModelSelector(model_uri=model_uri, rank=rank, tp_size=tp_size, shard_rules=rules,
                                fusions=[pb.Fusion(fused=f.fused, parts=f.parts) for f in fusions or ()])


@contextlib.contextmanager
def _arguments() -> Iterator[None]:
    """Arguments protobuf cannot carry (a wrong type, a negative size) come out as InvalidRequestError."""
    try:
        yield
    except (TypeError, ValueError, AttributeError) as e:
        raise InvalidRequestError(f"invalid argument: {e}", code=grpc.StatusCode.INVALID_ARGUMENT) from e


class AttachedModel:
    """A lease on a resident model and zero-copy, read-only tensor views of it.

    The lease lasts until ``close()`` (or the process exits). Tensors stay valid after close, and after the
    daemon exits (except with a daemon that shares GPU memory by legacy CUDA IPC): the mapping lives as long as
    any tensor references it.
    """

    def __init__(
        self, channel: grpc.Channel, call: Any, grant: pb.Grant, table: pb.TensorTable,
        tensors: Mapping[str, torch.Tensor], device: torch.device,
    ):
        self._channel = channel
        self._call = call
        self.lease_id: str = grant.lease_id
        self.model_uri: str = grant.model_uri
        self.revision: str = grant.revision
        self.tp_size: int = grant.tp_size
        self.rank: int = grant.rank
        self.config_dir = Path(grant.metadata_dir)
        self.device = device  # where the tensors live: "cpu" (host shared memory) or a CUDA device
        self.tensors: Mapping[str, torch.Tensor] = tensors
        # split_dims is empty when tp_size is 1: then no tensor is sharded and this mapping is empty.
        splits = zip(table.names, table.split_dims, strict=False)
        self.shards: Mapping[str, int | None] = MappingProxyType(
            {name: (None if dim < 0 else dim) for name, dim in splits}
        )

    def close(self) -> None:
        """End the lease. Idempotent."""
        self._call.cancel()
        self._channel.close()

    def __enter__(self) -> AttachedModel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"AttachedModel({self.model_uri!r}, rank={self.rank}, tp_size={self.tp_size}, device={str(self.device)!r}, "
            f"tensors={len(self.tensors)}, lease_id={self.lease_id!r})"
        )


def attach(
    model_uri: str,
    rank: int = 0,
    *,
    tp_size: int = 1,
    shard_rules: Sequence[ShardRule] | None = None,
    fusions: Sequence[Fusion] | None = None,
    device: Device | None = None,
    target: str | None = None,
    timeout: float | None = None,
) -> AttachedModel:
    """Attach rank ``rank`` of ``tp_size`` of a model, loading it into the daemon first if needed.

    ``device`` is where the tensors live: a CUDA device of this process (``"cuda:1"``, a ``torch.device`` or
    an index), shared with every engine on that GPU, or ``"cpu"`` for host shared memory. None means the
    current CUDA device when CUDA is available, else host memory. ``fusions`` serve groups of tensors as one
    (an engine's fused parameters). ``timeout`` bounds the wait for the grant (which includes a cold load);
    None waits as long as it takes.
    """
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise InvalidRequestError(f"timeout must be a positive number of seconds or None, got {timeout!r}",
                                  code=grpc.StatusCode.INVALID_ARGUMENT)
    device_index = _cuda_index(device)
    selector = _selector(model_uri, rank, tp_size, shard_rules, fusions)
    if device_index is not None:
        selector.device_uuid = _device_uuid(device_index)
    request = pb.AttachModelRequest(model=selector)
    resolved = resolve_target(target)
    channel = _channel(resolved)
    call = pb_grpc.WeightServiceStub(channel).AttachModel(request)
    timer = threading.Timer(timeout, call.cancel) if timeout is not None else None
    try:
        if timer is not None:
            timer.start()
        response = next(call)
    except grpc.RpcError as e:
        channel.close()
        if e.code() == grpc.StatusCode.CANCELLED and timer is not None:
            raise DeadlineExceededError(
                f"no grant for {model_uri} within {timeout} s; preload it with `weightd load` or raise timeout"
            ) from e
        raise from_rpc_error(e, target=resolved) from e
    except StopIteration as e:
        channel.close()
        raise UnavailableError(f"weightd at {resolved} closed the attach stream without a grant") from e
    finally:
        if timer is not None:
            timer.cancel()
    grant = response.grant
    try:
        descriptors: list[int] = []
        if grant.HasField("shared_tensors") or any(h.WhichOneof("kind") != "cuda_ipc" for h in grant.arenas):
            descriptors = receive_descriptors(_descriptor_socket(resolved, grant.descriptor_socket), grant.lease_id)
        try:
            table = tensor_table(grant, descriptors)
            arenas = [map_arena(handle, descriptors, device_index) for handle in grant.arenas]
        finally:
            for fd in descriptors:
                os.close(fd)  # the mappings keep the memory
        tensors = TensorViews(table, arenas)
    except BaseException:
        call.cancel()  # give the lease back
        channel.close()
        raise
    where = torch.device("cpu") if device_index is None else torch.device("cuda", device_index)
    return AttachedModel(channel, call, grant, table, tensors, where)


def _descriptor_socket(target: str, granted: str) -> str:
    """The daemon's descriptor socket as this process sees it: beside the gRPC socket we reached (a container
    may mount the daemon's socket directory elsewhere), else where the daemon says it is."""
    for scheme in ("unix://", "unix:"):
        if target.startswith(scheme):
            return os.path.join(os.path.dirname(target.removeprefix(scheme)), os.path.basename(granted))
    return granted


def load(
    model_uri: str,
    *,
    tp_size: int = 1,
    rank: int = 0,
    all_ranks: bool = False,
    shard_rules: Sequence[ShardRule] | None = None,
    fusions: Sequence[Fusion] | None = None,
    memory_limit: int | None = None,
    distributed: bool | None = None,
    concurrency: int | None = None,
    device: Device | None = None,
    rank_devices: Sequence[Device] | None = None,
    target: str | None = None,
    on_progress: Callable[[LoadProgress], None] | None = None,
) -> LoadProgress:
    """Make a model resident without attaching it (re-checking storage for a newer revision if it already is).

    ``device`` is a GPU (a UUID such as ``"GPU-5b6b..."`` from ``nvidia-smi -L``, or a CUDA device of this
    process); None or ``"cpu"`` loads into host memory. ``all_ranks`` loads every rank of ``tp_size`` in one
    pass; ``rank_devices`` then puts each rank on its own GPU. ``memory_limit``, ``distributed`` and
    ``concurrency`` override the daemon's streamer settings for this load (the names and meanings of the
    streamer's ``--model-loader-extra-config``). They apply only when this call streams the model: a model
    already resident, or being loaded by another caller, keeps the settings it was loaded with.
    """
    settings = pb.StreamerSettings()
    selector = _selector(model_uri, rank, tp_size, shard_rules, fusions)
    device_uuid = _device_uuid(device)
    rank_device_uuids = [_device_uuid(d) for d in rank_devices or ()]
    with _arguments():
        if memory_limit is not None:
            settings.memory_limit = memory_limit
        if distributed is not None:
            settings.distributed = distributed
        if concurrency is not None:
            if concurrency < 1:
                raise ValueError(f"concurrency must be at least 1, got {concurrency}")
            settings.concurrency = concurrency
        selector.device_uuid = device_uuid
        request = pb.LoadModelRequest(
            model=selector, all_ranks=all_ranks, settings=settings, rank_device_uuids=rank_device_uuids
        )
    last = LoadProgress("unspecified", 0, 0)
    with _stub(target) as stub:
        for response in stub.LoadModel(request):
            state = _STATE_NAMES.get(response.state, "unspecified")
            last = LoadProgress(state, response.bytes_done, response.bytes_total)
            if on_progress is not None:
                on_progress(last)
    return last


def list_models(*, target: str | None = None) -> list[ResidentModel]:
    with _stub(target) as stub:
        response = stub.ListModels(pb.ListModelsRequest())
    return [
        ResidentModel(
            model_uri=m.model_uri,
            revision=m.revision,
            state=_STATE_NAMES.get(m.state, "unspecified"),
            tp_size=m.tp_size,
            rank=m.rank,
            memory_kind=_MEMORY_KIND_NAMES.get(m.memory_kind, "unspecified"),
            device_uuid=m.device_uuid,
            resident_bytes=m.resident_bytes,
            leases=m.leases,
            storage_bytes_read=m.storage_bytes_read,
            metadata_bytes_downloaded=m.metadata_bytes_downloaded,
            current=m.current,
            last_used=m.last_used.ToNanoseconds() / 1e9,
            shard_rules=tuple(
                ShardRule(r.pattern, None if r.WhichOneof("action") == "replicate" else r.split_dim,
                          r.pad_multiple or 1, r.heads)
                for r in m.shard_rules
            ),
            fusions=tuple(Fusion(f.fused, tuple(f.parts)) for f in m.fusions),
        )
        for m in response.models
    ]


def memory_budgets(*, target: str | None = None) -> list[MemoryBudget]:
    """Each kind of memory the daemon serves from: its budget and what resident models use of it."""
    with _stub(target) as stub:
        response = stub.ListModels(pb.ListModelsRequest())
    return [
        MemoryBudget(
            kind=_MEMORY_KIND_NAMES.get(b.kind, "unspecified"),
            device_uuid=b.device_uuid,
            limit_bytes=b.limit_bytes,
            used_bytes=b.used_bytes,
            capacity_bytes=b.capacity_bytes,
        )
        for b in response.budgets
    ]


def fetch_metadata(model_uri: str, *, target: str | None = None) -> ModelMetadata:
    """Have the daemon download the model's metadata files (once) and say where they are."""
    with _arguments():
        request = pb.GetModelMetadataRequest(model_uri=model_uri)
    with _stub(target) as stub:
        response = stub.GetModelMetadata(request)
    return ModelMetadata(
        directory=Path(response.metadata_dir),
        revision=response.revision,
        files=tuple(response.files),
        downloaded_bytes=response.downloaded_bytes,
    )


def evict(model_uri: str, *, target: str | None = None) -> int:
    """Free every unleased entry of ``model_uri``; returns the bytes freed."""
    with _arguments():
        request = pb.EvictModelRequest(model_uri=model_uri)
    with _stub(target) as stub:
        response = stub.EvictModel(request)
    freed: int = response.freed_bytes
    return freed


@contextlib.contextmanager
def _stub(target: str | None) -> Iterator[pb_grpc.WeightServiceStub]:
    """A stub on a channel that closes afterwards; RPC errors come out as weightd errors."""
    resolved = resolve_target(target)
    with _channel(resolved) as channel:
        try:
            yield pb_grpc.WeightServiceStub(channel)
        except grpc.RpcError as e:
            raise from_rpc_error(e, target=resolved) from e
