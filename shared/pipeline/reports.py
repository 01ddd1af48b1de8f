"""How a run ends and what it reports: batch outcomes summed into exact counts, the final report written
before the run is marked finished, and the view GET /api/runs/{id} shows."""

from __future__ import annotations

import json
from collections import Counter
from itertools import chain

from shared.runtime import signals
from shared.services import Services
from shared.source.contacts import mask_emails_in
from shared.source.export_config import Connection
from shared.state.run_records import ACTIVE, CANCELLING, REPLAYS, BatchOutcome, problems, run_log, utcnow
from shared.state.state_store import Destination, ExportState

REPORTS = "reports"


def after_batch(svc: Services, run_id: str, outcome: BatchOutcome | None = None) -> None:
    """Count a settled batch on its run (what the run view shows while it runs) and finish the run once every
    planned batch may be in. `outcome` None: a redelivered batch counted again, as a hint only."""
    done, planned = svc.records.count_done(run_id, outcome)
    if done >= planned:
        finish_if_complete(svc, run_id)


def finish_if_complete(svc: Services, run_id: str) -> bool:
    """Finish the run once every planned batch has an outcome (exact, from the outcomes themselves)."""
    run = svc.records.get(run_id)
    if not run or run.get("status") not in ("running",) or run.get("streaming"):
        return False  # (a streamed first sync is complete once its planning has counted its batches)
    outcomes = svc.records.batch_outcomes(run_id)
    if sum(o.get("status") not in REPLAYS for o in outcomes) < int(run.get("planned_batches", 0)):
        return False  # batches still to settle (or being replayed)
    totals = delivery_totals(outcomes)
    status = "succeeded" if not totals["failed"] and not totals["refused"] else (
        "partially succeeded" if totals["accepted"] else "failed")
    if conclude(svc, run_id, status, outcomes=outcomes):
        run_log(run_id, run["export"]).info("run %s: %s", status, totals)
    return True


CREATED_WITH = "created with email permission "  # a batch's count of people created with that permission


def delivery_totals(outcomes: list[dict]) -> dict:
    keys = ("contacts", "accepted", "rejected", "failed")
    totals = {k: sum(int(o.get(k, 0)) for o in outcomes) for k in keys}
    totals["refused"] = totals.pop("rejected")
    totals["sent"] = totals.pop("contacts")
    totals["dead_batches"] = sum(1 for o in outcomes if o.get("status") == "dead")
    results = Counter()
    for outcome in outcomes:
        results.update(outcome.get("results") or {})
    permissions = {key.removeprefix(CREATED_WITH): results.pop(key) for key in list(results)
                   if key.startswith(CREATED_WITH)}
    if results:  # what the destination said of each person it was sent (Ortto: created, merged, suppressed)
        totals["results"] = dict(sorted(results.items()))
    if permissions:  # and the email permission each person it created got
        totals["created_with_email_permission"] = dict(sorted(permissions.items()))
    return totals


def _problems(outcomes: list[dict]) -> list[dict]:
    return [d for o in outcomes for d in problems(o)]


def run_view(svc: Services, run_id: str, run: dict | None = None) -> dict | None:
    """What GET /api/runs/{id} shows: status, counts, timings, samples, where the full reports are. One read of
    the run's record, whatever its size: a running run shows the counters its batches bump as they settle, a
    finished one the exact totals summed from its outcomes when it ended."""
    run = run or svc.records.get(run_id)
    if run is None:
        return None
    if run.get("delivery"):
        delivery, settled = json.loads(run["delivery"]), int(run.get("settled", run.get("done", 0)))
    else:
        delivery = {name: int(run.get(f"c_{name}", 0)) for name in ("sent", "accepted", "refused", "failed")}
        delivery["dead_batches"] = int(run.get("c_dead", 0))
        settled = int(run.get("done", 0))
    return {
        "runId": run_id, "export": run["export"], "status": run.get("status"), "trigger": run.get("trigger"),
        "dryRun": bool(run.get("dry_run")), "force": bool(run.get("force")), "snapshot": run.get("snapshot"),
        "destination": run.get("destination") or None,
        "error": run.get("error") or None,
        "counts": {**(run.get("counts") or {}), **delivery},
        "batches": {"planned": int(run.get("planned_batches", 0)), "settled": settled,
                    "dead": delivery["dead_batches"]},
        "plannedRequests": run.get("planned_requests"),
        "plan": run.get("plan") or {},
        "timings": {k: run.get(k) for k in ("created", "started", "planning_started", "planned_at", "queued_at",
                                            "finished") if run.get(k)},
        "rejectedSample": run.get("rejected_sample") or [],
        "deliveryProblems": run.get("problems") or [],
        "reports": {"rejectedRows": f"{REPORTS}/{run_id}/rejected.jsonl", "report": f"{REPORTS}/{run_id}/report.json"},
    }


