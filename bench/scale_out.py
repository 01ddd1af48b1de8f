"""Scale-out (issue 29 item 3): one field-mode export sent at 50 requests/s with the API answering 0.25 s after each
request, by one, two and three hosts sharing one rate budget. On Azure, the instances of a function app polling
the same queues share the budget's Table entity; here, every host started on one stack does (they run on the
stack's storage account). The run is started through the first host's HTTP API; every host polls the queues and
sends whatever batches it takes. A stack per case, as bench.throughput does, so every run starts on empty queues
and tables.

Per case: the ratio ceiling / wall (ceiling = accepted requests / rate, wall = run start → last acknowledgement,
as bench.throughput computes it) and the steady ratio (first request → last acknowledgement), the most requests
the simulator saw in any 1-s sliding window and the tightest span of rate + 1 consecutive accepted requests (the
simulator allows exactly the rate, so both say whether the hosts together kept to it), the 429s, and how the
sending was shared: the batches each host settled, the contacts of those batches, and each host's CPU seconds.
Hosts are bench/counted_host.py (tools.local_host, real host.json, the Azure worker's thread count).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

from bench.data import base_rows, export_doc, partitions_for
from bench.env import ROOT, BenchError, BenchStack, Host, say
from bench.measure import HostLog, Result, RunMeasure, accepted, max_in_window, throttled, tightest_span, timed_run
from shared.destinations.rate_budget import MARGIN

COUNTED = "bench.counted_host"
RATE = 50.0  # requests/s: AUTOPILOT_REQUESTS_PER_SECOND and the simulator's limit
LATENCY = 0.25  # seconds the simulator holds every answer (jitter 0, so runs repeat)
HOSTS = (1, 2, 3)
PROFILES_FULL, PROFILES_QUICK = 100_000, 10_000
RATIO_TARGET = 0.93
POLL = 0.5  # seconds between GETs of the run's view (tools/local_run.py's interval)
_SETTLED = re.compile(r"batch \d+ settled: (\d+) accepted")


@dataclass(frozen=True)
class Case:
    hosts: int

    @property
    def label(self) -> str:
        return f"{self.hosts} host{'s' if self.hosts > 1 else ''}"


def scale_out(quick: bool) -> Result:
    profiles = PROFILES_QUICK if quick else PROFILES_FULL
    result = Result("scale_out", f"Scale-out: one field-mode run at {RATE:g} requests/s with {LATENCY:g} s latency, "
                                 "sent by 1, 2 and 3 hosts sharing one rate budget")
    queues = json.loads((ROOT / "host.json").read_text())["extensions"]["queues"]
    result.inputs = {
        "hosts": list(HOSTS), "host": f"{COUNTED} (tools.local_host, real host.json, SDK requests counted)",
        "rate_rps": RATE, "simulator_rate_rps": RATE, "simulator_latency_s": LATENCY, "simulator_jitter_s": 0.0,
        "membership": "field", "profiles": {"full": PROFILES_FULL, "quick": PROFILES_QUICK, "this run": profiles},
        "ratio_target": RATIO_TARGET, "cores": os.cpu_count(),
        "host.json queues": {"batchSize": queues.get("batchSize"),
                             "newBatchThreshold": queues.get("newBatchThreshold")},
        "scaling": "On Flex Consumption, target-based scaling asks for desired instances = queue length / "
                   f"batchSize (host.json extensions.queues.batchSize, here {queues.get('batchSize')}: the target "
                   "executions per instance of a Storage queue trigger), per function; the instances it adds poll "
                   "the same queues and share the one budget entity, as the hosts here do",
        "budget": "one rate-budget Table entity on the stack's storage, shared by every host of the stack",
        "start": "POST /api/exports/field/runs on the first host; its view polled there every "
                 f"{POLL:g} s; all hosts started before the run",
        "stacks": "one per case, as in bench.throughput",
    }
    for case in (Case(n) for n in HOSTS):
        with BenchStack(f"{result.name}-{case.hosts}", sim_rate=RATE, latency=LATENCY) as stack:
            result.inputs["PYTHON_THREADPOOL_THREAD_COUNT"] = stack.worker_threads
            stack.define(export_doc("field", "ScaleOutSegment", "field", max_profiles=max(100_000, profiles)))
            stack.snapshot(base_rows(profiles), "ScaleOutSegment", partitions_for(profiles))
            try:
                _case(result, stack, case, profiles)
            except BenchError as exc:  # keep the other cases
                result.fail(f"{case.label}: {exc}")
    result.notes.append(
        "The 2 and 3 host cases show that instances sharing one budget neither exceed the rate nor lose "
        "throughput: the simulator allows exactly the rate, so a window above it or a 429 would mean the hosts "
        "together overspent the shared budget, and a ratio below the 1-host case's would mean contention for the "
        "budget entity (or a host holding batches it cannot send yet) cost progress. The work is shared out by the "
        "queues (each host takes up to batchSize messages at a time), not by any assignment; hosts on one 2-core "
        "machine also share its CPU, which a Flex instance would not.")
    result.notes.append("A run's ratio counts its start too (the POST, planning the segment, the first request); the "
                        "steady ratio (first request → last acknowledgement) shows the sending alone.")
    if quick:
        result.notes.append(f"--quick: {profiles:,} profiles are {profiles // 100} requests, a "
                            f"{profiles / 100 / RATE:g} s ceiling, so the run's start (about 1 s to the first "
                            f"request) and the last answer's {LATENCY:g} s are a third of the wall: the ratio target "
                            f"is set for the full {PROFILES_FULL:,} profiles (a {PROFILES_FULL / 100 / RATE:g} s "
                            "ceiling).")
    return result


def _case(result: Result, stack: BenchStack, case: Case, profiles: int) -> None:
    stack.sim.set_rate(RATE)
    stack.sim.set_latency(LATENCY, 0.0)
    hosts = [stack.host(RATE, module=COUNTED) for _ in range(case.hosts)]
    say(f"{result.name}: {case.label}, {profiles} profiles at {RATE:g} r/s, {LATENCY:g} s latency")
    load = os.getloadavg()[0]
    offsets = [host.log_path.stat().st_size for host in hosts]
    cpu = [host.cpu_seconds() for host in hosts]
    logged = [HostLog.read(host) for host in hosts]
    requests = profiles // 100
    run = timed_run(stack, hosts[0], "field", timeout=2 * requests / RATE + 300, poll=POLL)
    time.sleep(1)  # the last invocations delete their messages after their functions return
    cpu = [host.cpu_seconds() - before for host, before in zip(hosts, cpu, strict=True)]
    logged = [HostLog.read(host) - before for host, before in zip(hosts, logged, strict=True)]
    shares = [_settled(host, offset) for host, offset in zip(hosts, offsets, strict=True)]
    _figures(result, case, run)
    label = case.label
    result.add(f"{label}: batches settled by each host", " / ".join(str(n) for n, _ in shares))
    result.add(f"{label}: contacts accepted in the batches each host settled", " / ".join(f"{c:,}" for _, c in shares))
    result.add(f"{label}: CPU seconds of each host during the run", " / ".join(f"{c:.1f}" for c in cpu), "s")
    result.add(f"{label}: batches re-queued: waiting for a request slot / after a 429",
               f"{sum(h.waited for h in logged)} / {sum(h.throttled for h in logged)}")
    result.add(f"{label}: rate-budget entity requests (all hosts)", sum(h.budget_requests for h in logged))
    result.details.setdefault("runs", {})[label] = {
        "runId": run.view["runId"], "counts": run.view["counts"], "timings": run.view["timings"],
        "batches": run.view["batches"], "per_host": [{"batches_settled": n, "contacts": c, "cpu_s": round(s, 2)}
                                                    for (n, c), s in zip(shares, cpu, strict=True)],
        "load_average_1min": {"before": round(load, 2), "after": round(os.getloadavg()[0], 2)}}


def _settled(host: Host, offset: int) -> tuple[int, int]:
    """(batches settled, contacts accepted in them) from byte `offset` of a host's log."""
    text = host.log_path.read_bytes()[offset:].decode(errors="replace")
    counts = [int(n) for n in _SETTLED.findall(text)]
    return len(counts), sum(counts)


