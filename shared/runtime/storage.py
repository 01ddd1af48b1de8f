"""Storage clients for a named connection setting, in either form the Functions host accepts.

`<NAME>` holds a connection string (local: Azurite), or `<NAME>__blobServiceUri` / `__queueServiceUri` /
`__tableServiceUri` (or `<NAME>__serviceUri` for blob) name endpoints reached with a managed identity
(`<NAME>__clientId` selects a user-assigned one). No account keys are needed in Azure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import requests
from azure.core.pipeline.transport import RequestsTransport
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient, LinearRetry
from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy, QueueClient

from shared.runtime.settings import SettingsError
from shared.runtime.table_limits import TableLimits

# The well-known Azurite endpoints that "UseDevelopmentStorage=true" stands for.
_DEV_ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DEV_STORAGE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    f"AccountKey={_DEV_ACCOUNT_KEY};"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
    "QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;"
)


POOL_SIZE = 64  # a Function instance runs up to batchSize + newBatchThreshold invocations at once


def quick_retry() -> LinearRetry:
    """Blob and queue requests that fail (a pooled connection the server closed, a 503) are tried again about
    0.5 s apart, five times. The SDKs' default waits 12 to 18 s before its first retry: one reset keep-alive
    connection while a page of batches was queued stopped a run's sending for 18 s. (Tables' default retries at
    once.) Work that still fails is retried by its queue message."""
    return LinearRetry(backoff=0.5, random_jitter_range=0.25, retry_total=5)


def pooled_transport() -> RequestsTransport:
    """A pooled HTTP transport large enough for every concurrent invocation (the SDK default keeps 10)."""
    session = requests.Session()
    # No proxy or .netrc look-up in the environment on every request (a quarter of a sender's CPU, measured):
    # a Function app reaches its storage directly.
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return RequestsTransport(session=session, session_owner=True)


@dataclass(frozen=True)
class StorageConnection:
    """The clients for one connection setting; each is made on first use."""

    name: str
    env: Mapping[str, str]

    @cached_property
    def _connection_string(self) -> str | None:
        value = (self.env.get(self.name) or "").strip()
        if value.lower() == "usedevelopmentstorage=true":
            return DEV_STORAGE
        return value or None

    def _endpoint(self, service: str) -> str:
        for key in (f"{self.name}__{service}ServiceUri", f"{self.name}__serviceUri" if service == "blob" else ""):
            if key and self.env.get(key):
                return self.env[key]
        raise SettingsError(
            f"storage connection {self.name!r}: set {self.name} (connection string) or "
            f"{self.name}__{service}ServiceUri (managed identity)"
        )

    @cached_property
    def _credential(self):
        from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

        client_id = self.env.get(f"{self.name}__clientId")
        return ManagedIdentityCredential(client_id=client_id) if client_id else DefaultAzureCredential()

    @cached_property
    def blob(self) -> BlobServiceClient:
        if self._connection_string:
            return BlobServiceClient.from_connection_string(self._connection_string, transport=pooled_transport(),
                                                            retry_policy=quick_retry())
        return BlobServiceClient(self._endpoint("blob"), credential=self._credential, transport=pooled_transport(),
                                 retry_policy=quick_retry())

    @cached_property
    def tables(self) -> TableServiceClient:
        if self._connection_string:
            client = TableServiceClient.from_connection_string(self._connection_string, transport=pooled_transport())
        else:
            client = TableServiceClient(self._endpoint("table"), credential=self._credential,
                                        transport=pooled_transport())
        # Every table client it makes checks Azure's size limits first (Azurite enforces some only). The SDK gives
        # per_call_policies to the service client's own pipeline alone; get_table_client() builds each table's
        # pipeline from this list (tests/test_table_limits.py fails if that changes).
        client._policies.insert(0, TableLimits())
        return client

    def queue(self, name: str, base64: bool = True) -> QueueClient:
        """A queue client speaking base64, as the Functions queue trigger expects (`base64` False: message texts as
        they are, for messages that may not be base64)."""
        policies = {"transport": pooled_transport(), "retry_policy": quick_retry()}
        if base64:
            policies.update(message_encode_policy=BinaryBase64EncodePolicy(),
                            message_decode_policy=BinaryBase64DecodePolicy())
        if self._connection_string:
            return QueueClient.from_connection_string(self._connection_string, name, **policies)
        return QueueClient(self._endpoint("queue"), name, credential=self._credential, **policies)

    def close(self) -> None:
        for name in ("blob", "tables"):
            if name in self.__dict__:
                self.__dict__[name].close()
