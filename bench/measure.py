"""Figures and how they are measured: results with their inputs, the simulator's request log, timed runs."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime

from bench.env import Api, BenchError, BenchStack, Host, say


@dataclass
class Figure:
    name: str
    value: float | int | str | None
    unit: str = ""
    target: str = ""  # e.g. "≥ 0.95"; empty when the figure is informative only
    met: bool | None = None


@dataclass
class Result:
    name: str
    title: str
    inputs: dict = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # bulky extras (profiles, per-phase numbers)
    seconds: float = 0.0
    error: str = ""

    def add(self, name: str, value, unit: str = "", target: str = "", met: bool | None = None) -> None:
        if isinstance(value, float):
            value = round(value, 4 if abs(value) < 10 else 1)
        self.figures.append(Figure(name, value, unit, target, met))

    def fail(self, message: str) -> None:
        """Record a part that could not be measured; the figures measured so far stay."""
        self.error = f"{self.error}; {message}" if self.error else message

    def as_dict(self) -> dict:
        return asdict(self)


# --- the simulator's request log ------------------------------------------------------------------
def is_contact_request(record: dict) -> bool:
    """Requests that carry contacts or membership (not the list look-up), as tests/support.py counts them; Ortto's
    merges too."""
    path = record["path"]
    return path.endswith(("/contact", "/contacts", "/person/merge")) or "/contact/" in path


def accepted(records: list[dict]) -> list[dict]:
    return [r for r in records if 200 <= (r.get("status") or 0) < 300]


def throttled(records: list[dict]) -> int:
    return sum(1 for r in records if r.get("status") == 429)


def max_in_window(times: list[float], width: float = 1.0) -> int:
    """The most requests in any half-open window [t, t + width), as a sliding-window limiter counts them."""
    times = sorted(times)
    best = start = 0
    for end, t in enumerate(times):
        while times[start] <= t - width:
            start += 1
        best = max(best, end - start + 1)
    return best


def tightest_span(times: list[float], rate: float) -> float | None:
    """The shortest time any rate + 1 consecutive requests took: above 1 s, no 1-s window held more than `rate`;
    what it exceeds 1 s by is the slack the rate margin had left."""
    times, n = sorted(times), int(rate)
    return min((times[i + n] - times[i] for i in range(len(times) - n)), default=None)


@dataclass
class HostLog:
    """Counts in a counted host's log (bench/counted_host.py logs every Azure SDK request, URL included)."""

    budget_requests: int  # reads and writes of the rate-budget Table entity
    waited: int  # batches re-queued because the next free request slot was too far ahead (MAX_WAIT)
    throttled: int  # batches re-queued after a 429 (which holds every sender off)

    @classmethod
    def read(cls, host: Host) -> HostLog:
        text = host.log_path.read_text(errors="replace")
        return cls(text.count("/ratebudget("), text.count("re-queued (waiting for a request slot)"),
                   text.count("re-queued (throttled"))

    def __sub__(self, before: HostLog) -> HostLog:
        return HostLog(self.budget_requests - before.budget_requests, self.waited - before.waited,
                       self.throttled - before.throttled)


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# --- one run, timed -------------------------------------------------------------------------------
@dataclass
class RunMeasure:
    """One run from POST to final status, with the simulator's log of what it sent."""

    view: dict
    started: float  # epoch seconds, just before the POST
    posted: float  # the POST answered: the run recorded and its planning queued
    log: list[dict]
    views: list[tuple[float, float, int]] = field(default_factory=list)  # the GETs polling it (Api.views)

    @property
    def contact_requests(self) -> list[dict]:
        return [r for r in self.log if is_contact_request(r)]

    @property
    def last_ack(self) -> float:
        """When the last accepted contact request was answered: its arrival, plus the latency the simulator held
        its answer (the log's `latency`; none on loopback)."""
        acks = accepted(self.contact_requests)
        return max(r["t"] + r.get("latency", 0.0) for r in acks) if acks else self.posted

    @property
    def first_request(self) -> float:
        requests = self.contact_requests
        return min(r["t"] for r in requests) if requests else self.posted

    @property
    def finished(self) -> float:
        return epoch(self.view["timings"]["finished"])

    @property
    def wall(self) -> float:
        """Run start to the last acknowledged contact request."""
        return self.last_ack - self.started

    @property
    def planning(self) -> float:
        return self.posted - self.started


def timed_run(stack: BenchStack, host: Host, export: str, timeout: float, stall: float = 120.0,
              poll: float | None = None, **options) -> RunMeasure:
    """Start a run over HTTP, wait for it (polling its view every `poll` seconds, see Api.wait), and collect the
    simulator's log of that run."""
    api = Api(host)
    stack.sim.reset_log()
    started = time.time()
    view = api.start(export, **options)
    posted = time.time()
    say(f"  {export}: run {view['runId']} started (POST answered in {posted - started:.2f}s)")
    view = api.wait(view["runId"], timeout, stall, every=poll)
    if view["status"] not in ("succeeded", "dry run"):
        raise BenchError(f"run {view['runId']} of {export} ended {view['status']}: {view.get('error')} "
                         f"{view.get('counts')} {view.get('deliveryProblems', [])[:3]}")
    measure = RunMeasure(view, started, posted, stack.sim.request_log(), api.views)
    # Kept for investigation (bench/out is scratch): every request the simulator saw during the run.
    (stack.out / f"{export}-{view['runId']}.requests.json").write_text(json.dumps(
        {"started": started, "posted": posted, "log": measure.log}))
    say(f"  {export}: {view['status']} after {measure.finished - started:.1f}s, counts {view['counts']}")
    return measure
