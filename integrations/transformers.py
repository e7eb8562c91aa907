"""transformers models whose parameters are the daemon's memory: ``from_pretrained(model_uri)``.

    from weightd.integrations.transformers import from_pretrained
    model = from_pretrained("s3://models/llama/", device="cuda:0")

The config comes from the daemon's metadata directory, which is also the model's ``name_or_path``, so
``AutoTokenizer.from_pretrained(model.name_or_path)`` finds the tokenizer there. Parameters are views of the
attached memory (read-only host shared memory, or the daemon's GPU memory): nothing is copied unless ``dtype``
differs from the checkpoint's, which copies every floating-point tensor and says so in a log line. The lease
lasts as long as the model does.
"""

from __future__ import annotations

import collections
import importlib
import logging
import weakref
from typing import Any

import torch
from weightd import client

logger = logging.getLogger(__name__)


def from_pretrained(
    model_uri: str,
    *,
    device: torch.device | str | int | None = None,
    dtype: torch.dtype | None = None,
    target: str | None = None,
    **kwargs: Any,
) -> Any:
    """A ``transformers`` model of ``config.json``'s first architecture, built on the daemon's tensors.

    ``device`` is as for ``weightd.client.attach`` (None: the current CUDA device when CUDA is available, else
    host memory). ``dtype`` None keeps the checkpoint's. Other keyword arguments go to the model class's
    ``from_pretrained`` (e.g. ``attn_implementation``).
    """
    transformers = importlib.import_module("transformers")
    attached = client.attach(model_uri, device=device, target=target)
    try:
        config = transformers.AutoConfig.from_pretrained(attached.config_dir)
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        if model_class is None:
            raise client.PreconditionFailedError(
                f"{model_uri}: config.json names no transformers architecture ({architectures or 'none'}); "
                "build the model yourself from client.attach(...).tensors"
            )
        tensors = dict(attached.tensors)
        stored = _checkpoint_dtype(tensors)
        if dtype is not None and dtype != stored:
            copied = sum(t.nbytes for t in tensors.values() if t.is_floating_point())
            logger.info("%s: converting %s -> %s copies %d bytes of weights out of the shared memory",
                        model_uri, stored, dtype, copied)
            tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
        if attached.device.type == "cuda":
            # Without a device map, transformers would copy every parameter to the CPU.
            kwargs.setdefault("device_map", str(attached.device))
        model = model_class.from_pretrained(
            None, config=config, state_dict=tensors, dtype=dtype or stored, **kwargs
        )
    except BaseException:
        attached.close()
        raise
    model.name_or_path = str(attached.config_dir)
    model.config.name_or_path = str(attached.config_dir)
    weakref.finalize(model, attached.close)  # the lease ends with the model
    return model


def _checkpoint_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating-point dtype most of the checkpoint's bytes have."""
    by_dtype: collections.Counter[torch.dtype] = collections.Counter()
    for tensor in tensors.values():
        if tensor.is_floating_point():
            by_dtype[tensor.dtype] += tensor.nbytes
    return by_dtype.most_common(1)[0][0] if by_dtype else torch.float32
