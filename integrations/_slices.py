"""What the vLLM and SGLang loaders share: the per-rank layout both engines give Llama-family weights, sent to
the daemon as data (shard rules and fusions), and putting one rank's tensors into a model's parameters, as
they are (zero-copy) or by copy.

Imports torch (which every engine has) but no engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from weightd import client

# Architectures whose load_weights, in vLLM and in SGLang, only renames and fuses (read in both engines'
# sources), so that a rank's slices placed by name are exactly what their weight loaders would produce.
SLICE_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})



def shard_rules(kv_heads: int) -> tuple[client.ShardRule, ...]:
    """Both engines' layout for these, at every tp_size: Megatron splits; KV heads kept whole, and shared by
    tp_size / kv_heads consecutive ranks when tp_size > kv_heads; the vocabulary padded with zero rows to a
    multiple of 64 (their DEFAULT_VOCAB_PADDING_SIZE), even at tp_size 1."""
    return (
        client.ShardRule(r"\.(q_proj|gate_proj|up_proj)\.(weight|bias)$", 0),
        client.ShardRule(r"\.(k_proj|v_proj)\.(weight|bias)$", 0, heads=kv_heads),
        client.ShardRule(r"\.(o_proj|down_proj)\.weight$", 1),
        client.ShardRule(r"(^|\.)embed_tokens\.weight$", 0, 64),
        client.ShardRule(r"(^|\.)lm_head\.weight$", 0, 64),
    )


FUSIONS = (
    client.Fusion("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    client.Fusion("gate_up_proj", ("gate_proj", "up_proj")),
)


@dataclass(frozen=True)
class LoaderSettings:
    """An engine loader's ``model_loader_extra_config``, checked."""

    model_uri: str
    target: str | None
    zero_copy: bool


def loader_settings(extra: Mapping[str, Any] | None, *, default_uri: str, option: str) -> LoaderSettings:
    """``model_uri`` (default: the model the engine was given), ``target`` and ``zero_copy`` (default true)
    from ``extra``; ``option`` is how the engine spells it, for messages."""
    extra = extra or {}
    unknown = set(extra) - {"model_uri", "target", "zero_copy"}
    if unknown:
        raise ValueError(f"{option} for weightd: unknown key(s) {sorted(unknown)}; expected model_uri, target, "
                         "zero_copy")
    zero_copy = extra.get("zero_copy", True)
    if not isinstance(zero_copy, bool):
        raise ValueError(f"{option} for weightd: zero_copy must be true or false, got {zero_copy!r}")
    return LoaderSettings(str(extra.get("model_uri") or default_uri), extra.get("target"), zero_copy)


class SliceMismatchError(ValueError):
    """A rank's slices do not line up with the model's parameters (names or shapes), so the model loads
    another way."""


def check_sliceable(architecture: str, *, engine: str, quantization: object) -> None:
    if architecture not in SLICE_ARCHITECTURES:
        raise SliceMismatchError(f"{architecture} is not one of {sorted(SLICE_ARCHITECTURES)}, whose weights "
                                 f"weightd places as {engine} does")
    if quantization is not None:
        raise SliceMismatchError(f"quantization {quantization!r} repacks weights in the model's own loaders")


def attach_rank(
    model_uri: str, *, rank: int, tp_size: int, kv_heads: int, device: Any,
    rank_devices: Callable[[], list[str] | None], target: str | None,
) -> client.AttachedModel:
    """Attach this rank in the engine's layout. Every rank first asks for the whole group: the first request
    loads all ranks in one pass (each byte read once), the others wait for it, then each attaches its own."""
    rules = shard_rules(kv_heads)
    try:
        if tp_size > 1:
            client.load(model_uri, tp_size=tp_size, all_ranks=True, shard_rules=rules, fusions=FUSIONS,
                        rank_devices=rank_devices(), target=target)
        return client.attach(model_uri, rank, tp_size=tp_size, shard_rules=rules, fusions=FUSIONS,
                             device=device, target=target)
    except (client.PreconditionFailedError, client.InvalidRequestError) as e:
        raise SliceMismatchError(f"the daemon cannot lay it out: {e}") from e


def group_devices(device: Any, *, tp_size: int, cpu_group: Callable[[], Any]) -> list[str] | None:
    """Each rank's GPU UUID, in rank order, gathered over the tensor-parallel group's CPU (gloo) group from
    ``cpu_group()``; None on CPU, where every rank lives in host memory."""
    import torch

    if device.type != "cuda":
        return None
    uuids: list[str] = [""] * tp_size
    mine = f"GPU-{torch.cuda.get_device_properties(device).uuid}"
    torch.distributed.all_gather_object(uuids, mine, group=cpu_group())
    return uuids


