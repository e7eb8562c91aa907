"""Local directories (and anything mounted as one)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from weightd.daemon.errors import AccessDeniedError, ModelNotFoundError, StorageUnavailableError, WeightdError
from weightd.daemon.storage.base import ModelLocation, ObjectInfo


class LocalStore:
    min_separate_read_bytes = 1  # a read from a local file has no fixed cost worth saving: every piece direct
    read_through_gap_bytes = 0
    # The streamer reads a file whose destinations are congruent with its offsets with O_DIRECT (io_uring), as
    # it reads one alone: no second copy in the page cache. Mounts that refuse O_DIRECT are read buffered.
    reads_direct_io = True

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
