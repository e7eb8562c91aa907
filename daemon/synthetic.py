"""Write a synthetic Llama-shaped safetensors checkpoint (random weights, shards + index + config files).

Used by ``weightd demo``, the tests and the benchmarks, so that none of them needs a model hub.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def llama_tensors(
    *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, dtypes: Sequence[str]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of a Llama checkpoint; layer i uses ``dtypes[i % len(dtypes)]``."""
    head_dim = hidden // heads
    base = _DTYPES[dtypes[0]]
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"model.embed_tokens.weight": ((vocab, hidden), base)}
    for i in range(layers):
        dtype = _DTYPES[dtypes[i % len(dtypes)]]
        p = f"model.layers.{i}"
        specs |= {
            f"{p}.input_layernorm.weight": ((hidden,), dtype),
            f"{p}.self_attn.q_proj.weight": ((heads * head_dim, hidden), dtype),
            f"{p}.self_attn.k_proj.weight": ((kv_heads * head_dim, hidden), dtype),
            f"{p}.self_attn.v_proj.weight": ((kv_heads * head_dim, hidden), dtype),
            f"{p}.self_attn.o_proj.weight": ((hidden, heads * head_dim), dtype),
            f"{p}.post_attention_layernorm.weight": ((hidden,), dtype),
            f"{p}.mlp.gate_proj.weight": ((intermediate, hidden), dtype),
            f"{p}.mlp.up_proj.weight": ((intermediate, hidden), dtype),
            f"{p}.mlp.down_proj.weight": ((hidden, intermediate), dtype),
        }
    specs |= {"model.norm.weight": ((hidden,), base), "lm_head.weight": ((vocab, hidden), base)}
    return specs


def write_synthetic_model(
    directory: Path,
    *,
    total_bytes: int,
    shards: int = 3,
    dtypes: Sequence[str] = ("bf16",),
    hidden: int = 512,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write about ``total_bytes`` of weights in ``shards`` files plus index and config; returns the tensors."""
    intermediate, heads, kv_heads, vocab = hidden * 11 // 4, 8, 2, 8192
    cycle = llama_tensors(  # one layer of each dtype, so mixed-dtype models land near total_bytes
        layers=len(dtypes), hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads, vocab=0,
        dtypes=dtypes,
    )
    per_layer = sum(torch.Size(shape).numel() * torch.empty(0, dtype=dt).element_size()
                    for shape, dt in cycle.values()) // len(dtypes)
    layers = max(1, (total_bytes - 2 * vocab * hidden * 2) // per_layer)
    specs = llama_tensors(
        layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads, vocab=vocab,
        dtypes=dtypes,
    )
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
        for name, (shape, dtype) in specs.items()
    }
    _save_sharded(directory, tensors, shards)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    return tensors


def _save_sharded(directory: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    total = sum(t.nbytes for t in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    seen = 0
    for name in names:
        groups[min(shards - 1, (seen + tensors[name].nbytes // 2) * shards // max(total, 1))].append(name)
        seen += tensors[name].nbytes
    groups = [g for g in groups if g]
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(directory / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(group, file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
