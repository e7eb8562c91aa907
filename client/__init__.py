"""weightd.client: attach model weights that a node-local weightd daemon holds, as zero-copy tensors.

    from weightd import client
    with client.attach("s3://models/llama/", rank=0) as model:
        model.tensors["model.embed_tokens.weight"]

The client never imports the daemon; it speaks only the weightd.v1 gRPC contract.
"""

from __future__ import annotations

from weightd.client._api import (
    AttachedModel,
    Fusion,
    LoadProgress,
    MemoryBudget,
    ModelMetadata,
    ResidentModel,
    ShardRule,
    attach,
    evict,
    fetch_metadata,
    list_models,
    load,
    memory_budgets,
)
from weightd.client._errors import (
    AccessDeniedError,
    CorruptModelError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    PreconditionFailedError,
    ResourceExhaustedError,
    UnavailableError,
    WeightdError,
)

__all__ = [
    "AccessDeniedError",
    "AttachedModel",
    "CorruptModelError",
    "DeadlineExceededError",
    "Fusion",
    "InvalidRequestError",
    "LoadProgress",
    "MemoryBudget",
    "ModelMetadata",
    "ModelNotFoundError",
    "PreconditionFailedError",
    "ResidentModel",
    "ResourceExhaustedError",
    "ShardRule",
    "UnavailableError",
    "WeightdError",
    "attach",
    "evict",
    "fetch_metadata",
    "list_models",
    "load",
    "memory_budgets",
]
