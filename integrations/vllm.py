"""vLLM loads its weights from weightd: load format ``weightd``, registered through the ``vllm.general_plugins``
entry point (vLLM imports this module in every process it starts, and only then).

    vllm serve "$(weightd metadata s3://models/llama/)" --load-format weightd \\
        --model-loader-extra-config '{"model_uri": "s3://models/llama/"}'

``model_uri`` defaults to the model vLLM was given, so a local directory needs only ``--load-format weightd``.
``target`` in the extra config names the daemon (default: ``WEIGHTD_TARGET``, else its standard socket).

Each tensor-parallel worker attaches its own rank, on its own device: the daemon reads that rank's slices from
storage once (all of a node's ranks share one read when loaded together) and the worker copies each slice into
vLLM's parameter by name and offset: q|k|v into ``qkv_proj``, gate|up into ``gate_up_proj``, the padded
vocabulary rows into the embedding. One copy per tensor, on the device, and vLLM narrows nothing.

When that does not fit (a model without a tensor-parallel plan in the daemon, KV heads replicated because
tp_size > num_kv_heads, quantization, parameter names the checkpoint does not use), the worker attaches the
whole model in host shared memory and hands it to the model's own ``load_weights``, whose weight loaders fuse
and take this rank's slice: every model vLLM supports loads, at the cost of mapping the whole model. The log
line of each load says which way it went and why.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from weightd import client

logger = logging.getLogger(__name__)

LOAD_FORMAT = "weightd"


class SliceMismatchError(ValueError):
    """A rank's slices do not line up with the model's parameters (names or shapes)."""


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``--load-format weightd`` known to vLLM."""
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(loader_class())


def slice_copies(
    params: Mapping[str, Any], packed: Mapping[str, Sequence[str]], tensors: Mapping[str, Any]
) -> list[tuple[Any, Any]]:
    """(destination, source) pairs that fill every parameter in ``params`` from one rank's slices.

    ``packed`` is the model's ``packed_modules_mapping`` (fused module -> its checkpoint modules, in order):
    ``...q_proj.weight`` goes to ``...qkv_proj.weight`` after the slices of the modules before it, along the
    parameter's ``output_dim``. Slices no parameter takes (a tied lm_head, rotary buffers, another pipeline
    stage's layers) are left out. Raises SliceMismatchError naming what does not fit.
    """
    part_of = {part: (fused, index) for fused, parts in packed.items() for index, part in enumerate(parts)}
    copies: list[tuple[Any, Any]] = []
    fused_parts: dict[str, dict[int, Any]] = {}  # fused parameter name -> part index -> slice
    fused_module: dict[str, str] = {}
    for name, tensor in tensors.items():
        if name in params:
            copies.append((params[name].data, tensor))
            continue
        module_path, _, leaf = name.rpartition(".")
        prefix, _, module = module_path.rpartition(".")
        if module in part_of:
            fused, index = part_of[module]
            fused_name = ".".join(p for p in (prefix, fused, leaf) if p)
            if fused_name in params:
                fused_parts.setdefault(fused_name, {})[index] = tensor
                fused_module[fused_name] = fused
    for fused_name, parts in fused_parts.items():
        param = params[fused_name]
        expected = len(packed[fused_module[fused_name]])
        if sorted(parts) != list(range(expected)):
            raise SliceMismatchError(f"{fused_name}: the checkpoint holds {len(parts)} of its {expected} parts")
        dim = getattr(param, "output_dim", 0)
        offset = 0
        for index in range(expected):
            width = parts[index].shape[dim]
            if offset + width > param.shape[dim]:
                raise SliceMismatchError(f"{fused_name}: parts overflow dim {dim} of shape {list(param.shape)}")
            copies.append((param.data.narrow(dim, offset, width), parts[index]))
            offset += width
        if offset != param.shape[dim]:
            raise SliceMismatchError(f"{fused_name}: parts fill {offset} of {param.shape[dim]} along dim {dim}")
    filled = {name for name in params if name in tensors or name in fused_parts}
    missing = sorted(set(params) - filled)
    if missing:
        raise SliceMismatchError(f"no slice for {len(missing)} parameter(s), e.g. {missing[:4]}")
    wrong = [f"{dst.shape} <- {src.shape}" for dst, src in copies if dst.shape != src.shape]
    if wrong:
        raise SliceMismatchError(f"{len(wrong)} slice(s) of another shape than their parameter, e.g. {wrong[:3]}")
    return copies


