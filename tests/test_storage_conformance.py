"""One conformance suite for every storage backend, each against a real local server: the ObjectStore protocol
in-process, then a multi-shard model streamed into a daemon and attached from a client process, then the
errors (NOT_FOUND, bad credentials, unreachable endpoint) with the URI and cause named."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from weightd import client
from weightd.daemon.errors import ModelNotFoundError, UnauthenticatedError
from weightd.daemon.storage.base import open_store, parse_model_uri, warm_up_storage

from tests.conftest import ATTACH_AND_VERIFY, Model, free_port, run_client
from tests.storage_servers import S3Server


@dataclass
class Backend:
    name: str
    uri: str
    env: dict[str, str]  # the daemon's
    sdk_env: dict[str, str]  # an SDK client's in this test process
    put: Callable[[str, bytes], None]  # overwrite an object under the model prefix
    missing: tuple[str, str]  # (unknown bucket/container/directory, unknown prefix)
    bad_credentials_env: dict[str, str] | None = None
    unreachable_env: dict[str, str] | None = None
    wrapper: tuple[str, ...] = field(default=())


PREFIX = "conformance/"


@pytest.fixture(params=["local", "s3", "gcs", "azure"])
def backend(request: pytest.FixtureRequest, llama_model: Model, tmp_path: Path) -> Backend:
    if request.param == "local":
        directory = tmp_path / "local-model"
        shutil.copytree(llama_model.directory, directory)
        return Backend(
            "local", str(directory), {}, {}, lambda name, data: (directory / name).write_bytes(data),
            (str(tmp_path / "no-such-dir" / "x"), str(directory / "no-such-prefix")),
        )
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_server")
        s3.upload(llama_model.directory, "models", PREFIX)
        return Backend(
            "s3", f"s3://models/{PREFIX}", s3.env(), s3.env(),
            lambda name, data: s3.client().put_object(Bucket="models", Key=PREFIX + name, Body=data),
            ("s3://no-such-bucket/m/", "s3://models/no-such-prefix/"),
            bad_credentials_env=s3.env(secret="wrong-secret"),
            unreachable_env=s3.env() | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
        )
    if request.param == "gcs":
        gcs = request.getfixturevalue("gcs_server")
        gcs.upload(llama_model.directory, "models", PREFIX)
        closed = f"http://127.0.0.1:{free_port()}"
        return Backend(
            "gcs", f"gs://models/{PREFIX}", gcs.env(), gcs.env(),
            lambda name, data: gcs.put("models", PREFIX + name, data),
            ("gs://no-such-bucket/m/", "gs://models/no-such-prefix/"),
            # No emulator and no Application Default Credentials: fails locally, before any network use.
            bad_credentials_env={"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "absent-key.json")},
            unreachable_env={"STORAGE_EMULATOR_HOST": closed, "CLOUD_STORAGE_EMULATOR_ENDPOINT": closed},
        )
    azure = request.getfixturevalue("azure_server")
    azure.upload(llama_model.directory, "models", PREFIX)
    return Backend(
        "azure", f"az://models/{PREFIX}", azure.env(), azure.sdk_env(),
        lambda name, data: azure.put("models", PREFIX + name, data),
        ("az://no-such-container/m/", "az://models/no-such-prefix/"),
        bad_credentials_env=azure.env(key="d3Jvbmcta2V5LXdyb25nLWtleQ=="),
        unreachable_env=azure.env(port=free_port()),
        wrapper=azure.wrapper,
    )


def test_object_store_protocol(
    backend: Backend, llama_model: Model, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in backend.sdk_env.items():
        monkeypatch.setenv(name, value)
    store = open_store(parse_model_uri(backend.uri))
    files = {p.name: p for p in llama_model.directory.iterdir()}
    listed = {o.name: o for o in store.list_objects()}
    assert set(listed) == set(files)
    for name, info in listed.items():
        assert info.size == files[name].stat().st_size
        assert store.stat(name) == info
    shard = next(n for n in files if n.endswith(".safetensors"))
    blob = files[shard].read_bytes()
    assert store.read_range(shard, 0, 8) == blob[:8]
    assert store.read_range(shard, 1000, 4096) == blob[1000:5096]
    assert store.streamer_path(shard).endswith(shard)
    # What a TP load reads as separate ranges: any piece from a local file; on object stores, pieces large
    # enough to outweigh a request, and small reads more than 1 MiB apart (closer ones are read as one).
    assert store.min_separate_read_bytes == (1 if backend.name == "local" else 4 << 20)
    assert store.read_through_gap_bytes == (0 if backend.name == "local" else 1 << 20)
    # O_DIRECT for files of a local directory, unless the page cache holds most of one (the copy just made);
    # never for objects over the network.
    assert store.reads_directly(shard) is False
    store.download(shard, tmp_path / "copy")  # larger than one chunk of a streamed download
    assert (tmp_path / "copy").read_bytes() == blob
    with pytest.raises(ModelNotFoundError, match=r"no-such-file\.json"):
        store.download("no-such-file.json", tmp_path / "missing")

    before = store.stat("generation_config.json").version
    backend.put("generation_config.json", b'{"changed": true}')
    after = store.stat("generation_config.json")
    assert after.version != before and after.size == len(b'{"changed": true}')


def test_stream_into_daemon_and_attach(backend: Backend, daemon_factory, llama_model: Model) -> None:
    daemon = daemon_factory(backend.env, wrapper=backend.wrapper)
    result = run_client(ATTACH_AND_VERIFY, backend.uri, daemon.target, str(llama_model.directory))
    assert result["tensors"] == len(llama_model.tensors)
    assert result["mismatched"] == [] and result["outside"] == []
    (entry,) = daemon.models()
    assert entry.storage_bytes_read == llama_model.nbytes


def test_unknown_bucket_and_prefix_are_not_found(backend: Backend, daemon_factory) -> None:
    daemon = daemon_factory(backend.env, wrapper=backend.wrapper)
    for uri in backend.missing:
        with pytest.raises(client.ModelNotFoundError) as raised:
            client.attach(uri, target=daemon.target)
        assert parse_model_uri(uri).uri.rstrip("/").split("://")[1].split("/")[0] in str(raised.value)
    assert daemon.models() == []


def test_bad_credentials(backend: Backend, daemon_factory) -> None:
    if backend.bad_credentials_env is None:
        pytest.skip("local files have no credentials (and root reads any file)")
    daemon = daemon_factory(backend.bad_credentials_env, wrapper=backend.wrapper)
    with pytest.raises(client.AccessDeniedError) as raised:
        client.attach(backend.uri, target=daemon.target)
    assert raised.value.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert backend.uri.split("/")[2] in str(raised.value)
    assert "credential" in str(raised.value).lower()


def test_unreachable_endpoint(backend: Backend, daemon_factory) -> None:
    if backend.unreachable_env is None:
        pytest.skip("local files have no endpoint")
    daemon = daemon_factory(backend.unreachable_env, wrapper=backend.wrapper)
    with pytest.raises(client.UnavailableError, match="cannot reach") as raised:
        client.attach(backend.uri, target=daemon.target)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert backend.uri.split("/")[2] in str(raised.value)


def test_s3_stores_share_parsed_models_and_each_resolves_its_own_credentials(
    s3_server: S3Server, llama_model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_server.upload(llama_model.directory, "models", PREFIX)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    warm_up_storage()  # no credentials and no endpoint needed: it only parses the SDK's models
    location = parse_model_uri(f"s3://models/{PREFIX}")
    for name, value in s3_server.env(secret="wrong-secret").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UnauthenticatedError):
        open_store(location).list_objects()
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    assert {o.name for o in open_store(location).list_objects()} == {p.name for p in llama_model.directory.iterdir()}


WARM_UP_WITHOUT_GCS = r"""
import json, sys
sys.modules["google.cloud.storage"] = None  # as on a node installed without the gcs extra
from weightd.daemon.storage.base import warm_up_storage
warm_up_storage()
print(json.dumps(sorted(m for m in sys.modules if m.startswith("weightd.daemon.storage."))))
"""


def test_the_warm_up_imports_the_installed_sdks_and_skips_a_missing_one() -> None:
    imported = run_client(WARM_UP_WITHOUT_GCS)
    assert "weightd.daemon.storage.s3" in imported and "weightd.daemon.storage.azure" in imported
    assert "weightd.daemon.storage.gcs" not in imported
