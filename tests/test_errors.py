"""Bad input gets a clear error with the right gRPC status, leaves nothing half-loaded, and the daemon keeps
serving other models."""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from weightd import client

from tests.conftest import Model, S3Server, copy_model, free_port, in_own_mount


def write_raw_safetensors(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> None:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


MALFORMED = {
    # name: (header, data, header-length override, status, words the message must contain)
    "bad_header_length": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 10**6,
                          grpc.StatusCode.INVALID_ARGUMENT, ["model.safetensors", "header length"]),
    "offsets_outside": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None,
                        grpc.StatusCode.DATA_LOSS, ["model.safetensors", "'w'", "outside"]),
    "unknown_dtype": ({"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, None,
                      grpc.StatusCode.INVALID_ARGUMENT, ["model.safetensors", "'w'", "unknown dtype 'F7'"]),
    "shape_mismatch": ({"w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 10]}}, b"\0" * 10, None,
                       grpc.StatusCode.INVALID_ARGUMENT, ["model.safetensors", "'w'", "needs 12 bytes"]),
    "not_json": (b"{not json", b"", None, grpc.StatusCode.INVALID_ARGUMENT, ["model.safetensors", "JSON"]),
    "deep_nesting": (b"[" * 5000 + b"]" * 5000, b"", None, grpc.StatusCode.INVALID_ARGUMENT,
                     ["model.safetensors", "nests JSON too deeply"]),
    "metadata_not_strings": ({"__metadata__": {"format": 1}, "w": {"dtype": "F32", "shape": [1],
                                                                  "data_offsets": [0, 4]}}, b"\0" * 4, None,
                             grpc.StatusCode.INVALID_ARGUMENT, ["model.safetensors", "__metadata__"]),
}


@pytest.fixture
def good_uri(llama_model: Model, tmp_path: Path) -> str:
    return str(copy_model(llama_model, tmp_path / "good"))


def assert_still_serving(daemon, uri: str, failed_uri: str) -> None:
    with client.attach(uri, target=daemon.target) as model:
        assert len(model.tensors) > 10
    uris = {m.model_uri for m in daemon.models()}
    assert not any(failed_uri.rstrip("/") in u for u in uris), "a failed load left an entry behind"
    assert len(daemon.segments()) == 1, "a failed load left an arena behind"


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors(daemon_factory, tmp_path: Path, good_uri: str, case: str) -> None:
    header, data, length, status, words = MALFORMED[case]
    bad = tmp_path / case
    bad.mkdir()
    write_raw_safetensors(bad / "model.safetensors", header, data, length=length)
    daemon = daemon_factory()
    with pytest.raises(client.WeightdError) as raised:
        client.attach(str(bad), target=daemon.target)
    assert raised.value.code == status
    for word in words:
        assert word in str(raised.value)
    assert_still_serving(daemon, good_uri, str(bad))


def test_only_bin_weights_is_failed_precondition(daemon_factory, tmp_path: Path, good_uri: str) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "pytorch_model.bin").write_bytes(b"\0" * 64)
    daemon = daemon_factory()
    with pytest.raises(client.PreconditionFailedError, match=r"only safetensors.*pytorch_model\.bin"):
        client.attach(str(legacy), target=daemon.target)
    assert_still_serving(daemon, good_uri, str(legacy))


def test_bad_requests_are_invalid_argument(daemon_factory, good_uri: str) -> None:
    daemon = daemon_factory()
    for kwargs, words in [
        ({"model_uri": "ftp://host/x"}, "unsupported scheme"),
        ({"model_uri": ""}, "empty"),
        ({"model_uri": good_uri, "rank": 2, "tp_size": 2}, "rank must be in [0, 2)"),
    ]:
        with pytest.raises(client.InvalidRequestError, match=words.replace("[", r"\[").replace(")", r"\)")):
            client.attach(target=daemon.target, **kwargs)
    assert_still_serving(daemon, good_uri, "ftp://")


def test_missing_local_directory_is_not_found(daemon_factory, tmp_path: Path, good_uri: str) -> None:
    daemon = daemon_factory()
    with pytest.raises(client.ModelNotFoundError, match="no such file or directory"):
        client.attach(str(tmp_path / "nope"), target=daemon.target)
    assert_still_serving(daemon, good_uri, str(tmp_path / "nope"))


