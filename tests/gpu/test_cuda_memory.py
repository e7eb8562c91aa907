"""Issue [2/5] on a real GPU: weights streamed once into GPU memory and shared zero-copy, read-only.

Each test starts a real daemon (``--memory cuda``) and real client processes on GPU 0, with a local-directory
model. Both hand-over modes run the same tests, except what legacy CUDA IPC cannot give (read-only memory;
memory that outlives the daemon, which CUDA leaves undefined).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from weightd import client
from weightd.daemon.synthetic import write_synthetic_model

from tests.conftest import Daemon

pytestmark = pytest.mark.gpu

# A client process: attach on cuda:0, check every tensor against safetensors and that nothing was copied, then
# follow commands from stdin ("verify", "write", "exit"), answering one JSON line each.
GPU_CLIENT = r"""
import glob, json, sys
import torch
from safetensors.torch import load_file
from weightd import client

target, directory, tp_size, rank = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.cuda.init()
torch.empty(0, device="cuda:0")  # the context exists before we measure
free_before = torch.cuda.mem_get_info(0)[0]
model = client.attach(directory, rank=rank, tp_size=tp_size, device="cuda:0", target=target, timeout=600)
expected = {}
for f in glob.glob(directory + "/*.safetensors"):
    expected.update(load_file(f))

def narrowed(name, tensor):
    dim = model.shards.get(name)
    if dim is None:
        return tensor
    size = tensor.shape[dim] // tp_size
    return tensor.narrow(dim, rank * size, size)

def mismatched():
    return [n for n, t in expected.items()
            if n not in model.tensors or model.tensors[n].dtype != t.dtype
            or not torch.equal(model.tensors[n].cpu(), narrowed(n, t))]

bad = mismatched()
torch.cuda.synchronize()
storages = {t.untyped_storage().data_ptr() for t in model.tensors.values()}
(base,) = storages if len(storages) == 1 else (None,)
size = next(iter(model.tensors.values())).untyped_storage().nbytes()
outside = [n for n, t in model.tensors.items()
           if base is None or not (base <= t.data_ptr() and t.data_ptr() + t.nbytes <= base + size)]
