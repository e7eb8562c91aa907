"""What is resident, who holds it, and the only owner of arenas' lifetimes.

Runs on the event loop; blocking load work goes to a thread pool. One load task may fill several entries
(all ranks of a tensor-parallel group); any request for an entry that is loading awaits that task, so
concurrent attaches and loads of one model cost one load.

Revisions: a resident entry is re-checked against storage (one listing) when a LoadModel asks for it, or on
attach once it is older than ``revalidate_after``. If anything under the prefix changed, the entry is retired
(no new leases; freed when its last lease ends) and the new revision is loaded beside it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightd.daemon import loader
from weightd.daemon.errors import ModelInUseError, ModelNotFoundError, WeightdError
from weightd.daemon.memory.base import Arena, MemoryBackend
from weightd.daemon.plan import RankLayout, build_plan
from weightd.daemon.sharding import ShardRule, check_group, parse_rules, select_rules
from weightd.daemon.storage.base import open_store, parse_model_uri

logger = logging.getLogger(__name__)


class State(enum.Enum):
    LOADING_METADATA = "loading_metadata"
    LOADING_WEIGHTS = "loading_weights"
    READY = "ready"


@dataclass(frozen=True)
class EntryKey:
    model_uri: str  # canonical (ModelLocation.uri)
    tp_size: int
    rank: int
    rules: tuple[ShardRule, ...]


@dataclass(frozen=True)
class LoadSettings:
    memory_limit: int
    # Accepted for parity with the streamer's extra config; without CUDA, streaming is never distributed.
    distributed: bool = False
    concurrency: int | None = None  # None: the daemon-wide setting


@dataclass
class Progress:
    """Shared by every entry one load task fills."""

    state: State = State.LOADING_METADATA
    bytes_done: int = 0
    bytes_total: int = 0


@dataclass
class Entry:
    key: EntryKey
    progress: Progress
    task: asyncio.Task[None]
    revision: str = ""
    metadata_dir: Path | None = None
    layout: RankLayout | None = None
    arena: Arena | None = None
    storage_bytes_read: int = 0
    metadata_bytes_downloaded: int = 0
    validated_at: float = 0.0
    leases: set[str] = field(default_factory=set)
    grant_template: Any = None  # the service's cached protobuf grant (opaque here)


@dataclass(frozen=True)
class EntrySnapshot:
    key: EntryKey
    revision: str
    state: State
    resident_bytes: int
    leases: int
    storage_bytes_read: int
    metadata_bytes_downloaded: int
    bytes_done: int
    bytes_total: int
    current: bool  # False once a newer revision replaced it (it lives on while leased)


class Registry:
    def __init__(self, memory: MemoryBackend, *, cache_dir: Path, settings: LoadSettings, max_parallel_loads: int):
        self._memory = memory
        self._cache_dir = cache_dir
        self._settings = settings
        self._entries: dict[EntryKey, Entry] = {}
        self._retired: list[Entry] = []
        self._leases: dict[str, Entry] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_parallel_loads, thread_name_prefix="weightd-load")

    @staticmethod
    def key(model_uri: str, *, tp_size: int, rank: int, rules: Sequence[ShardRule]) -> EntryKey:
        check_group(tp_size, rank)
        return EntryKey(parse_model_uri(model_uri).uri, tp_size, rank, parse_rules(rules))

    def progress_of(self, key: EntryKey) -> Progress | None:
        entry = self._entries.get(key)
        return entry.progress if entry else None

    async def ensure(
        self, keys: Sequence[EntryKey], *, settings: LoadSettings | None = None, revalidate_after: float | None = None
    ) -> list[Entry]:
        """Make every entry in ``keys`` (ranks of one model and tp_size) resident; missing ones load together.

        Resident entries last checked ``revalidate_after`` seconds ago or more are re-checked first.
        """
        if revalidate_after is not None:
            await self._revalidate(keys, revalidate_after)
        missing = [k for k in keys if k not in self._entries]
        if missing:
            self._start_load(missing, settings or self._settings)
        tasks = {self._entries[k].task for k in keys}
        # Shielded: a waiter that goes away (client disconnect) must not cancel a load others share.
        await asyncio.gather(*(asyncio.shield(t) for t in tasks))
        entries = [self._entries.get(k) for k in keys]
        if None in entries:  # evicted between the load finishing and this waiter resuming
            raise ModelNotFoundError(f"{keys[0].model_uri} was evicted while loading; load or attach it again")
        return [e for e in entries if e is not None]

    def acquire(self, entry: Entry) -> str:
        """Take a lease on a ready entry. Synchronous, so no eviction can slip in after ``ensure``."""
        if self._entries.get(entry.key) is not entry:
            raise ModelNotFoundError(f"{entry.key.model_uri} was evicted while attaching; attach again")
        lease_id = uuid.uuid4().hex
        entry.leases.add(lease_id)
        self._leases[lease_id] = entry
        return lease_id

    def release(self, lease_id: str) -> None:
        entry = self._leases.pop(lease_id, None)
        if entry is None:
            return
        entry.leases.discard(lease_id)
        logger.info("lease %s on %s rank %d ended", lease_id, entry.key.model_uri, entry.key.rank)
        if not entry.leases and entry in self._retired:
            self._retired.remove(entry)
            self._free(entry)

    async def metadata(self, model_uri: str) -> loader.Metadata:
        location = parse_model_uri(model_uri)
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(self._pool, open_store, location)
        return await loop.run_in_executor(self._pool, loader.fetch_metadata, store, self._cache_dir)

    def snapshot(self) -> list[EntrySnapshot]:
        return [
            EntrySnapshot(
                key=e.key,
                revision=e.revision,
                state=e.progress.state,
                resident_bytes=e.arena.size if e.arena else 0,
                leases=len(e.leases),
                storage_bytes_read=e.storage_bytes_read,
                metadata_bytes_downloaded=e.metadata_bytes_downloaded,
                bytes_done=e.progress.bytes_done,
                bytes_total=e.progress.bytes_total,
                current=current,
            )
            for entries, current in ((self._entries.values(), True), (self._retired, False))
            for e in entries
        ]

    def evict(self, model_uri: str) -> tuple[int, int]:
        """Free every ready, unleased entry of ``model_uri``; returns (entries, bytes) freed."""
        uri = parse_model_uri(model_uri).uri
        entries = [e for e in self._entries.values() if e.key.model_uri == uri]
        if not entries:
            raise ModelNotFoundError(f"{uri} is not resident; nothing to evict")
        free = [e for e in entries if not e.leases and e.arena is not None]
        if not free:
            leases = sum(len(e.leases) for e in entries)
            raise ModelInUseError(
                f"{uri} cannot be evicted: {leases} lease(s) hold it or it is still loading; "
                "detach the clients (or wait for the load) and evict again"
            )
        freed = 0
        for entry in free:
            del self._entries[entry.key]
            freed += self._free(entry)
        logger.info("evicted %d entr(y/ies) of %s, %d bytes", len(free), uri, freed)
        return len(free), freed

    async def close(self) -> None:
        """Stop: wait out running loads, then free every arena (the server has already ended all leases)."""
        await asyncio.gather(*(e.task for e in self._entries.values()), return_exceptions=True)
        for entry in [*self._entries.values(), *self._retired]:
            self._free(entry)
        self._entries.clear()
        self._retired.clear()
        self._pool.shutdown(wait=True)

    @staticmethod
    def _free(entry: Entry) -> int:
        if entry.arena is None:
            return 0
        size = entry.arena.size
        entry.arena.release()
        entry.arena = None
        return size

    async def _revalidate(self, keys: Sequence[EntryKey], max_age: float) -> None:
        now = time.monotonic()
        resident = [e for e in map(self._entries.get, keys) if e is not None and e.arena is not None]
        due = [e for e in resident if now - e.validated_at >= max_age]
        if not due:
            return
        loop = asyncio.get_running_loop()
        try:
            store = await loop.run_in_executor(self._pool, open_store, parse_model_uri(due[0].key.model_uri))
            revision = await loop.run_in_executor(self._pool, loader.current_revision, store)
        except WeightdError as e:
            # A node-local copy outlives a storage outage: keep serving what is resident.
            logger.warning("cannot re-check %s (%s); serving the resident revision", due[0].key.model_uri, e)
            return
        for entry in due:
            if self._entries.get(entry.key) is not entry:
                continue  # replaced while we listed
            if entry.revision == revision:
                entry.validated_at = now
                continue
            logger.info("%s changed in storage (revision %s -> %s); loading it beside the old one",
                        entry.key.model_uri, entry.revision, revision)
            del self._entries[entry.key]
            if entry.leases:
                self._retired.append(entry)
            else:
                self._free(entry)

    def _start_load(self, keys: list[EntryKey], settings: LoadSettings) -> None:
        progress = Progress()
        task = asyncio.get_running_loop().create_task(self._load(keys, progress, settings))
        # Mark the outcome retrieved: the waiters, if any are left, have it reported to them.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        for key in keys:
            self._entries[key] = Entry(key=key, progress=progress, task=task)

    async def _load(self, keys: list[EntryKey], progress: Progress, settings: LoadSettings) -> None:
        first = keys[0]
        loop = asyncio.get_running_loop()
        try:
            location = parse_model_uri(first.model_uri)
            store = await loop.run_in_executor(self._pool, open_store, location)
            source = await loop.run_in_executor(self._pool, loader.resolve, store, self._cache_dir)
            if settings.distributed:
                logger.info("distributed streaming needs CUDA; this node streams %s non-distributed", location.uri)
            rules = select_rules(source.model_type, first.rules, tp_size=first.tp_size)
            plan = build_plan(
                source.headers,
                tp_size=first.tp_size,
                ranks=[k.rank for k in keys],
                rules=rules,
                max_range_bytes=max(1 << 20, settings.memory_limit // 4),
            )
            progress.bytes_total = plan.fetched_bytes
            progress.state = State.LOADING_WEIGHTS

            def advance(n: int) -> None:
                progress.bytes_done += n  # one writer thread; readers on the loop tolerate a stale value

            label = f"{location.bucket}-{location.prefix.rstrip('/').rsplit('/', 1)[-1]}-tp{first.tp_size}"
            loaded = await loop.run_in_executor(
                self._pool,
                lambda: loader.stream(
                    store,
                    plan,
                    self._memory,
                    label=label,
                    memory_limit=settings.memory_limit,
                    concurrency=settings.concurrency,
                    on_progress=advance,
                ),
            )
        except BaseException:
            for key in keys:
                self._entries.pop(key, None)
            raise
        validated_at = time.monotonic()
        for key, rank in zip(keys, loaded, strict=True):
            entry = self._entries[key]
            entry.revision = source.metadata.revision
            entry.metadata_dir = source.metadata.directory
            entry.metadata_bytes_downloaded = source.metadata.downloaded_bytes
            entry.validated_at = validated_at
            entry.layout = rank.layout
            entry.arena = rank.arena
            entry.storage_bytes_read = rank.fetched_bytes
        progress.state = State.READY
        logger.info("%s (tp_size %d, ranks %s) is resident", first.model_uri, first.tp_size, [k.rank for k in keys])


def all_rank_keys(key: EntryKey) -> list[EntryKey]:
    return [EntryKey(key.model_uri, key.tp_size, rank, key.rules) for rank in range(key.tp_size)]