def test_s3_missing_bucket_prefix_and_shard(
    daemon_factory, s3_server: S3Server, s3_llama: str, llama_model: Model, tmp_path: Path
) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(llama_model.directory, partial)
    (partial / "model-00002-of-00003.safetensors").unlink()
    s3_server.upload(partial, "models", "partial/")
    daemon = daemon_factory(s3_server.env())
    for uri, words in [
        ("s3://no-such-bucket/llama/", "bucket 'no-such-bucket' does not exist"),
        ("s3://models/no-such-prefix/", "no objects under this prefix"),
        ("s3://models/partial/", "model-00002-of-00003.safetensors"),
    ]:
        with pytest.raises(client.ModelNotFoundError) as raised:
            client.attach(uri, target=daemon.target)
        assert words in str(raised.value) and uri.split("/")[2] in str(raised.value)
        assert_still_serving(daemon, s3_llama, uri)


def test_s3_bad_credentials(daemon_factory, s3_server: S3Server, s3_llama: str) -> None:
    daemon = daemon_factory(s3_server.env(secret="wrong-secret"))
    with pytest.raises(client.AccessDeniedError) as raised:
        client.attach(s3_llama, target=daemon.target)
    assert raised.value.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert "s3://models/llama/" in str(raised.value) and "credentials" in str(raised.value)
    assert daemon.models() == []


def test_s3_unreachable_endpoint(daemon_factory, s3_server: S3Server, good_uri: str) -> None:
    env = s3_server.env() | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    daemon = daemon_factory(env)
    with pytest.raises(client.UnavailableError, match="cannot reach the S3 endpoint") as raised:
        client.attach("s3://models/llama/", target=daemon.target)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert_still_serving(daemon, good_uri, "s3://models/llama/")


def test_no_daemon_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(client.UnavailableError, match="is the daemon running"):
        client.attach("/models/x", target=f"unix://{tmp_path}/absent.sock")


def test_a_streamer_failure_is_explained_by_asking_storage(tmp_path: Path) -> None:
    """The streamer says only "File access error"; the loader names the cause from storage itself."""
    from weightd.daemon.errors import ModelNotFoundError, StorageUnavailableError
    from weightd.daemon.storage.base import open_store, parse_model_uri
    from weightd.daemon.streaming import StreamingError, explain

    (tmp_path / "a.safetensors").write_bytes(b"x")
    store = open_store(parse_model_uri(str(tmp_path)))
    opaque = StreamingError("Could not receive response from libstreamer due to: b'File access error'")
    gone = explain(store, ["a.safetensors", "b.safetensors"], opaque)
    assert isinstance(gone, ModelNotFoundError) and "b.safetensors" in str(gone)
    readable = explain(store, ["a.safetensors"], opaque)
    assert isinstance(readable, StorageUnavailableError) and "retry" in str(readable)


def test_attach_timeout_is_deadline_exceeded_and_the_load_goes_on(daemon_factory, good_uri: str) -> None:
    daemon = daemon_factory()
    with pytest.raises(client.DeadlineExceededError, match=r"within 0\.001 s"):
        client.attach(good_uri, target=daemon.target, timeout=0.001)
    # The cold load it started was not abandoned: the next attach finds it resident or still loading.
    with client.attach(good_uri, target=daemon.target, timeout=60) as model:
        assert model.tensors
    assert len(daemon.models()) == 1


def test_a_model_larger_than_the_shared_memory_is_resource_exhausted(daemon_factory, tmp_path: Path,
                                                                       good_uri: str) -> None:
    shm = tmp_path / "small-shm"
    # A 1 MiB tmpfs in the daemon's own mount namespace stands in for a full /dev/shm.
    wrapper = in_own_mount(shm, "size=1m")
    # A budget beyond the tmpfs itself: the filesystem, not the budget, runs out.
    daemon = daemon_factory(extra_args=("--shm-dir", str(shm), "--host-memory-limit", "1GiB"), wrapper=wrapper)
    with pytest.raises(client.ResourceExhaustedError, match="evict models") as raised:
        client.attach(good_uri, target=daemon.target)
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert daemon.models() == []  # nothing half-loaded; the daemon still answers


