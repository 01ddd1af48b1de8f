"""One request budget shared by every Function instance: the generic cell rate algorithm on a Table entity.

Autopilot allows N requests per second per account. The entity holds the budget's "next free time" (GCRA's
theoretical arrival time); a request takes the next slot with an optimistic-concurrency update that moves it
`(1 + MARGIN) / N` seconds on, so any number of instances together stay inside the limit. Slots are taken one at
a time, just before the request that uses them: nothing is booked ahead for a whole run, so a sender that wakes
late takes the next free slot and no slot is lost to it. A sender a little late (up to LATE_MOST) still sends, and
moves the schedule booked after it on by its lateness beyond TOLERANCE: windows keep their span and only those
milliseconds are lost, not a whole slot. A 429 pushes the next free time past its Retry-After, or
past a hold of our own that starts short and doubles while 429s keep coming (`throttled`): every instance backs
off at once (a slot booked before the 429 is not used during its hold, `held`), and sending resumes by itself
afterwards.

An instance remembers the entity as it last wrote it and tries its next update on that (one request instead of a
read and a write); when another instance wrote since, the update fails on its ETag and the entity is read again.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from shared.runtime.blocking import off
from shared.runtime.combiner import Combiner
from shared.runtime.settings import DEFAULT_RATE_MARGIN

# N+1 requests spaced (1 + MARGIN) / N apart span 1 + MARGIN seconds: MARGIN seconds (25 ms) absorb a late
# start (at most TOLERANCE, or LATE_MOST when the schedule after it could not be moved on) plus the jitter between
# our send and the API's clock, so N+1 never fit in 1 s.
# The default of the app setting AUTOPILOT_RATE_MARGIN (settings.Settings.rate_margin).
MARGIN = DEFAULT_RATE_MARGIN
TOLERANCE = 0.01  # seconds a sender may start late and keep its slot
# A sender later than TOLERANCE but at most LATE_MOST still sends, and the instance's next reservation starts that much
# beyond TOLERANCE later (`owe`), and so do its slots booked already a second or more after the late one (`moved`): the
# window from the late request to the N-th after it keeps its span. So a late sender only sends when slots are at most
# LATE_INTERVAL apart (at lower rates N is a handful of slots, which other instances may have booked already, and a
# sender is rarely late), this instance books alone (it has been booking for WATCHED_FOR s, with no pause over IDLE_GAP,
# and no other instance's write came between its own for ALONE_FOR s: the shift lives in this instance until it next
# books; when several instances start a run together, none knows of the others before its first refused write), and the
# schedule it last wrote ends less than MOVABLE s after the slot. Else its slot passes unused. On a loaded 2-core
# machine at 50 r/s, 1 sender in 8 woke 10 to 20 ms late and lost its slot (20 ms); now about 5 ms.
LATE_MOST, LATE_INTERVAL, MOVABLE = 0.02, 0.1, 0.5
BOOKED_AHEAD = 0.8 * MOVABLE  # seconds of slots an instance's senders hold booked at most (RateBudget.gate)
ALONE_FOR, WATCHED_FOR, IDLE_GAP = 10.0, 3.0, 1.0
WINDOW = 1.0  # seconds: the API counts requests per second
INF = float("inf")
LEAD = 1.5  # messages become visible this long before their estimated turn, to absorb queue polling
# After a 429 without Retry-After every sender waits HOLD_FIRST s, twice that after a 429 that follows within
# STRIKES_KEPT s of the last one's hold, and so on up to HOLD_MOST. A lone 429 is most often our jitter against the
# API's one-second window (a request that left a few ms late): it costs a tenth of a second, not whole seconds;
# 429s that keep coming (another client spends the account's budget too) soon hold everyone off for seconds.
HOLD_FIRST, HOLD_MOST, STRIKES_KEPT = 0.1, 5.0, 10.0


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
    _last: tuple[dict, str] | None = field(default=None, init=False, repr=False)  # as this instance last wrote it

    def __post_init__(self):
        # The senders of one instance that want a slot at the same moment share one budget write (`take`).
        self._takers: Combiner[tuple[float, float], float] = Combiner(self._reserve_for)
        self._late: list[_Lateness] = []  # what late requests owe (`owe`), and the slots it moves (`moved`)
        self._late_lock = threading.Lock()
        self._contended = -ALONE_FOR  # when another instance's write last came between two of this one's
        self._wrote, self._booking_since = float("-inf"), float("inf")  # its last write; since when it books
        self._held_until = 0.0  # the end of the last 429 hold this instance knows of (`held`)
        self._gates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its gate

    def movable(self, slot: float) -> bool:
        """Whether a request late for `slot` may still be sent (see LATE_MOST): a high rate, this instance booking
        alone, and the schedule it last wrote ending less than MOVABLE s after `slot`."""
        last, now = self._last, self.clock()
        return (self.interval <= LATE_INTERVAL and last is not None and now - self._booking_since >= WATCHED_FOR
                and now - self._contended > ALONE_FOR and last[0]["next"] - slot < MOVABLE)

    def held(self, slot: float) -> bool:
        """Whether a 429 that came after `slot` was booked holds senders past it: a slot booked before the 429
        is not used during its hold (the API asked everyone to wait, Ortto's try-in-seconds at least)."""
        return slot < self._held_until

    def owe(self, seconds: float, after: float) -> None:
        """The request of slot `after` left `seconds` later than it allowed: this instance's next reservation starts
        that late, and so do the slots it booked already a WINDOW or more after that one (other senders asleep on
        them), unless another instance books too (its slots between them do not move)."""
        with self._late_lock:
            self._late.append(_Lateness(after, seconds, moves=self.clock() - self._contended > ALONE_FOR))

    def moved(self, booked: float) -> float:
        """How much later than booked the slot booked at `booked` by this instance is to be used: by what the
        requests a second or more before it owed after it was booked (those it shares a window with need not)."""
        with self._late_lock:
            return sum(late.seconds for late in self._late
                       if late.moves and late.after + WINDOW <= booked < late.starts)

    def gate(self) -> Gate:
        """The running loop's limit on its senders holding a booked slot: about BOOKED_AHEAD s of slots. More
        senders than that wait here, holding none: a late sender may keep its slot only while the schedule booked
        after it is short (MOVABLE), and an instance awaiting many requests at once would book far ahead."""
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = Gate(max(1, int(BOOKED_AHEAD / self.interval)))
        return gate

    @property
    def interval(self) -> float:
        return (1 + self.margin) / self.rate

    def reserve(self, count: int = 1, ahead: float = 0.0, max_wait: float | None = None) -> float:
        """Take `count` consecutive slots, the first no sooner than `ahead` seconds from now; returns its time.
        Raises Deferred, taking nothing, if that is more than `max_wait` seconds away."""
        while True:
            entity, etag = self._known()
            self._held_until = max(self._held_until, float(entity.get("held", 0.0)))  # another instance's 429
            now = self.clock()
            with self._late_lock:
                owing = [late for late in self._late if late.starts == INF]
            owed = sum(late.seconds for late in owing)
            start = max(entity["next"] + owed, now + ahead)
            if max_wait is not None and start - now > max_wait:
                raise Deferred(start)
            entity["next"] = start + count * self.interval
            if self._write(entity, etag):
                with self._late_lock:
                    for late in owing:
                        late.starts = start
                    self._late = [late for late in self._late if late.starts > now - IDLE_GAP]
                return start

    def take(self, ahead: float, max_wait: float) -> float:
        """One slot for one request. Every sender of this instance waiting meanwhile is served by the same
        reservation (one budget write for all of them), each with a slot of its own."""
        return self._takers((ahead, max_wait))

    def _reserve_for(self, wants: list[tuple[float, float]]) -> list[float]:
        """Consecutive slots for waiting senders, from the furthest `ahead` any asked for (Deferred: none)."""
        start = self.reserve(len(wants), ahead=max(w[0] for w in wants), max_wait=min(w[1] for w in wants))
        return [start + n * self.interval for n in range(len(wants))]

    def next_free(self) -> float:
        return max(self._read()[0]["next"], self.clock())

    def throttled(self, retry_after: float | None = None) -> float:
        """Autopilot answered 429: no instance takes a slot before the time returned (Retry-After, else our own
        hold). A 429 that comes during the last one's hold answers a request that left before it: it holds already."""
        while True:
            entity, etag = self._known()
            now, strikes, struck = self.clock(), int(entity.get("strikes", 0)), float(entity.get("struck", 0.0))
            if now < struck + _hold(strikes):
                if retry_after is None:
                    return max(entity["next"], now)
            else:
                strikes = strikes + 1 if now - struck < _hold(strikes) + STRIKES_KEPT else 1
                struck = now
            until = now + (_hold(strikes) if retry_after is None else retry_after)
            held = max(float(entity.get("held", 0.0)), until)
            entity.update(next=max(entity["next"], until), strikes=strikes, struck=struck, held=held)
            if self._write(entity, etag):
                self._held_until = max(self._held_until, held)
                return entity["next"]

    def _known(self) -> tuple[dict, str | None]:
        """The entity as this instance last wrote it, else as stored now."""
        last, self._last = self._last, None  # used once: after a failed update the entity is read again
        return (dict(last[0]), last[1]) if last else self._read()

    def _read(self) -> tuple[dict, str | None]:
        try:
            entity = self.table.get_entity("budget", self.key)
            return dict(entity), entity.metadata["etag"]
        except ResourceNotFoundError:
            return {"PartitionKey": "budget", "RowKey": self.key, "next": 0.0}, None

    def _write(self, entity: dict, etag: str | None) -> bool:
        try:
            if etag is None:
                written = self.table.create_entity(entity)
            else:
                written = self.table.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
                )
        except (ResourceExistsError, ResourceModifiedError):
            self._contended = self.clock()
            return False  # another instance took slots first: read again
        self._last = (entity, written["etag"])
        now = self.clock()
        if now - self._wrote > IDLE_GAP:
            self._booking_since = now  # booking again after a pause: others may have started meanwhile
        self._wrote = now
        return True


