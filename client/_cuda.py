"""GPU arenas in a client: import a VMM descriptor and map it read-only, or open a legacy CUDA IPC handle.

Either way the result is one uint8 CUDA tensor over the whole arena, wrapped zero-copy: ``torch.as_tensor`` of an
object whose ``__cuda_array_interface__`` names the mapped range (the path cupy's ``UnownedMemory`` takes too, less
cupy's own set-up in the attach). Every view of it keeps the mapping alive; when the last one goes, the mapping
is unmapped and the imported memory released. CUDA modules are imported only here, when a grant holds GPU
memory.
"""

from __future__ import annotations

import importlib
import weakref
from typing import Any

import grpc
import torch
from weightd.client._errors import PreconditionFailedError, ResourceExhaustedError, WeightdError

INSTALL_HINT = "pip install 'weightd[cuda12]' (or 'weightd[cuda13]' on CUDA 13 drivers)"
_IPC_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


def device_uuid(index: int) -> str:
    """The UUID of this process's CUDA device ``index``, as nvidia-smi -L prints it."""
    # torch prints the 16 bytes as 8-4-4-4-12 lowercase hex; nvidia-smi adds "GPU-".
    return "GPU-" + str(torch.cuda.get_device_properties(index).uuid).lower().removeprefix("gpu-")


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise PreconditionFailedError(
            f"this process cannot map GPU memory: {name} is not installed ({e}); {INSTALL_HINT}",
            code=grpc.StatusCode.FAILED_PRECONDITION,
        ) from e


def _check(drv: Any, what: str, result: Any) -> Any:
    status, *values = result
    if status != drv.CUresult.CUDA_SUCCESS:
        name = drv.cuGetErrorName(status)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        cls = ResourceExhaustedError if status == drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY else WeightdError
        raise cls(f"{what} failed in this process: {name}", code=grpc.StatusCode.INTERNAL)
    return values[0] if values else None


class _VmmMapping:
    """An imported VMM allocation mapped read-only at ``address``; undone when this object is collected."""

    def __init__(self, drv: Any, descriptor: int, size: int, device_index: int) -> None:
        _check(drv, "cuInit", drv.cuInit(0))  # idempotent: the driver API is usable whatever torch did so far
        device = _check(drv, "cuDeviceGet", drv.cuDeviceGet(device_index))
        # torch and this call share the device's primary context.
        context = _check(drv, "cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain(device))
        _check(drv, "cuCtxSetCurrent", drv.cuCtxSetCurrent(context))
        handle_type = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        handle = _check(drv, "cuMemImportFromShareableHandle", drv.cuMemImportFromShareableHandle(descriptor,
                                                                                                  handle_type))
        address = 0
        try:
            address = int(_check(drv, "cuMemAddressReserve", drv.cuMemAddressReserve(size, 0, 0, 0)))
            _check(drv, "cuMemMap", drv.cuMemMap(address, size, 0, handle, 0))
            access = drv.CUmemAccessDesc()
            access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            access.location.id = device_index
            access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ
            _check(drv, "cuMemSetAccess (read-only)", drv.cuMemSetAccess(address, size, [access], 1))
        except BaseException:
            _unmap(drv, address, size, handle)
            raise
        self.address = address
        weakref.finalize(self, _unmap, drv, address, size, handle)


def _unmap(drv: Any, address: int, size: int, handle: Any) -> None:
    if address:
        drv.cuMemUnmap(address, size)
        drv.cuMemAddressFree(address, size)
    drv.cuMemRelease(handle)


class _IpcMapping:
    """A legacy CUDA IPC handle opened at ``address``; closed when this object is collected."""

    def __init__(self, cupy: Any, ipc_handle: bytes, device_index: int) -> None:
        with cupy.cuda.Device(device_index):
            try:
                self.address = int(cupy.cuda.runtime.ipcOpenMemHandle(ipc_handle, _IPC_LAZY_ENABLE_PEER_ACCESS))
            except cupy.cuda.runtime.CUDARuntimeError as e:
                raise PreconditionFailedError(
                    f"cannot open the daemon's CUDA IPC handle: {e}. Legacy IPC needs the daemon's PID and IPC "
                    "namespaces (hostPID/hostIPC across pods) and a daemon that is still running; a daemon started "
                    "with --cuda-ipc vmm needs neither", code=grpc.StatusCode.FAILED_PRECONDITION,
                ) from e
        weakref.finalize(self, _close_ipc, cupy, self.address, device_index)


def _close_ipc(cupy: Any, address: int, device_index: int) -> None:
    with cupy.cuda.Device(device_index):
        cupy.cuda.runtime.ipcCloseMemHandle(address)


class _DeviceRange:
    """``size`` bytes of device memory at ``address`` as ``torch.as_tensor`` takes them; the tensor holds this
    object, and this object the mapping, for as long as any view lives."""

    def __init__(self, address: int, size: int, mapping: object) -> None:
        self.__cuda_array_interface__ = {
            "shape": (size,), "typestr": "|u1", "data": (address, False), "strides": None, "version": 3,
            "stream": None,  # nothing to wait for: the daemon finished its copies before it granted the memory
        }
        self._mapping = mapping


def _as_tensor(address: int, size: int, device_index: int, mapping: object) -> torch.Tensor:
    return torch.as_tensor(_DeviceRange(address, size, mapping), device=torch.device("cuda", device_index))


def import_vmm(descriptor: int, size: int, device_index: int) -> torch.Tensor:
    """The VMM allocation behind ``descriptor``, mapped read-only on device ``device_index``; the caller
    closes the descriptor (the import holds its own reference)."""
    mapping = _VmmMapping(_module("cuda.bindings.driver"), descriptor, size, device_index)
    return _as_tensor(mapping.address, size, device_index, mapping)


def open_ipc(ipc_handle: bytes, size: int, device_index: int) -> torch.Tensor:
    """The legacy CUDA IPC allocation ``ipc_handle`` names, opened on device ``device_index`` (writable)."""
    mapping = _IpcMapping(_module("cupy"), ipc_handle, device_index)
    return _as_tensor(mapping.address, size, device_index, mapping)
