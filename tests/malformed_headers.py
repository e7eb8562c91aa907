"""300 malformed safetensors files, generated deterministically, for the fault campaign (tests/test_faults.py).

Each case is a whole file (bytes) and the tensor name its error must mention (None where the fault is in the
file as a whole: its length, its encoding, its JSON).
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass

COUNT = 300


@dataclass(frozen=True)
class Case:
    kind: str
    content: bytes
    tensor: str | None  # the name the error must mention


def _file(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _data(size: int) -> bytes:
    return b"\x01" * size  # not whitespace, so a header that runs into the data is not valid JSON


def _good(rng: random.Random, count: int, start: int = 0) -> tuple[dict[str, object], int]:
    """``count`` valid F32 entries laid out from ``start``; returns them and the end offset."""
    header: dict[str, object] = {}
    offset = start
    for i in range(count):
        elements = rng.randint(1, 8)
        header[f"layers.{i}.weight"] = {"dtype": "F32", "shape": [elements], "data_offsets": [offset,
                                                                                            offset + 4 * elements]}
        offset += 4 * elements
    return header, offset


def _with_bad_entry(rng: random.Random, name: str, bad: dict[str, object], bad_bytes: int = 16) -> bytes:
    """A file of a few good tensors and ``name`` = ``bad`` at a random position among them."""
    header, end = _good(rng, rng.randint(0, 4))
    items = list(header.items())
    items.insert(rng.randint(0, len(items)), (name, bad))
    return _file(dict(items), _data(end + bad_bytes))


def _length_cases(rng: random.Random) -> list[Case]:
    cases = [Case("length", bytes(rng.randrange(256) for _ in range(size)), None) for size in range(8)]
    good, end = _good(rng, 3)
    raw = json.dumps(good).encode()
    for delta in (1, 2, 7, 100, 4096, 1 << 20):
        cases.append(Case("length", _file(raw, _data(end), length=len(raw) + end + delta), None))
    for length in (100_000_001, 2**32, 2**40, 2**63, 2**64 - 1):
        cases.append(Case("length", _file(raw, _data(end), length=length), None))
    cases.append(Case("length", _file(b"", _data(end), length=0), None))
    for cut in (1, 2, 5, 10, len(raw) // 2, len(raw) - 1):
        cases.append(Case("length", _file(raw, _data(end), length=len(raw) - cut), None))
    for extra in (1, 3, 8):  # the header length reaches into the data section
        cases.append(Case("length", _file(raw, _data(end), length=len(raw) + extra), None))
    return cases


def _offset_cases(rng: random.Random) -> list[Case]:
    bad_offsets: list[object] = [
        [0, 8], [4, 0], "0,8", 8, {"begin": 0, "end": 8}, None, [0], [0, 8, 16], [-8, 0], [0.0, 8.0],
        ["0", "8"], [True, False], [0, None], [[0], [8]], [0, 2**70],
    ]
    cases = []
    for i, offsets in enumerate(bad_offsets):
        name = f"bad.offsets.{i}"
        bad_bytes = 0 if offsets == [0, 8] else 16  # [0, 8] with no data: outside the data section
        cases.append(Case("offsets", _with_bad_entry(rng, name, {"dtype": "F32", "shape": [2],
                                                                   "data_offsets": offsets}, bad_bytes), name))
    for i in range(15):  # beyond the end of the file by a few bytes to a lot
        end = 4 * (i + 1)
        header = {f"w{i}": {"dtype": "F32", "shape": [i + 1], "data_offsets": [0, end]}}
        cases.append(Case("offsets", _file(header, _data(end - rng.randint(1, end))), f"w{i}"))
    for i in range(15):  # two tensors sharing bytes
        size = 4 * rng.randint(2, 6)
        shift = 4 * rng.randint(1, size // 4 - 1)
        first, second = f"a.{i}", f"b.{i}"
        header = {
            first: {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]},
            second: {"dtype": "F32", "shape": [size // 4], "data_offsets": [shift, shift + size]},
        }
        cases.append(Case("offsets", _file(header, _data(shift + size)), first if i % 2 else second))
    return cases


def _dtype_cases(rng: random.Random) -> list[Case]:
    dtypes: list[object] = ["F7", "FP32", "float32", "f32", "", "BF8", "Q4_0", "I128", "F32 ", "f16", "C64", "U1",
                            3, None, ["F32"], {"name": "F32"}, True, 4.0, "F8_E4M3FNUZ", "STRING"]
    cases = [Case("dtype", _with_bad_entry(rng, f"dtype.{i}", {"dtype": d, "shape": [4], "data_offsets": [0, 16]}),
                  f"dtype.{i}") for i, d in enumerate(dtypes)]
    cases += [Case("dtype", _with_bad_entry(rng, f"nodtype.{i}", {"shape": [4], "data_offsets": [0, 16]}),
                   f"nodtype.{i}") for i in range(5)]
    return cases


def _shape_cases(rng: random.Random) -> list[Case]:
    shapes: list[object] = [[-4], [4.0], ["4"], [[4]], [2, -2], [True, 4], None, 4, "4", {"0": 4}, [None],
                            [2, 2.5], [1e3], [2**64], [4, 1, 0.5]]
    cases = [Case("shape", _with_bad_entry(rng, f"shape.{i}", {"dtype": "F32", "shape": s, "data_offsets": [0, 16]}),
                  f"shape.{i}") for i, s in enumerate(shapes)]
    for i in range(20):  # well-formed shapes whose size disagrees with the offsets
        dims = [rng.randint(1, 6) for _ in range(rng.randint(0, 3))]
        elements = 1
        for d in dims:
            elements *= d
        wrong = 4 * elements + 4 * rng.choice([-1, 1, 2, 7]) if elements > 1 else 4 * elements + 4
        bad = {"dtype": "F32", "shape": dims, "data_offsets": [0, wrong]}
        cases.append(Case("shape", _with_bad_entry(rng, f"size.{i}", bad, wrong), f"size.{i}"))
    cases += [Case("shape", _with_bad_entry(rng, f"noshape.{i}", {"dtype": "F32", "data_offsets": [0, 16]}),
                   f"noshape.{i}") for i in range(5)]
    return cases


def _nesting_cases(rng: random.Random) -> list[Case]:
    cases = []
    for depth in (5000, 8000, 20000, 50000, 100000):
        cases.append(Case("nesting", _file(b"[" * depth + b"]" * depth), None))
        cases.append(Case("nesting", _file(b'{"a":' * depth + b"1" + b"}" * depth), None))
        inner = b'{"x":' * depth + b"0" + b"}" * depth
        cases.append(Case("nesting", _file(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "m": '
                                           + inner + b"}}", _data(4)), None))
    for i, entry in enumerate([[1, 2], "F32", 3, None, True, [], [{"dtype": "F32"}], 2.5, "", {"dtype": {}}]):
        cases.append(Case("nesting", _with_bad_entry(rng, f"entry.{i}", entry), f"entry.{i}"))  # type: ignore[arg-type]
    return cases


def _encoding_cases(rng: random.Random) -> list[Case]:
    good, end = _good(rng, 2)
    raw = json.dumps(good).encode()
    cases = []
    for junk in (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf5\x80\x80\x80", b"\xfe\xff",
                 b"\xf0\x9f\x98"):
        name = b'"bad' + junk + b'name"'
        header = raw[:1] + name + b': {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' + raw[1:]
        cases.append(Case("encoding", _file(header, _data(end + 4)), None))
    for codec in ("utf-16", "utf-16-le", "utf-32", "utf-8-sig"):
        cases.append(Case("encoding", _file(json.dumps(good).encode(codec), _data(end)), None))
    for position in (0, 1, len(raw) // 2, len(raw) - 1):
        cases.append(Case("encoding", _file(raw[:position] + b"\x00" + raw[position:], _data(end)), None))
    for control in (b"\n", b"\t", b"\x01", b"\x1f"):  # raw control characters inside a string
        header = raw[:2] + control + raw[2:]
        cases.append(Case("encoding", _file(header, _data(end)), None))
    for escape in ("\\ud800", "\\udfff", "\\ud83d", "x\\udc00y"):  # lone surrogates: not Unicode
        header = b'{"' + escape.encode() + b'": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
        cases.append(Case("encoding", _file(header, _data(4)), None))
    for text in (b"NaN", b"Infinity", b"-Infinity", b"'single'", b"{'w': 1}", b"// comment\n{}"):
        cases.append(Case("encoding", _file(text), None))
    return cases


def _duplicate_cases(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(15):
        header, end = _good(rng, rng.randint(1, 4))
        names = list(header)
        repeated = rng.choice(names)
        body = ", ".join(f"{json.dumps(n)}: {json.dumps(e)}" for n, e in header.items())
        entry = json.dumps({"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]})
        copies = ", ".join(f"{json.dumps(repeated)}: {entry}" for _ in range(rng.randint(1, 3)))
        cases.append(Case("duplicate", _file(("{" + body + ", " + copies + "}").encode(), _data(end + 4)), repeated))
    for i, key in enumerate(["dtype", "shape", "data_offsets", "dtype", "shape"]):
        entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4], ' + json.dumps(key) + ': "F32"}'
        cases.append(Case("duplicate", _file(f'{{"dup.{i}": {entry}}}'.encode(), _data(4)), None))
    for i in range(5):
        header = f'{{"__metadata__": {{"a": "{i}"}}, "__metadata__": {{"b": "{i}"}}}}'
        cases.append(Case("duplicate", _file(header.encode()), None))
    return cases


def _top_level_cases(rng: random.Random) -> list[Case]:
    documents = [b"[]", b'"text"', b"42", b"null", b"true", b"{} trailing", b"{", b"}", b"", b"   ", b"[{}]",
                 b'{"a": 1', b'{"a" 1}', b"{,}", b'{"a": [1, 2,]}']
    cases = [Case("top-level", _file(d), None) for d in documents]
    cases += [Case("top-level", b"", None), Case("top-level", b"\x00" * 8, None)]
    return cases


def _metadata_cases(rng: random.Random) -> list[Case]:
    values: list[object] = [[], "text", 3, None, True, {"a": 1}, {"a": None}, {"a": ["x"]}, {"a": {"b": "c"}},
                            {"a": True}, {"a": 1.5}, {"a": "ok", "b": 2}, [["a", "b"]], {"": 0}, {"n": -1}]
    cases = []
    for metadata in values:
        good, end = _good(rng, rng.randint(0, 3))
        cases.append(Case("metadata", _file({"__metadata__": metadata, **good}, _data(end)), None))
    return cases


def malformed_headers(seed: int = 2026) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []
    for make in (_length_cases, _offset_cases, _dtype_cases, _shape_cases, _nesting_cases, _encoding_cases,
                 _duplicate_cases, _top_level_cases, _metadata_cases):
        cases += make(rng)
    # Fill to COUNT with more entry-level faults on random models (the most varied kind).
    makers = (_offset_cases, _dtype_cases, _shape_cases)
    while len(cases) < COUNT:
        extra = rng.choice(makers)(rng)
        cases += extra[: COUNT - len(cases)]
    return cases[:COUNT]
