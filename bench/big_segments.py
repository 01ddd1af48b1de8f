"""Benchmark 7: big segments, issue 13's targets. Field mode, simulator and budget at 5 requests/s, one local host
(bench/counted_host.py: tools.local_host with real host.json, every Azure SDK request tagged with the invocation
that made it).

1. A real first sync of 100,000 profiles (at 10 requests/s, to set the scene, as bench/incremental.py does), then
   a 1% churn run at 5 requests/s and an unchanged rerun: run start → finished.
2. The same churn at 1,000,000 profiles, the acknowledged state seeded (below): run start → finished; and the
   storage requests each settled bulk batch costs, counted per send_batch invocation in the host's log.
3. A first run of the same 1,000,000-profile segment by a second export (no state): run start → the first contact
   request the simulator sees. The host is stopped then (all of it would take 35 minutes at 5 requests/s).
4. POST /api/exports/{name}/runs answer time, for both 1,000,000-profile runs.
5. Planning 10,000,000 rows (read + map + validate + diff against a seeded snapshot, streamed from its blob as a
   run streams it) in a fresh process (bench/planning.py's child): rows/s and peak memory above baseline.

Seeded state: the snapshot a real first sync of the segment before churn would leave. Every row is mapped with
shared.source.contacts.ContactMapper and fingerprinted with shared.pipeline.planner.fingerprint over the mapped
document, as the planner does (a rejected row is not acknowledged), member, sorted by key, and written with
ExportState.write naming one folded run; then that run is registered and folded, which finds it in the snapshot's
header and leaves the head naming the destination with nothing pending: what a first run's conclude leaves.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import subprocess
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import planning
from bench.counted_host import requests_by_invocation
from bench.data import Churn, StateLines, base_rows, export_doc, partitions_for
from bench.env import Api, BenchError, BenchStack, Host, say
from bench.measure import Result, RunMeasure, accepted, epoch, is_contact_request, throttled, timed_run
from bench.profiles import TOP, profile_table
from shared.pipeline.planner import expected_requests

ACTIVE = ("queued", "planning", "running")
RATE = 5.0  # Autopilot's limit: the simulator's and the budget's
INITIAL_RATE = 10.0  # the first sync of the 100,000 profiles only sets the scene (see bench/incremental.py)
HOST_MODULE = "bench.counted_host"
SMALL, BIG, FIRST = "big-small", "big-churn", "big-first"
HUGE = "big-planning"  # planned by bench/planning.py's child only, never run by a host
SEGMENTS = {SMALL: "BigSmallSegment", BIG: "BigSegment", FIRST: "BigSegment", HUGE: "HugeSegment"}
SEED_CHUNK = 50_000  # rows per task of the processes that make the seeded segment and state
TRIGGER_OWN = "queue autopilot-batches: DELETE message"  # the trigger's delete of its message (receive: poller)
# What each storage request of a settled batch is, in shared/ (for the breakdown in the notes).
CALLS = {
    "table runs: GET entity": "RunRecords.get (process_batch's run check; after_batch's, where it still reads the "
                              "run) and count_done's read (again on each If-Match conflict)",
    "table batches: GET entity": "RunRecords.has_batch (already settled? a redelivery)",
    "table batches: POST insert": "RunRecords.record_batch: outcome + acknowledged contacts, one insert",
    "table runs: PATCH entity": "RunRecords.count_done: the run's `done` hint, merged If-Match",
    "table ratebudget: GET entity": "RateBudget: read of the budget's next free time (the request's slot)",
    "table ratebudget: PUT entity": "RateBudget: the slot taken, written If-Match (again on each conflict)",
    "queue autopilot-batches: POST messages": "re-queue of a batch's rest",
}


@dataclass(frozen=True)
class Sizes:
    small: int
    big: int
    huge: int


FULL, QUICK = Sizes(100_000, 1_000_000, 10_000_000), Sizes(2_000, 20_000, 100_000)
TARGET = {"small_s": 4.0, "big_s": 30.0, "first_request_s": 40.0, "post_s": 1.0, "rows_per_s": 40_000,
          "peak_mb": 400.0, "storage_per_batch": 5.0}


def big_segments(quick: bool) -> Result:
    sizes = QUICK if quick else FULL
    result = Result("big_segments", "Big segments: churn runs, first run, run start answer, planning 10M rows, "
                                    "storage requests per batch")
    result.inputs = {
        "sizes": asdict(sizes), "membership": "field", "rate_rps": RATE, "simulator_rate_rps": RATE,
        "initial_sync_rate_rps": INITIAL_RATE, "churn": "1% of the segment, split evenly into joins, changes, leaves",
        "hosts": 1, "host": f"{HOST_MODULE} (tools.local_host with host.json's queue options)",
        "state": f"{sizes.small:,}: a real first sync; {sizes.big:,} and {sizes.huge:,}: seeded (see notes)",
    }
    definitions = {
        SMALL: export_doc(SMALL, SEGMENTS[SMALL], "field", max_profiles=2 * sizes.small),
        BIG: export_doc(BIG, SEGMENTS[BIG], "field", max_profiles=2 * sizes.big),
        FIRST: export_doc(FIRST, SEGMENTS[FIRST], "field", max_profiles=2 * sizes.big),
        HUGE: export_doc(HUGE, SEGMENTS[HUGE], "field", max_profiles=2 * sizes.huge),
    }
    posts: dict[str, float] = {}
    with BenchStack(result.name, sim_rate=RATE) as stack:
        threads = result.inputs["worker_threads"] = stack.worker_threads
        svc = _services(stack)
        try:
            stack.define(definitions[SMALL], definitions[BIG], definitions[FIRST])
            steps = (
                ("small churn", lambda: _small_churn(result, stack, sizes.small)),
                ("big churn", lambda: _big_churn(result, stack, svc, definitions[BIG], sizes.big, posts)),
                ("first run", lambda: _first_run(result, stack, sizes.big, posts)),
                ("planning", lambda: _planning(result, stack, svc, definitions, sizes)),
            )
            for name, step in steps:
                try:
                    step()
                except BenchError as exc:  # keep what the other steps measure
                    result.fail(f"{name}: {exc}")
        finally:
            stack.stop_hosts()
            svc.close()
    if posts:
        slowest = max(posts.values())
        result.add(f"POST /api/exports/{{name}}/runs answer, {sizes.big:,}-profile export (slowest of "
                   f"{len(posts)})", slowest, "s", f"≤ {TARGET['post_s']:g} s", slowest <= TARGET["post_s"])
        result.details["post_answer_s"] = {k: round(v, 3) for k, v in posts.items()}
    result.notes += _notes(sizes, threads)
    return result


def _services(stack: BenchStack):
    """The app's own services, on this stack's settings: seeding uses the app's state store and destination."""
    from shared.runtime.settings import Settings
    from shared.services import Services

    svc = Services(Settings.from_env(stack.settings(RATE)))
    svc.ensure_resources()
    return svc


