"""How a run ends and what it reports: batch outcomes summed into exact counts, the final report written
before the run is marked finished, and the view GET /api/runs/{id} shows."""

from __future__ import annotations

import json
from itertools import chain

from shared.run_records import ACTIVE, FINISHED, run_log, utcnow
from shared.services import Services
from shared.state_store import Destination, ExportState

REPORTS = "reports"


def after_batch(svc: Services, run_id: str) -> None:
    done, planned = svc.records.count_done(run_id)
    if done >= planned:
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


def run_view(svc: Services, run_id: str, run: dict | None = None) -> dict | None:
    """What GET /api/runs/{id} shows: status, counts, timings, samples, where the full reports are."""
    run = run or svc.records.get(run_id)
    if run is None:
        return None
    outcomes = svc.records.batch_outcomes(run_id) if run.get("status") in ("running", *FINISHED) else []
    delivery = delivery_totals(outcomes)
    problems = [d for o in outcomes for d in o.get("outcome", [])][:20]
    counts = dict(run.get("counts") or {})
    return {
        "runId": run_id, "export": run["export"], "status": run.get("status"), "trigger": run.get("trigger"),
        "dryRun": bool(run.get("dry_run")), "force": bool(run.get("force")), "snapshot": run.get("snapshot"),
        "destination": run.get("destination") or None,
        "error": run.get("error") or None,
        "counts": {**counts, **delivery},
        "batches": {"planned": int(run.get("planned_batches", 0)), "settled": len(outcomes),
                    "dead": delivery["dead_batches"]},
        "plannedRequests": run.get("planned_requests"),
        "plan": run.get("plan") or {},
        "timings": {k: run.get(k) for k in ("created", "started", "planning_started", "planned_at", "queued_at",
                                            "finished") if run.get(k)},
        "rejectedSample": run.get("rejected_sample") or [],
        "deliveryProblems": problems,
        "reports": {"rejectedRows": f"{REPORTS}/{run_id}/rejected.jsonl", "report": f"{REPORTS}/{run_id}/report.json"},
    }


def conclude(svc: Services, run_id: str, status: str, error: str = "", **fields) -> bool:
    """Write the run's final report, fold what it acknowledged into its destination's state, then mark it
    finished: a finished run always has its report and, unless the fold failed (the next run of the export folds
    it before planning), its state. False if the run had already finished."""
    run = write_report(svc, run_id, status, error)
    if run.get("status") == "running":
        try:
            fold_state(svc, svc.state(run["export"]), Destination.from_public(run["destination"]), ending=run_id)
        except Exception:
            run_log(run_id, run["export"]).exception("the acknowledged state was not folded at the run's end")
    return svc.records.finish(run_id, status, error=error, **fields)


def fold_state(svc: Services, state: ExportState, destination: Destination, ending: str = "") -> int:
    """Fold the ended runs pending on `destination` into its snapshot (`ending`: a run being concluded)."""
    def acks_of(run_id: str):
        run = svc.records.get(run_id)
        if run_id != ending and run is not None and run.get("status") in ACTIVE:
            return None  # still sending
        return chain(state.planned(run_id), svc.records.acknowledged(run_id))

    return state.fold(destination, acks_of, lambda run_id: bool((svc.records.get(run_id) or {}).get("rebuild_state")))


def write_report(svc: Services, run_id: str, status: str, error: str) -> dict:
    """Write the final report; returns the run record it was made from."""
    run = svc.records.get(run_id)
    view = run_view(svc, run_id, run)
    view.update(status=status, error=error or view["error"])
    view["timings"]["finished"] = utcnow()
    view["deliveryProblems"] = [d for o in svc.records.batch_outcomes(run_id) for d in o.get("outcome", [])]
    svc.host.blob.get_blob_client(REPORTS, f"{run_id}/report.json").upload_blob(
        json.dumps(view, indent=2), overwrite=True)
    return run


def is_synced(run: dict) -> bool:
    """A snapshot counts as synced once every contact reached Autopilot or was refused by it."""
    if run.get("status") == "succeeded":
        return True
    delivery = json.loads(run.get("delivery") or "{}")
    return run.get("status") == "partially succeeded" and not delivery.get("failed")
