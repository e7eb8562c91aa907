"""The persistent metadata cache and model revisions (issue [3/4], item 3), against SeaweedFS and a real daemon."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from weightd import client

from tests.conftest import Model, S3Server

METADATA_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer_config.json")


@pytest.fixture
def s3_model(s3_server: S3Server, llama_model: Model, request: pytest.FixtureRequest) -> str:
    """A private copy of the model under a prefix of its own, so tests may change it."""
    prefix = f"cache-{request.node.name}/".replace("[", "-").replace("]", "")
    s3_server.upload(llama_model.directory, "models", prefix)
    return f"s3://models/{prefix}"


def metadata_bytes(model: Model) -> int:
    return sum((model.directory / name).stat().st_size for name in METADATA_FILES)


def test_restart_downloads_no_unchanged_metadata(daemon_factory, s3_server: S3Server, s3_model: str,
                                                 llama_model: Model) -> None:
    # Freed at stop, so the next daemon loads again (rather than adopting) and must find the metadata cached.
    first = daemon_factory(s3_server.env(), name="node", extra_args=("--free-on-stop", "true"))
    with client.attach(s3_model, target=first.target) as model:
        config_dir = model.config_dir
    (entry,) = first.models()
    assert entry.metadata_bytes_downloaded == metadata_bytes(llama_model)
    assert sorted(p.name for p in config_dir.iterdir()) == sorted(METADATA_FILES)
    first.stop()

    second = daemon_factory(s3_server.env(), name="node")  # same cache directory
    printed = subprocess.run(
        [sys.executable, "-m", "weightd.daemon", "metadata", s3_model, "--target", second.target],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip()
    assert Path(printed) == config_dir
    assert json.loads((config_dir / "config.json").read_text())["model_type"] == "llama"
    assert client.fetch_metadata(s3_model, target=second.target).downloaded_bytes == 0
    with client.attach(s3_model, target=second.target) as model:
        assert model.config_dir == config_dir
    (entry,) = second.models()
    assert entry.metadata_bytes_downloaded == 0  # nothing re-downloaded after the restart
    assert not list(config_dir.glob(".*")), "a temporary download was left behind"


def test_changed_object_is_a_new_revision_and_the_old_one_lives_while_leased(
    daemon_factory, s3_server: S3Server, s3_model: str, llama_model: Model
) -> None:
    daemon = daemon_factory(s3_server.env(), extra_args=("--revalidate-after", "0"))
    old = client.attach(s3_model, target=daemon.target)
    norm = old.tensors["model.norm.weight"].clone()

    prefix = s3_model.removeprefix("s3://models/")
    s3_server.client().put_object(Bucket="models", Key=f"{prefix}config.json",
                                  Body=json.dumps({"model_type": "llama", "changed": True}).encode())
    new = client.attach(s3_model, target=daemon.target)
    assert new.revision != old.revision
    assert json.loads((new.config_dir / "config.json").read_text())["changed"] is True
    assert "changed" not in json.loads((old.config_dir / "config.json").read_text())

    rows = {m.revision: m for m in daemon.models()}
    assert (rows[old.revision].current, rows[old.revision].leases) == (False, 1)
    assert (rows[new.revision].current, rows[new.revision].leases) == (True, 1)
    assert torch.equal(old.tensors["model.norm.weight"], norm)  # still mapped and intact
    assert len(daemon.segments()) == 2

    old.close()
    deadline = time.monotonic() + 2
    while len(daemon.models()) != 1 or len(daemon.segments()) != 1:
        assert time.monotonic() < deadline, "the retired revision was not freed after its last lease"
        time.sleep(0.02)
    assert daemon.models()[0].revision == new.revision
    new.close()


def test_attach_serves_the_resident_revision_until_an_explicit_load(
    daemon_factory, s3_server: S3Server, s3_model: str
) -> None:
    daemon = daemon_factory(s3_server.env())  # default: attaches re-check after 30 s
    with client.attach(s3_model, target=daemon.target) as model:
        first = model.revision
    prefix = s3_model.removeprefix("s3://models/")
    s3_server.client().put_object(Bucket="models", Key=f"{prefix}tokenizer_config.json", Body=b"{}")
    with client.attach(s3_model, target=daemon.target) as model:
        assert model.revision == first  # warm attach: no storage round trip
    client.load(s3_model, target=daemon.target)
    (row,) = daemon.models()  # the unleased old revision was freed at once
    assert row.revision != first and row.current


class Forwarder:
    """A loopback TCP forwarder in front of the S3 server: stopping it is a storage outage."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.open += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def stop(self) -> None:
        self.listener.close()
        for s in self.open:
            s.close()


def test_resident_model_outlives_a_storage_outage(daemon_factory, s3_server: S3Server, s3_model: str) -> None:
    forwarder = Forwarder(int(s3_server.endpoint.rsplit(":", 1)[1]))
    env = s3_server.env() | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{forwarder.port}"}
    daemon = daemon_factory(env, extra_args=("--revalidate-after", "0"))
    try:
        with client.attach(s3_model, target=daemon.target) as model:
            revision = model.revision
        forwarder.stop()
        # Every attach re-checks storage, which is now unreachable: the resident copy is still served.
        with client.attach(s3_model, target=daemon.target) as model:
            assert model.revision == revision and model.tensors
        with pytest.raises(client.UnavailableError, match="cannot reach"):
            client.load(s3_model, target=daemon.target, tp_size=2, rank=1)  # needs storage: fails clearly
    finally:
        forwarder.stop()


def test_object_names_that_escape_the_cache_are_rejected(daemon_factory, gcs_server, llama_model: Model,
                                                         tmp_path: Path) -> None:
    directory = tmp_path / "escape"
    shutil.copytree(llama_model.directory, directory)
    gcs_server.upload(directory, "models", "escape/")
    gcs_server.put("models", "escape/..", b"{}")
    daemon = daemon_factory(gcs_server.env())
    with pytest.raises(client.InvalidRequestError, match=r"object name '\.\.' would escape the metadata cache"):
        client.attach("gs://models/escape/", target=daemon.target)
    assert daemon.models() == []
