"""GPU memory through the CUDA driver API (``cuda-bindings``, installed by the ``weightd[cuda12]`` or
``weightd[cuda13]`` extra and imported only when GPU memory is used).

Two ways to hand an arena over, both measured on an H100 (shared/notes/cuda-measured.md):

- VMM (default): one ``cuMemCreate`` allocation per arena, exported as a POSIX file descriptor that goes through
  the descriptor channel like a host arena's. The client imports it and maps it read-only. The memory lives
  until every holder lets go, so engines outlive the daemon, and no PID or IPC namespace need be shared.
- Legacy IPC (``--cuda-ipc legacy``): ``cuMemAlloc`` plus a 64-byte ``cudaIpcMemHandle`` inside the grant.
  Clients can write through it, need the daemon's PID namespace, and cannot attach once the daemon has died.

Arenas are filled by asynchronous copies from pinned (``cuMemHostRegister``) host arenas, one CUDA stream per
arena being filled. The daemon never maps its arenas into torch: all it does is allocate, copy, export, free.
"""

from __future__ import annotations

import abc
import ctypes
import importlib
import os
import re
import secrets
import threading
from collections.abc import Collection
from typing import Any

from weightd.daemon.devices import GpuDevice, uuid_from_bytes
from weightd.daemon.errors import DeviceError, MemoryUnavailableError, OutOfMemoryError
from weightd.daemon.memory.base import CUDA, AdoptionError, ArenaHandle, FillableArena
from weightd.daemon.memory.host import populate

INSTALL_HINT = "pip install 'weightd[cuda12]' (or 'weightd[cuda13]' on CUDA 13 drivers)"
SHARING_MODES = ("vmm", "legacy")
IPC_HANDLE_BYTES = 64  # sizeof(CUipcMemHandle)
_HOST_PAGE = os.sysconf("SC_PAGE_SIZE")
_PINNED: dict[int, int] = {}  # host address -> pinned bytes; registrations are process-wide (PORTABLE)
_PINNED_LOCK = threading.Lock()


def _driver() -> Any:
    try:
        return importlib.import_module("cuda.bindings.driver")
    except ImportError as e:
        raise MemoryUnavailableError(f"the CUDA driver bindings are not installed ({e}): {INSTALL_HINT}") from e


def _call(drv: Any, what: str, result: Any) -> Any:
    """The value(s) of a driver call's ``(CUresult, ...)`` tuple; a named error otherwise."""
    status, *values = result
    if status != drv.CUresult.CUDA_SUCCESS:
        _, name = drv.cuGetErrorName(status)
        _, text = drv.cuGetErrorString(status)
        detail = f"{what} failed: {_text(name)} ({_text(text)})"
        if status == drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            raise OutOfMemoryError(f"{detail}; evict models (weightd evict URI) or lower --gpu-memory-limit")
        raise DeviceError(detail)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def discover() -> list[GpuDevice]:
    """Every GPU the daemon sees; MemoryUnavailableError names what is missing when there is none."""
    drv = _driver()
    try:
        (status,) = drv.cuInit(0)
    except RuntimeError as e:  # cuda-bindings raises when it cannot find the driver library at all
        raise MemoryUnavailableError(f"no NVIDIA driver library ({e})") from e
    if status != drv.CUresult.CUDA_SUCCESS:
        raise MemoryUnavailableError(
            f"the CUDA driver did not initialise ({_text(drv.cuGetErrorName(status)[1])}): no NVIDIA driver, or no "
            "GPU visible to the daemon (nvidia-smi; in a container set NVIDIA_VISIBLE_DEVICES=all)"
        )
    count = _call(drv, "cuDeviceGetCount", drv.cuDeviceGetCount())
    if count == 0:
        raise MemoryUnavailableError("CUDA sees no GPU (in a container set NVIDIA_VISIBLE_DEVICES=all)")
    get_uuid = getattr(drv, "cuDeviceGetUuid_v2", None) or drv.cuDeviceGetUuid
    devices = []
    for ordinal in range(count):
        device = _call(drv, "cuDeviceGet", drv.cuDeviceGet(ordinal))
        raw_uuid = _call(drv, "cuDeviceGetUuid", get_uuid(device))
        name = _call(drv, "cuDeviceGetName", drv.cuDeviceGetName(256, device))
        total = _call(drv, "cuDeviceTotalMem", drv.cuDeviceTotalMem(device))
        devices.append(GpuDevice(uuid_from_bytes(bytes(raw_uuid.bytes)), ordinal,
                                 _text(name).split("\0", 1)[0].strip(), int(total)))
    return devices


