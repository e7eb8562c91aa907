"""A checkpoint of tens of thousands of tensors (a large MoE's experts) loads and attaches whole, with tensor
views made as they are read. Their sizes leave alignment gaps between arena slots, so whole tensors are read as
staged runs; a lone rank's pieces, none back to back in the file, are more ranges than libstreamer takes in one
request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from weightd import client


def test_thirty_thousand_tensors_load_and_attach_exactly(daemon_factory: Any, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    full = {f"model.layers.{i // 128}.mlp.experts.{i % 128}.w": torch.randn(2 * (i % 7 + 1), 3, generator=generator)
            for i in range(30_000)}
    save_file(full, str(tmp_path / "model.safetensors"))
    daemon = daemon_factory()
    with client.attach(str(tmp_path), target=daemon.target) as model:
        assert len(model.tensors) == len(full) and "model.layers.0.mlp.experts.5.w" in model.tensors
        assert list(model.tensors) == list(load_file(tmp_path / "model.safetensors"))  # the file's order
        for name, tensor in full.items():
            assert torch.equal(model.tensors[name], tensor), name
        assert model.tensors["model.layers.3.mlp.experts.1.w"] is model.tensors["model.layers.3.mlp.experts.1.w"]
    rules = [client.ShardRule(r"\.w$", 0)]
    with client.attach(str(tmp_path), 1, tp_size=2, shard_rules=rules, target=daemon.target) as model:
        for name, tensor in full.items():
            assert torch.equal(model.tensors[name], tensor[tensor.shape[0] // 2 :]), name
    whole, lone = sorted(daemon.models(), key=lambda row: row.tp_size)
    assert whole.storage_bytes_read == sum(t.nbytes for t in full.values()) == 2 * lone.storage_bytes_read
