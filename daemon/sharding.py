"""Tensor-parallel sharding rules: which dimension of each tensor a rank gets a slice of.

Pure functions over names and shapes. The default plans follow Megatron-style tensor parallelism as vLLM and
SGLang apply it to Llama-family checkpoints: column-parallel (dim 0) for q/k/v/gate/up projections (weights and
biases), the embedding and lm_head; row-parallel (dim 1) for o_proj/down_proj weights; everything else
(norms, row-parallel biases, rotary buffers) replicated. As in both engines, the vocabulary is padded with zero
rows to a multiple of 64 before it is split, so any vocabulary size splits and each rank's rows are the engine's.
FP8 checkpoints' weight scales follow their weights as in vLLM: a per-channel ``weight_scale`` (one per output
row) splits with a column-parallel weight and stays whole beside a row-parallel one; a block-wise
``weight_scale_inv`` (one per 128 x 128 block) splits on the weight's dimension. A tensor of one element (a
per-tensor scale) is never split.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from weightd.daemon.errors import InvalidRequestError, UnsupportedModelError

# vLLM's and SGLang's DEFAULT_VOCAB_PADDING_SIZE.
VOCAB_PAD_MULTIPLE = 64


@dataclass(frozen=True)
class ShardRule:
    """Tensors whose name matches ``pattern`` (``re.search``) are split on ``split_dim``, or replicated
    when ``split_dim`` is None; one of a single element is replicated either way. A split dimension is first
    padded with zeros to a multiple of ``pad_multiple``.
    ``heads`` > 0 says it is that many heads, never cut: beyond ``heads`` ranks, consecutive ranks share one."""

    pattern: str
    split_dim: int | None
    pad_multiple: int = 1
    heads: int = 0

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)


@dataclass(frozen=True)
class Architecture:
    """What a default plan needs of a model's config.json."""

    model_type: str | None
    kv_heads: int | None  # num_key_value_heads (num_attention_heads without grouped-query attention)


# A column-parallel projection's tensors: all split on dim 0, FP8 scales (per-channel, block-wise) with the weight.
_COLUMN_PARALLEL_PARAMS = r"\.(weight|bias|weight_scale|weight_scale_inv)$"


def llama_family_plan(kv_heads: int | None) -> tuple[ShardRule, ...]:
    """The plan for checkpoints with Llama's tensor names; k/v keep their ``kv_heads`` heads whole."""
    return (
        ShardRule(r"\.(q_proj|q_b_proj|kv_b_proj|gate_proj|up_proj|w1|w3)" + _COLUMN_PARALLEL_PARAMS, 0),
        ShardRule(r"\.(k_proj|v_proj)" + _COLUMN_PARALLEL_PARAMS, 0, heads=kv_heads or 0),
        ShardRule(r"\.(o_proj|down_proj|w2)\.(weight|weight_scale_inv)$", 1),
        ShardRule(r"(^|\.)embed_tokens\.weight$", 0, VOCAB_PAD_MULTIPLE),
        ShardRule(r"((^|\.)lm_head|\.shared_head\.head)\.weight$", 0, VOCAB_PAD_MULTIPLE),
    )


# config.json model_type values with a default plan: families whose checkpoints use Llama's names. The Qwen MoE
# families name each expert's projections so too (mlp.experts.N.gate_proj, ...), Mixtral its own way
# (block_sparse_moe.experts.N.w1/w3 like gate/up, w2 like down): the plan then splits every expert's intermediate
# dimension, as vLLM and SGLang do under tensor parallelism without expert parallelism, and replicates the router
# (mlp.gate, block_sparse_moe.gate). DeepSeek-V2/V3's attention (MLA) adds the column-parallel q_b_proj and
# kv_b_proj; its low-rank q_a_proj and kv_a_proj_with_mqa are replicated, and its multi-token-prediction layer's
# shared_head.head is split like lm_head.
LLAMA_FAMILY = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gemma",
    "gemma2", "olmo", "olmo2", "granite",
})


