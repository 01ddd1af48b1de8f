"""Send one batch to its destination (Autopilot or Ortto) and record what the destination acknowledged.

Retries: a transient failure (5xx, timeout, dropped connection) is retried at once with a fresh slot,
which is safe because upserts are keyed by email; after that the unfinished part of the batch goes back on the
queue with a growing delay instead of sleeping inside the function. A 429 holds the shared budget off (every
sender waits, RateBudget.throttled) and is tried again after the hold, or the rest is re-queued without counting
a failed attempt. A 400 on a bulk call
is split until the refused contact is isolated; only that contact is reported, with the destination's message.
A refusal the destination makes person by person (Ortto's `invalid`, `suppressed`) settles that person, unsplit.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from shared.destinations.api_client import Refused, Throttled, Transient
from shared.destinations.autopilot_client import AutopilotClient
from shared.destinations.ortto_client import OrttoClient
from shared.destinations.rate_budget import Deferred, Pacer
from shared.pipeline.batch_messages import BatchMessage
from shared.pipeline.reports import CREATED_WITH
from shared.runtime.blocking import off
from shared.source.contacts import PERMISSION, mask_email
from shared.state.state_store import Acked

log = logging.getLogger("autopilot.sender")
MERGED = "u"  # an item's first step is done (merged before its list join, or created with its permission)
TRIES_IN_PROCESS = 3
THROTTLED_IN_PROCESS = 3
MAX_WAIT = 6.0  # longest wait for a request slot inside one function invocation


class Requeue(Exception):
    """Stop here; the unfinished items go back on the queue, visible again at `at`. `failed`: the try counts
    toward the batch's attempts (waiting for the budget, or a 429, does not)."""

    def __init__(self, at: float, reason: str, failed: bool = True):
        super().__init__(reason)
        self.at, self.reason, self.failed = at, reason, failed


@dataclass
class Progress:
    """What happened to each item of the batch so far; carried across re-queues."""

    acked: list[Acked] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    carried_accepted: int = 0  # acknowledged before a re-queue or a redelivery
    carried_acked: list[Acked] = field(default_factory=list)  # what those were, for the state
    results: Counter = field(default_factory=Counter)  # the destination's per-person statuses (Ortto: created...)

    def all_acked(self) -> list[Acked]:
        return self.carried_acked + self.acked

    def settle(self, item: dict, outcome: str, reason: str = "") -> None:
        self.done.add(item["k"])
        if outcome == "acked":
            self.acked.append(Acked(item["k"], item.get("f", ""), bool(item.get("m", True)), item.get("r", "")))
        else:
            getattr(self, outcome).append({"email": mask_email(item["k"]), "reason": reason})


@dataclass
class BatchSender:
    client: AutopilotClient | OrttoClient
    pacer: Pacer
    message: BatchMessage
    progress: Progress = field(default_factory=Progress)
    throttled: int = 0  # requests answered 429 (of the pacer's `sent`), for the 429 alert's share

    async def run(self) -> None:
        """Send every unsettled item; raises Requeue or ApiKeyRejected to stop early."""
        items = [i for i in self.message.items if i["k"] not in self.progress.done]
        if not items:
            return  # a redelivered batch whose every contact was already acknowledged
        if self.message.kind == "upsert":
            await self._upsert(items)
        elif self.message.kind == "join":
            await self._join(items)
        else:
            for item in items:
                await self._single(item, lambda i=item: self.client.remove_from_list(self.message.list_id, i["k"],
                                                                                      self.pacer))

    async def _upsert(self, items: list[dict]) -> None:
        """One merge of the batch; on Ortto, new people whose email permission the export chose are created with
        it first (OrttoClient.create_new), so the merge never gives them Ortto's default."""
        chosen = [i for i in items if PERMISSION in i["d"] and not i.get(MERGED)]
        if chosen:
            await self._merge(chosen, self.client.create_new, first_step=True)
        rest = [i for i in items if i["k"] not in self.progress.done]
        if rest:
            await self._merge(rest, lambda part, pace: self.client.merge(part, self.message.list_id, pace))

    async def _join(self, items: list[dict]) -> None:
        """Autopilot's list mode: the joiners' data in one bulk upsert, then each joined through the list."""
        fresh = [i for i in items if not i.get(MERGED)]
        if fresh:
            await self._merge(fresh, lambda part, pace: self.client.merge(part, None, pace), first_step=True)
        for item in items:
            if item["k"] not in self.progress.done:
                await self._single(item, lambda i=item: self.client.add_to_list(self.message.list_id, i["k"],
                                                                                 self.pacer))

    async def _merge(self, items: list[dict], call, first_step: bool = False) -> None:
        """Send `items` in one call; a request refused as a whole is split until the refused contact is isolated.
        `first_step`: an item the destination took is marked (MERGED, carried across re-queues), not settled."""
        try:
            results = await self._with_retries(lambda: call(items, self.pacer))
        except Refused as exc:
            if len(items) == 1:
                self.progress.settle(items[0], "refused", exc.message)
                return
            half = len(items) // 2
            await self._merge(items[:half], call, first_step)
            await self._merge(items[half:], call, first_step)
            return
        for item, (outcome, reason, status) in zip(items, results, strict=True):
            if first_step and outcome == "acked":
                item[MERGED] = True
            else:
                self.progress.settle(item, outcome, reason)
            self._count(item, status, first_step)

    def _count(self, item: dict, status: str, first_step: bool) -> None:
        """Ortto's per-person statuses, once a person; a new person also by the email permission it got."""
        if not status or (item.get(MERGED) and not first_step):
            return  # (its status is the first step's: the merge after it finds them existing)
        self.progress.results[status] += 1
        if status == "created":
            permission = item["d"].get(PERMISSION, "true (Ortto's default)")
            self.progress.results[f"{CREATED_WITH}{str(permission).lower()}"] += 1

    async def _single(self, item: dict, call) -> None:
        try:
            await self._with_retries(call)
            self.progress.settle(item, "acked")
        except Refused as exc:
            self.progress.settle(item, "refused", exc.message)

    async def _with_retries(self, call):
        """A transient failure is tried again at once, up to TRIES_IN_PROCESS times; a 429 (not a failure: the whole
        app holds off) up to THROTTLED_IN_PROCESS times when the hold is short. Then the batch is re-queued."""
        failures = throttles = 0
        while True:
            try:
                return await call()
            except Deferred as exc:
                raise Requeue(exc.at, "waiting for a request slot", failed=False) from None
            except Throttled as exc:
                until = await off(self.pacer.budget.throttled, exc.retry_after)
                throttles += 1
                self.throttled += 1
                reason = f"throttled (429): every sender holds off for {until - time.time():.2f} s"
                if throttles >= THROTTLED_IN_PROCESS or until - time.time() > MAX_WAIT:
                    raise Requeue(until, reason, failed=False) from None
                log.info("%s; trying again after it", reason)
            except Transient as exc:
                failures += 1
                if failures == TRIES_IN_PROCESS:
                    raise Requeue(time.time() + backoff(self.message.attempt), exc.message) from None
                log.info("transient failure, retrying: %s", exc)


def backoff(attempt: int) -> float:
    """Growing delay before a re-queued batch is tried again: 2, 4, 8 ... 60 seconds."""
    return float(min(60, 2 ** (attempt + 1)))


def fail_rest(message: BatchMessage, progress: Progress, reason: str) -> None:
    for item in message.items:
        if item["k"] not in progress.done:
            progress.settle(item, "failed", reason)