def _why_not_slices(model: Any, model_config: Any, tp_size: int) -> str | None:
    if model_config.quantization is not None:
        return f"quantization {model_config.quantization!r} repacks weights in the model's own loaders"
    if tp_size > model_config.get_total_num_kv_heads():
        return (f"tp_size {tp_size} > {model_config.get_total_num_kv_heads()} KV heads: vLLM replicates KV heads, "
                "the daemon's plans split them")
    if not hasattr(model, "packed_modules_mapping"):
        return f"{type(model).__name__} declares no packed_modules_mapping"
    return None


@functools.cache
def loader_class() -> type:
    """The loader, a ``BaseModelLoader`` subclass (defined on first use: vLLM is imported only then)."""
    import torch
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class WeightdModelLoader(BaseModelLoader):  # type: ignore[misc]  # vLLM is untyped here
        """Loads weights a node's weightd daemon holds; see weightd.integrations.vllm."""

        def _settings(self, model_config: Any) -> tuple[str, str | None]:
            extra = self.load_config.model_loader_extra_config or {}
            unknown = set(extra) - {"model_uri", "target"}
            if unknown:
                raise ValueError(f"--model-loader-extra-config for weightd: unknown key(s) {sorted(unknown)}; "
                                 "expected model_uri and target")
            return str(extra.get("model_uri") or model_config.model), extra.get("target")

        def download_model(self, model_config: Any) -> None:
            model_uri, target = self._settings(model_config)
            client.fetch_metadata(model_uri, target=target)

        def load_weights(self, model: Any, model_config: Any) -> None:
            model_uri, target = self._settings(model_config)
            rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
            started = time.perf_counter()
            why_not = _why_not_slices(model, model_config, tp_size) or self._copy_slices(
                model, model_uri, target, rank=rank, tp_size=tp_size)
            if why_not is None:
                how = f"rank {rank} of {tp_size}'s slices copied by name and offset"
            else:
                self._load_whole(model, model_config, model_uri, target)
                how = f"the whole model through the model's load_weights, because {why_not}"
            logger.info("loaded %s from weightd in %.2f s: %s", model_uri, time.perf_counter() - started, how)

        def _copy_slices(self, model: Any, model_uri: str, target: str | None, *, rank: int,
                         tp_size: int) -> str | None:
            """Copy this rank's slices into the parameters; None when done, else why not (nothing copied)."""
            device = next(model.parameters()).device
            try:
                if tp_size > 1:
                    # Every rank asks for the whole group: the first request loads all ranks in one pass (each
                    # byte read once), the others wait for it, then each attaches its own.
                    client.load(model_uri, tp_size=tp_size, all_ranks=True, rank_devices=_group_devices(device),
                                target=target)
                attached = client.attach(model_uri, rank, tp_size=tp_size, device=device, target=target)
            except (client.PreconditionFailedError, client.InvalidRequestError) as e:
                return f"the daemon cannot slice it: {e}"
            with attached, torch.no_grad():
                try:
                    copies = slice_copies(dict(model.named_parameters()), model.packed_modules_mapping,
                                          attached.tensors)
                except SliceMismatchError as e:
                    return str(e)
                for destination, source in copies:
                    destination.copy_(source)
            return None

        def _load_whole(self, model: Any, model_config: Any, model_uri: str, target: str | None) -> None:
            with client.attach(model_uri, device="cpu", target=target) as attached:
                loaded = model.load_weights(iter(attached.tensors.items()))
            if loaded is not None:
                missing = {name for name, _ in model.named_parameters()} - set(loaded)
                if missing and model_config.quantization is None:
                    raise ValueError(f"{model_uri}: weightd holds no weights for {sorted(missing)[:8]} "
                                     f"({len(missing)} parameters); is it the model vLLM was given?")

    def _group_devices(device: torch.device) -> list[str] | None:
        """Each rank's GPU UUID, in rank order (gathered over the tensor-parallel group); None on CPU."""
        if device.type != "cuda":
            return None
        from vllm.distributed import get_tp_group

        uuids: list[str] = [""] * get_tensor_model_parallel_world_size()
        mine = f"GPU-{torch.cuda.get_device_properties(device).uuid}"
        torch.distributed.all_gather_object(uuids, mine, group=get_tp_group().cpu_group)
        return uuids

    return WeightdModelLoader
