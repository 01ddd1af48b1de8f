"""Benchmark 4: planning speed and memory. Read a churned export from Azurite, map, validate, de-duplicate and
diff it against an acknowledged state of similar size, and stream the batches out: the planner's whole job.

Each size is planned in a fresh child process (`python -m bench.planning SPEC`), whose peak RSS minus its peak
after imports is the planner's memory, SQLite and C buffers included. The peak is VmHWM from /proc/self/status:
getrusage's ru_maxrss would do in a process of its own, but Linux carries the parent's high-water mark into a
forked child across exec, so a child of this (large) process would report the parent's peak instead.
The acknowledged state is streamed from a file prepared beforehand (real fingerprints of the segment before
churn), standing in for the Table query that a real run pages through; a spec naming a destination (`state`)
streams that destination's snapshot blob instead, as a run reads it (bench/big_segments.py plans 10,000,000
rows that way).
"""

from __future__ import annotations

import cProfile
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from bench.data import Churn, StateLines, base_rows, export_doc, partitions_for
from bench.env import ROOT, BenchError, BenchStack, say
from bench.measure import Result
from bench.profiles import TOP, profile_table

TARGET_ROWS_PER_S = 30_000
TARGET_PEAK_MB = 200  # at 1,000,000 rows
SEGMENT = "PlanningSegment"


def planning(quick: bool) -> Result:
    sizes = (2_000, 20_000) if quick else (100_000, 1_000_000)
    result = Result("planning", "Planning: read + map + validate + diff")
    result.inputs = {"rows": list(sizes), "churn_vs_acknowledged_state": "1% (joins, changes, leaves)",
                     "membership": "field", "source": "Azurite blobs (CDM export, 1 partition per 250k rows)",
                     "acknowledged_state": "streamed from a file (Table query stand-in)"}
    with BenchStack(result.name, sim_rate=5) as stack:
        for rows in sizes:
            _size(result, stack, rows, largest=rows == sizes[-1])
    return result


def _size(result: Result, stack: BenchStack, rows: int, largest: bool) -> None:
    segment = f"{SEGMENT}{rows}"
    churn = Churn.of(rows)
    definition = export_doc(f"plan-{rows}", segment, "field", max_profiles=2 * rows)
    say(f"planning: writing a {churn.profiles + churn.joins - churn.leaves}-row export and the acknowledged state")
    started = time.monotonic()
    stack.snapshot(churn.rows(), segment, partitions_for(rows))
    acked = stack.out / f"acked-{rows}.tsv"
    _write_acked(definition, rows, acked)
    say(f"planning: inputs ready in {time.monotonic() - started:.0f}s; planning in a fresh process")
    spec = {"storage": stack.stack.storage, "definition": definition, "acked": str(acked)}
    measured = _child(spec, stack.out / f"planning-{rows}.json")
    if not largest:  # once more under cProfile, to show where planning time goes (not timed)
        stats = stack.out / f"planning-{rows}.prof"
        _child(dict(spec, profile=str(stats)), stack.out / f"planning-{rows}-profiled.json")
        result.details.setdefault("text", {})[f"Planning {rows:,} rows under cProfile, top {TOP} by own time"] = \
            profile_table(stats, TOP)
    acked.unlink()
    label = f"{rows:,} rows"
    rate = measured["rows"] / measured["seconds"]
    result.add(f"{label}: rows/s", round(rate), "rows/s", f"≥ {TARGET_ROWS_PER_S:,}", rate >= TARGET_ROWS_PER_S)
    target, met = (f"< {TARGET_PEAK_MB} MB", measured["peak_mb"] < TARGET_PEAK_MB) if largest else ("", None)
    result.add(f"{label}: peak memory (RSS above baseline)", measured["peak_mb"], "MB", target, met)
    result.add(f"{label}: planning time", measured["seconds"], "s")
    result.add(f"{label}: CPU time", measured["cpu_seconds"], "s")
    result.add(f"{label}: rows per CPU second", round(measured["rows"] / measured["cpu_seconds"]), "rows/s")
    result.details[str(rows)] = measured


def _write_acked(definition: dict, rows: int, path: Path) -> None:
    """The state Autopilot acknowledged for the segment before churn (bench.data.StateLines): a snapshot's entry
    lines and end mark, without its header and compression."""
    state, unsorted, count = StateLines(definition), path.with_suffix(".unsorted"), 0
    with open(unsorted, "w", encoding="utf-8") as out:
        for number, values in enumerate(base_rows(rows), start=1):
            line = state.line(number, values)
            out.write(line)
            count += bool(line)
    # A state is sorted by key (Python's str order; keys are lower-case ASCII here, so C collation agrees).
    subprocess.run(["sort", "-t", "\t", "-k1,1", "-o", str(path), str(unsorted)], env={**os.environ, "LC_ALL": "C"},
                   check=True, timeout=600)
    with open(path, "a", encoding="utf-8") as out:
        out.write(f"#end\t{count}\n")
    unsorted.unlink()


def _child(spec: dict, spec_path: Path) -> dict:
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "bench.planning", str(spec_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise BenchError(f"planning child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the child process ----------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM, KiB) in MB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:", 1)[1].split()[0]) / 1024


def child_main(spec_path: str) -> None:
    from azure.storage.blob import BlobServiceClient

    from shared.pipeline.planner import Planner
    from shared.source.cdm_reader import find_snapshot, read_records
    from shared.source.export_config import parse_exports
    from shared.state.state_store import Destination, ExportState, Snapshot

    spec = json.loads(Path(spec_path).read_text())
    export = parse_exports({"exports": [spec["definition"]]})[0]
    blobs = BlobServiceClient.from_connection_string(spec["storage"])
    container = blobs.get_container_client(export.container)
    passes: list[float] = []  # when each pass over the state ended (the planner reads it twice)

    def acked():
        """The destination's snapshot blob as a run reads it, or the prepared lines (a snapshot without header)."""
        if spec.get("state"):
            state = ExportState(blobs, None, export.name)
            return state.reading(Destination.from_public(spec["state"]))
        return nullcontext(Snapshot(spec["acked"], lambda: open(spec["acked"], "rb")))

    profiler = cProfile.Profile() if spec.get("profile") else None
    baseline = _peak_rss_mb()
    if profiler:
        profiler.enable()
    started, cpu = time.perf_counter(), time.process_time()
    snapshot = find_snapshot(container, export.prefix, export.segment)
    planner = Planner(export, list(snapshot.columns))
    with acked() as state:
        plan = planner.plan(read_records(container, snapshot), Timed(state, passes))
    planned = time.perf_counter()
    items = sum(len(batch.items) for batch in plan.batches())
    ended = time.perf_counter()
    if profiler:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    planner.close()
    print(json.dumps({
        "rows": plan.counts["read"], "counts": plan.counts, "requests": plan.requests, "batch_items": items,
        "seconds": round(ended - started, 2), "cpu_seconds": round(time.process_time() - cpu, 2),
        "phases_s": {"snapshot_found_state_read": round(passes[0] - started, 2),
                     "segment_read_and_merged_with_the_state": round(planned - passes[0], 2),
                     "batches": round(ended - planned, 2)},
        "baseline_mb": round(baseline, 1), "peak_mb": round(_peak_rss_mb() - baseline, 1),
    }))


class Timed:
    """A snapshot that notes when each read of it ends."""

    def __init__(self, snapshot, passes: list[float]):
        self.snapshot, self.passes = snapshot, passes

    def blocks(self):
        yield from self.snapshot.blocks()
        self.passes.append(time.perf_counter())


if __name__ == "__main__":
    child_main(sys.argv[1])
