"""Phase (a) of a load, the model source: list the prefix, download every metadata file once into the cache
(keyed by the objects' versions), read each safetensors header with ranged reads and validate it. Blocking;
knows nothing of memory or streaming.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from weightd.daemon.errors import InvalidModelError, ModelNotFoundError, UnsupportedModelError
from weightd.daemon.safetensors_header import SafetensorsHeader, header_length, parse_header
from weightd.daemon.sharding import Architecture
from weightd.daemon.storage.base import ModelLocation, ObjectInfo, ObjectStore

WEIGHTS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
# Weight formats weightd does not serve; never downloaded as "metadata".
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl")
# One request usually covers the whole header.
HEADER_PROBE_BYTES = 64 * 1024
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Metadata:
    """Phase (a), first half: the listing, its revision and the local copy of the metadata files."""

    objects: dict[str, ObjectInfo]
    revision: str
    directory: Path
    files: tuple[str, ...]
    downloaded_bytes: int  # 0 when every file was already cached for this revision


@dataclass(frozen=True)
class ModelSource:
    """What phase (a) learned: enough to plan and stream any rank."""

    location: ModelLocation
    metadata: Metadata
    headers: tuple[SafetensorsHeader, ...]
    architecture: Architecture


def revision_of(objects: dict[str, ObjectInfo]) -> str:
    """Changes whenever any object under the prefix is added, removed or rewritten."""
    listing = sorted((o.name, o.size, o.version) for o in objects.values())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def current_revision(store: ObjectStore) -> str:
    return revision_of({o.name: o for o in store.list_objects()})


def fetch_metadata(store: ObjectStore, cache_dir: Path) -> Metadata:
    """Download every non-weight file once into ``<cache>/metadata/<uri hash>/<revision>/``.

    The directory is keyed by the objects' versions, so a file already there is the same object and is not
    downloaded again, across daemon restarts too; a changed object makes a new revision directory.
    """
    return _download_metadata(store, cache_dir, _listing(store))


def resolve(store: ObjectStore, cache_dir: Path) -> ModelSource:
    location = store.location
    objects = _listing(store)
    listed_weights = [info for name, info in objects.items() if name.endswith(WEIGHTS_SUFFIX)]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(listed_weights)))) as pool:
        # Both need only the listing: the headers are read while the metadata downloads, so a load waits one
        # round trip after the listing, not two. A file the index leaves out has its header read for nothing.
        header_reads = {info.name: pool.submit(_read_header, store, info) for info in listed_weights}
        metadata = _download_metadata(store, cache_dir, objects)
        weight_map = _weight_map(location, metadata.directory)
        weights = _weight_files(location, objects, weight_map)
        headers = tuple(
            header_reads[info.name].result() if info.name in header_reads else _read_header(store, info)
            for info in weights
        )
    _check_tensors(location, headers, weight_map)
    return ModelSource(
        location=location, metadata=metadata, headers=headers, architecture=_architecture(metadata.directory)
    )


def _listing(store: ObjectStore) -> dict[str, ObjectInfo]:
    objects = {o.name: o for o in store.list_objects()}
    _check_names(store.location, objects)
    return objects


def _download_metadata(store: ObjectStore, cache_dir: Path, objects: dict[str, ObjectInfo]) -> Metadata:
    revision = revision_of(objects)
    directory = cache_dir / "metadata" / hashlib.sha256(store.location.uri.encode()).hexdigest()[:16] / revision
    directory.mkdir(parents=True, exist_ok=True)
    files = tuple(sorted(n for n in objects if not n.endswith((WEIGHTS_SUFFIX, *OTHER_WEIGHT_SUFFIXES))))
    downloaded = sum(_in_parallel(lambda name: _cache_file(store, objects[name], directory), files))
    return Metadata(objects, revision, directory, files, downloaded)


def _in_parallel(request: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``request`` for every item at once (up to 8 in flight), in order: small objects cost one latency, not N."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        return list(pool.map(request, items))


def _check_names(location: ModelLocation, objects: dict[str, ObjectInfo]) -> None:
    for name in objects:
        if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
            raise InvalidModelError(f"{location.uri}: object name {name!r} would escape the metadata cache")


def _weight_files(
    location: ModelLocation, objects: dict[str, ObjectInfo], weight_map: dict[str, str] | None
) -> list[ObjectInfo]:
    if weight_map is not None:
        # The index names the shards; other *.safetensors beside it (e.g. consolidated copies) are not used.
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if s not in objects]
        if missing:
            raise ModelNotFoundError(
                f"{location.uri}: the index names shard(s) that do not exist: {', '.join(missing)}"
            )
        return [objects[s] for s in shards]
    weights = sorted(n for n in objects if n.endswith(WEIGHTS_SUFFIX))
    if not weights:
        others = sorted(n for n in objects if n.endswith(OTHER_WEIGHT_SUFFIXES))
        found = ", ".join(others) if others else "no weight files at all"
        raise UnsupportedModelError(
            f"{location.uri}: weightd serves only safetensors weights, found {found}; convert the checkpoint "
            "to safetensors (e.g. transformers save_pretrained(safe_serialization=True))"
        )
    return [objects[n] for n in weights]


def _cache_file(store: ObjectStore, info: ObjectInfo, directory: Path) -> int:
    """Download ``info`` unless this revision's directory has it; returns the bytes downloaded.

    Written to a temporary name and renamed, so a reader (or a crash) never sees a partial file.
    """
    destination = directory / info.name
    if destination.exists():
        return 0
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{info.name}.")
    os.close(fd)
    try:
        store.download(info.name, Path(temporary))
        os.replace(temporary, destination)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return info.size


def _read_header(store: ObjectStore, info: ObjectInfo) -> SafetensorsHeader:
    where = f"{store.location.uri.rstrip('/')}/{info.name}"
    probe = store.read_range(info.name, 0, min(info.size, HEADER_PROBE_BYTES))
    length = header_length(probe, file=where, file_size=info.size)
    end = 8 + length
    raw = probe[8:end] if end <= len(probe) else probe[8:] + store.read_range(info.name, len(probe), end - len(probe))
    header = parse_header(raw, file=where, file_size=info.size)
    # Keep the object name (not the display URI) as the file identity for planning and streaming.
    return SafetensorsHeader(file=info.name, file_size=header.file_size, data_start=header.data_start,
                             tensors=header.tensors)


def _check_tensors(
    location: ModelLocation, headers: Sequence[SafetensorsHeader], weight_map: dict[str, str] | None
) -> None:
    owner: dict[str, str] = {}
    for header in headers:
        for tensor in header.tensors:
            if tensor.name in owner:
                raise InvalidModelError(
                    f"{location.uri}: tensor {tensor.name!r} appears in both {owner[tensor.name]} and {header.file}"
                )
            owner[tensor.name] = header.file
    if not owner:
        raise InvalidModelError(f"{location.uri}: the safetensors files hold no tensors")
    for name, file in (weight_map or {}).items():
        if owner.get(name) != file:
            where = f"it is in {owner[name]}" if name in owner else "that shard does not hold it"
            raise InvalidModelError(f"{location.uri}: the index puts tensor {name!r} in {file}, but {where}")


def _weight_map(location: ModelLocation, metadata_dir: Path) -> dict[str, str] | None:
    indexes = sorted(metadata_dir.glob(f"*{INDEX_SUFFIX}"))
    if not indexes:
        return None
    if len(indexes) > 1:
        names = ", ".join(i.name for i in indexes)
        raise InvalidModelError(f"{location.uri}: several safetensors indexes ({names}); keep one per prefix")
    try:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidModelError(f"{location.uri}: {indexes[0].name} is not a valid index: {e}") from e
    if not isinstance(weight_map, dict):
        raise InvalidModelError(f"{location.uri}: {indexes[0].name}: weight_map must be an object")
    return {str(k): str(v) for k, v in weight_map.items()}


def _architecture(metadata_dir: Path) -> Architecture:
    """What the default tensor-parallel plans need from config.json (nothing, for a model without one)."""
    try:
        config = json.loads((metadata_dir / "config.json").read_text())
    except (OSError, ValueError):
        return Architecture(None, None)
    if not isinstance(config, dict):
        return Architecture(None, None)
    model_type = config.get("model_type")
    kv_heads = config.get("num_key_value_heads", config.get("num_attention_heads"))
    return Architecture(model_type if isinstance(model_type, str) else None,
                        kv_heads if isinstance(kv_heads, int) and kv_heads > 0 else None)

