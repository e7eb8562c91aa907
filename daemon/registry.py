"""What is resident, who holds it, and the only owner of arenas' lifetimes: residency, leases, single flight,
revisions and the memory budget. The load itself is weightd.daemon.loader's.

Runs on the event loop; blocking load work goes to a thread pool. One load task may fill several entries
(all ranks of a tensor-parallel group); any request for an entry that is loading awaits that task, so
concurrent attaches and loads of one model cost one load.

Revisions: a resident entry is re-checked against storage (one listing) when a LoadModel asks for it, or on
attach once it is older than ``revalidate_after``. If anything under the prefix changed, the entry is retired
(no new leases; freed when its last lease ends) and the new revision is loaded beside it.

Budget: arenas (resident, retired and being loaded) may hold at most ``budget`` bytes. A load that does not
fit evicts unleased ready entries, least recently attached first; if what leases and loads hold leaves no
room, it fails with OutOfMemoryError. A completed arena is recorded in a manifest, so a restarted daemon
adopts it (``adopt``) instead of reading the model again.
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

from weightd.daemon import loader, source
from weightd.daemon.errors import ModelInUseError, ModelNotFoundError, OutOfMemoryError, WeightdError
from weightd.daemon.loader import LoadSettings
from weightd.daemon.manifests import ArenaManifest, ManifestStore
from weightd.daemon.memory.base import AdoptionError, Arena, MemoryBackend
from weightd.daemon.plan import RankLayout
from weightd.daemon.sharding import ShardRule, check_group, parse_rules
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

    def describe(self) -> str:
        return self.model_uri if self.tp_size == 1 else f"{self.model_uri} (rank {self.rank} of {self.tp_size})"


@dataclass
class Progress:
    """Shared by every entry one load task fills."""

    state: State = State.LOADING_METADATA
    bytes_done: int = 0
    bytes_total: int = 0


@dataclass(eq=False)  # identity: the service caches each entry's grant by it
class Entry:
    key: EntryKey
    progress: Progress
    task: asyncio.Future[None]
    revision: str = ""
    metadata_dir: Path | None = None
    layout: RankLayout | None = None
    arena: Arena | None = None
    reserved_bytes: int = 0  # budget held while loading, before the arena exists
    storage_bytes_read: int = 0
    metadata_bytes_downloaded: int = 0
    validated_at: float = 0.0  # time.monotonic()
    last_used: float = 0.0  # Unix time of the last attach (or of the load)
    leases: set[str] = field(default_factory=set)

    @property
    def held_bytes(self) -> int:
        return self.arena.size if self.arena is not None else self.reserved_bytes


@dataclass(frozen=True)
class EntrySnapshot:
    key: EntryKey
    revision: str
    state: State
    memory_kind: str
    resident_bytes: int
    leases: int
    storage_bytes_read: int
    metadata_bytes_downloaded: int
    bytes_done: int
    bytes_total: int
    current: bool  # False once a newer revision replaced it (it lives on while leased)
    last_used: float


@dataclass(frozen=True)
class MemoryUsage:
    kind: str
    limit_bytes: int
    used_bytes: int
    capacity_bytes: int


class Registry:
    def __init__(
        self,
        memory: MemoryBackend,
        *,
        manifests: ManifestStore,
        cache_dir: Path,
        settings: LoadSettings,
        budget: int,
        max_parallel_loads: int,
    ) -> None:
        self._memory = memory
        self._manifests = manifests
        self._cache_dir = cache_dir
        self._settings = settings
        self._budget = budget
        self._entries: dict[EntryKey, Entry] = {}
        self._retired: list[Entry] = []
        self._leases: dict[str, Entry] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_parallel_loads, thread_name_prefix="weightd-load")

    @staticmethod
    def key(model_uri: str, *, tp_size: int, rank: int, rules: Sequence[ShardRule]) -> EntryKey:
        check_group(tp_size, rank)
        return EntryKey(parse_model_uri(model_uri).uri, tp_size, rank, parse_rules(rules))

    def adopt(self) -> None:
        """Take over the arenas a previous daemon completed (their manifests say what they hold); free the
        rest. Reads nothing from storage. Call once, on the event loop, before serving."""
        manifests = self._manifests.read_all()
        newest: dict[EntryKey, ArenaManifest] = {}
        for manifest in manifests:
            key = EntryKey(manifest.model_uri, manifest.tp_size, manifest.rank, manifest.rules)
            other = newest.get(key)
            if other is None or manifest.loaded_at > other.loaded_at:
                newest[key] = manifest
        adopted: list[EntryKey] = []
        keep: set[str] = set()
        for key, manifest in newest.items():
            try:
                if manifest.arena_kind != self._memory.kind:
                    raise AdoptionError(f"it is {manifest.arena_kind} memory; this daemon serves {self._memory.kind}")
                if not manifest.metadata_dir.is_dir():
                    raise AdoptionError(f"its metadata directory {manifest.metadata_dir} is gone")
                arena = self._memory.adopt(manifest.arena_name, manifest.arena_size)
            except AdoptionError as e:
                logger.warning("not adopting the arena of %s: %s", key.describe(), e)
                continue
            self._entries[key] = self._adopted_entry(key, manifest, arena)
            adopted.append(key)
            keep.add(arena.name)
        for manifest in manifests:
            if manifest.arena_name not in keep:
                self._manifests.remove(manifest.arena_name)
        self._memory.remove_orphans(keep)
        if adopted:
            logger.info("adopted %d resident entr(y/ies) from the previous daemon: %s", len(adopted),
                        ", ".join(k.describe() for k in adopted))

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
        entry.last_used = time.time()
        self._leases[lease_id] = entry
        return lease_id

    def release(self, lease_id: str) -> None:
        entry = self._leases.pop(lease_id, None)
        if entry is None:
            return
        entry.leases.discard(lease_id)
        logger.info("lease %s on %s ended", lease_id, entry.key.describe())
        if not entry.leases and entry in self._retired:
            self._retired.remove(entry)
            self._free(entry)

    def leased_arenas(self, lease_id: str) -> list[Arena] | None:
        """The arenas a live lease may receive, in grant order; None when no such lease is live."""
        entry = self._leases.get(lease_id)
        if entry is None or entry.arena is None:
            return None
        return [entry.arena]

    async def metadata(self, model_uri: str) -> source.Metadata:
        location = parse_model_uri(model_uri)
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(self._pool, open_store, location)
        return await loop.run_in_executor(self._pool, source.fetch_metadata, store, self._cache_dir)

    def snapshot(self) -> list[EntrySnapshot]:
        return [
            EntrySnapshot(
                key=e.key,
                revision=e.revision,
                state=e.progress.state,
                memory_kind=self._memory.kind,
                resident_bytes=e.arena.size if e.arena else 0,
                leases=len(e.leases),
                storage_bytes_read=e.storage_bytes_read,
                metadata_bytes_downloaded=e.metadata_bytes_downloaded,
                bytes_done=e.progress.bytes_done,
                bytes_total=e.progress.bytes_total,
                current=current,
                last_used=e.last_used,
            )
            for entries, current in ((self._entries.values(), True), (self._retired, False))
            for e in entries
        ]

    def memory_usage(self) -> list[MemoryUsage]:
        return [MemoryUsage(self._memory.kind, self._budget, self._used_bytes(), self._memory.capacity())]

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

    async def close(self, *, keep_arenas: bool) -> None:
        """Stop: wait out running loads, then let go of every arena (the server has already ended all
        leases). With ``keep_arenas``, current entries' arenas stay, with their manifests, for the next start."""
        await asyncio.gather(*(e.task for e in self._entries.values()), return_exceptions=True)
        for entry in self._entries.values():
            if keep_arenas and entry.arena is not None:
                entry.arena.detach()
                entry.arena = None
            else:
                self._free(entry)
        for entry in self._retired:
            self._free(entry)
        self._entries.clear()
        self._retired.clear()
        self._pool.shutdown(wait=True)

    def _used_bytes(self) -> int:
        return sum(e.held_bytes for e in [*self._entries.values(), *self._retired])

    def _free(self, entry: Entry) -> int:
        if entry.arena is None:
            return 0
        size = entry.arena.size
        # The manifest goes first: a crash in between leaves an unrecorded arena, which the next start removes.
        self._manifests.remove(entry.arena.name)
        entry.arena.release()
        entry.arena = None
        return size

    def _make_room(self, keys: Sequence[EntryKey], needed: int) -> None:
        """Reserve ``needed`` bytes for loading ``keys``, evicting unleased ready entries, least recently
        used first, when the budget requires it."""
        used = self._used_bytes()
        if used + needed > self._budget:
            evictable = sorted(
                (e for e in self._entries.values() if e.arena is not None and not e.leases and e.key not in keys),
                key=lambda e: e.last_used,
            )
            if used - sum(e.held_bytes for e in evictable) + needed > self._budget:
                raise OutOfMemoryError(self._no_room(keys[0], needed, used))
            for entry in evictable:
                if used + needed <= self._budget:
                    break
                del self._entries[entry.key]
                used -= self._free(entry)
                logger.info("evicted %s (unleased, last used %s) to make room for %s",
                            entry.key.describe(), time.ctime(entry.last_used), keys[0].describe())

    def _no_room(self, key: EntryKey, needed: int, used: int) -> str:
        holders = [
            f"{e.key.describe()} ({_mib(e.held_bytes)}, "
            + (f"{len(e.leases)} lease(s)" if e.leases else "loading") + ")"
            for e in [*self._entries.values(), *self._retired]
            if e.held_bytes and (e.leases or e.arena is None)
        ]
        return (
            f"{key.describe()} needs {_mib(needed)} of {self._memory.kind} memory, but the budget is "
            f"{_mib(self._budget)} (--{self._memory.kind}-memory-limit) and {_mib(used)} of it is in use; "
            + (f"held by: {', '.join(holders)}; " if holders else "")
            + "evicting every unleased model would not make room: detach clients or raise the limit"
        )

    async def _revalidate(self, keys: Sequence[EntryKey], max_age: float) -> None:
        now = time.monotonic()
        resident = [e for e in map(self._entries.get, keys) if e is not None and e.arena is not None]
        due = [e for e in resident if now - e.validated_at >= max_age]
        if not due:
            return
        loop = asyncio.get_running_loop()
        try:
            store = await loop.run_in_executor(self._pool, open_store, parse_model_uri(due[0].key.model_uri))
            revision = await loop.run_in_executor(self._pool, source.current_revision, store)
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
        loaded: list[loader.LoadedRank] = []
        try:
            prepared = await loop.run_in_executor(
                self._pool,
                lambda: loader.prepare(
                    parse_model_uri(first.model_uri),
                    cache_dir=self._cache_dir,
                    tp_size=first.tp_size,
                    ranks=[k.rank for k in keys],
                    rules=first.rules,
                    settings=settings,
                ),
            )
            self._make_room(keys, prepared.arena_bytes)
            for key, layout in zip(keys, prepared.plan.layouts, strict=True):
                self._entries[key].reserved_bytes = layout.size
            progress.bytes_total = prepared.plan.fetched_bytes
            progress.state = State.LOADING_WEIGHTS

            def advance(n: int) -> None:
                progress.bytes_done += n  # one writer thread; readers on the loop tolerate a stale value

            loaded = await loop.run_in_executor(
                self._pool, lambda: loader.stream(prepared, self._memory, settings=settings, on_progress=advance)
            )
            metadata = prepared.source.metadata
            now = time.time()
            manifests = [
                ArenaManifest(
                    model_uri=key.model_uri, tp_size=key.tp_size, rank=key.rank, rules=key.rules,
                    revision=metadata.revision,
                    object_versions={o.name: (o.size, o.version) for o in metadata.objects.values()},
                    metadata_dir=metadata.directory, layout=rank.layout, arena_kind=self._memory.kind,
                    arena_name=rank.arena.name, arena_size=rank.arena.size, storage_bytes_read=rank.fetched_bytes,
                    metadata_bytes_downloaded=metadata.downloaded_bytes, loaded_at=now, validated_at=now,
                )
                for key, rank in zip(keys, loaded, strict=True)
            ]
            await loop.run_in_executor(self._pool, self._manifests.write_all, manifests)
        except BaseException:
            for rank in loaded:
                self._manifests.remove(rank.arena.name)
                rank.arena.release()
            for key in keys:
                self._entries.pop(key, None)
            raise
        for key, manifest, rank in zip(keys, manifests, loaded, strict=True):
            entry = self._entries[key]
            self._fill(entry, manifest, rank.arena, validated_at=time.monotonic())
        progress.state = State.READY
        logger.info("%s (tp_size %d, ranks %s) is resident", first.model_uri, first.tp_size, [k.rank for k in keys])

    def _adopted_entry(self, key: EntryKey, manifest: ArenaManifest, arena: Arena) -> Entry:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        entry = Entry(key=key, progress=Progress(State.READY), task=done)
        # The manifest's check against storage keeps its age: an old one is re-checked on the next attach.
        age = max(0.0, time.time() - manifest.validated_at)
        self._fill(entry, manifest, arena, validated_at=time.monotonic() - age)
        entry.progress.bytes_done = entry.progress.bytes_total = manifest.storage_bytes_read
        return entry

    @staticmethod
    def _fill(entry: Entry, manifest: ArenaManifest, arena: Arena, *, validated_at: float) -> None:
        entry.revision = manifest.revision
        entry.metadata_dir = manifest.metadata_dir
        entry.metadata_bytes_downloaded = manifest.metadata_bytes_downloaded
        entry.layout = manifest.layout
        entry.arena = arena
        entry.reserved_bytes = 0
        entry.storage_bytes_read = manifest.storage_bytes_read
        entry.validated_at = validated_at
        entry.last_used = manifest.loaded_at


def all_rank_keys(key: EntryKey) -> list[EntryKey]:
    return [EntryKey(key.model_uri, key.tp_size, rank, key.rules) for rank in range(key.tp_size)]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
