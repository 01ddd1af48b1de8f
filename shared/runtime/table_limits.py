"""Azure Table storage's size limits, checked on every entity this app writes, before it is sent.

Azure refuses an entity over 1 MiB, a property over 64 KiB and a transaction of more than 100 entities or 4 MiB;
Azurite enforces none of them, so without this check a write that works on the local stack would fail in Azure
(a dead batch whose outcome is too large could not be recorded). The same check runs in Azure, where it only
fails earlier and more clearly than the service would. Sizes follow Azure's own accounting: strings count 2 bytes
a UTF-16 code unit, binary values their decoded bytes.
"""

from __future__ import annotations

import base64
import json

from azure.core.pipeline.policies import SansIOHTTPPolicy

ENTITY_MAX = 1024 * 1024
PROPERTY_MAX = 64 * 1024
BATCH_ENTITIES_MAX = 100
BATCH_BYTES_MAX = 4 * 1024 * 1024
_FIXED = {"Edm.Int32": 4, "Edm.Int64": 8, "Edm.Double": 8, "Edm.DateTime": 8, "Edm.Boolean": 1, "Edm.Guid": 16}


class TableLimitError(ValueError):
    """An entity or transaction Azure Table storage would refuse, with the service's error code, raised here first
    (not as an HttpResponseError: the SDK reads those as the service's answers, and there is none)."""


def _utf16(text: str) -> int:
    return len(text.encode("utf-16-le"))


def _value_size(name: str, value, kinds: dict) -> int:
    kind = kinds.get(name)
    if kind == "Edm.Binary":
        return len(base64.b64decode(value))
    if kind in _FIXED or (isinstance(value, bool | int | float) and not isinstance(value, str)):
        return _FIXED.get(kind, 8)
    return _utf16(str(value))


def check_entity(entity: dict) -> None:
    """Raise TableLimitError naming the property or the entity over Azure's limit."""
    kinds = {key.removesuffix("@odata.type"): value for key, value in entity.items() if key.endswith("@odata.type")}
    size = 4 + _utf16(str(entity.get("PartitionKey", ""))) + _utf16(str(entity.get("RowKey", "")))
    for name, value in entity.items():
        if name.endswith("@odata.type") or name in ("PartitionKey", "RowKey") or value is None:
            continue
        value_size = _value_size(name, value, kinds)
        if value_size > PROPERTY_MAX:
            raise TableLimitError(f"PropertyValueTooLarge: property {name!r} is {value_size:,} bytes; Azure Table "
                                  f"storage takes at most {PROPERTY_MAX:,}")
        size += 8 + _utf16(name) + value_size + 4
    if size > ENTITY_MAX:
        raise TableLimitError(f"EntityTooLarge: the entity is {size:,} bytes; Azure Table storage takes at most "
                              f"{ENTITY_MAX:,}")


class TableLimits(SansIOHTTPPolicy):
    """Checks each entity a request writes (insert, update, merge, and each operation of a transaction)."""

    def on_request(self, request) -> None:
        http = request.http_request
        if http.method not in ("POST", "PUT", "PATCH", "MERGE") or not http.body:
            return
        body = http.body if isinstance(http.body, bytes) else str(http.body).encode()
        if http.url.split("?")[0].endswith("$batch"):
            self._check_batch(body)
            return
        try:
            entity = json.loads(body)
        except ValueError:
            return  # not an entity (the SDK sends entities as JSON)
        if isinstance(entity, dict) and "TableName" not in entity:
            check_entity(entity)

    @staticmethod
    def _check_batch(body: bytes) -> None:
        if len(body) > BATCH_BYTES_MAX:
            raise TableLimitError(f"RequestBodyTooLarge: the transaction is {len(body):,} bytes; Azure Table storage "
                                  f"takes at most {BATCH_BYTES_MAX:,}")
        entities = [part for part in body.split(b"\r\n\r\n") if part.startswith(b"{")]
        if len(entities) > BATCH_ENTITIES_MAX:
            raise TableLimitError(f"InvalidInput: the transaction holds {len(entities)} operations; Azure Table "
                                  f"storage takes at most {BATCH_ENTITIES_MAX}")
        for part in entities:
            check_entity(json.loads(part.split(b"\r\n--", 1)[0]))
