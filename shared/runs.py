"""Starting a run of one export: find its newest snapshot, plan the difference, queue the batches; and the
timer's tick that starts runs for new snapshots."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import islice

from shared.autopilot_client import AutopilotError
from shared.batch_messages import BatchMessage
from shared.cdm_reader import ExportDataError, find_snapshot, read_rows
from shared.contacts import MappingError
from shared.delivery import queue_message
from shared.export_config import ExportConfigError, ExportDefinition
from shared.planner import BULK_LIMIT, Planner, TooManyProfiles
from shared.rate_budget import AHEAD, Deferred, Pacer
from shared.reports import REPORTS, conclude, finish_if_complete, is_synced
from shared.run_records import RunInProgress, new_run_id, run_log, utcnow
from shared.secrets import SecretUnavailable
from shared.services import Services
from shared.settings import SettingsError

log = logging.getLogger("autopilot.runs")
LOOKUP_WAIT = 30.0  # seconds a list-mode start may wait for its look-up's request slot
CHUNK = 32  # batches whose slots are reserved together: a few seconds of sending at 5 requests/s


class BudgetBooked(RuntimeError):
    """A list-mode run needs one request now (the list look-up), but other runs booked the budget far ahead."""


# Problems the user can fix: the run fails with this message instead of a stack trace.
USER_ERRORS = (ExportConfigError, ExportDataError, MappingError, TooManyProfiles, SettingsError, AutopilotError,
               SecretUnavailable, BudgetBooked)


class UnknownExport(LookupError):
    pass


def find_export(svc: Services, name: str) -> ExportDefinition:
    for export in svc.exports():
        if export.name == name:
            return export
    raise UnknownExport(f"no export named {name!r}")


def start_run(svc: Services, name: str, *, force: bool = False, dry_run: bool = False, trigger: str = "http") -> dict:
    """Plan a run and queue its batches; returns the run record. Raises UnknownExport, RunInProgress."""
    export = find_export(svc, name)
    run_id = new_run_id()
    svc.records.create(run_id, export.name, status="planning", trigger=trigger, force=force, dry_run=dry_run,
                       started=utcnow())
    rlog = run_log(run_id, export.name)
    try:
        taken_over = None if dry_run else svc.records.acquire(export.name, run_id, take_over=force)
    except RunInProgress:
        svc.records.delete(run_id)  # a refused start is no run: it must not show as the export's last run
        raise
    try:
        if taken_over:
            conclude(svc, taken_over[0], "failed", error=taken_over[1])
        _plan_and_queue(svc, export, run_id, force, dry_run, rlog)
    except USER_ERRORS as exc:
        rlog.error("run failed while planning: %s", exc)
        conclude(svc, run_id, "failed", error=str(exc))
    except Exception as exc:
        rlog.exception("run failed while planning")
        conclude(svc, run_id, "failed", error=f"internal error while planning: {type(exc).__name__}")
        raise
    return svc.records.get(run_id)


def _plan_and_queue(svc: Services, export: ExportDefinition, run_id: str, force: bool, dry_run: bool, rlog) -> None:
    export.check_runnable()
    container = svc.export_container(export)
    snapshot = find_snapshot(container, export.prefix, export.segment)
    svc.records.update(run_id, snapshot=snapshot.id, snapshot_time=snapshot.refresh_time or "")
    # A list-mode message holds about two seconds of per-contact requests, never more than a batch may hold.
    ops = min(BULK_LIMIT, max(1, int(2 * svc.budget.rate)))
    planner = Planner(export, list(snapshot.columns), list_ops_per_message=ops)
    try:
        plan = planner.plan(read_rows(container, snapshot), svc.state(export.name).load(), force=force)
        _save_rejections(svc, run_id, plan.rejections_file)
        summary = {"counts": plan.counts, "rejected_sample": plan.rejected_sample, "planned_requests": plan.requests,
                   "plan": {"samples": plan.samples,
                            "seconds_at_budget": round(plan.requests * svc.budget.interval, 1)}}
        if dry_run:
            svc.records.update(run_id, **summary)
            conclude(svc, run_id, "dry run")
            rlog.info("dry run: %s", plan.counts)
            return
        list_id = _resolve_list(svc, export) if export.membership == "list" else None
        svc.state(export.name).acknowledge(list(plan.kept_leavers()))
        svc.records.update(run_id, status="planned", list_id=list_id or "", planned_at=utcnow(), **summary)
        batches = _enqueue(svc, export, run_id, list_id, plan)
    finally:
        planner.close()
    svc.records.update(run_id, status="running", planned_batches=batches, queued_at=utcnow())
    rlog.info("queued %d batches, %d requests", batches, plan.requests)
    if batches == 0:
        finish_if_complete(svc, run_id)


def _save_rejections(svc: Services, run_id: str, path: str) -> None:
    with open(path, "rb") as data:
        svc.host.blob.get_blob_client(REPORTS, f"{run_id}/rejected.jsonl").upload_blob(data, overwrite=True)


def _resolve_list(svc: Services, export: ExportDefinition) -> str:
    # Planned requests start AHEAD seconds later, so this look-up (on a fresh connection, it may arrive late)
    # cannot bunch up with them inside one second.
    try:
        return svc.autopilot.resolve_list(export.list, Pacer(svc.budget, None, 0, max_wait=LOOKUP_WAIT))
    except Deferred as exc:
        free = datetime.fromtimestamp(exc.at, UTC).strftime("%H:%M:%S UTC")
        raise BudgetBooked(f"the Autopilot request budget is booked by other runs until {free}; the list "
                           f"{export.list!r} could not be looked up, so nothing was sent: start again after that "
                           "(the timer retries on its next tick)") from None


def _enqueue(svc: Services, export: ExportDefinition, run_id: str, list_id: str | None, plan) -> int:
    """Queue every batch, each delayed until just before its request slots. Slots are reserved a chunk at a
    time, right before the chunk is queued, so no slot passes while later messages are still being written."""
    interval = svc.budget.interval
    count = 0
    with ThreadPoolExecutor(8) as pool:
        batches = iter(plan.batches())
        while chunk := list(islice(batches, CHUNK)):
            slot = svc.budget.reserve(sum(b.requests for b in chunk), ahead=AHEAD)
            futures = []
            for batch in chunk:
                count += 1
                items = [{"k": i.key, "f": i.fingerprint, "m": i.member, "d": i.document} for i in batch.items]
                message = BatchMessage(run_id, export.name, count, batch.kind, items, list_id, slot, batch.requests)
                futures.append(pool.submit(queue_message, svc, message, slot))
                slot += batch.requests * interval
            for future in futures:
                future.result()
    return count


# --- the timer ------------------------------------------------------------------------------------
def scheduled_tick(svc: Services) -> list[str]:
    """Finish runs whose last batch was settled by a crashed instance, then start runs for new snapshots."""
    for run in svc.records.active():
        if run.get("status") == "running":
            finish_if_complete(svc, run["RowKey"])
    try:
        exports = svc.exports()
    except ExportConfigError as exc:  # the timer must not fail on every tick: say what to fix, once a tick
        log.error("no export started: the export definitions are invalid: %s", exc)
        return []
    started = []
    for export in (e for e in exports if e.enabled):
        try:
            if _has_new_snapshot(svc, export):
                started.append(start_run(svc, export.name, trigger="timer")["RowKey"])
        except RunInProgress as exc:
            log.info("export %s: %s", export.name, exc)
        except USER_ERRORS as exc:
            log.error("export %s not started: %s", export.name, exc)
        except Exception:  # one broken export must not keep the others from running
            log.exception("export %s not started", export.name)
    return started


def _has_new_snapshot(svc: Services, export: ExportDefinition) -> bool:
    snapshot = find_snapshot(svc.export_container(export), export.prefix, export.segment)
    for run in svc.records.for_export(export.name, limit=20):
        if run.get("snapshot") == snapshot.id and is_synced(run):
            return False
    return True