def _host(stack: BenchStack, rate: float) -> Host:
    return stack.host(rate, module=HOST_MODULE)


# --- 1. churn at the small size, after a real first sync ------------------------------------------
def _small_churn(result: Result, stack: BenchStack, profiles: int) -> None:
    segment, churn, label = SEGMENTS[SMALL], Churn.of(profiles), f"{profiles:,} profiles"
    say(f"big_segments: real first sync of {profiles} profiles at {INITIAL_RATE:g} requests/s")
    stack.sim.set_rate(INITIAL_RATE)
    stack.snapshot(base_rows(profiles), segment, partitions_for(profiles))
    host = _host(stack, INITIAL_RATE)
    try:
        initial = timed_run(stack, host, SMALL, timeout=3 * profiles / 100 / INITIAL_RATE + 300)
    finally:
        stack.stop_hosts()
        stack.sim.set_rate(RATE)
    say(f"big_segments: churn {churn.as_dict()} at {RATE:g} requests/s")
    stack.snapshot(churn.rows(), segment, partitions_for(profiles))
    host = _host(stack, RATE)
    changed = timed_run(stack, host, SMALL, timeout=600)
    say("big_segments: rerun of an unchanged refresh")
    stack.snapshot(churn.rows(), segment, partitions_for(profiles))
    rerun = timed_run(stack, host, SMALL, timeout=600)
    took = changed.finished - changed.started
    result.add(f"{label}, 1% churn: run start → finished", took, "s", f"≤ {TARGET['small_s']:g} s",
               took <= TARGET["small_s"])
    result.add(f"{label}, 1% churn: where the time goes", _phase_text(changed))
    _request_figures(result, label, churn, changed)
    result.add(f"{label}: unchanged rerun, run start → finished", rerun.finished - rerun.started, "s")
    result.add(f"{label}: unchanged rerun, contact requests sent", len(rerun.contact_requests), "", "= 0",
               not rerun.contact_requests)
    result.add(f"{label}: first sync at {INITIAL_RATE:g} requests/s (sets the scene), run start → finished",
               initial.finished - initial.started, "s")
    result.details["small"] = {"churn": churn.as_dict(), "churn_run": _run_details(changed),
                               "rerun": _run_details(rerun), "first_sync": _run_details(initial)}


