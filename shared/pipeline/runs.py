"""Runs of one export: starting one (a record and a queued planning job), planning it (newest snapshot, the
difference against the acknowledged state, the batches kept in page blobs), queueing its batches a window at a
time as sending advances, and the timer's tick that starts runs for new snapshots."""

from __future__ import annotations

import gzip
import json
import logging
import posixpath
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice

from azure.core.exceptions import ResourceNotFoundError
from croniter import croniter

from shared.destinations.api_client import ApiError, Throttled, Transient
from shared.destinations.rate_budget import Deferred, Pacer, RateBudget
from shared.destinations.secrets import SecretUnavailable
from shared.pipeline import cancels
from shared.pipeline.batch_messages import BatchMessage, warm_up
from shared.pipeline.delivery import queue_delay, queue_message, requeue_dead
from shared.pipeline.planner import MassRemoval, Planner, TooManyProfiles, list_ops_for, removal_guard
from shared.pipeline.reports import REPORTS, conclude, finish_if_complete, fold_state, is_synced
from shared.runtime import signals
from shared.runtime.settings import DEFAULT_SCHEDULE, SettingsError
from shared.services import Services, UnknownExport, find_export
from shared.source.cdm_reader import ExportDataError, find_snapshot, read_records, records_fit
from shared.source.contacts import MappingError, mask_emails_in
from shared.source.export_config import DEFAULT_CONNECTION, ExportConfigError, ExportDefinition
from shared.state.run_records import ACTIVE, CANCELLING, REPLAYS, RUN_ID_RE, RunInProgress, new_run_id, run_log, utcnow
from shared.state.state_store import Snapshot, StateUnreadable

log = logging.getLogger("autopilot.runs")
LOOKUP_WAIT = 30.0  # seconds a list-mode start may wait for its look-up's request slot
PREPARE_TRIES = 5  # a destination's preparation met with 5xx, timeouts or 429s is tried again this many times
# Batches are queued a page at a time, each visible shortly before its estimated turn; the next page is queued when
# this one starts to be sent, or WINDOW_LEAD s before it ends if it lasts longer (list mode), its turns following on
# from this page's. So the queue holds about two pages: the length Flex Consumption's target-based scaling divides
# by host.json's batchSize (docs/architecture: one or two instances per run, not one per 16 batches of the whole
# run). (A streamed first sync's first page is queued once its first PAGE batches are planned.)
PAGE = 50
WINDOW_LEAD = 20.0
STUCK_AFTER = 30 * 60  # seconds a running run may go without any change to its record before it is taken over
TAKE_OVER_MARGIN = 20.0  # seconds more than its queued originals need before a taken-over batch's copy shows
PAGE_WAIT = 10.0  # seconds a window job waits in its invocation for a page a streamed first sync is writing
STREAM_AHEAD, STREAM_PACED = 3.0, 240.0  # a streamed first sync's lead over sending, and how long it keeps it
RETRY_FIRST, RETRY_MAX = 15 * 60.0, 24 * 3600.0  # the timer's pauses after failed runs on one snapshot
PLAN_CONTAINER = "batches"
STREAM_CUT_SHORT = ("the export was refreshed while this run's first sync was sent and its planning was cut short: "
                    "what was acknowledged is kept and the next run sends the rest")


class RunEnded(Exception):
    """The run ended (superseded, failed) while it was planned: planning stops."""


class TooManyRecords(Exception):
    """A first sync's snapshot has more records than maxProfiles: it is not streamed (its valid profiles may still
    fit; planning it whole finds out, and nothing was sent)."""


class BudgetBooked(RuntimeError):
    """A list-mode run needs one request now (the list look-up), but other runs booked the budget far ahead."""


# Problems the user can fix: the run fails with this message instead of a stack trace.
USER_ERRORS = (ExportConfigError, ExportDataError, MappingError, TooManyProfiles, SettingsError, ApiError,
               SecretUnavailable, BudgetBooked, StateUnreadable, MassRemoval)


