"""Issue [3/4], item 5: the streamer's extra-config settings per load, with a real streamer and SeaweedFS.

A per-load ``concurrency`` streams in a helper process started with that RUNAI_STREAMER_CONCURRENCY. The
streamer's own debug log says how many S3 clients each streamer started with, and in which process.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from weightd import client
from weightd.daemon import loader
from weightd.daemon.errors import ModelNotFoundError
from weightd.daemon.memory.host import HostMemory
from weightd.daemon.storage.base import parse_model_uri
from weightd.v1 import weightd_pb2 as pb
from weightd.v1 import weightd_pb2_grpc as pb_grpc

from tests.conftest import ATTACH_AND_VERIFY, Model, S3Server, copy_model, run_client

# e.g. "[2026-11-22 02:26:33.860] [DEBUG  ] [23588 23588] [streamer/impl/streamer/streamer.cc: 78 @ Streamer]
# Streamer concurrency 2 ; s3 concurrency 5 ; ..."
STREAMER_STARTED = re.compile(
    r"\[(\d+) \d+\] \[[^\]]*@ Streamer\s*\] Streamer concurrency \d+ ; s3 concurrency (\d+) ;"
)
DAEMON_CONCURRENCY = 4
OPERATOR_OBJ_CONCURRENCY = 5  # the streamer's own variable, set by an operator: it wins daemon-wide


def streamers_started(log: Path) -> list[tuple[int, int]]:
    """(pid, S3 clients) of every streamer the daemon and its helpers started, in order."""
    return [(int(pid), int(n)) for pid, n in STREAMER_STARTED.findall(log.read_text(errors="replace"))]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue  # that thread exited while we listed
    return found


@pytest.fixture
def daemon(daemon_factory, s3_server: S3Server):
    env = {
        **s3_server.env(),
        "RUNAI_STREAMER_OBJ_CONCURRENCY": str(OPERATOR_OBJ_CONCURRENCY),
        "RUNAI_STREAMER_LOG_LEVEL": "DEBUG",
        "RUNAI_STREAMER_LOG_TO_STDERR": "1",
    }
    return daemon_factory(env, extra_args=("--concurrency", str(DAEMON_CONCURRENCY)))


def test_a_per_load_concurrency_starts_the_streamer_with_that_many_clients(
    daemon, s3_server: S3Server, s3_llama: str, llama_model: Model
) -> None:
    default_uri, exact_uri = "s3://models/llama-default/", "s3://models/llama-exact/"
    s3_server.upload(llama_model.directory, "models", "llama-default/")
    s3_server.upload(llama_model.directory, "models", "llama-exact/")

    done = client.load(s3_llama, concurrency=3, target=daemon.target)
    client.load(default_uri, target=daemon.target)
    client.load(default_uri, concurrency=3, target=daemon.target)  # resident: no new load, no new streamer
    # The daemon's own value, which the operator's RUNAI_STREAMER_OBJ_CONCURRENCY would override in-process.
    client.load(exact_uri, concurrency=DAEMON_CONCURRENCY, target=daemon.target)

    started = streamers_started(daemon.log)
    assert [n for _, n in started] == [3, OPERATOR_OBJ_CONCURRENCY, DAEMON_CONCURRENCY]
    assert [pid == daemon.process.pid for pid, _ in started] == [False, True, False]  # helper, daemon, helper
    assert children(daemon.process.pid) == []  # the helpers exited
    # bytes_done adds up the helper's reports of landed ranges.
    assert done.state == "ready" and done.bytes_done == done.bytes_total == llama_model.nbytes

    for uri in (s3_llama, default_uri, exact_uri):
        result = run_client(ATTACH_AND_VERIFY, uri, daemon.target, str(llama_model.directory))
        assert result["tensors"] == result["expected"] and result["mismatched"] == [] and result["outside"] == []
    assert [m.storage_bytes_read for m in daemon.models()] == [llama_model.nbytes] * 3


def test_a_concurrency_below_one_is_invalid_argument(daemon, s3_llama: str) -> None:
    for bad in (0, -1):  # refused by the client, which cannot put -1 on the wire
        with pytest.raises(client.InvalidRequestError, match=f"concurrency must be at least 1, got {bad}"):
            client.load(s3_llama, concurrency=bad, target=daemon.target)
    # Other clients (grpcurl, other languages) reach the daemon's own check.
    request = pb.LoadModelRequest(model=pb.ModelSelector(model_uri=s3_llama, tp_size=1),
                                  settings=pb.StreamerSettings(concurrency=0))
    with grpc.insecure_channel(daemon.target) as channel, pytest.raises(grpc.RpcError) as refused:
        list(pb_grpc.WeightServiceStub(channel).LoadModel(request))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "concurrency 0: must be at least 1" in refused.value.details()
    assert daemon.models() == []
    assert client.load(s3_llama, concurrency=2, target=daemon.target).state == "ready"


@pytest.mark.parametrize("concurrency", [None, 2], ids=["in-process", "helper"])
def test_a_shard_gone_mid_load_is_named(tmp_path: Path, llama_model: Model, concurrency: int | None) -> None:
    """The streamer itself fails (the file vanished after planning); storage names the cause; nothing leaks."""
    directory = copy_model(llama_model, tmp_path / "model")
    settings = loader.LoadSettings(memory_limit=1 << 20, concurrency=concurrency)
    prepared = loader.prepare(parse_model_uri(str(directory)), cache_dir=tmp_path / "cache", tp_size=1, ranks=[0],
                              rules=(), settings=settings)
    gone = prepared.plan.files[-1].file
    (directory / gone).unlink()
    (tmp_path / "shm").mkdir()
    memory = HostMemory(directory=tmp_path / "shm", namespace="test")
    with pytest.raises(ModelNotFoundError, match=re.escape(gone)):
        loader.stream(prepared, memory, settings=settings, on_progress=lambda n: None)
    assert list((tmp_path / "shm").iterdir()) == []


def test_the_streamers_of_finished_loads_all_end(tmp_path: Path, llama_model: Model) -> None:
    """A load returns once its bytes are in place and its streamer stops on a thread of its own: none is left."""
    settings = loader.LoadSettings(memory_limit=1 << 20)
    (tmp_path / "shm").mkdir()
    memory = HostMemory(directory=tmp_path / "shm", namespace="test")
    for _ in range(3):
        prepared = loader.prepare(parse_model_uri(str(llama_model.directory)), cache_dir=tmp_path / "cache",
                                  tp_size=1, ranks=[0], rules=(), settings=settings)
        for rank in loader.stream(prepared, memory, settings=settings, on_progress=lambda n: None):
            rank.arena.release()
    for thread in threading.enumerate():
        if thread.name == "weightd-streamer-end":
            thread.join(timeout=60)
    assert not [t for t in threading.enumerate() if t.name == "weightd-streamer-end"]


def test_a_helper_killed_mid_load_fails_that_load_only(daemon, s3_llama: str, llama_model: Model) -> None:
    """The helper is a separate process: when it dies the load fails cleanly and the daemon keeps serving."""
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(client.load, s3_llama, concurrency=2, target=daemon.target)
        deadline = time.monotonic() + 60
        while not (helpers := children(daemon.process.pid)):
            assert not load.done() and time.monotonic() < deadline, "the load ended before its helper was seen"
            time.sleep(0.01)
        os.kill(helpers[0], signal.SIGKILL)
        with pytest.raises(client.UnavailableError, match="helper exited with status -9") as failed:
            load.result(timeout=60)
    assert s3_llama in str(failed.value) and "retry" in str(failed.value)
    assert daemon.models() == [] and daemon.segments() == []
    client.load(s3_llama, target=daemon.target)  # the same model, daemon-wide settings
    result = run_client(ATTACH_AND_VERIFY, s3_llama, daemon.target, str(llama_model.directory))
    assert result["mismatched"] == [] and result["tensors"] == len(llama_model.tensors)