# --- 2. churn at the big size, state seeded; storage requests per batch ---------------------------
def _big_churn(result: Result, stack: BenchStack, svc, definition: dict, profiles: int,
               posts: dict[str, float]) -> None:
    churn, label = Churn.of(profiles), f"{profiles:,} profiles"
    say(f"big_segments: writing the churned {profiles}-profile segment and seeding the state before churn")
    seeded = seed(stack, svc, definition, churn)
    say(f"big_segments: seeded in {seeded['seconds']:.0f}s; churn run at {RATE:g} requests/s")
    host = stack.hosts[-1] if stack.hosts else _host(stack, RATE)
    offset = host.log_path.stat().st_size
    run = timed_run(stack, host, BIG, timeout=3 * expected_requests(True, churn.joins, churn.changes,
                                                                      churn.leaves) / RATE + 900, stall=600)
    posts[f"{BIG} (1% churn)"] = run.planning
    # The run's end folds its acknowledgements into the snapshot (before or after marking it finished, as the app
    # version does it): wait for that, so the concluding invocation's requests are all in the log.
    folded = _wait_folded(svc, BIG) - run.finished
    time.sleep(2)  # the concluding invocation deletes its message last
    took = run.finished - run.started
    result.add(f"{label}, 1% churn (state seeded): run start → finished", took, "s", f"≤ {TARGET['big_s']:g} s",
               took <= TARGET["big_s"])
    result.add(f"{label}, 1% churn: where the time goes", _phase_text(run))
    _request_figures(result, label, churn, run)
    result.details["big"] = {"churn": churn.as_dict(), "seeding": seeded, "churn_run": _run_details(run),
                             "state_folded_seen_after_finished_s (bench polling)": round(folded, 2)}
    _storage_figures(result, stack, host, offset, run)


def _wait_folded(svc, export: str, timeout: float = 600) -> float:
    """When the export's head had nothing pending any more (epoch seconds)."""
    state, deadline = svc.state(export), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not state.head()[0]["pending"]:
            return time.time()
        time.sleep(0.2)
    raise BenchError(f"the state of {export} was not folded within {timeout:.0f}s of the run's end")


