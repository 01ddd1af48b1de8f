"""Write the results: bench/results.json (everything) and bench/results.md (readable tables)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from bench.env import ROOT
from bench.measure import Result


def machine() -> dict:
    meminfo = Path("/proc/meminfo").read_text().split()
    total_kib = int(meminfo[meminfo.index("MemTotal:") + 1])
    return {"cores": os.cpu_count(), "memory_gib": round(total_kib / 2**20, 1), "cpu": _cpu_model(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def code_version() -> dict:
    """The commit measured, and the app files that differed from it (the checkout is shared and moves)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        return done.stdout.strip()

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()
               if line[3:].startswith(("shared/", "tools/", "function_app.py", "host.json"))]
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_app_files": changed}


def document(results: list[Result], quick: bool, seconds: float) -> dict:
    return {
        "suite": "quick" if quick else "full",
        "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "code": code_version(),
        "machine": machine(),
        "duration_s": round(seconds, 1),
        "command": "python -m bench.run" + (" --quick" if quick else ""),
        "benchmarks": [r.as_dict() for r in results],
    }


def write(doc: dict, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "results.json", folder / "results.md"
    json_path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    md_path.write_text(markdown(doc))
    return json_path, md_path


# --- markdown -------------------------------------------------------------------------------------
def markdown(doc: dict) -> str:
    m, code = doc["machine"], doc["code"]
    dirty = f" plus uncommitted changes to {', '.join(code['uncommitted_app_files'])}" \
        if code["uncommitted_app_files"] else ""
    lines = [
        "# Benchmark results", "",
        f"{doc['suite'].capitalize()} suite (`{doc['command']}`), {doc['date']}, {doc['duration_s']:.0f} s, "
        f"code at commit {code['commit']}{dirty}. "
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['os']}, Python {m['python']}.", "",
        "Everything runs on loopback: Azurite, the Key Vault stand-in, the Autopilot simulator "
        "(`tools.autopilot_sim`, its own process) and local Functions hosts (`tools.local_host`, their own "
        "processes, real host.json queue options). Timings are ratios against a ceiling measured in the same "
        "run where possible. These are measurements, not test assertions. Each section gives the machine's "
        "1-minute load average before and after it: with other work on the same cores (a load above the core "
        "count), hosts wake late for their request slots and timings suffer.", "",
        "## Summary", "",
        "| benchmark | figure | value | target | met |", "|---|---|---|---|---|",
    ]
    for bench in doc["benchmarks"]:
        if bench["error"]:
            lines.append(f"| {bench['title']} | (did not complete) | {_cell(bench['error'][:120])} | | ✗ |")
        for fig in bench["figures"]:
            if fig["target"]:
                lines.append(f"| {bench['title']} | {fig['name']} | {_value(fig)} | {fig['target']} | {_met(fig)} |")
    for bench in doc["benchmarks"]:
        lines += _section(bench)
    return "\n".join(lines) + "\n"


def _section(bench: dict) -> list[str]:
    load = bench["details"].get("load_average_1min", {})
    busy = f", machine load {load['before']} → {load['after']}" if load else ""
    lines = ["", f"## {bench['title']} (`{bench['name']}`, {bench['seconds']:.0f} s{busy})", ""]
    inputs = ", ".join(f"{k} = {_plain(v)}" for k, v in bench["inputs"].items())
    lines += [f"Inputs: {inputs}.", ""]
    if bench["error"]:
        lines += [f"**Did not complete:** {bench['error']}", ""]
    if bench["figures"]:
        lines += ["| figure | value | target | met |", "|---|---|---|---|"]
        lines += [f"| {f['name']} | {_value(f)} | {f['target']} | {_met(f)} |" for f in bench["figures"]]
    for note in bench["notes"]:
        lines += ["", f"- {note}"]
    for title, text in bench["details"].get("text", {}).items():
        lines += ["", f"{title}:", "", "```", text.rstrip(), "```"]
    return lines


def _value(fig: dict) -> str:
    value = fig["value"]
    text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _plain(value)
    return f"{text} {fig['unit']}".strip()


def _plain(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _met(fig: dict) -> str:
    return {True: "✓", False: "✗"}.get(fig["met"], "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
