"""Run records in Table storage: one entity per run, one per batch outcome, one lock per export.

Counts a run reports are summed from its batch outcomes, which are written once per batch (insert, so a
redelivered message cannot count twice); the run's `done` counter is only a cheap hint of when to sum.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableServiceClient, UpdateMode

from shared.runtime.combiner import Combiner
from shared.state.state_store import Acked, decode_acks, encode_acks

RUNS_TABLE, BATCHES_TABLE = "runs", "batches"
ACTIVE = ("queued", "planning", "running")
CANCELLING = "cancelling"  # cancelled on request: nothing more is sent; it ends `cancelled` once its requests have
FINISHED = ("succeeded", "partially succeeded", "failed", "dry run", "cancelled")
# A replayed dead batch is marked `replaying`, then `requeued` once its message is on the queue: neither is settled
# (its run waits for it) until its replay's outcome replaces the mark.
REPLAYING, REQUEUED = "replaying", "requeued"
REPLAYS = (REPLAYING, REQUEUED)
UNSETTLED = ("dead", *REPLAYS)  # batch outcomes a delivery may replace
JSON_FIELDS = ("counts", "plan", "rejected_sample", "outcome", "destination", "problems", "results")
OUTCOME_FIELDS = ["RowKey", "kind", "status", "contacts", "accepted", "rejected", "failed", "outcome", "error",
                  "results"]
STATUS_MAX_AGE = 2.0  # seconds a sender trusts the run status it last read (a cancelled run stops within that)
COUNT_WINDOW = 0.1  # seconds a count update of a run waits for more of an instance's settled batches
STALE_PLANNING = 15 * 60  # seconds; longer than host.json's functionTimeout, so a live planner is never taken over


class RunLog(logging.LoggerAdapter):
    """Every record names its run and export: in the text, and as custom dimensions in Application Insights."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {**self.extra, **kwargs.get("extra", {})}
        return f"[run {self.extra['run_id']} export {self.extra['export']}] {msg}", kwargs


def run_log(run_id: str, export: str) -> RunLog:
    return RunLog(logging.getLogger("autopilot.runs"), {"run_id": run_id, "export": export})


class RunInProgress(Exception):
    def __init__(self, export: str, run_id: str):
        super().__init__(f"export {export!r} already has run {run_id} in progress; wait for it or force a new run")
        self.run_id = run_id


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


RUN_ID_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")  # what new_run_id() makes


