"""Issue [1/4], end to end: a real daemon, a real SeaweedFS S3 server, clients in separate processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from weightd import client

from tests.conftest import ATTACH_AND_VERIFY, Model, S3Server, free_port, run_client
from tests.storage_servers import write_certificates


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
    assert oct(segment.stat().st_mode & 0o777) == "0o600"  # only the daemon opens it; clients get descriptors


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


def test_unrecorded_arenas_are_removed_at_start_and_other_daemons_kept(daemon_factory, tmp_path: Path) -> None:
    from weightd.daemon.server import arena_namespace

    ours = Path(f"/dev/shm/weightd-{arena_namespace(tmp_path / 'daemon' / 'cache')}-interrupted-0badc0de")
    others = Path(f"/dev/shm/weightd-{arena_namespace(tmp_path / 'elsewhere')}-models_llama-tp1-0badc0de")
    for path in (ours, others):
        path.write_bytes(b"x" * 4096)
    try:
        daemon_factory()
        assert not ours.exists(), "an arena no manifest records (an interrupted load) survived the start"
        assert others.exists(), "another daemon's arena was removed"
    finally:
        ours.unlink(missing_ok=True)
        others.unlink(missing_ok=True)


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
    listed_models = subprocess.run(  # the README's ListModels call
        [grpcurl, "-plaintext", "-unix", "-d", "{}", str(daemon.socket), "weightd.v1.WeightService/ListModels"],
        capture_output=True, text=True, timeout=30,
    )
    assert listed_models.returncode == 0, listed_models.stderr
    (budget,) = json.loads(listed_models.stdout)["budgets"]
    assert budget["kind"] == "MEMORY_KIND_HOST" and int(budget["limit_bytes"]) > 0  # grpcurl keeps proto names
    assert oct(daemon.socket.stat().st_mode & 0o777) == "0o660"


def test_tcp_listener_serves_probes_only(daemon_factory, s3_server: S3Server, s3_llama: str) -> None:
    probes, api = free_port(), free_port()
    daemon = daemon_factory(s3_server.env(),
                            extra_args=("--listen", f"127.0.0.1:{probes}", "--listen-api", f"127.0.0.1:{api}"))
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    check = subprocess.run([grpcurl, "-plaintext", f"127.0.0.1:{probes}", "grpc.health.v1.Health/Check"],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and json.loads(check.stdout)["status"] == "SERVING"
    listed = subprocess.run([grpcurl, "-plaintext", f"127.0.0.1:{probes}", "list"],
                            capture_output=True, text=True, timeout=30)
    assert "weightd.v1.WeightService" not in listed.stdout and "grpc.health.v1.Health" in listed.stdout
    # Nobody who reaches the probe port can load, attach or evict.
    for call in (lambda t: client.attach(s3_llama, target=t), lambda t: client.load(s3_llama, target=t),
                 lambda t: client.evict(s3_llama, target=t), lambda t: client.list_models(target=t)):
        with pytest.raises(client.WeightdError) as refused:
            call(f"127.0.0.1:{probes}")
        assert refused.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert daemon.models() == []
    # --listen-api (loopback) serves the WeightService; tensors still arrive through the descriptor socket.
    with client.attach(s3_llama, target=f"127.0.0.1:{api}") as model:
        assert model.tensors
    assert daemon.models()[0].leases == 0


def test_listen_api_beyond_loopback_needs_tls(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "weightd.daemon", "serve", "--socket", str(tmp_path / "w.sock"),
         "--cache-dir", str(tmp_path / "cache"), "--listen-api", f"0.0.0.0:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "not a loopback address" in result.stderr and "--tls-cert" in result.stderr


def test_listen_api_with_tls(daemon_factory, tmp_path: Path) -> None:
    ca = write_certificates(tmp_path)  # a test CA and a certificate for 127.0.0.1
    port = free_port()
    daemon_factory(extra_args=("--listen-api", f"127.0.0.1:{port}", "--tls-cert", str(tmp_path / "server.crt"),
                               "--tls-key", str(tmp_path / "server.key")))
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    listed = subprocess.run([grpcurl, "-cacert", str(ca), f"127.0.0.1:{port}", "weightd.v1.WeightService/ListModels"],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert "budgets" in json.loads(listed.stdout)
    plaintext = subprocess.run([grpcurl, "-plaintext", f"127.0.0.1:{port}", "weightd.v1.WeightService/ListModels"],
                               capture_output=True, text=True, timeout=30)
    assert plaintext.returncode != 0
