"""The descriptor channel: arenas reach clients only as descriptors, only for live leases, only for allowed
peers; refusals are clear and the daemon keeps serving; nothing leaks in the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file
from weightd import client
from weightd.client._descriptors import receive_descriptors
from weightd.daemon.descriptors import DescriptorChannel, PeerPolicy
from weightd.daemon.memory.host import HostMemory
from weightd.daemon.metrics import Metrics
from weightd.daemon.service import status_name
from weightd.v1 import weightd_pb2 as pb
from weightd.v1 import weightd_pb2_grpc as pb_grpc

from tests.conftest import ATTACH_AND_VERIFY, Daemon, Model, copy_model, run_client

NOBODY = 65534
ENGINE_GID = 12345


def can_switch_user() -> bool:
    return os.geteuid() == 0


@pytest.fixture
def model_uri(llama_model: Model, tmp_path: Path) -> str:
    return str(copy_model(llama_model, tmp_path / "model"))


def descriptor_socket(daemon: Daemon) -> str:
    return str(daemon.socket.with_name("weightd.fds.sock"))


def test_the_descriptor_socket_sits_beside_the_grpc_socket(daemon_factory, model_uri: str) -> None:
    daemon = daemon_factory()
    path = Path(descriptor_socket(daemon))
    assert path.is_socket() and oct(path.stat().st_mode & 0o777) == "0o660"
    result = run_client(ATTACH_AND_VERIFY, model_uri, daemon.target, model_uri)
    assert result["tensors"] == result["expected"] and result["mismatched"] == [] and result["outside"] == []
    assert result["readonly_maps"]


def test_unknown_ended_and_malformed_requests_are_refused(daemon_factory, model_uri: str, llama_model: Model) -> None:
    daemon = daemon_factory()
    path = descriptor_socket(daemon)
    with pytest.raises(client.ModelNotFoundError, match="lease 'no-such-lease' is not live"):
        receive_descriptors(path, "no-such-lease")

    model = client.attach(model_uri, target=daemon.target)
    first = receive_descriptors(path, model.lease_id)  # a second hand-over while the lease lives is fine
    for fd in first:
        os.close(fd)
    model.close()
    deadline = time.monotonic() + 5
    while daemon.models()[0].leases:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(client.ModelNotFoundError, match="it ended, or never existed"):
        receive_descriptors(path, model.lease_id)  # the lease ended: its descriptors are no longer handed out
    norm = llama_model.tensors["model.norm.weight"]
    assert torch.equal(model.tensors["model.norm.weight"], norm)  # what was mapped stays mapped

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.connect(path)
        raw.send(b"not json")
        reply = json.loads(raw.recv(4096))
        assert reply["code"] == "INVALID_ARGUMENT" and "lease_id" in reply["error"]
        assert raw.recv(4096) == b""  # then the daemon hangs up
    with client.attach(model_uri, target=daemon.target) as again:
        assert len(again.tensors) == len(model.tensors)
    assert "refused peer" in daemon.log.read_text()


@pytest.mark.skipif(not can_switch_user(), reason="starting a client with another gid needs root")
def test_a_peer_that_is_not_allowed_is_refused(daemon_factory, model_uri: str) -> None:
    # Only peers whose gid is 12345 may receive descriptors: the same client code, started with gid 0 and then
    # with gid 12345, is told apart by SO_PEERCRED alone.
    daemon = daemon_factory(extra_args=("--allowed-gids", str(ENGINE_GID)))
    script = ("import os, sys\nfrom weightd import client\n"
              "try:\n    m = client.attach(sys.argv[1], target=sys.argv[2])\n    print('attached', len(m.tensors))\n"
              "except client.AccessDeniedError as e:\n    print('refused:', e)\n")
    refused = subprocess.run([sys.executable, "-c", script, model_uri, daemon.target], group=0,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 0, refused.stderr
    assert "refused:" in refused.stdout and "peer uid 0 gid 0" in refused.stdout
    assert f"gids [{ENGINE_GID}]" in refused.stdout and "--allowed-gids" in refused.stdout
    deadline = time.monotonic() + 5
    while daemon.models()[0].leases:  # the refused client gave its lease back
        assert time.monotonic() < deadline
        time.sleep(0.02)
    allowed = subprocess.run([sys.executable, "-c", script, model_uri, daemon.target], group=ENGINE_GID,
                             capture_output=True, text=True, timeout=120)
    assert allowed.stdout.startswith("attached"), allowed.stdout + allowed.stderr


@pytest.mark.skipif(not can_switch_user(), reason="running a process as another uid needs root")
def test_an_arena_file_is_not_readable_by_another_user(daemon_factory, model_uri: str) -> None:
    daemon = daemon_factory()
    client.load(model_uri, target=daemon.target)
    (arena,) = daemon.segments()
    assert oct(arena.stat().st_mode & 0o777) == "0o600"
    probe = subprocess.run(["cat", str(arena)], user=NOBODY, group=NOBODY, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 1 and "Permission denied" in probe.stderr


def test_more_descriptors_than_one_packet_holds(tmp_path: Path) -> None:
    """A lease over 600 arenas takes three packets (at most 253 descriptors each), in slot order."""
    shm = Path(tempfile.mkdtemp(prefix="weightd-many-", dir="/dev/shm"))
    memory = HostMemory(directory=shm, namespace="many")
    arenas = [memory.allocate(4096, label=f"a{i}") for i in range(600)]
    for i, arena in enumerate(arenas):
        arena.tensor().fill_(i % 256)
    path = tmp_path / "fds.sock"
    loop = asyncio.new_event_loop()
    channel = DescriptorChannel(path, mode=0o600, leased_descriptors=lambda lease: arenas if lease == "many" else None,
                                policy=PeerPolicy(), metrics=Metrics(status_of=status_name))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(channel.start(), loop).result(10)
        before = len(os.listdir("/proc/self/fd"))
        received = receive_descriptors(str(path), "many")
        try:
            assert len(received) == 600
            for i, fd in enumerate(received):
                assert os.pread(fd, 1, 0) == bytes([i % 256])
                with pytest.raises(OSError):
                    os.pwrite(fd, b"x", 0)  # read-only descriptors
        finally:
            for fd in received:
                os.close(fd)
        assert len(os.listdir("/proc/self/fd")) == before  # the channel closed its copies too
    finally:
        asyncio.run_coroutine_threadsafe(channel.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        for arena in arenas:
            arena.release()
        shm.rmdir()


def _attach_and_wait(model_uri: str, target: str, ready: multiprocessing.connection.Connection) -> None:
    model = client.attach(model_uri, target=target)
    ready.send(len(model.tensors))
    time.sleep(600)


def test_attach_and_sigkill_cycles_leak_nothing(daemon_factory, model_uri: str) -> None:
    daemon = daemon_factory()
    client.load(model_uri, target=daemon.target)
    assert daemon.process is not None
    fds = Path(f"/proc/{daemon.process.pid}/fd")
    # Forked from a server that imported torch and the client once: 100 real processes in seconds.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "weightd.client", __name__])
    cycles = 100
    baseline = None
    for cycle in range(cycles):
        receiver, sender = context.Pipe(duplex=False)
        engine = context.Process(target=_attach_and_wait, args=(model_uri, daemon.target, sender))
        engine.start()
        assert receiver.poll(60), f"cycle {cycle}: the client never attached"
        receiver.recv()
        engine.kill()
        engine.join()
        receiver.close()
        sender.close()
        if cycle == 0:
            time.sleep(0.5)
            baseline = len(list(fds.iterdir()))
    deadline = time.monotonic() + 10
    while daemon.models()[0].leases or len(list(fds.iterdir())) > (baseline or 0):
        assert time.monotonic() < deadline, (
            f"after {cycles} attach/SIGKILL cycles: {daemon.models()[0].leases} leases, "
            f"{len(list(fds.iterdir()))} descriptors open in the daemon (baseline {baseline})"
        )
        time.sleep(0.05)
    print(f"\n{cycles} attach/SIGKILL cycles: 0 leases left, daemon descriptors {baseline} -> "
          f"{len(list(fds.iterdir()))}")


def _grant(stub: pb_grpc.WeightServiceStub, model_uri: str) -> tuple[Any, pb.Grant]:
    """An AttachModel call (the lease: cancel it to end) and its grant, as any gRPC client sees them."""
    call = stub.AttachModel(pb.AttachModelRequest(model=pb.ModelSelector(model_uri=model_uri)))
    return call, next(call).grant


def test_a_large_tensor_table_arrives_sealed_by_descriptor(daemon_factory, model_uri: str, tmp_path: Path) -> None:
    """A table of 64 KiB and more goes as a sealed memfd after the arena's descriptor; a small one inline."""
    tensors = {f"model.layers.{i // 64}.mlp.experts.{i % 64}.w": torch.full((2, 4), float(i)) for i in range(3000)}
    (tmp_path / "large").mkdir()
    save_file(tensors, str(tmp_path / "large" / "model.safetensors"))
    large = str(tmp_path / "large")
    daemon = daemon_factory()
    channel = grpc.insecure_channel(daemon.target)
    stub = pb_grpc.WeightServiceStub(channel)

    call, grant = _grant(stub, model_uri)
    assert grant.WhichOneof("table") == "tensors" and len(grant.tensors.names) > 0
    call.cancel()

    call, grant = _grant(stub, large)
    try:
        assert grant.WhichOneof("table") == "shared_tensors"
        assert grant.shared_tensors.descriptor_slot == 1 and grant.shared_tensors.size_bytes >= 64 << 10
        arena, table = receive_descriptors(descriptor_socket(daemon), grant.lease_id)
        try:
            seals = fcntl.fcntl(table, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
            with pytest.raises(PermissionError):
                os.pwrite(table, b"x", 0)
            with pytest.raises(PermissionError):
                os.ftruncate(table, 0)
            shared = pb.TensorTable.FromString(os.pread(table, grant.shared_tensors.size_bytes, 0))
            assert list(shared.names) == list(load_file(tmp_path / "large" / "model.safetensors"))
        finally:
            os.close(arena)
            os.close(table)
    finally:
        call.cancel()
        channel.close()
    with client.attach(large, target=daemon.target) as model:
        for name, tensor in tensors.items():
            assert torch.equal(model.tensors[name], tensor), name

    assert daemon.process is not None
    assert _open_tables(daemon.process.pid) == 1
    deadline = time.monotonic() + 5
    while any(row.leases for row in daemon.models()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.evict(large, target=daemon.target)
    assert _open_tables(daemon.process.pid) == 0  # the table goes with its model


def _open_tables(pid: int) -> int:
    """How many shared tensor tables process ``pid`` holds open."""
    opened = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a descriptor closed while we looked
            opened += os.readlink(fd).startswith("/memfd:weightd-tensor-table")
    return opened
