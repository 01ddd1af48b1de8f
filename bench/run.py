"""Run the benchmarks on the local stack and write the results.

    python -m bench.run [--quick] [--only NAME] [--out DIR]

The full suite writes bench/results.json and bench/results.md (committed). `--quick` (every size scaled down,
about a minute) and `--only` write to bench/out/ instead, so a partial run never replaces the full figures;
`--out` chooses the folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from bench import (
    big_segments,
    console_history,
    incremental,
    ortto,
    overhead,
    planning,
    rate_discipline,
    scale_out,
    throughput,
)
from bench.env import OUT, ROOT, say
from bench.measure import Result
from bench.report import document, write

BENCHMARKS = {
    "field_sync": throughput.field_sync,
    "field_rates": throughput.field_rates,
    "list_sync": throughput.list_sync,
    "incremental": incremental.incremental,
    "planning": planning.planning,
    "overhead": overhead.overhead,
    "rate_discipline": rate_discipline.rate_discipline,
    "scale_out": scale_out.scale_out,
    "big_segments": big_segments.big_segments,
    "ortto_tags": ortto.ortto_tags,
    "console_history": console_history.console_history,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="scale every size down (about a minute in all)")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), help="run one benchmark")
    parser.add_argument("--out", type=Path, help="where results.json/.md go (default: bench/, or bench/out/ "
                                                 "for --quick and --only)")
    return parser.parse_args(argv)


def run_one(name: str, quick: bool) -> Result:
    """One benchmark; a failure is recorded in its result so the others still run."""
    say(f"=== {name} ===")
    load = os.getloadavg()[0]
    started = time.monotonic()
    try:
        result = BENCHMARKS[name](quick)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        traceback.print_exc()
        result = Result(name, name.replace("_", " "), error=f"{type(exc).__name__}: {exc}")
    result.seconds = round(time.monotonic() - started, 1)
    # Other work on the machine slows the hosts: the 1-minute load average says how busy it was.
    result.details["load_average_1min"] = {"before": round(load, 2), "after": round(os.getloadavg()[0], 2)}
    for fig in result.figures:
        mark = {True: " ✓", False: " ✗"}.get(fig.met, "")
        say(f"  {fig.name}: {fig.value} {fig.unit}{'  target ' + fig.target if fig.target else ''}{mark}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [args.only] if args.only else list(BENCHMARKS)
    out = args.out or (OUT if args.quick or args.only else ROOT / "bench")
    started = time.monotonic()
    results = [run_one(name, args.quick) for name in names]
    paths = write(document(results, args.quick, time.monotonic() - started), out)
    say(f"wrote {paths[0]} and {paths[1]} in {time.monotonic() - started:.0f}s")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
