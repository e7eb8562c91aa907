"""The daemon's exception tree. Subclasses say what the caller should do; the gRPC status each maps to is
decided in one place (weightd.daemon.service.STATUS_BY_ERROR), so nothing here imports gRPC."""

from __future__ import annotations


class WeightdError(Exception):
    """Root of every error the daemon reports to a caller."""


class ConfigurationError(WeightdError):
    """The daemon's own settings or surroundings are wrong (a flag, variable or config-file value; its socket or
    cache directory taken by another daemon; unreadable TLS files): fix what the message names and restart."""


class InvalidRequestError(WeightdError):
    """The request itself is malformed (bad URI, rank >= tp_size, ...): fix the request."""


class ModelNotFoundError(WeightdError):
    """The bucket, container, prefix or object does not exist: check the URI."""


class AccessDeniedError(WeightdError):
    """Storage refused the credentials the daemon has: grant access or fix the credentials."""


class UnauthenticatedError(WeightdError):
    """The daemon has no usable credentials for this storage: configure them."""


class StorageUnavailableError(WeightdError):
    """Storage could not be reached (after retries): check the endpoint and network, then retry."""


class ShuttingDownError(WeightdError):
    """The daemon is stopping: it aborted this load and takes no new ones. Retry once it is back (a restarted
    daemon adopts every model that was complete)."""


class InvalidModelError(WeightdError):
    """The model's files are malformed (bad safetensors header, inconsistent index): fix the checkpoint."""


class CorruptModelError(WeightdError):
    """Stored bytes disagree with what the headers promise (short object, truncated data): re-upload."""


class UnsupportedModelError(WeightdError):
    """The model is well formed but weightd cannot serve it (e.g. only .bin weights): convert it."""


class ModelInUseError(WeightdError):
    """The operation needs the model unleased (e.g. eviction): detach the clients first."""


class OutOfMemoryError(WeightdError):
    """The arena does not fit in the memory the daemon may use: evict models or add memory."""


class MemoryUnavailableError(WeightdError):
    """The memory asked for does not exist here (GPU memory on a daemon without CUDA or without the extra that
    drives it): use host memory, or install what the message names."""


class DeviceError(WeightdError):
    """The GPU or its driver failed an operation (the message names the CUDA call and error): check the GPU
    (nvidia-smi, the kernel log), then retry."""
