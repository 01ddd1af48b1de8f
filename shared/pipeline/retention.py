"""Nothing grows for ever: the timer's hourly sweep of what no lifecycle rule deletes.

Blobs of runs (reports/, batches/, dead/) expire by infra's lifecycle rule after RETENTION_DAYS; Table storage and
queues have no such rule. The sweep deletes the records of runs that finished longer ago than that (the run, its
index entry, its batch outcomes, its planned acknowledgements), and keeps in dead/unhandled/ (which expires) the
messages the host moved to the poison queues' own poison queues, which no function reads. Each sweep is bounded,
so a backlog is worked off a tick at a time.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from itertools import islice

from azure.core.exceptions import ResourceNotFoundError

from shared.pipeline.delivery import DEAD
from shared.runtime.settings import UNHANDLED_QUEUES
from shared.services import Services
from shared.state.run_records import FINISHED, run_log, utcnow

log = logging.getLogger("autopilot.retention")
EVERY = 3600.0  # seconds between an instance's sweeps
# An export's newest runs are always kept, however old: the timer reads the newest 20 to tell whether a snapshot
# was synced and to back off failed retries (runs._has_new_snapshot), and a replay to refuse one (delivery).
KEPT_PER_EXPORT = 20
RUNS_PER_SWEEP = 50  # runs deleted at most per sweep
OUTCOMES_PER_SWEEP = 20_000  # no run is begun after this many outcomes were deleted (200 transactions)
EXAMINED_PER_SWEEP = 2000  # old runs looked at at most per sweep (the newest of exports that rarely run are kept)
MESSAGES_PER_SWEEP = 100  # messages taken at most from each unhandled queue per sweep

_swept_at: float | None = None  # monotonic time of this instance's last sweep


def sweep_if_due(svc: Services) -> dict | None:
    """Sweep once an hour per instance (a timer tick calls this); None between sweeps."""
    global _swept_at
    now = time.monotonic()
    if _swept_at is not None and now - _swept_at < EVERY:
        return None
    _swept_at = now  # set first: a failing sweep is not tried again on every tick
    return sweep(svc)


def sweep(svc: Services) -> dict:
    """Delete what is past retention and keep what the unhandled queues hold; returns how many of each."""
    removed = {"runs": 0, "outcomes": 0, "unhandled": 0}
    cutoff = datetime.now(UTC) - timedelta(days=svc.settings.retention_days)
    for run_id, export in islice(_expired(svc, cutoff.isoformat(timespec="milliseconds")[:23] + "Z"),
                                 RUNS_PER_SWEEP):
        if removed["outcomes"] >= OUTCOMES_PER_SWEEP:
            break
        try:
            removed["outcomes"] += delete_run(svc, run_id, export)
            removed["runs"] += 1
        except Exception:  # one run's trouble must not keep the others: it is tried again on the next sweep
            run_log(run_id, export).exception("the retention sweep could not delete the run")
    for queue in UNHANDLED_QUEUES:
        removed["unhandled"] += drain(svc, queue)
    if any(removed.values()):
        log.info("retention sweep (%d days) removed %s", svc.settings.retention_days, removed)
    return removed


def _expired(svc: Services, cutoff: str):
    """(run id, export) of the finished runs older than `cutoff` that may go: not among their export's newest
    KEPT_PER_EXPORT, and none of their acknowledgements still pending a fold. Such a run stays finished: a replay
    is refused once 20 newer runs exist."""
    kept: dict[str, set[str]] = {}
    for run in islice(svc.records.finished_before(cutoff), EXAMINED_PER_SWEEP):
        export = run.get("export") or ""
        if run.get("status") not in FINISHED or not export:
            continue
        if export not in kept:
            pending = {p["run"] for p in svc.state(export).head()[0]["pending"]}
            kept[export] = pending | set(svc.records.newest(export, KEPT_PER_EXPORT))
        if run["RowKey"] not in kept[export]:
            yield run["RowKey"], export


def delete_run(svc: Services, run_id: str, export: str) -> int:
    """Delete a run's outcomes, planned acknowledgements, index entry and record (that last: a delete cut short
    is found again); returns how many outcomes."""
    outcomes = svc.records.delete_outcomes(run_id)
    svc.state(export).drop_planned(run_id)
    svc.records.delete(run_id, export)
    return outcomes


def drain(svc: Services, queue: str) -> int:
    """Keep each message of an unhandled queue as a blob dead/unhandled/<day>/<uuid>.json, then delete it;
    returns how many. Its body is never logged (it may hold contact documents)."""
    count = 0
    with svc.host.queue(queue, base64=False) as client:
        try:
            for message in client.receive_messages(max_messages=MESSAGES_PER_SWEEP, visibility_timeout=300):
                name = f"unhandled/{utcnow()[:10]}/{uuid.uuid4().hex}.json"
                svc.host.blob.get_blob_client(DEAD, name).upload_blob(json.dumps({
                    "queue": queue, "id": message.id, "inserted_on": str(message.inserted_on),
                    "dequeue_count": message.dequeue_count, "body": _text(message.content)}))
                log.error("a message on %s failed its poison handler on every delivery: kept as %s/%s (queued %s)",
                          queue, DEAD, name, message.inserted_on)
                client.delete_message(message)
                count += 1
        except ResourceNotFoundError:
            pass  # the host makes the queue when it first moves a message there
    return count


def _text(content: str) -> str:
    """The message's body: base64 as the host writes it, decoded; as it is otherwise."""
    try:
        return base64.b64decode(content, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return content
