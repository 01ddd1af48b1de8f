"""The shared request budget on a real Azurite Table: slots spaced by the margin and taken on demand, a late
sender served by the next free slot, no 1-s window over the rate across threads and clients, 429s shared."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise

import pytest
from azure.data.tables import TableServiceClient

from shared.destinations import rate_budget
from shared.destinations.rate_budget import (
    HOLD_FIRST,
    HOLD_MOST,
    LATE_MOST,
    MARGIN,
    STRIKES_KEPT,
    TOLERANCE,
    Deferred,
    Pacer,
    RateBudget,
)

pytestmark = pytest.mark.serial  # pacing and windows are timed

RATE = 20.0  # 51.25 ms apart: short waits, yet far above the scheduler's jitter
# A late sender is made by sleeping a little longer than asked; a pacer whose slot had passed before a slow budget
# write returned would not sleep at all, so these tests book another sender's slot this far ahead first.
SLOWEST_WRITE = 0.2


@pytest.fixture
def budget(storage_connection):
    tables = TableServiceClient.from_connection_string(storage_connection)
    name = "budget" + uuid.uuid4().hex[:10]
    tables.create_table(name)
    yield RateBudget(tables.get_table_client(name), RATE)
    tables.delete_table(name)
    tables.close()


ASYNC_SLEEP = asyncio.sleep
run = asyncio.run


def sleeping(blocking):
    """asyncio.sleep made of a blocking sleep (a sender that wakes late, as a busy process makes it)."""
    async def sleep(seconds: float) -> None:
        blocking(seconds)

    return sleep


def _send_times(pacer: Pacer, count: int) -> list[float]:
    times = []
    for _ in range(count):
        run(pacer())
        times.append(time.time())
    return times


def test_reservations_are_consecutive_and_spaced_by_the_margin(budget):
    first = budget.reserve(3, ahead=1.0)
    second = budget.reserve(2)
    assert first >= time.time() + 0.5
    assert second == pytest.approx(first + 3 * (1 + MARGIN) / RATE)


def test_each_request_takes_the_next_free_slot_on_time(budget):
    times = _send_times(Pacer(budget, max_wait=5), 6)
    gaps = [b - a for a, b in pairwise(times)]
    assert min(gaps) >= budget.interval - TOLERANCE
    assert times[-1] - times[0] <= 5 * budget.interval + 0.1  # no slot skipped between them


def test_a_sender_that_wakes_late_takes_the_next_free_slot_instead_of_losing_its_turn(budget, monkeypatch):
    other = Pacer(budget, max_wait=5)
    real_sleep, overslept = time.sleep, []

    def oversleeping(seconds: float) -> None:  # the first wait overruns by three slots (a busy process)
        real_sleep(seconds + (3 * budget.interval if not overslept else 0))
        overslept.append(seconds)

    late = Pacer(budget, max_wait=5)
    budget.reserve(1, ahead=0.2)  # another sender's slot comes first: the late one has to wait for its own
    monkeypatch.setattr(asyncio, "sleep", sleeping(oversleeping))
    run(late())
    sent_late = time.time()
    monkeypatch.setattr(asyncio, "sleep", ASYNC_SLEEP)
    run(other())
    sent_other = time.time()
    # The late sender did not send on its passed slot, nor behind a long booked schedule: on the next free one.
    assert overslept and sent_other - sent_late >= budget.interval - TOLERANCE
    assert budget.next_free() - sent_other <= 2 * budget.interval


@pytest.fixture
def watched(monkeypatch):
    """Late sends without first booking for WATCHED_FOR seconds (tested below)."""
    monkeypatch.setattr(rate_budget, "WATCHED_FOR", 0.0)


def test_a_sender_a_little_late_still_sends_and_moves_the_schedule_after_it_on(budget, monkeypatch, watched):
    real_sleep, slots = time.sleep, []
    late_by = TOLERANCE + 0.002  # it wakes at least this late: over the tolerance, well under LATE_MOST
    assert late_by < LATE_MOST
    pacer = Pacer(budget, max_wait=5)
    take = budget.take
    monkeypatch.setattr(budget, "take", lambda *args: slots.append(take(*args)) or slots[-1])
    budget.reserve(1, ahead=SLOWEST_WRITE)  # another sender's slot first: the pacer's turn is a sleep away
    monkeypatch.setattr(asyncio, "sleep", sleeping(lambda seconds: real_sleep(seconds + late_by)))
    run(pacer())
    monkeypatch.setattr(asyncio, "sleep", ASYNC_SLEEP)
    assert pacer.sent == 1 and len(slots) == 1  # sent on its own slot: no other was taken for it
    booked = slots[0] + budget.interval  # where the schedule stood after it
    following = budget.reserve(1)
    # The next slot comes later than the booked schedule by the lateness beyond the tolerance, so any RATE + 1
    # requests from the late one on still span RATE intervals less the tolerance.
    assert following - booked >= late_by - TOLERANCE - 0.0005
    assert budget.reserve(1) == pytest.approx(following + budget.interval)  # owed once, not again


def test_a_request_written_late_moves_the_schedule_after_it_on_by_what_its_check_did_not_see(budget, monkeypatch):
    """The slot is checked before the request is written; a thread switched out on the way (a busy host) delays the
    write past the check: that lateness beyond the tolerance is owed too, once."""
    slots, take = [], budget.take
    monkeypatch.setattr(budget, "take", lambda *args: slots.append(take(*args)) or slots[-1])
    pacer = Pacer(budget, max_wait=5)
    run(pacer())
    booked = slots[0] + budget.interval  # where the schedule stood after it
    pacer.left(slots[0] + TOLERANCE - 0.002)  # written within the tolerance: nothing owed
    assert budget.reserve(1) == pytest.approx(booked)
    run(pacer())
    booked = slots[1] + budget.interval
    pacer.left(slots[1] + TOLERANCE + 0.03)
    pacer.left(slots[1] + TOLERANCE + 0.03)  # (told twice: owed once)
    following = budget.reserve(1)
    assert following == pytest.approx(booked + 0.03, abs=0.001)
    assert budget.reserve(1) == pytest.approx(following + budget.interval)


def test_a_late_write_moves_the_slots_booked_already_a_second_after_it(budget, monkeypatch):
    """At low rates the N-th request after a late one is often booked before the late one is written (senders
    waiting together): a late write moves that booked slot on too, so no window holds N + 1. Slots within the
    second after the late one share a window with it and keep their place."""
    slots, take = [], budget.take
    monkeypatch.setattr(budget, "take", lambda *args: slots.append(take(*args)) or slots[-1])
    first, second = Pacer(budget, max_wait=5), Pacer(budget, max_wait=5)
    budget.reserve(1, ahead=SLOWEST_WRITE)  # another sender's slot first: the pacer's turn is a sleep away
    run(first())
    within = budget.reserve(int(RATE) - 1)  # other senders' slots, all in the second after the first's
    sent: list[float] = []
    waiting = threading.Thread(target=lambda: sent.extend(_send_times(second, 1)))  # books the N-th, sleeps
    waiting.start()
    while len(slots) < 2:
        time.sleep(0.001)
    first.left(slots[0] + TOLERANCE + 0.03)  # its write was late, after the others booked
    waiting.join(5)
    assert slots[1] - slots[0] == pytest.approx(RATE * budget.interval)  # the N-th after the late one
    assert budget.moved(slots[1]) == pytest.approx(0.03)
    assert sent[0] - slots[1] >= 0.03 - 0.002  # sent that much later than booked: the window keeps its span
    assert budget.reserve(1) == pytest.approx(slots[1] + budget.interval + 0.03)  # and the schedule after it
    assert budget.moved(within) == 0 and budget.moved(slots[0]) == 0


class _SlowAnswer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # connections kept open, as an API's are

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(0.3)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


class _Told:
    """A pace that notes when each request asked for its slot and when it was written."""

    def __init__(self):
        self.paced, self.written = [], []

    async def __call__(self):
        self.paced.append(time.time())

    def left(self, at):
        self.written.append(at)


@pytest.fixture
def slow_client():
    """An ApiClient on a local server that answers 0.3 s after a request arrives."""
    from shared.destinations.api_client import ApiClient

    class Key:
        def get(self):
            return "k"

        def peek(self):
            return "k"

    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = type("Client", (ApiClient,), {"KEY_HEADER": "X-Api-Key"})(f"http://127.0.0.1:{server.server_address[1]}",
                                                                        Key())
    yield client
    client.close()
    server.shutdown()
    server.server_close()


def test_the_client_tells_its_pace_when_a_request_was_written_not_when_it_was_answered(slow_client):
    """ApiClient reports the moment the request left (what the API's rate window counts), before the answer."""
    told = _Told()
    slow_client.run_sync(lambda: slow_client.call("POST", "/x", {"people": ["a"] * 1000}, told))
    answered = time.time()
    assert len(told.paced) == 1 and len(told.written) == 1
    assert told.paced[0] <= told.written[0] <= told.paced[0] + 0.1 and answered - told.written[0] >= 0.25


def test_a_late_sender_loses_its_slot_when_the_schedule_after_it_may_be_booked_already(budget, monkeypatch, watched):
    real_sleep, slots = time.sleep, []
    pacer = Pacer(budget, max_wait=5)
    take = budget.take
    monkeypatch.setattr(budget, "take", lambda *args: slots.append(take(*args)) or slots[-1])

    def booked_then_late(seconds: float) -> None:  # other senders book a second's worth meanwhile; it wakes late
        if len(slots) == 1:
            budget.reserve(int(RATE))
        real_sleep(seconds + (TOLERANCE + 0.002 if len(slots) == 1 else 0))

    budget.reserve(1, ahead=SLOWEST_WRITE)  # another sender's slot first: the pacer's turn is a sleep away
    monkeypatch.setattr(asyncio, "sleep", sleeping(booked_then_late))
    run(pacer())
    # The request RATE slots after its own was booked before it woke: no shift could reach it, so the slot passed.
    assert len(slots) == 2 and slots[1] >= slots[0] + (RATE + 1) * budget.interval


def _late_once(budget: RateBudget, monkeypatch) -> list[float]:
    """One request through a pacer whose first wait overruns by a little more than the tolerance: its slots."""
    real_sleep, slots = time.sleep, []
    take = budget.take
    monkeypatch.setattr(budget, "take", lambda *args: slots.append(take(*args)) or slots[-1])
    budget.reserve(1, ahead=SLOWEST_WRITE)  # another sender's slot first: the pacer's turn is a sleep away
    monkeypatch.setattr(asyncio, "sleep", sleeping(lambda seconds: real_sleep(
        seconds + (TOLERANCE + 0.002 if len(slots) == 1 else 0))))
    run(Pacer(budget, max_wait=5)())
    return slots


def test_a_late_sender_loses_its_slot_while_its_instance_has_just_started_booking(budget, monkeypatch):
    budget.reserve(1)  # its first booking: another instance may have started with it and not written yet
    assert len(_late_once(budget, monkeypatch)) == 2


def test_a_late_sender_loses_its_slot_at_a_low_rate(budget, monkeypatch, watched):
    slow = RateBudget(budget.table, 5.0)
    assert len(_late_once(slow, monkeypatch)) == 2  # 0.2 s apart: the 5th slot after it may be another's already


def test_a_late_sender_loses_its_slot_while_another_instance_books_too(budget, monkeypatch, watched):
    other = RateBudget(budget.table, RATE)
    budget.reserve(1)
    other.reserve(1)  # another instance wrote in between: the next write of this one fails on its ETag
    # A shift this instance owed would reach only its own next booking, not the other's: the late slot passed.
    assert len(_late_once(budget, monkeypatch)) == 2


def test_many_threads_on_several_budget_clients_never_exceed_the_rate_and_none_starves(storage_connection, budget):
    """Three clients (three instances) with four sending threads each, for two seconds at 20 requests/s."""
    tables = [TableServiceClient.from_connection_string(storage_connection) for _ in range(3)]
    clients = [RateBudget(t.get_table_client(budget.table.table_name), RATE) for t in tables]
    times: list[float] = []
    lock = threading.Lock()
    stop = time.time() + 2.0

    sent_by_thread: dict[int, int] = {}

    def send(client: RateBudget) -> None:
        pacer = Pacer(client, max_wait=5)
        while time.time() < stop:
            run(pacer())
            with lock:
                times.append(time.time())
                sent_by_thread[threading.get_ident()] = sent_by_thread.get(threading.get_ident(), 0) + 1

    threads = [threading.Thread(target=send, args=(c,)) for c in clients for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for t in tables:
        t.close()
    times.sort()
    window = int(RATE)  # any RATE + 1 requests must span more than a second
    assert all(times[i + window] - times[i] > 1.0 for i in range(len(times) - window))
    # Every sender got slots (none starved behind the others); that a late sender loses no turn is the test above.
    assert sent_by_thread and min(sent_by_thread.values()) >= 1 and len(sent_by_thread) == len(threads)


def test_a_429_holds_every_client_off_and_sending_recovers(storage_connection, budget):
    other = RateBudget(budget.table, RATE)
    until = budget.throttled(retry_after=1.0)  # Retry-After is honoured
    assert until == pytest.approx(time.time() + 1.0, abs=0.1)
    first = other.reserve(1)
    assert first >= until
    assert other.reserve(1) == pytest.approx(first + budget.interval)  # back to the normal spacing
    budget.throttled(retry_after=0.0)  # a hold that ends sooner never pulls the budget back
    assert other.reserve(1) == pytest.approx(first + 2 * budget.interval)


def test_a_slot_booked_before_a_429_is_not_used_during_its_hold_on_any_instance(budget):
    other = RateBudget(budget.table, RATE)
    booked = [budget.take(0.3, 5.0), other.reserve(1)]  # both booked before the 429, in what becomes its hold
    until = other.throttled(retry_after=0.6)
    assert not budget.held(booked[0])  # this instance has not heard of it yet ...
    budget.reserve(1)  # ... until its next booking meets the other instance's write
    assert all(budget.held(slot) and other.held(slot) for slot in booked)
    assert not budget.held(until + 0.01)


def test_a_sender_asleep_on_its_slot_when_a_429_comes_waits_for_the_hold(budget):
    budget.reserve(6)  # the next free slot is 0.3 s away: a sender books it and sleeps
    sent: list[float] = []
    sender = threading.Thread(target=lambda: sent.extend(_send_times(Pacer(budget, 5.0), 1)))
    sender.start()
    time.sleep(0.1)
    until = budget.throttled(retry_after=0.6)
    sender.join(5)
    assert sent and sent[0] >= until - 0.005  # not at its slot, 0.2 s later, inside the hold


def test_a_run_cancelled_while_its_sender_waits_out_a_429_hold_sends_nothing_after_it(budget):
    """A cancel's answer promises no request of the run starts max_wait (plus the status's age) after it: a sender
    that asked go_on() before its slot and then waited out a hold longer than max_wait asks again."""
    budget.reserve(2)  # the next free slot is 0.1 s away: the sender books it and sleeps
    running = threading.Event()
    running.set()
    outcome: list = []

    async def still_running() -> bool:
        return running.is_set()

    def send():
        try:
            _send_times(Pacer(budget, max_wait=0.5, go_on=still_running), 1)
            outcome.append("sent")
        except rate_budget.Stopped:
            outcome.append("stopped")

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.05)
    budget.throttled(retry_after=0.4)  # each hold shorter than max_wait, the two longer
    time.sleep(0.3)
    until = budget.throttled(retry_after=0.4)
    running.clear()  # cancelled during the second hold
    sender.join(5)
    assert outcome == ["stopped"] and time.time() >= until - 0.05


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_429s_in_a_row_hold_longer_each_time_and_a_lone_one_briefly(budget):
    clock = budget.clock = Clock()
    holds = []
    for _ in range(8):  # each 429 answers a request sent after the last hold ended
        holds.append(round(budget.throttled() - clock.now, 3))
        clock.now += holds[-1] + 0.5
    assert holds == [HOLD_FIRST * 2 ** n for n in range(6)] + [HOLD_MOST, HOLD_MOST]
    clock.now += STRIKES_KEPT + 1  # quiet for a while: the next 429 is a lone one again
    assert budget.throttled() - clock.now == pytest.approx(HOLD_FIRST)


def test_429s_answering_requests_sent_before_the_hold_do_not_lengthen_it(budget):
    clock = budget.clock = Clock()
    other = RateBudget(budget.table, RATE)
    other.clock = clock
    until = budget.throttled()
    clock.now += HOLD_FIRST / 2  # another instance's request, in flight when the hold began, gets its 429
    assert other.throttled() == pytest.approx(until)
    clock.now = until + 0.01  # after the hold: a 429 again is a second strike
    assert budget.throttled() - clock.now == pytest.approx(2 * HOLD_FIRST)


def test_a_slot_further_away_than_the_wait_allowed_defers_and_takes_nothing(budget):
    budget.reserve(1, ahead=30)  # other senders hold the next 30 seconds
    before = budget.next_free()
    with pytest.raises(Deferred) as deferred:
        run(Pacer(budget, max_wait=2)())
    assert deferred.value.at >= time.time() + 29
    assert budget.next_free() == pytest.approx(before)


@pytest.mark.parametrize("header, low, high", [
    ("3", 3, 3), ("0.5", 0.5, 0.5), ("-4", 0, 0), (None, None, None), ("soon", None, None),
    ("in-the-future", 9, 10),  # replaced below by an HTTP date 10 s ahead
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0, 0),  # a date in the past: go now
])
def test_retry_after_is_read_as_seconds_or_as_an_http_date(header, low, high):
    from email.utils import formatdate

    from shared.destinations.api_client import retry_after

    if header == "in-the-future":
        header = formatdate(time.time() + 10, usegmt=True)
    value = retry_after(header)
    assert (value is None) if low is None else (low <= value <= high), value


