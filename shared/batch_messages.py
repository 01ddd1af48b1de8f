"""Queue messages that carry one batch: their schema, their size limit and the blob fallback.

A queue message may hold at most 64 KiB once base64-encoded (the form the Functions trigger expects).
The encoded size is measured; a batch that would not fit is written to a blob and the message points at it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field, replace

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient

from shared.planner import BULK_LIMIT

MAX_ENCODED = 64 * 1024
BATCH_CONTAINER = "batches"
KINDS = ("upsert", "join", "leave")


class MessageError(ValueError):
    """A queue message that cannot be a batch: it goes to the poison queue with this reason."""


@dataclass(frozen=True)
class BatchMessage:
    run: str
    export: str
    batch: int
    kind: str
    items: list  # [{"k": key, "f": fingerprint, "m": member, "d": document}]
    list_id: str | None = None
    at: float | None = None  # first reserved request slot (epoch seconds)
    slots: int = 0  # how many consecutive slots were reserved from `at`
    attempt: int = 0
    carry: dict = field(default_factory=dict)  # outcome of items already settled by earlier attempts

    def with_items(self, items: list, **changes) -> BatchMessage:
        return replace(self, items=items, **changes)


def encode(message: BatchMessage, blobs: BlobServiceClient) -> bytes:
    """The message body to queue: inline if its base64 form fits, else a pointer to a blob."""
    body = json.dumps(asdict(message), separators=(",", ":")).encode()
    if len(base64.b64encode(body)) <= MAX_ENCODED:
        return body
    name = f"{message.run}/{message.batch:06d}-{message.attempt}.json"
    blobs.get_blob_client(BATCH_CONTAINER, name).upload_blob(json.dumps(message.items), overwrite=True)
    pointer = dict(asdict(message), items=None, blob=f"{BATCH_CONTAINER}/{name}")
    return json.dumps(pointer, separators=(",", ":")).encode()


def decode(body: bytes, blobs: BlobServiceClient) -> BatchMessage:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MessageError("message is not a JSON object")
    if data.get("blob"):
        data["items"] = _load_items(data.pop("blob"), blobs)
    data.pop("blob", None)
    return _validated(data)


def _load_items(pointer: str, blobs: BlobServiceClient) -> list:
    container, _, name = str(pointer).partition("/")
    if container != BATCH_CONTAINER or not name:
        raise MessageError(f"message points outside the {BATCH_CONTAINER!r} container: {pointer!r}")
    try:
        return json.loads(blobs.get_blob_client(container, name).download_blob().readall())
    except ResourceNotFoundError:
        raise MessageError(f"message points at a missing blob: {pointer}") from None


def _validated(data: dict) -> BatchMessage:
    known = set(BatchMessage.__dataclass_fields__)
    problems = [f"unknown field {k!r}" for k in data if k not in known]
    problems += [f"missing field {k!r}" for k in ("run", "export", "batch", "kind", "items") if k not in data]
    if problems:
        raise MessageError("wrong message schema: " + "; ".join(problems))
    if data["kind"] not in KINDS:
        raise MessageError(f"wrong message schema: kind {data['kind']!r} is not one of {', '.join(KINDS)}")
    items = data["items"]
    if not isinstance(items, list) or not items:
        raise MessageError("wrong message schema: items must be a non-empty list")
    if len(items) > BULK_LIMIT:
        raise MessageError(f"batch holds {len(items)} contacts; at most {BULK_LIMIT} are allowed")
    for n, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("k"), str) and isinstance(item.get("d"), dict)
                and isinstance(item["d"].get("Email"), str)):
            raise MessageError(f"wrong message schema: item {n} needs a key 'k' and a document 'd' with an Email")
    return BatchMessage(**data)