def start_run(svc: Services, name: str, *, force: bool = False, dry_run: bool = False, trigger: str = "http") -> dict:
    """Record a run and queue its planning job; returns the run record at once, whatever the segment's size.
    Raises UnknownExport, RunInProgress."""
    export = find_export(svc, name)
    run_id = new_run_id()
    svc.records.create(run_id, export.name, status="queued", trigger=trigger, force=force, dry_run=dry_run,
                       started=utcnow())
    try:
        taken_over = None if dry_run else svc.records.acquire(export.name, run_id, take_over=force)
    except RunInProgress:
        svc.records.delete(run_id)  # a refused start is no run: it must not show as the export's last run
        raise
    try:
        if taken_over:
            cancels.end_run(svc, taken_over[0], "failed", taken_over[1])
        svc.plan_queue.send_message(json.dumps({"run": run_id}).encode())
    except Exception as exc:
        run_log(run_id, export.name).exception("run could not be queued for planning")
        conclude(svc, run_id, "failed", error=f"internal error while queueing the run: {type(exc).__name__}")
        raise
    return svc.records.get(run_id)


def handle_plan_message(svc: Services, body: bytes, dequeue_count: int = 1) -> None:
    """The planning queue's trigger: plan a queued run ({"run"}), or queue the next window of its batches
    ({"run", "page"}). Redelivered messages finish the same run: planning again gives the same plan, and the
    batches a redelivered job queues are marked as maybe queued (and settled) before."""
    job = _plan_job(body)
    if job is None:
        return
    if "conclude" in job:  # a cancelled run, once its last requests have ended
        cancels.conclude_cancelled(svc, job["run"], wait=True)
        return
    run = svc.records.get(job["run"])
    if run is None or run.get("status") not in ACTIVE:
        log.info("planning job for run %s skipped: %s", job["run"], (run and run.get("status")) or "no such run")
        return
    if "page" in job:
        queue_window(svc, run, job["page"], again=dequeue_count > 1, start=job.get("at", 0.0))
    elif run["status"] == "running" and not run.get("streaming"):  # planned before a crash: its first window
        queue_window(svc, run, 0, again=True)
    else:  # (a streamed first sync cut short is planned again, the same way: its pages are the same)
        plan_run(svc, run)


def fail_planning(svc: Services, body: bytes) -> None:
    """A planning job the host gave up on (maxDequeueCount): fail its run, unless it already ended."""
    job = _plan_job(body)
    if job is not None and (run := svc.records.get(job["run"])) and run.get("status") in ACTIVE:
        what = f"queueing window {job['page']} of its batches" if "page" in job else "planning"
        cancels.end_run(svc, job["run"], "failed", f"{what} failed on every delivery (see the function's logs)")


def _plan_job(body: bytes) -> dict | None:
    try:
        job = json.loads(body)
        valid = (isinstance(job, dict) and isinstance(job.get("run"), str) and RUN_ID_RE.fullmatch(job["run"])
                 and set(job) <= {"run", "page", "at", "conclude"} and job.get("conclude", "cancelled") == "cancelled"
                 and (type(job.get("page", 0)) is int and job.get("page", 0) >= 0)
                 and type(job.get("at", 0.0)) in (int, float))
    except ValueError:
        valid = False
    if not valid:
        log.error("planning queue: ignored a message that is not a planning job: %s", mask_emails_in(repr(body[:200])))
        return None
    return job


def plan_run(svc: Services, run: dict) -> None:
    run_id, rlog = run["RowKey"], run_log(run["RowKey"], run["export"])
    if run.get("streaming"):
        pass  # a streamed first sync whose planning died: it stays running while it is planned again
    elif not svc.records.advance(run_id, ("queued", "planning"), status="planning", planning_started=utcnow()):
        return  # superseded by a forced run meanwhile
    try:
        export = find_export(svc, run["export"])
        _plan_and_queue(svc, export, run, rlog)
    except (*USER_ERRORS, UnknownExport) as exc:
        rlog.error("run failed while planning: %s", exc)
        cancels.end_run(svc, run_id, "failed", str(exc))  # (a streamed first sync may have requests in flight)
    # Anything else (storage unreachable, a crash) propagates: the job is delivered again and plans the same
    # run the same way; after maxDequeueCount deliveries fail_planning fails the run.


