"""Benchmark 5: the app's own overhead (issue 14's "light sending path"). The simulator is unthrottled and the
budget far above what one host sends, so the run goes as fast as the queue and the sender can go: contacts per
second, and CPU seconds of the host process per 1,000 contacts. A dry run of the same export first measures
planning alone, so the queue + sender share can be told apart.

The measured host logs as the app does in Azure (the Azure SDK at WARNING, no request counted); the storage
requests per batch are counted by the throughput benchmarks' counted hosts instead. Then a profiled host
(bench/profiled_host.py) runs a smaller export of the same kind, every invocation under cProfile timed by its
thread's CPU time (concurrent invocations add up to the CPU they cost, waits excluded): where the host's CPU goes.
"""

from __future__ import annotations

import pstats
import re

from bench.data import base_rows, export_doc, partitions_for
from bench.env import BenchError, BenchStack, cpu_seconds, say
from bench.measure import Result, RunMeasure, timed_run
from bench.profiles import CUMULATIVE, OWN, TOP, calls, table, top

# The budget: 100 requests/s (10,000 contacts/s, twice the target: not the limit), and 1000/s (Autopilot allows
# no such rate; it shows what the pacer costs when slots are 1 ms apart).
BUDGET_RATES = (100.0, 1000.0)
PROFILE_RATE = BUDGET_RATES[0]
SEGMENT, PROFILED = "OverheadSegment", "ProfiledSegment"
TARGET_CONTACTS_S = 5_000
TARGET_CPU_PER_K = 0.15


def overhead(quick: bool) -> Result:
    contacts = 2_000 if quick else 100_000
    profiled = 1_000 if quick else 5_000
    result = Result("overhead", "Overhead: queue + sender, simulator unthrottled")
    with BenchStack(result.name, sim_rate=0) as stack:
        result.inputs = {"membership": "field", "contacts": contacts, "simulator_rate": "unthrottled",
                         "budget_rates_rps": list(BUDGET_RATES), "hosts": 1,
                         "host": "tools.local_host, real host.json, app logging as in Azure (SDK at WARNING)",
                         "PYTHON_THREADPOOL_THREAD_COUNT": stack.worker_threads,
                         "profile": f"{profiled} contacts, budget {PROFILE_RATE:g}/s, every invocation under "
                                    "cProfile (thread CPU time)",
                         "cpu": "user + system CPU of each process (/proc/PID/stat)"}
        stack.define(*(export_doc(_export(rate), SEGMENT, "field") for rate in BUDGET_RATES),
                     export_doc("overhead-profiled", PROFILED, "field"))
        stack.snapshot(base_rows(contacts), SEGMENT, partitions_for(contacts))
        stack.snapshot(base_rows(profiled), PROFILED, partitions_for(profiled))
        for rate in BUDGET_RATES:
            try:
                _measure(result, stack, contacts, rate)
            except BenchError as exc:  # keep the other measurements
                result.fail(f"budget {rate:g}/s: {exc}")
        try:
            _profile(result, stack, profiled)
        except BenchError as exc:
            result.fail(f"profiled run: {exc}")
    result.notes.append(f"{contacts:,} contacts in field mode: {contacts // 100:,} bulk requests of 100. The machine's "
                        "cores are shared by the host, Azurite (storage emulator, Node) and the simulator: their "
                        "CPU per 1,000 contacts is given too, as is the machine's load.")
    return result


def _export(rate: float) -> str:
    return f"overhead-{rate:g}"


