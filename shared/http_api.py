"""The HTTP API's logic, free of Azure types: path values and body bytes in, (status, JSON body) out.

Every answer is JSON. Names and run ids are checked against strict patterns before they reach storage,
so no path or query can be smuggled through them; nothing returned holds a secret or a full profile.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from itertools import islice
from urllib.parse import urlsplit

from azure.core.exceptions import ResourceNotFoundError

from shared import api_roles, connection_check, definitions_edit, services, source_browse
from shared.api_answers import Answer, error
from shared.pipeline import cancels, delivery, reports, runs
from shared.runtime.settings import SettingsError, api_authentication
from shared.services import Services, UnknownExport, find_export
from shared.source.export_config import ExportConfigError
from shared.state.run_records import RunInProgress

log = logging.getLogger("autopilot.http")

MAX_BODY = 16 * 1024
EXPORT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
RUN_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")  # (not \d: it matches any script's digits)
WHOLE_NUMBER = re.compile(r"[0-9]{1,6}")
RUN_OPTIONS = {"dryRun", "force"}


def _is_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"



def start_run(svc: Services, name: str, body: bytes) -> Answer:
    """POST /api/exports/{name}/runs: 202 with the run id and status URL as soon as the run is queued for
    planning (a dry run too: its report appears on the run view); 400/404/409/422 with the reason."""
    if not EXPORT_NAME.fullmatch(name or ""):
        return error(404, f"no export named {name[:80]!r}")
    options = _run_options(body)
    if isinstance(options, str):
        return error(400, options)
    try:
        export = find_export(svc, name)
        export.check_runnable()
        run = runs.start_run(svc, export.name, force=options.get("force", False),
                             dry_run=options.get("dryRun", False), trigger="http")
    except UnknownExport as exc:
        return error(404, str(exc))
    except RunInProgress as exc:
        return error(409, str(exc), runId=exc.run_id, statusUrl=f"/api/runs/{exc.run_id}")
    except ExportConfigError as exc:
        return error(422, str(exc))
    return 202, {**reports.run_view(svc, run["RowKey"], run), "statusUrl": f"/api/runs/{run['RowKey']}"}


def _run_options(body: bytes) -> dict | str:
    """The run options, or a message saying what is wrong with the body."""
    if len(body) > MAX_BODY:
        return f"request body is {len(body)} bytes; at most {MAX_BODY} are accepted"
    if not body.strip():
        return {}
    try:
        options = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"request body is not valid JSON: {str(exc)[:200]}"
    if not isinstance(options, dict):
        return 'request body must be a JSON object such as {"dryRun": true}'
    unknown = sorted(set(options) - RUN_OPTIONS)
    if unknown:
        return f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(RUN_OPTIONS))}"
    wrong = [k for k, v in options.items() if not isinstance(v, bool)]
    if wrong:
        return f"option(s) {', '.join(wrong)} must be true or false"
    return options


def get_run(svc: Services, run_id: str) -> Answer:
    """GET /api/runs/{id}: status, counts, timings, samples, where the reports are, and the dead batches."""
    run = svc.records.get(run_id) if RUN_ID.fullmatch(run_id or "") else None
    if run is None:
        return error(404, f"no run with id {run_id[:80]!r}")
    view = reports.run_view(svc, run_id, run)
    return 200, {**view, "deadBatchList": reports.dead_batches(svc, run, view)}


REJECTED_MOST = 50_000  # rows one answer holds (about 5 MB); the report blob keeps every one


def rejected_rows(svc: Services, run_id: str) -> Answer:
    """GET /api/runs/{id}/rejected: every row the run's planning rejected (partition, row, reason, the email masked
    as in reports), in file order, at most REJECTED_MOST; `truncated` says whether more are in the report."""
    if not RUN_ID.fullmatch(run_id or "") or svc.records.get(run_id) is None:
        return error(404, f"no run with id {run_id[:80]!r}")
    blob = svc.host.blob.get_blob_client(reports.REPORTS, f"{run_id}/rejected.jsonl")
    try:
        lines = [line for line in blob.download_blob().readall().decode().splitlines() if line.strip()]
    except ResourceNotFoundError:  # not planned yet, or planned before rejected rows were kept
        lines = []
    rows = [json.loads(line) for line in islice(lines, REJECTED_MOST)]
    return 200, {"runId": run_id, "rows": rows, "truncated": len(lines) > len(rows)}


def list_exports(svc: Services) -> Answer:
    """GET /api/exports: each definition (no secrets live in it), its latest run, when the timer next looks for a
    new snapshot of an enabled export (`nextStart`) and, while the timer backs off after failed runs on that run's
    snapshot, when it tries again (`nextAttempt`)."""
    exports = []
    tick = runs.next_tick(svc.settings.env, datetime.now(UTC))
    for export in svc.exports():
        recent = svc.records.for_export(export.name, limit=20)
        summary = None
        if recent:
            last = recent[0]
            summary = {"runId": last["RowKey"], **{k: last.get(k) for k in ("status", "snapshot", "finished")},
                       "error": last.get("error") or None}
            retry_at = runs.retry_time([r for r in recent if r.get("snapshot") == last.get("snapshot")])
            summary["nextAttempt"] = runs.iso(retry_at) if retry_at else None
        next_start = runs.iso(tick.timestamp()) if tick and export.enabled else None
        exports.append({**export.public(), "lastRun": summary, "nextStart": next_start})
    return 200, {"exports": exports}


HISTORY_LIMIT = 100


def list_runs(svc: Services, name: str, params: dict) -> Answer:
    """GET /api/exports/{name}/runs?limit=20&before=<run id>: the export's runs, newest first (status, snapshot,
    counts, timings), and the URL of the next older page while there may be one."""
    if not EXPORT_NAME.fullmatch(name or "") or not any(e.name == name for e in svc.exports()):
        return error(404, f"no export named {name[:80]!r}")
    limit, before = params.get("limit", "20"), params.get("before") or None
    if not WHOLE_NUMBER.fullmatch(limit) or not 1 <= int(limit) <= HISTORY_LIMIT:
        return error(400, f"query parameter limit must be a whole number from 1 to {HISTORY_LIMIT} in ASCII digits, "
                           f"given once; not {limit[:20]!r}")
    if before is not None and not RUN_ID.fullmatch(before):
        return error(400, f"query parameter before must be a run id, given once; not {before[:40]!r}")
    found = svc.records.for_export(name, limit=int(limit), before=before)
    views = [reports.run_view(svc, run["RowKey"], run) for run in found]
    history = [{k: view[k] for k in HISTORY_FIELDS} for view in views]
    more = f"/api/exports/{name}/runs?limit={limit}&before={history[-1]['runId']}" if len(history) == int(limit) \
        else None
    return 200, {"export": name, "runs": history, "next": more}


HISTORY_FIELDS = ("runId", "status", "trigger", "dryRun", "force", "snapshot", "destination", "error", "counts",
                  "batches", "plannedRequests", "timings")


def replay_run(svc: Services, run_id: str) -> Answer:
    """POST /api/runs/{id}/replay: put the run's dead batches back on the queue; 409 when a newer run of the
    export synced since."""
    return _on_run(svc, run_id, delivery.ReplayRefused, lambda: (200, {
        "runId": run_id, "replayedBatches": delivery.replay(svc, run_id), "statusUrl": f"/api/runs/{run_id}"}))


def cancel_run(svc: Services, run_id: str) -> Answer:
    """POST /api/runs/{id}/cancel: stop the run; the answer comes once no request of it will start (a few
    seconds); it ends `cancelled` when its requests in flight have settled. 409 when it has ended already."""
    return _on_run(svc, run_id, cancels.NotCancellable, lambda: (202, {
        **cancels.cancel_run(svc, run_id), "statusUrl": f"/api/runs/{run_id}"}))


def _on_run(svc: Services, run_id: str, refused: type[Exception], act: Callable[[], Answer]) -> Answer:
    """A POST on one run: 404 when there is no such run, 409 with the reason when `act` raises `refused`."""
    if not RUN_ID.fullmatch(run_id or "") or svc.records.get(run_id) is None:
        return error(404, f"no run with id {run_id[:80]!r}")
    try:
        return act()
    except refused as exc:
        return error(409, str(exc))


# --- the console's: who am I, connections, definitions, sources ------------------------------------------------
def whoami(svc: Services, headers: Mapping[str, str]) -> Answer:
    """GET /api/me: how callers authenticate and the roles this caller holds (each role with those it includes), so
    the console offers only what the caller may do. Any authenticated caller: guarded has refused one without a
    principal, and a principal holding no role learns that it holds none."""
    if api_authentication(svc.settings.env) != "entra":  # a function key may call every route
        return 200, {"authentication": "key", "roles": list(api_roles.ROLES), "principalId": None}
    held = api_roles.principal_roles(headers.get(api_roles.PRINCIPAL_HEADER, ""))
    object_id = headers.get(api_roles.PRINCIPAL_ID_HEADER, "")
    return 200, {"authentication": "entra", "roles": api_roles.effective_roles(held),
                 "principalId": object_id if api_roles.OBJECT_ID.fullmatch(object_id) else None}


def list_connections(svc: Services) -> Answer:
    """GET /api/connections: each destination connection as in force, its exports and whether its key is readable."""
    return 200, connection_check.list_connections(svc)


def test_connection(svc: Services, name: str) -> Answer:
    """POST /api/connections/{name}/test: one harmless read with the connection's key; 404 for an unknown name."""
    if not EXPORT_NAME.fullmatch(name or ""):
        return error(404, f"no connection named {name[:80]!r}")
    try:
        return 200, connection_check.test_connection(svc, name)
    except connection_check.UnknownConnection as exc:
        return error(404, str(exc))


