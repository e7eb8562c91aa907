"""Parse and validate a safetensors header from its bytes.

Format: 8-byte little-endian header length N, N bytes of JSON, then the data section. Each JSON entry is
``name: {"dtype", "shape", "data_offsets": [begin, end]}`` with offsets relative to the data section.
Everything a later stage relies on (sizes, bounds, no overlap) is checked here, so the loader never reads
a byte that a header did not promise.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import struct
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from weightd.daemon.errors import CorruptModelError, InvalidModelError

# Bytes per element, by safetensors dtype name (the proto's DataType enum uses the same names).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "I16": 2,
    "U16": 2,
    "I32": 4,
    "U32": 4,
    "I64": 8,
    "U64": 8,
    "F16": 2,
    "BF16": 2,
    "F32": 4,
    "F64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

LENGTH_PREFIX_BYTES = 8
# The reference implementation refuses headers above 100 MB; so do we, before allocating anything.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    # Absolute byte offsets in the file (the data section's start already added).
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class SafetensorsHeader:
    file: str
    file_size: int
    data_start: int
    tensors: tuple[TensorEntry, ...]


def header_length(prefix: bytes, *, file: str, file_size: int) -> int:
    """Read N from the first 8 bytes and check that a header of that length fits in the file."""
    if len(prefix) < LENGTH_PREFIX_BYTES or file_size < LENGTH_PREFIX_BYTES:
        raise InvalidModelError(
            f"{file}: not a safetensors file: it is {file_size} bytes, shorter than the 8-byte header length"
        )
    (length,) = struct.unpack("<Q", prefix[:LENGTH_PREFIX_BYTES])
    if length > MAX_HEADER_BYTES:
        raise InvalidModelError(
            f"{file}: safetensors header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit; "
            "the file is not safetensors or is corrupt"
        )
    if LENGTH_PREFIX_BYTES + length > file_size:
        raise InvalidModelError(
            f"{file}: safetensors header length {length} runs past the end of the {file_size}-byte file; "
            "the file is truncated or not safetensors"
        )
    return int(length)


def parse_header(raw: bytes, *, file: str, file_size: int) -> SafetensorsHeader:
    """Validate the JSON header ``raw`` (exactly N bytes) of a file of ``file_size`` bytes."""
    data_start = LENGTH_PREFIX_BYTES + len(raw)
    try:
        # Decoded strictly as UTF-8 first: json.loads would also take UTF-16 and UTF-32, which safetensors refuses.
        document = json.loads(raw.decode("utf-8"), object_pairs_hook=functools.partial(_unique_keys, file=file))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidModelError(f"{file}: safetensors header is not valid JSON: {e}") from e
    except RecursionError as e:  # json's decoder recurses once per nesting level
        raise InvalidModelError(f"{file}: safetensors header nests JSON too deeply to be a safetensors header; "
                                "the file is not a valid checkpoint") from e
    if not isinstance(document, dict):
        raise InvalidModelError(f"{file}: safetensors header must be a JSON object")
    metadata = document.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        # safetensors itself refuses such a file: __metadata__ maps strings to strings.
        raise InvalidModelError(f"{file}: safetensors __metadata__ must map strings to strings, got {metadata!r:.200}")
    data_size = file_size - data_start
    tensors = [
        _parse_entry(name, entry, file=file, data_start=data_start, data_size=data_size)
        for name, entry in document.items()
        if name != "__metadata__"
    ]
    tensors.sort(key=attrgetter("begin", "end"))
    for previous, current in itertools.pairwise(tensors):
        if current.begin < previous.end:
            raise InvalidModelError(
                f"{file}: tensors {previous.name!r} and {current.name!r} overlap in the data section"
            )
    return SafetensorsHeader(file=file, file_size=file_size, data_start=data_start, tensors=tuple(tensors))


def _parse_entry(name: str, entry: Any, *, file: str, data_start: int, data_size: int) -> TensorEntry:
    where = f"{file}: tensor {name!r}"
    try:
        name.encode()
    except UnicodeEncodeError as e:  # a lone surrogate from a \ud800 escape: no client could be sent the name
        raise InvalidModelError(f"{where}: the name is not valid Unicode ({e.reason})") from e
    if not isinstance(entry, dict):
        raise InvalidModelError(f"{where}: header entry must be an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InvalidModelError(f"{where}: unknown dtype {dtype!r}; supported: {', '.join(DTYPE_SIZES)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not _all_counts(shape):
        raise InvalidModelError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and _all_counts(offsets)):
        raise InvalidModelError(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise InvalidModelError(f"{where}: data_offsets begin {begin} is after end {end}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise InvalidModelError(
            f"{where}: shape {shape} of {dtype} needs {expected} bytes but data_offsets span {end - begin}"
        )
    if end > data_size:
        raise CorruptModelError(
            f"{where}: data_offsets end {end} lies outside the {data_size}-byte data section; "
            "the file is truncated or its header is wrong"
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=data_start + begin, end=data_start + end)


def _unique_keys(pairs: list[tuple[str, Any]], *, file: str) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a repeated key (json keeps the last one silently; safetensors
    refuses the file)."""
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidModelError(f"{file}: safetensors header names {key!r} twice; the file is not valid")
            seen.add(key)
    return document


def _all_counts(values: list[Any]) -> bool:
    """Whether every value is a non-negative integer (not a bool). A loop: it runs for every header entry,
    100k of them in a large MoE's headers."""
    for value in values:
        if type(value) is not int or value < 0:  # json gives ints as int, true and false as bool
            return False
    return True
