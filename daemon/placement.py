"""Placement presets: which tensors a rank's arena holds back to back and serves as one.

An engine that fuses projections (vLLM's and SGLang's ``qkv_proj`` = q|k|v, ``gate_up_proj`` = gate|up) can use
the daemon's memory as its parameters only if each fused parameter is one contiguous tensor. A ``Fusion`` says
so as data, the way engines declare it (vLLM's ``packed_modules_mapping``): the daemon never imports an engine.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from weightd.daemon.errors import InvalidRequestError

_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class Fusion:
    """Tensors ``<prefix>.<part>.<leaf>``, one per name in ``parts``, lie in that order back to back (each
    rank's slices, split on dim 0 or not at all) and are served as one tensor ``<prefix>.<fused>.<leaf>``,
    their concatenation along dim 0. Groups missing a part, or whose parts differ in dtype, trailing shape or
    split, are served unfused."""

    fused: str
    parts: tuple[str, ...]


def check_fusions(fusions: Iterable[Fusion]) -> tuple[Fusion, ...]:
    """Reject malformed fusions up front (INVALID_ARGUMENT), so a load never starts with them."""
    checked = []
    claimed: dict[str, str] = {}
    for fusion in fusions:
        names = (fusion.fused, *fusion.parts)
        bad = [n for n in names if not _MODULE_NAME.fullmatch(n)]
        if bad:
            raise InvalidRequestError(f"fusion {fusion.fused!r}: {bad[0]!r} is not a module name "
                                      "(letters, digits and _ only, e.g. qkv_proj from q_proj, k_proj, v_proj)")
        if len(fusion.parts) < 2 or len(set(fusion.parts)) != len(fusion.parts):
            raise InvalidRequestError(f"fusion {fusion.fused!r} needs two or more distinct parts, got "
                                      f"{list(fusion.parts)}")
        for part in fusion.parts:
            if part in claimed:
                raise InvalidRequestError(f"{part!r} is a part of both {claimed[part]!r} and {fusion.fused!r}")
            claimed[part] = fusion.fused
        checked.append(fusion)
    return tuple(checked)


def fused_name(name: str, fusions: Iterable[Fusion]) -> tuple[str, int, int] | None:
    """For a tensor that is a part of a fusion: (its fused tensor's name, which part it is, how many parts)."""
    module_path, _, leaf = name.rpartition(".")
    prefix, _, module = module_path.rpartition(".")
    for fusion in fusions:
        if module in fusion.parts:
            return ".".join(p for p in (prefix, fusion.fused, leaf) if p), fusion.parts.index(module), len(fusion.parts)
    return None
