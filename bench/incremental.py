"""Benchmark 3: an incremental sync. A segment is synced once (fast, to set the scene), then 1% of it churns
(joins, changes, leaves) and the next run must send exactly the requests the formula says; a rerun of an
unchanged refresh must send no contact request at all. Field mode and list mode each get an export.
"""

from __future__ import annotations

from bench.data import Churn, base_rows, export_doc, partitions_for
from bench.env import BenchStack, say
from bench.measure import Result, RunMeasure, accepted, throttled, timed_run
from shared.pipeline.planner import expected_requests, list_ops_for

RATE = 5.0  # the churn run and the rerun: Autopilot's real limit
# The initial syncs only set the scene, so they run faster, but no faster than one local host keeps up with on
# a busy machine: a message picked up after its slot takes a fresh one, and at 50/s and above the pacer can then
# spin on the budget for good (a livelock, reported).
INITIAL_RATE = {"field": 10.0, "list": 20.0}


def incremental(quick: bool) -> Result:
    sizes = {"field": 2_000, "list": 100} if quick else {"field": 100_000, "list": 2_000}
    result = Result("incremental", "Incremental sync (1% churn) and unchanged rerun")
    result.inputs = {
        "profiles": sizes, "churn": "1% of the segment, split evenly into joins, changes, leaves",
        "initial_sync_rate_rps": INITIAL_RATE, "churn_and_rerun_rate_rps": RATE, "hosts": 1,
        "host_options": "host.json",
    }
    with BenchStack(result.name, sim_rate=RATE) as stack:
        # maxProfiles with room for the joiners: the churned segment is a little larger than the first one.
        stack.define(*(export_doc(f"inc-{mode}", _segment(mode), mode, max_profiles=2 * n)
                       for mode, n in sizes.items()))
        for mode, profiles in sizes.items():
            _mode(result, stack, mode, profiles)
    result.notes.append(
        "List mode uses a smaller segment: its first sync is one request per profile, and it cannot be sped up "
        "past about 20 requests/s on a busy machine (at 50/s and above the pacer's fresh-slot loop can spin on "
        "the budget for good; reported). 100,000 joins at 20/s would take 87 minutes.")
    return result


def _segment(mode: str) -> str:
    return f"Inc{mode.capitalize()}Segment"


def _mode(result: Result, stack: BenchStack, mode: str, profiles: int) -> None:
    export, segment, churn = f"inc-{mode}", _segment(mode), Churn.of(profiles)
    rate, requests = INITIAL_RATE[mode], profiles / 100 if mode == "field" else profiles
    say(f"incremental/{mode}: initial sync of {profiles} profiles at {rate:g} requests/s")
    initial = _run_at(stack, rate, export, lambda: stack.snapshot(
        base_rows(profiles), segment, partitions_for(profiles)), timeout=3 * requests / rate + 300)
    say(f"incremental/{mode}: churn {churn.as_dict()} at {RATE:g} requests/s")
    stack.snapshot(churn.rows(), segment, partitions_for(profiles))
    host = stack.host(RATE)
    changed = timed_run(stack, host, export, timeout=3 * profiles / 100 / RATE + 300)
    say(f"incremental/{mode}: rerun of an unchanged refresh")
    stack.snapshot(churn.rows(), segment, partitions_for(profiles))
    rerun = timed_run(stack, host, export, timeout=600)
    stack.stop_hosts()
    _figures(result, mode, churn, initial, changed, rerun)


def _run_at(stack: BenchStack, rate: float, export: str, write_snapshot, timeout: float) -> RunMeasure:
    """A run with the simulator and the budget at `rate`; the host is stopped afterwards."""
    stack.sim.set_rate(rate)
    write_snapshot()
    host = stack.host(rate)
    try:
        return timed_run(stack, host, export, timeout)
    finally:
        stack.stop_hosts()
        stack.sim.set_rate(RATE)


def _figures(result: Result, mode: str, churn: Churn, initial: RunMeasure, changed: RunMeasure,
             rerun: RunMeasure) -> None:
    counts = changed.view["counts"]
    expected = expected_requests(mode == "field", churn.joins, churn.changes, churn.leaves, list_ops=list_ops_for(RATE))
    sent = changed.contact_requests
    ok = len(accepted(sent))
    plan_matches = (counts.get("joiners"), counts.get("changed"), counts.get("leavers")) == (
        churn.joins, churn.changes, churn.leaves)
    result.add(f"{mode}: planned joiners / changed / leavers",
               f"{counts.get('joiners')} / {counts.get('changed')} / {counts.get('leavers')}", "",
               f"= {churn.joins} / {churn.changes} / {churn.leaves}", plan_matches)
    result.add(f"{mode}: contact requests accepted (churn run)", ok, "", f"= formula {expected}", ok == expected)
    result.add(f"{mode}: contact requests sent, incl. 429s (churn run)", len(sent))
    result.add(f"{mode}: 429s received (churn run)", throttled(sent))
    result.add(f"{mode}: churn run wall, start → last ack", changed.wall, "s")
    result.add(f"{mode}: churn run planning + queueing", changed.planning, "s")
    result.add(f"{mode}: churn run start → finished", changed.finished - changed.started, "s")
    rerun_sent = len(rerun.contact_requests)
    result.add(f"{mode}: contact requests sent (unchanged rerun)", rerun_sent, "", "= 0", rerun_sent == 0)
    result.add(f"{mode}: unchanged rerun start → finished", rerun.finished - rerun.started, "s")
    result.add(f"{mode}: initial sync start → finished", initial.finished - initial.started, "s")
    result.details[mode] = {
        "churn": churn.as_dict(), "expected_requests": expected,
        "initial": initial.view["counts"], "churn_run": counts, "rerun": rerun.view["counts"],
        "timings": {"initial": initial.view["timings"], "churn_run": changed.view["timings"],
                    "rerun": rerun.view["timings"]},
    }
