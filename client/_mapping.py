"""Turning a grant and its descriptors into tensors: read-only host mappings, or GPU memory (weightd.client._cuda)."""

from __future__ import annotations

import functools
import itertools
import mmap
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import grpc
import torch
from google.protobuf.message import DecodeError
from weightd.client._errors import CorruptModelError, PreconditionFailedError, ResourceExhaustedError
from weightd.v1 import weightd_pb2 as pb

TORCH_DTYPES: dict[int, torch.dtype] = {
    pb.DATA_TYPE_BOOL: torch.bool,
    pb.DATA_TYPE_U8: torch.uint8,
    pb.DATA_TYPE_I8: torch.int8,
    pb.DATA_TYPE_I16: torch.int16,
    pb.DATA_TYPE_U16: torch.uint16,
    pb.DATA_TYPE_I32: torch.int32,
    pb.DATA_TYPE_U32: torch.uint32,
    pb.DATA_TYPE_I64: torch.int64,
    pb.DATA_TYPE_U64: torch.uint64,
    pb.DATA_TYPE_F16: torch.float16,
    pb.DATA_TYPE_BF16: torch.bfloat16,
    pb.DATA_TYPE_F32: torch.float32,
    pb.DATA_TYPE_F64: torch.float64,
    pb.DATA_TYPE_F8_E4M3: torch.float8_e4m3fn,
    pb.DATA_TYPE_F8_E5M2: torch.float8_e5m2,
}


def map_arena(handle: pb.MemoryHandle, descriptors: Sequence[int], device_index: int | None) -> torch.Tensor:
    """A uint8 tensor over the whole arena: host memory mapped read-only (a write faults in the writer only),
    or GPU memory on CUDA device ``device_index`` (read-only with VMM; legacy IPC memory is writable).

    Mappings outlive the descriptors (the caller closes them), the lease and, except legacy IPC, the daemon.
    """
    kind = handle.WhichOneof("kind")
    if kind == "host":
        return _map_host(handle, _descriptor(descriptors, handle.descriptor_slot))
    if kind in ("cuda_vmm", "cuda_ipc"):
        memory = handle.cuda_vmm if kind == "cuda_vmm" else handle.cuda_ipc
        from weightd.client import _cuda  # CUDA modules load only for GPU memory

        if device_index is None or _cuda.device_uuid(device_index) != memory.device_uuid:
            raise PreconditionFailedError(
                f"the grant holds memory of GPU {memory.device_uuid}, which is not this attach's device",
                code=grpc.StatusCode.FAILED_PRECONDITION,
            )
        if kind == "cuda_vmm":
            return _cuda.import_vmm(_descriptor(descriptors, handle.descriptor_slot), handle.size_bytes, device_index)
        return _cuda.open_ipc(handle.cuda_ipc.ipc_handle, handle.size_bytes, device_index)
    raise PreconditionFailedError(
        f"this client cannot map {kind or 'unknown'} memory; upgrade weightd on the client",
        code=grpc.StatusCode.FAILED_PRECONDITION,
    )


def tensor_table(grant: pb.Grant, descriptors: Sequence[int]) -> pb.TensorTable:
    """The grant's tensor table: inline, or read from the sealed descriptor it names (a large table)."""
    if grant.WhichOneof("table") != "shared_tensors":
        return grant.tensors
    shared = grant.shared_tensors
    try:
        data = os.pread(_descriptor(descriptors, shared.descriptor_slot), shared.size_bytes, 0)
        if len(data) < shared.size_bytes:
            raise DecodeError(f"its descriptor holds {len(data)} bytes")
        return pb.TensorTable.FromString(data)
    except (OSError, DecodeError) as e:
        raise CorruptModelError(f"cannot read the grant's {shared.size_bytes}-byte tensor table from its descriptor: "
                                f"{e}; attach again", code=grpc.StatusCode.DATA_LOSS) from e


def _descriptor(descriptors: Sequence[int], slot: int) -> int:
    if slot >= len(descriptors):
        raise CorruptModelError(f"the grant names descriptor {slot} of {len(descriptors)} sent; attach again",
                                code=grpc.StatusCode.DATA_LOSS)
    return descriptors[slot]


