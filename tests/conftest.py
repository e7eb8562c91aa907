"""Real processes for the tests: a SeaweedFS S3 server and weightd daemons, all on 127.0.0.1, all stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from weightd import client
from weightd.daemon.memory.host import HugePagePool
from weightd.daemon.server import arena_namespace
from weightd.daemon.synthetic import write_synthetic_model

from tests.storage_servers import (
    AzureServer,
    GcsServer,
    S3Server,
    free_port,
    start_azurite,
    start_gcs,
    start_seaweedfs,
    stop_process,
)

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        stop_process(server.process, timeout=10)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    server = start_gcs(tmp_path_factory.mktemp("fake-gcs"), free_port())
    try:
        yield server
    finally:
        stop_process(server.process)


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureServer]:
    # The streamer reaches Azurite only through a private mount namespace (see tests/storage_servers.py).
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("the Azure tests need `unshare -m` (root or CAP_SYS_ADMIN) to give the streamer a test CA")
    server = start_azurite(tmp_path_factory.mktemp("azurite"), free_port())
    try:
        yield server
    finally:
        stop_process(server.process)


# Attach in a fresh process; compare with safetensors; show the views lie in the shared mapping and that
# touching every byte grows shared, not private, memory.
ATTACH_AND_VERIFY = r"""
import glob, json, sys
import torch
from safetensors.torch import load_file
from weightd import client

def status(field):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(field + ":"))) * 1024

def touch(tensors):  # read every byte without allocating copies
    return sum(int(t.reshape(-1).view(torch.uint8).max()) for t in tensors if t.numel())

touch([torch.ones(1 << 20)])  # warm up torch's own allocations before measuring
anon_before = status("RssAnon")
model = client.attach(sys.argv[1], target=sys.argv[2], timeout=120)
touch(model.tensors.values())
anon_growth = status("RssAnon") - anon_before
shmem = status("RssShmem")
maps = [l.split() for l in open("/proc/self/maps") if "/dev/shm/weightd-" in l]
ranges = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps]
outside = [n for n, t in model.tensors.items()
           if not any(lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi for lo, hi in ranges)]
expected = {}
for f in glob.glob(sys.argv[3] + "/*.safetensors"):
    expected.update(load_file(f))
mismatched = [n for n, t in expected.items()
              if n not in model.tensors or model.tensors[n].dtype != t.dtype or not torch.equal(model.tensors[n], t)]
print(json.dumps({
    "tensors": len(model.tensors), "expected": len(expected), "mismatched": mismatched, "outside": outside,
    "readonly_maps": all(m[1].startswith("r-") for m in maps), "anon_growth": anon_growth, "shmem": shmem,
    "config": sorted(p.name for p in model.config_dir.iterdir()), "lease": model.lease_id,
}))
"""


class Daemon:
    """A ``weightd serve`` process on a socket in a temporary directory."""

    def __init__(
        self, root: Path, env: Mapping[str, str], *, extra_args: tuple[str, ...] = (), wrapper: tuple[str, ...] = ()
    ) -> None:
        self.root = root
        self.socket = root / "weightd.sock"
        self.target = f"unix://{self.socket}"
        self.cache_dir = root / "cache"
        self.log = root / "daemon.log"
        self.env = {**os.environ, **env}
        self.extra_args = extra_args
        self.wrapper = wrapper
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self.process = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "weightd.daemon", "serve", "--socket", str(self.socket),
             "--cache-dir", str(self.cache_dir), *self.extra_args],
            env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                client.list_models(target=self.target)
                return self
            except client.UnavailableError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weightd did not start: {self.log.read_text()[-3000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def segments(self) -> list[Path]:
        """This daemon's arenas in /dev/shm (named by its cache directory, so they outlive its process)."""
        return sorted(Path("/dev/shm").glob(f"weightd-{arena_namespace(self.cache_dir)}-*"))

    def manifests(self) -> list[Path]:
        directory = self.cache_dir / "arenas"
        return sorted(directory.glob("*.json")) if directory.exists() else []

    def recorded_arenas(self) -> list[str]:
        """The arenas the manifests name (``<arena>.<rank>.json``: a group arena's ranks share it)."""
        return sorted({m.name.removesuffix(".json").rsplit(".", 1)[0] for m in self.manifests()})

    def models(self) -> list[client.ResidentModel]:
        return client.list_models(target=self.target)


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    """A directory of /dev/shm for a test's host arenas, emptied and removed after it."""
    directory = Path("/dev/shm") / f"weightd-test-{os.getpid()}-{tmp_path.name}"
    directory.mkdir()
    yield directory
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def start(
        env: Mapping[str, str] | None = None,
        *,
        name: str = "daemon",
        extra_args: tuple[str, ...] = (),
        wrapper: tuple[str, ...] = (),
    ) -> Daemon:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        daemon = Daemon(root, env or {}, extra_args=extra_args, wrapper=wrapper).start()
        started.append(daemon)
        return daemon

    yield start
    unrecorded: list[Path] = []
    for daemon in started:  # every daemon stopped and its memory removed before any finding fails the test
        daemon.stop()
        clean = daemon.process is not None and daemon.process.returncode == 0
        recorded = set(daemon.recorded_arenas())
        leftovers = daemon.segments()
        for leftover in leftovers:  # kept for the next start to adopt; no test leaves memory behind
            leftover.unlink(missing_ok=True)
        unrecorded += [p for p in leftovers if clean and p.name not in recorded]
    assert not unrecorded, f"a cleanly stopped daemon left unrecorded arenas: {unrecorded}"