class _Device:
    """One GPU's primary context, made current in whichever thread calls ``activate``."""

    def __init__(self, drv: Any, info: GpuDevice) -> None:
        self.drv = drv
        self.info = info
        self.handle = _call(drv, "cuDeviceGet", drv.cuDeviceGet(info.ordinal))
        self.context = _call(drv, "cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain(self.handle))

    def activate(self) -> Any:
        _call(self.drv, "cuCtxSetCurrent", self.drv.cuCtxSetCurrent(self.context))
        return self.drv

    def locate(self, holder: Any) -> None:
        """Point ``holder.location`` (an allocation property or an access descriptor) at this GPU."""
        holder.location.type = self.drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        holder.location.id = self.info.ordinal


class _CudaArena(abc.ABC):
    """What both hand-over modes share: a device address, copies into it, and the grant's description."""

    kind = CUDA

    def __init__(self, device: _Device, name: str, size: int, address: int) -> None:
        self._device = device
        self._name = name
        self._size = size
        self.address = address
        self._stream: Any = None
        self._stream_lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    @property
    def device_uuid(self) -> str:
        return self._device.info.uuid

    def copy_from(self, source: FillableArena, offset: int, length: int, *, source_offset: int | None = None) -> None:
        start = offset if source_offset is None else source_offset
        if min(offset, start) < 0 or offset + length > self._size or start + length > source.size:
            raise ValueError(f"copy [{start}, {start + length}) -> [{offset}, {offset + length}) lies outside "
                             f"arena {self._name} or its source")
        drv = self._device.activate()
        with self._stream_lock:
            if self._stream is None:
                flags = drv.CUstream_flags.CU_STREAM_NON_BLOCKING
                self._stream = _call(drv, "cuStreamCreate", drv.cuStreamCreate(flags))
            stream = self._stream
        source_address = source.tensor().data_ptr() + start
        _call(drv, f"cuMemcpyHtoDAsync into {self._name}",
              drv.cuMemcpyHtoDAsync(self.address + offset, source_address, length, stream))

    def finish_copies(self) -> None:
        with self._stream_lock:
            stream, self._stream = self._stream, None
        if stream is None:
            return
        drv = self._device.activate()
        try:
            _call(drv, f"copying into {self._name} (cuStreamSynchronize)", drv.cuStreamSynchronize(stream))
        finally:
            drv.cuStreamDestroy(stream)

    @abc.abstractmethod
    def release(self) -> None: ...

    def detach(self) -> None:
        # GPU memory cannot be handed to the next daemon: it ends with this process (clients keep their imports;
        # the host tier refills the next daemon's GPU).
        self.release()


class VmmArena(_CudaArena):
    def __init__(self, device: _Device, name: str, size: int) -> None:
        drv = device.activate()
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        device.locate(prop)
        prop.requestedHandleTypes = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        granularity = _call(drv, "cuMemGetAllocationGranularity", drv.cuMemGetAllocationGranularity(
            prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED))
        self.mapped_size = -(-max(size, 1) // granularity) * granularity
        self._allocation = _call(drv, f"cuMemCreate({self.mapped_size}) on {device.info.uuid}",
                                 drv.cuMemCreate(self.mapped_size, prop, 0))
        address = 0
        self._fd = -1
        try:
            address = int(_call(drv, "cuMemAddressReserve",
                                drv.cuMemAddressReserve(self.mapped_size, granularity, 0, 0)))
            _call(drv, "cuMemMap", drv.cuMemMap(address, self.mapped_size, 0, self._allocation, 0))
            access = drv.CUmemAccessDesc()
            device.locate(access)
            access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            _call(drv, "cuMemSetAccess", drv.cuMemSetAccess(address, self.mapped_size, [access], 1))
            handle_type = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
            self._fd = int(_call(drv, "cuMemExportToShareableHandle",
                                 drv.cuMemExportToShareableHandle(self._allocation, handle_type, 0)))
        except BaseException:
            self._unmap(drv, address)
            raise
        super().__init__(device, name, size, address)

    def handle(self) -> ArenaHandle:
        return ArenaHandle("cuda_vmm", self.mapped_size, device_uuid=self.device_uuid)

    def export(self) -> int:
        if self._fd < 0:
            raise RuntimeError(f"arena {self.name} was released")
        return os.dup(self._fd)

    def release(self) -> None:
        if self._fd < 0:
            return
        # Our descriptor holds a reference to the allocation too: close it, or the memory never goes.
        os.close(self._fd)
        self._fd = -1
        self._unmap(self._device.activate(), self.address)

    def _unmap(self, drv: Any, address: int) -> None:
        if address:
            drv.cuMemUnmap(address, self.mapped_size)
            drv.cuMemAddressFree(address, self.mapped_size)
        drv.cuMemRelease(self._allocation)  # clients' imports keep the memory alive


class IpcArena(_CudaArena):
    def __init__(self, device: _Device, name: str, size: int) -> None:
        drv = device.activate()
        address = int(_call(drv, f"cuMemAlloc({size}) on {device.info.uuid}", drv.cuMemAlloc(max(size, 1))))
        try:
            ipc = _call(drv, "cuIpcGetMemHandle", drv.cuIpcGetMemHandle(address))
        except BaseException:
            drv.cuMemFree(address)
            raise
        # The bindings expose the handle's 64 bytes only through its address.
        self._ipc_handle = ctypes.string_at(ipc.getPtr(), IPC_HANDLE_BYTES)
        self._live = True
        super().__init__(device, name, size, address)

    def handle(self) -> ArenaHandle:
        return ArenaHandle("cuda_ipc", max(self.size, 1), device_uuid=self.device_uuid, ipc_handle=self._ipc_handle)

    def export(self) -> int:
        raise RuntimeError(f"arena {self.name} is shared by a CUDA IPC handle, not a descriptor")

    def release(self) -> None:
        if self._live:
            self._live = False
            self._device.activate().cuMemFree(self.address)


class CudaMemory:
    """One GPU's memory; ``sharing`` is "vmm" or "legacy" (see the module's docstring)."""

    kind = CUDA

    def __init__(self, device: GpuDevice, *, sharing: str) -> None:
        if sharing not in SHARING_MODES:
            raise ValueError(f"sharing {sharing!r}: expected one of {SHARING_MODES}")
        self._device = _Device(_driver(), device)
        self._arena_class = VmmArena if sharing == "vmm" else IpcArena

    @property
    def device(self) -> GpuDevice:
        return self._device.info

    @property
    def device_uuid(self) -> str:
        return self._device.info.uuid

    def capacity(self) -> int:
        return self._device.info.total_bytes

    def allocate(self, size: int, *, label: str) -> VmmArena | IpcArena:
        safe_label = re.sub(r"[^A-Za-z0-9_.]+", "_", label)[-80:]
        return self._arena_class(self._device, f"cuda{self._device.info.ordinal}-{safe_label}-{secrets.token_hex(4)}",
                                 size)

    def adopt(self, name: str, size: int) -> VmmArena:
        raise AdoptionError("GPU memory ends with the daemon that allocated it; the host tier refills the GPU")

    def remove_orphans(self, keep: Collection[str]) -> list[str]:
        return []  # nothing of a previous daemon's GPU memory is ours to free

    def pin(self, source: FillableArena) -> None:
        if source.size == 0:
            return
        address = source.tensor().data_ptr()
        length = -(-source.size // _HOST_PAGE) * _HOST_PAGE  # the mapping covers whole pages
        drv = self._device.activate()
        with _PINNED_LOCK:
            if address in _PINNED:
                return
            # Registering faults in a fresh arena's pages in one thread: populate them side by side first.
            populate(source.tensor())
            flags = getattr(drv, "CU_MEMHOSTREGISTER_PORTABLE", 1)  # pinned for every GPU's context
            _call(drv, f"cuMemHostRegister of host arena {source.name}",
                  drv.cuMemHostRegister(address, length, flags))
            _PINNED[address] = length

    def unpin(self, source: FillableArena) -> None:
        if source.size == 0:
            return
        address = source.tensor().data_ptr()
        with _PINNED_LOCK:
            if _PINNED.pop(address, None) is None:
                return
            self._device.activate().cuMemHostUnregister(address)


def open_gpus(*, sharing: str) -> list[CudaMemory]:
    """A backend per GPU the daemon sees; MemoryUnavailableError when there is none (and why)."""
    return [CudaMemory(device, sharing=sharing) for device in discover()]
