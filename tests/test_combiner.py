"""The combiner: callers arriving during a write share the next one; each gets its own result or the error; with
a linger, callers arriving shortly after the first share its write."""

from __future__ import annotations

import threading
import time

import pytest

from shared.runtime.combiner import Combiner

pytestmark = pytest.mark.serial  # waits are timed


def _call_together(combiner: Combiner, items: list) -> dict:
    results: dict = {}

    def call(item):
        try:
            results[item] = combiner(item)
        except Exception as exc:  # the test looks at what each caller got
            results[item] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def test_callers_waiting_during_a_write_are_served_together_each_with_its_own_result():
    applied: list[list[int]] = []

    def apply(items):
        applied.append(list(items))
        time.sleep(0.05)  # a storage round trip: others arrive meanwhile
        return [i * 10 for i in items]

    results = _call_together(Combiner(apply), list(range(20)))
    assert results == {i: i * 10 for i in range(20)}
    assert sorted(i for batch in applied for i in batch) == list(range(20))  # every item applied exactly once
    assert len(applied) < 20


def test_an_error_reaches_every_caller_of_that_write_and_the_next_write_still_happens():
    calls = []

    def apply(items):
        calls.append(items)
        if len(calls) == 1:
            time.sleep(0.05)
            raise ConnectionError("storage unreachable")
        return list(items)

    combiner = Combiner(apply)
    results = _call_together(combiner, ["a", "b", "c"])
    failed = [k for k, v in results.items() if isinstance(v, ConnectionError)]
    assert failed and set(failed) == set(calls[0])
    assert all(results[k] == k for k in results if k not in failed)
    assert combiner("d") == "d"


def test_a_lone_caller_gets_the_error_of_its_own_write():
    with pytest.raises(ValueError):
        Combiner(lambda items: [int(i) for i in items])("not a number")


def test_with_a_linger_callers_arriving_after_the_first_share_its_write_and_wait_for_it():
    applied: list[list[int]] = []

    def apply(items):
        applied.append(list(items))
        return [i * 10 for i in items]

    combiner, returned = Combiner(apply, linger=0.3), {}

    def call(item):
        started = time.monotonic()
        returned[item] = (combiner(item), time.monotonic() - started)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    time.sleep(0.05)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, 6)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(10)
    assert applied == [[0, 1, 2, 3, 4, 5]]  # one write for all six
    assert all(returned[i][0] == i * 10 for i in range(6))  # each its own result, once its write was made
    assert returned[0][1] >= 0.3 and all(returned[i][1] >= 0.2 for i in range(1, 6))
