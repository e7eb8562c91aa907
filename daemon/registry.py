"""What is resident, who holds it, and the only owner of arenas' lifetimes: residency, leases, single flight,
revisions and the memory budget. The load itself is weightd.daemon.loader's.

Runs on the event loop; blocking load work goes to a thread pool. One load task may fill several entries
(all ranks of a tensor-parallel group); any request for an entry that is loading awaits that task, so
concurrent attaches and loads of one model cost one load.

Revisions: a resident entry is re-checked against storage (one listing) when a LoadModel asks for it, or on
attach once it is older than ``revalidate_after``. If anything under the prefix changed, the entry is retired
(no new leases; freed when its last lease ends) and the new revision is loaded beside it.

Memory: an entry lives in host memory, or on one GPU (its key names the GPU's UUID). Each memory (host, and
each GPU) has its own budget: arenas (resident, retired and being loaded) may hold at most that many bytes.
A load that does not fit evicts unleased ready entries of that memory, least recently attached first; if
what leases and loads hold leaves no room, it fails with OutOfMemoryError. A completed host arena is
recorded in a manifest per entry, so a restarted daemon adopts it (``adopt``) instead of reading the model
again. All ranks of a tensor-parallel group loaded into host memory together share one arena (a group arena,
weightd.daemon.plan): it is freed with the last entry holding it, and evicted only with all of them.

GPU entries are filled from host entries of the same model and rank, the host tier: a cold GPU load
streams into host arenas (one per rank) and copies each range on to the GPU as it lands
(weightd.daemon.mirror); a GPU entry whose host tier is resident (kept after an earlier load, a group arena,
or adopted after a restart) is one copy away, with no storage reads. With ``keep_host_tier`` off, a cold GPU
load frees its host arenas at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import threading
import time
import uuid
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from weightd.daemon import loader, source
from weightd.daemon.devices import pick
from weightd.daemon.errors import (
    ModelInUseError,
    ModelNotFoundError,
    OutOfMemoryError,
    ShuttingDownError,
    WeightdError,
)
from weightd.daemon.gc_pause import collection_paused
from weightd.daemon.loader import LoadSettings
from weightd.daemon.manifests import ArenaManifest, ManifestStore
from weightd.daemon.memory.base import (
    HOST,
    AdoptionError,
    Arena,
    DeviceArena,
    DeviceBackend,
    FillableArena,
    HostBackend,
    MemoryBackend,
)
from weightd.daemon.metrics import Gauges, MemoryGauge, Metrics
from weightd.daemon.mirror import DeviceMirror, copy_rearranged, copy_whole
from weightd.daemon.placement import Fusion, check_fusions
from weightd.daemon.plan import RankLayout, even_shares, own_arena_layout
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
    device: str = ""  # the GPU's UUID; empty: host memory
    fusions: tuple[Fusion, ...] = ()

    def describe(self) -> str:
        where = f" on {self.device}" if self.device else ""
        if self.tp_size == 1:
            return f"{self.model_uri}{where}"
        return f"{self.model_uri} (rank {self.rank} of {self.tp_size}){where}"

    def on_host(self) -> EntryKey:
        """The host-tier entry a GPU entry is filled from."""
        return dataclasses.replace(self, device="")


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


@dataclass(frozen=True)
class EntrySnapshot:
    key: EntryKey
    revision: str
    state: State
    memory_kind: str  # HOST or CUDA
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
    device_uuid: str  # empty for host memory
    limit_bytes: int
    used_bytes: int
    capacity_bytes: int


@dataclass(frozen=True)
class MemoryPool:
    """One memory the registry allocates from, and how much of it arenas may hold."""

    backend: MemoryBackend
    budget: int

    @property
    def limit_flag(self) -> str:
        return "--host-memory-limit" if self.backend.kind == HOST else "--gpu-memory-limit"


class Registry:
    def __init__(
        self,
        host: HostBackend,
        *,
        host_budget: int,
        gpus: Sequence[tuple[DeviceBackend, int]] = (),
        gpus_unavailable: str = "",
        keep_host_tier: bool = True,
        manifests: ManifestStore,
        cache_dir: Path,
        settings: LoadSettings,
        max_parallel_loads: int,
        metrics: Metrics,
    ) -> None:
        """``gpus``: each GPU's backend and budget; ``gpus_unavailable`` says why there is none."""
        self._host = host
        self._gpus_unavailable = gpus_unavailable
        self._pools: dict[str, MemoryPool] = {"": MemoryPool(host, host_budget)}
        self._gpu_backends: dict[str, DeviceBackend] = {}
        for backend, budget in gpus:
            self._pools[backend.device.uuid] = MemoryPool(backend, budget)
            self._gpu_backends[backend.device.uuid] = backend
        self._keep_host_tier = keep_host_tier
        self._manifests = manifests
        self._cache_dir = cache_dir
        self._settings = settings
        self._entries: dict[EntryKey, Entry] = {}
        self._retired: list[Entry] = []
        self._leases: dict[str, Entry] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_parallel_loads, thread_name_prefix="weightd-load")
        self._metrics = metrics
        # Set once the daemon starts shutting down: load threads see it at their next range and abort.
        self._stopping = threading.Event()

    def key(
        self, model_uri: str, *, tp_size: int, rank: int, rules: Sequence[ShardRule], device_uuid: str = "",
        fusions: Sequence[Fusion] = (),
    ) -> EntryKey:
        """The entry a request names; ``device_uuid`` (a GPU's, any spelling nvidia-smi or torch prints) or
        empty for host memory."""
        check_group(tp_size, rank)
        devices = [backend.device for backend in self._gpu_backends.values()]
        device = pick(devices, device_uuid, unavailable=self._gpus_unavailable).uuid if device_uuid else ""
        return EntryKey(parse_model_uri(model_uri).uri, tp_size, rank, parse_rules(rules), device,
                        check_fusions(fusions))

    def adopt(self) -> None:
        """Take over the arenas a previous daemon completed (their manifests say what they hold); free the
        rest. Reads nothing from storage. Call once, on the event loop, before serving."""
        manifests = self._manifests.read_all()
        newest: dict[EntryKey, ArenaManifest] = {}
        for manifest in manifests:
            key = EntryKey(manifest.model_uri, manifest.tp_size, manifest.rank, manifest.rules,
                           fusions=manifest.fusions)
            other = newest.get(key)
            if other is None or manifest.loaded_at > other.loaded_at:
                newest[key] = manifest
        adopted: list[EntryKey] = []
        arenas: dict[str, Arena] = {}  # by name: a group arena is adopted once, for every rank it holds
        kept: set[tuple[str, int]] = set()
        for key, manifest in newest.items():
            name = manifest.arena_name
            try:
                if manifest.arena_kind != HOST:
                    raise AdoptionError(f"it is {manifest.arena_kind} memory; only host memory is adopted")
                if not manifest.metadata_dir.is_dir():
                    raise AdoptionError(f"its metadata directory {manifest.metadata_dir} is gone")
                arena = arenas.get(name) or self._host.adopt(name, manifest.arena_size)
            except AdoptionError as e:
                logger.warning("not adopting the arena of %s: %s", key.describe(), e)
                continue
            arenas[name] = arena
            self._entries[key] = self._adopted_entry(key, manifest, arena)
            adopted.append(key)
            kept.add((name, key.rank))
        for manifest in manifests:
            if (manifest.arena_name, manifest.rank) not in kept:
                self._manifests.remove(manifest.arena_name, manifest.rank)
        self._host.remove_orphans(set(arenas))
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
            self._check_running(missing[0])
            self._start_load(missing, settings or self._settings, revalidate_after)
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

    def leased_entry(self, lease_id: str) -> Entry | None:
        """The entry a live lease holds; None when no such lease is live."""
        return self._leases.get(lease_id)

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
                memory_kind=self._pools[e.key.device].backend.kind,
                resident_bytes=self._held_bytes(e) if e.arena else 0,
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
        return [
            MemoryUsage(pool.backend.kind, device, pool.budget, self._used_bytes(device), pool.backend.capacity())
            for device, pool in self._pools.items()
        ]

    def gauges(self) -> Gauges:
        """Leases and each memory's figures, for a metrics scrape (call on the event loop)."""
        snapshot = self.snapshot()
        return Gauges(
            leases=sum(s.leases for s in snapshot),
            memories=[
                MemoryGauge(
                    memory_kind=usage.kind, device=usage.device_uuid or HOST,
                    resident_bytes=sum(s.resident_bytes for s in snapshot if s.key.device == usage.device_uuid),
                    budget_bytes=usage.limit_bytes, used_bytes=usage.used_bytes,
                )
                for usage in self.memory_usage()
            ],
        )

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
        self._metrics.evicted("request", len(free))
        logger.info("evicted %d entr(y/ies) of %s, %d bytes", len(free), uri, freed)
        return len(free), freed

    def stop_loading(self) -> None:
        """Abort the loads in progress (each at its next range, releasing its arenas) and start no new ones."""
        self._stopping.set()

    def _check_running(self, key: EntryKey) -> None:
        if self._stopping.is_set():
            raise ShuttingDownError(
                f"{key.describe()}: the daemon is shutting down and stopped this load; retry once it is back"
            )

    async def close(self, *, keep_arenas: bool, timeout: float) -> None:
        """Stop: abort running loads (waiting ``timeout`` seconds for them to let go of their arenas), then let
        go of every arena (the server has already ended all leases). With ``keep_arenas``, complete entries'
        arenas stay, with their manifests, for the next start."""
        self.stop_loading()
        loading = {e.task for e in self._entries.values() if not e.task.done()}
        if loading:
            _, stuck = await asyncio.wait(loading, timeout=timeout)
            if stuck:
                logger.warning("%d load(s) did not stop within %.0f s (storage not answering?); the next start "
                               "removes their partial arenas", len(stuck), timeout)
        for entry in self._entries.values():
            arena = entry.arena
            if keep_arenas and arena is not None:
                entry.arena = None
                if not self._holders(arena):  # a group arena: once, with the last of its ranks
                    self._unpin(arena)
                    arena.detach()
            else:
                self._free(entry)
        for entry in self._retired:
            self._free(entry)
        self._entries.clear()
        self._retired.clear()
        self._pool.shutdown(wait=False)  # threads still loading end at their next range

    def _used_bytes(self, device: str) -> int:
        entries = [e for e in [*self._entries.values(), *self._retired] if e.key.device == device]
        arenas = {id(e.arena): e.arena.size for e in entries if e.arena is not None}  # a group arena once
        return sum(arenas.values()) + sum(e.reserved_bytes for e in entries if e.arena is None)

    def _holders(self, arena: Arena) -> list[Entry]:
        """The entries (resident or retired) whose arena ``arena`` is: one, or a group arena's ranks."""
        return [e for e in [*self._entries.values(), *self._retired] if e.arena is arena]

    def _held_bytes(self, entry: Entry) -> int:
        """What ``entry`` holds: its arena, split evenly between the entries sharing it, or while it loads, its
        reservation."""
        if entry.arena is None:
            return entry.reserved_bytes
        holders = self._holders(entry.arena)
        return even_shares(entry.arena.size, len(holders))[holders.index(entry)]

    def _free(self, entry: Entry) -> int:
        """Let go of ``entry``'s arena, and free it unless other entries share it; returns the bytes freed."""
        arena = entry.arena
        if arena is None:
            return 0
        # The manifest goes first: a crash in between leaves an unrecorded arena, which the next start removes.
        self._manifests.remove(arena.name, entry.key.rank)
        entry.arena = None
        if self._holders(arena):
            return 0
        self._unpin(arena)
        arena.release()
        return arena.size

    def _unpin(self, arena: Arena) -> None:
        """Undo a GPU copy's page-locking of a host arena before it is unmapped (pinning is process-wide)."""
        if arena.kind == HOST:
            for backend in self._gpu_backends.values():
                backend.unpin(cast(FillableArena, arena))
                break

    def _reserve(self, keys: Sequence[EntryKey], sizes: Sequence[int]) -> None:
        """Hold each entry's bytes in its memory's budget, making room first (see ``_make_room``)."""
        for device in dict.fromkeys(k.device for k in keys):
            group = [k for k in keys if k.device == device]
            self._make_room(group, sum(size for k, size in zip(keys, sizes, strict=True) if k.device == device))
        for key, size in zip(keys, sizes, strict=True):
            self._entries[key].reserved_bytes = size

    def _make_room(self, keys: Sequence[EntryKey], needed: int) -> None:
        """Make ``needed`` bytes of ``keys``' memory free for loading them, evicting unleased ready entries of
        that memory, least recently used first, when its budget requires it."""
        device = keys[0].device
        budget = self._pools[device].budget
        used = self._used_bytes(device)
        if used + needed <= budget:
            return
        evictable = self._evictable(device, keys)
        if used - sum(arena.size for arena, _ in evictable) + needed > budget:
            raise OutOfMemoryError(self._no_room(keys[0], needed, used))
        for _, entries in evictable:
            if used + needed <= budget:
                break
            for entry in entries:
                del self._entries[entry.key]
                used -= self._free(entry)
                self._metrics.evicted("budget")
                logger.info("evicted %s (unleased, last used %s) to make room for %s",
                            entry.key.describe(), time.ctime(entry.last_used), keys[0].describe())

    def _evictable(self, device: str, keys: Sequence[EntryKey]) -> list[tuple[Arena, list[Entry]]]:
        """The arenas of ``device`` that evicting ready, unleased entries (not ``keys``) would free, with those
        entries (a group arena's ranks go together), least recently used first."""
        by_arena: dict[int, tuple[Arena, list[Entry]]] = {}
        for e in self._entries.values():
            if e.key.device == device and e.arena is not None:
                by_arena.setdefault(id(e.arena), (e.arena, []))[1].append(e)
        free = [
            (arena, entries) for arena, entries in by_arena.values()
            if all(not e.leases and e.key not in keys for e in entries) and len(self._holders(arena)) == len(entries)
        ]
        return sorted(free, key=lambda unit: max(e.last_used for e in unit[1]))

    def _no_room(self, key: EntryKey, needed: int, used: int) -> str:
        pool = self._pools[key.device]
        holders = [
            f"{e.key.describe()} ({_mib(self._held_bytes(e))}, "
            + (f"{len(e.leases)} lease(s)" if e.leases else "loading") + ")"
            for e in [*self._entries.values(), *self._retired]
            if e.key.device == key.device and self._held_bytes(e) and (e.leases or e.arena is None)
        ]
        memory = f"GPU {key.device}" if key.device else "host"
        return (
            f"{key.describe()} needs {_mib(needed)} of {memory} memory, but the budget is "
            f"{_mib(pool.budget)} ({pool.limit_flag}) and {_mib(used)} of it is in use; "
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
            self._metrics.evicted("revision")
            if entry.leases:
                self._retired.append(entry)
            else:
                self._free(entry)

    def _start_load(self, keys: list[EntryKey], settings: LoadSettings, revalidate_after: float | None) -> None:
        progress = Progress()
        loop = asyncio.get_running_loop()
        host_keys = [k.on_host() for k in keys]
        # Decided now, with the entries created below, so that no other request starts a second load.
        cold = bool(keys[0].device) and not any(k in self._entries for k in host_keys)
        if not keys[0].device:
            load = self._stream(keys, progress, settings, mirror_keys=[])
        elif cold:
            load = self._stream(host_keys, progress, settings, mirror_keys=keys)
        else:
            load = self._refill(keys, settings, revalidate_after)
        task = loop.create_task(_without_collections(load))
        self._metrics.load_started()
        started = time.monotonic()
        scheme = parse_model_uri(keys[0].model_uri).scheme

        def finished(task: asyncio.Task[None]) -> None:
            # Retrieving the outcome marks it seen: the waiters, if any are left, have it reported to them.
            error = asyncio.CancelledError() if task.cancelled() else task.exception()
            self._metrics.load_finished(seconds=time.monotonic() - started, scheme=scheme,
                                        storage_bytes=progress.bytes_done, error=error)
            if error is not None:
                logger.warning("loading %s failed: %s", keys[0].describe(), error)

        task.add_done_callback(finished)
        for key in [*keys, *(host_keys if cold else [])]:
            self._entries[key] = Entry(key=key, progress=progress, task=task)

    async def _stream(
        self, keys: list[EntryKey], progress: Progress, settings: LoadSettings, *, mirror_keys: list[EntryKey]
    ) -> None:
        """Stream ``keys`` (host entries) from storage; copy each range on to ``mirror_keys``' GPUs as it lands."""
        first = keys[0]
        loop = asyncio.get_running_loop()
        loaded: list[loader.LoadedRank] = []
        targets: list[DeviceArena] = []
        try:
            prepared = await loop.run_in_executor(
                self._pool,
                lambda: loader.prepare(
                    parse_model_uri(first.model_uri),
                    cache_dir=self._cache_dir,
                    tp_size=first.tp_size,
                    ranks=[k.rank for k in keys],
                    rules=first.rules,
                    fusions=first.fusions,
                    settings=settings,
                    # A whole group for host memory shares one arena; GPU copies follow an arena per rank.
                    group_arena=not mirror_keys and first.tp_size > 1
                    and [k.rank for k in keys] == list(range(first.tp_size)),
                    host_only=not mirror_keys,
                ),
            )
            self._check_running(first)
            layouts = prepared.plan.layouts
            self._reserve(keys, prepared.plan.held_bytes_by_layout())
            if mirror_keys:
                self._reserve(mirror_keys, [layout.size for layout in layouts])
                targets = await loop.run_in_executor(self._pool, self._allocate_on_gpus, mirror_keys, layouts)
            progress.bytes_total = prepared.plan.fetched_bytes
            progress.state = State.LOADING_WEIGHTS

            def advance(n: int) -> None:
                progress.bytes_done += n  # one writer thread; readers on the loop tolerate a stale value
                self._check_running(first)

            mirror = self._mirror(mirror_keys, targets) if mirror_keys else None
            loaded = await loop.run_in_executor(
                self._pool,
                lambda: loader.stream(prepared, self._host, settings=settings, on_progress=advance, listener=mirror),
            )
            metadata = prepared.source.metadata
            now = time.time()
            manifests = [
                ArenaManifest(
                    model_uri=key.model_uri, tp_size=key.tp_size, rank=key.rank, rules=key.rules,
                    fusions=key.fusions, revision=metadata.revision,
                    object_versions={o.name: (o.size, o.version) for o in metadata.objects.values()},
                    metadata_dir=metadata.directory, layout=rank.layout, arena_kind=HOST,
                    arena_name=rank.arena.name, arena_size=rank.arena.size, storage_bytes_read=rank.fetched_bytes,
                    metadata_bytes_downloaded=metadata.downloaded_bytes, loaded_at=now, validated_at=now,
                )
                for key, rank in zip(keys, loaded, strict=True)
            ]
            await loop.run_in_executor(self._pool, self._manifests.write_all, manifests)
        except BaseException:
            for rank in loaded:
                self._manifests.remove(rank.arena.name, rank.layout.rank)
            for arena in {id(rank.arena): rank.arena for rank in loaded}.values():  # a group arena once
                self._unpin(arena)
                arena.release()
            for target in targets:
                target.release()
            for key in [*keys, *mirror_keys]:
                self._entries.pop(key, None)
            raise
        validated_at = time.monotonic()
        for key, manifest, rank in zip(keys, manifests, loaded, strict=True):
            self._fill(self._entries[key], manifest, rank.arena, validated_at=validated_at)
        if mirror_keys:
            for key, manifest, target in zip(mirror_keys, manifests, targets, strict=True):
                self._fill(self._entries[key], manifest, target, validated_at=validated_at)
            if not self._keep_host_tier:
                for key in keys:
                    self._free(self._entries.pop(key))
        progress.state = State.READY
        where = f" and copied to {', '.join(dict.fromkeys(k.device for k in mirror_keys))}" if mirror_keys else ""
        logger.info("%s (tp_size %d, ranks %s) is resident%s", first.model_uri, first.tp_size,
                    [k.rank for k in keys], where)

    async def _refill(self, keys: list[EntryKey], settings: LoadSettings, revalidate_after: float | None) -> None:
        """Fill GPU entries from their host tier (loading that first if need be): one copy, no storage reads
        beyond the host tier's own load."""
        loop = asyncio.get_running_loop()
        targets: list[DeviceArena] = []
        sources: list[Entry] = []
        leases: list[str] = []
        try:
            sources = await self.ensure([k.on_host() for k in keys], settings=settings,
                                        revalidate_after=revalidate_after)
            leases = [self.acquire(e) for e in sources]  # no eviction of the host tier while copying from it
            host_layouts = [cast(RankLayout, e.layout) for e in sources]
            layouts = [own_arena_layout(layout) for layout in host_layouts]  # a group arena's ranks: rearranged
            self._reserve(keys, [layout.size for layout in layouts])
            self._entries[keys[0]].progress.state = State.LOADING_WEIGHTS
            targets = await loop.run_in_executor(self._pool, self._allocate_on_gpus, keys, layouts)
            host_arenas = [cast(FillableArena, e.arena) for e in sources]
            if all(a.slots == b.slots for a, b in zip(host_layouts, layouts, strict=True)):
                await loop.run_in_executor(self._pool, copy_whole, host_arenas, self._mirror(keys, targets))
            else:
                backends = [self._gpu_backends[k.device] for k in keys]
                await loop.run_in_executor(self._pool, copy_rearranged, host_arenas, host_layouts, targets, layouts,
                                           backends)
        except BaseException:
            for target in targets:
                target.release()
            for key in keys:
                self._entries.pop(key, None)
            raise
        finally:
            for lease_id in leases:
                self.release(lease_id)
        now = time.time()
        for key, source_entry, target, layout in zip(keys, sources, targets, layouts, strict=True):
            entry = self._entries[key]
            entry.revision = source_entry.revision
            entry.metadata_dir = source_entry.metadata_dir
            entry.metadata_bytes_downloaded = 0
            entry.layout = layout
            entry.arena = target
            entry.reserved_bytes = 0
            entry.storage_bytes_read = 0  # what storage gave the host tier is counted there
            entry.validated_at = source_entry.validated_at
            entry.last_used = now
        self._entries[keys[0]].progress.state = State.READY
        logger.info("%s (ranks %s) copied to %s from the host tier", keys[0].model_uri, [k.rank for k in keys],
                    ", ".join(dict.fromkeys(k.device for k in keys)))

    def _allocate_on_gpus(self, keys: Sequence[EntryKey], layouts: Sequence[RankLayout]) -> list[DeviceArena]:
        """One arena per key on the key's GPU (blocking: runs on a load thread); all or none."""
        targets: list[DeviceArena] = []
        try:
            for key, layout in zip(keys, layouts, strict=True):
                label = f"{key.model_uri.rstrip('/').rsplit('/', 1)[-1]}-tp{key.tp_size}-r{key.rank}"
                targets.append(self._gpu_backends[key.device].allocate(layout.size, label=label))
        except BaseException:
            for target in targets:
                target.release()
            raise
        return targets

    def _mirror(self, keys: Sequence[EntryKey], targets: Sequence[DeviceArena]) -> DeviceMirror:
        return DeviceMirror(targets, [self._gpu_backends[k.device] for k in keys])

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


async def _without_collections(load: Coroutine[object, object, None]) -> None:
    """Run ``load`` with the garbage collector paused (weightd.daemon.gc_pause): its plan's objects per tensor
    would otherwise be walked by collection after collection."""
    with collection_paused():
        await load


def all_rank_keys(key: EntryKey) -> list[EntryKey]:
    return [dataclasses.replace(key, rank=rank, device="") for rank in range(key.tp_size)]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
