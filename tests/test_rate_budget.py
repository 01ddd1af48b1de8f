"""The shared request budget on a real Azurite Table: slots spaced by the margin, planned slots spent on time,
missed ones lost (never used late) and the rest of a batch's plan kept."""

from __future__ import annotations

import time
import uuid
from itertools import pairwise

import pytest
from azure.data.tables import TableServiceClient

from shared.rate_budget import MARGIN, TOLERANCE, Deferred, Pacer, RateBudget

RATE = 20.0  # 51.25 ms apart: short waits, yet far above the scheduler's jitter


@pytest.fixture
def budget(storage_connection):
    tables = TableServiceClient.from_connection_string(storage_connection)
    name = "budget" + uuid.uuid4().hex[:10]
    tables.create_table(name)
    yield RateBudget(tables.get_table_client(name), RATE)
    tables.delete_table(name)
    tables.close()


def _send_times(pacer: Pacer, count: int) -> list[float]:
    times = []
    for _ in range(count):
        pacer()
        times.append(time.time())
    return times


def test_reservations_are_consecutive_and_spaced_by_the_margin(budget):
    first = budget.reserve(3, ahead=1.0)
    second = budget.reserve(2)
    assert first >= time.time() + 0.5
    assert second == pytest.approx(first + 3 * (1 + MARGIN) / RATE)


def test_planned_slots_are_used_on_time(budget):
    start = budget.reserve(4, ahead=0.3)
    times = _send_times(Pacer(budget, start, 4, max_wait=5), 4)
    for n, sent in enumerate(times):
        slot = start + n * budget.interval
        assert slot <= sent <= slot + TOLERANCE + 0.02, (n, sent - slot)


def test_missed_planned_slots_are_lost_and_the_later_ones_kept(budget):
    start = budget.reserve(6, ahead=0.2)
    time.sleep(start - time.time() + 2.5 * budget.interval)  # slots 0, 1 and 2 have passed
    pacer = Pacer(budget, start, 6, max_wait=5)
    times = _send_times(pacer, 4)
    planned = [start + n * budget.interval for n in (3, 4, 5)]
    for sent, slot in zip(times[:3], planned, strict=True):
        assert slot <= sent <= slot + TOLERANCE + 0.02, (sent - slot)
    # The fourth request had no planned slot left: it took a fresh one after everything reserved.
    assert times[3] >= start + 6 * budget.interval
    gaps = [b - a for a, b in pairwise(times)]
    assert min(gaps) >= budget.interval - TOLERANCE  # nothing was sent bunched up


def test_a_slot_further_away_than_the_wait_allowed_defers(budget):
    budget.reserve(1, ahead=30)  # another run holds the next 30 seconds
    pacer = Pacer(budget, None, 0, max_wait=2)
    with pytest.raises(Deferred) as deferred:
        pacer()
    assert deferred.value.at >= time.time() + 29
