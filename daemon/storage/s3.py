"""Amazon S3 and S3-compatible stores (endpoint from AWS_ENDPOINT_URL, credentials from the AWS chain)."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from weightd.daemon.errors import (
    AccessDeniedError,
    ModelNotFoundError,
    StorageUnavailableError,
    UnauthenticatedError,
    WeightdError,
)
from weightd.daemon.storage.base import ModelLocation, ObjectInfo, PrefixedObjects

_UNAUTHENTICATED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
DOWNLOAD_CHUNK_BYTES = 1 << 20


@functools.cache
def _data_loader() -> Any:
    """botocore's loader of its service models and endpoint data, shared by every store.

    Each session would otherwise parse them again: 0.08-0.12 s per load on an idle 2-core machine, against
    15 ms for a client made with a loader that has them.
    """
    return botocore.session.Session().get_component("data_loader")


def _botocore_session() -> botocore.session.Session:
    # A session per store still resolves credentials and the endpoint from the environment of its time.
    session = botocore.session.Session()
    session.register_component("data_loader", _data_loader())
    return session


def warm_up() -> None:
    """Parse the S3 service model now (placeholder credentials: nothing is resolved or sent), so that a
    starting daemon's first S3 load does not pay for it."""
    _botocore_session().create_client(
        "s3", region_name="us-east-1", aws_access_key_id="warm-up", aws_secret_access_key="warm-up"
    )


class S3Store(PrefixedObjects):
    sdk_errors = (ClientError, BotoCoreError)

    def __init__(self, location: ModelLocation) -> None:
        self.location = location
        custom_endpoint = bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        config = Config(
            # Bounded retries with exponential backoff; then the error is reported as UNAVAILABLE.
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
            # S3-compatible servers addressed by host name or IP need path-style requests.
            s3={"addressing_style": "path" if custom_endpoint else "auto"},
        )
        self.client: Any = boto3.session.Session(botocore_session=_botocore_session()).client("s3", config=config)

    def _list(self) -> list[ObjectInfo]:
        infos = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.location.bucket, Prefix=self.location.prefix, Delimiter="/"):
            for item in page.get("Contents", []):
                name = item["Key"][len(self.location.prefix) :]
                if name:
                    infos.append(ObjectInfo(name, int(item["Size"]), item["ETag"].strip('"')))
        return infos

    def _stat(self, name: str) -> ObjectInfo:
        head = self.client.head_object(Bucket=self.location.bucket, Key=self._key(name))
        return ObjectInfo(name, int(head["ContentLength"]), head["ETag"].strip('"'))

    def _read(self, name: str, offset: int, length: int) -> bytes:
        response = self.client.get_object(
            Bucket=self.location.bucket, Key=self._key(name), Range=f"bytes={offset}-{offset + length - 1}"
        )
        data: bytes = response["Body"].read()
        return data

    def _download(self, name: str, destination: Path) -> None:
        # One GET, streamed to the file. boto3's download_file sends a HEAD first (a second round trip per
        # file on remote storage) and starts a transfer manager's threads: 8-13 ms a file on loopback here,
        # against 3-5 ms. Metadata files are small, so its parallel ranged parts would gain nothing.
        body = self.client.get_object(Bucket=self.location.bucket, Key=self._key(name))["Body"]
        with body, open(destination, "wb") as out:
            shutil.copyfileobj(body, out, DOWNLOAD_CHUNK_BYTES)

    def _translate(self, error: Exception, name: str) -> WeightdError:
        where = self.streamer_path(name) if name else self.location.uri
        if isinstance(error, NoCredentialsError | PartialCredentialsError):
            return UnauthenticatedError(
                f"{where}: no AWS credentials found ({error}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or run on a node with an instance role"
            )
        if isinstance(error, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError | ConnectionClosedError):
            endpoint = self.client.meta.endpoint_url
            return StorageUnavailableError(
                f"{where}: cannot reach the S3 endpoint {endpoint} after retries ({error}); "
                "check AWS_ENDPOINT_URL and the network"
            )
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code == "NoSuchBucket":
                return ModelNotFoundError(f"{where}: bucket {self.location.bucket!r} does not exist")
            if code in _NOT_FOUND_CODES or status == 404:
                return ModelNotFoundError(f"{where}: no such object")
            if code in _UNAUTHENTICATED_CODES:
                return UnauthenticatedError(
                    f"{where}: the S3 endpoint rejected the credentials ({code}); check the access key and secret"
                )
            if code == "AccessDenied" or status == 403:
                return AccessDeniedError(f"{where}: access denied ({code}); grant s3:GetObject and s3:ListBucket")
        return StorageUnavailableError(f"{where}: S3 request failed: {error}")
