"""A run of one export: plan and queue it, settle each batch, finish it, report it, replay its dead batches."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from shared import batch_messages
from shared.autopilot_client import ApiKeyRejected, AutopilotError
from shared.batch_messages import BatchMessage, MessageError
from shared.cdm_reader import ExportDataError, find_snapshot, read_rows
from shared.contacts import MappingError
from shared.export_config import ExportConfigError, ExportDefinition
from shared.planner import Planner, TooManyProfiles
from shared.rate_budget import LEAD, Pacer
from shared.run_records import ACTIVE, BatchOutcome, RunInProgress, new_run_id, utcnow
from shared.sender import MAX_WAIT, BatchSender, Progress, Requeue, fail_rest
from shared.services import Services
from shared.settings import SettingsError

log = logging.getLogger("autopilot.runs")
REPORTS = "reports"
DEAD = "dead"
# Problems the user can fix: the run fails with this message instead of a stack trace.
USER_ERRORS = (ExportConfigError, ExportDataError, MappingError, TooManyProfiles, SettingsError, AutopilotError)


class UnknownExport(LookupError):
    pass


class RunLog(logging.LoggerAdapter):
    """Every record names its run and export: in the text, and as custom dimensions in Application Insights."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {**self.extra, **kwargs.get("extra", {})}
        return f"[run {self.extra['run_id']} export {self.extra['export']}] {msg}", kwargs


def run_log(run_id: str, export: str) -> RunLog:
    return RunLog(log, {"run_id": run_id, "export": export})


# --- starting a run -------------------------------------------------------------------------------
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
    planner = Planner(export, list(snapshot.columns), list_ops_per_message=max(1, int(2 * svc.budget.rate)))
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
    pacer = Pacer(svc.budget, None, 0, max_wait=30.0)
    list_id = svc.autopilot.resolve_list(export.list, pacer)
    # The look-up opens a fresh connection, so it may reach Autopilot late and bunch up with the first planned
    # requests; one idle second of budget between them keeps every 1-second window inside the limit.
    svc.budget.reserve(math.ceil(svc.budget.rate))
    return list_id


def _enqueue(svc: Services, export: ExportDefinition, run_id: str, list_id: str | None, plan) -> int:
    """Queue every batch, each delayed until just before its reserved request slots."""
    slot = svc.budget.reserve(plan.requests) if plan.requests else time.time()
    interval = svc.budget.interval
    count = 0
    with ThreadPoolExecutor(8) as pool:
        futures = []
        for count, batch in enumerate(plan.batches(), start=1):
            items = [{"k": i.key, "f": i.fingerprint, "m": i.member, "d": i.document} for i in batch.items]
            message = BatchMessage(run_id, export.name, count, batch.kind, items, list_id, slot, batch.requests)
            futures.append(pool.submit(queue_message, svc, message, slot))
            slot += batch.requests * interval
            if len(futures) > 256:
                futures.pop(0).result()
        for future in futures:
            future.result()
    return count


def queue_message(svc: Services, message: BatchMessage, visible_at: float | None) -> None:
    delay = 0 if visible_at is None else max(0, int(visible_at - time.time() - LEAD))
    svc.queue.send_message(batch_messages.encode(message, svc.host.blob), visibility_timeout=delay or None)


# --- sending one batch ----------------------------------------------------------------------------
def process_batch(svc: Services, body: bytes, dequeue_count: int = 1) -> None:
    """The queue trigger's work. Malformed messages go to the poison queue with their reason."""
    try:
        message = batch_messages.decode(body, svc.host.blob)
    except MessageError as exc:
        log.error("rejected queue message: %s", exc)
        poison(svc, body, str(exc))
        return
    run = svc.records.get(message.run)
    if run is None:
        poison(svc, body, f"unknown run {message.run!r}")
        return
    if svc.records.has_batch(message.run, message.batch):
        return  # already settled: a redelivered message
    rlog = run_log(message.run, message.export)
    progress = _carried(message)
    if run.get("status") not in ACTIVE:
        fail_rest(message, progress, f"run already ended ({run.get('status')}: {run.get('error', '')})")
    else:
        if dequeue_count > 1 or message.attempt:
            _skip_acknowledged(svc, message, progress)
        if not _send(svc, message, progress, rlog):
            return
    _settle(svc, message, progress, rlog)