def load_rank(model: Any, attached: client.AttachedModel, *, zero_copy: bool) -> str:
    """Make ``attached``'s tensors ``model``'s parameters when each fits exactly (the lease then lives as long
    as the model), else copy them in and let go. Returns how, for the log; raises SliceMismatchError (with
    nothing changed) when they do not fit."""
    import torch

    params = dict(model.named_parameters())
    misfit = zero_copy_misfit(params, attached.tensors) if zero_copy else "zero_copy is off"
    where = f"rank {attached.rank} of {attached.tp_size}"
    if misfit is None:
        for name, param in params.items():
            param.data = attached.tensors[name]
        model._weightd_weights = attached
        nbytes = sum(p.nbytes for p in params.values())
        return f"zero-copy: {where}'s {len(params)} parameters ({nbytes} bytes) are weightd's memory"
    with attached, torch.no_grad():
        packed = {f.fused: f.parts for f in FUSIONS}
        for destination, source in slice_copies(params, packed, attached.tensors):
            destination.copy_(source)
    return f"{where}'s slices copied by name and offset (not zero-copy: {misfit})"


def zero_copy_misfit(params: Mapping[str, Any], tensors: Mapping[str, Any]) -> str | None:
    """Why ``tensors`` cannot become ``params`` as they are (None: every parameter has its exact tensor)."""
    for name, param in params.items():
        tensor = tensors.get(name)
        if tensor is None:
            return f"weightd serves no tensor named {name}"
        for what in ("dtype", "shape", "device"):
            if getattr(tensor, what) != getattr(param, what):
                return f"{name} is {getattr(tensor, what)} in weightd, {getattr(param, what)} in the engine"
    return None


def slice_copies(
    params: Mapping[str, Any], packed: Mapping[str, Sequence[str]], tensors: Mapping[str, Any]
) -> list[tuple[Any, Any]]:
    """(destination, source) pairs that fill every parameter in ``params`` from one rank's slices.

    ``packed`` maps a fused module to its checkpoint modules, in order (vLLM's ``packed_modules_mapping``): a
    part served unfused, ``...q_proj.weight``, goes into ``...qkv_proj.weight`` after the parts before it,
    along the parameter's ``output_dim``. Slices no parameter takes (a tied lm_head, rotary buffers, another
    pipeline stage's layers) are left out. Raises SliceMismatchError naming what does not fit.
    """
    part_of = {part: (fused, index) for fused, parts in packed.items() for index, part in enumerate(parts)}
    copies: list[tuple[Any, Any]] = []
    fused_parts: dict[str, dict[int, Any]] = {}  # fused parameter name -> part index -> slice
    fused_module: dict[str, str] = {}
    for name, tensor in tensors.items():
        if name in params:
            copies.append((params[name].data, tensor))
            continue
        module_path, _, leaf = name.rpartition(".")
        prefix, _, module = module_path.rpartition(".")
        if module in part_of:
            fused, index = part_of[module]
            fused_name = ".".join(p for p in (prefix, fused, leaf) if p)
            if fused_name in params:
                fused_parts.setdefault(fused_name, {})[index] = tensor
                fused_module[fused_name] = fused
    for fused_name, parts in fused_parts.items():
        param = params[fused_name]
        expected = len(packed[fused_module[fused_name]])
        if sorted(parts) != list(range(expected)):
            raise SliceMismatchError(f"{fused_name}: the checkpoint holds {len(parts)} of its {expected} parts")
        dim = getattr(param, "output_dim", 0)
        offset = 0
        for index in range(expected):
            width = parts[index].shape[dim]
            if offset + width > param.shape[dim]:
                raise SliceMismatchError(f"{fused_name}: parts overflow dim {dim} of shape {list(param.shape)}")
            copies.append((param.data.narrow(dim, offset, width), parts[index]))
            offset += width
        if offset != param.shape[dim]:
            raise SliceMismatchError(f"{fused_name}: parts fill {offset} of {param.shape[dim]} along dim {dim}")
    filled = {name for name in params if name in tensors or name in fused_parts}
    missing = sorted(set(params) - filled)
    if missing:
        raise SliceMismatchError(f"no slice for {len(missing)} parameter(s), e.g. {missing[:4]}")
    wrong = [f"{dst.shape} <- {src.shape}" for dst, src in copies if dst.shape != src.shape]
    if wrong:
        raise SliceMismatchError(f"{len(wrong)} slice(s) of another shape than their parameter, e.g. {wrong[:3]}")
    return copies
