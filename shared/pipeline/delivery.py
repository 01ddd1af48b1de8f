"""Delivering one queued batch: send it, settle its outcome, re-queue or park what could not be sent, and
replay a run's dead batches."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections import Counter

from shared.destinations.accounts import Account
from shared.destinations.api_client import ApiKeyRejected, Permanent
from shared.destinations.rate_budget import LEAD, Pacer, Stopped
from shared.destinations.secrets import SecretUnavailable
from shared.pipeline import batch_messages, cancels
from shared.pipeline.batch_messages import BatchMessage, MessageError
from shared.pipeline.reports import after_batch, delivery_totals
from shared.pipeline.sender import MAX_WAIT, BatchSender, Progress, Requeue, backoff, fail_rest
from shared.runtime import signals
from shared.runtime.blocking import off
from shared.services import Services
from shared.state.run_records import (
    ACTIVE,
    CANCELLING,
    REPLAYING,
    REQUEUED,
    UNSETTLED,
    BatchOutcome,
    RunInProgress,
    run_log,
    utcnow,
)
from shared.state.state_store import Acked, Destination

log = logging.getLogger("autopilot.delivery")
DEAD = "dead"


MAX_QUEUE_DELAY = 6 * 24 * 3600  # Azure refuses a visibility delay over 7 days; a message shown early just waits


def queue_delay(visible_at: float | None) -> int | None:
    """The visibility delay that shows a message at `visible_at` (epoch seconds), within the queue's limit."""
    delay = 0 if visible_at is None else int(max(0, visible_at - time.time()))
    return min(delay, MAX_QUEUE_DELAY) or None


def queue_message(svc: Services, message: BatchMessage, visible_at: float | None) -> None:
    delay = queue_delay(None if visible_at is None else visible_at - LEAD)
    svc.queue.send_message(batch_messages.encode(message, svc.host.blob), visibility_timeout=delay)


async def process_batch(svc: Services, body: bytes, dequeue_count: int = 1) -> None:
    """The queue trigger's work. Malformed messages go to the poison queue with their reason. Awaited on the
    worker's event loop: its storage calls run on the blocking pool, its requests hold no thread."""
    if run_id := batch_messages.warmed_run(body):
        await off(_warm_up, svc, run_id)
        return
    received = await off(_received, svc, body, dequeue_count)
    if received is None:
        return
    message, status, account = received
    rlog = run_log(message.run, message.export)
    progress = _carried(message)
    if status not in ACTIVE:
        await off(_not_sent, svc, message, progress)
    elif not await _send(svc, message, progress, rlog, account):
        return
    await off(_settle, svc, message, progress, rlog)


def _warm_up(svc: Services, run_id: str) -> None:
    """Ready this instance for a run's batches: its account's clients and API key (services.current() readied the
    storage resources already). Best effort: a key that cannot be read is reported by the run's first batch."""
    try:
        svc.run_account(run_id).client.api_key.get()
    except Exception as exc:
        log.warning("warm-up for run %s: %s", run_id, type(exc).__name__)


def _received(svc: Services, body: bytes, dequeue_count: int) -> tuple[BatchMessage, str, Account | None] | None:
    """The message's batch, its run's status and (a run still sending) the account it sends to; None when there
    is nothing to do (a malformed message, put on the poison queue; a batch settled already)."""
    try:
        message = batch_messages.decode(body, svc.host.blob)
    except MessageError as exc:
        log.error("rejected queue message: %s", exc)
        poison(svc, body, str(exc))
        return None
    status = svc.records.status(message.run)
    if status is None:
        poison(svc, body, f"unknown run {message.run!r}")
        return None
    maybe_settled = dequeue_count > 1 or message.maybe_settled or svc.records.was_taken_over(message.run)
    if maybe_settled and svc.records.has_batch(message.run, message.batch):
        # Already settled: a redelivered message. Its instance may have died before counting it toward the
        # run's `done` hint, so count it (again): an over-count only makes finishing check the outcomes sooner.
        # (A first delivery of a message queued once cannot find its batch settled: no other message has it,
        # unless its run was taken over: then a copy of it, or of a rest re-queued from it, may have settled it.)
        after_batch(svc, message.run)
        return None
    return message, status, svc.run_account(message.run) if status in ACTIVE else None