DEAD_LISTED = 200  # dead batches one run view lists (batches.dead counts them all)


def dead_batches(svc: Services, run: dict, view: dict) -> list[dict]:
    """The dead batches of a run (its record and view given), and those being replayed, as its view lists them: the
    reason masked like every reason in a report. Read only for a run that has some (counted dead, or replaying):
    the view of any other costs its one read still."""
    run_id = run["RowKey"]
    if not view["batches"]["dead"] and not (run.get("status") in ACTIVE and run.get("replay_started")):
        return []
    return [{"batch": int(o["RowKey"]), "kind": o.get("kind", ""), "contacts": int(o.get("contacts", 0)),
             "reason": mask_emails_in(str(o.get("error") or ""))[:500], "replaying": o.get("status") in REPLAYS}
            for o in svc.records.dead_outcomes(run_id, DEAD_LISTED)]


def conclude(svc: Services, run_id: str, status: str, error: str = "", outcomes: list[dict] | None = None) -> bool:
    """Write the run's final report (exact totals from its batch outcomes) and mark it finished, then fold what
    it acknowledged into its destination's state. The fold comes after: the run's end does not wait for it,
    and its acknowledgements are safe in its outcomes meanwhile (planning folds every ended run before it reads
    the state, so a fold this invocation does not finish is done by the next run). False if the run had already
    finished."""
    run = svc.records.get(run_id)
    outcomes = svc.records.batch_outcomes(run_id) if outcomes is None else outcomes
    problems = _problems(outcomes)
    totals = delivery_totals(outcomes)
    if status == "cancelled":  # the contacts planned and never sent
        counts = run.get("counts") or {}
        planned = sum(counts.get(k, 0) for k in ("joiners", "changed", "leavers")) - counts.get("kept_leavers", 0)
        totals["cancelled"] = max(0, planned - totals["sent"])
    final = {"delivery": json.dumps(totals), "settled": len(outcomes), "problems": problems[:20], "error": error}
    write_report(svc, run_id, {**run, **final, "status": status, "error": error or run.get("error")}, problems)
    finished = svc.records.finish(run_id, status, **final)
    if finished:
        signals.emit("run_ended", runId=run_id, export=run["export"], status=status,
                     connection=Connection.from_text(run.get("account", "")).name, sent=totals["sent"],
                     accepted=totals["accepted"], refused=totals["refused"], failed=totals["failed"],
                     deadBatches=totals["dead_batches"])
    if finished and run.get("status") in ("running", CANCELLING) and run.get("destination"):
        try:
            fold_state(svc, svc.state(run["export"]), Destination.from_public(run["destination"]))
        except Exception:
            run_log(run_id, run["export"]).exception("the acknowledged state was not folded at the run's end")
    return finished


def fold_state(svc: Services, state: ExportState, destination: Destination) -> int:
    """Fold the ended runs pending on `destination` into its snapshot."""
    def acks_of(run_id: str):
        run = svc.records.get(run_id)
        if run is not None and run.get("status") in ACTIVE:
            return None  # still sending
        return chain(state.planned(run_id), svc.records.acknowledged(run_id))

    return state.fold(destination, acks_of, lambda run_id: bool((svc.records.get(run_id) or {}).get("rebuild_state")))


def write_report(svc: Services, run_id: str, final: dict, problems: list[dict]) -> None:
    view = run_view(svc, run_id, final)
    view["timings"]["finished"] = utcnow()
    view["deliveryProblems"] = problems
    svc.host.blob.get_blob_client(REPORTS, f"{run_id}/report.json").upload_blob(
        json.dumps(view, indent=2), overwrite=True)


def is_synced(run: dict) -> bool:
    """A snapshot counts as synced once every contact reached Autopilot or was refused by it."""
    if run.get("status") == "succeeded":
        return True
    delivery = json.loads(run.get("delivery") or "{}")
    return run.get("status") == "partially succeeded" and not delivery.get("failed")
