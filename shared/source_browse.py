"""What the console shows of an export storage account while someone writes a definition: the segments its
model.json files describe, and a segment's columns with the ones that look like the email and name fields.

Read as a run reads them (shared/source/cdm_reader.py), through the storage connection an app setting names: the
caller names the setting, never a connection string or URL, and only a setting the app has.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from azure.core.exceptions import AzureError, HttpResponseError
from azure.storage.blob import ContainerClient

from shared.api_answers import Answer, error
from shared.pipeline.runs import iso
from shared.services import Services
from shared.source.cdm_reader import ExportDataError, NotThere, find_snapshot, list_segments
from shared.source.export_config import CONTAINER_RE, DEFAULT_CONNECTION, SETTING_RE

MAX_PREFIX = 1024  # characters; Azure's blob names are at most 1,024
MAX_SEGMENT = 256
# Column names that usually hold each field, compared in lower case without separators; the first found wins.
SUGGESTIONS = {"Email": ("email", "primaryemail", "emailaddress", "primaryemailaddress", "emailprimary"),
               "FirstName": ("firstname", "givenname", "forename"),
               "LastName": ("lastname", "surname", "familyname")}


def segments(svc: Services, params: Mapping[str, str]) -> Answer:
    """GET /api/sources/segments?connection=&container=&prefix=: each segment with its newest model.json."""
    container = _container(svc, params)
    if isinstance(container, tuple):
        return container
    found = _reading(lambda: list_segments(container, params.get("prefix", "")))
    if isinstance(found, tuple):
        return found
    return 200, {"segments": [{"name": s.name, "model": s.model, "modified": iso(s.modified.timestamp())}
                              for s in found]}


def columns(svc: Services, params: Mapping[str, str]) -> Answer:
    """GET /api/sources/columns?connection=&container=&prefix=&segment=: the columns of the segment's newest
    snapshot, each with its CDM dataType, and the columns suggested for Email, FirstName and LastName."""
    segment = params.get("segment", "")
    if not segment or len(segment) > MAX_SEGMENT:
        return error(400, f"query parameter segment must name a segment (1 to {MAX_SEGMENT} characters), given "
                           f"once; got {segment[:40]!r}")
    container = _container(svc, params)
    if isinstance(container, tuple):
        return container
    snapshot = _reading(lambda: find_snapshot(container, params.get("prefix", ""), segment))
    if isinstance(snapshot, tuple):
        return snapshot
    types = snapshot.types or (None,) * len(snapshot.columns)
    return 200, {"segment": segment, "model": snapshot.model, "snapshot": snapshot.id,
                 "columns": [{"name": n, "dataType": t} for n, t in zip(snapshot.columns, types, strict=True)],
                 "suggested": suggested(snapshot.columns)}


def suggested(names: tuple[str, ...]) -> dict[str, str | None]:
    """For each of Email, FirstName and LastName, the first column whose name is a usual one for it, or None."""
    by_key = {}
    for name in names:
        by_key.setdefault(re.sub(r"[^a-z0-9]", "", name.lower()), name)
    return {field: next((by_key[k] for k in keys if k in by_key), None) for field, keys in SUGGESTIONS.items()}


def _container(svc: Services, params: Mapping[str, str]) -> ContainerClient | Answer:
    """The container the query names, or 400 saying which value is wrong (the definitions' rules)."""
    setting = params.get("connection") or DEFAULT_CONNECTION
    if not SETTING_RE.fullmatch(setting) or not _has_setting(svc.settings.env, setting):
        return error(400, f"query parameter connection must name an app setting of this app that holds a storage "
                           f"connection (letters, digits, underscores), given once; no app setting {setting[:60]!r}")
    name = params.get("container", "")
    if not CONTAINER_RE.fullmatch(name):
        return error(400, "query parameter container must be a blob container name (3-63 lower-case letters, "
                           f"digits and single hyphens), given once; got {name[:70]!r}")
    if len(params.get("prefix", "")) > MAX_PREFIX:
        return error(400, f"query parameter prefix must be at most {MAX_PREFIX} characters")
    try:
        return svc.source_container(setting, name)
    except ValueError:  # not a connection string (the SDK's message may quote the value: not shown)
        return error(400, f"app setting {setting} does not hold a storage connection string or service URI")


def _has_setting(env: Mapping[str, str], setting: str) -> bool:
    """Whether the app has the setting in either form storage connections take (runtime/storage.py)."""
    return any((env.get(name) or "").strip() for name in
               (setting, f"{setting}__blobServiceUri", f"{setting}__serviceUri"))


def _reading(read):
    """read(), or the answer for what went wrong: 404 not there, 422 an export that cannot be read, 502 storage."""
    try:
        return read()
    except NotThere as exc:
        return error(404, str(exc))
    except ExportDataError as exc:
        return error(422, str(exc))
    except HttpResponseError as exc:
        return error(502, f"the export storage answered {exc.status_code} ({type(exc).__name__}): does the app's "
                           "identity have read access to it?")
    except AzureError as exc:
        return error(502, f"the export storage could not be reached ({type(exc).__name__})")