print(json.dumps({
    "mismatched": bad, "tensors": len(model.tensors), "device": str(model.device),
    "on_cuda0": all(t.device == torch.device("cuda", 0) for t in model.tensors.values()),
    "allocated": torch.cuda.memory_allocated(0), "outside": outside,
    "free_drop": free_before - torch.cuda.mem_get_info(0)[0],
    "model_bytes": sum(t.nbytes for t in model.tensors.values()),
}), flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "verify":
        print(json.dumps({"mismatched": mismatched()}), flush=True)
    elif command == "write":
        try:
            next(iter(model.tensors.values())).fill_(1)
            torch.cuda.synchronize()
            print(json.dumps({"wrote": True}), flush=True)
        except Exception as e:  # a read-only mapping: cudaErrorIllegalAddress, sticky in this process only
            print(json.dumps({"wrote": False, "error": str(e)[:200]}), flush=True)
            sys.exit(3)
    elif command == "exit":
        break
"""


class GpuClient:
    def __init__(self, daemon: Daemon, directory: Path, *, tp_size: int = 1, rank: int = 0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", GPU_CLIENT, daemon.target, str(directory), str(tp_size), str(rank)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.report = self.answer()

    def answer(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            assert self.process.stderr is not None
            raise AssertionError(f"GPU client failed ({self.process.wait()}): {self.process.stderr.read()[-3000:]}")
        return json.loads(line)

    def ask(self, command: str) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.answer()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("gpu-model")
    write_synthetic_model(directory, total_bytes=256 << 20, shards=3, dtypes=("bf16", "fp16", "fp32"))
    return directory


@pytest.fixture(params=["vmm", "legacy"])
def sharing(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clients() -> Iterator[list[GpuClient]]:
    started: list[GpuClient] = []
    yield started
    for c in started:
        c.close()


def gpu_daemon(daemon_factory: Any, sharing: str, *extra: str, name: str = "daemon") -> Daemon:
    daemon: Daemon = daemon_factory(name=name, extra_args=("--memory", "cuda", "--cuda-ipc", sharing, *extra))
    return daemon


def test_two_engines_share_one_copy_zero_copy(daemon_factory: Any, gpu_model: Path, sharing: str,
                                              clients: list[GpuClient]) -> None:
    daemon = gpu_daemon(daemon_factory, sharing)
    torch.empty(0, device="cuda:0")
    free_before_load = torch.cuda.mem_get_info(0)[0]
    client.load(str(gpu_model), device="cuda:0", target=daemon.target)
    loaded_drop = free_before_load - torch.cuda.mem_get_info(0)[0]
    (entry,) = [m for m in daemon.models() if m.memory_kind == "cuda"]
    assert entry.device_uuid.startswith("GPU-") and entry.resident_bytes > 0
    assert entry.resident_bytes <= loaded_drop <= entry.resident_bytes + (64 << 20)  # one copy on the GPU

    for _ in range(2):
        clients.append(GpuClient(daemon, gpu_model))
    for c in clients:
        report = c.report
        assert report["mismatched"] == [] and report["tensors"] > 0 and report["on_cuda0"], report
        assert report["allocated"] == 0 and report["outside"] == [], report  # views into the imported range
        assert report["free_drop"] < report["model_bytes"] // 10, report  # importing used no new GPU memory
    assert [m.leases for m in daemon.models() if m.memory_kind == "cuda"] == [2]


def test_a_write_fails_in_the_writer_only(daemon_factory: Any, gpu_model: Path, clients: list[GpuClient]) -> None:
    daemon = gpu_daemon(daemon_factory, "vmm")
    writer, reader = GpuClient(daemon, gpu_model), GpuClient(daemon, gpu_model)
    clients += [writer, reader]
    answer = writer.ask("write")
    assert answer["wrote"] is False, answer
    assert reader.ask("verify") == {"mismatched": []}


def test_legacy_ipc_memory_is_writable_by_clients(daemon_factory: Any, gpu_model: Path,
                                                  clients: list[GpuClient]) -> None:
    """What the README says against --cuda-ipc legacy: any client can write the shared weights."""
    daemon = gpu_daemon(daemon_factory, "legacy")
    writer, reader = GpuClient(daemon, gpu_model), GpuClient(daemon, gpu_model)
    clients += [writer, reader]
    assert writer.ask("write") == {"wrote": True}
    assert reader.ask("verify")["mismatched"]  # the other engine now reads the changed bytes


def test_engines_keep_reading_after_the_daemon_is_killed_and_a_restart_refills_from_the_host_tier(
    daemon_factory: Any, gpu_model: Path, sharing: str, clients: list[GpuClient]
) -> None:
    daemon = gpu_daemon(daemon_factory, sharing)
    engine = GpuClient(daemon, gpu_model)
    clients.append(engine)
    assert engine.report["mismatched"] == []
    read_before = {m.memory_kind: m.storage_bytes_read for m in daemon.models()}
    assert read_before["host"] > 0  # the host tier was streamed once
    daemon.kill()
    if sharing == "vmm":  # legacy IPC memory after its exporter died is undefined in CUDA
        time.sleep(1)
        assert engine.ask("verify") == {"mismatched": []}
    restarted = gpu_daemon(daemon_factory, sharing, name="daemon")
    late = GpuClient(restarted, gpu_model)
    clients.append(late)
    assert late.report["mismatched"] == []
    rows = {m.memory_kind: m for m in restarted.models()}
    assert rows["cuda"].storage_bytes_read == 0 and rows["host"].storage_bytes_read == read_before["host"]
    log = restarted.log.read_text()
    assert "copied to GPU-" in log and "from the host tier" in log and "streamed" not in log.split("adopted")[-1]


def test_tensor_parallel_ranks_are_the_narrowed_tensors(daemon_factory: Any, gpu_model: Path, sharing: str,
                                                        clients: list[GpuClient]) -> None:
    daemon = gpu_daemon(daemon_factory, sharing)
    client.load(str(gpu_model), tp_size=2, all_ranks=True, rank_devices=["cuda:0", "cuda:0"], target=daemon.target)
    for rank in range(2):
        engine = GpuClient(daemon, gpu_model, tp_size=2, rank=rank)
        clients.append(engine)
        assert engine.report["mismatched"] == [] and engine.report["outside"] == [], engine.report
    cuda_rows = [m for m in daemon.models() if m.memory_kind == "cuda"]
    assert sorted(m.rank for m in cuda_rows) == [0, 1] and all(m.leases == 1 for m in cuda_rows)


def test_unknown_gpu_and_over_budget_load_fail_clearly(daemon_factory: Any, gpu_model: Path) -> None:
    daemon = gpu_daemon(daemon_factory, "vmm", "--gpu-memory-limit", "1MiB")
    with pytest.raises(client.InvalidRequestError, match="no GPU GPU-00000000-0000-0000-0000-000000000000 on this"
                                                         " node; the daemon sees GPU-"):
        client.load(str(gpu_model), device="GPU-00000000-0000-0000-0000-000000000000", target=daemon.target)
    with pytest.raises(client.ResourceExhaustedError, match="--gpu-memory-limit") as over:
        client.attach(str(gpu_model), device="cuda:0", target=daemon.target)
    assert over.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with client.attach(str(gpu_model), device="cpu", target=daemon.target) as host:  # still serving
        assert host.device == torch.device("cpu") and host.tensors


def test_cuda_visible_devices_differ_between_daemon_and_client(daemon_factory: Any, gpu_model: Path,
                                                                clients: list[GpuClient]) -> None:
    """The client names its GPU by UUID: with CUDA_VISIBLE_DEVICES set to that GPU's UUID (its only, ordinal 0
    device) it still gets the daemon's memory of it."""
    daemon = gpu_daemon(daemon_factory, "vmm")
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": f"GPU-{uuid}"}
    process = subprocess.run(
        [sys.executable, "-c", GPU_CLIENT, daemon.target, str(gpu_model), "1", "0"], input="exit\n",
        capture_output=True, text=True, env=environment, timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(process.stdout.splitlines()[0])
    assert report["mismatched"] == [] and report["allocated"] == 0
