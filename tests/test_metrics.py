"""Prometheus metrics: the real endpoint scraped over HTTP, during and after a load, parsed with
prometheus-client's own parser."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from weightd import client
from weightd.client._descriptors import receive_descriptors
from weightd.daemon.server import arena_namespace

from tests.conftest import Model, S3Server, free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(port: int, condition: Callable[[Samples], bool], what: str) -> Samples:
    deadline = time.monotonic() + 30
    while not condition(samples := scrape(port)):
        assert time.monotonic() < deadline, f"metrics never showed {what}"
        time.sleep(0.05)
    return samples


@pytest.fixture
def metrics_daemon(daemon_factory, s3_server: S3Server):
    port = free_port()
    daemon = daemon_factory(s3_server.env(), extra_args=("--metrics-listen", f"127.0.0.1:{port}"))
    return daemon, port


def test_metrics_follow_a_load_an_attach_a_failure_an_eviction_and_a_refusal(
    metrics_daemon, s3_server: S3Server, s3_llama: str, llama_model: Model
) -> None:
    daemon, port = metrics_daemon
    idle = scrape(port)
    assert value(idle, "weightd_loads_started_total") == 0 and value(idle, "weightd_leases") == 0
    (budget,) = client.memory_budgets(target=daemon.target)
    assert value(idle, "weightd_budget_bytes", memory_kind="host", device="host") == budget.limit_bytes

    # Storage paused: the load stays in flight while we scrape.
    os.kill(s3_server.process.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            load = pool.submit(client.load, s3_llama, target=daemon.target)
            during = wait_for(port, lambda s: value(s, "weightd_loads_started_total") == 1, "the load start")
            assert value(during, "weightd_loads_succeeded_total") == 0
            assert not load.done()
            os.kill(s3_server.process.pid, signal.SIGCONT)
            load.result(timeout=120)
    finally:
        os.kill(s3_server.process.pid, signal.SIGCONT)

    after = scrape(port)
    (resident,) = daemon.models()
    assert value(after, "weightd_loads_succeeded_total") == 1
    assert value(after, "weightd_storage_read_bytes_total", scheme="s3") == llama_model.nbytes
    assert value(after, "weightd_load_duration_seconds_count") == 1
    assert value(after, "weightd_resident_bytes", memory_kind="host", device="host") == resident.resident_bytes
    assert value(after, "weightd_budget_used_bytes", memory_kind="host", device="host") == resident.resident_bytes

    with client.attach(s3_llama, target=daemon.target):
        attached = scrape(port)
        assert value(attached, "weightd_leases") == 1
        assert value(attached, "weightd_attach_duration_seconds_count") == 1
    wait_for(port, lambda s: value(s, "weightd_leases") == 0, "the lease's end")

    with pytest.raises(client.ModelNotFoundError):
        client.load("s3://models/no-such-model/", target=daemon.target)
    assert value(scrape(port), "weightd_loads_failed_total", status="NOT_FOUND") == 1

    with pytest.raises(client.WeightdError):
        receive_descriptors(str(daemon.socket.with_name("weightd.fds.sock")), "no-such-lease")
    client.evict(s3_llama, target=daemon.target)
    final = scrape(port)
    assert value(final, "weightd_descriptor_refusals_total", code="NOT_FOUND") == 1
    assert value(final, "weightd_evictions_total", reason="request") == 1
    assert value(final, "weightd_resident_bytes", memory_kind="host", device="host") == 0
    assert value(final, "weightd_loads_started_total") == 2


def test_metrics_are_off_unless_asked_and_stop_with_the_daemon(daemon_factory, s3_server: S3Server) -> None:
    port = free_port()
    daemon_factory(s3_server.env(), name="plain")
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    daemon = daemon_factory(s3_server.env(), name="metrics", extra_args=("--metrics-listen", f"127.0.0.1:{port}"))
    assert value(scrape(port), "weightd_leases") == 0
    # Scrapes from several threads at once while the event loop also serves RPCs.
    errors: list[BaseException] = []

    def scrape_and_list() -> None:
        try:
            for _ in range(20):
                scrape(port)
                daemon.models()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=scrape_and_list) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    daemon.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(port)


@pytest.mark.parametrize("flag", ["--metrics-listen", "--listen"])
def test_a_taken_port_stops_the_start_with_the_flag_named(tmp_path: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "weightd.daemon", "serve", "--socket", str(tmp_path / "w.sock"), "--cache-dir",
             str(tmp_path / "cache"), flag, address],
            capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on {address}" in result.stderr or f"cannot serve metrics on {address}" in result.stderr
    assert flag in result.stderr and "Traceback" not in result.stderr
    assert list(Path("/dev/shm").glob(f"weightd-{arena_namespace(tmp_path / 'cache')}-*")) == []
    assert not (tmp_path / "w.sock").exists()
