"""Issue [1/4], end to end: a real daemon, a real SeaweedFS S3 server, clients in separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from weightd import client

from tests.conftest import ATTACH_AND_VERIFY, Model, S3Server, free_port, run_client


@pytest.fixture
def daemon(daemon_factory, s3_server: S3Server):
    return daemon_factory(s3_server.env())


def test_two_processes_share_one_load_zero_copy(daemon, s3_llama: str, llama_model: Model) -> None:
    args = [s3_llama, daemon.target, str(llama_model.directory)]
    # Both start cold at once: single flight makes it one load.
    procs = [
        subprocess.Popen([sys.executable, "-c", ATTACH_AND_VERIFY, *args], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))

    for result in results:
        assert result["tensors"] == result["expected"] == len(llama_model.tensors)
        assert result["mismatched"] == []
        assert result["outside"] == []
        assert result["readonly_maps"]
        # Private memory does not grow with the model; the pages are the shared mapping's.
        assert result["anon_growth"] < llama_model.nbytes / 4
        assert result["shmem"] >= llama_model.nbytes * 0.9
        assert {"config.json", "model.safetensors.index.json", "tokenizer_config.json"} <= set(result["config"])
        assert not any(name.endswith(".safetensors") for name in result["config"])
    assert results[0]["lease"] != results[1]["lease"]

    (entry,) = daemon.models()
    assert entry.model_uri == s3_llama
    assert entry.state == "ready"
    assert entry.storage_bytes_read == llama_model.nbytes  # once, not twice
    assert llama_model.nbytes <= entry.resident_bytes < llama_model.nbytes * 1.01
    (segment,) = daemon.segments()
    assert oct(segment.stat().st_mode & 0o777) == "0o640"  # only the daemon may write


def test_client_cannot_write_the_weights(daemon, s3_llama: str, llama_model: Model) -> None:
    writer = subprocess.run(
        [sys.executable, "-c",
         "import sys; from weightd import client\n"
         "m = client.attach(sys.argv[1], target=sys.argv[2])\n"
         "print('attached', flush=True)\n"
         "m.tensors['model.norm.weight'].fill_(7)\n",
         s3_llama, daemon.target],
        capture_output=True, text=True, timeout=120,
    )
    assert "attached" in writer.stdout
    assert writer.returncode == -signal.SIGSEGV
    result = run_client(ATTACH_AND_VERIFY, s3_llama, daemon.target, str(llama_model.directory))
    assert result["mismatched"] == []


def test_sigkill_of_a_client_drops_its_lease(daemon, s3_llama: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from weightd import client\n"
         "m = client.attach(sys.argv[1], target=sys.argv[2])\n"
         "print('attached', flush=True); time.sleep(600)\n",
         s3_llama, daemon.target],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "attached"
        assert daemon.models()[0].leases == 1
        holder.kill()
        holder.wait()
        killed = time.monotonic()
        while daemon.models()[0].leases != 0:
            assert time.monotonic() - killed < 2.0, "lease outlived its client by 2 s"
            time.sleep(0.02)
    finally:
        holder.kill()
        holder.wait()
    # The model stays resident for the next engine.
    with client.attach(s3_llama, target=daemon.target) as model:
        assert model.tensors


def test_close_ends_the_lease_and_evict_frees(daemon, s3_llama: str) -> None:
    model = client.attach(s3_llama, target=daemon.target)
    assert daemon.models()[0].leases == 1
    with pytest.raises(client.PreconditionFailedError, match="lease"):
        client.evict(s3_llama, target=daemon.target)
    model.close()
    deadline = time.monotonic() + 2
    while daemon.models()[0].leases:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    resident = daemon.models()[0].resident_bytes
    assert client.evict(s3_llama, target=daemon.target) == resident
    assert daemon.models() == []
    assert daemon.segments() == []
    with pytest.raises(client.ModelNotFoundError, match="not resident"):
        client.evict(s3_llama, target=daemon.target)


def test_stale_segments_are_removed_at_start(daemon_factory, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(f"/dev/shm/weightd-{dead.pid}-models_llama-tp1-0badc0de")
    alive = Path(f"/dev/shm/weightd-{os.getpid()}-other_daemon-tp1-0badc0de")
    stale.write_bytes(b"x" * 4096)
    alive.write_bytes(b"x" * 4096)
    try:
        daemon_factory()
        assert not stale.exists(), "a dead daemon's segment survived the start"
        assert alive.exists(), "a live daemon's segment was removed"
    finally:
        stale.unlink(missing_ok=True)
        alive.unlink(missing_ok=True)


def test_health_and_reflection_with_grpcurl(daemon) -> None:
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    listed = subprocess.run(
        [grpcurl, "-plaintext", "-unix", str(daemon.socket), "list"], capture_output=True, text=True, timeout=30
    )
    assert listed.returncode == 0, listed.stderr
    assert {"weightd.v1.WeightService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    for service in ("", "weightd.v1.WeightService"):
        check = subprocess.run(
            [grpcurl, "-plaintext", "-unix", "-d", json.dumps({"service": service}), str(daemon.socket),
             "grpc.health.v1.Health/Check"],
            capture_output=True, text=True, timeout=30,
        )
        assert check.returncode == 0, check.stderr
        assert json.loads(check.stdout)["status"] == "SERVING"
    described = subprocess.run(
        [grpcurl, "-plaintext", "-unix", str(daemon.socket), "describe", "weightd.v1.WeightService"],
        capture_output=True, text=True, timeout=30,
    )
    assert "rpc AttachModel" in described.stdout
    assert oct(daemon.socket.stat().st_mode & 0o777) == "0o660"


def test_tcp_listener_for_probes(daemon_factory, s3_server: S3Server, s3_llama: str) -> None:
    port = free_port()
    daemon = daemon_factory(s3_server.env(), extra_args=("--listen", f"127.0.0.1:{port}"))
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    check = subprocess.run([grpcurl, "-plaintext", f"127.0.0.1:{port}", "grpc.health.v1.Health/Check"],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and json.loads(check.stdout)["status"] == "SERVING"
    with client.attach(s3_llama, target=f"127.0.0.1:{port}") as model:
        assert model.tensors
    assert daemon.models()[0].leases == 0
