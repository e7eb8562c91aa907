"""vLLM loads its weights from weightd: load format ``weightd``, registered through the ``vllm.general_plugins``
entry point (vLLM imports this module in every process it starts, and only then).

    vllm serve "$(weightd metadata s3://models/llama/)" --load-format weightd \\
        --model-loader-extra-config '{"model_uri": "s3://models/llama/"}'

``model_uri`` defaults to the model vLLM was given, so a local directory needs only ``--load-format weightd``.
``target`` in the extra config names the daemon (default: ``WEIGHTD_TARGET``, else its standard socket).

Each tensor-parallel worker attaches its own rank, on its own device, laid out by the daemon as vLLM's
parameters are (weightd.integrations._slices: q|k|v back to back as ``qkv_proj``, gate|up as ``gate_up_proj``,
the vocabulary padded with zero rows to a multiple of 64). The daemon reads the group's slices from storage
once. Then:

- zero-copy (``"zero_copy": true``, the default): when every parameter has a tensor of its exact name, dtype,
  shape and device, the tensors become the parameters. The model uses weightd's memory, read-only, and holds
  its lease for as long as it lives. Engine post-processing that repacks weights (vLLM's CPU backend repacks
  linear layers for oneDNN) makes its own copy of those.
- copy: otherwise (a dtype other than the checkpoint's, ``"zero_copy": false``), each tensor is copied into its
  parameter by name and offset, on the device: one copy per parameter, and vLLM narrows nothing.

KV heads are kept whole: with tp_size > num_kv_heads, tp_size / num_kv_heads consecutive ranks get the same
head, as vLLM replicates them. When slices do not fit at all (an architecture other than Llama, Mistral, Qwen2
and Qwen3, quantization), the worker attaches the whole model in host shared memory and
hands it to the model's own ``load_weights``, whose weight loaders fuse and take this rank's slice: every model
vLLM supports loads, at the cost of mapping the whole model. The log line of each load says which way it went
and why.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from weightd import client
from weightd.integrations._slices import (
    LoaderSettings,
    SliceMismatchError,
    attach_rank,
    check_sliceable,
    group_devices,
    load_rank,
    loader_settings,
)

# vLLM shows only lines of loggers under "vllm" (it configures that one), and its users read those.
logger = logging.getLogger(f"vllm.plugins.{__name__}")

LOAD_FORMAT = "weightd"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``--load-format weightd`` known to vLLM."""
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(loader_class())


@functools.cache
def loader_class() -> type:
    """The loader, a ``BaseModelLoader`` subclass (defined on first use: vLLM is imported only then)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class WeightdModelLoader(BaseModelLoader):  # type: ignore[misc]  # vLLM is untyped here
        """Loads weights a node's weightd daemon holds; see weightd.integrations.vllm."""

        def _settings(self, model_config: Any) -> LoaderSettings:
            return loader_settings(self.load_config.model_loader_extra_config,
                                   default_uri=model_config.model, option="--model-loader-extra-config")

        def download_model(self, model_config: Any) -> None:
            settings = self._settings(model_config)
            client.fetch_metadata(settings.model_uri, target=settings.target)

        def load_weights(self, model: Any, model_config: Any) -> None:
            settings = self._settings(model_config)
            started = time.perf_counter()
            try:
                how = self._from_rank(model, model_config, settings)
            except SliceMismatchError as e:
                self._load_whole(model, model_config, settings)
                how = f"the whole model through the model's load_weights, because {e}"
            logger.info("loaded %s from weightd in %.2f s: %s", settings.model_uri, time.perf_counter() - started,
                        how)

        def _from_rank(self, model: Any, model_config: Any, settings: LoaderSettings) -> str:
            rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
            check_sliceable(type(model).__name__, engine="vLLM", quantization=model_config.quantization)
            device = next(model.parameters()).device
            attached = attach_rank(settings.model_uri, rank=rank, tp_size=tp_size,
                                   kv_heads=model_config.get_total_num_kv_heads(), device=device,
                                   rank_devices=lambda: group_devices(device, tp_size=tp_size, cpu_group=_cpu_group),
                                   target=settings.target)
            return load_rank(model, attached, zero_copy=settings.zero_copy)

        def _load_whole(self, model: Any, model_config: Any, settings: LoaderSettings) -> None:
            with client.attach(settings.model_uri, device="cpu", target=settings.target) as attached:
                loaded = model.load_weights(iter(attached.tensors.items()))
            if loaded is not None:
                missing = {name for name, _ in model.named_parameters()} - set(loaded)
                if missing and model_config.quantization is None:
                    raise ValueError(f"{settings.model_uri}: weightd holds no weights for {sorted(missing)[:8]} "
                                     f"({len(missing)} parameters); is it the model vLLM was given?")

    def _cpu_group() -> Any:
        from vllm.distributed import get_tp_group

        return get_tp_group().cpu_group

    return WeightdModelLoader
