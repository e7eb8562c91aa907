"""The fault campaign: what goes wrong on a node, done for real, each test printing its figure (shown together
at the end of the run). CI runs reduced counts; the full campaign is

    WEIGHTD_CAMPAIGN=full .venv/bin/python -m pytest tests/test_faults.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file
from weightd import client
from weightd.daemon.server import SHUTDOWN_GRACE_S
from weightd.daemon.synthetic import write_synthetic_model

from tests.conftest import ATTACH_AND_VERIFY, Model, copy_model, run_client
from tests.malformed_headers import malformed_headers
from tests.storage_servers import S3Server, free_port, start_seaweedfs, stop_process

FULL = os.environ.get("WEIGHTD_CAMPAIGN") == "full"


def serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def expected_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in directory.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


def assert_equal(model: client.AttachedModel, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(model.tensors) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(model.tensors[name], tensor), name


# A model that streaming_load catches with ranges still to come from storage: progress comes every 0.25 s, and
# at 384 MiB the first report of landed bytes sometimes came with the whole model landed (1 of 4 fresh loads).
MID_LOAD_MODEL_BYTES = 1 << 30


def streaming_load(pool: ThreadPoolExecutor, uri: str, target: str) -> Future[client.LoadProgress]:
    """Start loading ``uri``; return once it has landed some weight bytes (it is streaming, not listing)."""
    landed = threading.Event()

    def progress(p: client.LoadProgress) -> None:
        if p.bytes_done > 0:
            landed.set()

    load = pool.submit(client.load, uri, target=target, on_progress=progress)
    deadline = time.monotonic() + 60
    while not landed.wait(0.01):
        assert not load.done(), f"the load of {uri} ended before it was caught streaming: {load.exception()}"
        assert time.monotonic() < deadline
    return load


def run_together(count: int, script: str, *args: str) -> list[dict[str, object]]:
    """Start ``count`` processes of ``script`` (which prints "ready" once imported, then waits for a line), let
    them all go at once, and return each one's JSON line."""
    processes = [subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for _ in range(count)]
    try:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        for process in processes:  # each is already waiting on this line
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        results = []
        for process in processes:
            assert process.stdout is not None
            results.append(json.loads(process.stdout.readline()))
        return results
    finally:
        for process in processes:
            stop_process(process)


def test_300_malformed_headers_are_clear_errors_and_the_daemon_serves_throughout(
    daemon_factory, tmp_path: Path, llama_model: Model, figure
) -> None:
    daemon = daemon_factory()
    good = str(copy_model(llama_model, tmp_path / "good"))
    statuses: dict[str, int] = {}
    for i, case in enumerate(malformed_headers()):
        directory = tmp_path / f"case{i}"
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(case.content)
        with pytest.raises(client.WeightdError) as raised:
            client.load(str(directory), target=daemon.target)
        error = raised.value
        what = f"case {i} ({case.kind}): {error.code.name}: {error}"
        assert error.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS), what
        assert "model.safetensors" in str(error), what
        if case.tensor is not None:
            assert repr(case.tensor) in str(error), what
        statuses[error.code.name] = statuses.get(error.code.name, 0) + 1
        assert serving(daemon.target), f"not SERVING after case {i}"
    assert daemon.models() == [] and daemon.segments() == []
    with client.attach(good, target=daemon.target) as model:
        assert len(model.tensors) == len(llama_model.tensors)
    figure(f"malformed headers: {sum(statuses.values())} cases -> "
           + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
           + "; SERVING after each; 0 entries, 0 arenas left")


def test_silent_and_garbage_descriptor_peers_block_no_one(
    daemon_factory, tmp_path: Path, llama_model: Model, figure
) -> None:
    daemon = daemon_factory()
    uri = str(copy_model(llama_model, tmp_path / "model"))
    client.load(uri, target=daemon.target)
    path = str(daemon.socket.with_name("weightd.fds.sock"))
    silent = []
    for _ in range(20):
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peer.connect(path)
        silent.append(peer)
    answers = []
    for payload in [b"\xff\xfe garbage", b"{", b"[]", b'{"lease_id": 5}', b"\x00" * 4000, b"null",
                    b'{"lease_id": "' + b"x" * 3000 + b'"}', b'{"other": 1}'] * 3:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as peer:
            peer.connect(path)
            peer.send(payload)
            peer.settimeout(10)
            answers.append(json.loads(peer.recv(65536))["code"])
    try:
        latencies = []
        for _ in range(10):
            started = time.perf_counter()
            with client.attach(uri, target=daemon.target) as model:
                latencies.append(time.perf_counter() - started)
                assert len(model.tensors) == len(llama_model.tensors)
        result = run_client(ATTACH_AND_VERIFY, uri, daemon.target, str(llama_model.directory))
        assert result["mismatched"] == []
    finally:
        for peer in silent:
            peer.close()
    assert set(answers) <= {"INVALID_ARGUMENT", "NOT_FOUND"}, answers
    figure(f"descriptor channel: 20 silent peers connected and {len(answers)} garbage requests "
           f"({', '.join(sorted(set(answers)))}); 10 attaches meanwhile, slowest {max(latencies) * 1000:.1f} ms")


