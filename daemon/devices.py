"""GPUs by UUID: clients and the daemon may see different ``CUDA_VISIBLE_DEVICES``, so an ordinal means
nothing across processes. A client names its GPU by UUID; the daemon, which sees every GPU of the node, maps it
to its own ordinal here. Pure: discovering the GPUs is the CUDA backend's (weightd.daemon.memory.cuda)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from weightd.daemon.errors import InvalidRequestError, MemoryUnavailableError

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class GpuDevice:
    uuid: str  # canonical: "GPU-" and 36 lowercase hex digits and dashes, as nvidia-smi -L prints it
    ordinal: int  # in the daemon's own view
    name: str
    total_bytes: int


def canonical_uuid(text: str) -> str:
    """``GPU-5b6b...``, ``5B6B...`` or 16 raw bytes' hex -> ``GPU-5b6b...``; InvalidRequestError otherwise."""
    body = text.strip().lower().removeprefix("gpu-")
    if re.fullmatch(r"[0-9a-f]{32}", body):
        body = f"{body[:8]}-{body[8:12]}-{body[12:16]}-{body[16:20]}-{body[20:]}"
    if not _UUID.match(body):
        raise InvalidRequestError(
            f"device {text!r} is not a GPU UUID; expected the form nvidia-smi -L prints, GPU-xxxxxxxx-xxxx-..."
        )
    return f"GPU-{body}"


def uuid_from_bytes(raw: bytes) -> str:
    """The canonical UUID of the 16 bytes CUDA's ``CUuuid`` holds."""
    return canonical_uuid(raw.hex())


def pick(devices: Sequence[GpuDevice], uuid: str, *, unavailable: str) -> GpuDevice:
    """The daemon's device with ``uuid``.

    ``unavailable`` says why the daemon has no GPU memory, when it has none: then any UUID is refused with it.
    """
    wanted = canonical_uuid(uuid)
    if not devices:
        raise MemoryUnavailableError(f"{wanted} asked for GPU memory, but this daemon serves host memory only: "
                                     f"{unavailable}; attach with device='cpu' for host memory")
    for device in devices:
        if device.uuid == wanted:
            return device
    seen = ", ".join(f"{d.uuid} ({d.name})" for d in devices)
    raise InvalidRequestError(
        f"no GPU {wanted} on this node; the daemon sees {seen}. A client in another container or node, or one "
        "whose GPU the daemon is not given (NVIDIA_VISIBLE_DEVICES), cannot share its memory"
    )
