"""Host shared memory: one file per arena in a tmpfs (``/dev/shm``) or a hugetlbfs, owner-only (0600).

Clients never open an arena by name: they receive a read-only descriptor through the descriptor channel and
map it ``PROT_READ``. Files are named ``weightd-<namespace>-<label>-<random>``; the namespace is the daemon's
(derived from its cache directory, where the arenas' manifests live), so a starting daemon adopts or removes
only what a previous daemon of its own left behind, never another daemon's arenas.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import re
import secrets
import stat
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from weightd.daemon.errors import OutOfMemoryError
from weightd.daemon.memory.base import HOST, AdoptionError, ArenaHandle, map_writable

logger = logging.getLogger(__name__)

# Only the daemon's user may open an arena; clients get descriptors.
ARENA_MODE = 0o600
PREFIX = "weightd"
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_POPULATE_CHUNK = 64 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
# tmpfs huge= policies under which an arena's pages are 4 KiB.
SMALL_PAGE_POLICIES = ("never",)
# Under this one a page is 2 MiB only if the mapping that faults it in was advised MADV_HUGEPAGE: the daemon
# advises its own and faults a new arena in through it (posix_fallocate has no mapping and takes 4 KiB pages).
_HUGE_ON_ADVICE_POLICY = "advise"
# What MADV_POPULATE_WRITE's errors mean for an arena's mapping (EFAULT: the fault would have raised SIGBUS; on a
# hugetlbfs, whose pages the mapping reserved, that is a hugetlb cgroup's limit, e.g. a pod's hugepages-2Mi).
_FAULT_FAILURES = {
    errno.EFAULT: "its tmpfs is full or its huge page limit was reached",
    errno.ENOMEM: "out of memory (the node's or the cgroup's)",
}
_MOUNTINFO = Path("/proc/self/mountinfo")
_HUGE_PAGE_POOLS = Path("/sys/kernel/mm/hugepages")


class Reservation(enum.Enum):
    """How a new arena's pages are reserved, by its tmpfs's ``huge=`` policy (HostMemory measured each)."""

    FALLOCATE = "fallocate"  # posix_fallocate: 2 MiB pages, or not a tmpfs
    FAULT_IN = "fault in"  # 4 KiB pages, faulted in from several threads (``populate``)
    ADVISE_AND_FAULT_IN = "advise and fault in"  # huge=advise: the mapping advised MADV_HUGEPAGE, then faulted in


class HostArena:
    kind = HOST

    def __init__(
        self, path: Path, size: int, *, create: bool, reservation: Reservation = Reservation.FALLOCATE
    ) -> None:
        """Open the arena at ``path``, or create it (``create``) with every page reserved as ``reservation``
        says: a full tmpfs is an error here, not SIGBUS in the middle of a load."""
        self.path = path
        self._size = size
        flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, ARENA_MODE)
        mapping = None
        try:
            if create:
                os.fchmod(fd, ARENA_MODE)  # the umask must not widen what others can open
                os.ftruncate(fd, size)
            mapping, tensor = map_writable(fd, size)
            if create and reservation is Reservation.ADVISE_AND_FAULT_IN:
                _advise_huge_pages(tensor)
            # posix_fallocate also where the kernel cannot populate (before Linux 5.14).
            if create and size and not (reservation is not Reservation.FALLOCATE and populate(tensor[:size])):
                os.posix_fallocate(fd, 0, size)
            self._read_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        except BaseException:
            if mapping is not None:
                del tensor
                mapping.close()
            if create:
                path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._map = mapping
        self._tensor: torch.Tensor | None = tensor

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size(self) -> int:
        return self._size

    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            raise RuntimeError(f"arena {self.path} was released")
        return self._tensor[: self._size]

    def handle(self) -> ArenaHandle:
        return ArenaHandle("host", self._size)

    def export(self) -> int:
        return os.dup(self._read_fd)

    def fill_descriptor(self) -> int:
        return os.open(f"/proc/self/fd/{self._read_fd}", os.O_RDWR)

    def release(self) -> None:
        if self._unmap():
            # Clients that still map the file keep their pages; the name goes now.
            self.path.unlink(missing_ok=True)

    def detach(self) -> None:
        self._unmap()

    def _unmap(self) -> bool:
        if self._tensor is None:
            return False
        self._tensor = None
        os.close(self._read_fd)
        try:
            self._map.close()
        except BufferError:
            # A view is still referenced somewhere in the daemon; the mapping goes when it does.
            logger.warning("arena %s still has views in the daemon; unmapping deferred", self.path)
        return True


class HostMemory:
    kind = HOST
    device_uuid = ""

    def __init__(self, *, directory: Path, namespace: str) -> None:
        self.directory = directory
        self._prefix = f"{PREFIX}-{namespace}-"
        # A hugetlbfs's files take pages of its one size from the kernel's pool (vm.nr_hugepages): already
        # backed, so that faulting them in from several threads costs 0.055 s per GB here (posix_fallocate
        # 0.085 s). Its files' sizes are multiples of that page.
        self._pool = HugePagePool.of(directory)
        # 4 KiB tmpfs pages: posix_fallocate clears them on one thread (under the file's lock) and the writers
        # then fault each one into their mapping; faulting them in from several threads does both at once
        # (1 GB here: 0.48 s against 0.62 s, the same CPU). Huge pages: fallocate defers the clearing to the
        # writers' faults, 512 times fewer, which overlap with storage reads (0.09 s against 0.16 s).
        policy = huge_page_policy(directory)
        self._reservation = (
            Reservation.ADVISE_AND_FAULT_IN if policy == _HUGE_ON_ADVICE_POLICY
            else Reservation.FAULT_IN if policy in SMALL_PAGE_POLICIES or self._pool is not None
            else Reservation.FALLOCATE
        )
        self._remedy = "reserve more huge pages (vm.nr_hugepages)" if self._pool else "enlarge the tmpfs"

    def capacity(self) -> int:
        st = os.statvfs(self.directory)
        if self._pool is None:
            return st.f_blocks * st.f_frsize
        # A hugetlbfs mounted without size= has no limit of its own: the pool is the limit.
        total = self._pool.pages("nr_hugepages") * self._pool.page_size
        return min(st.f_blocks * st.f_frsize, total) if st.f_blocks else total

    def allocate(self, size: int, *, label: str) -> HostArena:
        if self._pool is not None:
            size = self._pool.round_up(size)
        free = _free_bytes(self.directory, self._pool)
        if size > free:
            raise OutOfMemoryError(
                f"arena for {label} needs {size} bytes but {self.directory} has {free} free; "
                f"evict models (weightd evict URI) or {self._remedy}"
            )
        safe_label = re.sub(r"[^A-Za-z0-9_.]+", "_", label)[-80:]
        path = self.directory / f"{self._prefix}{safe_label}-{secrets.token_hex(4)}"
        try:
            return HostArena(path, size, create=True, reservation=self._reservation)
        except OSError as e:
            # ENOMEM: a hugetlbfs mapping reserves its pages when it is made, and the pool had too few.
            if e.errno not in (errno.ENOSPC, errno.ENOMEM):
                raise
            raise OutOfMemoryError(
                f"arena for {label} needs {size} bytes but {self.directory} is full (another writer took the "
                f"space first); evict models (weightd evict URI) or {self._remedy}"
            ) from e
        except OutOfMemoryError as e:
            raise OutOfMemoryError(f"arena for {label} in {self.directory}: {e}") from e

    def adopt(self, name: str, size: int) -> HostArena:
        if not name.startswith(self._prefix) or "/" in name:
            raise AdoptionError(f"{name!r} is not an arena of this daemon (names start with {self._prefix!r})")
        path = self.directory / name
        try:
            st = os.lstat(path)
        except FileNotFoundError as e:
            raise AdoptionError(f"{path} is gone") from e
        if not stat.S_ISREG(st.st_mode):
            raise AdoptionError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != ARENA_MODE:
            raise AdoptionError(
                f"{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; "
                f"expected uid {os.geteuid()} and mode {ARENA_MODE:o}"
            )
        if st.st_size != size:
            raise AdoptionError(f"{path} holds {st.st_size} bytes; its manifest says {size}")
        if st.st_blocks * 512 < size:
            raise AdoptionError(f"{path} has holes: {st.st_blocks * 512} of {size} bytes are allocated")
        return HostArena(path, size, create=False)

    def remove_orphans(self, keep: Collection[str]) -> list[str]:
        removed = []
        for entry in self.directory.iterdir():
            if entry.name.startswith(self._prefix) and entry.name not in keep:
                entry.unlink(missing_ok=True)
                removed.append(str(entry))
        if removed:
            logger.info("removed %d arena(s) that no complete manifest records (interrupted loads)", len(removed))
        return removed


def populate(region: torch.Tensor) -> bool:
    """Fault in every page of a writable shared mapping (an arena's ``tensor()``), 64 MiB per thread at a time.

    ``madvise(MADV_POPULATE_WRITE)`` from several threads allocates and zeroes the pages side by side, where a
    new arena's ``posix_fallocate`` or page-locking it for GPU copies (``cuMemHostRegister``) takes them one at
    a time in one thread. A page that cannot be had is an error here, not SIGBUS at its first write. False (and
    nothing done) where the kernel lacks it (before 5.14).
    """
    start = region.data_ptr()
    length = -(-region.numel() // _PAGE) * _PAGE
    if length == 0:
        return True
    if start % _PAGE:
        raise ValueError(f"populate: address {start:#x} is not page-aligned")

    def advise(offset: int) -> int:
        return _madvise(start + offset, min(_POPULATE_CHUNK, length - offset), _MADV_POPULATE_WRITE)

    offsets = range(0, length, _POPULATE_CHUNK)
    with ThreadPoolExecutor(max_workers=min(len(offsets), os.cpu_count() or 1, 16),
                            thread_name_prefix="weightd-populate") as pool:
        errors = {e for e in pool.map(advise, offsets) if e}
    if errors == {errno.EINVAL}:
        logger.debug("madvise(MADV_POPULATE_WRITE) is not supported by this kernel; pages fault in on first use")
        return False
    if errors:
        reasons = ", ".join(_FAULT_FAILURES.get(e, os.strerror(e)) for e in sorted(errors))
        raise OutOfMemoryError(f"faulting in {length} bytes of host memory failed: {reasons}; evict models "
                               "(weightd evict URI) or give the arenas more room")
    return True


def _advise_huge_pages(region: torch.Tensor) -> None:
    """``madvise(MADV_HUGEPAGE)`` over a mapping (page-aligned). Only a hint: a kernel without transparent huge
    pages refuses it (EINVAL), and pages then stay 4 KiB."""
    error = _madvise(region.data_ptr(), -(-region.numel() // _PAGE) * _PAGE, _MADV_HUGEPAGE)
    if error:
        logger.debug("madvise(MADV_HUGEPAGE) refused: %s", os.strerror(error))


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _madvise(address: int, length: int, advice: int) -> int:
    """madvise(2); 0 or the errno. A foreign call drops the GIL: threads advise side by side."""
    return 0 if _LIBC.madvise(address, length, advice) == 0 else ctypes.get_errno()


def _free_bytes(directory: Path, pool: HugePagePool | None) -> int:
    st = os.statvfs(directory)
    if pool is None:
        return st.f_bavail * st.f_frsize
    unclaimed = pool.unclaimed() * pool.page_size
    return min(st.f_bavail * st.f_frsize, unclaimed) if st.f_blocks else unclaimed


@dataclass(frozen=True)
class HugePagePool:
    """The kernel's pool of huge pages of one size, which a hugetlbfs's files take their pages from."""

    page_size: int

    @classmethod
    def of(cls, directory: Path, *, mountinfo: Path = _MOUNTINFO) -> HugePagePool | None:
        """The pool ``directory``'s files take pages from, or None when it is not on a hugetlbfs."""
        mount = _mount_of(directory, mountinfo)
        if mount is None or mount[1] != "hugetlbfs":
            return None
        return cls(os.statvfs(directory).f_bsize)  # a hugetlbfs's block is its page

    def pages(self, counter: str) -> int:
        """One of the pool's counters: ``nr_hugepages``, ``free_hugepages`` or ``resv_hugepages``."""
        return int((_HUGE_PAGE_POOLS / f"hugepages-{self.page_size >> 10}kB" / counter).read_text())

    def unclaimed(self) -> int:
        """Pages that no mapping holds or has reserved: the pool counts pages that mappings have reserved but
        not yet faulted in as free."""
        return self.pages("free_hugepages") - self.pages("resv_hugepages")

    def round_up(self, size: int) -> int:
        """The file size an arena of ``size`` bytes takes: whole pages (ftruncate refuses anything else), and
        one at least, which even an empty arena's mapping reserves."""
        return max(1, -(-size // self.page_size)) * self.page_size


def _mount_of(directory: Path, mountinfo: Path) -> tuple[str, str, str] | None:
    """(mount point, filesystem type, super options) of the innermost mount holding ``directory``."""
    target = os.path.realpath(directory)
    mount: tuple[str, str, str] | None = None
    for line in mountinfo.read_text().splitlines():
        fields = line.split(" ")
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        # Later lines are later mounts: one over the same point hides the earlier.
        if inside and (mount is None or len(point) >= len(mount[0])):
            separator = fields.index("-")  # then the filesystem type, the source and the super options
            mount = (point, fields[separator + 1], fields[separator + 3])
    return mount


def huge_page_policy(directory: Path, *, mountinfo: Path = _MOUNTINFO,
                     shmem_enabled: Path = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")) -> str:
    """The tmpfs ``huge=`` policy that files created in ``directory`` get: ``never``, ``always``,
    ``within_size`` or ``advise``; ``""`` when ``directory`` is not on a tmpfs.

    With ``never`` (the default of most distributions' /dev/shm) an arena is filled one 4 KiB page fault at a
    time, which costs a cold load far more CPU than the streamer's own buffer, whose anonymous memory gets
    transparent huge pages.
    """
    mount = _mount_of(directory, mountinfo)
    if mount is None or mount[1] != "tmpfs":
        return ""
    try:
        # "[deny]" and "[force]" override every mount's own option (Documentation/admin-guide/mm/transhuge.rst).
        system = re.search(r"\[(\w+)\]", shmem_enabled.read_text())
    except OSError:
        system = None
    if system and system.group(1) == "deny":
        return "never"
    if system and system.group(1) == "force":
        return "always"
    option = re.search(r"(?:^|,)huge=(\w+)", mount[2])
    return option.group(1) if option else "never"
