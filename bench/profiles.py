"""cProfile statistics as short tables for the results."""

from __future__ import annotations

import pstats
from pathlib import Path

from bench.env import ROOT

TOP = 15
CUMULATIVE, OWN = 3, 2  # columns of a pstats entry: (primitive calls, calls, own time, cumulative time, callers)


def top(stats: pstats.Stats, column: int, count: int = TOP, where: str = "") -> list[dict]:
    """The top functions by `column`; `where`: only those whose file path contains it."""
    rows = [item for item in stats.stats.items() if where in item[0][0]]
    rows = sorted(rows, key=lambda item: item[1][column], reverse=True)[:count]
    return [{"function": _where(file, line, func), "calls": nc, "own_s": round(tt, 3), "cumulative_s": round(ct, 3)}
            for (file, line, func), (_, nc, tt, ct, _) in rows]


def calls(stats: pstats.Stats, name: str) -> int:
    return sum(nc for (_, _, func), (_, nc, *_) in stats.stats.items() if func == name)


def table(rows: list[dict]) -> str:
    lines = [f"{'calls':>9} {'own s':>9} {'cum s':>9}  function"]
    lines += [f"{r['calls']:>9} {r['own_s']:>9.3f} {r['cumulative_s']:>9.3f}  {r['function']}" for r in rows]
    return "\n".join(lines)


def profile_table(path: Path, count: int = TOP, column: int = OWN) -> str:
    return table(top(pstats.Stats(str(path)), column, count))


def _where(file: str, line: int, func: str) -> str:
    """A short location: relative to site-packages or the repository; built-ins keep their name only."""
    if file == "~":
        return func
    path = Path(file)
    if "site-packages" in path.parts:
        file = "/".join(path.parts[path.parts.index("site-packages") + 1:])
    elif path.is_relative_to(ROOT):
        file = str(path.relative_to(ROOT))
    else:
        file = "/".join(path.parts[-2:])
    return f"{file}:{line}({func})"