def _send(svc: Services, message: BatchMessage, progress: Progress, rlog) -> bool:
    """Send the batch; False when its rest was re-queued or parked as dead (the batch is not settled here)."""
    pacer = Pacer(svc.budget, message.at, message.slots, MAX_WAIT)
    sender = BatchSender(svc.autopilot, pacer, message, progress)
    try:
        sender.run()
    except Requeue as exc:
        svc.state(message.export).acknowledge(progress.acked)
        if message.attempt + 1 >= svc.settings.max_attempts and exc.slot is None:
            reason = f"gave up after {svc.settings.max_attempts} attempts: {exc.reason}"
            poison(svc, batch_messages.encode(_rest(message, progress), svc.host.blob), reason)
            rlog.warning("batch %d parked as dead (%s)", message.batch, reason)
            return False
        waiting = exc.slot is not None  # a slot wait is not a failed attempt
        again = _rest(message, progress, at=exc.slot, slots=1 if waiting else 0,
                      attempt=message.attempt + (0 if waiting else 1))
        queue_message(svc, again, exc.at)
        rlog.info("batch %d re-queued (%s)", message.batch, exc.reason)
        return False
    except ApiKeyRejected as exc:
        fail_rest(message, progress, exc.message)
        conclude(svc, message.run, "failed", error=f"{exc.message} (Key Vault secret {svc.api_key.secret_name!r})")
        rlog.error("API key rejected by Autopilot; run failed")
    return True


def _rest(message: BatchMessage, progress: Progress, **changes) -> BatchMessage:
    """The batch's unsettled items, carrying the outcome of the settled ones."""
    rest = [i for i in message.items if i["k"] not in progress.done]
    carry = {"accepted": message.carry.get("accepted", 0) + len(progress.acked),
             "refused": message.carry.get("refused", []) + progress.refused,
             "failed": message.carry.get("failed", []) + progress.failed}
    return message.with_items(rest, carry=carry, **changes)


def _carried(message: BatchMessage) -> Progress:
    carry = message.carry
    return Progress(refused=list(carry.get("refused", [])), failed=list(carry.get("failed", [])),
                    carried_accepted=carry.get("accepted", 0))


def _skip_acknowledged(svc: Services, message: BatchMessage, progress: Progress) -> None:
    """On redelivery, contacts Autopilot already acknowledged for this state are not sent again."""
    known = svc.state(message.export).lookup(i["k"] for i in message.items)
    for item in message.items:
        ack = known.get(item["k"])
        if ack and ack.fingerprint == item.get("f") and ack.member == bool(item.get("m", True)):
            progress.done.add(item["k"])
            progress.carried_accepted += 1


def _settle(svc: Services, message: BatchMessage, progress: Progress, rlog) -> None:
    svc.state(message.export).acknowledge(progress.acked)
    outcome = BatchOutcome(
        batch=message.batch, kind=message.kind, status="done", contacts=len(message.items) + _carry_size(message),
        accepted=len(progress.acked) + progress.carried_accepted, rejected=len(progress.refused),
        failed=len(progress.failed), detail=progress.refused + progress.failed)
    if svc.records.record_batch(message.run, outcome):
        rlog.info("batch %d settled: %d accepted, %d refused, %d failed", message.batch, outcome.accepted,
                  outcome.rejected, outcome.failed)
        after_batch(svc, message.run)


def _carry_size(message: BatchMessage) -> int:
    carry = message.carry
    return carry.get("accepted", 0) + len(carry.get("refused", [])) + len(carry.get("failed", []))


