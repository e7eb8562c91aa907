"""Header validation, directly and exhaustively (no I/O)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save
from weightd.daemon.errors import CorruptModelError, InvalidModelError
from weightd.daemon.safetensors_header import DTYPE_SIZES, header_length, parse_header


def parse(blob: bytes):
    n = header_length(blob[:8], file="f.safetensors", file_size=len(blob))
    return parse_header(blob[8 : 8 + n], file="f.safetensors", file_size=len(blob))


def blob_of(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_agrees_with_safetensors() -> None:
    tensors = {"b": torch.zeros(3, 5, dtype=torch.bfloat16), "a": torch.arange(7, dtype=torch.int64),
               "s": torch.tensor(1.5), "e": torch.zeros(0, 4)}
    blob = save(tensors, metadata={"format": "pt"})
    header = parse(blob)
    assert {t.name for t in header.tensors} == set(tensors)
    for entry in header.tensors:
        assert entry.nbytes == tensors[entry.name].nbytes
        assert list(entry.shape) == list(tensors[entry.name].shape)
        assert blob[entry.begin : entry.end] == bytes(tensors[entry.name].reshape(-1).view(torch.uint8).numpy())


@pytest.mark.parametrize(
    ("header", "data", "error", "words"),
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, CorruptModelError, "outside"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, InvalidModelError, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, InvalidModelError, "needs 12"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, InvalidModelError, "shape"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, InvalidModelError, "after end"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4, InvalidModelError, "data_offsets"),
        ({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
          "v": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6, InvalidModelError, "overlap"),
        ([1, 2], b"", InvalidModelError, "JSON object"),
        ({"w": "nope"}, b"", InvalidModelError, "must be an object"),
    ],
)
def test_rejects(header: object, data: bytes, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words) as raised:
        parse(blob_of(header, data))
    assert "f.safetensors" in str(raised.value)


def test_rejects_lengths() -> None:
    with pytest.raises(InvalidModelError, match="shorter than the 8-byte"):
        header_length(b"\1\0", file="f", file_size=2)
    with pytest.raises(InvalidModelError, match="runs past the end"):
        header_length(struct.pack("<Q", 100), file="f", file_size=50)
    with pytest.raises(InvalidModelError, match="exceeds"):
        header_length(struct.pack("<Q", 2**40), file="f", file_size=2**41)


def test_every_dtype_has_a_wire_and_torch_name() -> None:
    from weightd.client._mapping import TORCH_DTYPES
    from weightd.v1 import weightd_pb2 as pb

    for name, size in DTYPE_SIZES.items():
        value = pb.DataType.Value(f"DATA_TYPE_{name}")
        assert torch.empty(0, dtype=TORCH_DTYPES[value]).element_size() == size