def _measure(result: Result, stack: BenchStack, contacts: int, rate: float) -> None:
    export, label = _export(rate), f"budget {rate:g}/s"
    host = stack.host(rate)
    azurite = stack.stack.azurite._proc.pid
    say(f"overhead: dry run (planning only) of {contacts} contacts")
    cpu = host.cpu_seconds()
    timed_run(stack, host, export, timeout=600, dryRun=True)
    planning_cpu = host.cpu_seconds() - cpu
    say(f"overhead: full run of {contacts} contacts, simulator unthrottled, {label}")
    cpu, sim_cpu, storage_cpu = host.cpu_seconds(), cpu_seconds(stack.sim.pid), cpu_seconds(azurite)
    try:
        run = timed_run(stack, host, export, timeout=contacts / 20 + 300, poll=0.5)
        run_cpu = host.cpu_seconds() - cpu
        sim_cpu, storage_cpu = cpu_seconds(stack.sim.pid) - sim_cpu, cpu_seconds(azurite) - storage_cpu
    finally:
        stack.stop_hosts()
    accepted = run.view["counts"]["accepted"]
    # From the first request to the run's end: the settling of the last batches (state, outcome) counts too.
    send_window = run.finished - run.first_request
    per_k = 1000 / accepted
    speed = accepted / send_window
    result.add(f"{label}: contacts/s through queue + sender, one host (first request → run finished)", speed,
               "contacts/s", f"≥ {TARGET_CONTACTS_S:,}", speed >= TARGET_CONTACTS_S)
    result.add(f"{label}: contacts/s end to end (run start → finished)", accepted / (run.finished - run.started),
               "contacts/s")
    result.add(f"{label}: host CPU per 1,000 contacts (the whole run: planning, queueing, sending)",
               run_cpu * per_k, "s", f"≤ {TARGET_CPU_PER_K:g} s", run_cpu * per_k <= TARGET_CPU_PER_K)
    result.add(f"{label}: host CPU per 1,000 contacts, queue + sender (run - dry run)",
               (run_cpu - planning_cpu) * per_k, "s")
    result.add(f"{label}: host CPU per 1,000 contacts, planning alone (dry run)", planning_cpu * per_k, "s")
    result.add(f"{label}: host CPU seconds per second of sending (cores busy)", run_cpu / send_window)
    result.add(f"{label}: Azurite CPU per 1,000 contacts", storage_cpu * per_k, "s")
    result.add(f"{label}: simulator CPU per 1,000 contacts", sim_cpu * per_k, "s")
    result.add(f"{label}: Autopilot requests per second (first request → run finished)",
               len(run.contact_requests) / send_window, "requests/s")
    result.details[label] = _run_details(run)


def _profile(result: Result, stack: BenchStack, contacts: int) -> None:
    stats_path = stack.out / "invocations.prof"
    stats_path.unlink(missing_ok=True)
    host = stack.host(PROFILE_RATE, module="bench.profiled_host", extra=("--stats", str(stats_path)),
                      scale_groups=False)
    say(f"overhead: profiled run of {contacts} contacts, budget {PROFILE_RATE:g}/s, every invocation under cProfile "
        "(CPU time)")
    run = timed_run(stack, host, "overhead-profiled", timeout=contacts / 10 + 300, stall=60, poll=0.5)
    stack.stop_hosts()  # the profiled host writes its statistics when it stops
    found = re.search(r"profiled CPU: ([\d.]+) s of ([\d.]+) s in (\d+) invocations",
                      host.log_path.read_text(errors="replace"))
    if not stats_path.exists():
        raise BenchError(f"the profiled host wrote no statistics ({found[0] if found else 'no summary line'})")
    stats = pstats.Stats(str(stats_path))
    accepted = run.view["counts"]["accepted"]
    profile = {"send_batch_invocations": calls(stats, "send_batch"), "contacts": accepted,
               "by_own_time": top(stats, OWN), "by_cumulative": top(stats, CUMULATIVE),
               "app_by_cumulative": top(stats, CUMULATIVE, where="shared/")}
    if found:
        inside, total, invocations = float(found[1]), float(found[2]), int(found[3])
        profile.update(invocations=invocations, cpu_in_invocations_s=inside, host_process_cpu_s=total)
        result.add("profiled host: CPU inside invocations / the host process's CPU (the rest: queue pollers, "
                   "HTTP, interpreter; cProfile's own cost inflates both)", f"{inside:.1f} / {total:.1f}", "s")
    result.details["profile"] = profile
    heading = f"every invocation under cProfile, thread CPU seconds, {accepted:,} contacts, budget {PROFILE_RATE:g}/s"
    result.details["text"] = {
        f"Host CPU, top {TOP} by own time ({heading})": table(profile["by_own_time"]),
        f"Host CPU, top {TOP} by cumulative time": table(profile["by_cumulative"]),
        f"Host CPU, the app's own functions (shared/), top {TOP} by cumulative time": table(
            profile["app_by_cumulative"]),
    }


def _run_details(run: RunMeasure) -> dict:
    return {"runId": run.view["runId"], "counts": run.view["counts"], "timings": run.view["timings"],
            "batches": run.view["batches"]}
