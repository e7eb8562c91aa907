"""Issue [3/5] item 1: ``weightd.integrations.transformers.from_pretrained`` on CPU, with real small models.

A Llama-shaped and a BERT-shaped model (random weights, saved by transformers itself) are served by a real
daemon; a separate client process builds each through weightd and through transformers' own
``from_pretrained`` of the same directory, and compares their outputs, checks every parameter lies in the
daemon's shared mapping, and that its private memory grew by a small fraction of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import run_client

BUILD_AND_COMPARE = r"""
import json, logging, sys
import torch, transformers
from weightd.integrations.transformers import from_pretrained

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
target, uri, directory, dtype_name = sys.argv[1:5]
dtype = getattr(torch, dtype_name) if dtype_name != "none" else None

def status(field):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(field + ":"))) * 1024

torch.set_grad_enabled(False)
config = transformers.AutoConfig.from_pretrained(directory)
with torch.device("meta"):  # transformers' own imports and caches, before measuring
    getattr(transformers, config.architectures[0])(config)
anon_before = status("RssAnon")
model = from_pretrained(uri, target=target, device="cpu", dtype=dtype)
anon_growth = status("RssAnon") - anon_before
maps = [l.split() for l in open("/proc/self/maps") if "/dev/shm/weightd-" in l]
ranges = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps]
parameters = dict(model.named_parameters())
outside = [n for n, p in parameters.items()
           if not any(lo <= p.data_ptr() and p.data_ptr() + p.nbytes <= hi for lo, hi in ranges)]
reference = getattr(transformers, model.config.architectures[0]).from_pretrained(directory, dtype=dtype or "auto")
reference.eval(); model.eval()
ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2]])
ours, theirs = model(input_ids=ids), reference(input_ids=ids)
key = "logits" if hasattr(ours, "logits") and ours.logits is not None else "last_hidden_state"
a, b = getattr(ours, key), getattr(theirs, key)
tokenizer = transformers.AutoTokenizer.from_pretrained(model.name_or_path)
print(json.dumps({
    "output": key, "equal": bool(torch.equal(a, b)), "max_diff": float((a.float() - b.float()).abs().max()),
    "parameters": len(parameters), "outside": outside, "anon_growth": anon_growth,
    "model_bytes": sum(p.nbytes for p in parameters.values()), "dtype": str(next(iter(parameters.values())).dtype),
    "tokens": tokenizer("t1 t5")["input_ids"], "config_dir": model.name_or_path,
}))
"""


def save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(64)} | {"[UNK]": 64}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import transformers

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4,
        vocab_size=8192, tie_word_embeddings=False,
    )).to(torch.bfloat16)
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4, vocab_size=8192,
    ), add_pooling_layer=True)
    directories = {}
    for name, model in (("llama", llama), ("bert", bert)):
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        save_tokenizer(directory)
        directories[name] = directory
    return directories


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_model_built_on_the_daemons_memory_matches_transformers_own(
    daemon_factory: Any, tiny_models: dict[str, Path], name: str
) -> None:
    daemon = daemon_factory()
    directory = tiny_models[name]
    result = run_client(BUILD_AND_COMPARE, daemon.target, str(directory), str(directory), "none")
    assert result["equal"], result
    assert result["outside"] == [] and result["parameters"] > 10, result  # every parameter is shared memory
    assert result["anon_growth"] < result["model_bytes"] / 4, result
    assert result["dtype"] == ("torch.bfloat16" if name == "llama" else "torch.float32")
    # The tokenizer comes from the daemon's metadata directory, not from the model's own.
    assert result["tokens"] == [1, 5] and result["config_dir"] != str(directory)
    (row,) = daemon.models()
    assert row.leases == 0  # the client process exited: its lease ended with it


def test_another_dtype_copies_and_says_so(daemon_factory: Any, tiny_models: dict[str, Path]) -> None:
    daemon = daemon_factory()
    directory = tiny_models["llama"]
    result = run_client(BUILD_AND_COMPARE, daemon.target, str(directory), str(directory), "float32")
    assert result["equal"] and result["dtype"] == "torch.float32", result
    assert len(result["outside"]) == result["parameters"]  # converted: the model's own memory
