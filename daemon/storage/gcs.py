"""Google Cloud Storage (credentials from Application Default Credentials; anonymous against an emulator).

Endpoint overrides: ``STORAGE_EMULATOR_HOST`` for the SDK; the streamer reads
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (the entry point derives it from the former when unset).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import google.auth.exceptions
import requests
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry, if_transient_error
from google.cloud import storage
from weightd.daemon.errors import (
    AccessDeniedError,
    ModelNotFoundError,
    StorageUnavailableError,
    UnauthenticatedError,
    WeightdError,
)
from weightd.daemon.storage.base import ModelLocation, ObjectInfo, PrefixedObjects

# Bounded: exponential backoff from 0.5 s, giving up after 10 s (the SDK's default keeps trying for 120 s).
RETRY = Retry(predicate=if_transient_error, initial=0.5, maximum=4.0, multiplier=2.0, timeout=10.0)
TIMEOUT = (5.0, 60.0)  # connect, read


class GcsStore(PrefixedObjects):
    def __init__(self, location: ModelLocation) -> None:
        self.location = location
        self.client: Any = None
        try:
            anonymous = ("STORAGE_EMULATOR_HOST", "RUNAI_STREAMER_GCS_USE_ANONYMOUS_CREDENTIALS")
            if any(os.environ.get(name) for name in anonymous):
                self.client = storage.Client.create_anonymous_client()
            else:
                self.client = storage.Client()
        except google.auth.exceptions.GoogleAuthError as e:
            raise self._translate(e, "") from e

    def _list(self) -> list[ObjectInfo]:
        blobs = self.client.list_blobs(
            self.location.bucket, prefix=self.location.prefix, delimiter="/", retry=RETRY, timeout=TIMEOUT
        )
        return [
            ObjectInfo(b.name[len(self.location.prefix) :], int(b.size), str(b.generation))
            for b in blobs
            if b.name != self.location.prefix
        ]

    def _stat(self, name: str) -> ObjectInfo:
        blob = self.client.bucket(self.location.bucket).get_blob(self._key(name), retry=RETRY, timeout=TIMEOUT)
        if blob is None:
            raise ModelNotFoundError(f"{self.streamer_path(name)}: no such object")
        return ObjectInfo(name, int(blob.size), str(blob.generation))

    def _read(self, name: str, offset: int, length: int) -> bytes:
        blob = self.client.bucket(self.location.bucket).blob(self._key(name))
        data: bytes = blob.download_as_bytes(start=offset, end=offset + length - 1, retry=RETRY, timeout=TIMEOUT)
        return data

    def _download(self, name: str, destination: Path) -> None:
        blob = self.client.bucket(self.location.bucket).blob(self._key(name))
        blob.download_to_filename(str(destination), retry=RETRY, timeout=TIMEOUT)

    def _translate(self, error: Exception, name: str) -> WeightdError:
        where = self.streamer_path(name) if name else self.location.uri
        if isinstance(error, google.auth.exceptions.DefaultCredentialsError | google.auth.exceptions.RefreshError):
            return UnauthenticatedError(
                f"{where}: no usable Google credentials ({error}); set GOOGLE_APPLICATION_CREDENTIALS, run "
                "`gcloud auth application-default login`, or use a workload identity"
            )
        if isinstance(error, api_exceptions.NotFound):
            if not name:
                return ModelNotFoundError(f"{where}: bucket {self.location.bucket!r} does not exist")
            return ModelNotFoundError(f"{where}: no such object")
        if isinstance(error, api_exceptions.Unauthorized):
            return UnauthenticatedError(f"{where}: the credentials were rejected ({error.message})")
        if isinstance(error, api_exceptions.Forbidden):
            return AccessDeniedError(f"{where}: access denied ({error.message}); grant storage.objects.get/list")
        if isinstance(error, requests.ConnectionError | requests.Timeout | api_exceptions.RetryError
                      | api_exceptions.ServerError):
            endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"
            return StorageUnavailableError(
                f"{where}: cannot reach GCS at {endpoint} after retries ({error}); check the endpoint and network"
            )
        return StorageUnavailableError(f"{where}: GCS request failed: {error}")