def new_run_id() -> str:
    """The time to the second, then the millisecond in 3 hex digits and 5 random ones: ids sort by when the runs
    started, also within a second (the run history and an export's last run rely on it)."""
    now = datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%SZ") + f"-{now.microsecond // 1000:03x}{secrets.token_hex(3)[:5]}"


@dataclass(frozen=True)
class BatchOutcome:
    batch: int
    kind: str
    status: str  # "done" (every contact acknowledged or rejected/failed by Autopilot) | "dead" (poisoned)
    contacts: int
    accepted: int
    rejected: int
    failed: int
    detail: list  # masked per-contact problems: [{"email", "reason"}]
    error: str = ""
    results: dict = field(default_factory=dict)  # the destination's per-person statuses, counted (Ortto's)


class RunRecords:
    def __init__(self, tables: TableServiceClient):
        self.runs = tables.get_table_client(RUNS_TABLE)
        self.batches = tables.get_table_client(BATCHES_TABLE)
        # run id -> (status, when read, its connection, taken over): senders' cheap status check, the connection
        # it was planned for (written before any batch was queued, never changed after), and whether it was taken
        # over
        self._seen: dict[str, tuple[str, float, str, bool]] = {}
        self._counters: dict[str, Combiner] = {}  # run id -> the combiner of this instance's count_done calls
        self._indexed: set[str] = set()  # exports whose runs from before the run index are known to be in it

    def status(self, run_id: str, max_age: float = STATUS_MAX_AGE) -> str | None:
        """The run's status as this instance last read it, read again when older than `max_age` seconds (every
        settled batch reads it anyway, so a busy run costs no extra read). None: no such run."""
        known = self.known_status(run_id, max_age)
        if known:
            return known  # an ended run is always read again: a replay may have reopened it
        run = self.get(run_id)
        return run.get("status") if run else None

    def known_status(self, run_id: str, max_age: float = STATUS_MAX_AGE) -> str | None:
        """The active run's status as last read, if read within `max_age` s; None when status() must read it."""
        seen = self._seen.get(run_id)
        return seen[0] if seen and seen[0] in ACTIVE and time.monotonic() - seen[1] <= max_age else None

    def account(self, run_id: str) -> str:
        """The connection the run was planned for (Connection.text; "" for the default), read once it is planned."""
        seen = self._seen.get(run_id)
        if not seen or seen[0] in ("queued", "planning"):
            self.get(run_id)
            seen = self._seen.get(run_id)
        return seen[2] if seen else ""

    def _saw(self, entity) -> None:
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[entity["RowKey"]] = (entity.get("status"), time.monotonic(), entity.get("account", ""),
                                        bool(entity.get("taken_over")))

    def was_taken_over(self, run_id: str) -> bool:
        """Whether the run was taken over, as last read (status() reads it again when old): copies of its batches
        may be on the queue, so every delivery checks whether its batch settled."""
        seen = self._seen.get(run_id)
        return bool(seen and seen[3])

    # --- runs -------------------------------------------------------------------------------------
    def create(self, run_id: str, export: str, **fields) -> dict:
        entity = {"PartitionKey": "run", "RowKey": run_id, "export": export, "created": utcnow(), **fields}
        self.runs.create_entity(_encode(entity))
        self.runs.upsert_entity(_index_entry(export, run_id))
        return entity

    def get(self, run_id: str) -> dict | None:
        try:
            entity = self.runs.get_entity("run", run_id)
        except ResourceNotFoundError:
            return None
        self._saw(entity)
        return _decode(entity)

    def update(self, run_id: str, **fields) -> None:
        self.runs.update_entity(_encode({"PartitionKey": "run", "RowKey": run_id, **fields}), mode=UpdateMode.MERGE)

    def finish(self, run_id: str, status: str, **fields) -> bool:
        """Move an active run to a final status once; False if it had already finished."""
        while True:
            entity = self.runs.get_entity("run", run_id)
            if entity.get("status") in FINISHED:
                return False
            patch = {"PartitionKey": "run", "RowKey": run_id, "status": status, "finished": utcnow(), **fields}
            if self._merge_if_unchanged(patch, entity.metadata["etag"]):
                return True

    def advance(self, run_id: str, allowed: tuple[str, ...], **fields) -> bool:
        """Merge `fields` only while the run's status is one of `allowed` (a run that was superseded or failed
        meanwhile is never brought back); False if it was not."""
        while True:
            entity = self.runs.get_entity("run", run_id)
            if entity.get("status") not in allowed:
                return False
            if self._merge_if_unchanged({"PartitionKey": "run", "RowKey": run_id, **fields}, entity.metadata["etag"]):
                return True

    def claim_page(self, run_id: str, page: int, again: bool = False) -> bool:
        """Take the right to queue page `page` of a running run's batches: one job wins (a window job and a
        take-over's for the same page would both queue it). It is marked queued at once, `queued_at` cleared
        until it is all on the queue. `again` (a redelivered job): also a page whose claimer died half way."""
        while True:
            entity = self.runs.get_entity("run", run_id)
            queued = int(entity.get("queued_pages", 0))
            died = again and queued == page + 1 and not entity.get("queued_at")
            if entity.get("status") != "running" or not (queued == page or died):
                return False
            patch = {"PartitionKey": "run", "RowKey": run_id, "queued_pages": page + 1, "queued_at": ""}
            if self._merge_if_unchanged(patch, entity.metadata["etag"]):
                return True

    def take_replay_lease(self, run_id: str, until: float) -> bool:
        """Hold the right to queue a running run's replayed batches until `until` (epoch seconds); False while
        another replay holds it (two replays at once would queue every batch twice) or the run is not running."""
        while True:
            entity = self.runs.get_entity("run", run_id)
            if entity.get("status") != "running" or float(entity.get("replay_lease") or 0) > time.time():
                return False
            if self._merge_if_unchanged({"PartitionKey": "run", "RowKey": run_id, "replay_lease": until},
                                        entity.metadata["etag"]):
                return True

    def count_done(self, run_id: str, outcome: BatchOutcome | None = None) -> tuple[int, int]:
        """Bump the run's count of settled batches (a hint of when to finish: a redelivered batch may count
        twice) and, given the batch's outcome, the running totals the run view shows. Returns the count with this
        batch and the run's planned batches (none yet: a huge number). Batches settling on this instance within
        COUNT_WINDOW s of each other are counted by one update."""
        counter = self._counters.get(run_id)
        if counter is None:
            if len(self._counters) > 100:
                self._counters.clear()
            counter = self._counters.setdefault(run_id, Combiner(lambda outcomes: self._count(run_id, outcomes),
                                                                 linger=COUNT_WINDOW))
        return counter(outcome)

    def _count(self, run_id: str, outcomes: list[BatchOutcome | None]) -> list[tuple[int, int]]:
        added = {"sent": 0, "accepted": 0, "refused": 0, "failed": 0, "dead": 0}
        for outcome in filter(None, outcomes):
            for name, value in (("sent", outcome.contacts), ("accepted", outcome.accepted),
                                ("refused", outcome.rejected), ("failed", outcome.failed),
                                ("dead", int(outcome.status == "dead"))):
                added[name] += value
        while True:
            entity = self.runs.get_entity("run", run_id)
            self._saw(entity)
            before = int(entity.get("done", 0))
            patch = {"PartitionKey": "run", "RowKey": run_id, "done": before + len(outcomes)}
            patch.update({f"c_{name}": int(entity.get(f"c_{name}", 0)) + value for name, value in added.items()
                          if value})
            if self._merge_if_unchanged(patch, entity.metadata["etag"]):
                planned = int(entity.get("planned_batches", 1 << 30))
                return [(before + n, planned) for n in range(1, len(outcomes) + 1)]

    def _merge_if_unchanged(self, patch: dict, etag: str) -> bool:
        try:
            self.runs.update_entity(
                _encode(patch), mode=UpdateMode.MERGE, etag=etag, match_condition=MatchConditions.IfNotModified
            )
            return True
        except ResourceModifiedError:
            return False

    def for_export(self, export: str, limit: int = 1, before: str | None = None) -> list[dict]:
        """The newest runs of one export (older than run `before`, if given), from the export's index: reads
        `limit` runs, whatever the number of runs of this export and the others."""
        return [run for run in map(self.get, self.newest(export, limit, before)) if run is not None]

    def newest(self, export: str, limit: int = 1, before: str | None = None) -> list[str]:
        """The ids of the runs for_export reads, from the index alone."""
        if export not in self._indexed:
            try:
                self.runs.get_entity(_index_partition(export), INDEXED)
            except ResourceNotFoundError:  # runs made before the index: indexed once, by one scan
                self._index_older_runs(export)
            self._indexed.add(export)
        after = " and RowKey gt @b" if before else ""
        found = self.runs.query_entities(f"PartitionKey eq @p{after}", results_per_page=limit, select=["run"],
                                         parameters={"p": _index_partition(export), "b": _newest_first(before or "")})
        return [e["run"] for e in islice(found, limit + 1) if e.get("run")][:limit]  # (the mark has no run)

    def _index_older_runs(self, export: str) -> None:
        for run in self.runs.query_entities("PartitionKey eq 'run' and export eq @e", parameters={"e": export},
                                            select=["RowKey"]):
            self.runs.upsert_entity(_index_entry(export, run["RowKey"]))
        legacy = _LEGACY_PARTITION.format(export)
        found = self.runs.query_entities("PartitionKey eq @p", parameters={"p": legacy}, select=["RowKey"])
        while chunk := [("delete", {"PartitionKey": legacy, "RowKey": e["RowKey"]}) for e in islice(found, 100)]:
            self.runs.submit_transaction(chunk)
        self.runs.upsert_entity({"PartitionKey": _index_partition(export), "RowKey": INDEXED})

    def active(self, statuses: tuple[str, ...] = ACTIVE) -> list[dict]:
        """The runs in these statuses, each with `modified`: when its record last changed (epoch seconds)."""
        filters = " or ".join(f"status eq '{s}'" for s in statuses)
        return [{**_decode(e), "modified": e.metadata["timestamp"].timestamp()}
                for e in self.runs.query_entities(f"PartitionKey eq 'run' and ({filters})")]

    def finished_before(self, when: str):
        """Runs that finished before `when` (an ISO time as utcnow() writes it), oldest first: only their id,
        export, status and finish time (a run's whole record can be tens of KiB)."""
        return self.runs.query_entities("PartitionKey eq 'run' and finished gt '' and finished lt @w",
                                        parameters={"w": when}, select=["RowKey", "export", "status", "finished"])

    # --- one run at a time per export -------------------------------------------------------------
    def acquire(self, export: str, run_id: str, take_over: bool = False) -> tuple[str, str] | None:
        """Make `run_id` the export's active run. Returns (run id, why) of an active run it took over: a forced
        start supersedes one, and any start takes over a run whose planning stopped (its instance died)."""
        lock = {"PartitionKey": "lock", "RowKey": export, "run": run_id}
        try:
            self.runs.create_entity(lock)
            return None
        except ResourceExistsError:
            pass
        held = self.runs.get_entity("lock", export)
        holder = self.get(held["run"])
        busy = holder is not None and holder.get("status") in ACTIVE
        stale = busy and _planning_stopped(holder)
        if busy and not (take_over or stale):
            raise RunInProgress(export, held["run"])
        try:
            self.runs.update_entity(
                lock, mode=UpdateMode.REPLACE, etag=held.metadata["etag"], match_condition=MatchConditions.IfNotModified
            )
        except ResourceModifiedError:
            raise RunInProgress(export, "(just started)") from None
        if not busy:
            return None
        if stale:
            return held["run"], f"abandoned: its planning stopped (no progress for {STALE_PLANNING // 60} minutes)"
        return held["run"], f"cancelled: superseded by forced run {run_id}"

    def delete(self, run_id: str, export: str | None = None) -> None:
        """Delete the run's record and its index entry (none of its outcomes). The record goes last: a delete cut
        short is found, and done, again (a missing entity is no error)."""
        export = export or (self.get(run_id) or {}).get("export")
        if export:
            self.runs.delete_entity(_index_partition(export), _newest_first(run_id))
        self.runs.delete_entity("run", run_id)

    # --- batch outcomes ---------------------------------------------------------------------------
    def record_batch(self, run_id: str, outcome: BatchOutcome, acks: list[Acked] = ()) -> bool:
        """Store a batch's outcome once, with what Autopilot acknowledged (the state folds it in at the run's
        end): one write. A dead batch's record is replaced by the outcome of its replay. False if the batch was
        already settled (a redelivered message)."""
        entity = _encode({
            "PartitionKey": run_id, "RowKey": f"{outcome.batch:06d}", "kind": outcome.kind, "status": outcome.status,
            "contacts": outcome.contacts, "accepted": outcome.accepted, "rejected": outcome.rejected,
            "failed": outcome.failed, "outcome": grouped(outcome.detail), "error": outcome.error[:ERROR_MAX],
            "results": outcome.results, "acks": encode_acks(acks),
        })
        try:
            self.batches.create_entity(entity)
            return True
        except ResourceExistsError:
            pass
        held = self.batches.get_entity(run_id, entity["RowKey"], select=["status"])
        if held.get("status") not in UNSETTLED:
            return False
        try:
            self.batches.update_entity(entity, mode=UpdateMode.REPLACE, etag=held.metadata["etag"],
                                       match_condition=MatchConditions.IfNotModified)
            return True
        except ResourceModifiedError:
            return False  # another delivery of the replayed batch settled it first

    def has_batch(self, run_id: str, batch: int) -> bool:
        """Whether the batch is settled (a dead batch is not: a replay sends it again)."""
        try:
            return self.batches.get_entity(run_id, f"{batch:06d}", select=["status"]).get("status") not in UNSETTLED
        except ResourceNotFoundError:
            return False

    def mark_replay(self, run_id: str, batch: int, status: str) -> None:
        """Mark a dead batch as being replayed (REPLAYING, then REQUEUED): its run waits for the replay."""
        self.batches.update_entity({"PartitionKey": run_id, "RowKey": f"{batch:06d}", "status": status},
                                   mode=UpdateMode.MERGE)

    def batch_outcomes(self, run_id: str) -> list[dict]:
        found = self.batches.query_entities("PartitionKey eq @r", parameters={"r": run_id}, select=OUTCOME_FIELDS)
        return [_decode(e) for e in found]

    def dead_outcomes(self, run_id: str, most: int) -> list[dict]:
        """The run's dead batches and those being replayed, in batch order, at most `most` (one filtered query)."""
        statuses = " or ".join(f"status eq '{s}'" for s in UNSETTLED)
        found = self.batches.query_entities(f"PartitionKey eq @r and ({statuses})", parameters={"r": run_id},
                                            select=OUTCOME_FIELDS)
        return [_decode(e) for e in islice(found, most)]

    def delete_outcomes(self, run_id: str) -> int:
        """Delete the run's batch outcomes, a transaction of at most 100 at a time; returns how many."""
        found = self.batches.query_entities("PartitionKey eq @r", parameters={"r": run_id}, select=["RowKey"])
        count = 0
        while chunk := [("delete", {"PartitionKey": run_id, "RowKey": e["RowKey"]}) for e in islice(found, 100)]:
            self.batches.submit_transaction(chunk)
            count += len(chunk)
        return count

    def acknowledged(self, run_id: str):
        """What the run's settled batches acknowledged, batch by batch."""
        for entity in self.batches.query_entities("PartitionKey eq @r", parameters={"r": run_id},
                                                  select=["RowKey", "acks"]):
            yield from decode_acks(entity.get("acks"))


# Each export's runs are also listed in a partition of their own, newest first (Table storage returns a partition
# in RowKey order): a run's id with every hex digit inverted (0 <-> f), so a later id sorts first.
INDEXED = "~indexed"  # the mark that the export's runs before the index were added to it (sorts after every run)
_INVERT = str.maketrans("0123456789abcdef", "fedcba9876543210")
# The index of versions before 2026-12 inverted the digits and the letters apart ("9" -> "0", "a" -> "f"), which
# kept "9" before "a": runs started in the same second out of order. Its partition is emptied as the new one is built.
_LEGACY_PARTITION = "export~{}"


def _newest_first(run_id: str) -> str:
    return run_id.translate(_INVERT)


def _index_partition(export: str) -> str:
    return f"runs~{export}"  # export names are [a-z0-9-]: never "run"


def _index_entry(export: str, run_id: str) -> dict:
    return {"PartitionKey": _index_partition(export), "RowKey": _newest_first(run_id), "run": run_id}


def grouped(detail: list[dict]) -> list[dict]:
    """A batch's per-contact problems as stored: one entry per reason, with the masked addresses it applies to.
    A reason (up to 500 characters of an answer) is kept once, not once a contact, so an outcome of 100 contacts
    stays far inside a Table property's 64 KiB whatever the reasons."""
    reasons: dict[str, list[str]] = {}
    for problem in detail:
        reasons.setdefault(str(problem.get("reason", ""))[:REASON_MAX], []).append(str(problem.get("email", ""))[:40])
    return [{"reason": reason, "emails": emails} for reason, emails in list(reasons.items())[:REASONS_MAX]]


def problems(outcome: dict) -> list[dict]:
    """A stored outcome's problems, one per contact ({"email", "reason"}), from either form it was stored in."""
    stored = outcome.get("outcome") or []
    return [{"email": email, "reason": entry["reason"]} if "emails" in entry else entry
            for entry in stored for email in (entry.get("emails") or [None])] if stored else []


def _planning_stopped(run: dict) -> bool:
    """A run still planning long after its planning began (or queued long after it was created): the instance
    planning it is gone (planning is one call)."""
    if run.get("status") not in ("queued", "planning"):
        return False
    # Measured from when its planning began: a run queued behind others for a while is not stale once it plans.
    started = datetime.fromisoformat((run.get("planning_started") or run["created"]).replace("Z", "+00:00"))
    return (datetime.now(UTC) - started).total_seconds() > STALE_PLANNING


REASON_MAX, REASONS_MAX, ERROR_MAX = 500, 20, 2000


def _encode(entity: dict) -> dict:
    return {k: json.dumps(v) if k in JSON_FIELDS else v for k, v in entity.items()}


def _decode(entity) -> dict:
    return {k: json.loads(v) if k in JSON_FIELDS and isinstance(v, str) else v for k, v in dict(entity).items()}