class Gate:
    """At most `size` holders. Waiters are let in half the size at a time, not one each time a holder leaves: they
    then take their slots together, one budget write for all of them (`take`), not one a request."""

    def __init__(self, size: int):
        self.size, self.free = size, size
        self._waiting: deque[asyncio.Future] = deque()
        self._batch = max(1, size // 2)

    async def __aenter__(self) -> None:
        if self.free and not self._waiting:
            self.free -= 1
            return
        entry = asyncio.get_running_loop().create_future()
        self._waiting.append(entry)
        try:
            await entry
        except asyncio.CancelledError:
            if entry.done() and not entry.cancelled():
                self._leave()  # let in, then cancelled: its place goes to the next
            else:
                self._waiting.remove(entry)
            raise

    async def __aexit__(self, *exc) -> None:
        self._leave()

    def _leave(self) -> None:
        self.free += 1
        if self.free < self._batch:
            return
        while self._waiting and self.free:
            entry = self._waiting.popleft()
            if not entry.done():
                self.free -= 1
                entry.set_result(None)


@dataclass
class _Lateness:
    """A request sent later than its slot allowed: the instance's next reservation starts `seconds` later, and
    while `moves` (it books alone) so do its slots booked already a WINDOW or more after the late one's."""

    after: float  # the late request's slot, as booked
    seconds: float
    moves: bool
    starts: float = INF  # the first slot of the reservation that was moved on by it: from there on, all are


def _hold(strikes: int) -> float:
    """How long every sender holds off after the `strikes`-th 429 in a row (0: none yet)."""
    return min(HOLD_MOST, HOLD_FIRST * 2 ** (strikes - 1)) if strikes else 0.0


class Stopped(Exception):
    """The batch's run is no longer active (cancelled, ended): its request is not sent."""


async def _always() -> bool:
    return True


class Pacer:
    """Takes a slot for each request of one batch, right before it is sent. `go_on()` is awaited first: False
    (the run was cancelled) raises Stopped, so no request of a stopped run waits for a slot. Awaited: a request
    waiting for its slot holds no thread (taking the slot, a storage write, runs on the blocking pool)."""

    def __init__(self, budget: RateBudget, max_wait: float, go_on: Callable[[], Awaitable[bool]] = _always):
        self.budget = budget
        self.max_wait = max_wait
        self.go_on = go_on
        self.sent = 0  # requests let go: each takes its slot right before it is sent
        self._lead = 0.05  # slots start this far ahead, so taking one cannot make it already missed
        self._booked, self._owed_from = 0.0, 0.0  # the last request's slot as booked; lateness past `_owed_from`

    async def __call__(self) -> None:
        """Wait until this request may be sent; raise Deferred if that is more than `max_wait` away."""
        checked = await self._check()
        async with self.budget.gate():
            await self._slot(checked)

    async def _slot(self, checked: float) -> None:
        while True:
            booked = await off(self.budget.take, self._lead, self.max_wait)
            if self.budget.clock() - booked > TOLERANCE:  # taking it outlasted the lead: take further ahead
                self._lead = min(0.5, 2 * self._lead)
            slot = await self._wait(booked)
            if self.budget.held(slot):  # a 429 came while it slept: take a slot after the hold
                continue
            late = self.budget.clock() - slot
            if late <= TOLERANCE or (late <= LATE_MOST and self.budget.movable(slot)):
                if self.budget.clock() - checked > self.max_wait:
                    # A 429 hold or a late wake-up kept it waiting longer than a slot may be waited for: the
                    # run may have been cancelled meanwhile, and a cancel's answer promises no request starts
                    # max_wait (plus the status's age) after it.
                    checked = await self._check()
                if late > TOLERANCE:
                    self.budget.owe(late - TOLERANCE, after=booked)
                self._booked, self._owed_from = booked, max(slot + TOLERANCE, self.budget.clock())
                self.sent += 1
                return
            # Overslept (a busy process): that slot passes unused, never used late (it would bunch up with the
            # next request); take the next free one. (Not further ahead: a longer lead only helps a slow take, and
            # where few slots are booked it would leave the slots before it unused too.)

    async def _check(self) -> float:
        if not await self.go_on():
            raise Stopped
        return self.budget.clock()

    def left(self, at: float) -> None:
        """The request let go last was written at `at`: its lateness past the tolerance that the check before it
        did not see (the write itself, the thread switched out on the way) is owed too, so the window from it to
        the N-th request after it keeps its span wherever the delay came from."""
        if at > self._owed_from:
            self.budget.owe(at - self._owed_from, after=self._booked)
            self._owed_from = at

    async def _wait(self, booked: float) -> float:
        """Sleep until the slot booked at `booked`, moved on by any lateness owed meanwhile; returns its time."""
        while True:
            slot = booked + self.budget.moved(booked)
            wait = slot - self.budget.clock()
            if wait <= 0:
                return slot
            await asyncio.sleep(wait)