def _plan_and_queue(svc: Services, export: ExportDefinition, run: dict, rlog) -> None:
    run_id, force, dry_run = run["RowKey"], bool(run.get("force")), bool(run.get("dry_run"))
    export.check_runnable()
    container = svc.export_container(export)
    snapshot = find_snapshot(container, export.prefix, export.segment)
    destination, state = svc.destination(export), svc.state(export.name)
    target = _destination_summary(state, destination, export)
    rebuild = _prepare_state(svc, state, destination, force, rlog)
    list_id = None
    if export.membership == "list" and not dry_run:  # (a dry run asks the destination nothing)
        list_id = _prepare_destination(svc, export)
        if _list_replaced(svc, run, destination, list_id, target) and not rebuild:
            rlog.warning("%s", target["note"])
            rebuild = True
        run = {**run, "list_id": list_id}
    target["firstSync"] = rebuild or not state.has_snapshot(destination)
    svc.records.update(run_id, snapshot=snapshot.id, snapshot_time=snapshot.refresh_time or "",
                       state=destination.id, destination=target, account=export.account.text())
    if not dry_run:  # a send instance gets ready meanwhile (on Flex Consumption: starts) for the first batch
        svc.queue.send_message(warm_up(run_id))
    budget = svc.account(export.account).budget
    ops = list_ops_for(budget.rate)
    planner = Planner(export, list(snapshot.columns), list_ops_per_message=ops)
    try:
        streamed = target["firstSync"] and not dry_run
        if run.get("streaming") and not (streamed and snapshot.id == run.get("snapshot")):
            raise ExportDataError(STREAM_CUT_SHORT)  # its pages came from another snapshot: not planned again
        if streamed:
            try:
                _stream(svc, export, run, planner, (destination, rebuild, target), container, snapshot, rlog)
                return
            except TooManyRecords:
                planner.close()
                planner = Planner(export, list(snapshot.columns), list_ops_per_message=ops)
        with state.reading(destination) as acked:
            plan = planner.plan(read_records(container, snapshot), Snapshot.of(()) if rebuild else acked,
                                force=force)
        _save_rejections(svc, run_id, plan.rejections_file)
        guard = removal_guard(export, plan.counts)
        summary = _summary(budget, plan, target, removalGuard=guard and (
            f"a run without force would stop: {guard}" if not force else f"forced past: {guard}"))
        if guard and not force and not dry_run:
            svc.records.update(run_id, **summary)
            raise MassRemoval(guard)
        if dry_run:
            if svc.records.advance(run_id, ACTIVE, **summary):
                conclude(svc, run_id, "dry run")
            rlog.info("dry run: %s", plan.counts)
            return
        list_id = list_id if list_id is not None else _prepare_destination(svc, export)
        state.save_planned(run_id, plan.settled())
        pages = write_pages(svc, run_id, plan.batches())
    finally:
        planner.close()
    state.register(run_id, destination)
    if not svc.records.advance(run_id, ("planning",), status="running", list_id=list_id or "", planned_at=utcnow(),
                               rebuild_state=rebuild, planned_batches=pages.batches, pages=pages.count, **summary):
        rlog.info("run ended while it was planned (superseded by a forced run?): nothing queued")
        return
    rlog.info("planned %d batches, %d requests, to %s", pages.batches, plan.requests, destination.name)
    queue_window(svc, svc.records.get(run_id), 0)
    if pages.batches == 0:
        finish_if_complete(svc, run_id)


def _stream(svc: Services, export: ExportDefinition, run: dict, planner: Planner, where: tuple, container,
            snapshot, rlog) -> None:
    """Send a first sync while it is planned. Its records are counted first: the first page is queued only once
    they are known not to outnumber maxProfiles (a streamed run cannot take back what it sent). A run planned again
    after its planning died streamed already: it was counted then. The destination is readied meanwhile, on a
    thread of its own (the key read, Ortto's custom fields: 0.1 s less before the first merge)."""
    destination, rebuild, target = where
    with ThreadPoolExecutor(2) as pool:
        fits = pool.submit(lambda: bool(run.get("streaming")) or records_fit(container, snapshot, export.max_profiles))
        ready = pool.submit(lambda: run.get("list_id") or _prepare_destination(svc, export))
        # Not planned meanwhile: the first page waits for the count anyway, and a planner running alongside keeps
        # the interpreter lock from the count between its reads (0.6 s instead of 0.2 s for 100,000 rows).
        wait([fits])
        Stream(svc, export, run, planner, destination, rebuild, rlog, fits=fits.result,
               list_id=ready.result).send(read_records(container, snapshot), target)


