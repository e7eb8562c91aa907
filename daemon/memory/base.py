"""The memory seam: where resident weights live and how they are handed to clients.

Two kinds of memory sit behind it. Host memory (weightd.daemon.memory.host) is filled by the loader directly;
device memory (weightd.daemon.memory.cuda) is filled from a host arena, range by range, as the loader fills
that one. Arenas are handed over as file descriptors through the descriptor channel (weightd.daemon.descriptors)
where their memory allows (host: mmap it read-only; CUDA VMM: import and map it read-only on the GPU), or as a
handle inside the grant (legacy CUDA IPC). Which one is the arena's ``ArenaHandle``.
"""

from __future__ import annotations

import mmap
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

import torch
from weightd.daemon.devices import GpuDevice

HOST = "host"
CUDA = "cuda"


class AdoptionError(Exception):
    """A recorded arena cannot be adopted (missing, resized, not owned by this daemon): it is not reused."""


@dataclass(frozen=True)
class ArenaHandle:
    """What a grant tells a client about one arena."""

    transport: str  # "host" (mmap the descriptor), "cuda_vmm" (import the descriptor), "cuda_ipc" (open ipc_handle)
    size: int  # bytes the client maps: a VMM allocation is rounded up to the GPU's granularity
    device_uuid: str = ""  # the GPU, for device memory
    ipc_handle: bytes = b""  # legacy CUDA IPC only: the 64-byte cudaIpcMemHandle_t

    @property
    def by_descriptor(self) -> bool:
        return self.transport != "cuda_ipc"


class Arena(Protocol):
    """One contiguous block of daemon-owned memory."""

    @property
    def kind(self) -> str:
        """``HOST`` or ``CUDA``."""
        ...

    @property
    def name(self) -> str:
        """Identifies the arena to its backend (and, for host memory, across daemon restarts)."""
        ...

    @property
    def size(self) -> int: ...

    def handle(self) -> ArenaHandle: ...

    def export(self) -> int:
        """A new read-only file descriptor for a client (when ``handle().by_descriptor``); the caller closes it."""
        ...

    def release(self) -> None:
        """Free the memory. The registry calls this only when no lease holds the arena."""
        ...

    def detach(self) -> None:
        """Let go of the memory in this process; host memory stays for the next daemon to adopt."""
        ...


class FillableArena(Arena, Protocol):
    """Host memory: the loader writes into it, in this process or in a streaming helper."""

    def tensor(self) -> torch.Tensor:
        """A writable uint8 view of the whole arena, for the loader to fill."""
        ...

    def fill_descriptor(self) -> int:
        """A new writable descriptor that a streaming helper maps and fills; the caller closes it."""
        ...


class DeviceArena(Arena, Protocol):
    """Device memory: filled by asynchronous copies from a pinned host arena of the same layout."""

    @property
    def device_uuid(self) -> str: ...

    def copy_from(self, source: FillableArena, offset: int, length: int, *, source_offset: int | None = None) -> None:
        """Queue a copy of ``source``'s bytes [offset, offset + length) to the same offsets here (from
        ``source_offset`` on, where given)."""
        ...

    def finish_copies(self) -> None:
        """Block until every queued copy has landed; raises if one failed."""
        ...


class MemoryBackend(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def device_uuid(self) -> str:
        """The GPU this backend allocates on; empty for host memory."""
        ...

    def capacity(self) -> int:
        """Bytes this backend's memory holds in all (a percentage budget is a share of it)."""
        ...

    def allocate(self, size: int, *, label: str) -> Arena:
        """A new arena; raises OutOfMemoryError when the memory cannot hold it."""
        ...

    def adopt(self, name: str, size: int) -> Arena:
        """Take over an arena a previous daemon of this node allocated; raises AdoptionError if it cannot."""
        ...

    def remove_orphans(self, keep: Collection[str]) -> list[str]:
        """Free every arena of this daemon's namespace whose name is not in ``keep``; returns what was freed."""
        ...


class HostBackend(MemoryBackend, Protocol):
    def allocate(self, size: int, *, label: str) -> FillableArena: ...

    def adopt(self, name: str, size: int) -> FillableArena: ...


class DeviceBackend(MemoryBackend, Protocol):
    @property
    def device(self) -> GpuDevice: ...

    def allocate(self, size: int, *, label: str) -> DeviceArena: ...

    def pin(self, source: FillableArena) -> None:
        """Page-lock a host arena so copies from it run at full bus speed; idempotent. Pinned until ``unpin``."""
        ...

    def unpin(self, source: FillableArena) -> None:
        """Undo ``pin`` (no-op if not pinned); called before the host arena is unmapped."""
        ...


def map_writable(fd: int, size: int) -> tuple[mmap.mmap, torch.Tensor]:
    """Map a host-memory descriptor (an arena's, or ``FillableArena.fill_descriptor``'s) read-write, shared."""
    # mmap refuses length 0; an empty arena still gets a page so every descriptor maps. (MAP_POPULATE would
    # map every page on this one thread; a new arena's creator faults them in from several where that pays.)
    mapping = mmap.mmap(fd, max(size, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return mapping, torch.frombuffer(mapping, dtype=torch.uint8)