# --- dead batches ---------------------------------------------------------------------------------
def poison(svc: Services, body: bytes, reason: str) -> None:
    wrapped = json.dumps({"poison_reason": reason, "body": body.decode("utf-8", "replace")}).encode()
    svc.poison_queue.send_message(wrapped)


def record_dead(svc: Services, body: bytes) -> None:
    """The poison trigger: keep the dead message, and settle its batch as failed on its run."""
    reason, original = _unwrap(body)
    try:
        message = batch_messages.decode(original, svc.host.blob)
    except MessageError as exc:
        name = f"unreadable/{utcnow()[:10]}/{uuid.uuid4().hex}.json"
        svc.host.blob.get_blob_client(DEAD, name).upload_blob(json.dumps({"reason": reason or str(exc),
                                                                          "body": original.decode("utf-8", "replace")}))
        log.error("dead queue message kept as %s/%s: %s", DEAD, name, reason or exc)
        return
    reason = reason or "the batch failed on every delivery (maxDequeueCount reached; see the function's logs)"
    svc.host.blob.get_blob_client(DEAD, f"{message.run}/{message.batch:06d}.json").upload_blob(
        json.dumps(asdict(message)), overwrite=True)
    progress = _carried(message)
    fail_rest(message, progress, f"dead batch: {reason}")
    run_log(message.run, message.export).error("batch %d is dead: %s", message.batch, reason)
    outcome = BatchOutcome(message.batch, message.kind, "dead", len(message.items) + _carry_size(message),
                           progress.carried_accepted, len(progress.refused), len(progress.failed),
                           progress.refused + progress.failed, reason)
    if svc.records.get(message.run) and svc.records.record_batch(message.run, outcome):
        after_batch(svc, message.run)


def _unwrap(body: bytes) -> tuple[str, bytes]:
    try:
        data = json.loads(body)
        if isinstance(data, dict) and "poison_reason" in data:
            return str(data["poison_reason"]), str(data.get("body", "")).encode()
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    return "", body


def replay(svc: Services, run_id: str) -> int:
    """Put a run's dead batches back on the queue; returns how many."""
    outcomes = svc.records.batch_outcomes(run_id)
    dead = [o for o in outcomes if o.get("status") == "dead"]
    for outcome in dead:
        batch = int(outcome["RowKey"])
        data = json.loads(svc.host.blob.get_blob_client(DEAD, f"{run_id}/{batch:06d}.json").download_blob().readall())
        message = BatchMessage(**dict(data, at=None, slots=0, attempt=0))
        svc.records.forget_batch(run_id, batch)
        queue_message(svc, message, None)
    if dead:
        svc.records.update(run_id, status="running", finished="", done=len(outcomes) - len(dead))
    return len(dead)


# --- finishing ------------------------------------------------------------------------------------
def after_batch(svc: Services, run_id: str) -> None:
    done = svc.records.count_done(run_id)
    run = svc.records.get(run_id)
    if run and done >= int(run.get("planned_batches", 1 << 30)):
        finish_if_complete(svc, run_id)


def finish_if_complete(svc: Services, run_id: str) -> bool:
    """Finish the run once every planned batch has an outcome (exact, from the outcomes themselves)."""
    run = svc.records.get(run_id)
    if not run or run.get("status") not in ("running",):
        return False
    outcomes = svc.records.batch_outcomes(run_id)
    if len(outcomes) < int(run.get("planned_batches", 0)):
        return False
    totals = delivery_totals(outcomes)
    status = "succeeded" if not totals["failed"] and not totals["refused"] else (
        "partially succeeded" if totals["accepted"] else "failed")
    if conclude(svc, run_id, status, delivery=json.dumps(totals)):
        run_log(run_id, run["export"]).info("run %s: %s", status, totals)
    return True


