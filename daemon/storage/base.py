"""The storage seam: one ``ObjectStore`` per model location, one implementation per URI scheme."""

from __future__ import annotations

import abc
import importlib
import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

from weightd.daemon.errors import InvalidRequestError, ModelNotFoundError, UnsupportedModelError, WeightdError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelLocation:
    """A parsed model URI. ``uri`` is the canonical spelling used as the model's identity."""

    scheme: str  # "file", "s3", "gs" or "az"
    bucket: str  # bucket or container; empty for "file"
    prefix: str  # object-key prefix ending in "/" (or an absolute directory path for "file")
    uri: str


@dataclass(frozen=True)
class ObjectInfo:
    name: str  # relative to the model prefix
    size: int
    version: str  # ETag, generation or mtime+size: changes whenever the content can have changed


class ObjectStore(Protocol):
    """Read-only access to the objects directly under one model prefix."""

    location: ModelLocation
    # Pieces of a block smaller than this are cheaper read as the one block than each as a range of its own.
    min_separate_read_bytes: int
    # Small reads of one object at most this many bytes apart are cheaper read as one, the bytes between dropped.
    read_through_gap_bytes: int

    def list_objects(self) -> list[ObjectInfo]:
        """Objects directly under the prefix (not in sub-"directories"). Raises ModelNotFoundError if none."""
        ...

    def stat(self, name: str) -> ObjectInfo: ...

    def read_range(self, name: str, offset: int, length: int) -> bytes: ...

    def download(self, name: str, destination: Path) -> None:
        """Write the whole object to ``destination`` (the caller makes it atomic)."""
        ...

    def streamer_path(self, name: str) -> str:
        """The path runai-model-streamer reads this object by."""
        ...

    def reads_directly(self, name: str) -> bool:
        """Whether the streamer should read this object as a file with O_DIRECT, where its destinations agree
        with its offsets (weightd.daemon.plan.DIRECT_IO_BLOCK); never for objects that come over the network."""
        ...