def test_senders_of_one_instance_waiting_together_share_one_budget_write(budget, monkeypatch):
    writes, real_write = [], budget._write
    monkeypatch.setattr(budget, "_write", lambda entity, etag: writes.append(1) or real_write(entity, etag))
    gate, slots, lock = threading.Barrier(8), [], threading.Lock()

    def take() -> None:
        gate.wait(5)
        slot = budget.take(0.2, max_wait=5)
        with lock:
            slots.append(slot)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    slots.sort()
    assert len(set(slots)) == 8  # a slot of its own for each
    assert all(b - a == pytest.approx(budget.interval) for a, b in pairwise(slots))
    assert len(writes) < 8, len(writes)  # and fewer writes than slots


def test_a_client_updates_on_the_entity_it_last_wrote_and_rereads_it_when_another_wrote_since(budget):
    calls = []
    table = budget.table
    for name in ("get_entity", "update_entity"):
        real = getattr(table, name)
        setattr(table, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    budget.reserve(1)
    calls.clear()
    first = budget.reserve(1)
    assert calls == ["update_entity"]  # no read: the entity is as this client wrote it
    other = RateBudget(table, RATE)
    taken = other.reserve(1)
    calls.clear()
    mine = budget.reserve(1)  # its remembered entity is stale: the update fails on the ETag, read, update
    assert calls == ["update_entity", "get_entity", "update_entity"]
    assert taken == pytest.approx(first + budget.interval) and mine == pytest.approx(taken + budget.interval)


def test_senders_waiting_together_share_one_budget_write_and_get_a_slot_each(budget):
    writes, real = [], budget.table.update_entity
    budget.table.update_entity = lambda *a, **k: (writes.append(1), time.sleep(0.05), real(*a, **k))[2]
    budget.reserve(1)
    writes.clear()
    slots: list[float] = []
    threads = [threading.Thread(target=lambda: slots.append(budget.take(0.0, 5.0))) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(slots) == 12 and len(writes) < 12  # combined: fewer writes than slots
    slots.sort()
    assert all(b - a >= budget.interval - 1e-6 for a, b in pairwise(slots))  # a slot each, spaced as the rate says