def delivery_totals(outcomes: list[dict]) -> dict:
    keys = ("contacts", "accepted", "rejected", "failed")
    totals = {k: sum(int(o.get(k, 0)) for o in outcomes) for k in keys}
    totals["refused"] = totals.pop("rejected")
    totals["sent"] = totals.pop("contacts")
    totals["dead_batches"] = sum(1 for o in outcomes if o.get("status") == "dead")
    return totals


def run_view(svc: Services, run_id: str) -> dict | None:
    """What GET /api/runs/{id} shows: status, counts, timings, samples, where the full reports are."""
    run = svc.records.get(run_id)
    if run is None:
        return None
    outcomes = svc.records.batch_outcomes(run_id) if run.get("status") not in ("dry run", "planning") else []
    delivery = delivery_totals(outcomes)
    problems = [d for o in outcomes for d in o.get("outcome", [])][:20]
    counts = dict(run.get("counts") or {})
    return {
        "runId": run_id, "export": run["export"], "status": run.get("status"), "trigger": run.get("trigger"),
        "dryRun": bool(run.get("dry_run")), "force": bool(run.get("force")), "snapshot": run.get("snapshot"),
        "error": run.get("error") or None,
        "counts": {**counts, **delivery},
        "batches": {"planned": int(run.get("planned_batches", 0)), "settled": len(outcomes),
                    "dead": delivery["dead_batches"]},
        "plannedRequests": run.get("planned_requests"),
        "plan": run.get("plan") or {},
        "timings": {k: run.get(k) for k in ("created", "started", "planned_at", "queued_at", "finished") if run.get(k)},
        "rejectedSample": run.get("rejected_sample") or [],
        "deliveryProblems": problems,
        "reports": {"rejectedRows": f"{REPORTS}/{run_id}/rejected.jsonl", "report": f"{REPORTS}/{run_id}/report.json"},
    }


def conclude(svc: Services, run_id: str, status: str, error: str = "", **fields) -> bool:
    """Write the run's final report, then mark it finished, so a finished run always has its report.
    False if the run had already finished."""
    write_report(svc, run_id, status, error)
    return svc.records.finish(run_id, status, error=error, **fields)


def write_report(svc: Services, run_id: str, status: str, error: str) -> None:
    view = run_view(svc, run_id)
    view.update(status=status, error=error or view["error"])
    view["timings"]["finished"] = utcnow()
    view["deliveryProblems"] = [d for o in svc.records.batch_outcomes(run_id) for d in o.get("outcome", [])]
    svc.host.blob.get_blob_client(REPORTS, f"{run_id}/report.json").upload_blob(
        json.dumps(view, indent=2), overwrite=True)


# --- the timer ------------------------------------------------------------------------------------
def scheduled_tick(svc: Services) -> list[str]:
    """Finish runs whose last batch was settled by a crashed instance, then start runs for new snapshots."""
    for run in svc.records.active():
        if run.get("status") == "running":
            finish_if_complete(svc, run["RowKey"])
    started = []
    for export in svc.exports():
        if not export.enabled:
            continue
        try:
            if _has_new_snapshot(svc, export):
                started.append(start_run(svc, export.name, trigger="timer")["RowKey"])
        except RunInProgress as exc:
            log.info("export %s: %s", export.name, exc)
        except USER_ERRORS as exc:
            log.error("export %s not started: %s", export.name, exc)
    return started


def _has_new_snapshot(svc: Services, export: ExportDefinition) -> bool:
    snapshot = find_snapshot(svc.export_container(export), export.prefix, export.segment)
    for run in svc.records.for_export(export.name, limit=20):
        if run.get("snapshot") == snapshot.id and is_synced(run):
            return False
    return True


def is_synced(run: dict) -> bool:
    """A snapshot counts as synced once every contact reached Autopilot or was refused by it."""
    if run.get("status") == "succeeded":
        return True
    delivery = json.loads(run.get("delivery") or "{}")
    return run.get("status") == "partially succeeded" and not delivery.get("failed")
