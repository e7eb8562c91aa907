"""vLLM loads its weights from weightd: load format ``weightd``, registered through the ``vllm.general_plugins``
entry point (vLLM imports this module in every process it starts, and only then).

    vllm serve "$(weightd metadata s3://models/llama/)" --load-format weightd \\
        --model-loader-extra-config '{"model_uri": "s3://models/llama/"}'

``model_uri`` defaults to the model vLLM was given, so a local directory needs only ``--load-format weightd``.
``target`` in the extra config names the daemon (default: ``WEIGHTD_TARGET``, else its standard socket).

Copy mode, for every model vLLM supports: each worker attaches the whole model in host shared memory (one
daemon entry for the node, read from storage once, mapped zero-copy into every worker) and hands it to the
model's own ``load_weights``, whose weight loaders fuse q/k/v and gate/up and take this tensor-parallel rank's
slice: one copy of this rank's bytes into vLLM's parameters, and no storage read in vLLM.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from weightd import client

logger = logging.getLogger(__name__)

LOAD_FORMAT = "weightd"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``--load-format weightd`` known to vLLM."""
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(loader_class())


@functools.cache
def loader_class() -> type:
    """The loader, a ``BaseModelLoader`` subclass (defined on first use: vLLM is imported only then)."""
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
            started = time.perf_counter()
            with client.attach(model_uri, device="cpu", target=target) as attached:
                loaded = model.load_weights(iter(attached.tensors.items()))
            if loaded is not None:
                missing = {name for name, _ in model.named_parameters()} - set(loaded)
                if missing and model_config.quantization is None:
                    raise ValueError(f"{model_uri}: weightd holds no weights for {sorted(missing)[:8]} "
                                     f"({len(missing)} parameters); is it the model vLLM was given?")
            logger.info("loaded %s from weightd (%d tensors) in %.2f s", model_uri, len(attached.tensors),
                        time.perf_counter() - started)

    return WeightdModelLoader
