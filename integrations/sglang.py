"""SGLang loads its weights from weightd: SGLang takes a ``BaseModelLoader`` subclass as ``load_format`` in
Python (it has no hook for a new ``--load-format`` string on its command line).

    import sglang
    from weightd import client
    from weightd.integrations.sglang import loader_class

    engine = sglang.Engine(model_path=client.fetch_metadata("s3://models/llama/").metadata_dir,
                           load_format=loader_class(), tp_size=2,
                           model_loader_extra_config={"model_uri": "s3://models/llama/"})

The extra config is vLLM's: ``model_uri`` (default: the model path SGLang was given), ``target`` (the daemon;
default ``WEIGHTD_TARGET``, else its standard socket) and ``zero_copy`` (default true). The modes are vLLM's
too (weightd.integrations.vllm): each tensor-parallel rank attaches its own slices in SGLang's layout, on its
own device, and uses them as its parameters (zero-copy) or copies them in, KV heads shared between ranks as
SGLang replicates them; other architectures and quantized models load the whole model through the model's
own ``load_weights``.
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

logger = logging.getLogger(__name__)



@functools.cache
def loader_class() -> type:
    """The loader class to pass as ``load_format`` (defined on first use: SGLang is imported only then)."""
    import torch
    from sglang.srt.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
        get_tp_group,
    )
    from sglang.srt.model_loader.loader import (
        BaseModelLoader,
        DefaultModelLoader,
        _get_quantization_config,
        _initialize_model,
        post_load_weights,
    )
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    class WeightdModelLoader(BaseModelLoader):  # type: ignore[misc]  # SGLang is untyped here
        """Loads weights a node's weightd daemon holds; see weightd.integrations.sglang."""

        def _settings(self, model_config: Any) -> LoaderSettings:
            return loader_settings(self.load_config.model_loader_extra_config,
                                   default_uri=model_config.model_path, option="model_loader_extra_config")

        def download_model(self, model_config: Any) -> None:
            settings = self._settings(model_config)
            client.fetch_metadata(settings.model_uri, target=settings.target)

        def load_model(self, *, model_config: Any, device_config: Any) -> Any:
            settings = self._settings(model_config)
            target_device = torch.device(device_config.device)
            started = time.perf_counter()
            with set_default_torch_dtype(model_config.dtype):
                with target_device:
                    model = _initialize_model(model_config, self.load_config,
                                              _get_quantization_config(model_config, self.load_config))
                try:
                    how = self._from_rank(model, model_config, settings)
                    post_load_weights(model)  # what the model's own load_weights ends with
                    DefaultModelLoader.postprocess_weights(model, target_device)
                except SliceMismatchError as e:
                    with client.attach(settings.model_uri, device="cpu", target=settings.target) as attached:
                        DefaultModelLoader.load_weights_and_postprocess(model, iter(attached.tensors.items()),
                                                                        target_device)
                    how = f"the whole model through the model's load_weights, because {e}"
            logger.info("loaded %s from weightd in %.2f s: %s", settings.model_uri, time.perf_counter() - started,
                        how)
            return model.eval()

        def _from_rank(self, model: Any, model_config: Any, settings: LoaderSettings) -> str:
            rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
            check_sliceable(type(model).__name__, engine="SGLang", quantization=model_config.quantization)
            device = next(model.parameters()).device
            attached = attach_rank(
                settings.model_uri, rank=rank, tp_size=tp_size, kv_heads=model_config.get_total_num_kv_heads(),
                device=device, target=settings.target,
                rank_devices=lambda: group_devices(device, tp_size=tp_size, cpu_group=lambda: get_tp_group().cpu_group),
            )
            return load_rank(model, attached, zero_copy=settings.zero_copy)

    return WeightdModelLoader
