"""The client's views of a grant's tensor table: values at their offsets, and a table that does not fit its arena
refused with DATA_LOSS when the tensor is made (the daemon never sends one; a corrupt grant must not read
outside the mapping). A shared table that cannot be read is DATA_LOSS too."""

from __future__ import annotations

import os

import grpc
import pytest
import torch
from weightd import client
from weightd.client._mapping import TensorViews, tensor_table
from weightd.v1 import weightd_pb2 as pb


def table(offsets: list[int], *, dtype: str = "DATA_TYPE_F32") -> pb.TensorTable:
    names = [f"t{i}" for i in range(len(offsets))]
    return pb.TensorTable(names=names, dtypes=[dtype] * len(names), ndims=[2] * len(names), dims=[2, 3] * len(names),
                          arena_indices=[0] * len(names), byte_offsets=offsets, byte_lengths=[24] * len(names))


def test_views_read_their_offsets_and_are_made_once() -> None:
    arena = torch.arange(64, dtype=torch.float32).view(torch.uint8)
    views = TensorViews(table([0, 256 - 24 * 4, 24]), [arena])
    assert list(views) == ["t0", "t1", "t2"] and len(views) == 3 and "t1" in views
    assert torch.equal(views["t0"], torch.arange(6, dtype=torch.float32).view(2, 3))
    assert torch.equal(views["t2"], torch.arange(6, 12, dtype=torch.float32).view(2, 3))
    assert views["t1"] is views["t1"]


@pytest.mark.parametrize("offset", [256 - 20, 2])  # past the arena's end; not a multiple of the dtype's size
def test_a_tensor_outside_its_arena_or_misaligned_is_data_loss(offset: int) -> None:
    views = TensorViews(table([0, offset]), [torch.zeros(256, dtype=torch.uint8)])
    assert views["t0"].shape == (2, 3)
    with pytest.raises(client.CorruptModelError, match="'t1': the grant places it outside its arena") as e:
        views["t1"]
    assert e.value.code == grpc.StatusCode.DATA_LOSS


def test_an_unknown_dtype_is_refused_at_attach() -> None:
    with pytest.raises(client.PreconditionFailedError, match="unknown to this client; upgrade it"):
        TensorViews(table([0], dtype="DATA_TYPE_UNSPECIFIED"), [torch.zeros(256, dtype=torch.uint8)])


def test_a_shared_table_is_read_from_its_descriptor() -> None:
    sent = table([0, 256])
    fd = os.memfd_create("table")
    try:
        os.write(fd, sent.SerializeToString())
        grant = pb.Grant(shared_tensors=pb.SharedTensorTable(descriptor_slot=1, size_bytes=sent.ByteSize()))
        assert tensor_table(grant, [-1, fd]) == sent
        inline = pb.Grant(tensors=sent)
        assert tensor_table(inline, []) is inline.tensors
    finally:
        os.close(fd)


@pytest.mark.parametrize("content, size, slot", [
    (b"\xff" * 64, 64, 0),  # not a TensorTable
    (table([0]).SerializeToString(), 4096, 0),  # shorter than the grant says
    (table([0]).SerializeToString(), 10, 1),  # a slot past the descriptors sent
])
def test_an_unreadable_shared_table_is_data_loss(content: bytes, size: int, slot: int) -> None:
    fd = os.memfd_create("table")
    try:
        os.write(fd, content)
        grant = pb.Grant(shared_tensors=pb.SharedTensorTable(descriptor_slot=slot, size_bytes=size))
        with pytest.raises(client.CorruptModelError, match="attach again") as e:
            tensor_table(grant, [fd])
        assert e.value.code == grpc.StatusCode.DATA_LOSS
    finally:
        os.close(fd)