class Stream:
    """A first sync sent while it is planned (Planner.first_sync): its run is running from its first page of
    batches; every page is kept and counted as it is written, queued by the window jobs as sending advances, and
    the counts come when the segment is read. Planning cut short is planned again the same way (same snapshot,
    no state yet: the same pages); the windows already queued are not queued again."""

    def __init__(self, svc: Services, export: ExportDefinition, run: dict, planner: Planner, destination, rebuild,
                 rlog, fits: Callable[[], bool], list_id: Callable[[], str]):
        self.svc, self.export, self.run, self.planner, self.rlog = svc, export, run, planner, rlog
        self.destination, self.rebuild, self.fits, self.list_id = destination, rebuild, fits, list_id
        self.resumed = bool(run.get("streaming"))
        self.budget = svc.account(export.account).budget
        # Planning shares the instance's cores with the senders: it keeps about STREAM_AHEAD s of requests (two
        # pages at least) ahead of what has settled, for at most STREAM_PACED s (an invocation must end), then runs
        # flat out. Run flat out from the start, it cost the senders 15% of their slots at 50 requests/s.
        per_batch = 1 if planner.bulk_only else planner.list_ops + 1
        self.ahead = max(2 * PAGE, int(STREAM_AHEAD * self.budget.rate / per_batch))
        self.paced_until = time.monotonic() + STREAM_PACED

    def send(self, partitions, target: dict) -> None:
        svc, run_id = self.svc, self.run["RowKey"]
        svc.state(self.export.name).register(run_id, self.destination)  # before its first batch is queued
        plan = self.planner.first_sync(partitions)
        try:
            pages = write_pages(svc, run_id, plan.batches(), self._page_written)
        except RunEnded:
            self.rlog.info("run ended while it was planned (cancelled, or superseded by a forced run)")
            return
        _save_rejections(svc, run_id, plan.rejections_file)
        summary = _summary(self.budget, plan, target, streamed=True)
        if not svc.records.advance(run_id, ("planning", "running"), status="running", streaming=False,
                                   list_id=self.list_id(), rebuild_state=self.rebuild, planned_batches=pages.batches,
                                   pages=pages.count, planned_at=utcnow(), **summary):
            self.rlog.info("run ended while it was planned: the rest of its batches is not queued")
            return
        self.rlog.info("planned %d batches, %d requests, to %s (sent as planned)", pages.batches, plan.requests,
                       self.destination.name)
        if int((svc.records.get(run_id) or {}).get("done", 0)) >= pages.batches:
            finish_if_complete(svc, run_id)  # its batches all settled while it was planned

    def _page_written(self, count: int) -> None:
        svc, run_id = self.svc, self.run["RowKey"]
        if count > 1:
            if not svc.records.advance(run_id, ("running",), pages=count):
                raise RunEnded(run_id)  # cancelled or superseded: planning stops
            self._keep_pace(count)
            return
        if not self.fits():
            raise TooManyRecords(run_id)  # (nothing is queued yet: the run is still planning)
        if not svc.records.advance(run_id, ("planning", "running"), status="running", streaming=True,
                                   list_id=self.list_id(), rebuild_state=self.rebuild, pages=1, planned_at=utcnow()):
            raise RunEnded(run_id)
        queue_window(svc, svc.records.get(run_id), 0, again=self.resumed)

    def _keep_pace(self, pages: int) -> None:
        while time.monotonic() < self.paced_until:
            settled = int((self.svc.records.get(self.run["RowKey"]) or {}).get("done", 0))
            if pages * PAGE - settled <= self.ahead:
                return
            time.sleep(0.25)


