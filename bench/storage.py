"""Storage requests per batch, from a counted host's log (bench/counted_host.py tags every Azure SDK request with
the queue-triggered invocation that made it)."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from bench.counted_host import _REQUEST, describe, records
from bench.env import BenchStack, Host
from bench.measure import Result

SEND, PLAN = "send_batch#", "plan_run#"
TRIGGER_DELETE = "queue autopilot-batches: DELETE message"  # the trigger's own delete after the function
RECEIVE = "queue autopilot-batches: GET messages"  # the poller's receives (empty polls included)
QUEUE_SEND = "queue autopilot-batches: POST messages"  # a batch queued (by queue_window, or re-queued)
BUDGET = ("table ratebudget: ",)


@dataclass
class StorageCount:
    """Where a host spent its storage requests over one stretch of its log."""

    settled: int  # send_batch invocations that settled their batch
    invocations: int  # send_batch invocations (re-queued attempts and redeliveries included)
    sending: Counter = field(default_factory=Counter)  # the app's own requests in send_batch invocations
    deletes: int = 0  # the trigger's deletes of send_batch messages
    planning: Counter = field(default_factory=Counter)  # plan_run invocations: planning and queueing windows
    receives: int = 0  # the batch queue poller's receives
    budget_conflicts: int = 0  # budget writes refused because another sender wrote first (412/409)
    budget_calls: Counter = field(default_factory=Counter)  # budget requests by call

    @classmethod
    def read(cls, stack: BenchStack, hosts: list[Host], offsets: list[int] | None = None) -> StorageCount:
        count = cls(0, 0)
        for host, offset in zip(hosts, offsets or [0] * len(hosts), strict=True):
            count._read(host.log_path.read_bytes()[offset:].decode(errors="replace"), stack.stack.azurite.ports)
        return count

    def _read(self, text: str, ports: dict[str, int]) -> None:
        settled: set[str] = set()
        made: dict[str, list[str]] = {}
        for logger, thread, invocation, message in records(text):
            key = invocation if invocation != "-" else f"-{thread}"
            if logger.startswith("autopilot") and " settled: " in message:
                settled.add(key)
            if logger != "sdk" or not (found := _REQUEST.match(message)):
                continue
            request = describe(found[1], found[2], ports)
            made.setdefault(key, []).append(request)
            if request.startswith(BUDGET) and found[3] in ("409", "412"):
                self.budget_conflicts += 1
        for key, requests in made.items():
            storage = [r for r in requests if not r.startswith("other ")]
            self.budget_calls.update(r for r in storage if r.startswith(BUDGET))
            if key.startswith(SEND):
                self.invocations += 1
                self.settled += key in settled
                self.deletes += storage.count(TRIGGER_DELETE)
                self.sending.update(r for r in storage if r != TRIGGER_DELETE)
            elif key.startswith(PLAN):
                self.planning.update(storage)
            elif key.startswith("-queue-send_batch"):
                self.receives += storage.count(RECEIVE)
            elif key.startswith("-"):  # queue_window sends a page's messages from a pool of its own (untagged)
                self.planning.update(r for r in storage if r == QUEUE_SEND)

    @property
    def budget(self) -> int:
        """Rate-budget entity reads and writes, wherever made (the list look-up is paced too)."""
        return sum(self.budget_calls.values())

    def add_figures(self, result: Result, label: str, batches: int, api_requests: int) -> None:
        """Per batch: the sending path's own requests, and every request the run cost the host(s)."""
        if not self.settled:
            result.fail(f"{label}: no settled batch in the counted host's log")
            return
        sending = sum(self.sending.values())
        planning = sum(self.planning.values())
        result.add(f"{label}: storage requests per batch, sending path (send_batch's own; the trigger's "
                   "receive and delete excluded)", sending / self.settled)
        result.add(f"{label}: storage requests per batch, whole run (planning, queueing, sending, the trigger's "
                   "deletes and the poller's receives)", (sending + planning + self.deletes + self.receives) / batches)
        per = max(1, api_requests)
        writes = sum(n for c, n in self.budget_calls.items() if not c.endswith("GET entity"))
        result.add(f"{label}: rate-budget Table requests per Autopilot request: all / writes / writes refused "
                   "(another sender wrote first)", f"{self.budget / per:.2f} / {writes / per:.2f} / "
                                                   f"{self.budget_conflicts / per:.2f}")
        # A write that went through took one slot or more (the senders of one instance waiting at the same moment
        # share one write), or held the budget off after a 429.
        result.add(f"{label}: rate-budget writes that went through, per Autopilot request",
                   (writes - self.budget_conflicts) / per)
        result.details.setdefault("storage_requests", {})[label] = {
            "batches": batches, "settled_by_send_batch": self.settled, "send_batch_invocations": self.invocations,
            "sending_per_settled_batch": {c: round(n / self.settled, 3) for c, n in self.sending.most_common()},
            "trigger_deletes": self.deletes, "poller_receives": self.receives,
            "planning_and_queueing": dict(self.planning.most_common()), "budget_requests": self.budget,
            "budget_writes_refused": self.budget_conflicts, "budget_by_call": dict(self.budget_calls),
            "autopilot_requests": api_requests,
        }


def median_max(values: list[float]) -> tuple[float, float]:
    return (statistics.median(values), max(values)) if values else (float("nan"), float("nan"))
