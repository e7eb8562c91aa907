"""Azure Blob Storage: ``az://container/prefix``, account from the standard Azure settings.

Credentials, in the SDKs' order: ``AZURE_STORAGE_CONNECTION_STRING``; ``AZURE_STORAGE_ACCOUNT_NAME`` with
``AZURE_STORAGE_SAS_TOKEN`` or ``AZURE_STORAGE_ACCOUNT_KEY``; else ``DefaultAzureCredential`` (managed identity,
workload identity, CLI). Endpoint: ``https://<account>.<AZURE_STORAGE_ENDPOINT_SUFFIX>`` (default
``blob.core.windows.net``), which is also what the streamer connects to.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobServiceClient, ExponentialRetry
from weightd.daemon.errors import (
    AccessDeniedError,
    ModelNotFoundError,
    StorageUnavailableError,
    UnauthenticatedError,
    WeightdError,
)
from weightd.daemon.storage.base import ModelLocation, ObjectInfo, PrefixedObjects

_UNAUTHENTICATED_CODES = ("AuthenticationFailed", "InvalidAuthenticationInfo")
# Bounded retries with exponential backoff: waits of about 1, 3 and 5 s. (The storage SDK's own default,
# 15 s + 3^n, keeps an unreachable endpoint busy for 85 s before it says so.)
CLIENT_OPTIONS: dict[str, Any] = {
    "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=3, random_jitter_range=0),
    "connection_timeout": 5,
}


def _service_client() -> BlobServiceClient:
    env = os.environ
    if env.get("AZURE_STORAGE_CONNECTION_STRING"):
        return BlobServiceClient.from_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"], **CLIENT_OPTIONS)
    account = env.get("AZURE_STORAGE_ACCOUNT_NAME")
    if not account:
        raise UnauthenticatedError(
            "az:// needs the storage account: set AZURE_STORAGE_ACCOUNT_NAME (and a key, SAS token or identity)"
        )
    url = f"https://{account}.{env.get('AZURE_STORAGE_ENDPOINT_SUFFIX', 'blob.core.windows.net')}"
    credential: Any
    if env.get("AZURE_STORAGE_SAS_TOKEN"):
        credential = env["AZURE_STORAGE_SAS_TOKEN"].lstrip("?")
    elif env.get("AZURE_STORAGE_ACCOUNT_KEY"):
        credential = {"account_name": account, "account_key": env["AZURE_STORAGE_ACCOUNT_KEY"]}
    else:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    return BlobServiceClient(url, credential=credential, **CLIENT_OPTIONS)


class AzureStore(PrefixedObjects):
    def __init__(self, location: ModelLocation) -> None:
        self.location = location
        self.container: Any = _service_client().get_container_client(location.bucket)

    def _list(self) -> list[ObjectInfo]:
        return [
            ObjectInfo(item.name[len(self.location.prefix) :], int(item.size), str(item.etag).strip('"'))
            for item in self.container.walk_blobs(name_starts_with=self.location.prefix, delimiter="/")
            if not item.name.endswith("/")
        ]

    def _stat(self, name: str) -> ObjectInfo:
        props = self.container.get_blob_client(self._key(name)).get_blob_properties()
        return ObjectInfo(name, int(props.size), str(props.etag).strip('"'))

    def _read(self, name: str, offset: int, length: int) -> bytes:
        data: bytes = self.container.get_blob_client(self._key(name)).download_blob(offset, length).readall()
        return data

    def _download(self, name: str, destination: Path) -> None:
        with open(destination, "wb") as out:
            self.container.get_blob_client(self._key(name)).download_blob().readinto(out)

    def _translate(self, error: Exception, name: str) -> WeightdError:
        where = self.streamer_path(name) if name else self.location.uri
        code = str(getattr(error, "error_code", "") or "")
        if isinstance(error, ResourceNotFoundError):
            if code == "ContainerNotFound":
                return ModelNotFoundError(f"{where}: container {self.location.bucket!r} does not exist")
            return ModelNotFoundError(f"{where}: no such blob")
        if isinstance(error, ClientAuthenticationError) or code in _UNAUTHENTICATED_CODES:
            return UnauthenticatedError(
                f"{where}: Azure rejected the credentials ({code or type(error).__name__}); check "
                "AZURE_STORAGE_ACCOUNT_KEY / AZURE_STORAGE_SAS_TOKEN or the identity"
            )
        if isinstance(error, HttpResponseError) and error.status_code == 403:
            return AccessDeniedError(
                f"{where}: access denied ({code}): the account key, SAS token or identity was rejected or lacks "
                "the Storage Blob Data Reader role; check the credentials and the role assignment"
            )
        if isinstance(error, ServiceRequestError | ServiceResponseError):
            return StorageUnavailableError(
                f"{where}: cannot reach Azure Blob Storage after retries ({error}); check "
                "AZURE_STORAGE_ENDPOINT_SUFFIX / the connection string and the network"
            )
        return StorageUnavailableError(f"{where}: Azure request failed: {error}")
