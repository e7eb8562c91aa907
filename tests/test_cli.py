"""The command line against a real daemon: load (with progress), ls (table and --json), evict."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from weightd import client

from tests.conftest import Model, copy_model


def weightd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "weightd.daemon", *args], capture_output=True, text=True,
                          timeout=300)


def test_load_ls_evict(daemon_factory, llama_model: Model, tmp_path: Path) -> None:
    daemon = daemon_factory()
    directory = copy_model(llama_model, tmp_path / "m")
    loaded = weightd(
        "load", f"file://{directory}", "--distributed", "--memory-limit", "64MiB", "--concurrency", "3",
        "--target", daemon.target,
    )
    assert loaded.returncode == 0, loaded.stderr
    log = daemon.log.read_text()
    # distributed needs CUDA: accepted, and the load falls back to non-distributed streaming.
    assert "streams file://" in log and "non-distributed" in log
    assert "concurrency 3 in a helper)" in log
    assert "100.0%" in loaded.stderr and "ready" in loaded.stdout

    listed = weightd("ls", "--json", "--target", daemon.target)
    (row,) = json.loads(listed.stdout)
    assert {"model_uri", "state", "tp_size", "rank", "resident_bytes", "leases", "storage_bytes_read"} <= set(row)
    assert row["model_uri"] == f"file://{directory}"
    assert (row["state"], row["tp_size"], row["rank"], row["leases"]) == ("ready", 1, 0, 0)
    assert row["storage_bytes_read"] == llama_model.nbytes

    table = weightd("ls", "--target", daemon.target).stdout.splitlines()
    assert re.fullmatch(r"host memory: [\d.]+ MiB used of a \d+\.\d GiB budget \(\d+\.\d GiB in all\)", table[0])
    assert table[1].split() == [
        "MODEL", "TP", "RANK", "LAYOUT", "MEMORY", "DEVICE", "STATE", "RESIDENT", "READ", "LEASES", "LAST", "USED"
    ]
    assert str(directory) in table[2] and table[2].split()[3:6] == ["default", "host", "-"]
    assert table[2].endswith("s ago")
    assert row["last_used"] > 0 and row["memory_kind"] == "host" and row["device_uuid"] == ""
    assert row["shard_rules"] == [] and row["fusions"] == []

    # An engine's layout (rules, fusions) is an entry of its own, and says so.
    rules = (client.ShardRule(r"embed_tokens", 0, 64), client.ShardRule(r"norm", None))
    fusions = (client.Fusion("qkv_proj", ("q_proj", "k_proj", "v_proj")),)
    client.load(str(directory), shard_rules=rules, fusions=fusions, target=daemon.target)
    (engine,) = [m for m in client.list_models(target=daemon.target) if m.shard_rules]
    assert engine.shard_rules == rules and engine.fusions == fusions
    table = weightd("ls", "--target", daemon.target).stdout.splitlines()
    assert sorted(line.split()[3] for line in table[2:]) == ["default", "rules=2,fusions=1"]

    # A plain path names the same model as its file:// URI: no second load.
    with client.attach(str(directory), target=daemon.target) as model:
        assert len(model.tensors) == len(llama_model.tensors)
    assert len(daemon.models()) == 2  # the default entry and the engine layout's

    evicted = weightd("evict", str(directory), "--target", daemon.target)
    assert evicted.returncode == 0 and "evicted" in evicted.stdout
    assert daemon.models() == [] and daemon.segments() == []

    missing = weightd("evict", str(directory), "--target", daemon.target)
    assert missing.returncode == 1 and "not resident" in missing.stderr


def test_cli_reports_an_absent_daemon(tmp_path: Path) -> None:
    result = weightd("ls", "--target", f"unix://{tmp_path}/absent.sock")
    assert result.returncode == 1
    assert "is the daemon running" in result.stderr


def test_serve_refuses_an_empty_streamer_variable(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "weightd.daemon", "serve", "--socket", str(tmp_path / "w.sock"), "--cache-dir",
         str(tmp_path / "cache")], capture_output=True, text=True, timeout=120,
        env={**os.environ, "RUNAI_STREAMER_CONCURRENCY": ""},
    )
    assert result.returncode == 1
    assert "RUNAI_STREAMER_CONCURRENCY is set but empty" in result.stderr
    assert not (tmp_path / "w.sock").exists()


def test_serve_help_lists_every_setting() -> None:
    shown = weightd("serve", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "--host-memory-limit" in shown.stdout and "default 75%" in shown.stdout
    assert "--allowed-uids" in shown.stdout and "--listen-api" in shown.stdout