@pytest.mark.parametrize(("uri", "missing", "install"), [
    ("gs://models/llama/", "google.cloud.storage", "pip install 'weightd[gcs]'"),  # the SDK
    ("gs://models/llama/", "runai_model_streamer_gcs", "pip install 'weightd[gcs]'"),  # the streamer's plugin
    ("az://models/llama/", "runai_model_streamer_azure", "pip install 'weightd[azure]'"),
    ("az://models/llama/", "azure.storage.blob", "pip install 'weightd[azure]'"),
])
def test_a_missing_cloud_extra_is_named(
    daemon_factory, tmp_path: Path, good_uri: str, uri: str, missing: str, install: str
) -> None:
    # A node installed without what the scheme needs: the daemon's interpreter cannot import ``missing``. (S3's
    # plugin comes with runai-model-streamer itself: the daemon does not start without it.)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {missing!r}:\n"
        "            raise ModuleNotFoundError(f\"No module named {name!r}\", name=name)\n"
        "sys.meta_path.insert(0, _Missing())\n"
    )
    daemon = daemon_factory({"PYTHONPATH": str(shim)})
    with pytest.raises(client.PreconditionFailedError, match=re.escape(install)) as raised:
        client.attach(uri, target=daemon.target)
    assert uri in str(raised.value) and "is missing" in str(raised.value)
    assert_still_serving(daemon, good_uri, uri.split(":")[0] + "://")


def test_every_error_class_has_a_status_its_subclasses_inherit() -> None:
    import inspect

    import grpc
    from weightd.daemon import errors
    from weightd.daemon.service import STATUS_BY_ERROR, status_for

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.WeightdError)]
    for cls in classes:
        if cls is not errors.WeightdError:
            assert cls in STATUS_BY_ERROR, f"{cls.__name__} has no gRPC status"

        class Refined(cls):  # type: ignore[valid-type, misc]  # a subclass added later, without a mapping
            pass

        assert status_for(Refined) == status_for(cls)
    assert status_for(errors.WeightdError) == grpc.StatusCode.INTERNAL


def test_client_calls_raise_only_client_errors(daemon_factory, good_uri: str) -> None:
    """Arguments the wire cannot carry, or a bad target, are InvalidRequestError before anything is sent."""
    daemon = daemon_factory()
    target = daemon.target
    calls: list[tuple[str, Callable[[], object]]] = [
        ("attach uri None", lambda: client.attach(None, target=target)),  # type: ignore[arg-type]
        ("attach uri int", lambda: client.attach(123, target=target)),  # type: ignore[arg-type]
        ("attach rule dim str", lambda: client.attach(good_uri, shard_rules=[
            client.ShardRule(pattern="x", split_dim="0")], target=target)),  # type: ignore[arg-type]
        ("attach rule pad negative", lambda: client.attach(good_uri, shard_rules=[
            client.ShardRule(pattern="x", split_dim=0, pad_multiple=-1)], target=target)),
        ("attach fusion parts None", lambda: client.attach(good_uri, fusions=[
            client.Fusion(fused="a", parts=None)], target=target)),  # type: ignore[arg-type]
        ("attach device tpu", lambda: client.attach(good_uri, device="tpu", target=target)),
        ("attach timeout str", lambda: client.attach(good_uri, timeout="1", target=target)),  # type: ignore[arg-type]
        ("attach timeout negative", lambda: client.attach(good_uri, timeout=-1, target=target)),
        ("attach target int", lambda: client.attach(good_uri, target=5)),  # type: ignore[arg-type]
        ("load memory_limit negative", lambda: client.load(good_uri, memory_limit=-5, target=target)),
        ("load concurrency 0", lambda: client.load(good_uri, concurrency=0, target=target)),
        ("load concurrency str", lambda: client.load(good_uri, concurrency="8", target=target)),  # type: ignore[arg-type]
        ("evict uri list", lambda: client.evict(["/x"], target=target)),  # type: ignore[arg-type]
        ("metadata uri None", lambda: client.fetch_metadata(None, target=target)),  # type: ignore[arg-type]
        ("list target list", lambda: client.list_models(target=["unix:///x"])),  # type: ignore[arg-type]
    ]
    for what, call in calls:
        try:
            call()
        except client.InvalidRequestError as e:
            assert e.code == grpc.StatusCode.INVALID_ARGUMENT, what
        except Exception as e:
            raise AssertionError(f"{what}: {type(e).__module__}.{type(e).__name__}: {e}") from e
        else:
            raise AssertionError(f"{what}: no error")
    with pytest.raises(client.UnavailableError):
        client.list_models(target=f"unix://{daemon.root}/no-such.sock")
    assert_still_serving(daemon, good_uri, "/x")
