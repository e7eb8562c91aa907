"""Model geometries taken from real ``config.json`` files, written as real safetensors shards (random bytes).

Tensor names, shapes, dtypes and their order in the shards are those of the published checkpoints; only the
number of layers is cut where the full model would not fit a benchmark run on a small machine.

    qwen2.5-0.5b   Qwen/Qwen2.5-0.5B, whole: 24 layers of 0.8-8.7 MB tensors beside a 272 MB tied embedding
    llama3-8b      meta-llama/Meta-Llama-3-8B cut to 1 layer: 1 GB embedding and lm_head, 117 MB MLP weights
    small          today's synthetic model (weightd.daemon.synthetic): 0.1-2.9 MB tensors, mixed dtypes
    qwen3-moe      Qwen/Qwen3-30B-A3B cut to 3 layers: 128 experts x 3 per layer (1,152 tensors of 3.1 MB)
    llama3-8b-fp8  an FP8 Llama-3.1-8B with static per-tensor scales (AutoFP8 / llm-compressor's layout: F8_E4M3
                   linear weights, each with a 4-byte weight_scale and input_scale) cut to 4 layers
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class Geometry:
    name: str
    config: dict[str, object]  # the real config.json's keys that matter, with num_hidden_layers cut
    specs: Callable[[dict[str, object]], Specs]
    shard_bytes: int = 2 << 30  # published shards are 4-5 GB; 2 GB halves the writer's peak memory


def _linear(specs: Specs, name: str, shape: tuple[int, int], *, fp8: bool) -> None:
    if not fp8:
        specs[f"{name}.weight"] = (shape, torch.bfloat16)
        return
    specs[f"{name}.weight"] = (shape, torch.float8_e4m3fn)
    specs[f"{name}.weight_scale"] = ((), torch.float32)
    specs[f"{name}.input_scale"] = ((), torch.float32)


def _dense(config: dict[str, object], *, qkv_bias: bool, qk_norm: bool = False, fp8: bool = False) -> Specs:
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])  # type: ignore[call-overload]
    heads, kv = int(config["num_attention_heads"]), int(config["num_key_value_heads"])  # type: ignore[call-overload]
    head_dim = int(config.get("head_dim", hidden // heads))  # type: ignore[call-overload]
    vocab = int(config["vocab_size"])  # type: ignore[call-overload]
    bf16 = torch.bfloat16
    specs: Specs = {"model.embed_tokens.weight": ((vocab, hidden), bf16)}
    for i in range(int(config["num_hidden_layers"])):  # type: ignore[call-overload]
        p = f"model.layers.{i}"
        specs[f"{p}.input_layernorm.weight"] = ((hidden,), bf16)
        for name, rows in (("q_proj", heads * head_dim), ("k_proj", kv * head_dim), ("v_proj", kv * head_dim)):
            _linear(specs, f"{p}.self_attn.{name}", (rows, hidden), fp8=fp8)
            if qkv_bias:
                specs[f"{p}.self_attn.{name}.bias"] = ((rows,), bf16)
        if qk_norm:
            specs[f"{p}.self_attn.q_norm.weight"] = ((head_dim,), bf16)
            specs[f"{p}.self_attn.k_norm.weight"] = ((head_dim,), bf16)
        _linear(specs, f"{p}.self_attn.o_proj", (hidden, heads * head_dim), fp8=fp8)
        specs[f"{p}.post_attention_layernorm.weight"] = ((hidden,), bf16)
        experts = int(config.get("num_experts", 0))  # type: ignore[call-overload]
        if experts:
            moe = int(config["moe_intermediate_size"])  # type: ignore[call-overload]
            specs[f"{p}.mlp.gate.weight"] = ((experts, hidden), bf16)
            for e in range(experts):
                specs[f"{p}.mlp.experts.{e}.gate_proj.weight"] = ((moe, hidden), bf16)
                specs[f"{p}.mlp.experts.{e}.up_proj.weight"] = ((moe, hidden), bf16)
                specs[f"{p}.mlp.experts.{e}.down_proj.weight"] = ((hidden, moe), bf16)
        else:
            _linear(specs, f"{p}.mlp.gate_proj", (inter, hidden), fp8=fp8)
            _linear(specs, f"{p}.mlp.up_proj", (inter, hidden), fp8=fp8)
            _linear(specs, f"{p}.mlp.down_proj", (hidden, inter), fp8=fp8)
    specs["model.norm.weight"] = ((hidden,), bf16)
    if not config.get("tie_word_embeddings"):
        specs["lm_head.weight"] = ((vocab, hidden), bf16)
    return specs


GEOMETRIES = {
    g.name: g
    for g in (
        Geometry("qwen2.5-0.5b", {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
            "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
            "num_hidden_layers": 24, "vocab_size": 151936, "tie_word_embeddings": True,
        }, lambda c: _dense(c, qkv_bias=True)),
        Geometry("llama3-8b", {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
            "num_hidden_layers": 1, "vocab_size": 128256, "tie_word_embeddings": False,
        }, lambda c: _dense(c, qkv_bias=False)),
        Geometry("llama3-8b-fp8", {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
            "num_hidden_layers": 4, "vocab_size": 128256, "tie_word_embeddings": False,
            "quantization_config": {"quant_method": "fp8", "activation_scheme": "static"},
        }, lambda c: _dense(c, qkv_bias=False, fp8=True)),
        Geometry("qwen3-moe", {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
            "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "head_dim": 128,
            "num_attention_heads": 32, "num_key_value_heads": 4, "num_hidden_layers": 3, "vocab_size": 151936,
            "tie_word_embeddings": False,
        }, lambda c: _dense(c, qkv_bias=False, qk_norm=True)),
    )
}


def write_geometry(directory: Path, geometry: Geometry) -> dict[str, int]:
    """Write the checkpoint (shards, index, config); returns each tensor's byte size. The bytes are random
    (one random block, repeated), so nothing compresses or deduplicates them."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = geometry.specs(geometry.config)
    block = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sizes = {name: torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
             for name, (shape, dtype) in specs.items()}
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > geometry.shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape, dtype = specs[name]
            size = sizes[name]
            # A slice of the block would keep all of it alive (and safetensors refuses shared storage): copy.
            raw = block[:size].clone() if size <= block.numel() else block.repeat(-(-size // block.numel()))[:size]
            tensors[name] = raw.view(dtype).view(shape)
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps({**geometry.config, "torch_dtype": "bfloat16"}, indent=2))
    return sizes