def parse_rules(rules: Iterable[ShardRule]) -> tuple[ShardRule, ...]:
    """Check user rules up front so a bad pattern is an INVALID_ARGUMENT, not a failure mid-load."""
    checked = []
    for rule in rules:
        try:
            re.compile(rule.pattern)
        except re.error as e:
            raise InvalidRequestError(f"shard rule pattern {rule.pattern!r} is not a valid regex: {e}") from e
        if rule.split_dim is not None and rule.split_dim < 0:
            raise InvalidRequestError(f"shard rule {rule.pattern!r}: split_dim must be >= 0")
        if rule.pad_multiple < 1:
            raise InvalidRequestError(f"shard rule {rule.pattern!r}: pad_multiple must be >= 1")
        if rule.heads < 0:
            raise InvalidRequestError(f"shard rule {rule.pattern!r}: heads must be >= 0")
        checked.append(rule)
    return tuple(checked)


def check_group(tp_size: int, rank: int) -> None:
    if tp_size < 1:
        raise InvalidRequestError(f"tp_size must be at least 1, got {tp_size}")
    if not 0 <= rank < tp_size:
        raise InvalidRequestError(f"rank must be in [0, {tp_size}) for tp_size {tp_size}, got {rank}")


def select_rules(
    architecture: Architecture, user_rules: Sequence[ShardRule], *, tp_size: int
) -> tuple[ShardRule, ...]:
    """The rules to apply: the user's if given (at tp_size 1 too, where only their padding applies), else the
    default plan for the model's architecture."""
    if user_rules:
        return tuple(user_rules)
    if tp_size == 1:
        return ()
    if architecture.model_type not in LLAMA_FAMILY:
        raise UnsupportedModelError(
            f"no default tensor-parallel plan for model_type {architecture.model_type!r} (known: "
            f"{', '.join(sorted(LLAMA_FAMILY))}); pass shard_rules (pattern -> split dim or replicate) "
            "to attach it with tp_size > 1"
        )
    return llama_family_plan(architecture.kv_heads)


@dataclass(frozen=True)
class Split:
    """A tensor split on ``dim`` into ``parts`` slices of ``part`` entries (the last ones zeros past the end);
    with fewer parts than ranks, consecutive ranks hold the same slice."""

    dim: int
    part: int
    parts: int

    def index(self, rank: int, tp_size: int) -> int:
        """Which slice ``rank`` holds: vLLM's and SGLang's ``tp_rank // (tp_size // num_kv_heads)`` for KV heads."""
        return rank * self.parts // tp_size


def split_for(name: str, shape: Sequence[int], rules: Sequence[ShardRule], *, tp_size: int) -> Split | None:
    """How ``name`` is split for ``tp_size`` ranks, or None if every rank gets it whole (unpadded)."""
    rule = next((rule for rule in rules if rule.regex.search(name)), None)
    if rule is None or rule.split_dim is None or (tp_size == 1 and rule.pad_multiple == 1) or math.prod(shape) == 1:
        return None
    dim = rule.split_dim
    if dim >= len(shape):
        raise InvalidRequestError(
            f"tensor {name!r} has {len(shape)} dimension(s) (shape {list(shape)}); a rule splits it on dim {dim}"
        )
    padded = -(-shape[dim] // rule.pad_multiple) * rule.pad_multiple
    parts = tp_size
    if rule.heads:
        if padded % rule.heads or (rule.heads % tp_size and tp_size % rule.heads):
            raise InvalidRequestError(
                f"tensor {name!r} dim {dim} (size {shape[dim]}) is {rule.heads} heads: its size must be a "
                f"multiple of that, and tp_size {tp_size} must divide the heads or be a multiple of them"
            )
        parts = min(tp_size, rule.heads)  # beyond that, ranks share heads
    if padded % parts:
        padding = f" (padded to a multiple of {rule.pad_multiple}: {padded})" if padded != shape[dim] else ""
        raise InvalidRequestError(
            f"tensor {name!r} dim {dim} has size {shape[dim]}{padding}, which tp_size {tp_size} does not "
            "divide evenly"
        )
    return Split(dim, padded // parts, parts)
