"""Cancelling a run, or ending one that may have requests in flight: no request starts after the answer, batches
in flight settle, the unsent rest is counted as cancelled (or failed, for a run that ends as failed), and the
export is free at once.

A sender asks whether its run is still active before it waits for each request's slot (trusting a status read
at most STATUS_MAX_AGE s before, and waiting at most MAX_WAIT s for the slot), so the answer comes that long
after the run is marked `cancelling`: by then every sender has seen it. A request already on its way ends within
the client's timeouts, so quiet() s after the cancel nothing of the run can change: it is concluded `cancelled`
(the exact report from its outcomes, then its acknowledgements folded into the state) by a job queued with that
delay, by the timer, or by the export's next run, whose planning waits for it before it reads the state (so it
sends nothing the cancelled run got acknowledged). Nothing is booked ahead on the rate budget (a slot is taken
right before its request), so the next run's requests are not held back by the cancelled one's.
"""

from __future__ import annotations

import json
import math
import time

from shared.destinations.api_client import CONNECT_TIMEOUT
from shared.pipeline.reports import conclude, run_view
from shared.pipeline.sender import MAX_WAIT
from shared.services import Services, find_export
from shared.source.cdm_reader import find_snapshot
from shared.state.run_records import ACTIVE, CANCELLING, STATUS_MAX_AGE, utcnow

SEEN_BY_SENDERS = STATUS_MAX_AGE + MAX_WAIT + 0.25  # seconds after which no sender starts a request of the run


def quiet(svc: Services) -> float:
    """Seconds after a cancel when every request of the run has ended (the client's timeouts) and settled."""
    return SEEN_BY_SENDERS + CONNECT_TIMEOUT + svc.settings.request_timeout + 2.0


class NotCancellable(Exception):
    """The run has ended already."""


def cancel_run(svc: Services, run_id: str) -> dict:
    """Mark the run cancelling and answer once no sender will start a request of it."""
    run = svc.records.get(run_id) or {}
    if not svc.records.advance(run_id, ACTIVE, status=CANCELLING, cancel_requested=utcnow(),
                               cancelled_at=time.time()):
        raise NotCancellable(f"run {run_id} has already ended ({(svc.records.get(run_id) or run).get('status')})")
    _queue_conclusion(svc, run_id)
    if not run.get("snapshot"):  # cancelled before it was planned: the snapshot it stood for is the newest
        _note_snapshot(svc, run_id, run["export"])
    time.sleep(SEEN_BY_SENDERS)
    return run_view(svc, run_id)


def _note_snapshot(svc: Services, run_id: str, export: str) -> None:
    """So the timer leaves that snapshot alone (runs._has_new_snapshot)."""
    try:
        definition = find_export(svc, export)
        snapshot = find_snapshot(svc.export_container(definition), definition.prefix, definition.segment)
    except Exception:  # no definition or no readable export any more: nothing the timer could start either
        return
    svc.records.update(run_id, snapshot=snapshot.id, state=svc.destination(definition).id)


def end_run(svc: Services, run_id: str, status: str, error: str) -> None:
    """End an active run as `status` (a forced run superseded it, its key was refused, its planning failed or was
    cut short). A running run may have requests in flight: it stops as a cancel does and is concluded once they
    have ended and settled, so what they acknowledged is folded into the state before any later run plans (a
    conclusion at once would leave it out: the next run would send it again, or race it). A run still queued or
    planning has sent nothing: it is concluded at once."""
    if svc.records.advance(run_id, ("running",), status=CANCELLING, ends_as=status, end_error=error,
                           cancelled_at=time.time()):
        _queue_conclusion(svc, run_id)
        return
    if (svc.records.get(run_id) or {}).get("status") in ("queued", "planning"):
        conclude(svc, run_id, status, error=error)


def _queue_conclusion(svc: Services, run_id: str) -> None:
    svc.plan_queue.send_message(json.dumps({"run": run_id, "conclude": "cancelled"}).encode(),
                                visibility_timeout=math.ceil(quiet(svc)))


def unsent_reason(run: dict) -> str | None:
    """Why a stopping or ended run's unsent contacts were not sent: None for a cancel (they count as cancelled),
    else the reason they are reported failed with."""
    ends_as = run.get("ends_as") or run.get("status")
    if ends_as in (CANCELLING, "cancelled"):
        return None
    return f"run already ended ({ends_as}: {run.get('end_error') or run.get('error') or ''})"


def conclude_cancelled(svc: Services, run_id: str, wait: bool) -> bool:
    """Conclude a cancelling (or stopping) run once quiet() s have passed since its cancel (waiting for that if
    `wait`); False if it is not cancelling, or (not waiting) its quiet time has not come."""
    run = svc.records.get(run_id)
    if not run or run.get("status") != CANCELLING:
        return False
    left = float(run.get("cancelled_at", 0)) + quiet(svc) - time.time()
    if left > 0:
        if not wait:
            return False
        time.sleep(left)
    return conclude(svc, run_id, run.get("ends_as") or "cancelled",
                    error=run.get("end_error") or "cancelled on request")


def conclude_pending_cancels(svc: Services, pending_runs: list[str]) -> None:
    """Before planning reads the state: conclude (waiting for them) the cancelled runs it would fold."""
    for run_id in pending_runs:
        conclude_cancelled(svc, run_id, wait=True)