def get_definitions(svc: Services) -> Answer:
    """GET /api/definitions: the definitions document as stored, its etag, and whether the console may edit it."""
    return definitions_edit.get_definitions(svc)


def save_export(svc: Services, name: str, body: bytes, if_match: str | None, if_none_match: str | None) -> Answer:
    """PUT /api/definitions/exports/{name}: replace or add one export (If-Match: the etag it was edited on)."""
    return _save(svc, "export", name, body, if_match, if_none_match)


def save_connection(svc: Services, name: str, body: bytes, if_match: str | None,
                    if_none_match: str | None) -> Answer:
    """PUT /api/definitions/connections/{name}: replace or add one connection (If-Match as for an export)."""
    return _save(svc, "connection", name, body, if_match, if_none_match)


def _save(svc: Services, kind: str, name: str, body: bytes, if_match: str | None, if_none_match: str | None) -> Answer:
    if not EXPORT_NAME.fullmatch(name or ""):
        return error(400, f"a {kind} name is 1-63 lower-case letters, digits or hyphens, starting with a letter or "
                           f"digit; not {name[:80]!r}")
    return definitions_edit.save_item(svc, kind, name, body, if_match, if_none_match)


def list_segments(svc: Services, params: dict) -> Answer:
    """GET /api/sources/segments?connection=&container=&prefix=: the segments of an export container."""
    return source_browse.segments(svc, params)


