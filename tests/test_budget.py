"""The host memory budget: a load that does not fit evicts unleased models, least recently attached first;
leased models are never evicted, and when they leave no room the load fails with RESOURCE_EXHAUSTED."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from weightd import client
from weightd.daemon.config import DaemonConfig, parse_memory_limit

from tests.conftest import Model, copy_model

MIB = 2**20


@pytest.fixture
def three_models(llama_model: Model, tmp_path: Path) -> tuple[str, str, str]:
    a, b, c = (str(copy_model(llama_model, tmp_path / name)) for name in ("a", "b", "c"))
    return f"file://{a}", f"file://{b}", f"file://{c}"


def test_lru_eviction_makes_room(daemon_factory, three_models: tuple[str, str, str], llama_model: Model) -> None:
    a, b, c = three_models
    budget = int(llama_model.nbytes * 2.5)  # room for two models
    daemon = daemon_factory(extra_args=("--host-memory-limit", str(budget)))
    client.load(a, target=daemon.target)
    client.load(b, target=daemon.target)
    time.sleep(0.01)
    with client.attach(a, target=daemon.target):  # a is now more recently used than b
        pass
    client.load(c, target=daemon.target)

    assert {m.model_uri for m in daemon.models()} == {a, c}
    assert "evicted " + b in daemon.log.read_text()
    (usage,) = client.memory_budgets(target=daemon.target)
    assert (usage.kind, usage.limit_bytes) == ("host", budget)
    assert usage.used_bytes == sum(m.resident_bytes for m in daemon.models()) <= budget
    assert len(daemon.segments()) == len(daemon.manifests()) == 2
    rows = {m.model_uri: m for m in daemon.models()}
    assert rows[a].last_used < rows[c].last_used


def test_leased_models_are_never_evicted(daemon_factory, three_models: tuple[str, str, str],
                                         llama_model: Model) -> None:
    a, b, c = three_models
    budget = int(llama_model.nbytes * 2.5)
    daemon = daemon_factory(extra_args=("--host-memory-limit", str(budget)))
    with client.attach(a, target=daemon.target) as held_a, client.attach(c, target=daemon.target):
        with pytest.raises(client.ResourceExhaustedError) as raised:
            client.attach(b, target=daemon.target)
        message = str(raised.value)
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"budget is {budget / MIB:.1f} MiB (--host-memory-limit)" in message
        assert f"{b} needs " in message
        assert f"{a} (" in message and f"{c} (" in message and "1 lease(s)" in message
        # Nothing was evicted, nothing half-loaded, and the leased tensors still read.
        assert {m.model_uri for m in daemon.models()} == {a, c}
        assert held_a.tensors["model.norm.weight"].shape == llama_model.tensors["model.norm.weight"].shape
    deadline = time.monotonic() + 5
    while any(m.leases for m in daemon.models()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with client.attach(b, target=daemon.target) as model:  # now the unleased ones make room
        assert model.tensors


def test_a_model_larger_than_the_whole_budget(daemon_factory, three_models: tuple[str, str, str]) -> None:
    a, _, _ = three_models
    daemon = daemon_factory(extra_args=("--host-memory-limit", "1MiB"))
    with pytest.raises(client.ResourceExhaustedError, match=r"budget is 1\.0 MiB"):
        client.load(a, target=daemon.target)
    assert daemon.models() == [] and daemon.segments() == []


def test_the_default_budget_leaves_headroom() -> None:
    config = DaemonConfig.load({}, {"WEIGHTD_CONFIG": "/nonexistent.toml"})
    assert str(config.host_memory_limit) == "75%"
    assert config.host_memory_limit.of(1000) == 750
    assert parse_memory_limit("64GiB").of(1) == 64 * 2**30
    with pytest.raises(ValueError, match="percentage"):
        parse_memory_limit("150%")