def _storage_figures(result: Result, stack: BenchStack, host: Host, offset: int, run: RunMeasure) -> None:
    requests, messages = requests_by_invocation(host.log_path, stack.stack.azurite.ports, offset)
    invocations = {k: v for k, v in requests.items() if k.startswith("send_batch#")}
    storage = {k: [r for r in v if not r.startswith("other ") and r != TRIGGER_OWN] for k, v in invocations.items()}
    said = {k: " ".join(messages.get(k, [])) for k in invocations}
    settled = [k for k in storage if " settled: " in said[k]]
    concluding = [k for k in settled if "] run succeeded" in said[k] or "] run partially succeeded" in said[k]
                  or "] run failed" in said[k]]
    steady = [k for k in settled if k not in concluding]
    if not settled:
        raise BenchError("no settled batch found in the host's log")
    total = sum(len(v) for v in storage.values())
    per_batch = total / len(settled)
    steady_total = sum(len(v) for k, v in storage.items() if k not in concluding)
    if steady:
        per_steady = steady_total / len(steady)
        result.add("storage requests per settled bulk batch (send_batch invocations, re-queued attempts included, "
                   "the run's concluding invocation excluded; the trigger's receive/delete excluded)", per_steady, "",
                   f"≤ {TARGET['storage_per_batch']:g}", per_steady <= TARGET["storage_per_batch"])
    result.add(f"the same with the run's end (the concluding invocation) spread over its {len(settled)} batches",
               per_batch, "", f"≤ {TARGET['storage_per_batch']:g}", per_batch <= TARGET["storage_per_batch"])
    counts = [len(storage[k]) for k in steady]
    if counts:
        calls = Counter(r for k in steady for r in storage[k])
        result.add("storage requests of a settled batch, by call (average per settled batch, concluding one "
                   "excluded)", "; ".join(f"{n / len(steady):.2f}x {call}" for call, n in calls.most_common()))
        budget = sum(n for call, n in calls.items() if call.startswith("table ratebudget: "))
        result.add("of which the rate budget's own (slot reads and writes), per settled batch", budget / len(steady))
    if concluding:
        result.add("storage requests of the invocation that concluded the run (its batch, report, outcomes, fold)",
                   len(storage[concluding[0]]))
    unsettled = len(invocations) - len(settled)
    receives = sum(1 for r in requests.get("-queue-send_batch", []) if r == "queue autopilot-batches: GET messages")
    other = Counter(r for v in invocations.values() for r in v if r.startswith("other "))
    result.details["storage_requests"] = {
        "run": run.view["runId"], "send_batch_invocations": len(invocations), "settled_batches": len(settled),
        "invocations_not_settling (re-queued or redelivered)": unsettled, "total_storage_requests": total,
        "per_settled_batch": round(per_batch, 3), "total_without_concluding": steady_total,
        "steady_invocations": len(steady), "steady_median": statistics.median(counts) if counts else None,
        "steady_min_max": [min(counts), max(counts)] if counts else None,
        "by_call_steady": {call: {"per_invocation": round(n / len(steady), 3), "what": CALLS.get(call, "")}
                           for call, n in Counter(r for k in steady for r in storage[k]).most_common()},
        "concluding_invocation": dict(Counter(storage[concluding[0]])) if concluding else None,
        "trigger_own": {"deletes": sum(v.count(TRIGGER_OWN) for v in invocations.values()),
                        "receives_by_the_poller_incl_empty_polls": receives},
        "not_storage (Key Vault)": dict(other),
    }


