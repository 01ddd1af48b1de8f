"""The run view costs the same at any size: GET /api/runs/{id} reads the run's record, never its batch outcomes."""

from __future__ import annotations

from shared import services
from shared.pipeline import reports
from shared.state.run_records import BatchOutcome


def _running_run_with(world, run_id: str, batches: int) -> None:
    svc = services.current()
    svc.records.create(run_id, "seg", status="running", planned_batches=batches + 1, trigger="http")
    for number in range(1, batches + 1):
        outcome = BatchOutcome(number, "upsert", "done", 100, 99, 1, 0, [{"email": "ab***@x***.io", "reason": "x"}])
        assert svc.records.record_batch(run_id, outcome)
        reports.after_batch(svc, run_id, outcome)


def test_the_view_of_a_running_run_reads_one_entity_whatever_its_batches(world, monkeypatch):
    svc = services.current()
    _running_run_with(world, "20260302T043000Z-00000001", 3)
    _running_run_with(world, "20260302T043000Z-00000002", 60)
    reads: list[str] = []
    real_get = svc.records.get
    monkeypatch.setattr(svc.records, "get", lambda run_id: reads.append("run") or real_get(run_id))
    monkeypatch.setattr(svc.records, "batch_outcomes", lambda run_id: reads.append("outcomes") or [])
    small = world.view("20260302T043000Z-00000001")
    assert reads == ["run"]
    big = world.view("20260302T043000Z-00000002")
    assert reads == ["run", "run"]  # the same cost at 20 times the batches
    assert big["batches"] == {"planned": 61, "settled": 60, "dead": 0}
    assert (big["counts"]["sent"], big["counts"]["accepted"], big["counts"]["refused"]) == (6_000, 5_940, 60)
    assert small["counts"]["accepted"] == 297


def test_a_finished_run_shows_the_exact_totals_summed_once_when_it_ended(world):
    svc = services.current()
    _running_run_with(world, "20260302T043000Z-00000003", 4)
    # A redelivered batch is counted again as a hint: the running counters may run ahead...
    reports.after_batch(svc, "20260302T043000Z-00000003")
    extra = BatchOutcome(5, "upsert", "done", 100, 100, 0, 0, [])
    assert svc.records.record_batch("20260302T043000Z-00000003", extra)
    reports.after_batch(svc, "20260302T043000Z-00000003", extra)
    view = world.view("20260302T043000Z-00000003")
    # ...but the finished run's figures are summed from the outcomes themselves.
    assert view["status"] == "partially succeeded"
    assert view["batches"]["settled"] == 5 and view["counts"]["accepted"] == 4 * 99 + 100
    assert len(view["deliveryProblems"]) == 4


def test_batches_settling_at_once_are_each_counted_once_and_only_the_last_sees_the_run_complete(world):
    import threading

    svc = services.current()
    run_id, count = "20260302T043000Z-00000004", 24
    svc.records.create(run_id, "seg", status="running", planned_batches=count, trigger="http")
    seen: list[tuple[int, int]] = []
    outcome = BatchOutcome(1, "upsert", "done", 100, 98, 2, 0, [])
    threads = [threading.Thread(target=lambda: seen.append(svc.records.count_done(run_id, outcome)))
               for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    run = svc.records.get(run_id)
    assert int(run["done"]) == count and int(run["c_accepted"]) == 98 * count and int(run["c_refused"]) == 2 * count
    assert sorted(done for done, _ in seen) == list(range(1, count + 1))  # one number each: one finisher