def _destination_summary(state, destination, export: ExportDefinition) -> dict:
    """The run's destination (its connection too), and the one the export's last run sent to if that was
    another."""
    state.import_legacy(destination)
    previous = state.previous_destination()
    summary = {**destination.public(), "name": destination.name, "connection": export.account.name}
    if previous and previous != destination.name:
        summary["changedFrom"] = previous
        summary["note"] = (f"the destination changed: a first sync to {destination.name}; {previous} is left as "
                           "it was")
    return summary


def _list_replaced(svc: Services, run: dict, destination, list_id: str, target: dict) -> bool:
    """True when the export's last run on this destination sent to another list than `list_id`: the list was
    deleted (this run created it again, empty) or replaced in Autopilot since. Its state then says who is on a list
    that is gone: the run rebuilds it, sending every member again (a join is harmless to a member already there)."""
    for earlier in svc.records.for_export(run["export"], limit=20):
        if earlier["RowKey"] != run["RowKey"] and earlier.get("state") == destination.id and earlier.get("list_id"):
            if earlier["list_id"] == list_id:
                return False
            target["note"] = (f"the list {destination.target!r} is not the one the last run sent to (its id was "
                              f"{earlier['list_id']}, now {list_id}): it was deleted or replaced in Autopilot, so "
                              "every member is sent to it again")
            return True
    return False


def _prepare_state(svc: Services, state, destination, force: bool, rlog) -> bool:
    """Fold what ended runs acknowledged into the snapshot planning reads; True when a forced run must rebuild
    a snapshot that cannot be read (an unforced run fails on it, naming it)."""
    try:
        cancels.conclude_pending_cancels(svc, [p["run"] for p in state.head()[0]["pending"]])
        fold_state(svc, state, destination)
        if force:
            state.check(destination)
        return False
    except StateUnreadable as exc:
        if not force:
            raise
        rlog.warning("forced run rebuilds the state: %s", exc)
        return True


