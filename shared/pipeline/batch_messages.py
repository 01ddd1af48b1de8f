"""Queue messages that carry one batch: their schema, their size limit and the blob fallback.

A queue message may hold at most 64 KiB once base64-encoded (the form the Functions trigger expects).
The encoded size is measured; a batch that would not fit is written to a blob and the message points at it.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field, replace

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient

from shared.pipeline.planner import BULK_LIMIT
from shared.source.contacts import PERMISSION
from shared.source.export_config import NAME_RE, STANDARD_FIELDS
from shared.state.run_records import RUN_ID_RE

MAX_ENCODED = 64 * 1024
BATCH_CONTAINER = "batches"
KINDS = ("upsert", "join", "leave")
WARM_UP = "warmUp"
# The only document keys the planner writes. Anything else ('unsubscribed', '_NewEmail', '_autopilot_list'...)
# could change a subscription, an identity or a list membership behind the plan's back: forged or corrupt.
# PERMISSION is the export's choice for people it creates (Ortto), and only ever a boolean.
DOCUMENT_KEYS = frozenset(STANDARD_FIELDS) | {"custom", PERMISSION}


class MessageError(ValueError):
    """A queue message that cannot be a batch: it goes to the poison queue with this reason."""


@dataclass(frozen=True)
class BatchMessage:
    run: str
    export: str
    batch: int
    kind: str
    items: list  # [{"k": key, "f": fingerprint, "m": member, "r": source digest, "d": document}]
    list_id: str | None = None
    attempt: int = 0
    carry: dict = field(default_factory=dict)  # outcome of items already settled by earlier attempts
    # Queued by a job that may have queued it before (a redelivered planning job): it may be settled already, so
    # even its first delivery checks. Otherwise only a redelivered message does (one storage read saved a batch).
    maybe_settled: bool = False

    def with_items(self, items: list, **changes) -> BatchMessage:
        return replace(self, items=items, **changes)

    def fields(self) -> dict:
        """The message's fields, shallow (dataclasses.asdict would deep-copy every contact document)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def encode(message: BatchMessage, blobs: BlobServiceClient) -> bytes:
    """The message body to queue: inline if its base64 form fits, else a pointer to a blob."""
    body = json.dumps(message.fields(), separators=(",", ":")).encode()
    if len(base64.b64encode(body)) <= MAX_ENCODED:
        return body
    # Unique: a rest re-queued after a 429 and a replay's copy may carry the same batch and attempt at once.
    name = f"{message.run}/{message.batch:06d}-{message.attempt}-{uuid.uuid4().hex[:12]}.json"
    blobs.get_blob_client(BATCH_CONTAINER, name).upload_blob(json.dumps(message.items), overwrite=True)
    pointer = dict(message.fields(), items=None, blob=f"{BATCH_CONTAINER}/{name}")
    return json.dumps(pointer, separators=(",", ":")).encode()


def warm_up(run_id: str) -> bytes:
    """A message that carries no batch: it asks a send instance to get ready for the run's batches (its resources,
    the run's account and API key) while the run is planned, so the first batch does not pay for that."""
    return json.dumps({WARM_UP: run_id}).encode()


def warmed_run(body: bytes) -> str | None:
    """The run a warm-up message names; None for any other message (a batch, or not a message of ours)."""
    if not body.startswith(b'{"%s"' % WARM_UP.encode()):
        return None
    try:
        run_id = json.loads(body)[WARM_UP]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return run_id if isinstance(run_id, str) and RUN_ID_RE.fullmatch(run_id) else None


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
    for legacy in ("at", "slots"):  # slots booked by versions before the shared budget took them on demand
        data.pop(legacy, None)
    return _validated(data)