CONCURRENT_ATTACH = r"""
import json, sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file
from weightd import client
uri, target, directory = sys.argv[1:4]
expected = {}
for path in Path(directory).glob("*.safetensors"):
    expected.update(load_file(path))
print("ready", flush=True)
sys.stdin.readline()
started = time.perf_counter()
model = client.attach(uri, target=target, timeout=300)
seconds = time.perf_counter() - started
equal = sorted(model.tensors) == sorted(expected) and all(torch.equal(model.tensors[n], t) for n, t in expected.items())
print(json.dumps({"seconds": seconds, "equal": equal}), flush=True)
"""


def test_many_clients_attaching_one_cold_model_share_one_load(
    daemon_factory, s3_server: S3Server, llama_model: Model, figure
) -> None:
    clients = 32 if FULL else 12
    s3_server.upload(llama_model.directory, "models", "llama-crowd/")
    uri = "s3://models/llama-crowd/"
    port = free_port()
    daemon = daemon_factory(s3_server.env(), extra_args=("--metrics-listen", f"127.0.0.1:{port}"))
    results = run_together(clients, CONCURRENT_ATTACH, uri, daemon.target, str(llama_model.directory))
    (entry,) = daemon.models()
    assert entry.storage_bytes_read == llama_model.nbytes  # every byte fetched once
    assert all(r["equal"] for r in results)
    from tests.test_metrics import scrape, value

    metrics = scrape(port)
    assert value(metrics, "weightd_loads_started_total") == 1
    assert value(metrics, "weightd_attach_duration_seconds_count") == clients
    seconds = sorted(r["seconds"] for r in results)
    figure(f"{clients} clients attaching one cold model at once: 1 load, {entry.storage_bytes_read} bytes read "
           f"for a {llama_model.nbytes}-byte model, every client's tensors equal; attach "
           f"{seconds[0]:.2f}-{seconds[-1]:.2f} s")


HOLD = r"""
import json, sys
import torch
from weightd import client
model = client.attach(sys.argv[1], target=sys.argv[2])
checksum = sum(float(t.double().sum()) for t in model.tensors.values())
print(json.dumps({"checksum": checksum}), flush=True)
sys.stdin.readline()  # the daemon is gone by now: the mapping outlives it
print(json.dumps({"checksum": sum(float(t.double().sum()) for t in model.tensors.values())}), flush=True)
"""


def test_sigterm_with_two_loads_running_and_a_client_attached(
    daemon_factory, s3_server: S3Server, s3_llama: str, tmp_path: Path, llama_model: Model, figure
) -> None:
    big = tmp_path / "big"
    write_synthetic_model(big, total_bytes=MID_LOAD_MODEL_BYTES, shards=2, dtypes=("bf16", "fp32"))
    s3_server.upload(big, "models", "big-sigterm/")
    big_uri = "s3://models/big-sigterm/"
    held = str(copy_model(llama_model, tmp_path / "held"))
    daemon = daemon_factory(s3_server.env())
    client.load(held, target=daemon.target)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, held, daemon.target], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    pool = ThreadPoolExecutor(2)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        before = json.loads(holder.stdout.readline())["checksum"]
        streaming = streaming_load(pool, big_uri, daemon.target)
        os.kill(s3_server.process.pid, signal.SIGSTOP)  # both loads stay in flight, at known places
        try:
            listing = pool.submit(client.load, s3_llama, target=daemon.target)
            deadline = time.monotonic() + 30
            while len(daemon.models()) < 3:
                assert time.monotonic() < deadline, "the second load did not start"
                time.sleep(0.01)
            assert daemon.process is not None
            started = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
        finally:
            os.kill(s3_server.process.pid, signal.SIGCONT)
        daemon.process.wait(timeout=60)
        exited = time.monotonic() - started
        for load in (streaming, listing):
            with pytest.raises(client.UnavailableError):
                load.result(timeout=60)
        holder.stdin.write("check\n")
        holder.stdin.flush()
        after = json.loads(holder.stdout.readline())["checksum"]
    finally:
        stop_process(holder)
        pool.shutdown(wait=False)
    assert daemon.process.returncode == 0 and exited <= SHUTDOWN_GRACE_S, f"exited {exited:.1f} s after SIGTERM"
    assert after == before
    leftovers = [p.name for p in daemon.root.iterdir() if p.is_socket()]
    assert leftovers == [], f"sockets left behind: {leftovers}"
    assert len(daemon.manifests()) == 1  # the complete model only: no partial arena, no record of one
    assert [s.name for s in daemon.segments()] == daemon.recorded_arenas()
    daemon.start()
    (adopted,) = daemon.models()
    assert adopted.model_uri.endswith("/held") and adopted.state == "ready"
    with client.attach(held, target=daemon.target) as model:
        assert_equal(model, llama_model.tensors)
    figure(f"SIGTERM with 2 loads in flight (one streaming, one listing) and 1 client attached: exited 0 after "
           f"{exited:.2f} s (grace {SHUTDOWN_GRACE_S:.0f} s), both loads UNAVAILABLE, 0 sockets and 0 partial "
           "arenas left, the client's tensors still readable, the complete model adopted on restart")


