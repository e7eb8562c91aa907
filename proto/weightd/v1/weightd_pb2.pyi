import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING_METADATA: _ClassVar[ModelState]
    MODEL_STATE_LOADING_WEIGHTS: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_BOOL: _ClassVar[DataType]
    DATA_TYPE_U8: _ClassVar[DataType]
    DATA_TYPE_I8: _ClassVar[DataType]
    DATA_TYPE_I16: _ClassVar[DataType]
    DATA_TYPE_U16: _ClassVar[DataType]
    DATA_TYPE_I32: _ClassVar[DataType]
    DATA_TYPE_U32: _ClassVar[DataType]
    DATA_TYPE_I64: _ClassVar[DataType]
    DATA_TYPE_U64: _ClassVar[DataType]
    DATA_TYPE_F16: _ClassVar[DataType]
    DATA_TYPE_BF16: _ClassVar[DataType]
    DATA_TYPE_F32: _ClassVar[DataType]
    DATA_TYPE_F64: _ClassVar[DataType]
    DATA_TYPE_F8_E4M3: _ClassVar[DataType]
    DATA_TYPE_F8_E5M2: _ClassVar[DataType]

class MemoryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMORY_KIND_UNSPECIFIED: _ClassVar[MemoryKind]
    MEMORY_KIND_HOST: _ClassVar[MemoryKind]
    MEMORY_KIND_CUDA: _ClassVar[MemoryKind]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING_METADATA: ModelState
MODEL_STATE_LOADING_WEIGHTS: ModelState
MODEL_STATE_READY: ModelState
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_BOOL: DataType
DATA_TYPE_U8: DataType
DATA_TYPE_I8: DataType
DATA_TYPE_I16: DataType
DATA_TYPE_U16: DataType
DATA_TYPE_I32: DataType
DATA_TYPE_U32: DataType
DATA_TYPE_I64: DataType
DATA_TYPE_U64: DataType
DATA_TYPE_F16: DataType
DATA_TYPE_BF16: DataType
DATA_TYPE_F32: DataType
DATA_TYPE_F64: DataType
DATA_TYPE_F8_E4M3: DataType
DATA_TYPE_F8_E5M2: DataType
MEMORY_KIND_UNSPECIFIED: MemoryKind
MEMORY_KIND_HOST: MemoryKind
MEMORY_KIND_CUDA: MemoryKind

class ShardRule(_message.Message):
    __slots__ = ("pattern", "split_dim", "replicate", "pad_multiple", "heads")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    SPLIT_DIM_FIELD_NUMBER: _ClassVar[int]
    REPLICATE_FIELD_NUMBER: _ClassVar[int]
    PAD_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    split_dim: int
    replicate: bool
    pad_multiple: int
    heads: int
    def __init__(self, pattern: _Optional[str] = ..., split_dim: _Optional[int] = ..., replicate: bool = ..., pad_multiple: _Optional[int] = ..., heads: _Optional[int] = ...) -> None: ...

class Fusion(_message.Message):
    __slots__ = ("fused", "parts")
    FUSED_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    fused: str
    parts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, fused: _Optional[str] = ..., parts: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelSelector(_message.Message):
    __slots__ = ("model_uri", "tp_size", "rank", "shard_rules", "device_uuid", "fusions")
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SHARD_RULES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    FUSIONS_FIELD_NUMBER: _ClassVar[int]
    model_uri: str
    tp_size: int
    rank: int
    shard_rules: _containers.RepeatedCompositeFieldContainer[ShardRule]
    device_uuid: str
    fusions: _containers.RepeatedCompositeFieldContainer[Fusion]
    def __init__(self, model_uri: _Optional[str] = ..., tp_size: _Optional[int] = ..., rank: _Optional[int] = ..., shard_rules: _Optional[_Iterable[_Union[ShardRule, _Mapping]]] = ..., device_uuid: _Optional[str] = ..., fusions: _Optional[_Iterable[_Union[Fusion, _Mapping]]] = ...) -> None: ...