def _summary(budget: RateBudget, plan, target: dict, **more) -> dict:
    """What the run view and report show of a plan, its duration at its connection's rate."""
    seconds = plan.requests * budget.interval
    return {"counts": plan.counts, "rejected_sample": plan.rejected_sample, "planned_requests": plan.requests,
            "plan": {"samples": plan.samples, "seconds_at_budget": round(seconds, 1), "rate": budget.rate,
                     "estimated_duration": _duration(seconds), "destination": target, "newPeople": plan.new_people,
                     **more}}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{n} {unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")) if n]
    return " ".join(parts[:2]) or "0 s"


def _save_rejections(svc: Services, run_id: str, path: str) -> None:
    with open(path, "rb") as data:
        svc.host.blob.get_blob_client(REPORTS, f"{run_id}/rejected.jsonl").upload_blob(data, overwrite=True)


def _prepare_destination(svc: Services, export: ExportDefinition) -> str:
    """Ready the destination before any batch is queued (Autopilot: the list found or created; Ortto: the custom
    fields the run writes created); returns what messages name as their target ("" for none)."""
    account = svc.account(export.account)
    pacer = Pacer(account.budget, max_wait=LOOKUP_WAIT)
    try:
        for attempt in range(1, PREPARE_TRIES + 1):
            try:
                return account.client.run_sync(lambda: account.client.prepare(export, pacer))
            except Throttled as exc:  # the whole app holds off; the next slot comes after the hold
                account.budget.throttled(exc.retry_after)
                if attempt == PREPARE_TRIES:
                    raise
            except Transient:  # (its writes, a list or a custom field created, are found the next time)
                if attempt == PREPARE_TRIES:
                    raise
                time.sleep(0.5 * attempt)
    except Deferred as exc:
        free = datetime.fromtimestamp(exc.at, UTC).strftime("%H:%M:%S UTC")
        what = f"the list {export.list!r}" if export.membership == "list" else "the membership field"
        raise BudgetBooked(f"the request budget of connection {export.account.name!r} is booked by other runs "
                           f"until {free}; {what} could not be looked up, so nothing was sent: start again after "
                           "that (the timer retries on its next tick)") from None


# --- windows: batches are booked and queued a page at a time, as sending advances ---------------------
@dataclass(frozen=True)
class Pages:
    count: int
    batches: int


def write_pages(svc: Services, run_id: str, batches, written: Callable[[int], None] = lambda pages: None) -> Pages:
    """Keep the plan's batches in blobs of PAGE batches each, numbered from 1 in plan order; `written(pages)`
    after each."""
    pages = count = 0
    batches = iter(batches)
    while chunk := list(islice(batches, PAGE)):
        lines = [json.dumps({"kind": b.kind, "requests": b.requests,
                             "items": [{"k": i.key, "f": i.fingerprint, "m": i.member, "r": i.source, "d": i.document}
                                       for i in b.items]}, separators=(",", ":")) for b in chunk]
        data = gzip.compress("\n".join(lines).encode(), compresslevel=1)
        svc.host.blob.get_blob_client(PLAN_CONTAINER, _page_name(run_id, pages)).upload_blob(data, overwrite=True)
        pages += 1
        count += len(chunk)
        written(pages)
    return Pages(pages, count)


def _page_name(run_id: str, page: int) -> str:
    return f"{run_id}/pages/{page:06d}.jsonl.gz"


def _read_page(svc: Services, run_id: str, page: int) -> list[dict]:
    data = svc.host.blob.get_blob_client(PLAN_CONTAINER, _page_name(run_id, page)).download_blob().readall()
    return [json.loads(line) for line in gzip.decompress(data).decode().split("\n")]


def queue_window(svc: Services, run: dict, page: int, again: bool = False, start: float = 0.0) -> None:
    """Queue one page of the run's batches, each shown shortly before its estimated turn on the budget (from
    `start`, the end of the page before, at the soonest), then the job that queues the next page once this one
    starts to be sent (see PAGE). A page already queued (redelivery) is not queued again; `again`: it may have
    been queued in part by a job that died."""
    run_id = run["RowKey"]
    deadline = time.monotonic() + PAGE_WAIT
    while run.get("streaming") and page >= int(run.get("pages", 0)) and time.monotonic() < deadline:
        time.sleep(0.25)  # a streamed first sync is writing this page: it comes in a moment
        run = svc.records.get(run_id) or {}
    if run.get("status") != "running":
        return
    if page >= int(run.get("pages", 0)):
        if run.get("streaming"):  # (planning is slow or was cut short: look again later)
            svc.plan_queue.send_message(json.dumps({"run": run_id, "page": page}).encode(), visibility_timeout=1)
        return
    if not svc.records.claim_page(run_id, page, again):
        return  # another job queues it, or did
    begins = max(svc.run_account(run_id).budget.next_free(), start)
    ends = _enqueue(svc, run, _read_page(svc, run_id, page), first=page * PAGE + 1, again=again, turn=begins)
    if page + 1 < int(run["pages"]) or run.get("streaming"):
        job = json.dumps({"run": run_id, "page": page + 1, "at": ends}).encode()
        svc.plan_queue.send_message(job, visibility_timeout=queue_delay(max(begins, ends - WINDOW_LEAD)))
    svc.records.update(run_id, queued_at=utcnow())


def _enqueue(svc: Services, run: dict, batches: list[dict], first: int, again: bool, turn: float) -> float:
    """Queue the batches, each visible shortly before its turn (the first at `turn`) if the budget were the run's
    alone (slots are taken when the requests go, so a turn that comes later only keeps the message waiting in the
    queue). Returns the estimated end of the page."""
    interval, number = svc.run_account(run["RowKey"]).budget.interval, first
    list_id = run.get("list_id") or None
    with ThreadPoolExecutor(8) as pool:
        futures = []
        for batch in batches:
            message = BatchMessage(run["RowKey"], run["export"], number, batch["kind"], batch["items"], list_id,
                                   maybe_settled=again)
            futures.append(pool.submit(queue_message, svc, message, turn))
            turn += batch["requests"] * interval
            number += 1
        for future in futures:
            future.result()
    return turn


# --- the timer ------------------------------------------------------------------------------------
def next_tick(env, now: datetime) -> datetime | None:
    """When the timer next looks for new snapshots: the first time after `now` that EXPORT_SCHEDULE (NCRONTAB, six
    fields, seconds first) names, in UTC as the Functions host reads it; None when the schedule cannot be read (the
    host refuses it too, and says so at start)."""
    schedule = (env.get("EXPORT_SCHEDULE") or DEFAULT_SCHEDULE).strip()
    if not croniter.is_valid(schedule, second_at_beginning=True) or len(schedule.split()) != 6:
        return None
    return croniter(schedule, now.astimezone(UTC), second_at_beginning=True).get_next(datetime)


def scheduled_tick(svc: Services) -> list[str]:
    """Finish runs whose last batch was settled by a crashed instance, then start runs for new snapshots."""
    for run in svc.records.active((*ACTIVE, CANCELLING)):
        try:
            _look_after(svc, run)
        except Exception:  # one run's trouble must not stop the tick for every other run and export
            log.exception("the timer could not look after run %s; it tries again on the next tick", run["RowKey"])
    try:
        exports = svc.exports()
    except ExportConfigError as exc:  # the timer must not fail on every tick: say what to fix, once a tick
        log.error("no export started: the export definitions are invalid: %s", exc)
        return []
    enabled = [e for e in exports if e.enabled]
    signals.emit("exports_enabled", exports=[e.name for e in enabled])  # what the stale-export alert expects
    return _start_new(svc, enabled, "timer")


def _look_after(svc: Services, run: dict) -> None:
    """Finish a running run whose last batch was settled by a crashed instance, or take over one that is stuck;
    conclude a cancelled run whose conclusion job may be lost."""
    if run.get("status") == "running":
        if not finish_if_complete(svc, run["RowKey"]) and time.time() - run["modified"] > STUCK_AFTER:
            take_over(svc, run)
    elif run.get("status") == CANCELLING:
        cancels.conclude_cancelled(svc, run["RowKey"], wait=False)


BLOB_CREATED = "Microsoft.Storage.BlobCreated"
BLOB_SUBJECT = re.compile(r"/blobServices/default/containers/([^/]+)/blobs/(.+)")


def snapshot_written(svc: Services, event_type: str, subject: str) -> list[str]:
    """Event Grid told of a blob written in the export account (EXPORT_STORAGE): for a model.json, start a run for
    each enabled export it may hold a new snapshot of. The same check as the timer's, so whichever of an event, a
    repeated event and a tick comes second finds the snapshot synced or its run in progress, and starts nothing. An
    export busy with an older snapshot gets the new one on a later tick."""
    found = BLOB_SUBJECT.fullmatch(subject or "")
    if event_type != BLOB_CREATED or not found or posixpath.basename(found[2]) != "model.json":
        log.info("event %s for %s: not a model.json written, nothing to start", event_type, subject)
        return []
    container, path = found[1], found[2]
    try:
        exports = svc.exports()
    except ExportConfigError as exc:
        log.error("no export started for %s/%s: the export definitions are invalid: %s", container, path, exc)
        return []
    served = [e for e in exports if e.enabled and e.connection == DEFAULT_CONNECTION and e.container == container
              and path.startswith(e.prefix)]
    if not served:
        log.info("%s/%s is under no enabled export's container and prefix", container, path)
    return _start_new(svc, served, "event")


def _start_new(svc: Services, exports: list[ExportDefinition], trigger: str) -> list[str]:
    """Start a run for each export whose newest snapshot is not synced yet; returns their ids."""
    started = []
    for export in exports:
        try:
            if _has_new_snapshot(svc, export):
                started.append(start_run(svc, export.name, trigger=trigger)["RowKey"])
        except RunInProgress as exc:
            log.info("export %s: %s", export.name, exc)
        except USER_ERRORS as exc:
            log.error("export %s not started: %s", export.name, exc)
        except Exception:  # one broken export must not keep the others from running
            log.exception("export %s not started", export.name)
    return started


def take_over(svc: Services, run: dict) -> int:
    """Take up a run whose messages are lost: a running run whose record has not changed for STUCK_AFTER s (no
    batch settled, no window queued; their messages expired, or a failure dropped them), or one whose host was
    killed (a local stack's). Every unsettled batch of its queued pages is queued again from the plan, marked maybe
    settled and shown after its originals still on the queue can have gone (a copy that finds its batch settled
    sends nothing), and its next window job too; returns how many batches. A
    run still being planned is planned again (the same way). A plan that cannot be read fails the run."""
    run_id, rlog = run["RowKey"], run_log(run["RowKey"], run["export"])
    if run.get("status") in ("queued", "planning") or run.get("streaming"):
        svc.plan_queue.send_message(json.dumps({"run": run_id}).encode())
        svc.records.update(run_id, taken_over=utcnow())
        return 0
    outcomes = svc.records.batch_outcomes(run_id)
    settled = {int(o["RowKey"]) for o in outcomes}  # (a batch being replayed is queued from its dead message below)
    replays = [int(o["RowKey"]) for o in outcomes if o.get("status") in REPLAYS]
    queued = min(int(run.get("queued_pages", 0)), int(run.get("pages", 0)))
    try:
        unsettled = [(number, batch) for page in range(queued)
                     for number, batch in enumerate(_read_page(svc, run_id, page), start=page * PAGE + 1)
                     if number not in settled]
    except ResourceNotFoundError:
        conclude(svc, run_id, "failed", error="the run made no progress and its plan (page blobs in the "
                                               f"{PLAN_CONTAINER!r} container) is gone: start a new run")
        return 0
    # The copies come after the time the originals still on the queue need to be sent (a copy finding its batch
    # settled sends nothing; two copies in flight at once would both send).
    interval = svc.run_account(run_id).budget.interval
    after = time.time() + TAKE_OVER_MARGIN + sum(b["requests"] for _, b in unsettled) * interval
    for number, batch in unsettled:
        queue_message(svc, BatchMessage(run_id, run["export"], number, batch["kind"], batch["items"],
                                        run.get("list_id") or None, maybe_settled=True), after)
    # A replay that died before queueing its batches, or whose copies were lost: queued again from their dead
    # messages, which carry what earlier attempts settled (the plan's copy would resend that).
    requeue_dead(svc, run_id, replays, after)
    again = len(unsettled) + len(replays)
    if queued < int(run.get("pages", 0)):  # its next window job may be lost too (a duplicate finds it queued)
        svc.plan_queue.send_message(json.dumps({"run": run_id, "page": queued}).encode())
    svc.records.update(run_id, taken_over=utcnow())
    rlog.warning("run taken over: %d unsettled batches queued again from its plan", again)
    return again


def _has_new_snapshot(svc: Services, export: ExportDefinition) -> bool:
    """True unless the newest snapshot was synced to the export's present destination, or runs on it failed
    lately (the timer backs off: retry_time)."""
    snapshot = find_snapshot(svc.export_container(export), export.prefix, export.segment)
    destination = svc.destination(export).id
    tried = [run for run in svc.records.for_export(export.name, limit=20)
             if run.get("snapshot") == snapshot.id and run.get("state") in (None, "", destination)]
    if any(is_synced(run) for run in tried) or (tried and tried[0].get("status") == "cancelled"):
        return False  # (a cancelled snapshot waits for a new one, or for a run started on demand)
    retry_at = retry_time(tried)
    if retry_at is not None and time.time() < retry_at:
        log.info("export %s: its last run failed on this snapshot; the timer tries again at %s", export.name,
                 iso(retry_at))
        return False
    return True


def retry_time(runs: list[dict]) -> float | None:
    """When the timer may try a snapshot again after runs on it failed (`runs`: newest first): RETRY_FIRST after
    the last failure, doubled for each failure before it for the same reason, at most RETRY_MAX. None when no
    failure stands in the way. A new snapshot, or a run started on demand, is not held back."""
    failed: list[dict] = []
    for run in runs:
        if run.get("status") != "failed" or (failed and run.get("error") != failed[0].get("error")):
            break
        failed.append(run)
    if not failed or not failed[0].get("finished"):
        return None
    pause = min(RETRY_FIRST * 2 ** (len(failed) - 1), RETRY_MAX)
    return datetime.fromisoformat(failed[0]["finished"].replace("Z", "+00:00")).timestamp() + pause


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