def test_storage_killed_mid_load(daemon_factory, tmp_path: Path, figure) -> None:
    cycles = 10 if FULL else 3
    storage = start_seaweedfs(tmp_path / "seaweedfs")
    try:
        model = tmp_path / "model"
        write_synthetic_model(model, total_bytes=MID_LOAD_MODEL_BYTES, shards=2, dtypes=("bf16", "fp32"))
        expected = expected_tensors(model)
        storage.upload(model, "models", "killed/")
        uri = "s3://models/killed/"
        daemon = daemon_factory(storage.env())
        failures, recoveries = [], []
        with ThreadPoolExecutor(1) as pool:
            for _ in range(cycles):
                load = streaming_load(pool, uri, daemon.target)
                storage.process.kill()
                storage.process.wait()
                started = time.monotonic()
                with pytest.raises(client.UnavailableError) as raised:
                    load.result(timeout=300)
                failures.append(time.monotonic() - started)
                assert uri in str(raised.value), str(raised.value)
                assert daemon.models() == [] and daemon.segments() == [] and daemon.manifests() == []
                storage.restart()
                started = time.monotonic()
                with client.attach(uri, target=daemon.target) as attached:
                    recoveries.append(time.monotonic() - started)
                    assert_equal(attached, expected)
                client.evict(uri, target=daemon.target)
        assert serving(daemon.target)
    finally:
        stop_process(storage.process)
    figure(f"storage killed mid-load x{cycles}: {cycles} UNAVAILABLE naming the URI (after "
           f"{statistics.median(failures):.2f} s median), 0 partial entries or arenas; after each restart a load "
           f"with every byte equal ({statistics.median(recoveries):.2f} s median)")


CHURN = r"""
import json, sys, time
from weightd import client
uri, target, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
print("ready", flush=True)
sys.stdin.readline()
latencies, errors = [], []
start = time.perf_counter()
n = 0
while time.perf_counter() - start < seconds:
    due = start + n / rate
    pause = due - time.perf_counter()
    if pause > 0:
        time.sleep(pause)
    t0 = time.perf_counter()
    try:
        model = client.attach(uri, target=target)
        latencies.append(time.perf_counter() - t0)
        model.close()
    except Exception as e:
        errors.append(repr(e))
    n += 1
print(json.dumps({"latencies": latencies, "errors": errors[:5], "error_count": len(errors),
                  "elapsed": time.perf_counter() - start}), flush=True)
"""


def process_figures(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def test_attach_detach_churn_from_many_processes(daemon_factory, tmp_path: Path, llama_model: Model, figure) -> None:
    processes_count, target_rate = 8, 200.0
    seconds = 30.0 if FULL else 5.0
    daemon = daemon_factory()
    uri = str(copy_model(llama_model, tmp_path / "model"))
    client.load(uri, target=daemon.target)
    with client.attach(uri, target=daemon.target):
        pass  # the grant is cached, as it would be after the first engine
    assert daemon.process is not None
    rss_before, fds_before = process_figures(daemon.process.pid)
    results = run_together(processes_count, CHURN, uri, daemon.target, str(target_rate / processes_count),
                           str(seconds))
    deadline = time.monotonic() + 30
    while daemon.models()[0].leases:
        assert time.monotonic() < deadline, "leases outlived their clients"
        time.sleep(0.1)
    rss_after, fds_after = process_figures(daemon.process.pid)
    latencies = sorted(x for r in results for x in r["latencies"])
    errors = sum(r["error_count"] for r in results)
    assert errors == 0, [r["errors"] for r in results if r["errors"]]
    elapsed = max(r["elapsed"] for r in results)
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    assert fds_after <= fds_before + 2, f"descriptors {fds_before} -> {fds_after}"
    assert rss_after - rss_before < 64 * 2**20, f"daemon RSS {rss_before} -> {rss_after}"
    figure(f"attach/detach churn: {processes_count} processes, {len(latencies)} cycles in {elapsed:.1f} s "
           f"({len(latencies) / elapsed:.0f}/s against {target_rate:.0f}/s asked), 0 errors; attach p50 "
           f"{statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; daemon RSS "
           f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB, descriptors {fds_before} -> {fds_after}")
