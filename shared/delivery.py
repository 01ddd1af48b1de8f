"""Delivering one queued batch: send it, settle its outcome, re-queue or park what could not be sent, and
replay a run's dead batches."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections import Counter

from shared import batch_messages, signals
from shared.api_client import ApiKeyRejected
from shared.batch_messages import BatchMessage, MessageError
from shared.rate_budget import LEAD, Pacer, Stopped
from shared.reports import after_batch, conclude, delivery_totals, is_synced
from shared.run_records import ACTIVE, CANCELLING, REPLAYING, REQUEUED, UNSETTLED, BatchOutcome, run_log, utcnow
from shared.secrets import SecretUnavailable
from shared.sender import MAX_WAIT, BatchSender, Progress, Requeue, backoff, fail_rest
from shared.services import Services
from shared.state_store import Acked, Destination

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


def process_batch(svc: Services, body: bytes, dequeue_count: int = 1) -> None:
    """The queue trigger's work. Malformed messages go to the poison queue with their reason."""
    try:
        message = batch_messages.decode(body, svc.host.blob)
    except MessageError as exc:
        log.error("rejected queue message: %s", exc)
        poison(svc, body, str(exc))
        return
    status = svc.records.status(message.run)
    if status is None:
        poison(svc, body, f"unknown run {message.run!r}")
        return
    if (dequeue_count > 1 or message.maybe_settled) and svc.records.has_batch(message.run, message.batch):
        # Already settled: a redelivered message. Its instance may have died before counting it toward the
        # run's `done` hint, so count it (again): an over-count only makes finishing check the outcomes sooner.
        # (A first delivery of a message queued once cannot find its batch settled: no other message has it.)
        after_batch(svc, message.run)
        return
    rlog = run_log(message.run, message.export)
    progress = _carried(message)
    if status in (CANCELLING, "cancelled"):
        pass  # nothing is sent: its contacts are counted as cancelled
    elif status not in ACTIVE:
        run = svc.records.get(message.run) or {}
        fail_rest(message, progress, f"run already ended ({status}: {run.get('error', '')})")
    elif not _send(svc, message, progress, rlog):
        return
    _settle(svc, message, progress, rlog)


def _send(svc: Services, message: BatchMessage, progress: Progress, rlog) -> bool:
    """Send the batch; False when its rest was re-queued or parked as dead (the batch is not settled here)."""
    account = svc.run_account(message.run)
    pacer = Pacer(account.budget, MAX_WAIT, go_on=lambda: svc.records.status(message.run) in ACTIVE)
    sender = BatchSender(account.client, pacer, message, progress)
    try:
        return _sent(svc, message, progress, sender, rlog)
    finally:
        if pacer.sent:  # what the 429 alert counts, per connection
            signals.emit("batch_sent", runId=message.run, export=message.export, connection=account.connection.name,
                         requests=pacer.sent, throttled=sender.throttled)


def _sent(svc: Services, message: BatchMessage, progress: Progress, sender: BatchSender, rlog) -> bool:
    settled_before = len(progress.done)
    try:
        sender.run()
        return True
    except Stopped:
        rlog.info("batch %d stopped: its run was cancelled", message.batch)
        return True  # settled with what was sent; the rest counts as cancelled
    except Requeue as exc:
        reason, at, failed = exc.reason, exc.at, exc.failed
    except (ApiKeyRejected, SecretUnavailable) as exc:
        problem = _key_problem(sender.client.api_key.secret_name, exc)
        if message.attempt + 1 >= svc.settings.max_attempts:
            fail_rest(message, progress, problem)
            conclude(svc, message.run, "failed", error=problem)
            rlog.error("no usable API key on every attempt; run failed: %s", problem)
            return True
        # A rotation may be half done (Autopilot revoked the old key, Key Vault not yet updated), or Key Vault
        # may be briefly unreachable: try later.
        reason, at, failed = problem, time.time() + backoff(message.attempt), True
    return _retry_later(svc, message, progress, rlog, reason, at, failed and len(progress.done) == settled_before)


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


class ReplayRefused(Exception):
    """A replay that would send older data over what a newer run of the export synced."""


def replay(svc: Services, run_id: str) -> int:
    """Put a run's dead batches back on the queue; returns how many. Each is marked as being replayed first (its
    run cannot finish without it), then the run is running again, then each is queued and marked as queued: a
    fast sender cannot settle one as belonging to an ended run, and a crash between the steps loses none (replay
    again: what was marked but not queued is queued). Raises ReplayRefused when a newer run of the export has
    synced since (its data would be overwritten with older data)."""
    outcomes = svc.records.batch_outcomes(run_id)
    dead = [o for o in outcomes if o.get("status") in ("dead", REPLAYING)]
    if not dead:
        return 0
    run = svc.records.get(run_id)
    newer = [r["RowKey"] for r in svc.records.for_export(run["export"], limit=20)
             if r["RowKey"] > run_id and is_synced(r)]
    if newer:
        raise ReplayRefused(f"run {newer[-1]} of export {run['export']!r} synced a newer snapshot since; replaying "
                            f"the {len(dead)} dead batches of {run_id} would send older data over it: start a new run "
                            "instead")
    for outcome in dead:
        svc.records.mark_replay(run_id, int(outcome["RowKey"]), REPLAYING)
    if run.get("destination"):  # what the replay acknowledges is folded when the run ends again
        svc.state(run["export"]).register(run_id, Destination.from_public(run["destination"]),
                                          entry=f"{run_id}/replay {utcnow()}")
    kept = delivery_totals([o for o in outcomes if o.get("status") not in UNSETTLED])
    svc.records.update(run_id, status="running", finished="", done=len(outcomes) - len(dead), delivery="",
                       c_sent=kept["sent"], c_accepted=kept["accepted"], c_refused=kept["refused"],
                       c_failed=kept["failed"], c_dead=0)
    for outcome in dead:
        batch = int(outcome["RowKey"])
        data = json.loads(svc.host.blob.get_blob_client(DEAD, f"{run_id}/{batch:06d}.json").download_blob().readall())
        data.pop("at", None), data.pop("slots", None)  # dead batches kept by versions that booked slots
        # maybe_settled: a replay repeated after a crash may queue it twice; a copy that finds it settled stops
        queue_message(svc, BatchMessage(**dict(data, attempt=0, maybe_settled=True)), None)
        svc.records.mark_replay(run_id, batch, REQUEUED)
    return len(dead)