def _load_items(pointer: str, blobs: BlobServiceClient) -> list:
    container, _, name = str(pointer).partition("/")
    segments = name.split("/")
    if container != BATCH_CONTAINER or "\\" in name or any(s in ("", ".", "..") for s in segments):
        raise MessageError(f"message points outside the {BATCH_CONTAINER!r} container: {pointer!r}"[:300])
    try:
        return json.loads(blobs.get_blob_client(container, name).download_blob().readall())
    except ResourceNotFoundError:
        raise MessageError(f"message points at a missing blob: {pointer}"[:300]) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MessageError(f"message points at a blob that is not JSON: {pointer}"[:300]) from None


def _validated(data: dict) -> BatchMessage:
    known = set(BatchMessage.__dataclass_fields__)
    problems = [f"unknown field {k!r}" for k in data if k not in known]
    problems += [f"missing field {k!r}" for k in ("run", "export", "batch", "kind", "items") if k not in data]
    problems += [f"{name} {problem}" for name, problem in _field_type_problems(data)]
    if problems:
        raise MessageError("wrong message schema: " + "; ".join(problems)[:500])
    items = data["items"]
    if len(items) > BULK_LIMIT:
        raise MessageError(f"batch holds {len(items)} contacts; at most {BULK_LIMIT} are allowed")
    for n, item in enumerate(items):
        if problem := _item_problem(item):
            raise MessageError(f"wrong message schema: item {n} {problem}")
    return BatchMessage(**data)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


FIELD_CHECKS = {  # field: (check, what it must be)
    "run": (lambda v: isinstance(v, str) and RUN_ID_RE.fullmatch(v), "a run id"),
    "export": (lambda v: isinstance(v, str) and NAME_RE.fullmatch(v), "an export name"),
    "batch": (lambda v: _is_int(v) and v >= 1, "a whole number from 1"),
    "kind": (lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
    "items": (lambda v: isinstance(v, list) and v, "a non-empty list"),
    "list_id": (lambda v: v is None or isinstance(v, str), "text or null"),
    "attempt": (lambda v: _is_int(v) and v >= 0, "a whole number from 0"),
    "maybe_settled": (lambda v: isinstance(v, bool), "true or false"),
    "carry": (lambda v: isinstance(v, dict) and _is_int(v.get("accepted", 0))
              and all(isinstance(v.get(k, []), list) for k in ("refused", "failed"))
              and _are_acks(v.get("acked", [])) and _are_counts(v.get("results", {})),
              "an object with a whole 'accepted', lists 'refused' and 'failed', 'acked' entries "
              "[key, fingerprint, member, source], and 'results' counts"),
}


def _are_acks(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(a, list) and len(a) in (3, 4) and isinstance(a[0], str) and isinstance(a[1], str)
        and isinstance(a[2], bool) and all(isinstance(s, str) for s in a[3:]) for a in value)


def _are_counts(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_int(n) for k, n in value.items())


def _field_type_problems(data: dict):
    for name, (check, expected) in FIELD_CHECKS.items():
        if name in data and not check(data[name]):
            yield name, f"must be {expected}, not {_shown(data[name])}"


def _shown(value) -> str:
    """A wrong value as the reason may quote it: short scalars only (items and carry may hold addresses)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return repr(value)[:40]
    return f"{'an empty' if not value else 'a'} {type(value).__name__}"


def _item_problem(item) -> str:
    """Why an item cannot be sent as planned, or "" when it can."""
    if not (isinstance(item, dict) and isinstance(item.get("k"), str) and isinstance(item.get("d"), dict)
            and isinstance(item["d"].get("Email"), str)):
        return "needs a key 'k' and a document 'd' with an Email"
    if item["d"]["Email"].lower() != item["k"]:
        return "has a document whose Email is not its key"
    if unknown := item["d"].keys() - DOCUMENT_KEYS:  # a set difference: this runs for every contact sent
        return f"has a document with {', '.join(map(repr, sorted(unknown)))}"[:200] + ", which this app never sends"
    if not isinstance(item["d"].get("custom", {}), dict):
        return "has a document whose 'custom' is not an object"
    if not isinstance(item["d"].get(PERMISSION, False), bool):
        return f"has a document whose {PERMISSION!r} is not true or false"
    return ""