# --- 3. a first run at the big size: start → first request --------------------------------------
def _first_run(result: Result, stack: BenchStack, profiles: int, posts: dict[str, float]) -> None:
    host = stack.hosts[-1] if stack.hosts else _host(stack, RATE)
    api = Api(host)
    say(f"big_segments: first run of the {profiles}-profile segment (export {FIRST}, no state)")
    stack.sim.reset_log()
    started = time.time()
    view = api.start(FIRST)
    posted = time.time()
    posts[f"{FIRST} (first run)"] = posted - started
    deadline, first, polls = time.monotonic() + 900, None, 0
    while first is None:  # the simulator's log, not the host, is polled (the host is busy planning)
        if time.monotonic() > deadline:
            raise BenchError(f"no contact request within 900 s of starting run {view['runId']}")
        time.sleep(0.25)
        polls += 1
        first = min((r["t"] for r in stack.sim.request_log() if is_contact_request(r)), default=None)
        if first is None and polls % 40 == 0 and api.view(view["runId"])["status"] not in ACTIVE:
            raise BenchError(f"run {view['runId']} ended before sending: {api.view(view['runId'])}")
    view = api.view(view["runId"])
    for _ in range(240):  # the first window is still being queued when its first batch is sent
        if "queued_at" in view["timings"]:
            break
        time.sleep(0.25)
        view = api.view(view["runId"])
    stack.stop_hosts()  # the rest of the run is a first sync at 5 requests/s: not what is measured
    took = first - started
    result.add(f"first run of {profiles:,} profiles: run start → first contact request", took, "s",
               f"≤ {TARGET['first_request_s']:g} s", took <= TARGET["first_request_s"])
    t = {k: epoch(v) for k, v in view["timings"].items()}
    phases = {"POST answered": posted - started,
              "start → planning started (plan queue pickup)": t["planning_started"] - started,
              "planning (fold, read, map, diff, write pages)": t["planned_at"] - t["planning_started"],
              "planned → first request (booking the first slots, queueing, the 1.5 s lead)": first - t["planned_at"]}
    if "queued_at" in t:  # overlaps the sending: the window's later batches are queued while the first are sent
        phases["(planned → first window of batches all queued)"] = t["queued_at"] - t["planned_at"]
    result.add(f"first run of {profiles:,} profiles: where the time goes", _join(phases))
    result.details["first_run"] = {"runId": view["runId"], "counts": view["counts"], "timings": view["timings"],
                                   "batches": view["batches"], "plannedRequests": view.get("plannedRequests"),
                                   "phases_s": {k: round(v, 2) for k, v in phases.items()}}


# --- 5. planning at the huge size ---------------------------------------------------------------
def _planning(result: Result, stack: BenchStack, svc, definitions: dict, sizes: Sizes) -> None:
    rows, label = sizes.huge, f"planning {sizes.huge:,} rows"
    free = _free_gb(stack.out)
    if free < rows / 1_000_000 * 1.2:  # CSV in Azurite (~0.19 GB per 1M rows), SQLite working set, snapshot
        raise BenchError(f"{free:.0f} GB free: too little disk for {rows:,} rows")
    churn = Churn.of(rows)
    say(f"big_segments: writing a {rows}-row export and seeding its state (several minutes at 10,000,000)")
    seeded = seed(stack, svc, definitions[HUGE], churn)
    say(f"big_segments: inputs ready in {seeded['seconds']:.0f}s; planning in a fresh process")
    spec = {"storage": stack.stack.storage, "definition": definitions[HUGE],
            "state": _destination(svc, definitions[HUGE]).public()}
    measured = planning._child(spec, stack.out / f"planning-{rows}.json")
    rate = measured["rows"] / measured["seconds"]
    result.add(f"{label}: rows/s (read + map + validate + diff)", round(rate), "rows/s",
               f"≥ {TARGET['rows_per_s']:,}", rate >= TARGET["rows_per_s"])
    result.add(f"{label}: peak memory (RSS above baseline)", measured["peak_mb"], "MB", f"≤ {TARGET['peak_mb']:g} MB",
               measured["peak_mb"] <= TARGET["peak_mb"])
    result.add(f"{label}: planning time", measured["seconds"], "s")
    result.add(f"{label}: where the time goes", _join(measured["phases_s"]))
    result.add(f"{label}: rows per CPU second", round(measured["rows"] / measured["cpu_seconds"]), "rows/s")
    result.details["planning"] = {"rows": rows, "measured": measured, "seeding": seeded}
    # Where planning time goes: the same child under cProfile, at the small size against its real snapshot.
    stats = stack.out / "planning-small.prof"
    planning._child(dict(spec, definition=definitions[SMALL], state=_destination(svc, definitions[SMALL]).public(),
                         profile=str(stats)), stack.out / "planning-small-profiled.json")
    result.details.setdefault("text", {})[
        f"Planning {sizes.small:,} rows against their snapshot under cProfile, top {TOP} by own time"] = \
        profile_table(stats, TOP)


def _free_gb(path: Path) -> float:
    stat = os.statvfs(path if path.exists() else path.parent)
    return stat.f_bavail * stat.f_frsize / 2**30


