"""One request budget shared by every Function instance: time slots handed out from a Table entity.

Autopilot allows N requests per second per account. Each request needs a slot; slots are spaced by
`(1 + MARGIN) / N` seconds and reserved with an optimistic-concurrency update of one entity (the GCRA
"next free time"), so any number of instances together stay inside the limit. The planner reserves a
run's slots up front and delays each queue message until just before its slot; a sender that arrives
too late for its slot takes a fresh one instead of sending early and bunching up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

# N+1 requests spaced (1 + MARGIN) / N apart span 1 + MARGIN seconds: MARGIN seconds (25 ms) absorb a late
# start (at most TOLERANCE) plus the jitter between our send and the API's clock, so N+1 never fit in 1 s.
# The default of the app setting AUTOPILOT_RATE_MARGIN (settings.Settings.rate_margin).
MARGIN = 0.025
TOLERANCE = 0.01  # seconds a sender may start late and keep its planned slot
LEAD = 1.5  # messages become visible this long before their slot, to absorb queue polling
# Planned slots start at least this far ahead: a message queued at once is still found before its slot by a
# poller idling at host.json's maxPollingInterval (1 s).
AHEAD = LEAD


class Deferred(Exception):
    """The next slot is too far away to wait for inside a function: re-queue the work until `at`."""

    def __init__(self, at: float):
        super().__init__(f"next request slot at {at:.3f}")
        self.at = at


@dataclass
class RateBudget:
    table: TableClient
    rate: float
    key: str = "autopilot"
    margin: float = MARGIN
    clock = staticmethod(time.time)

    @property
    def interval(self) -> float:
        return (1 + self.margin) / self.rate

    def reserve(self, count: int, ahead: float = 0.0) -> float:
        """Reserve `count` consecutive slots, the first no sooner than `ahead` seconds from now; returns its time."""
        while True:
            entity, etag = self._read()
            start = max(entity["next"], self.clock() + ahead)
            entity["next"] = start + count * self.interval
            if self._write(entity, etag):
                return start

    def _read(self) -> tuple[dict, str | None]:
        try:
            entity = self.table.get_entity("budget", self.key)
            return dict(entity), entity.metadata["etag"]
        except ResourceNotFoundError:
            return {"PartitionKey": "budget", "RowKey": self.key, "next": 0.0}, None

    def _write(self, entity: dict, etag: str | None) -> bool:
        try:
            if etag is None:
                self.table.create_entity(entity)
            else:
                self.table.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
                )
            return True
        except (ResourceExistsError, ResourceModifiedError):
            return False  # another instance took slots first: read again


class Pacer:
    """Spends slots for the requests of one batch: planned ones while on time, fresh ones after that."""

    def __init__(self, budget: RateBudget, planned_at: float | None, planned_count: int, max_wait: float):
        self.budget = budget
        self.max_wait = max_wait
        self._next = planned_at
        self._left = planned_count if planned_at is not None else 0
        self._lead = 0.05  # fresh slots start this far ahead, so reserving one cannot make it already missed

    def __call__(self) -> None:
        """Block until this request may be sent; raise Deferred if that is more than `max_wait` away."""
        while True:
            self._skip_missed()
            if not self._left:
                self._next, self._left = self.budget.reserve(1, ahead=self._lead), 1
            wait = self._next - self.budget.clock()
            if wait > self.max_wait:
                self._left = 0
                raise Deferred(self._next)
            if wait > 0:
                time.sleep(wait)
            if self.budget.clock() <= self._next + TOLERANCE:
                break
            self._lead = min(1.0, 2 * self._lead)  # overslept (a busy process): fresh slots start further ahead
        self._next += self.budget.interval
        self._left -= 1

    def _skip_missed(self) -> None:
        """A planned slot that has passed is lost, never used late (the request would bunch up with the next
        one); the batch's later planned slots stay good."""
        while self._left and self.budget.clock() > self._next + TOLERANCE:
            self._next += self.budget.interval
            self._left -= 1
