"""Issue [3/5] items 2 and 3 on a GPU: vLLM and SGLang serve a local Llama through weightd zero-copy (each
parameter is the daemon's GPU memory), and generate the tokens their own loaders give. Each engine's test skips
where that engine is not installed (neither fits in what a GPU machine without network can be carried)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

VLLM = r"""
import json, sys
from vllm import LLM, SamplingParams

def main():
    directory, target = sys.argv[1:3]
    extra = {"model_uri": directory, "target": target} if target else {}
    llm = LLM(model=directory, dtype="bfloat16", max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.3,
              load_format="weightd" if target else "safetensors", model_loader_extra_config=extra)
    outputs = llm.generate(["t5 t7 t9", "t3 t100 t42"], SamplingParams(max_tokens=8, temperature=0))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))

if __name__ == "__main__":
    main()
"""

SGLANG = r"""
import json, sys
import sglang
from weightd.integrations.sglang import loader_class

def main():
    directory, target = sys.argv[1:3]
    kwargs = {"load_format": loader_class(), "model_loader_extra_config": {"target": target}} if target else {}
    engine = sglang.Engine(model_path=directory, dtype="bfloat16", mem_fraction_static=0.3, **kwargs)
    outputs = engine.generate(["t5 t7 t9", "t3 t100 t42"], {"max_new_tokens": 8, "temperature": 0})
    print("RESULT " + json.dumps([o["text"] for o in outputs]))
    engine.shutdown()

if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("engine-llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4,
        vocab_size=1000, tie_word_embeddings=False, max_position_embeddings=512,
    )).to(torch.bfloat16).save_pretrained(directory)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(999)} | {"[UNK]": 999}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="t1",
                                         eos_token="t0").save_pretrained(directory)
    return directory


def serve(script: str, tmp_path: Path, directory: Path, target: str) -> tuple[Any, str]:
    path = tmp_path / "serve.py"
    path.write_text(script)
    result = subprocess.run([sys.executable, str(path), str(directory), target], capture_output=True, text=True,
                            timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT ")), output


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_engine_serves_zero_copy_from_the_daemons_gpu_memory(
    engine: str, llama_dir: Path, daemon_factory: Any, tmp_path: Path
) -> None:
    if importlib.util.find_spec(engine) is None:
        pytest.skip(f"{engine} is not installed")
    script = VLLM if engine == "vllm" else SGLANG
    daemon = daemon_factory(extra_args=("--memory", "cuda"))
    ours, output = serve(script, tmp_path, llama_dir, daemon.target)
    assert "zero-copy: rank 0 of 1's" in output
    assert "cuda" in {m.memory_kind for m in daemon.models()}  # beside the host tier it was filled from
    theirs, _ = serve(script, tmp_path, llama_dir, "")
    assert ours == theirs
