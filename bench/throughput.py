"""Benchmarks 1 and 2: a first sync at Autopilot's 5 requests/s, in field mode and in list mode.

The ceiling is the time the requests need at the rate limit (accepted requests / rate); the ratio
ceiling / wall says how much of the API's capacity the app turns into progress.
"""

from __future__ import annotations

from bench.data import base_rows, export_doc, partitions_for
from bench.env import BenchStack, say
from bench.measure import HostLog, Result, RunMeasure, accepted, throttled, tightest_span, timed_run
from shared.rate_budget import MARGIN

RATE = 5.0
TARGET_RATIO = 0.95
TARGET_429 = 0.01  # of requests sent


def field_sync(quick: bool) -> Result:
    profiles = 2_500 if quick else 100_000
    result = Result("field_sync", "Field mode, first sync")
    result.inputs = {"membership": "field", "profiles": profiles, "rate_rps": RATE, "simulator_rate_rps": RATE,
                     "hosts": 1, "host_options": "host.json"}
    _first_sync(result, "field-sync", "FieldSyncSegment", "field", profiles)
    return result


def list_sync(quick: bool) -> Result:
    joiners = 25 if quick else 2_000
    result = Result("list_sync", "List mode, first sync (every profile joins)")
    result.inputs = {"membership": "list", "joiners": joiners, "rate_rps": RATE, "simulator_rate_rps": RATE,
                     "hosts": 1, "host_options": "host.json"}
    _first_sync(result, "list-sync", "ListSyncSegment", "list", joiners)
    return result


def _first_sync(result: Result, export: str, segment: str, membership: str, profiles: int) -> None:
    with BenchStack(result.name, sim_rate=RATE) as stack:
        stack.define(export_doc(export, segment, membership))
        stack.snapshot(base_rows(profiles), segment, partitions_for(profiles))
        host = stack.host(RATE)
        say(f"{result.name}: {profiles} profiles, {membership} mode, {RATE:g} requests/s")
        cpu, logged = host.cpu_seconds(), HostLog.read(host)
        requests = profiles / 100 if membership == "field" else profiles
        run = timed_run(stack, host, export, timeout=2 * requests / RATE + 300)
        cpu, logged = host.cpu_seconds() - cpu, HostLog.read(host) - logged
    _throughput_figures(result, run, RATE)
    result.add("batches re-queued: too late for their slot / after a 429", f"{logged.missed_slot} / {logged.throttled}")
    result.add("host CPU per 1,000 contacts", 1000 * cpu / profiles, "s")
    batches = run.view["batches"]["planned"]
    result.add("rate-budget Table requests (reads + writes) per batch", logged.budget_requests / batches)


def _throughput_figures(result: Result, run: RunMeasure, rate: float) -> None:
    sent = [r for r in run.log if r["path"].startswith("/v1/")]
    ok = accepted(sent)
    ceiling = len(ok) / rate
    ratio = ceiling / run.wall
    too_many = throttled(sent)
    result.add("ratio ceiling / wall", ratio, "", f"≥ {TARGET_RATIO:g}", ratio >= TARGET_RATIO)
    result.add("wall, run start → last acknowledged batch", run.wall, "s")
    result.add("ceiling (accepted requests / rate)", ceiling, "s")
    result.add("requests sent", len(sent))
    result.add("requests accepted", len(ok))
    result.add("429s received", too_many, "", f"≤ {TARGET_429:.0%} of sent",
               too_many <= TARGET_429 * len(sent))
    result.add("best ratio the budget allows, 1 / (1 + MARGIN)", 1 / (1 + MARGIN))
    span = tightest_span([r["t"] for r in ok], rate)
    result.add(f"tightest span of {rate + 1:g} consecutive accepted requests (nominal {1 + MARGIN:g})", span, "s",
               "> 1 s", None if span is None else span > 1.0)
    result.add("first request after run start", run.first_request - run.started, "s")
    result.add("planning + queueing (POST answered)", run.planning, "s")
    result.add("run start → run finished", run.finished - run.started, "s")
    result.details["run"] = {"runId": run.view["runId"], "counts": run.view["counts"],
                             "plannedRequests": run.view["plannedRequests"], "timings": run.view["timings"]}