class PrefixedObjects(abc.ABC):
    """What the object-store backends share: object keys under the model prefix, the streamer's path, and
    one place that turns every SDK failure into a named error. A backend supplies the raw SDK calls, the
    exception types its SDK raises, and ``_translate``."""

    location: ModelLocation
    sdk_errors: tuple[type[Exception], ...] = (Exception,)
    # Every ranged GET pays a request's fixed cost (on SeaweedFS about 1.7 ms of server CPU; on remote storage
    # a round trip). A TP=4 all-ranks load of a 1 GB model of 0.1-3 MB tensors from SeaweedFS took 1.48x a full
    # load with one GET per rank's piece (2,869 of them), 1.10x with one per block below 4 MiB pieces.
    min_separate_read_bytes = 4 << 20
    # A request's fixed cost against bytes: arrow-rs object_store joins ranges up to 1 MiB apart
    # (OBJECT_STORE_COALESCE_DEFAULT). Measured here: see docs/benchmarks.md, "a lone rank's small reads".
    read_through_gap_bytes = 1 << 20

    def _key(self, name: str) -> str:
        return self.location.prefix + name

    def streamer_path(self, name: str) -> str:
        return f"{self.location.scheme}://{self.location.bucket}/{self._key(name)}"

    def reads_directly(self, name: str) -> bool:
        return False

    def list_objects(self) -> list[ObjectInfo]:
        infos = self._call("", self._list)
        if not infos:
            raise empty_prefix(self.location)
        return infos

    def stat(self, name: str) -> ObjectInfo:
        return self._call(name, self._stat, name)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return self._call(name, self._read, name, offset, length)

    def download(self, name: str, destination: Path) -> None:
        self._call(name, self._download, name, destination)

    def _call(self, name: str, sdk_call: Callable[..., T], *args: Any) -> T:
        try:
            return sdk_call(*args)
        except WeightdError:
            raise  # already named by the backend
        except self.sdk_errors as e:
            raise self._translate(e, name) from e

    @abc.abstractmethod
    def _list(self) -> list[ObjectInfo]:
        """Objects directly under the prefix (the prefix itself excluded)."""

    @abc.abstractmethod
    def _stat(self, name: str) -> ObjectInfo: ...

    @abc.abstractmethod
    def _read(self, name: str, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def _download(self, name: str, destination: Path) -> None: ...

    @abc.abstractmethod
    def _translate(self, error: Exception, name: str) -> WeightdError:
        """The named error for an SDK failure on ``name`` ("" for the prefix itself)."""


def empty_prefix(location: ModelLocation) -> ModelNotFoundError:
    noun = OBJECT_SCHEMES[location.scheme][1]
    return ModelNotFoundError(
        f"{location.uri}: no objects under this prefix in {noun} {location.bucket!r}; "
        "check the prefix (it is case-sensitive)"
    )


T = TypeVar("T")

# Object-store schemes: URI scheme -> (install extra, what the bucket is called there).
OBJECT_SCHEMES = {"s3": ("", "bucket"), "gs": ("gcs", "bucket"), "az": ("azure", "container")}


def parse_model_uri(uri: str) -> ModelLocation:
    if not uri:
        raise InvalidRequestError("model_uri is empty; pass a local directory, s3://, gs:// or az://bucket/prefix/")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        path = unquote(parts.path) if scheme == "file" else uri
        if not path.startswith("/"):
            path = str(Path(path).absolute())
        directory = posixpath.normpath(path)
        return ModelLocation(scheme="file", bucket="", prefix=directory, uri=f"file://{directory}")
    if scheme in OBJECT_SCHEMES:
        bucket, prefix = parts.netloc, parts.path.lstrip("/")
        if not bucket:
            noun = OBJECT_SCHEMES[scheme][1]
            raise InvalidRequestError(f"model URI {uri!r} has no {noun}; expected {scheme}://{noun}/prefix/")
        if ".." in prefix.split("/"):
            raise InvalidRequestError(f"model URI {uri!r} contains '..'; object prefixes must not")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return ModelLocation(scheme=scheme, bucket=bucket, prefix=prefix, uri=f"{scheme}://{bucket}/{prefix}")
    raise InvalidRequestError(
        f"model URI {uri!r} has unsupported scheme {parts.scheme!r}; use a local path, file://, s3://, gs:// or az://"
    )


# The streamer's plugin for each object-store scheme: without it a load fails mid-stream with "<scheme> not
# supported", so it is checked up front beside the SDK.
STREAMER_PLUGINS = {
    "s3": "runai_model_streamer_s3", "gs": "runai_model_streamer_gcs", "az": "runai_model_streamer_azure",
}


def warm_up_storage() -> None:
    """Import every installed object-store SDK, and parse the S3 service model, before a first load needs them:
    a started daemon calls this once, in the background. S3 first (0.2-0.4 s on a busy 2-core node), then
    google-cloud-storage and azure-storage-blob (0.11-0.14 s and 14 MB each): a fresh daemon's first gs://
    attach of 0.25 GB took 0.39 s without, 0.27 s with, and it served no later."""
    for scheme in ("s3", "gcs", "azure"):
        try:
            module = importlib.import_module(f"weightd.daemon.storage.{scheme}")
            if scheme == "s3":
                module.warm_up()
        except ImportError:  # the node lacks this extra; a load from it says so
            continue
        except Exception:  # only a head start: the first load pays the cost instead
            logger.debug("warming up the %s client failed", scheme, exc_info=True)


def open_store(location: ModelLocation) -> ObjectStore:
    """The backend for ``location``. Cloud SDKs are imported here, so a node needs only the extras it uses."""
    try:
        if location.scheme in STREAMER_PLUGINS:
            importlib.import_module(STREAMER_PLUGINS[location.scheme])
        if location.scheme == "file":
            from weightd.daemon.storage.local import LocalStore

            return LocalStore(location)
        if location.scheme == "s3":
            from weightd.daemon.storage.s3 import S3Store

            return S3Store(location)
        if location.scheme == "gs":
            from weightd.daemon.storage.gcs import GcsStore

            return GcsStore(location)
        from weightd.daemon.storage.azure import AzureStore

        return AzureStore(location)
    except ImportError as e:
        extra = OBJECT_SCHEMES[location.scheme][0]
        install = f"pip install 'weightd[{extra}]'" if extra else "pip install --force-reinstall weightd"
        raise UnsupportedModelError(
            f"{location.uri}: {location.scheme}:// support is not installed ({e.name} is missing); "
            f"install it on the daemon's node with: {install}"
        ) from e
