"""Memory backends by name, imported only when used (as fsspec's registry of implementations does)."""

from __future__ import annotations

import importlib
from pathlib import Path

from weightd.daemon.memory.base import DeviceBackend, HostBackend

# name -> "module:class"; each class takes the keyword options of ``open_backend``.
BACKENDS: dict[str, str] = {
    "host": "weightd.daemon.memory.host:HostMemory",
}


def open_backend(kind: str, *, directory: Path, namespace: str) -> HostBackend:
    """The host backend called ``kind``. ``directory`` holds its arenas; ``namespace`` names this daemon's."""
    module_name, _, class_name = BACKENDS[kind].partition(":")
    backend: HostBackend = getattr(importlib.import_module(module_name), class_name)(
        directory=directory, namespace=namespace
    )
    return backend


def open_gpus(*, sharing: str) -> list[DeviceBackend]:
    """One backend per GPU of the node (CUDA is imported only now); raises MemoryUnavailableError, saying
    what is missing, when there is none."""
    from weightd.daemon.memory import cuda  # the CUDA extra is optional

    return list(cuda.open_gpus(sharing=sharing))