def list_columns(svc: Services, params: dict) -> Answer:
    """GET /api/sources/columns?connection=&container=&prefix=&segment=: a segment's columns and suggestions."""
    return source_browse.columns(svc, params)


WRITES = ("POST", "PUT", "DELETE")  # methods that change something: their bodies must be JSON


def guarded(method: str, headers: Mapping[str, str], call, *args) -> Answer:
    """Run one API call with the process's services; a configuration problem becomes a 500 that says what to
    fix, never a stack trace. With Entra ID authentication the platform has checked the caller's token and
    forwards who it is and its app roles: the call runs only for a principal holding the role it needs.
    A POST, PUT or DELETE must say its body is JSON (body or none): a browser sends a form or text cross-site
    without asking, but asks the API first (CORS) before it sends JSON (and before any PUT or DELETE), so no page
    can start, cancel or replay a run, or change a definition. A browser's write from another site is refused
    even so (CORS could be opened by a setting one day, and the platform's session cookie goes cross-site)."""
    writes = method.upper() in WRITES
    if writes and not _is_json(headers.get("content-type", "")):
        return error(415, f"a {method.upper()} to this API must carry Content-Type: application/json (its body, if "
                           f"any, is JSON), not {headers.get('content-type', 'none')[:60]!r}")
    if writes and _cross_site(headers):
        return error(403, "a browser sent this from another site (Origin or Sec-Fetch-Site says so): the API takes "
                           "changes only from its own console or from scripts")
    try:
        svc = services.current()
        if api_authentication(svc.settings.env) == "entra":
            refused = _role_refusal(headers, call.__name__)
            if refused is not None:
                return refused
        return call(svc, *args)
    except (SettingsError, ExportConfigError) as exc:
        log.error("configuration problem: %s", exc)
        return error(500, f"the app is misconfigured: {exc}")


def _cross_site(headers: Mapping[str, str]) -> bool:
    """Whether a browser says the request comes from a page of another site: Sec-Fetch-Site (every current
    browser), else an Origin that is not this host. Scripts send neither."""
    fetch_site = headers.get("sec-fetch-site", "").strip().lower()
    if fetch_site:
        return fetch_site not in ("same-origin", "none")
    origin = headers.get("origin", "").strip()
    if not origin:
        return False
    host = headers.get("x-forwarded-host") or headers.get("host", "")
    return origin == "null" or urlsplit(origin).netloc.lower() != host.strip().lower()


def _role_refusal(headers: Mapping[str, str], operation: str) -> Answer | None:
    """401 or 403 unless the principal the platform forwards holds the app role the operation needs (the
    platform drops any principal header a client sends and sets its own: see shared/api_roles.py). An
    operation without a line in OPERATION_ROLES is refused too, so a route added without one opens to nobody."""
    try:
        refused = api_roles.refusal(headers, operation)
    except api_roles.UndeclaredOperation as exc:
        log.error("%s", exc)
        return error(500, str(exc))
    if refused is None:
        return None
    status, message = refused
    # The object id names who was refused (no token, no name: the name may be an email address).
    log.warning("refused %s (%s) to principal %s", operation, status,
                headers.get(api_roles.PRINCIPAL_ID_HEADER, "none")[:40])
    return error(status, message)