def _not_sent(svc: Services, message: BatchMessage, progress: Progress) -> None:
    """The batch's run stopped: its unsent contacts count as cancelled after a cancel, else as failed, saying why."""
    reason = cancels.unsent_reason(svc.records.get(message.run) or {})
    if reason:
        fail_rest(message, progress, reason)


async def _send(svc: Services, message: BatchMessage, progress: Progress, rlog, account: Account) -> bool:
    """Send the batch; False when its rest was re-queued or parked as dead (the batch is not settled here)."""
    async def go_on() -> bool:  # (the status read within STATUS_MAX_AGE s is known: no storage call)
        status = svc.records.known_status(message.run) or await off(svc.records.status, message.run)
        return status in ACTIVE

    pacer = Pacer(account.budget, MAX_WAIT, go_on=go_on)
    sender = BatchSender(account.client, pacer, message, progress)
    try:
        return await _sent(svc, message, progress, sender, rlog)
    finally:
        if pacer.sent:  # what the 429 alert counts, per connection
            signals.emit("batch_sent", runId=message.run, export=message.export, connection=account.connection.name,
                         requests=pacer.sent, throttled=sender.throttled)


async def _sent(svc: Services, message: BatchMessage, progress: Progress, sender: BatchSender, rlog) -> bool:
    settled_before = len(progress.done)
    try:
        await sender.run()
        return True
    except Stopped:
        rlog.info("batch %d stopped: its run was cancelled or is ending", message.batch)
        await off(_not_sent, svc, message, progress)
        return True  # settled with what was sent
    except Requeue as exc:
        reason, at, failed = exc.reason, exc.at, exc.failed
    except Permanent as exc:  # sending it again cannot change the answer: fail the rest now, saying why
        fail_rest(message, progress, f"{exc} (not sent again: the destination refuses it as it is)")
        rlog.error("batch %d refused for good: %s", message.batch, exc)
        return True
    except (ApiKeyRejected, SecretUnavailable) as exc:
        problem = _key_problem(sender.client.api_key.secret_name, exc)
        if message.attempt + 1 >= svc.settings.max_attempts:
            fail_rest(message, progress, problem)
            await off(cancels.end_run, svc, message.run, "failed", problem)
            rlog.error("no usable API key on every attempt; run failed: %s", problem)
            return True
        # A rotation may be half done (Autopilot revoked the old key, Key Vault not yet updated), or Key Vault
        # may be briefly unreachable: try later.
        reason, at, failed = problem, time.time() + backoff(message.attempt), True
    return await off(_retry_later, svc, message, progress, rlog, reason, at,
                     failed and len(progress.done) == settled_before)


def _key_problem(secret_name: str, exc: Exception) -> str:
    if isinstance(exc, ApiKeyRejected):
        return f"{exc.message} (Key Vault secret {secret_name!r})"
    return str(exc)  # SecretUnavailable names the secret and the vault, never the value


def _retry_later(svc: Services, message: BatchMessage, progress: Progress, rlog, reason: str, at: float,
                 failed: bool) -> bool:
    """Re-queue the unsettled rest until `at`, or park it as a dead batch once its attempts are used up.
    Waiting for the budget, a 429, or a delivery that got further than the last, is not a failed attempt."""
    attempt = message.attempt + (1 if failed else 0)
    if attempt >= svc.settings.max_attempts:
        reason = f"gave up after {svc.settings.max_attempts} attempts: {reason}"
        poison(svc, batch_messages.encode(_rest(message, progress), svc.host.blob), reason)
        rlog.warning("batch %d parked as dead (%s)", message.batch, reason)
        return False
    again = _rest(message, progress, attempt=attempt)
    queue_message(svc, again, at)
    rlog.info("batch %d re-queued (%s)", message.batch, reason)
    return False


def _rest(message: BatchMessage, progress: Progress, **changes) -> BatchMessage:
    """The batch's unsettled items, carrying the outcome of the settled ones."""
    rest = [i for i in message.items if i["k"] not in progress.done]
    carry = {"accepted": message.carry.get("accepted", 0) + len(progress.acked),
             "acked": [list(a) for a in progress.all_acked()],
             "refused": message.carry.get("refused", []) + progress.refused,
             "failed": message.carry.get("failed", []) + progress.failed,
             "results": dict(progress.results)}
    return message.with_items(rest, carry=carry, **changes)


def _carried(message: BatchMessage) -> Progress:
    carry = message.carry
    return Progress(refused=list(carry.get("refused", [])), failed=list(carry.get("failed", [])),
                    carried_accepted=carry.get("accepted", 0), results=Counter(carry.get("results", {})),
                    carried_acked=[Acked(a[0], a[1], bool(a[2]), *a[3:]) for a in carry.get("acked", [])])