def _figures(result: Result, case: Case, run: RunMeasure) -> None:
    label = case.label
    sent = [r for r in run.log if r["path"].startswith("/v1/")]
    ok = accepted(sent)
    ceiling = len(ok) / RATE
    ratio = ceiling / run.wall
    result.add(f"{label}: ratio ceiling / wall", ratio, "", f"≥ {RATIO_TARGET:g}", ratio >= RATIO_TARGET)
    result.add(f"{label}: steady ratio (ceiling / first request → last acknowledgement)",
               ceiling / max(1e-9, run.last_ack - run.first_request))
    worst = max_in_window([r["t"] for r in sent], 1.0)
    result.add(f"{label}: most requests sent in any 1-s window (the simulator accepts {RATE:g})", worst, "",
               f"≤ {RATE:g}", worst <= RATE)
    too_many = throttled(sent)
    result.add(f"{label}: 429s received", too_many, "", "0", too_many == 0)
    span = tightest_span([r["t"] for r in ok], RATE)
    result.add(f"{label}: tightest span of {RATE + 1:g} consecutive accepted requests (nominal {1 + MARGIN:g})",
               span, "s", "> 1 s", None if span is None else span > 1.0)
    result.add(f"{label}: requests sent / accepted", f"{len(sent)} / {len(ok)}")
    result.add(f"{label}: wall, run start → last acknowledged request", run.wall, "s")
    result.add(f"{label}: ceiling (accepted requests / rate)", ceiling, "s")
    result.add(f"{label}: first request after run start", run.first_request - run.started, "s")
