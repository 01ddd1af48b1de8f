"""Reading and editing the export definitions document from the console: one export or connection at a time,
the whole document checked before anything is written, and no edit lost to another made meanwhile.

The document lives in the host-storage blob EXPORTS_BLOB names. Each read answers the blob's ETag; a save must
send it back (If-Match) and writes only if the blob is still that version, so two editors never overwrite each
other unseen: the second is told the document changed (409 with the current ETag) and loads it again. A blob that
does not exist yet is created with If-None-Match: * instead, which fails the same way if someone created it
first. When app setting EXPORTS holds the document it is shown but not edited: the app cannot change its own
settings. The blob is written as indented JSON, so people who edit it by hand can still read it.
"""

from __future__ import annotations

import json

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import BlobClient, ContentSettings

from shared.api_answers import Answer, error
from shared.services import Services
from shared.source.export_config import (
    CUSTOM_TYPES,
    STANDARD_FIELDS,
    ExportConfigError,
    allowed_api_hosts,
    definitions_blob,
    parse_definitions,
)

EMPTY = {"connections": [], "exports": []}
KINDS = {"export": "exports", "connection": "connections"}  # what a save names -> the document's list of them
MAX_ITEM = 256 * 1024  # bytes in one export or connection as sent (a large export with every field is a few KB)
CHANGED = ("the export definitions were changed by someone else since you loaded them (or saved meanwhile): load "
           "them again, redo your change on the current version and save")


# The names the definitions check knows, for the console's form to offer (so it keeps no copy of its own).
VOCABULARY = {"standardFields": list(STANDARD_FIELDS), "customTypes": list(CUSTOM_TYPES)}


def get_definitions(svc: Services) -> Answer:
    """GET /api/definitions: the document as stored, its ETag, whether the console may edit it, and the field
    names and custom types a definition may use."""
    text = (svc.settings.env.get("EXPORTS") or "").strip()
    if text:
        return 200, {"etag": None, "editable": False, "source": "app setting EXPORTS", "document": _shown(text),
                     "vocabulary": VOCABULARY}
    blob, source = _blob(svc)
    stored = _read(blob)
    data, etag = stored if stored else (None, None)
    return 200, {"etag": etag, "editable": True, "source": source,
                 "document": EMPTY if stored is None else _shown(data), "vocabulary": VOCABULARY}


def _shown(data: str | bytes):
    """The stored document, parsed; its text when it is not JSON (a hand edit gone wrong shows as it is)."""
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _blob(svc: Services) -> tuple[BlobClient, str]:
    container, path = definitions_blob(svc.settings.env)
    return svc.host.blob.get_blob_client(container, path), f"blob {container}/{path} (EXPORTS_BLOB)"


def _read(blob: BlobClient) -> tuple[bytes, str] | None:
    """The blob's bytes and ETag (one download: the two belong together), or None when it does not exist."""
    try:
        download = blob.download_blob()
    except ResourceNotFoundError:
        return None
    return download.readall(), download.properties.etag


def save_item(svc: Services, kind: str, name: str, body: bytes, if_match: str | None,
              if_none_match: str | None) -> Answer:
    """PUT /api/definitions/{exports|connections}/{name}: replace the item of that name, or append it; check the
    whole document; write it if the blob is still the version loaded."""
    if (svc.settings.env.get("EXPORTS") or "").strip():
        return error(409, "the export definitions are in app setting EXPORTS, which the console cannot edit: "
                           "change them there, or move the document to the blob EXPORTS_BLOB names and remove EXPORTS")
    item = _item(kind, name, body)
    if isinstance(item, str):
        return error(400, item)
    blob, source = _blob(svc)
    stored = _read(blob)
    refused = _precondition(stored, if_match, if_none_match)
    if refused is not None:
        return refused
    document = _document(stored)
    if isinstance(document, str):
        return error(422, document, problems=[{"at": "", "field": "", "message": document}])
    _merge(document, KINDS[kind], item)
    try:
        parse_definitions(document, source, allowed_api_hosts(svc.settings.env))
    except ExportConfigError as exc:
        count = len(exc.located)
        return error(422, f"the export definitions would have {count} problem{'s' if count > 1 else ''} with this "
                           f"{kind} saved; nothing was saved", problems=[p.public() for p in exc.located])
    return _write(blob, document, stored[1] if stored else None)


def _item(kind: str, name: str, body: bytes) -> dict | str:
    """The item sent, or what is wrong with it."""
    if len(body) > MAX_ITEM:
        return f"request body is {len(body)} bytes; at most {MAX_ITEM} are accepted"
    try:
        item = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return f"request body is not valid JSON: {str(exc)[:200]}"
    if not isinstance(item, dict):
        return f"request body must be the {kind} as a JSON object"
    if item.get("name") != name:
        shown = json.dumps(item.get("name"))[:80]
        return f'the {kind}\'s "name" must be {name!r}, the name in the URL; got {shown}'
    return item


def _precondition(stored: tuple[bytes, str] | None, if_match: str | None, if_none_match: str | None) -> Answer | None:
    """428 without the version the edit was made on, 409 when the blob is no longer that version."""
    if stored is None:
        if (if_none_match or "").strip() == "*":
            return None
        if if_match:  # loaded once, deleted since
            return error(409, CHANGED, etag=None)
        return error(428, "the definitions blob does not exist yet: send If-None-Match: * to create it (GET "
                           "/api/definitions answers etag null)")
    if not if_match and (if_none_match or "").strip() == "*":  # loaded before it existed, created since
        return error(409, CHANGED, etag=stored[1])
    if not if_match or if_match.strip() == "*":
        return error(428, "send If-Match with the etag GET /api/definitions answered (\"*\" is not accepted): a "
                           "save is made on the version you loaded, so no one else's edit is overwritten unseen")
    if if_match.strip() != stored[1]:
        return error(409, CHANGED, etag=stored[1])
    return None


def _document(stored: tuple[bytes, str] | None) -> dict | str:
    """The stored document to edit, or why it cannot be."""
    if stored is None:
        return json.loads(json.dumps(EMPTY))
    try:
        document = json.loads(stored[0].decode("utf-8-sig"))
    except ValueError as exc:
        return f"the stored definitions document is not valid JSON ({str(exc)[:200]}): fix the blob by hand first"
    if not isinstance(document, dict):
        return "the stored definitions document is not a JSON object: fix the blob by hand first"
    return document


def _merge(document: dict, key: str, item: dict) -> None:
    """Replace the item of the same name in document[key], else append it (a list that is not one is left for the
    check to name)."""
    items = document.setdefault(key, [])
    if not isinstance(items, list):
        return
    at = next((i for i, old in enumerate(items) if isinstance(old, dict) and old.get("name") == item["name"]), None)
    if at is None:
        items.append(item)
    else:
        items[at] = item


def _write(blob: BlobClient, document: dict, etag: str | None) -> Answer:
    """Write the document if the blob is still version `etag` (None: if it still does not exist)."""
    data = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
    settings = ContentSettings(content_type="application/json")
    try:
        if etag is None:
            written = blob.upload_blob(data, overwrite=False, content_settings=settings)
        else:
            written = blob.upload_blob(data, overwrite=True, etag=etag, match_condition=MatchConditions.IfNotModified,
                                       content_settings=settings)
    except (ResourceModifiedError, ResourceExistsError):
        current = _read(blob)
        return error(409, CHANGED, etag=current[1] if current else None)
    return 200, {"etag": written["etag"], "document": document}

