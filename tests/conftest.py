"""Real processes for the tests: a SeaweedFS S3 server and weightd daemons, all on 127.0.0.1, all stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from botocore.config import Config
from weightd import client
from weightd.daemon.synthetic import write_synthetic_model

from tests.storage_servers import AzureServer, GcsServer, start_azurite, start_gcs

S3_KEY, S3_SECRET = "weightd-test", "weightd-test-secret"
BIN = Path(sys.executable).parent


def free_port(*, also_free: int = 0) -> int:
    """A free loopback port p (and p + also_free, for servers that bind a second port at an offset)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + also_free > 65535:
            continue
        if also_free:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + also_free))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port pair")


def stop_process(process: subprocess.Popen[Any], *, timeout: float = 15) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]

    def env(self, *, key: str = S3_KEY, secret: str = S3_SECRET) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )

    def upload(self, directory: Path, bucket: str, prefix: str) -> None:
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        except s3.exceptions.ClientError as e:
            if "BucketAlreadyExists" not in str(e):
                raise
        for path in sorted(directory.iterdir()):
            s3.upload_file(str(path), bucket, f"{prefix}{path.name}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    # Every HTTP port p also binds a gRPC port p + 10000.
    master, volume, filer, s3_port, admin = (free_port(also_free=10000) for _ in range(5))
    (root / "data").mkdir()
    process = subprocess.Popen(
        [str(BIN / "weed"), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3_port}",
         f"-admin.port={admin}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
         f"-s3.config={config}"],
        stdout=open(root / "weed.log", "wb"), stderr=subprocess.STDOUT,
    )
    server = S3Server(endpoint=f"http://127.0.0.1:{s3_port}", process=process)
    deadline = time.monotonic() + 60
    while True:
        try:
            server.client().list_buckets()
            break
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)
                raise RuntimeError(f"SeaweedFS did not start: {(root / 'weed.log').read_text()[-2000:]}") from None
            time.sleep(0.3)
    try:
        yield server
    finally:
        stop_process(process, timeout=10)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    server = start_gcs(tmp_path_factory.mktemp("fake-gcs"), free_port())
    try:
        yield server
    finally:
        stop_process(server.process)


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureServer]:
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
maps = [l.split() for l in open("/proc/self/maps") if "/weightd-" in l]
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

    def segments(self) -> list[Path]:
        assert self.process is not None
        return sorted(Path("/dev/shm").glob(f"weightd-{self.process.pid}-*"))

    def models(self) -> list[client.ResidentModel]:
        return client.list_models(target=self.target)


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
    for daemon in started:
        pid = daemon.process.pid if daemon.process else None
        daemon.stop()
        if pid is not None:
            leftovers = list(Path("/dev/shm").glob(f"weightd-{pid}-*"))
            for leftover in leftovers:
                leftover.unlink()
            assert not leftovers, f"daemon {pid} left shared memory behind: {leftovers}"


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


def copy_model(model: Model, destination: Path) -> Path:
    shutil.copytree(model.directory, destination)
    return destination
