"""The memory seam: where resident weights live and how clients are told to map them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class HostSharedMemoryHandle:
    path: str


# A CUDA IPC handle joins this union when the CUDA backend lands.
MemoryHandle = HostSharedMemoryHandle


class Arena(Protocol):
    """One contiguous block of daemon-owned memory."""

    @property
    def size(self) -> int: ...

    @property
    def handle(self) -> MemoryHandle: ...

    def tensor(self) -> torch.Tensor:
        """A writable uint8 view of the whole arena, for the loader to fill."""
        ...

    def release(self) -> None:
        """Free the memory. The registry calls this only when no lease holds the arena."""
        ...


class MemoryBackend(Protocol):
    def allocate(self, size: int, *, label: str) -> Arena: ...

    def remove_stale(self) -> list[str]:
        """Free what a previous, dead daemon left behind; returns what was removed."""
        ...
