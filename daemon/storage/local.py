"""Local directories (and anything mounted as one)."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
from pathlib import Path

from weightd.daemon.errors import AccessDeniedError, ModelNotFoundError, StorageUnavailableError, WeightdError
from weightd.daemon.storage.base import ModelLocation, ObjectInfo


class LocalStore:
    min_separate_read_bytes = 1  # a read from a local file has no fixed cost worth saving: every piece direct
    read_through_gap_bytes = 0

    def __init__(self, location: ModelLocation) -> None:
        self.location = location
        self.root = Path(location.prefix)

    def list_objects(self) -> list[ObjectInfo]:
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as e:
            raise self._translate(e, "") from e
        infos = [self._info(e.name, e.stat()) for e in entries if e.is_file()]
        if not infos:
            raise ModelNotFoundError(f"{self.location.uri}: the directory holds no files")
        return infos

    def stat(self, name: str) -> ObjectInfo:
        try:
            return self._info(name, os.stat(self.root / name))
        except OSError as e:
            raise self._translate(e, name) from e

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self.root / name, os.O_RDONLY)
        except OSError as e:
            raise self._translate(e, name) from e
        try:
            # Headers and small files only: without the kernel's readahead, which would bring the first weights
            # into the page cache too (the streamer reads those directly).
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return os.pread(fd, length, offset)
        except OSError as e:
            raise self._translate(e, name) from e
        finally:
            os.close(fd)

    def download(self, name: str, destination: Path) -> None:
        try:
            shutil.copyfile(self.root / name, destination)
        except OSError as e:
            raise self._translate(e, name) from e

    def streamer_path(self, name: str) -> str:
        return str(self.root / name)

    def reads_directly(self, name: str) -> bool:
        """With O_DIRECT (io_uring), as the streamer reads a local file alone, leaving no second copy of the
        model in the page cache; unless at least half the file is in the page cache already, which serves it
        at memory speed: 0.13-0.15 s per GB against 0.37-0.39 s read directly from this VM's disk
        (docs/benchmarks.md). A mount that refuses O_DIRECT is read buffered by the streamer either way."""
        try:
            return page_cache_share(self.root / name) < 0.5
        except OSError:
            return True

    @staticmethod
    def _info(name: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(name=name, size=st.st_size, version=f"{st.st_mtime_ns}-{st.st_size}")

    def _translate(self, error: OSError, name: str) -> WeightdError:
        where = str(self.root / name) if name else str(self.root)
        if isinstance(error, FileNotFoundError | NotADirectoryError):
            return ModelNotFoundError(f"{where}: no such file or directory")
        if isinstance(error, PermissionError):
            return AccessDeniedError(f"{where}: permission denied for the daemon's user; make it readable")
        return StorageUnavailableError(f"{where}: {error.strerror or error}")


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
_LOWEST_BIT = bytes(b & 1 for b in range(256))
SAMPLE_WINDOWS = 64
SAMPLE_WINDOW_PAGES = 64


def page_cache_share(path: Path) -> float:
    """The share of ``path``'s pages in the page cache (``mincore`` over a mapping of it, which touches none), from
    up to SAMPLE_WINDOWS windows spread over it: the kernel takes about 50 ns a page (14 ms for each GB whole).
    The kernel reports another user's file, which this process may not write, as not cached (Linux 5.2+)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        address = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address is None or address == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = -(-size // mmap.PAGESIZE)
            window = min(pages, SAMPLE_WINDOW_PAGES)
            count = min(SAMPLE_WINDOWS, pages // window)
            starts = [i * (pages - window) // max(count - 1, 1) for i in range(count)]
            resident = ctypes.create_string_buffer(window)
            cached = 0
            for first in starts:
                length = min(window * mmap.PAGESIZE, size - first * mmap.PAGESIZE)
                if _LIBC.mincore(address + first * mmap.PAGESIZE, length, resident) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
                cached += resident.raw[: -(-length // mmap.PAGESIZE)].translate(_LOWEST_BIT).count(1)
            return cached / (count * window)  # other bits than the lowest are reserved
        finally:
            _LIBC.munmap(address, size)
    finally:
        os.close(fd)
