"""The memory seam: where resident weights live and how they are handed to clients.

Every backend hands its arenas over the same way: as file descriptors, sent to an attached client through
the descriptor channel (weightd.daemon.descriptors). What the client does with a descriptor depends on the
arena's kind (host: mmap it read-only; CUDA VMM: import and map it read-only on its GPU).
"""

from __future__ import annotations

import mmap
from collections.abc import Collection
from typing import Protocol

import torch


class AdoptionError(Exception):
    """A recorded arena cannot be adopted (missing, resized, not owned by this daemon): it is not reused."""


class Arena(Protocol):
    """One contiguous block of daemon-owned memory."""

    @property
    def kind(self) -> str:
        """The backend's name in ``weightd.daemon.memory.BACKENDS``."""
        ...

    @property
    def name(self) -> str:
        """Identifies the arena to its backend across daemon restarts (see ``MemoryBackend.adopt``)."""
        ...

    @property
    def size(self) -> int: ...

    def tensor(self) -> torch.Tensor:
        """A writable uint8 view of the whole arena, for the loader to fill."""
        ...

    def export(self) -> int:
        """A new read-only file descriptor for a client; the caller sends it and closes it."""
        ...

    def fill_descriptor(self) -> int:
        """A new writable descriptor of host memory that a streaming helper maps and fills; the caller closes it."""
        ...

    def release(self) -> None:
        """Free the memory. The registry calls this only when no lease holds the arena."""
        ...

    def detach(self) -> None:
        """Let go of the memory in this process but keep it for the next daemon to adopt."""
        ...


class MemoryBackend(Protocol):
    @property
    def kind(self) -> str: ...

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


def map_writable(fd: int, size: int) -> tuple[mmap.mmap, torch.Tensor]:
    """Map a host-memory descriptor (an arena's, or ``Arena.fill_descriptor``'s) read-write, shared."""
    # mmap refuses length 0; an empty arena still gets a page so every descriptor maps. (MAP_POPULATE would
    # map every page before streaming starts; left to the writers, the minor faults overlap with storage
    # reads, which measured faster.)
    mapping = mmap.mmap(fd, max(size, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return mapping, torch.frombuffer(mapping, dtype=torch.uint8)