def _map_host(handle: pb.MemoryHandle, descriptor: int) -> torch.Tensor:
    if handle.size_bytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    held = os.fstat(descriptor).st_size
    if held < handle.size_bytes:
        raise CorruptModelError(
            f"the arena's descriptor holds {held} bytes, fewer than the grant's "
            f"{handle.size_bytes}; attach again", code=grpc.StatusCode.DATA_LOSS,
        )
    try:
        mapping = mmap.mmap(descriptor, handle.size_bytes, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError as e:
        raise ResourceExhaustedError(
            f"cannot map a {handle.size_bytes}-byte arena into this process: {e}; raise its address-space or "
            "memory-map limits (ulimit -v, vm.max_map_count)", code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        ) from e
    with warnings.catch_warnings():
        # torch warns that the buffer is not writable: that is the point.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapping, dtype=torch.uint8)


class _Rows(NamedTuple):
    dims: list[int]
    arena_indices: list[int]
    dtypes: list[int]
    byte_offsets: list[int]
    byte_lengths: list[int]
    arena_bytes: list[int]


class TensorViews(Mapping[str, torch.Tensor]):
    """A grant's tensors by name. Each is made on first access (one ``as_strided`` of a per-(arena, dtype)
    view) and kept: attaching costs about the same for a thousand tensors or a hundred thousand (a large MoE),
    and a process pays per tensor only for those it reads. The name index and the table's columns as lists are
    built on the first lookup (about 45 ms for 100k tensors), which makes each view after it 30% cheaper
    (touching 100k: 0.53-0.55 s against 0.69-0.79 s). Dtypes and arenas are checked up front; a tensor's place
    in its arena when it is made."""

    def __init__(self, table: pb.TensorTable, arenas: Sequence[torch.Tensor]) -> None:
        self._table = table
        self._arenas = arenas
        self._typed: dict[tuple[int, int], torch.Tensor] = {}
        self._views: dict[str, torch.Tensor] = {}
        # Read out of protobuf once, for the check here and the views later (100k tensors: 4 ms a column).
        self._dtypes: list[int] = list(table.dtypes)
        self._arena_indices: list[int] = list(table.arena_indices)
        self._check()

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return dict(zip(self._table.names, range(len(self._table.names)), strict=True))

    @functools.cached_property
    def _dim_starts(self) -> list[int]:
        return list(itertools.accumulate(self._table.ndims, initial=0))

    @functools.cached_property
    def _rows(self) -> _Rows:
        """The table's columns as lists: indexing a protobuf repeated field costs several times a list's."""
        table = self._table
        return _Rows(list(table.dims), self._arena_indices, self._dtypes, list(table.byte_offsets),
                     list(table.byte_lengths), [arena.numel() for arena in self._arenas])

    def _check(self) -> None:
        unknown = set(self._dtypes) - TORCH_DTYPES.keys()
        if unknown:
            code = min(unknown)
            name = self._table.names[self._dtypes.index(code)]
            raise PreconditionFailedError(
                f"tensor {name!r} has dtype {pb.DataType.Name(code)}, unknown to this client; upgrade it",
                code=grpc.StatusCode.FAILED_PRECONDITION,
            )
        if set(self._arena_indices) - set(range(len(self._arenas))):
            raise CorruptModelError("the grant places tensors in an arena it does not hand over",
                                    code=grpc.StatusCode.DATA_LOSS)

    def __getitem__(self, name: str) -> torch.Tensor:
        view = self._views.get(name)
        if view is not None:
            return view
        i = self._index[name]
        rows, starts = self._rows, self._dim_starts
        shape = tuple(rows.dims[starts[i] : starts[i + 1]])
        key = (rows.arena_indices[i], rows.dtypes[i])
        base = self._typed.get(key)
        if base is None:
            base = self._typed[key] = self._arenas[key[0]].view(TORCH_DTYPES[key[1]])
        offset, itemsize = rows.byte_offsets[i], base.element_size()
        if offset % itemsize or offset + rows.byte_lengths[i] > rows.arena_bytes[key[0]]:
            raise CorruptModelError(f"tensor {name!r}: the grant places it outside its arena or misaligned",
                                    code=grpc.StatusCode.DATA_LOSS)
        view = self._views[name] = base.as_strided(shape, _contiguous_strides(shape), offset // itemsize)
        return view

    def __iter__(self) -> Iterator[str]:
        return iter(self._table.names)

    def __len__(self) -> int:
        return len(self._table.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return tuple(strides)
