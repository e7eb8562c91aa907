"""The client's exception tree: one class per thing the caller should do, rebuilt from gRPC status codes."""

from __future__ import annotations

import grpc


class WeightdError(Exception):
    """Root of every error weightd.client raises. ``code`` is the gRPC status the daemon answered with."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidRequestError(WeightdError):
    """The request or the model's files are malformed (INVALID_ARGUMENT): fix them; retrying will not help."""


class ModelNotFoundError(WeightdError):
    """The bucket, prefix or object does not exist, or the model is not resident (NOT_FOUND): check the URI."""


class AccessDeniedError(WeightdError):
    """Storage refused the daemon's credentials (PERMISSION_DENIED / UNAUTHENTICATED): fix the credentials."""


class UnavailableError(WeightdError):
    """The daemon or the storage could not be reached (UNAVAILABLE): retry later."""


class CorruptModelError(WeightdError):
    """Stored bytes disagree with the headers (DATA_LOSS): re-upload the model."""


class PreconditionFailedError(WeightdError):
    """The model cannot be served as asked (FAILED_PRECONDITION): e.g. non-safetensors weights, or in use."""


class ResourceExhaustedError(WeightdError):
    """The daemon has no memory for the model (RESOURCE_EXHAUSTED): evict models or add memory."""


class DeadlineExceededError(WeightdError):
    """The daemon did not answer in time (DEADLINE_EXCEEDED): raise the timeout or preload the model."""


_BY_CODE: dict[grpc.StatusCode, type[WeightdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.PERMISSION_DENIED: AccessDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: AccessDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: CorruptModelError,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def error_for(code_name: str, message: str) -> WeightdError:
    """The error for a status named outside gRPC (the descriptor channel's refusals)."""
    code = grpc.StatusCode.__members__.get(code_name, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, WeightdError)(message, code=code)


def from_rpc_error(error: grpc.RpcError, *, target: str) -> WeightdError:
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        details = f"cannot reach weightd at {target} ({details}); is the daemon running?"
    return _BY_CODE.get(code, WeightdError)(details, code=code)
