"""The acknowledged state as snapshots per export and destination: folding, crashes between its writes,
destination changes, the upgrade from per-contact entities, broken snapshots, and planning as a queued step."""

from __future__ import annotations

import gzip
import hashlib
import time
from itertools import pairwise

import pytest
from azure.data.tables import TableServiceClient

from shared.pipeline import runs
from shared.state.run_records import RunRecords
from shared.state.state_store import (
    STATE_CONTAINER,
    STATE_TABLE,
    Acked,
    Destination,
    ExportState,
    StateUnreadable,
)
from tests.support import acknowledged_state, close_world, definition, open_world, wait_until
from tests.test_incremental import formula, segment_emails
from tools.generate_export import sample_profiles

DEST = Destination("https://autopilot.test/v1 (key k)", "field", "boolean--In")


@pytest.fixture
def state(azurite):
    from azure.storage.blob import BlobServiceClient

    blobs = BlobServiceClient.from_connection_string(azurite.connection_string)
    tables = TableServiceClient.from_connection_string(azurite.connection_string)
    for make in (lambda: blobs.create_container(STATE_CONTAINER), lambda: tables.create_table(STATE_TABLE)):
        try:
            make()
        except Exception:  # already there from an earlier test
            pass
    name = f"t{time.monotonic_ns() % 10**12}"
    yield ExportState(blobs, tables.get_table_client(STATE_TABLE), name)
    blobs.close()
    tables.close()


def acks(*entries: tuple[str, str, bool]) -> list[Acked]:
    return [Acked(*e) for e in entries]


# --- the store on its own (real Azurite) ------------------------------------------------------------
def test_fold_merges_runs_in_order_and_a_repeated_fold_changes_nothing(state):
    runs_acks = {"r1": acks(("b@x.io", "f1", True), ("a@x.io", "f1", True)),
                 "r2": acks(("b@x.io", "f2", True), ("c@x.io", "f1", False))}
    state.register("r1", DEST)
    state.register("r2", DEST)
    assert state.fold(DEST, runs_acks.get) == 2
    assert list(state.load(DEST)) == acks(("a@x.io", "f1", True), ("b@x.io", "f2", True), ("c@x.io", "f1", False))
    assert state.head()[0]["pending"] == []
    assert state.fold(DEST, runs_acks.get) == 0


def test_a_run_still_sending_is_not_folded_and_neither_is_any_run_after_it(state):
    state.register("r1", DEST)
    state.register("r2", DEST)
    folded = state.fold(DEST, {"r1": None, "r2": acks(("a@x.io", "f", True))}.get)
    assert folded == 0 and [p["run"] for p in state.head()[0]["pending"]] == ["r1", "r2"]
    assert list(state.load(DEST)) == []


