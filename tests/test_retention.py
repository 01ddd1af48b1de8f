"""Nothing grows for ever: the hourly sweep deletes finished runs past retention with what they kept, never a run
the app still reads, and keeps what the poison queues' own poison queues hold; a fold drops a run's planned
acknowledgements. On real Azurite, with run records written directly (made old by their `finished` time)."""

from __future__ import annotations

import json
import logging
import re
import uuid
from contextlib import suppress
from itertools import chain
from types import SimpleNamespace

import pytest
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from shared.pipeline import retention
from shared.pipeline.delivery import DEAD
from shared.runtime.settings import UNHANDLED_QUEUES, Settings, SettingsError
from shared.services import Services
from shared.state.run_records import utcnow
from shared.state.state_store import Acked, Destination

OLD = "2020-01-01T00:00:00.000Z"  # far beyond the default 30 days
DEST = Destination("https://autopilot.test/v1 (key k)", "field", "boolean--In")
BASE = {"KEY_VAULT_URL": "https://vault.example/"}


@pytest.fixture
def svc(azurite):
    services = Services(Settings.from_env({**BASE, "AzureWebJobsStorage": azurite.connection_string}))
    services.ensure_resources()
    yield services
    services.close()


def make_runs(svc: Services, count: int, finished: str = OLD) -> tuple[str, list[str]]:
    """A new export with `count` finished runs, oldest first."""
    export, tag = f"ret-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    runs = [f"20200101T0000{n:02d}Z-{tag}" for n in range(count)]
    for run_id in runs:
        svc.records.create(run_id, export, status="succeeded", finished=finished)
    return export, runs


def add_outcomes(svc: Services, run_id: str, count: int) -> None:
    rows = [("create", {"PartitionKey": run_id, "RowKey": f"{n:06d}", "status": "done"}) for n in range(1, count + 1)]
    for first in range(0, count, 100):
        svc.records.batches.submit_transaction(rows[first:first + 100])


def planned_blob(svc: Services, export: str, run_id: str):
    return svc.state(export)._planned_blob(run_id)


def test_a_run_finished_before_the_retention_goes_with_all_it_kept_but_each_exports_newest_20_stay(svc):
    export, runs = make_runs(svc, 23)
    add_outcomes(svc, runs[0], 150)  # more than one transaction's 100
    add_outcomes(svc, runs[1], 2)
    add_outcomes(svc, runs[-1], 2)
    for run_id in (runs[0], runs[-1]):
        svc.state(export).save_planned(run_id, [Acked("kept@x.io", "f", False)])

    removed = retention.sweep(svc)
    assert (removed["runs"], removed["outcomes"]) == (3, 152)
    for run_id in runs[:3]:
        assert svc.records.get(run_id) is None and svc.records.batch_outcomes(run_id) == []
    assert not planned_blob(svc, export, runs[0]).exists()
    assert svc.records.newest(export, 30) == runs[:2:-1]  # the index lists the 20 kept only
    assert len(svc.records.for_export(export, 30)) == 20  # old as they are: the timer reads them
    assert len(svc.records.batch_outcomes(runs[-1])) == 2 and planned_blob(svc, export, runs[-1]).exists()
    assert retention.sweep(svc)["runs"] == 0  # nothing left to do


def test_active_cancelling_recent_and_unfolded_runs_are_kept(svc):
    export, runs = make_runs(svc, 25)  # the newest 20: runs[5:]
    svc.records.update(runs[0], status="running")  # (a replayed run's `finished` is emptied; kept by status too)
    svc.records.update(runs[1], status="cancelling")
    svc.state(export).register(runs[2], DEST)  # its acknowledgements are not folded yet
    svc.records.update(runs[3], finished=utcnow())
    assert retention.sweep(svc)["runs"] == 1
    assert [run_id for run_id in runs if svc.records.get(run_id) is None] == [runs[4]]


def test_a_backlog_is_worked_off_a_bounded_sweep_at_a_time(svc, monkeypatch):
    export, runs = make_runs(svc, 25)
    add_outcomes(svc, runs[0], 3)
    monkeypatch.setattr(retention, "RUNS_PER_SWEEP", 2)
    monkeypatch.setattr(retention, "OUTCOMES_PER_SWEEP", 3)
    assert [retention.sweep(svc)["runs"] for _ in range(4)] == [1, 2, 2, 0]
    assert svc.records.newest(export, 30) == runs[:4:-1]


