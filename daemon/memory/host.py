"""Host shared memory: one file per arena in a tmpfs (``/dev/shm``), mapped read-only by clients.

Names are ``<prefix>-<daemon pid>-<label>-<random>``: the pid lets a starting daemon tell its dead
predecessors' segments (pid gone, or its own pid reused) from those of another live daemon on the node.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import secrets
from pathlib import Path

import torch
from weightd.daemon.errors import OutOfMemoryError
from weightd.daemon.memory.base import HostSharedMemoryHandle

logger = logging.getLogger(__name__)

# Owner may write; group (the engines' group, as for the socket) may read.
SEGMENT_MODE = 0o640


class HostArena:
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self._size = size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, SEGMENT_MODE)
        try:
            os.fchmod(fd, SEGMENT_MODE)  # the umask must not widen or narrow what clients can open
            os.ftruncate(fd, size)
            if size:
                # Reserve every page now: a full tmpfs is ENOSPC here, not SIGBUS in the middle of a load.
                os.posix_fallocate(fd, 0, size)
            self._map, tensor = _map_writable(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self._tensor: torch.Tensor | None = tensor

    @property
    def size(self) -> int:
        return self._size

    @property
    def handle(self) -> HostSharedMemoryHandle:
        return HostSharedMemoryHandle(path=str(self.path))

    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            raise RuntimeError(f"arena {self.path} was released")
        return self._tensor[: self._size]

    def release(self) -> None:
        if self._tensor is None:
            return
        self._tensor = None
        try:
            self._map.close()
        except BufferError:
            # A view is still referenced somewhere in the daemon; the mapping goes when it does.
            logger.warning("arena %s still has views in the daemon; unmapping deferred", self.path)
        # Clients that still map the file keep their pages; the name goes now.
        self.path.unlink(missing_ok=True)


def map_for_writing(handle: HostSharedMemoryHandle, size: int) -> torch.Tensor:
    """A writable view of another process's arena (the streaming helper fills the daemon's arenas)."""
    fd = os.open(handle.path, os.O_RDWR)
    try:
        return _map_writable(fd, size)[1]
    finally:
        os.close(fd)


def _map_writable(fd: int, size: int) -> tuple[mmap.mmap, torch.Tensor]:
    # mmap refuses length 0; an empty arena still gets a page so every handle maps. (MAP_POPULATE would map
    # every page before streaming starts; left to the writers, the minor faults overlap with storage reads,
    # which measured faster.)
    mapping = mmap.mmap(fd, max(size, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return mapping, torch.frombuffer(mapping, dtype=torch.uint8)


class HostMemory:
    def __init__(self, directory: Path, *, prefix: str = "weightd") -> None:
        self.directory = directory
        self.prefix = prefix
        self._pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-")

    def allocate(self, size: int, *, label: str) -> HostArena:
        free = _free_bytes(self.directory)
        if size > free:
            raise OutOfMemoryError(
                f"arena for {label} needs {size} bytes but {self.directory} has {free} free; "
                "evict models (weightd evict URI) or enlarge the tmpfs"
            )
        safe_label = re.sub(r"[^A-Za-z0-9_.]+", "_", label)[-80:]
        path = self.directory / f"{self.prefix}-{os.getpid()}-{safe_label}-{secrets.token_hex(4)}"
        try:
            return HostArena(path, size)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise OutOfMemoryError(
                f"arena for {label} needs {size} bytes but {self.directory} is full (another writer took the "
                "space first); evict models (weightd evict URI) or enlarge the tmpfs"
            ) from e

    def remove_stale(self) -> list[str]:
        removed = []
        for entry in self.directory.iterdir():
            match = self._pattern.match(entry.name)
            if match and _owner_is_gone(int(match.group(1))):
                entry.unlink(missing_ok=True)
                removed.append(str(entry))
        if removed:
            logger.info("removed %d stale shared-memory segment(s) left by a dead daemon", len(removed))
        return removed


def _owner_is_gone(pid: int) -> bool:
    if pid == os.getpid():
        return True  # a previous daemon with our pid (restart in a fresh PID namespace) is dead by definition
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
