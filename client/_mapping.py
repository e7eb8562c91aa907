"""Turning a grant into tensors: read-only host mappings now, CUDA IPC handles in a later backend."""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Sequence

import torch
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


def map_arena(arena: pb.Arena) -> torch.Tensor:
    """A uint8 tensor over the whole arena, mapped read-only: a write through it faults in the writer only."""
    kind = arena.handle.WhichOneof("kind")
    if kind != "host_shared_memory":
        raise ValueError(f"this client cannot map a {kind!r} arena; upgrade weightd")
    if arena.size_bytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    fd = os.open(arena.handle.host_shared_memory.path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, arena.size_bytes, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        # torch warns that the buffer is not writable: that is the point.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapping, dtype=torch.uint8)


def build_tensors(grant: pb.Grant, arenas: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {}
    for slot in grant.tensors:
        dtype = TORCH_DTYPES.get(slot.dtype)
        if dtype is None:
            raise ValueError(f"tensor {slot.name!r} has dtype {pb.DataType.Name(slot.dtype)}, unknown to this client")
        raw = arenas[slot.arena_index][slot.byte_offset : slot.byte_offset + slot.byte_length]
        tensors[slot.name] = raw.view(dtype).view(tuple(slot.shape))
    return tensors