class StreamerSettings(_message.Message):
    __slots__ = ("memory_limit", "distributed", "concurrency")
    MEMORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    memory_limit: int
    distributed: bool
    concurrency: int
    def __init__(self, memory_limit: _Optional[int] = ..., distributed: bool = ..., concurrency: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model", "all_ranks", "settings", "rank_device_uuids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALL_RANKS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    RANK_DEVICE_UUIDS_FIELD_NUMBER: _ClassVar[int]
    model: ModelSelector
    all_ranks: bool
    settings: StreamerSettings
    rank_device_uuids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[_Union[ModelSelector, _Mapping]] = ..., all_ranks: bool = ..., settings: _Optional[_Union[StreamerSettings, _Mapping]] = ..., rank_device_uuids: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("state", "bytes_done", "bytes_total")
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    state: ModelState
    bytes_done: int
    bytes_total: int
    def __init__(self, state: _Optional[_Union[ModelState, str]] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class HostMemory(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CudaVmmMemory(_message.Message):
    __slots__ = ("device_uuid",)
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    device_uuid: str
    def __init__(self, device_uuid: _Optional[str] = ...) -> None: ...

class CudaIpcMemory(_message.Message):
    __slots__ = ("device_uuid", "ipc_handle")
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    device_uuid: str
    ipc_handle: bytes
    def __init__(self, device_uuid: _Optional[str] = ..., ipc_handle: _Optional[bytes] = ...) -> None: ...

class MemoryHandle(_message.Message):
    __slots__ = ("host", "cuda_vmm", "cuda_ipc", "size_bytes", "descriptor_slot")
    HOST_FIELD_NUMBER: _ClassVar[int]
    CUDA_VMM_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_SLOT_FIELD_NUMBER: _ClassVar[int]
    host: HostMemory
    cuda_vmm: CudaVmmMemory
    cuda_ipc: CudaIpcMemory
    size_bytes: int
    descriptor_slot: int
    def __init__(self, host: _Optional[_Union[HostMemory, _Mapping]] = ..., cuda_vmm: _Optional[_Union[CudaVmmMemory, _Mapping]] = ..., cuda_ipc: _Optional[_Union[CudaIpcMemory, _Mapping]] = ..., size_bytes: _Optional[int] = ..., descriptor_slot: _Optional[int] = ...) -> None: ...

class TensorTable(_message.Message):
    __slots__ = ("names", "dtypes", "ndims", "dims", "arena_indices", "byte_offsets", "byte_lengths", "split_dims")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    NDIMS_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    ARENA_INDICES_FIELD_NUMBER: _ClassVar[int]
    BYTE_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_DIMS_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    dtypes: _containers.RepeatedScalarFieldContainer[DataType]
    ndims: _containers.RepeatedScalarFieldContainer[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    arena_indices: _containers.RepeatedScalarFieldContainer[int]
    byte_offsets: _containers.RepeatedScalarFieldContainer[int]
    byte_lengths: _containers.RepeatedScalarFieldContainer[int]
    split_dims: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, names: _Optional[_Iterable[str]] = ..., dtypes: _Optional[_Iterable[_Union[DataType, str]]] = ..., ndims: _Optional[_Iterable[int]] = ..., dims: _Optional[_Iterable[int]] = ..., arena_indices: _Optional[_Iterable[int]] = ..., byte_offsets: _Optional[_Iterable[int]] = ..., byte_lengths: _Optional[_Iterable[int]] = ..., split_dims: _Optional[_Iterable[int]] = ...) -> None: ...

class SharedTensorTable(_message.Message):
    __slots__ = ("descriptor_slot", "size_bytes")
    DESCRIPTOR_SLOT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    descriptor_slot: int
    size_bytes: int
    def __init__(self, descriptor_slot: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Grant(_message.Message):
    __slots__ = ("lease_id", "model_uri", "revision", "tp_size", "rank", "tensors", "shared_tensors", "metadata_dir", "arenas", "descriptor_socket")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHARED_TENSORS_FIELD_NUMBER: _ClassVar[int]
    METADATA_DIR_FIELD_NUMBER: _ClassVar[int]
    ARENAS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_SOCKET_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    model_uri: str
    revision: str
    tp_size: int
    rank: int
    tensors: TensorTable
    shared_tensors: SharedTensorTable
    metadata_dir: str
    arenas: _containers.RepeatedCompositeFieldContainer[MemoryHandle]
    descriptor_socket: str
    def __init__(self, lease_id: _Optional[str] = ..., model_uri: _Optional[str] = ..., revision: _Optional[str] = ..., tp_size: _Optional[int] = ..., rank: _Optional[int] = ..., tensors: _Optional[_Union[TensorTable, _Mapping]] = ..., shared_tensors: _Optional[_Union[SharedTensorTable, _Mapping]] = ..., metadata_dir: _Optional[str] = ..., arenas: _Optional[_Iterable[_Union[MemoryHandle, _Mapping]]] = ..., descriptor_socket: _Optional[str] = ...) -> None: ...

class AttachModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelSelector
    def __init__(self, model: _Optional[_Union[ModelSelector, _Mapping]] = ...) -> None: ...

class AttachModelResponse(_message.Message):
    __slots__ = ("grant",)
    GRANT_FIELD_NUMBER: _ClassVar[int]
    grant: Grant
    def __init__(self, grant: _Optional[_Union[Grant, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResidentModel(_message.Message):
    __slots__ = ("model_uri", "revision", "state", "tp_size", "rank", "resident_bytes", "leases", "storage_bytes_read", "bytes_done", "bytes_total", "metadata_bytes_downloaded", "current", "memory_kind", "last_used", "device_uuid", "shard_rules", "fusions")
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    METADATA_BYTES_DOWNLOADED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_KIND_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    SHARD_RULES_FIELD_NUMBER: _ClassVar[int]
    FUSIONS_FIELD_NUMBER: _ClassVar[int]
    model_uri: str
    revision: str
    state: ModelState
    tp_size: int
    rank: int
    resident_bytes: int
    leases: int
    storage_bytes_read: int
    bytes_done: int
    bytes_total: int
    metadata_bytes_downloaded: int
    current: bool
    memory_kind: MemoryKind
    last_used: _timestamp_pb2.Timestamp
    device_uuid: str
    shard_rules: _containers.RepeatedCompositeFieldContainer[ShardRule]
    fusions: _containers.RepeatedCompositeFieldContainer[Fusion]
    def __init__(self, model_uri: _Optional[str] = ..., revision: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., tp_size: _Optional[int] = ..., rank: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., leases: _Optional[int] = ..., storage_bytes_read: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., metadata_bytes_downloaded: _Optional[int] = ..., current: bool = ..., memory_kind: _Optional[_Union[MemoryKind, str]] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., device_uuid: _Optional[str] = ..., shard_rules: _Optional[_Iterable[_Union[ShardRule, _Mapping]]] = ..., fusions: _Optional[_Iterable[_Union[Fusion, _Mapping]]] = ...) -> None: ...

class MemoryBudget(_message.Message):
    __slots__ = ("kind", "limit_bytes", "used_bytes", "capacity_bytes", "device_uuid")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    kind: MemoryKind
    limit_bytes: int
    used_bytes: int
    capacity_bytes: int
    device_uuid: str
    def __init__(self, kind: _Optional[_Union[MemoryKind, str]] = ..., limit_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "budgets")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ResidentModel]
    budgets: _containers.RepeatedCompositeFieldContainer[MemoryBudget]
    def __init__(self, models: _Optional[_Iterable[_Union[ResidentModel, _Mapping]]] = ..., budgets: _Optional[_Iterable[_Union[MemoryBudget, _Mapping]]] = ...) -> None: ...

class EvictModelRequest(_message.Message):
    __slots__ = ("model_uri",)
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    model_uri: str
    def __init__(self, model_uri: _Optional[str] = ...) -> None: ...

class EvictModelResponse(_message.Message):
    __slots__ = ("evicted_entries", "freed_bytes")
    EVICTED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    evicted_entries: int
    freed_bytes: int
    def __init__(self, evicted_entries: _Optional[int] = ..., freed_bytes: _Optional[int] = ...) -> None: ...

class GetModelMetadataRequest(_message.Message):
    __slots__ = ("model_uri",)
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    model_uri: str
    def __init__(self, model_uri: _Optional[str] = ...) -> None: ...

class GetModelMetadataResponse(_message.Message):
    __slots__ = ("metadata_dir", "revision", "files", "downloaded_bytes")
    METADATA_DIR_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    DOWNLOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    metadata_dir: str
    revision: str
    files: _containers.RepeatedScalarFieldContainer[str]
    downloaded_bytes: int
    def __init__(self, metadata_dir: _Optional[str] = ..., revision: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ..., downloaded_bytes: _Optional[int] = ...) -> None: ...
