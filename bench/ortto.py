"""Ortto in tag mode (issue 17's targets, and issue 26's windows): a first sync of 100,000 profiles on Ortto's
Business plan (30 requests/s), then a 1% churn of them; and the same first sync with a 4% rate margin. The
connection names its plan ("business"); the Ortto simulator counts the plan's windows as Ortto does (600 requests
in any 10 s, 1,800 in any 60 s) and answers a 429 with try-in-seconds 1 (Ortto's documented example says 10).
Same measures as bench/throughput.py: the ceiling is accepted requests / rate, and the ratio ceiling / wall what
the app makes of the API's capacity; plus the most requests sent in any 10-s and 60-s window against the plan's.
The Business first sync is measured again with the simulator holding every answer 0.3 s (issue 29: a remote API's
latency; jitter 0), the request counted and applied on arrival."""

from __future__ import annotations

import os
import time

from bench.data import Churn, base_rows, export_doc, partitions_for
from bench.env import BenchStack, say
from bench.measure import Result, accepted, max_in_window, throttled, timed_run
from bench.throughput import COUNTED, POLL, Case, _ratio_figures, latency_inputs
from shared.pipeline.planner import expected_requests

PLAN, RATE = "business", 30.0
SYNC = Case("tag mode, 30 r/s", RATE, 0.95)
WIDE = Case("tag mode, 30 r/s, AUTOPILOT_RATE_MARGIN 0.04", RATE, 0.95)
LATENT = Case("tag mode, 30 r/s, 0.3 s latency", RATE, 0.95, latency=0.3)
# Professional's 10 r/s: a first sync of 100,000 (1,000 merges) lasts 100 s, so its 60-s windows are full ones.
PROFESSIONAL = Case("tag mode, Professional plan (10 r/s)", 10.0, 0.95)
WINDOWS = ((10.0, 20), (60.0, 60))  # Ortto's windows: (seconds, requests per unit of the plan's rate)
CHURN_S = 4.0
SEGMENT = "OrttoSegment"


def ortto_tags(quick: bool) -> Result:
    profiles = 5_000 if quick else 100_000
    result = Result("ortto_tags", "Ortto, tag mode: first sync at 30 requests/s, then a 1% churn; the plan's "
                                  "10-s and 60-s windows, at 30 and at 10 requests/s; 30 requests/s with the API "
                                  "answering 0.3 s later")
    churn = Churn.of(profiles)
    result.inputs = {"platform": "ortto (tools.ortto_sim, its own process, try-in-seconds 1)",
                     "membership": "list (a tag)", "profiles": profiles, "plan": f"{PLAN} (and professional)",
                     "rate_rps": RATE, "simulator_rate_rps": RATE,
                     "churn": churn.as_dict(), "hosts": 1, "host": COUNTED, "cores": os.cpu_count(),
                     "latency": {c.label: latency_inputs(c) for c in (SYNC, WIDE, LATENT, PROFESSIONAL)}}
    with BenchStack(result.name, sim_rate=RATE, ortto=True) as stack:
        result.inputs["PYTHON_THREADPOOL_THREAD_COUNT"] = stack.worker_threads
        host = _first_sync(result, stack, profiles, SYNC)
        _churn(result, stack, host, profiles, churn)
    with BenchStack(f"{result.name}-wide", sim_rate=RATE, ortto=True) as stack:
        _first_sync(result, stack, profiles, WIDE, AUTOPILOT_RATE_MARGIN="0.04")
    with BenchStack(f"{result.name}-professional", sim_rate=PROFESSIONAL.rate, ortto=True) as stack:
        _first_sync(result, stack, profiles, PROFESSIONAL, plan="professional")
    with BenchStack(f"{result.name}-latency", sim_rate=RATE, ortto=True, latency=LATENT.latency,
                    jitter=LATENT.jitter) as stack:
        _first_sync(result, stack, profiles, LATENT)
    return result


def _first_sync(result: Result, stack: BenchStack, profiles: int, case: Case, plan: str = PLAN, **settings: str):
    definition = export_doc("ortto", SEGMENT, "list", max_profiles=2 * profiles)
    definition["fields"].pop("Company")  # not an Ortto person field
    stack.define(definition, plan=plan)
    stack.snapshot(base_rows(profiles), SEGMENT, partitions_for(profiles))
    stack.sim.set_latency(case.latency, case.jitter)
    host = stack.host(case.rate, module=COUNTED, **settings)
    say(f"ortto_tags: first sync of {profiles} profiles, {case.label}")
    load = os.getloadavg()[0]
    run = timed_run(stack, host, "ortto", timeout=2 * profiles / 100 / case.rate + 300, poll=POLL)
    _ratio_figures(result, run, case)
    _window_figures(result, case.label, run.log, case.rate)
    merges = len(accepted(run.contact_requests))
    result.add(f"{case.label}: merges accepted", merges, "", f"= {profiles // 100}", merges == profiles // 100)
    result.details.setdefault("runs", {})[case.label] = {
        "runId": run.view["runId"], "counts": run.view["counts"], "timings": run.view["timings"],
        "load_average_1min": {"before": round(load, 2), "after": round(os.getloadavg()[0], 2)}}
    time.sleep(1)
    return host


def _churn(result: Result, stack: BenchStack, host, profiles: int, churn: Churn) -> None:
    say(f"ortto_tags: churn {churn.as_dict()}")
    stack.snapshot(churn.rows(), SEGMENT, partitions_for(profiles))
    changed = timed_run(stack, host, "ortto", timeout=600)
    took = changed.finished - changed.started
    expected = expected_requests(True, churn.joins, churn.changes, churn.leaves)
    sent = len(accepted(changed.contact_requests))
    result.add("1% churn: run start → finished", took, "s", f"≤ {CHURN_S:g} s", took <= CHURN_S)
    result.add("1% churn: merges accepted", sent, "", f"= formula ceil((j+c+l)/100) = {expected}", sent == expected)
    result.add("1% churn: 429s received", throttled(changed.contact_requests))
    _window_figures(result, "1% churn", changed.log, RATE)
    tagged = sum(1 for p in stack.sim.people().values() if "Bench ortto" in p["tags"])
    members = profiles - churn.leaves + churn.joins
    result.add("people tagged after the churn / segment size", f"{tagged} / {members}", "", "equal",
               tagged == members)
    result.details["runs"]["1% churn"] = {"runId": changed.view["runId"], "counts": changed.view["counts"],
                                          "timings": changed.view["timings"]}


def _window_figures(result: Result, label: str, log: list[dict], rate: float) -> None:
    """The most requests sent (answered or not) in any 10-s and 60-s window, against the plan's caps."""
    sent = [r["t"] for r in log if r["path"].startswith("/v1/")]
    for width, per_rate in WINDOWS:
        most, cap = max_in_window(sent, width), round(per_rate * rate)
        result.add(f"{label}: most requests in any {width:g}-s window", most, "", f"≤ {cap}", most <= cap)