# --- seeding: the churned segment, and the state a real first sync of the segment before it leaves ----------
def _export(definition: dict):
    from shared.source.export_config import parse_exports

    return parse_exports({"exports": [definition]})[0]


def _destination(svc, definition: dict):
    return svc.destination(_export(definition))


def seed(stack: BenchStack, svc, definition: dict, churn: Churn) -> dict:
    """Write the churned segment (as Customer Insights would) and the snapshot + head a real first sync of the
    segment before churn leaves (see the module's docstring). Returns what it took."""
    from shared.state.run_records import new_run_id
    from shared.state.state_store import Acked

    export = _export(definition)
    unsorted, ordered = stack.out / f"{export.name}.acked", stack.out / f"{export.name}.acked.sorted"
    started = time.monotonic()
    with open(unsorted, "w", encoding="utf-8") as acked:
        stack.snapshot(_rows_and_state(definition, churn, acked), SEGMENTS[export.name],
                       partitions_for(churn.profiles))
    written = time.monotonic()
    # Snapshot entries are sorted by key (Python's str order; keys are lower-case ASCII, so C collation agrees).
    subprocess.run(["sort", "-t", "\t", "-k1,1", "-S", "512M", "--parallel=2", "-T", str(stack.out), "-o",
                    str(ordered), str(unsorted)], env={**os.environ, "LC_ALL": "C"}, check=True, timeout=1800)
    unsorted.unlink()
    state, destination, run_id = svc.state(export.name), svc.destination(export), new_run_id()
    entries = 0

    def lines():
        nonlocal entries
        with open(ordered, encoding="utf-8") as source:
            for line in source:
                key, fp, member, source = line.rstrip("\n").split("\t")
                entries += 1
                yield Acked(key, fp, member == "1", source)

    state.write(destination, lines(), [run_id], None)
    state.register(run_id, destination)
    state.fold(destination, lambda run: [])  # finds the run in the snapshot's header: drops it from pending
    ordered.unlink()
    head = state.head()[0]
    if head["pending"] or head["destination"] != destination.id:
        raise BenchError(f"seeding left the head of {export.name} as {head}")
    return {"rows_in_segment": churn.profiles + churn.joins - churn.leaves, "state_entries": entries,
            "seconds": round(time.monotonic() - started, 1), "segment_and_fingerprints_s": round(written - started, 1),
            "sort_write_snapshot_s": round(time.monotonic() - written, 1), "folded_run": run_id,
            "worker_processes": _workers()}


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _rows_and_state(definition: dict, churn: Churn, acked):
    """The churned segment's rows, in order; the state lines of the segment before churn go to `acked`.
    Profiles are made and mapped by worker processes (spawned: this process runs threads), a chunk at a time."""
    end = churn.profiles + churn.joins
    jobs = [(definition, churn, start, min(start + SEED_CHUNK, end)) for start in range(0, end, SEED_CHUNK)]
    with multiprocessing.get_context("spawn").Pool(_workers()) as pool:
        pending: deque = deque()
        for job in jobs:  # a few chunks in flight at most: made chunks must not pile up in memory
            pending.append(pool.apply_async(_chunk, (job,)))
            if len(pending) > 2 * _workers():
                yield from _take(pending.popleft(), acked)
        while pending:
            yield from _take(pending.popleft(), acked)


def _take(task, acked):
    rows, lines = task.get(timeout=600)
    acked.write(lines)
    yield from rows


_mappers: dict[str, object] = {}


def _chunk(job) -> tuple[list[tuple[str, ...]], str]:
    """Profiles start..stop-1: the churned segment's rows, and the state lines of the segment before churn."""
    from tools.generate_export import profile

    definition, churn, start, stop = job
    state = _mappers.get(definition["name"])
    if state is None:
        state = _mappers[definition["name"]] = StateLines(definition)
    rows, lines = [], []
    for i in range(start, stop):
        row = profile(i)
        if i < churn.profiles:  # in the segment before churn: what its first sync acknowledged
            lines.append(state.line(i + 1, row))
        if i >= churn.leaves:  # in the churned segment
            rows.append(churn.row(i, row))
    return rows, "".join(lines)