def _settle(svc: Services, message: BatchMessage, progress: Progress, rlog) -> None:
    """Record the batch's outcome; items never sent (its run was cancelled) are not counted as sent."""
    unsent = sum(1 for item in message.items if item["k"] not in progress.done)
    outcome = BatchOutcome(
        batch=message.batch, kind=message.kind, status="cancelled" if unsent else "done",
        contacts=len(message.items) - unsent + _carry_size(message),
        accepted=len(progress.acked) + progress.carried_accepted, rejected=len(progress.refused),
        failed=len(progress.failed), detail=progress.refused + progress.failed, results=dict(progress.results))
    if svc.records.record_batch(message.run, outcome, progress.all_acked()):
        rlog.info("batch %d settled: %d accepted, %d refused, %d failed", message.batch, outcome.accepted,
                  outcome.rejected, outcome.failed)
        after_batch(svc, message.run, outcome)
    else:  # another copy settled it first: count it again as a hint, as for a redelivered message
        after_batch(svc, message.run)


def _carry_size(message: BatchMessage) -> int:
    carry = message.carry
    return carry.get("accepted", 0) + len(carry.get("refused", [])) + len(carry.get("failed", []))


# --- dead batches ---------------------------------------------------------------------------------
def poison(svc: Services, body: bytes, reason: str) -> None:
    """Queue `body` on the poison queue with its reason. A body too big to wrap is kept in a blob instead."""
    wrapped = json.dumps({"poison_reason": reason, "body": body.decode("utf-8", "replace")}).encode()
    if len(base64.b64encode(wrapped)) > batch_messages.MAX_ENCODED:
        name = f"poisoned/{utcnow()[:10]}/{uuid.uuid4().hex}"
        svc.host.blob.get_blob_client(DEAD, name).upload_blob(body)
        wrapped = json.dumps({"poison_reason": reason[:2000], "body_blob": name}).encode()
    svc.poison_queue.send_message(wrapped)


def record_dead(svc: Services, body: bytes) -> None:
    """The poison trigger: keep the dead message, and settle its batch as failed on its run."""
    reason, original = _unwrap(svc, body)
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
        json.dumps(message.fields()), overwrite=True)
    progress = _carried(message)
    fail_rest(message, progress, f"dead batch: {reason}")
    run_log(message.run, message.export).error("batch %d is dead: %s", message.batch, reason)
    outcome = BatchOutcome(message.batch, message.kind, "dead", len(message.items) + _carry_size(message),
                           progress.carried_accepted, len(progress.refused), len(progress.failed),
                           progress.refused + progress.failed, reason)
    if svc.records.get(message.run) and svc.records.record_batch(message.run, outcome, progress.all_acked()):
        signals.emit("batch_dead", runId=message.run, export=message.export, batch=message.batch,
                     connection=svc.run_account(message.run).connection.name, contacts=outcome.contacts)
        after_batch(svc, message.run, outcome)


def _unwrap(svc: Services, body: bytes) -> tuple[str, bytes]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "", body
    if not (isinstance(data, dict) and "poison_reason" in data):
        return "", body
    if isinstance(data.get("body_blob"), str):  # our own wrapper never points outside poisoned/
        name = data["body_blob"]
        if name.startswith("poisoned/") and ".." not in name:
            return str(data["poison_reason"]), svc.host.blob.get_blob_client(DEAD, name).download_blob().readall()
    return str(data["poison_reason"]), str(data.get("body", "")).encode()


REPLAY_LEASE = 120.0  # seconds a replay holds its run: far more than queueing its dead batches takes


class ReplayRefused(Exception):
    """A replay that would revive what was ended on purpose, run beside another run of the export, or send older
    data over what a newer run did."""