@dataclass(frozen=True)
class Model:
    directory: Path
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@pytest.fixture(scope="session")
def llama_model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """A ~24 MiB Llama-shaped model in 3 shards with an index, mixed bf16/fp16/fp32."""
    directory = tmp_path_factory.mktemp("llama")
    tensors = write_synthetic_model(directory, total_bytes=24 * 2**20, shards=3, dtypes=("bf16", "fp16", "fp32"))
    return Model(directory, tensors)


@pytest.fixture(scope="session")
def s3_llama(s3_server: S3Server, llama_model: Model) -> str:
    s3_server.upload(llama_model.directory, "models", "llama/")
    return "s3://models/llama/"


def run_client(script: str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 300) -> Any:
    """Run ``script`` in a fresh interpreter (a separate process, as an engine is); return its last JSON line."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise AssertionError(f"client failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def in_own_mount(directory: Path, options: str, *, filesystem: str = "tmpfs") -> tuple[str, ...]:
    """A wrapper (``daemon_factory(wrapper=...)``) that starts the daemon in its own mount namespace, on a
    ``filesystem`` mounted at ``directory`` with ``options``; skips the test where that is not allowed."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (root or CAP_SYS_ADMIN)")
    directory.mkdir()
    return ("unshare", "-m", "sh", "-c", f'mount -t {filesystem} -o {options} none {directory} && exec "$@"', "sh")


HUGE_PAGE_POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


@pytest.fixture
def huge_pages() -> Iterator[int]:
    """At least 64 unclaimed 2 MiB pages in the kernel's pool (what a hugetlbfs's files take): added to the pool
    for the test where there are fewer and root may (vm.nr_hugepages), and taken out again after it."""
    wanted = 64
    total = HUGE_PAGE_POOL / "nr_hugepages"
    if not total.exists():
        pytest.skip("this kernel has no pool of 2 MiB huge pages")
    before = int(total.read_text())
    pool = HugePagePool(2 << 20)
    missing = wanted - pool.unclaimed()
    if missing > 0:
        try:
            total.write_text(str(before + missing))
        except OSError:
            pytest.skip(f"needs {wanted} free 2 MiB huge pages (vm.nr_hugepages) or root to add them")
    try:
        if pool.unclaimed() < wanted:
            pytest.skip(f"the kernel found no {wanted} free 2 MiB pages (memory too fragmented)")
        yield pool.unclaimed()
    finally:
        if missing > 0:
            total.write_text(str(before))  # pages still mapped leave the pool once they are freed


def fp8_linear(name: str, out_features: int, in_features: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A linear layer as FP8 checkpoints (llm-compressor, AutoFP8) store it: an F8_E4M3 weight, a per-channel
    ``weight_scale`` ([out, 1]) and a per-tensor ``input_scale``."""
    return {
        f"{name}.weight": torch.randn(out_features, in_features, generator=generator).to(torch.float8_e4m3fn),
        f"{name}.weight_scale": torch.rand(out_features, 1, generator=generator),
        f"{name}.input_scale": torch.rand((), generator=generator),
    }


def copy_model(model: Model, destination: Path) -> Path:
    shutil.copytree(model.directory, destination)
    return destination


# The fault campaign's figures (tests/test_faults.py), shown together after the run.
FIGURES: list[str] = []


@pytest.fixture
def figure() -> Any:
    def record(line: str) -> None:
        FIGURES.append(line)
        print(line)

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("weightd fault campaign")
        for line in FIGURES:
            terminalreporter.write_line(line)