def test_the_sweep_runs_at_most_once_an_hour_and_a_failed_one_does_not_fail_the_tick(monkeypatch):
    from function_app import app
    from shared import services
    from shared.pipeline import runs
    from tools.local_host import index

    calls = []
    monkeypatch.setattr(services, "current", lambda: "svc")
    monkeypatch.setattr(runs, "scheduled_tick", lambda svc: calls.append("tick"))
    monkeypatch.setattr(retention, "sweep", lambda svc: calls.append("sweep") or 1 / 0)
    monkeypatch.setattr(retention, "_swept_at", None)
    tick = next(f for f in index(app) if f.get_function_name() == "scheduled_sync").get_user_function()
    tick(timer=SimpleNamespace(past_due=False))
    tick(timer=SimpleNamespace(past_due=False))
    assert calls == ["tick", "sweep", "tick"]
    monkeypatch.setattr(retention, "_swept_at", retention._swept_at - retention.EVERY)
    tick(timer=SimpleNamespace(past_due=False))
    assert calls[-2:] == ["tick", "sweep"]


def test_a_fold_drops_a_runs_planned_acknowledgements_once_no_entry_of_it_is_pending(svc):
    state = svc.state(f"ret-{uuid.uuid4().hex[:8]}")
    kept, acked = Acked("kept@x.io", "f1", False), Acked("sent@x.io", "f2", True)
    state.save_planned("r1", [kept])
    state.register("r1", DEST)
    state.register("r1", DEST, entry="r1/replay 1")
    answers = iter([list(state.planned("r1")), None])  # the replay still sends at the first fold
    assert state.fold(DEST, lambda run: next(answers)) == 1
    assert list(state.planned("r1")) == [kept]  # its replay's entry is pending: kept
    assert state.fold(DEST, lambda run: chain(state.planned(run), [acked])) == 1
    assert not state._planned_blob("r1").exists()
    # A later replay folds the run without them: what was folded stays.
    state.register("r1", DEST, entry="r1/replay 2")
    assert state.fold(DEST, lambda run: chain(state.planned(run), [acked])) == 1
    assert list(state.load(DEST)) == [kept, acked]


def test_what_the_poison_queues_poison_queues_hold_is_kept_in_dead_and_never_logged(svc, caplog):
    batches, plans = UNHANDLED_QUEUES
    marker = uuid.uuid4().hex
    bodies = [json.dumps({"run": marker, "items": [{"k": f"person{n}@example.com"}]}) for n in range(2)]
    with svc.host.queue(batches) as queue, svc.host.queue(batches, base64=False) as raw, \
            svc.host.queue(plans) as missing:
        with suppress(ResourceExistsError):
            queue.create_queue()
        with suppress(ResourceNotFoundError):
            missing.delete_queue()  # the host makes it when it first moves a message there
        for body in bodies:
            queue.send_message(body.encode())  # base64, as the host writes them
        raw.send_message(f"not base64 {marker}")
        with caplog.at_level(logging.ERROR, logger="autopilot.retention"):
            removed = retention.sweep(svc)
        assert removed["unhandled"] == 3
        assert list(queue.peek_messages()) == []
    dead = svc.host.blob.get_container_client(DEAD)
    kept = {blob.name: json.loads(dead.download_blob(blob.name).readall())
            for blob in dead.list_blobs(name_starts_with="unhandled/")}
    mine = {name: data for name, data in kept.items() if marker in data["body"]}
    assert sorted(data["body"] for data in mine.values()) == sorted([*bodies, f"not base64 {marker}"])
    assert all(re.fullmatch(r"unhandled/\d{4}-\d\d-\d\d/[0-9a-f]{32}\.json", name) for name in mine)
    assert {(data["queue"], data["dequeue_count"]) for data in mine.values()} == {(batches, 1)}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all(batches in e for e in errors)
    assert "@example.com" not in caplog.text and marker not in caplog.text


@pytest.mark.parametrize("value, problem", [("0", "must be greater than 0"), ("2.5", "must be a whole number"),
                                            ("a month", "must be a number")])
def test_a_malformed_retention_refuses_to_start_naming_it(value, problem):
    with pytest.raises(SettingsError, match=f"app setting RETENTION_DAYS {problem}"):
        Settings.from_env({**BASE, "RETENTION_DAYS": value})
    assert Settings.from_env(BASE).retention_days == 30
    assert Settings.from_env({**BASE, "RETENTION_DAYS": "90"}).retention_days == 90