def test_crash_after_the_snapshot_write_before_the_head_update_folds_nothing_twice(state, monkeypatch):
    state.register("r1", DEST)
    monkeypatch.setattr(ExportState, "_forget", lambda self, entries: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        state.fold(DEST, {"r1": acks(("a@x.io", "f1", True))}.get)
    monkeypatch.undo()
    # r1 is still pending, but the snapshot names it folded: a later fold drops it without applying it again
    # (applying it again would put back f1 over r2's f2).
    state.register("r2", DEST)
    assert state.fold(DEST, {"r1": acks(("a@x.io", "f1", True)), "r2": acks(("a@x.io", "f2", True))}.get) == 2
    assert list(state.load(DEST)) == acks(("a@x.io", "f2", True))
    assert state.head()[0]["pending"] == []


def test_each_destination_has_its_own_snapshot_and_the_head_names_the_last_one(state):
    other = Destination(DEST.account, "list", "High value")
    state.register("r1", DEST)
    state.fold(DEST, {"r1": acks(("a@x.io", "f", True))}.get)
    state.register("r2", other)
    assert state.previous_destination() == other.name and DEST.id != other.id
    assert list(state.load(other)) == [] and len(list(state.load(DEST))) == 1


@pytest.mark.parametrize("damage, why", [
    (lambda data: data[: len(data) // 2], "Error"),
    (lambda data: b"not gzip at all", "BadGzipFile"),
    (lambda data: gzip.compress(gzip.decompress(data).replace(b"#end\t2", b"#end\t3")), "end mark"),
    (lambda data: gzip.compress(gzip.decompress(data).replace(b'"version": 2', b'"version": 9')), "version 9"),
    (lambda data: gzip.compress(b"\n".join(gzip.decompress(data).split(b"\n")[:-2]) + b"\n"), "truncated"),
])
def test_a_broken_snapshot_is_refused_naming_the_blob(state, damage, why):
    state.register("r1", DEST)
    state.fold(DEST, {"r1": acks(("a@x.io", "f", True), ("b@x.io", "f", True))}.get)
    blob = state.container.get_blob_client(state.blob_name(DEST))
    blob.upload_blob(damage(blob.download_blob().readall()), overwrite=True)
    with pytest.raises(StateUnreadable) as error:
        state.check(DEST)
    assert f"{STATE_CONTAINER}/{state.export}/{DEST.id}.gz" in str(error.value)
    assert why in str(error.value) and "force" in str(error.value)


def test_the_per_contact_entities_of_older_versions_become_a_snapshot_once(state):
    table = state.table
    for key, member in (("b@x.io", True), ("a@x.io", False)):
        table.create_entity({"PartitionKey": state.export, "RowKey": hashlib.sha256(key.encode()).hexdigest()[:40],
                             "email": key, "fp": "f0", "member": member})
    assert state.import_legacy(DEST) == 2
    assert list(state.load(DEST)) == acks(("a@x.io", "f0", False), ("b@x.io", "f0", True))
    other = Destination(DEST.account, "list", "Another")
    assert state.import_legacy(other) == 0 and list(state.load(other)) == []  # carried over to one only


# --- end to end on the local stack --------------------------------------------------------------------
@pytest.mark.parametrize("first, second", [
    ({"membership": "list"}, {"membership": "list", "destination_list": "Other list"}),
    ({"membership": "list"}, {"membership": "field"}),
    ({"membership": "field"}, {"membership": "field", "destination_field": "Renamed Segment"}),
])
def test_a_changed_destination_gets_the_whole_segment_and_the_old_one_is_left_as_it_was(world, first, second):
    rows = list(sample_profiles(60, seed=61))
    world.define(_export("seg", **first))
    world.snapshot(rows)
    assert world.run("seg")["status"] == "succeeded"
    before = _held(world, first)
    assert before == segment_emails(rows)
    world.define(_export("seg", **second))  # same snapshot, another destination
    mark = len(world.contact_requests())
    report = world.run("seg")
    assert report["status"] == "succeeded", report
    assert report["counts"]["joiners"] == 60 and report["counts"]["leavers"] == 0
    assert report["destination"]["changedFrom"] == _destination_name(world, first)
    assert report["destination"]["firstSync"] is True
    sent = [r for r in world.contact_requests()[mark:] if r["status"] == 200]
    assert len(sent) == formula(second["membership"], 60, 0, 0)
    assert _held(world, second) == segment_emails(rows)
    assert _held(world, first) == before  # nothing sent to the old destination
    dry = world.run("seg", dryRun=True)  # the same destination again: nothing changed, no note
    assert dry["counts"]["joiners"] == 0 and "changedFrom" not in dry["destination"]


def _export(name: str, membership: str, destination_list: str = "High value",
            destination_field: str = "In High Value Segment") -> dict:
    export = definition(name, membership=membership)
    export["destination"].update({"list": destination_list} if membership == "list" else {"field": destination_field})
    return export


def _held(world, spec: dict) -> set[str]:
    if spec["membership"] == "list":
        return world.list_members(spec.get("destination_list", "High value"))
    field = spec.get("destination_field", "In High Value Segment")
    return world.field_members("boolean--" + "--".join(field.split()))


def _destination_name(world, spec: dict) -> str:
    from shared import services

    svc = services.current()
    export = next(e for e in svc.exports())  # only to learn the account; mode and target come from `spec`
    target = spec.get("destination_list", "High value") if spec["membership"] == "list" else \
        "boolean--" + "--".join(spec.get("destination_field", "In High Value Segment").split())
    return Destination(svc.destination(export).account, spec["membership"], target).name


def _unchanged_rerun_sends_nothing(world, rows) -> None:
    mark = len(world.contact_requests())
    report = world.run("seg")
    assert report["status"] == "succeeded", report
    assert report["counts"]["unchanged"] == len(segment_emails(rows)) and report["counts"]["joiners"] == 0
    assert world.contact_requests()[mark:] == []
    assert {a.key for a in acknowledged_state(world.stack.storage, "seg") if a.member} == segment_emails(rows)


def _crash_once(monkeypatch, owner, name: str, after: bool) -> list:
    """Make `owner.name` die once, before or after doing its work, as a killed instance would there."""
    real, crashed = getattr(owner, name), []

    def dying(*args, **kwargs):
        if crashed:
            return real(*args, **kwargs)
        crashed.append(name)
        if after:
            real(*args, **kwargs)
        raise SystemError(f"killed {'after' if after else 'before'} {name}")

    monkeypatch.setattr(owner, name, dying)
    return crashed


@pytest.mark.parametrize("owner, name, after", [
    (RunRecords, "record_batch", True),  # outcome and acknowledgements written; the done count not bumped
    (RunRecords, "count_done", True),  # the done count bumped; the run not finished by this instance
    (ExportState, "write", False),  # the run finished; the fold after it died before writing the snapshot
    (ExportState, "_forget", False),  # the snapshot written; the folded runs still pending in the head
], ids=["after-outcome", "after-count", "before-snapshot", "before-head"])
def test_a_crash_between_any_two_writes_loses_nothing_and_resends_nothing(world, monkeypatch, owner, name, after):
    rows = list(sample_profiles(450, seed=62))
    world.define(definition("seg"))
    world.snapshot(rows)
    crashed = _crash_once(monkeypatch, owner, name, after)
    mark = len(world.contact_requests())
    report = world.run("seg")
    assert report["status"] == "succeeded", report
    wait_until(lambda: crashed, timeout=10)  # the fold comes after the run's end
    assert sum(r["n"] for r in world.contact_requests()[mark:] if r["status"] == 200) == 450  # none twice
    assert world.field_members() == segment_emails(rows)
    _unchanged_rerun_sends_nothing(world, rows)


def test_an_app_holding_the_older_per_contact_state_sends_nothing_on_its_next_unchanged_refresh(world):
    rows = list(sample_profiles(120, seed=63))
    world.define(definition("seg"))
    world.snapshot(rows)
    assert world.run("seg")["status"] == "succeeded"
    held = acknowledged_state(world.stack.storage, "seg")
    # Turn the state back into what the version before snapshots kept: one entity per contact, no head.
    with TableServiceClient.from_connection_string(world.stack.storage) as tables:
        table = tables.get_table_client(STATE_TABLE)
        for ack in held:
            table.create_entity({"PartitionKey": "seg", "RowKey": hashlib.sha256(ack.key.encode()).hexdigest()[:40],
                                 "email": ack.key, "fp": ack.fingerprint, "member": ack.member})
        table.delete_entity("~head", "seg")
    for blob in world.blobs.get_container_client(STATE_CONTAINER).list_blobs(name_starts_with="seg/"):
        world.blobs.get_blob_client(STATE_CONTAINER, blob.name).delete_blob()
    assert acknowledged_state(world.stack.storage, "seg") == []
    world.snapshot(rows)
    _unchanged_rerun_sends_nothing(world, rows)
    # The old entities had no record digests: that run learnt them, without sending, for the next one to skip.
    assert all(a.source for a in acknowledged_state(world.stack.storage, "seg"))


def test_a_corrupt_snapshot_fails_the_run_before_sending_naming_it_and_force_rebuilds_it(world):
    rows = list(sample_profiles(80, seed=64))
    world.define(definition("seg"))
    world.snapshot(rows)
    assert world.run("seg")["status"] == "succeeded"
    assert acknowledged_state(world.stack.storage, "seg")  # the fold after the run's end wrote the snapshot
    (blob,) = [b for b in world.blobs.get_container_client(STATE_CONTAINER).list_blobs(name_starts_with="seg/")
               if b.name.endswith(".gz")]
    client = world.blobs.get_blob_client(STATE_CONTAINER, blob.name)
    client.upload_blob(client.download_blob().readall()[:-40], overwrite=True)
    world.snapshot(rows)
    mark = len(world.contact_requests())
    failed = world.run("seg")
    assert failed["status"] == "failed" and f"{STATE_CONTAINER}/{blob.name}" in failed["error"], failed
    assert world.contact_requests()[mark:] == []
    forced = world.run("seg", force=True)
    assert forced["status"] == "succeeded" and forced["destination"]["firstSync"] is True
    assert world.field_members() == segment_emails(rows)
    _unchanged_rerun_sends_nothing(world, rows)


@pytest.mark.serial  # the answer is timed
# --- planning as a queued step ---------------------------------------------------------------------
def test_start_answers_202_before_planning_and_a_dry_run_reports_on_the_run_view(world):
    rows = list(sample_profiles(6000, seed=65))
    world.define(definition("seg"))
    world.snapshot(rows)
    began = time.monotonic()
    answer = world.start("seg", dryRun=True)
    elapsed = time.monotonic() - began
    body = answer.json()
    assert answer.status_code == 202 and body["status"] == "queued" and body["statusUrl"].endswith(body["runId"])
    assert elapsed < 1.0, elapsed
    report = world.wait(body["runId"])
    assert report["status"] == "dry run" and report["counts"]["joiners"] == 6000
    assert report["plan"]["estimated_duration"] and report["destination"]["firstSync"] is True
    assert world.contact_requests() == []


def test_the_timer_plans_each_export_in_its_own_invocation(world):
    names = ("one", "two", "three")
    world.define(*(definition(n, segment=f"Segment{n.title()}", target=f"In {n}") for n in names))
    for n in names:
        world.snapshot(list(sample_profiles(30, seed=len(n), start=1000 * len(n))), segment=f"Segment{n.title()}")
    invocations: list[str] = []
    real = runs.plan_run
    runs_started = []

    def counting(svc, run):
        invocations.append(run["export"])
        return real(svc, run)

    from unittest import mock

    with mock.patch.object(runs, "plan_run", counting):
        runs_started = runs.scheduled_tick(_svc())
        assert len(runs_started) == 3
        for run_id in runs_started:
            assert world.wait(run_id)["status"] == "succeeded"
    assert sorted(invocations) == sorted(names)
    assert runs.scheduled_tick(_svc()) == []  # every snapshot synced: nothing more to plan


def _svc():
    from shared import services

    return services.current()


def test_a_planning_invocation_that_dies_half_way_is_redelivered_and_the_run_completes_once(world, monkeypatch):
    rows = list(sample_profiles(450, seed=66))
    world.define(definition("seg"))
    world.snapshot(rows)
    real, calls = runs._enqueue, []

    def dying(svc, run, batches, first, again, turn):  # the first window is queued in part, then the instance dies
        calls.append(again)
        if len(calls) == 1:
            real(svc, run, batches[:2], first, again, turn)
            time.sleep(2)  # those two are sent and settled before the job is delivered again
            raise SystemError("killed while queueing the first window")
        return real(svc, run, batches, first, again, turn)

    monkeypatch.setattr(runs, "_enqueue", dying)
    mark = len(world.contact_requests())
    started = world.start("seg").json()
    report = world.wait(started["runId"])
    assert calls == [False, True] and report["status"] == "succeeded", report
    # The redelivered job queued the two settled batches again, marked: their first delivery found them settled.
    assert sum(r["n"] for r in world.contact_requests()[mark:] if r["status"] == 200) == 450
    assert report["batches"] == {"planned": 5, "settled": 5, "dead": 0}
    assert report["counts"]["accepted"] == 450
    assert len(RunRecords_for(world).for_export("seg", limit=5)) == 1  # no second run
    assert world.field_members() == segment_emails(rows)
    _unchanged_rerun_sends_nothing(world, rows)


def test_a_first_sync_sends_its_first_pages_while_the_rest_is_planned(world, monkeypatch):
    monkeypatch.setattr(runs, "PAGE", 2)  # 10 batches of 100 contacts in 5 pages
    rows = list(sample_profiles(1000, seed=68))
    world.define(definition("seg"))
    world.snapshot(rows)
    real, seen = runs.write_pages, {}

    def held(svc, run_id, batches, written=lambda pages: None):
        def batches_held_after_two_pages():
            for n, batch in enumerate(batches):
                if n == 4:  # pages 1 and 2 are written: planning waits here until the first contacts were sent
                    wait_until(lambda: world.contact_requests(), timeout=30)
                    seen["while planning"] = svc.records.get(run_id)
                yield batch
        return real(svc, run_id, batches_held_after_two_pages(), written)

    monkeypatch.setattr(runs, "write_pages", held)
    report = world.wait(world.start("seg").json()["runId"])
    assert seen["while planning"]["status"] == "running" and seen["while planning"]["streaming"]
    assert "planned_batches" not in seen["while planning"]  # (so no batch settling then could finish the run)
    assert report["status"] == "succeeded" and report["batches"] == {"planned": 10, "settled": 10, "dead": 0}
    assert report["plan"]["streamed"] and report["counts"]["accepted"] == report["counts"]["joiners"] == 1000
    assert world.field_members() == segment_emails(rows)
    _unchanged_rerun_sends_nothing(world, rows)


def test_a_streamed_first_sync_whose_planning_dies_is_planned_again_and_completes_once(world, monkeypatch):
    monkeypatch.setattr(runs, "PAGE", 2)
    rows = list(sample_profiles(1000, seed=69))
    world.define(definition("seg"))
    world.snapshot(rows)
    real, attempts = runs.write_pages, []

    def dying(svc, run_id, batches, written=lambda pages: None):
        attempts.append(run_id)
        if len(attempts) > 1:
            return real(svc, run_id, batches, written)

        def written_then_killed(count):
            written(count)
            if count == 2:  # two pages written, the first queued and sent: then the instance dies
                wait_until(lambda: sum(r["status"] == 200 for r in world.contact_requests()) >= 2, timeout=30)
                raise SystemError("killed while a streamed first sync was planned")
        return real(svc, run_id, batches, written_then_killed)

    monkeypatch.setattr(runs, "write_pages", dying)
    mark = len(world.contact_requests())
    report = world.wait(world.start("seg").json()["runId"])
    assert len(attempts) == 2 and report["status"] == "succeeded", report
    assert report["batches"] == {"planned": 10, "settled": 10, "dead": 0}
    # Nothing acknowledged was sent again: the first window was not queued twice.
    assert sum(r["n"] for r in world.contact_requests()[mark:] if r["status"] == 200) == 1000
    assert len(RunRecords_for(world).for_export("seg", limit=5)) == 1  # no second run
    assert world.field_members() == segment_emails(rows)
    _unchanged_rerun_sends_nothing(world, rows)


def RunRecords_for(world) -> RunRecords:
    return RunRecords(TableServiceClient.from_connection_string(world.stack.storage))


def _watch_windows(monkeypatch) -> list[tuple[int, float]]:
    """(page, when) for each window a job queues from now on."""
    real, windows = runs.queue_window, []

    def watched(svc, run, page, again=False, start=0.0):
        windows.append((page, time.monotonic()))
        return real(svc, run, page, again, start)

    monkeypatch.setattr(runs, "queue_window", watched)
    return windows


def test_short_pages_are_queued_one_ahead_not_all_at_once(monkeypatch):
    """Pages far shorter than WINDOW_LEAD (a second each here; at 50 requests/s in field mode, too): the next page
    is queued as one starts to be sent, its turns following on, so the queue holds about two pages (the length
    Flex Consumption scales the send function out by), not the whole run."""
    monkeypatch.setattr(runs, "PAGE", 2)
    world = open_world(rate=2)
    try:
        rows = list(sample_profiles(1000, seed=69))
        world.define(definition("seg"))
        world.snapshot(rows)
        windows = _watch_windows(monkeypatch)
        report = world.wait(world.start("seg").json()["runId"])
        first = {page: at for page, at in reversed(windows)}  # when each page was first queued
        assert report["status"] == "succeeded" and set(first) >= {0, 1, 2, 3, 4}  # (5: a streamed sync's look)
        assert first[4] - first[0] >= 2.0  # 5 s of sending: the last page queued seconds in
        assert world.field_members() == segment_emails(rows)
    finally:
        close_world(world)


@pytest.mark.serial  # windows are timed
def test_batches_are_queued_a_page_at_a_time_as_sending_advances(monkeypatch):
    monkeypatch.setattr(runs, "PAGE", 3)
    monkeypatch.setattr(runs, "WINDOW_LEAD", 0.5)
    world = open_world(rate=1)
    try:
        rows = list(sample_profiles(1000, seed=67))
        world.define(definition("seg"))
        world.snapshot(rows)
        windows = _watch_windows(monkeypatch)
        run_id = world.start("seg").json()["runId"]
        report = world.wait(run_id)
        assert report["status"] == "succeeded" and report["batches"]["settled"] == 10
        assert int(RunRecords_for(world).get(run_id)["pages"]) == 4
        assert [page for page, _ in windows] == [0, 1, 2, 3]
        # Each page of 3 batches takes 3 s of the budget at 1 request/s: its successor is queued about then, not
        # up front (queue delays are whole seconds, and queueing a page may take a while on a busy machine).
        gaps = [b - a for (_, a), (_, b) in pairwise(windows)]
        assert all(gap >= 0.9 for gap in gaps), gaps
        assert world.field_members() == segment_emails(rows)
    finally:
        close_world(world)


def test_the_state_reader_helper_reads_the_current_destination(world):
    """tests.support.acknowledged_state is what the other tests trust: it must see exactly what was sent."""
    rows = list(sample_profiles(25, seed=68))
    world.define(definition("seg"))
    world.snapshot(rows)
    world.run("seg")
    held = acknowledged_state(world.stack.storage, "seg")
    assert {a.key for a in held} == segment_emails(rows) and all(a.member for a in held)


def test_a_planning_job_that_fails_on_every_delivery_fails_its_run_and_frees_the_export(world, monkeypatch):
    rows = list(sample_profiles(30, seed=69))
    world.define(definition("seg"))
    world.snapshot(rows)

    def broken(svc, run):
        raise ConnectionError("storage unreachable")

    monkeypatch.setattr(runs, "plan_run", broken)
    run_id = world.start("seg").json()["runId"]
    report = world.wait(run_id, timeout=30)
    assert report["status"] == "failed" and "planning failed on every delivery" in report["error"]
    monkeypatch.undo()
    assert world.run("seg")["status"] == "succeeded"  # the export is not locked by the failed run
    assert world.field_members() == segment_emails(rows)


@pytest.mark.parametrize("body", [b"not json", b'{"run": "../etc"}', b'{"run": "20260302T043000Z-0c0ffee0", '
                                  b'"page": -1}', b'{"run": "20260302T043000Z-0c0ffee0", "extra": 1}'])
def test_a_malformed_planning_job_is_logged_and_changes_nothing(world, body, caplog):
    runs.handle_plan_message(_svc(), body)
    assert "not a planning job" in caplog.text
    assert RunRecords_for(world).active() == []


# --- the mass-removal guard ---------------------------------------------------------------------------
@pytest.mark.parametrize("membership", ["list", "field"])
def test_a_refresh_that_would_empty_the_audience_stops_before_sending_until_forced(world, membership):
    rows = list(sample_profiles(40, seed=70))
    world.define(definition("seg", membership=membership))
    world.snapshot(rows)
    assert world.run("seg")["status"] == "succeeded"
    held = world.list_members() if membership == "list" else world.field_members()
    world.snapshot([])  # a broken upstream refresh: model.json names one empty partition
    dry = world.run("seg", dryRun=True)
    assert "a run without force would stop" in dry["plan"]["removalGuard"]
    mark = len(world.contact_requests())
    stopped = world.run("seg")
    assert stopped["status"] == "failed" and "no valid profile" in stopped["error"] and "force" in stopped["error"]
    assert "maxRemovalPercent" in stopped["error"] and "all 40 members" in stopped["error"]
    assert world.contact_requests()[mark:] == []
    assert (world.list_members() if membership == "list" else world.field_members()) == held
    forced = world.run("seg", force=True)
    assert forced["status"] == "succeeded" and forced["counts"]["leavers"] == 40
    assert (world.list_members() if membership == "list" else world.field_members()) == set()


def test_a_refresh_with_no_valid_profile_stops_in_keep_mode_too(world):
    """onLeave keep removes nobody, but a broken refresh would still record every member as having left, and the
    next refresh would send them all again as joiners."""
    world.define(definition("seg", on_leave="keep"))
    world.snapshot(list(sample_profiles(30, seed=74)))
    assert world.run("seg")["status"] == "succeeded"
    world.snapshot([])
    mark = len(world.contact_requests())
    stopped = world.run("seg")
    assert stopped["status"] == "failed" and "no valid profile" in stopped["error"]
    assert "take as having left (onLeave keep) all 30 members" in stopped["error"]
    assert world.contact_requests()[mark:] == []


def test_removing_more_than_max_removal_percent_names_both_numbers_and_a_raised_limit_lets_it_run(world):
    rows = list(sample_profiles(50, seed=71))
    world.define(definition("seg"))
    world.snapshot(rows)
    assert world.run("seg")["status"] == "succeeded"
    world.snapshot(rows[:35])  # 15 of 50 leave: 30%
    stopped = world.run("seg")
    assert stopped["status"] == "failed"
    assert "remove 15 of the 50 members" in stopped["error"] and "30.0%" in stopped["error"]
    assert "maxRemovalPercent 20" in stopped["error"]
    world.define(definition("seg", maxRemovalPercent=30))
    assert world.run("seg")["status"] == "succeeded"
    assert world.field_members() == segment_emails(rows[:35])
