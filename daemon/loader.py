"""One load, from a model location to filled arenas. Blocking: the registry runs it on a worker thread.

Phase (a), ``resolve``: list the prefix, download every metadata file once into the cache (keyed by the
objects' versions), read each safetensors header with ranged reads and validate it.
Phase (b), ``stream``: fetch exactly the planned byte ranges with runai-model-streamer, which writes them
straight into the arenas; only tensor-parallel slices that scatter pass through a bounded staging buffer.
A load that asks for its own concurrency streams in a helper process (``stream_helper``). Nothing touches
local disk.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from runai_model_streamer import FileStreamer
from runai_model_streamer.libstreamer.libstreamer import (
    SUCCESS_ERROR_CODE,
    runai_request,
    runai_response,
    runai_response_str,
)
from weightd.daemon.errors import (
    InvalidModelError,
    ModelNotFoundError,
    StorageUnavailableError,
    UnsupportedModelError,
    WeightdError,
)
from weightd.daemon.memory.base import Arena, MemoryBackend, MemoryHandle
from weightd.daemon.plan import ALIGNMENT, Block, LoadPlan, RankLayout, Target, align
from weightd.daemon.safetensors_header import SafetensorsHeader, header_length, parse_header
from weightd.daemon.storage.base import ModelLocation, ObjectInfo, ObjectStore

logger = logging.getLogger(__name__)

WEIGHTS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
# Weight formats weightd does not serve; never downloaded as "metadata".
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl")
# One request usually covers the whole header.
HEADER_PROBE_BYTES = 64 * 1024
# One line per message from stream_helper to the daemon: "<kind> <detail>".
HELPER_LANDED, HELPER_FAILED, HELPER_DONE = "landed", "failed", "done"
HELPER_EXIT_TIMEOUT_S = 10
# Object-store clients and file queue depth; RUNAI_STREAMER_CONCURRENCY fills whichever is unset.
CONCURRENCY_OVERRIDES = ("RUNAI_STREAMER_OBJ_CONCURRENCY", "RUNAI_STREAMER_FS_QUEUE_DEPTH")
_LIBC = ctypes.CDLL(None)  # the C library this process already uses


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
    model_type: str | None


@dataclass(frozen=True)
class LoadedRank:
    layout: RankLayout
    arena: Arena
    fetched_bytes: int


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
    location = store.location
    objects = {o.name: o for o in store.list_objects()}
    _check_names(location, objects)
    revision = revision_of(objects)
    directory = cache_dir / "metadata" / hashlib.sha256(location.uri.encode()).hexdigest()[:16] / revision
    directory.mkdir(parents=True, exist_ok=True)
    files = tuple(sorted(n for n in objects if not n.endswith((WEIGHTS_SUFFIX, *OTHER_WEIGHT_SUFFIXES))))
    downloaded = sum(_cache_file(store, objects[name], directory) for name in files)
    return Metadata(objects, revision, directory, files, downloaded)


def resolve(store: ObjectStore, cache_dir: Path) -> ModelSource:
    location = store.location
    metadata = fetch_metadata(store, cache_dir)
    weight_map = _weight_map(location, metadata.directory)
    weights = _weight_files(location, metadata.objects, weight_map)
    with ThreadPoolExecutor(max_workers=min(8, len(weights))) as pool:
        headers = tuple(pool.map(lambda info: _read_header(store, info), weights))
    _check_tensors(location, headers, weight_map)
    return ModelSource(
        location=location, metadata=metadata, headers=headers, model_type=_model_type(metadata.directory)
    )


def stream(
    store: ObjectStore,
    plan: LoadPlan,
    memory: MemoryBackend,
    *,
    label: str,
    memory_limit: int,
    concurrency: int | None,
    on_progress: Callable[[int], None],
) -> list[LoadedRank]:
    """Fill one arena per layout in ``plan``. On any failure every arena is released before raising.

    ``concurrency`` None, or what this process's streamer settings give anyway, streams in this process;
    another number streams in a helper process started with that concurrency (see ``stream_helper``).
    """
    arenas: list[Arena] = []
    paths = [store.streamer_path(f.file) for f in plan.files]
    helper_concurrency = None if concurrency is None or _process_concurrency_is(concurrency) else concurrency
    started = time.monotonic()
    try:
        for layout in plan.layouts:
            arenas.append(memory.allocate(layout.size, label=f"{label}-r{layout.rank}"))
        try:
            if helper_concurrency is None:
                fetch_into([a.tensor() for a in arenas], paths, plan, memory_limit=memory_limit,
                           on_progress=on_progress)
            else:
                _fetch_in_helper(arenas, paths, plan, memory_limit=memory_limit, concurrency=helper_concurrency,
                                 on_progress=on_progress)
        except ValueError as e:
            raise _explain(store, [f.file for f in plan.files], e) from e
    except BaseException:
        for arena in arenas:
            arena.release()
        raise
    elapsed = time.monotonic() - started
    logger.info(
        "streamed %d bytes from %s in %.2f s (%.2f GB/s; %s)",
        plan.fetched_bytes,
        store.location.uri,
        elapsed,
        plan.fetched_bytes / max(elapsed, 1e-9) / 1e9,
        "daemon-wide concurrency" if helper_concurrency is None else f"concurrency {helper_concurrency} in a helper",
    )
    return [
        LoadedRank(layout, arena, fetched)
        for layout, arena, fetched in zip(plan.layouts, arenas, plan.fetched_bytes_by_layout, strict=True)
    ]


def _return_freed_heap() -> None:
    """Give the C heap's free pages back to the OS.

    The streamer's workers and S3 clients free tens of MB of buffers when a streamer ends, and glibc keeps
    them in its per-thread arenas: without this the daemon grew by about 50 MB per 1 GB load, with it 15 MB
    (benchmark f). Other C libraries may not have malloc_trim; they keep their own policy.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _process_concurrency_is(concurrency: int) -> bool:
    return os.environ.get("RUNAI_STREAMER_CONCURRENCY") == str(concurrency) and not any(
        name in os.environ for name in CONCURRENCY_OVERRIDES
    )