# --- figures shared by the runs -------------------------------------------------------------------
def _phases(run: RunMeasure) -> dict[str, float]:
    t = {k: epoch(v) for k, v in run.view["timings"].items()}
    t.setdefault("queued_at", t["planned_at"])  # nothing to queue (an unchanged rerun)
    phases = {"POST answered": run.posted - run.started,
              "start → planning started (plan queue pickup)": t["planning_started"] - run.started,
              "planning (fold, read, map, diff, write pages)": t["planned_at"] - t["planning_started"],
              "booking + queueing": t["queued_at"] - t["planned_at"]}
    sent = run.contact_requests
    if sent:
        last = max(r["t"] for r in sent)
        phases.update({"queued → first request": run.first_request - t["queued_at"],
                       "first → last request": last - run.first_request,
                       "last request → finished (settle, report, fold)": t["finished"] - last})
    else:
        phases["queued → finished"] = t["finished"] - t["queued_at"]
    return phases


def _join(phases: dict[str, float]) -> str:
    return "; ".join(f"{k} {v:.2f} s" for k, v in phases.items())


def _phase_text(run: RunMeasure) -> str:
    return _join(_phases(run))


def _request_figures(result: Result, label: str, churn: Churn, run: RunMeasure) -> None:
    expected = expected_requests(True, churn.joins, churn.changes, churn.leaves)
    ok = len(accepted(run.contact_requests))
    result.add(f"{label}, 1% churn: contact requests accepted", ok, "", f"= formula {expected}", ok == expected)
    result.add(f"{label}, 1% churn: 429s received", throttled(run.contact_requests))


def _run_details(run: RunMeasure) -> dict:
    return {"runId": run.view["runId"], "counts": run.view["counts"], "timings": run.view["timings"],
            "batches": run.view["batches"], "phases_s": {k: round(v, 3) for k, v in _phases(run).items()}}


def _notes(sizes: Sizes, threads: int) -> list[str]:
    return [
        f"Conditions: one host process (tools.local_host with per-invocation request tags), host.json queue options, "
        f"invocations on one worker pool of {threads} threads (PYTHON_THREADPOOL_THREAD_COUNT); planning is one "
        f"invocation on one thread. Simulator and budget at {RATE:g} requests/s; the benchmark polls the run view "
        "over HTTP, which the host serves meanwhile. Machine load: see load_average_1min (other benchmarks or tests "
        "running on the same 2 cores slow planning, the figure most sensitive to it).",
        f"The {sizes.small:,}-profile state comes from a real first sync (at {INITIAL_RATE:g} requests/s). The "
        f"{sizes.big:,}- and {sizes.huge:,}-profile states are seeded, not synced (a real first sync of "
        f"{sizes.big:,} profiles takes 2,000 s at 5 requests/s): the snapshot a real first sync of the segment "
        "before churn leaves, every row mapped with ContactMapper and fingerprinted with planner.fingerprint, "
        "written with ExportState.write naming one folded run, then registered and folded (head: the destination, "
        "nothing pending). The seeded export had no earlier run record or run lock, so its POST creates the lock "
        "instead of taking it over (one request fewer than a later run's start).",
        f"The first run of {sizes.big:,} profiles uses a second export on the same segment (no state); the host "
        "is stopped after the first contact request.",
        "Storage requests per batch: every Azure SDK request the host logged inside a send_batch invocation "
        "(tagged per invocation by bench/counted_host.py) during the 1% churn run at the big size, the trigger's "
        "delete of the message excluded (its receive is the poller's, not an invocation's), divided by settled "
        "batches; re-queued invocations count in the total, as does the run's concluding invocation (report, "
        "outcome query, fold of the state). Key Vault reads are not storage (listed apart).",
        f"Planning {sizes.huge:,} rows: bench/planning.py's child process, reading the CDM export from Azurite and "
        "the destination's snapshot blob (ExportState.load), 1% churn against it; peak memory is VmHWM above the "
        "child's peak after imports.",
    ]
