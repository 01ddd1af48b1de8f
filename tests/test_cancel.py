"""Cancelling a run: no request starts after the answer, the counts add up, the export is free at once, and the
next run sends the rest without resending what the cancelled run got acknowledged."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.state.run_records import RunRecords
from tests.support import close_world, definition, open_world, wait_until
from tests.test_incremental import segment_emails
from tools.generate_export import sample_profiles


@pytest.fixture
def slow_world(request):
    # 5 requests/s unless a test asks for another rate (indirect parametrization): 60 joins take 12 s
    world = open_world(rate=getattr(request, "param", 5), settings={"AUTOPILOT_TIMEOUT_SECONDS": "2"})
    try:
        yield world
    finally:
        close_world(world)


def cancel(world, run_id: str):
    return world.api.post(f"{world.host.base_url}/api/runs/{run_id}/cancel", timeout=120)


@pytest.mark.serial  # the stop is timed
@pytest.mark.parametrize("slow_world", [10], indirect=True)  # 60 joins in 6 s: the cancel still comes part way
def test_a_cancelled_run_stops_sending_at_the_answer_and_the_next_run_sends_only_the_rest(slow_world):
    world, rows = slow_world, list(sample_profiles(60, seed=71))
    world.define(definition("seg", "list"))
    world.snapshot(rows)
    run_id = world.start("seg").json()["runId"]
    wait_until(lambda: len(world.contact_requests()) >= 5, timeout=30)
    answer = cancel(world, run_id)
    answered = time.time()
    assert answer.status_code == 202 and answer.json()["status"] == "cancelling", answer.text
    report = world.wait(run_id, timeout=60)
    late = [r for r in world.contact_requests() if r["t"] > answered]
    assert late == [], late  # nothing started after the answer (those in flight then had arrived before it)
    counts = report["counts"]
    assert report["status"] == "cancelled" and counts["joiners"] == 60
    assert 5 <= counts["accepted"] < 60 and counts["accepted"] + counts["cancelled"] == 60
    assert counts["refused"] == counts["failed"] == 0
    assert len(world.list_members()) == counts["accepted"]
    assert cancel(world, run_id).status_code == 409  # it has ended

    mark, started = len(world.contact_requests()), time.time()
    rest = world.start("seg").json()
    final = world.wait(rest["runId"], timeout=120)
    sent = world.contact_requests()[mark:]
    assert final["status"] == "succeeded" and final["counts"]["joiners"] == 60 - counts["accepted"]
    joins = [r for r in sent if r["status"] == 200 and r["path"].startswith("/v1/list/")]
    merged = sum(r["n"] for r in sent if r["status"] == 200 and r["path"] == "/v1/contacts")
    assert len(joins) == merged == 60 - counts["accepted"]  # nothing acknowledged resent
    assert sent[0]["t"] - started < 30  # the cancelled run holds nothing back beyond its requests' timeouts
    assert world.list_members() == segment_emails(rows)


def test_the_timer_leaves_a_cancelled_snapshot_alone_and_cancel_answers_404_for_no_run(slow_world):
    from shared import services
    from shared.pipeline import runs

    world, rows = slow_world, list(sample_profiles(200, seed=72))
    world.define(definition("seg"))
    world.snapshot(rows)
    run_id = world.start("seg").json()["runId"]
    assert cancel(world, run_id).status_code == 202
    assert world.wait(run_id, timeout=60)["status"] == "cancelled"
    assert runs.scheduled_tick(services.current()) == []  # not started again until a new snapshot comes
    assert cancel(world, "20260302T043000Z-0000dead").status_code == 404
    assert RunRecords_count(world, "seg") == 1


def RunRecords_count(world, export: str) -> int:
    from azure.data.tables import TableServiceClient

    return len(RunRecords(TableServiceClient.from_connection_string(world.stack.storage)).for_export(export, 10))


@pytest.mark.long
def test_a_running_run_whose_messages_were_lost_is_taken_over_by_the_timer(slow_world, monkeypatch):
    from azure.storage.queue import QueueClient

    from shared import services
    from shared.pipeline import runs
    from shared.runtime.settings import BATCH_QUEUE

    world, rows = slow_world, list(sample_profiles(40, seed=73))
    world.define(definition("seg", "list"))
    world.snapshot(rows)
    run_id = world.start("seg").json()["runId"]
    wait_until(lambda: len(world.contact_requests()) >= 3, timeout=30)
    QueueClient.from_connection_string(world.stack.storage, BATCH_QUEUE).clear_messages()  # lost

    def settled() -> int:
        return world.view(run_id)["batches"]["settled"]
    time.sleep(5)  # what was in flight settles
    before = settled()
    time.sleep(3)  # and nothing else comes
    assert settled() == before < 4 and world.view(run_id)["status"] == "running"
    monkeypatch.setattr(runs, "STUCK_AFTER", 1.0)
    runs.scheduled_tick(services.current())
    report = world.wait(run_id, timeout=60)
    assert report["status"] == "succeeded" and report["counts"]["accepted"] == 40
    assert world.list_members() == segment_emails(rows)
    assert len([r for r in world.contact_requests() if r["status"] == 200]) <= 40 + 16  # at most in flight twice


@pytest.mark.long
def test_a_run_that_fails_while_sending_stops_like_a_cancel_and_the_next_run_sends_only_the_rest(slow_world):
    """A run ended as failed mid-flight (its window job given up on; a forced run, a refused key and a streamed
    sync cut short end it the same way) is concluded once its requests in flight have settled: what they got
    acknowledged is folded, so the next run does not send it again."""
    from shared import services
    from shared.pipeline import runs

    world, rows = slow_world, list(sample_profiles(60, seed=74))
    world.define(definition("seg", "list"))
    world.snapshot(rows)
    run_id = world.start("seg").json()["runId"]
    wait_until(lambda: len(world.contact_requests()) >= 5, timeout=30)
    runs.fail_planning(services.current(), f'{{"run": "{run_id}", "page": 1}}'.encode())
    assert world.view(run_id)["status"] == "cancelling"  # its senders stop as for a cancel
    report = world.wait(run_id, timeout=60)
    assert report["status"] == "failed" and "failed on every delivery" in report["error"]
    counts = report["counts"]
    assert 5 <= counts["accepted"] < 60 and counts["refused"] == 0

    mark = len(world.contact_requests())
    rest = world.wait(world.start("seg").json()["runId"], timeout=120)
    sent = world.contact_requests()[mark:]
    assert rest["status"] == "succeeded" and rest["counts"]["joiners"] == 60 - counts["accepted"]
    joins = [r for r in sent if r["status"] == 200 and r["path"].startswith("/v1/list/")]
    assert len(joins) == 60 - counts["accepted"]  # nothing acknowledged resent
    assert world.list_members() == segment_emails(rows)


def _run_held_after_first_page(world, monkeypatch, rows: int, page: int) -> str:
    """A field-mode run whose first page of `page` batches is sent while the job queueing its next page waits
    for 60 s: the state two jobs of the same page, or a take-over, meet."""
    from shared.pipeline import runs

    monkeypatch.setattr(runs, "PAGE", page)
    monkeypatch.setattr(runs, "WINDOW_LEAD", -60.0)
    world.define(definition("seg"))
    world.snapshot(sample_profiles(rows, seed=75))
    run_id = world.start("seg").json()["runId"]
    wait_until(lambda: world.view(run_id)["batches"]["settled"] == page, timeout=30)
    return run_id


def sent_contacts(world) -> int:
    return sum(r["n"] for r in world.contact_requests() if r["status"] == 200 and r["path"] == "/v1/contacts")


def test_two_jobs_that_read_a_page_as_unqueued_queue_it_once(slow_world, monkeypatch):
    """A window job and a take-over's job for the same page, both reading the run before either queued it: the
    page is claimed with the run record's ETag, so one queues it."""
    from shared import services
    from shared.pipeline import runs

    world = slow_world
    run_id = _run_held_after_first_page(world, monkeypatch, 400, page=2)
    svc = services.current()
    run = svc.records.get(run_id)
    assert run["queued_pages"] == 1 and run["pages"] == 2
    runs.queue_window(svc, run, 1)
    runs.queue_window(svc, run, 1)  # (the record it read says page 1 is not queued yet)
    report = world.wait(run_id, timeout=60)
    assert report["status"] == "succeeded" and report["counts"]["accepted"] == 400
    assert sent_contacts(world) == 400  # each batch sent once


def test_every_delivery_of_a_taken_over_run_checks_whether_its_batch_settled(slow_world, monkeypatch):
    """After a take-over, copies of a run's batches are on the queue beside its originals and the rests they
    re-queue: a first delivery of any of them finds its batch settled and sends nothing."""
    from shared import services
    from shared.pipeline import batch_messages, delivery, runs
    from shared.pipeline.batch_messages import BatchMessage
    from shared.state.run_records import utcnow

    world = slow_world
    run_id = _run_held_after_first_page(world, monkeypatch, 300, page=1)
    svc = services.current()
    svc.records.update(run_id, taken_over=utcnow())
    assert svc.records.get(run_id)["status"] == "running"
    sent = sent_contacts(world)
    first = runs._read_page(svc, run_id, 0)[0]
    again = BatchMessage(run_id, "seg", 1, first["kind"], first["items"])  # queued once, never delivered before
    asyncio.run(delivery.process_batch(svc, batch_messages.encode(again, svc.host.blob), dequeue_count=1))
    assert sent_contacts(world) == sent == 100
