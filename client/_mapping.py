"""Turning a grant and its descriptors into tensors: read-only host mappings now, CUDA VMM imports later."""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Sequence

import grpc
import torch
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


def map_arena(handle: pb.MemoryHandle, descriptor: int) -> torch.Tensor:
    """A uint8 tensor over the whole arena, mapped read-only: a write through it faults in the writer only.

    The mapping outlives ``descriptor`` (the caller closes it), the lease and the daemon itself.
    """
    kind = handle.WhichOneof("kind")
    if kind != "host":
        raise PreconditionFailedError(
            f"this client cannot map {kind or 'unknown'} memory; upgrade weightd on the client",
            code=grpc.StatusCode.FAILED_PRECONDITION,
        )
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


def build_tensors(table: pb.TensorTable, arenas: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One typed view per (arena, dtype), then one as_strided per tensor: the cheapest zero-copy views."""
    typed: dict[tuple[int, int], torch.Tensor] = {}
    tensors = {}
    dims = list(table.dims)
    cursor = 0
    for name, dtype_code, ndim, arena_index, offset, length in zip(
        table.names, table.dtypes, table.ndims, table.arena_indices, table.byte_offsets, table.byte_lengths,
        strict=True,
    ):
        shape = tuple(dims[cursor : cursor + ndim])
        cursor += ndim
        base = typed.get((arena_index, dtype_code))
        if base is None:
            dtype = TORCH_DTYPES.get(dtype_code)
            if dtype is None:
                raise PreconditionFailedError(
                    f"tensor {name!r} has dtype {pb.DataType.Name(dtype_code)}, unknown to this client; upgrade it",
                    code=grpc.StatusCode.FAILED_PRECONDITION,
                )
            base = typed[(arena_index, dtype_code)] = arenas[arena_index].view(dtype)
        itemsize = base.element_size()
        if offset % itemsize or offset + length > arenas[arena_index].numel():
            raise CorruptModelError(f"tensor {name!r}: the grant places it outside its arena or misaligned",
                                    code=grpc.StatusCode.DATA_LOSS)
        tensors[name] = base.as_strided(shape, _contiguous_strides(shape), offset // itemsize)
    return tensors


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return tuple(strides)
