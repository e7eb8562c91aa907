"""Issue [3/4], item 5: the streamer's extra-config settings per load, with a real streamer and SeaweedFS.

A per-load ``concurrency`` streams in a helper process started with that RUNAI_STREAMER_CONCURRENCY. The
streamer's own debug log says how many storage clients each streamer started with, and in which process.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from weightd import client
from weightd.daemon import loader
from weightd.daemon.errors import ModelNotFoundError
from weightd.daemon.memory.host import HostMemory
from weightd.daemon.plan import build_plan
from weightd.daemon.storage.base import open_store, parse_model_uri

from tests.conftest import ATTACH_AND_VERIFY, Model, S3Server, copy_model, run_client

# e.g. "[2026-11-22 02:26:33.860] [DEBUG  ] [23588 23588] [streamer/impl/streamer/streamer.cc: 78 @ Streamer]
# Streamer concurrency 2 ; s3 concurrency 2 ; ..."
STREAMER_STARTED = re.compile(r"\[(\d+) \d+\] \[[^\]]*@ Streamer\s*\] Streamer concurrency (\d+) ;")
DAEMON_CONCURRENCY = 4


def streamers_started(log: Path) -> list[tuple[int, int]]:
    """(pid, concurrency) of every streamer the daemon and its helpers started, in order."""
    return [(int(pid), int(n)) for pid, n in STREAMER_STARTED.findall(log.read_text(errors="replace"))]


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


@pytest.fixture
def daemon(daemon_factory, s3_server: S3Server):
    env = {**s3_server.env(), "RUNAI_STREAMER_LOG_LEVEL": "DEBUG", "RUNAI_STREAMER_LOG_TO_STDERR": "1"}
    return daemon_factory(env, extra_args=("--concurrency", str(DAEMON_CONCURRENCY)))


def test_a_per_load_concurrency_starts_the_streamer_with_that_many_clients(
    daemon, s3_server: S3Server, s3_llama: str, llama_model: Model
) -> None:
    s3_server.upload(llama_model.directory, "models", "llama-default/")
    default_uri = "s3://models/llama-default/"

    done = client.load(s3_llama, concurrency=3, target=daemon.target)
    client.load(default_uri, target=daemon.target)
    client.load(default_uri, concurrency=DAEMON_CONCURRENCY, target=daemon.target)  # resident: no new load

    started = streamers_started(daemon.log)
    assert [n for _, n in started] == [3, DAEMON_CONCURRENCY]
    assert started[0][0] != daemon.process.pid  # the helper
    assert started[1][0] == daemon.process.pid
    assert children(daemon.process.pid) == []  # the helper exited
    # bytes_done adds up the helper's reports of landed ranges.
    assert done.state == "ready" and done.bytes_done == done.bytes_total == llama_model.nbytes

    for uri in (s3_llama, default_uri):
        result = run_client(ATTACH_AND_VERIFY, uri, daemon.target, str(llama_model.directory))
        assert result["tensors"] == result["expected"] and result["mismatched"] == [] and result["outside"] == []
    assert {m.model_uri: m.storage_bytes_read for m in daemon.models()} == {
        s3_llama: llama_model.nbytes, default_uri: llama_model.nbytes
    }


def test_concurrency_zero_is_invalid_argument(daemon, s3_llama: str) -> None:
    with pytest.raises(client.InvalidRequestError, match="concurrency 0: must be at least 1"):
        client.load(s3_llama, concurrency=0, target=daemon.target)
    assert daemon.models() == []
    assert client.load(s3_llama, concurrency=2, target=daemon.target).state == "ready"


@pytest.mark.parametrize("concurrency", [None, 2], ids=["in-process", "helper"])
def test_a_shard_gone_mid_load_is_named(tmp_path: Path, llama_model: Model, concurrency: int | None) -> None:
    """The streamer itself fails (the file vanished after planning); storage names the cause; nothing leaks."""
    directory = copy_model(llama_model, tmp_path / "model")
    store = open_store(parse_model_uri(str(directory)))
    source = loader.resolve(store, tmp_path / "cache")
    plan = build_plan(source.headers, tp_size=1, ranks=[0], rules=(), max_range_bytes=1 << 20)
    gone = plan.files[-1].file
    (directory / gone).unlink()
    (tmp_path / "shm").mkdir()
    memory = HostMemory(tmp_path / "shm")
    with pytest.raises(ModelNotFoundError, match=re.escape(gone)):
        loader.stream(store, plan, memory, label="gone", memory_limit=1 << 20, concurrency=concurrency,
                      on_progress=lambda n: None)
    assert list((tmp_path / "shm").iterdir()) == []
