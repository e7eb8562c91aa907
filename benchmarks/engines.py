"""What loading through weightd costs an engine, side by side with the engine's own loader, in one run:
``python benchmarks/engines.py [--layers 8 --repetitions 3 --skip-vllm --json out.json]``.

A Llama-shaped checkpoint (random bf16 weights, written by transformers) in a local directory, in the page
cache; a daemon holding it resident (warm: what every engine after the first sees). Each measurement runs in a
fresh process with its imports done, interleaved over the repetitions (medians reported):
  transformers  weightd.integrations.transformers.from_pretrained (zero-copy) against
                transformers' own from_pretrained of the directory: seconds, and private memory (RssAnon)
                the process gained, against the model's bytes
  vLLM          --load-format weightd, zero-copy and copy (``"zero_copy": false``), against vLLM's own
                safetensors loader, in .venv-vllm (made by tests/test_vllm_integration.py): engine start-up
                seconds (the load is the part that differs) and the workers' private memory after start-up
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightd import client  # noqa: E402
from weightd.integrations._slices import FUSIONS, shard_rules  # noqa: E402

from benchmarks.daemon import Daemon  # noqa: E402

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
KV_HEADS = 4

TRANSFORMERS_LOAD = r"""
import json, sys, time
import torch, transformers
from weightd.integrations.transformers import from_pretrained

def anon():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("RssAnon:"))) * 1024

mode, directory, target = sys.argv[1:4]
config = transformers.AutoConfig.from_pretrained(directory)
with torch.device("meta"):
    transformers.LlamaForCausalLM(config)  # imports and caches done
before = anon()
t0 = time.perf_counter()
if mode == "weightd":
    model = from_pretrained(directory, device="cpu", target=target)
else:
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "anon_bytes": anon() - before,
                  "model_bytes": sum(p.nbytes for p in model.parameters())}))
"""

VLLM_START = r"""
import json, sys, time

def main():
    import psutil
    from vllm import LLM
    mode, directory, target = sys.argv[1:4]
    extra = {"model_uri": directory, "target": target, "zero_copy": mode == "weightd"}
    t0 = time.perf_counter()
    llm = LLM(model=directory, dtype="bfloat16", max_model_len=128, enforce_eager=True, max_num_seqs=2,
              gpu_memory_utilization=0.1, load_format="safetensors" if mode == "own" else "weightd",
              model_loader_extra_config={} if mode == "own" else extra)
    seconds = time.perf_counter() - t0
    workers = [p for p in psutil.Process().children(recursive=True) if "Worker" in " ".join(p.cmdline()) or
               "VllmWorker" in p.name()]
    anon = sum(p.memory_full_info().uss for p in workers)
    print("RESULT " + json.dumps({"seconds": seconds, "worker_private_bytes": anon, "workers": len(workers)}))
    del llm

if __name__ == "__main__":
    main()
"""


def fresh(python: Path | str, script: str, *args: str, marker: str = "") -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(script)  # a file, not -c: vLLM's processes re-import their main module
    result = subprocess.run([str(python), handle.name, *args], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark step failed:\n{result.stderr[-3000:]}")
    lines = [line.removeprefix(marker) for line in result.stdout.splitlines() if line.startswith(marker)]
    parsed: dict[str, Any] = json.loads(lines[-1])
    return parsed


def write_model(directory: Path, layers: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=KV_HEADS,
        num_hidden_layers=layers, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=512,
    )).to(torch.bfloat16).save_pretrained(directory)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(31999)} | {"[UNK]": 31999}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="t1",
                                         eos_token="t0").save_pretrained(directory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weightd-engines-"))
    model = work / "llama"
    write_model(model, args.layers)
    for path in model.glob("*.safetensors"):
        path.read_bytes()  # into the page cache
    daemon = Daemon(work / "daemon", extra_args=("--memory", "host"))
    target = daemon.target
    try:
        client.load(str(model), target=target)
        # vLLM's layout (padded vocabulary, fused projections) is an entry of its own: warm it too.
        client.load(str(model), shard_rules=shard_rules(KV_HEADS), fusions=FUSIONS, target=target)
        samples: dict[str, list[dict[str, Any]]] = {"transformers/weightd": [], "transformers/own": []}
        vllm_modes = () if args.skip_vllm else ("weightd", "weightd-copy", "own")
        samples |= {f"vllm/{mode}": [] for mode in vllm_modes}
        for _ in range(args.repetitions):
            for mode in ("weightd", "own"):
                samples[f"transformers/{mode}"].append(
                    fresh(sys.executable, TRANSFORMERS_LOAD, mode, str(model), target))
            for mode in vllm_modes:
                samples[f"vllm/{mode}"].append(
                    fresh(VLLM_PYTHON, VLLM_START, mode, str(model), target, marker="RESULT "))
    finally:
        daemon.stop()
    medians = {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
               for name, runs in samples.items()}
    model_bytes = medians["transformers/own"]["model_bytes"]
    print(f"Llama-shaped model, {model_bytes / 2**20:.0f} MiB bf16, medians of {args.repetitions}; daemon warm")
    for name, m in medians.items():
        memory = m.get("anon_bytes", m.get("worker_private_bytes", 0))
        print(f"  {name:<22} {m['seconds']:7.2f} s   private memory {memory / 2**20:8.1f} MiB "
              f"({memory / model_bytes:.2f}x the model)")
    if args.json:
        args.json.write_text(json.dumps({"model_bytes": model_bytes, "samples": samples, "medians": medians},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