@dataclass(frozen=True)
class HelperJob:
    """What ``stream_helper`` needs to fill arenas it did not allocate: sent to it through a pipe."""

    paths: list[str]
    plan: LoadPlan
    handles: list[MemoryHandle]  # one per plan.layouts entry, each arena of that layout's size
    memory_limit: int


def _fetch_in_helper(
    arenas: list[Arena],
    paths: list[str],
    plan: LoadPlan,
    *,
    memory_limit: int,
    concurrency: int,
    on_progress: Callable[[int], None],
) -> None:
    """Run ``fetch_into`` in a child process whose environment carries this load's streamer settings.

    Raises ValueError, as the streamer does, when the child reports a failure or dies.
    """
    job = HelperJob(paths, plan, [a.handle for a in arenas], memory_limit)
    # The streamer's specific variables beat RUNAI_STREAMER_CONCURRENCY; this load's value must win.
    environment = {k: v for k, v in os.environ.items() if k not in CONCURRENCY_OVERRIDES}
    environment["RUNAI_STREAMER_CONCURRENCY"] = str(concurrency)
    process = subprocess.Popen(
        [sys.executable, "-m", "weightd.daemon.stream_helper"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        # Parent to its own child over an anonymous pipe: nothing untrusted is unpickled.
        pickle.dump(job, process.stdin)
        process.stdin.flush()
        for line in process.stdout:
            kind, _, detail = line.decode().rstrip("\n").partition(" ")
            if kind == HELPER_LANDED:
                on_progress(int(detail))
            elif kind == HELPER_FAILED:
                raise ValueError(detail)
            elif kind == HELPER_DONE:
                return
        raise ValueError(f"the streaming helper exited with status {process.wait()} before the load finished")
    finally:
        process.stdin.close()  # the helper exits when its stdin closes, even mid-stream
        try:
            process.wait(timeout=HELPER_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@dataclass(frozen=True)
class _Direct:
    """Bytes the streamer writes straight into an arena: no buffer, no copy."""

    file_index: int
    file_offset: int
    length: int
    layout_index: int
    dst_offset: int


@dataclass(frozen=True)
class _Staged:
    """A block whose bytes scatter (row slices for several ranks): fetched into a staging buffer first."""

    file_index: int
    block: Block


@dataclass(frozen=True)
class _Duplicate:
    """A replicated tensor's bytes, fetched once into one rank's arena and copied to another's."""

    src_layout: int
    src_offset: int
    dst_layout: int
    dst_offset: int
    length: int


def _route(plan: LoadPlan) -> tuple[list[_Direct], list[_Staged], list[_Duplicate]]:
    """Split the plan's blocks into direct writes, staged scatters and in-memory duplicates.

    Exactly the plan's bytes are fetched, each once. A single-row block whose targets' windows tile it is
    read as one direct range per window (a replicated tensor's one window: one range, then copies); a block
    of whole rows for one rank is one direct range; anything else is staged and scattered.
    """
    direct: list[_Direct] = []
    staged: list[_Staged] = []
    duplicates: list[_Duplicate] = []
    for file_index, file_plan in enumerate(plan.files):
        for block in file_plan.blocks:
            first = block.targets[0]
            windows = {(t.column, t.width) for t in block.targets}
            if block.rows == 1 and sum(width for _, width in windows) == block.width:
                fetched: dict[tuple[int, int], Target] = {}
                for t in block.targets:
                    if (t.column, t.width) in fetched:
                        src = fetched[(t.column, t.width)]
                        duplicates.append(
                            _Duplicate(src.layout_index, src.dst_offset, t.layout_index, t.dst_offset, t.width)
                        )
                    else:
                        fetched[(t.column, t.width)] = t
                        direct.append(
                            _Direct(file_index, block.file_offset + t.column, t.width, t.layout_index, t.dst_offset)
                        )
            elif len(block.targets) == 1 and first.width == block.width == first.dst_row_stride:
                direct.append(_Direct(file_index, block.file_offset, block.length, first.layout_index,
                                      first.dst_offset))
            else:
                staged.append(_Staged(file_index, block))
    return direct, staged, duplicates


def fetch_into(
    destinations: list[torch.Tensor],
    paths: list[str],
    plan: LoadPlan,
    *,
    memory_limit: int,
    on_progress: Callable[[int], None],
) -> None:
    """Drive the streamer's range API directly so that it writes into the arenas themselves.

    ``paths`` are the streamer's paths of ``plan.files``. ``memory_limit`` bounds only the staging buffer
    that scattered blocks pass through. A storage failure raises the streamer's ValueError.
    """
    direct, staged, duplicates = _route(plan)
    if not direct and not staged:
        return
    bases = [d.data_ptr() for d in destinations]
    staged_bytes = sum(s.block.length for s in staged)
    largest = max((s.block.length for s in staged), default=0)
    padded = staged_bytes + ALIGNMENT * len(staged)  # batches start blocks on aligned offsets
    staging = torch.empty(max(largest, min(memory_limit, padded)), dtype=torch.uint8)
    try:
        # The streamer session owns the C handle and applies object-store credentials once.
        with FileStreamer() as session:
            session.handle_object_store(paths[0], session.streamer)
            reader = _RangeReader(session.streamer, paths)
            reader.submit([_Range(d.file_index, d.file_offset, d.length, bases[d.layout_index] + d.dst_offset,
                                  functools.partial(on_progress, d.length)) for d in direct])
            for batch in _batches(staged, staging.numel()):
                reader.submit([_staged_range(item, staging[cursor:], destinations, on_progress)
                               for cursor, item in batch])
                reader.wait()  # the next batch reuses the staging buffer
            reader.wait()
    finally:
        _return_freed_heap()  # the streamer has ended and freed its buffers
    _copy_duplicates(duplicates, destinations)


@dataclass(frozen=True)
class _Range:
    file_index: int
    file_offset: int
    length: int
    address: int  # where the streamer writes it
    landed: Callable[[], None]


def _staged_range(
    item: _Staged, buffer: torch.Tensor, destinations: list[torch.Tensor], on_progress: Callable[[int], None]
) -> _Range:
    view = buffer[: item.block.length]

    def landed() -> None:
        _scatter_block(view, item.block, destinations)
        on_progress(item.block.length)

    return _Range(item.file_index, item.block.file_offset, item.block.length, view.data_ptr(), landed)


class _RangeReader:
    """Submit ranges to libstreamer and run each one's callback when its response arrives.

    Destinations are raw addresses: nothing may free them while a range is in flight, so ``wait`` drains
    every outstanding response even when it fails.
    """

    def __init__(self, handle: object, paths: list[str]) -> None:
        self.handle = handle
        self.paths = paths
        self.callbacks: dict[int, list[list[Callable[[], None]]]] = {}  # submission -> file -> range
        self.outstanding = 0

    def submit(self, ranges: list[_Range]) -> None:
        if not ranges:
            return
        by_file: dict[int, list[_Range]] = {}
        for r in ranges:
            by_file.setdefault(r.file_index, []).append(r)
        files = sorted(by_file)
        grouped = [r for f in files for r in by_file[f]]
        submission = runai_request(
            self.handle,
            [self.paths[f] for f in files],
            [len(by_file[f]) for f in files],
            [r.file_offset for r in grouped],
            [r.length for r in grouped],
            [r.address for r in grouped],
        )
        self.callbacks[submission] = [[r.landed for r in by_file[f]] for f in files]
        self.outstanding += len(ranges)

    def wait(self) -> None:
        try:
            while self.outstanding:
                response = runai_response(self.handle)
                if response is None:
                    raise ValueError("the streamer stopped before every range arrived")
                status, submission, file_index, range_index, _ = response
                self.outstanding -= 1
                if status != SUCCESS_ERROR_CODE:
                    raise ValueError(f"libstreamer could not read a range: {runai_response_str(status)}")
                self.callbacks[submission][file_index][range_index]()
        finally:
            while self.outstanding and runai_response(self.handle) is not None:
                self.outstanding -= 1


def _batches(staged: list[_Staged], capacity: int) -> list[list[tuple[int, _Staged]]]:
    """Pack staged blocks into batches that fit the staging buffer: (offset in the buffer, block)."""
    batches: list[list[tuple[int, _Staged]]] = []
    cursor = capacity
    for item in staged:
        length = item.block.length
        if cursor + length > capacity:
            batches.append([])
            cursor = 0
        batches[-1].append((cursor, item))
        cursor = align(cursor + length)  # word-aligned starts keep the scatter in 8-byte words
    return batches


def _copy_duplicates(duplicates: list[_Duplicate], destinations: list[torch.Tensor]) -> None:
    for d in duplicates:
        destinations[d.dst_layout][d.dst_offset : d.dst_offset + d.length].copy_(
            destinations[d.src_layout][d.src_offset : d.src_offset + d.length]
        )


# Strided copies run several times faster in 8-byte words than in bytes.
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _scatter_block(data: torch.Tensor, block: Block, destinations: list[torch.Tensor]) -> None:
    """Copy each target's columns of the ``block.rows`` x ``block.width`` bytes at the start of ``data``."""
    raw = data[: block.length]
    for t in block.targets:
        dst = destinations[t.layout_index]
        geometry = (block.width, t.column, t.width, t.dst_row_stride, t.dst_offset, raw.data_ptr(), dst.data_ptr())
        word = next(w for w in _WORDS if all(v % w == 0 for v in geometry))
        rows = raw.view(_WORDS[word]).view(block.rows, block.width // word)
        target = dst.view(_WORDS[word]).as_strided(
            (block.rows, t.width // word), (t.dst_row_stride // word, 1), t.dst_offset // word
        )
        target.copy_(rows[:, t.column // word : (t.column + t.width) // word])


def _explain(store: ObjectStore, files: Sequence[str], error: ValueError) -> WeightdError:
    """The streamer reports every storage failure as "File access error": ask storage what is wrong."""
    for name in files:
        try:
            store.stat(name)
        except WeightdError as cause:
            return cause
    return StorageUnavailableError(
        f"{store.location.uri}: streaming failed although every object is readable ({error}); "
        "this is usually transient: retry, or lower --concurrency"
    )


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


def _model_type(metadata_dir: Path) -> str | None:
    try:
        value = json.loads((metadata_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None

