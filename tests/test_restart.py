"""A restarted daemon adopts what its predecessor completed (manifest + intact arena) and reads nothing from
storage for it; what an interrupted load left behind is removed. Real daemons, SIGKILLed."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from weightd import client

from tests.conftest import ATTACH_AND_VERIFY, Daemon, Model, S3Server, copy_model, free_port, run_client

# Holds an attach and prints a checksum of every tensor's bytes now and on each line it reads.
HOLDER = r"""
import json, sys, torch
from weightd import client
model = client.attach(sys.argv[1], target=sys.argv[2])
def checksum():
    return sum(int(t.reshape(-1).view(torch.uint8).to(torch.int64).sum()) for t in model.tensors.values())
print(json.dumps({"sum": checksum(), "tensors": len(model.tensors)}), flush=True)
for line in sys.stdin:
    print(json.dumps({"sum": checksum(), "tensors": len(model.tensors)}), flush=True)
"""


def new_log(daemon: Daemon, since: int) -> str:
    return daemon.log.read_text()[since:]


def test_kill_9_then_restart_adopts_every_resident_model(
    daemon_factory, s3_server: S3Server, s3_llama: str, llama_model: Model, tmp_path: Path
) -> None:
    local = copy_model(llama_model, tmp_path / "local")
    first = daemon_factory(s3_server.env(), name="node")
    client.load(s3_llama, target=first.target)
    client.load(str(local), target=first.target)
    before = {m.model_uri: m for m in first.models()}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, s3_llama, first.target],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdin is not None and holder.stdout is not None
        attached = json.loads(holder.stdout.readline())
        assert attached["tensors"] == len(llama_model.tensors)

        first.kill()
        holder.stdin.write("after the daemon died\n")
        holder.stdin.flush()
        assert json.loads(holder.stdout.readline()) == attached  # the engine's tensors still read correctly

        # Any storage request would now fail: the S3 endpoint is dead and the local directory is gone.
        local.rename(tmp_path / "moved-away")
        log_start = len(first.log.read_text())
        dead_s3 = s3_server.env() | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
        second = daemon_factory(dead_s3, name="node")
        after = {m.model_uri: m for m in second.models()}
        assert set(after) == set(before)
        for uri, row in after.items():
            assert (row.state, row.leases, row.current) == ("ready", 0, True)
            assert row.storage_bytes_read == before[uri].storage_bytes_read == llama_model.nbytes
            assert row.revision == before[uri].revision

        result = run_client(ATTACH_AND_VERIFY, s3_llama, second.target, str(llama_model.directory))
        assert result["tensors"] == result["expected"] and result["mismatched"] == [] and result["outside"] == []
        with client.attach(f"file://{local}", target=second.target) as model:
            assert len(model.tensors) == len(llama_model.tensors)
        holder.stdin.write("after the restart\n")
        holder.stdin.flush()
        assert json.loads(holder.stdout.readline()) == attached
        assert [m.storage_bytes_read for m in second.models()] == [llama_model.nbytes] * 2
        log = new_log(second, log_start)
        assert "adopted 2 resident entr(y/ies)" in log
        assert "streamed" not in log and "cannot re-check" not in log, log
    finally:
        holder.kill()
        holder.wait()


def test_an_interrupted_load_leaves_nothing_behind(daemon_factory, llama_model: Model, tmp_path: Path) -> None:
    uri = str(copy_model(llama_model, tmp_path / "model"))
    first = daemon_factory(name="node")
    failure: list[BaseException] = []

    def load() -> None:
        try:
            client.load(uri, concurrency=1, target=first.target)  # streams in a helper: ~1 s to start
        except client.WeightdError as e:
            failure.append(e)

    loading = threading.Thread(target=load)
    loading.start()
    deadline = time.monotonic() + 60
    while not first.segments():
        assert time.monotonic() < deadline and loading.is_alive(), "never saw the load's arena"
        time.sleep(0.01)
    assert first.manifests() == []  # allocated, not complete
    first.kill()
    loading.join(60)
    assert failure and isinstance(failure[0], client.UnavailableError)
    assert first.segments(), "the killed daemon's partial arena should still be there before the restart"

    second = daemon_factory(name="node")
    assert second.models() == [] and second.segments() == [] and second.manifests() == []
    with client.attach(uri, target=second.target) as model:
        assert len(model.tensors) == len(llama_model.tensors)
    assert second.models()[0].storage_bytes_read == llama_model.nbytes


def test_a_clean_restart_keeps_arenas_unless_told_to_free_them(
    daemon_factory, llama_model: Model, tmp_path: Path
) -> None:
    uri = str(copy_model(llama_model, tmp_path / "model"))
    first = daemon_factory(name="node")
    client.load(uri, target=first.target)
    first.stop()  # SIGTERM, as systemctl restart does
    assert len(first.segments()) == len(first.manifests()) == 1

    log_start = len(first.log.read_text())
    second = daemon_factory(name="node", extra_args=("--free-on-stop", "true"))
    assert [m.state for m in second.models()] == ["ready"]
    assert "streamed" not in new_log(second, log_start)
    second.stop()
    assert second.segments() == [] and second.manifests() == []


def test_an_arena_that_was_tampered_with_is_not_adopted(daemon_factory, llama_model: Model, tmp_path: Path) -> None:
    uri = str(copy_model(llama_model, tmp_path / "model"))
    first = daemon_factory(name="node")
    client.load(uri, target=first.target)
    first.kill()
    (arena,) = first.segments()
    arena.chmod(0o644)  # readable by anyone: not the daemon's own arena any more

    second = daemon_factory(name="node")
    assert second.models() == [] and second.segments() == [] and second.manifests() == []
    assert "not adopting the arena" in second.log.read_text()
    with client.attach(uri, target=second.target) as model:
        assert model.tensors


def test_two_daemons_cannot_share_a_cache_directory(daemon_factory, tmp_path: Path) -> None:
    first = daemon_factory(name="node")
    result = subprocess.run(
        [sys.executable, "-m", "weightd.daemon", "serve", "--socket", str(tmp_path / "other.sock"),
         "--cache-dir", str(first.cache_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1 and "another weightd daemon is using cache directory" in result.stderr
    assert first.models() == []

