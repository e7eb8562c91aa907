"""Memory backends by name, imported only when used (as fsspec's registry of implementations does)."""

from __future__ import annotations

import importlib
from pathlib import Path

from weightd.daemon.memory.base import MemoryBackend

# name -> "module:class"; each class takes the keyword options of ``open_backend``.
BACKENDS: dict[str, str] = {
    "host": "weightd.daemon.memory.host:HostMemory",
}


def open_backend(kind: str, *, directory: Path, namespace: str) -> MemoryBackend:
    """The backend called ``kind``. ``directory`` holds host arenas; ``namespace`` names this daemon's."""
    module_name, _, class_name = BACKENDS[kind].partition(":")
    backend: MemoryBackend = getattr(importlib.import_module(module_name), class_name)(
        directory=directory, namespace=namespace
    )
    return backend
