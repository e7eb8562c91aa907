"""Issue [3/5] item 1 on a GPU: ``from_pretrained(..., device="cuda:0")`` builds a model whose every parameter is
the daemon's GPU memory, and its logits match transformers' own model of the same directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import run_client

pytestmark = pytest.mark.gpu

ON_GPU = r"""
import json, sys
import torch, transformers
from weightd.integrations.transformers import from_pretrained
target, directory = sys.argv[1:3]
torch.set_grad_enabled(False)
model = from_pretrained(directory, target=target, device="cuda:0")
storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
reference = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map="cuda:0")
ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2]], device="cuda:0")
diff = (model(input_ids=ids).logits.float() - reference(input_ids=ids).logits.float()).abs().max()
print(json.dumps({"storages": len(storages), "on_gpu": all(p.is_cuda for p in model.parameters()),
                  "max_diff": float(diff)}))
"""


def test_a_llama_on_the_daemons_gpu_memory(daemon_factory: Any, tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4,
        vocab_size=8192, tie_word_embeddings=False,
    )).to(torch.bfloat16).save_pretrained(tmp_path / "llama")
    daemon = daemon_factory(extra_args=("--memory", "cuda"))
    result = run_client(ON_GPU, daemon.target, str(tmp_path / "llama"))
    assert result["on_gpu"] and result["storages"] == 1, result  # every parameter in the one imported arena
    assert result["max_diff"] < 0.05, result  # bf16 noise between two models of the same weights