def replay(svc: Services, run_id: str) -> int:
    """Put an ended run's dead batches back on the queue; returns how many. Refused (ReplayRefused) for a run still
    active, cancelled, or that ended before queueing its whole plan (only dead batches are ever sent again, never a
    page the run did not queue), and once any newer run of the export exists (its acknowledgements would be folded
    under the replay's older ones). The export's lock is taken as a run takes it, and the run is claimed from its
    ended status before anything else (one replay wins a race); then each dead batch is marked as being replayed
    (the run cannot finish without it), queued, and marked queued. A crash between the steps loses nothing: a run
    claimed but not marked is finished again by the timer; one marked but not queued is taken over (runs.take_over
    queues its replays again)."""
    outcomes = svc.records.batch_outcomes(run_id)
    dead = [o for o in outcomes if o.get("status") in ("dead", REPLAYING)]
    if not dead:
        return 0
    run = svc.records.get(run_id)
    lease = time.time() + REPLAY_LEASE
    if not (run.get("status") == "running" and run.get("replay_started")):
        _claim(svc, run, outcomes, len(dead), lease)
    elif not svc.records.take_replay_lease(run_id, lease):  # a half-done replay is finished, a live one left alone
        raise ReplayRefused(f"a replay of run {run_id} is under way; if it died, replay again in "
                            f"{REPLAY_LEASE:g} s (or the timer finishes it)")
    for outcome in dead:
        svc.records.mark_replay(run_id, int(outcome["RowKey"]), REPLAYING)
    if run.get("destination"):  # what the replay acknowledges is folded when the run ends again
        svc.state(run["export"]).register(run_id, Destination.from_public(run["destination"]),
                                          entry=f"{run_id}/replay {utcnow()}")
    requeue_dead(svc, run_id, [int(o["RowKey"]) for o in dead], None)
    svc.records.update(run_id, replay_lease=0)
    return len(dead)


def _claim(svc: Services, run: dict, outcomes: list[dict], dead: int, lease: float) -> None:
    """Make an ended run running again for its replay, holding its export's lock; ReplayRefused if it may not."""
    run_id = run["RowKey"]
    _check_replayable(svc, run, dead)
    try:
        svc.records.acquire(run["export"], run_id)
    except RunInProgress as exc:
        raise ReplayRefused(f"export {run['export']!r} has run {exc.run_id} in progress: replay once it has "
                            "ended") from None
    kept = delivery_totals([o for o in outcomes if o.get("status") not in UNSETTLED])
    if not svc.records.advance(run_id, (run["status"],), status="running", finished="", delivery="",
                               replay_started=utcnow(), replay_lease=lease, done=len(outcomes) - dead,
                               c_sent=kept["sent"],
                               c_accepted=kept["accepted"], c_refused=kept["refused"], c_failed=kept["failed"],
                               c_dead=0):
        raise ReplayRefused(f"run {run_id} changed while the replay began (another replay?): look at it again")


def _check_replayable(svc: Services, run: dict, dead: int) -> None:
    run_id, status = run["RowKey"], run.get("status")
    if status in (*ACTIVE, CANCELLING):
        raise ReplayRefused(f"run {run_id} is still {status}: replay its dead batches once it has ended")
    if status == "cancelled" or run.get("cancel_requested"):
        raise ReplayRefused(f"run {run_id} was cancelled: what it did not send was cancelled on purpose; start a new "
                            "run to send the export's newest snapshot")
    if int(run.get("queued_pages", 0) or 0) < int(run.get("pages", 0) or 0):
        raise ReplayRefused(f"run {run_id} ended before it had queued all of its plan: a replay would send more than "
                            "its dead batches; start a new run instead")
    newer = [r for r in svc.records.for_export(run["export"], limit=20) if r["RowKey"] > run_id]
    started = [r["RowKey"] for r in newer if not r.get("dry_run")]
    if started or len(newer) == 20:  # (20 newer runs, dry runs all: a real one may be among the older)
        raise ReplayRefused(f"run {(started or [newer[-1]['RowKey']])[0]} of export {run['export']!r} started after "
                            f"it: replaying the {dead} dead batches of {run_id} would put older data over what that "
                            "run did; start a new run instead")


def requeue_dead(svc: Services, run_id: str, batches: list[int], visible_at: float | None) -> None:
    """Queue dead batches being replayed again, each from its dead message (its unsettled rest and what earlier
    attempts settled), and mark them queued. `maybe_settled`: a copy queued twice (a replay repeated, a take-over)
    finds its batch settled and sends nothing."""
    for batch in batches:
        data = json.loads(svc.host.blob.get_blob_client(DEAD, f"{run_id}/{batch:06d}.json").download_blob().readall())
        data.pop("at", None), data.pop("slots", None)  # dead batches kept by versions that booked slots
        queue_message(svc, BatchMessage(**dict(data, attempt=0, maybe_settled=True)), visible_at)
        svc.records.mark_replay(run_id, batch, REQUEUED)
