"""Incremental sync: each run sends only the difference against what Autopilot acknowledged, in both modes."""

from __future__ import annotations

import math

import pytest

from tests.support import COLUMN, expected_contacts
from tests.support import definition as make_definition
from tools.generate_export import sample_profiles

EMAIL = COLUMN["PrimaryEmail"]


def segment_emails(rows) -> set[str]:
    return set(expected_contacts(r for r in rows if "@" in r[EMAIL]))


def expected_diff(before: list, after: list) -> tuple[int, int, int]:
    """Joiners, changed and leavers between two snapshots, worked out here independently of the planner."""
    old = {k: _comparable(v) for k, v in expected_contacts(r for r in before if "@" in r[EMAIL]).items()}
    new = {k: _comparable(v) for k, v in expected_contacts(r for r in after if "@" in r[EMAIL]).items()}
    changed = sum(1 for k in old.keys() & new.keys() if old[k] != new[k])
    return len(new.keys() - old.keys()), changed, len(old.keys() - new.keys())


def _comparable(contact: dict) -> dict:
    return {**contact, "Email": contact["Email"].lower()}  # Autopilot keys by email, whatever its case


def formula(membership: str, joiners: int, changed: int, leavers: int, rate: float = 50.0) -> int:
    """Field mode: 100 a merge. List mode: joiners merged a message (two seconds of requests) at a time, then one
    list call each; one list call a leaver; changed members 100 a merge."""
    if membership == "field":
        return math.ceil((joiners + changed + leavers) / 100)
    per_message = min(100, int(2 * rate))
    return joiners + math.ceil(joiners / per_message) + leavers + math.ceil(changed / 100)


def snapshots() -> list[list[tuple]]:
    """A segment's life: joins, field changes, leaves, a leaver who comes back, an email whose case changes,
    a row that turns invalid, then an unchanged refresh."""
    first = [list(r) for r in sample_profiles(150, seed=7)]
    second = [list(r) for r in first[:140]] + [list(r) for r in sample_profiles(20, seed=7, start=150)]
    for row in second[:5]:
        row[COLUMN["FirstName"]] = "Changed"
    second[10][EMAIL] = second[10][EMAIL].upper()
    second[20][EMAIL] = "no-longer-valid"
    third = [list(r) for r in second] + [list(first[145])]  # a leaver comes back
    return [[tuple(r) for r in s] for s in (first, second, third, third)]


class Membership:
    def __init__(self, world, membership: str):
        self.world, self.membership = world, membership

    def members(self) -> set[str]:
        return self.world.field_members() if self.membership == "field" else self.world.list_members()

    def contact_requests_since(self, mark: int) -> list[dict]:
        return [r for r in self.world.contact_requests()[mark:] if r["status"] == 200]


@pytest.mark.parametrize("membership", ["field", "list"])
def test_each_run_sends_exactly_the_difference_and_membership_equals_the_segment(world, membership):
    world.define(make_definition("seg", membership=membership))
    view = Membership(world, membership)
    previous: list = []
    for number, rows in enumerate(snapshots(), start=1):
        world.snapshot(rows)
        mark = len(world.contact_requests())
        report = world.run("seg")
        joiners, changed, leavers = expected_diff(previous, rows)
        assert report["status"] == "succeeded", (number, report)
        assert (report["counts"]["joiners"], report["counts"]["changed"], report["counts"]["leavers"]) == (
            joiners, changed, leavers), number
        assert view.members() == segment_emails(rows), number
        assert len(view.contact_requests_since(mark)) == formula(membership, joiners, changed, leavers), number
        previous = rows
    assert report["counts"]["unchanged"] == len(segment_emails(rows))  # the last refresh changed nothing


@pytest.mark.parametrize("membership", ["field", "list"])
def test_nothing_is_ever_unsubscribed_deleted_or_resubscribed(world, membership):
    world.define(make_definition("seg", membership=membership))
    for rows in snapshots()[:3]:
        world.snapshot(rows)
        world.run("seg")
    log = world.sim.request_log()
    assert not [r for r in log if r["method"] == "DELETE" and r["path"].startswith("/v1/contact/")]
    assert not [r for r in log if r["path"].endswith("/unsubscribe")]
    assert all(c.get("unsubscribed") is False for c in world.sim.contacts().values())
    # leavers stay in Autopilot as contacts: only their membership changed
    everyone = segment_emails(snapshots()[0]) | segment_emails(snapshots()[1])
    assert set(world.sim.contacts()) == everyone


def test_kept_leavers_stay_on_the_list_and_rejoin_without_a_request(world):
    world.define(make_definition("seg", membership="list", on_leave="keep"))
    first, second = snapshots()[:2]
    world.snapshot(first)
    world.run("seg")
    world.snapshot(second)
    report = world.run("seg")
    assert report["counts"]["leavers"] == 11 and report["counts"]["kept_leavers"] == 11
    assert not [r for r in world.sim.request_log() if r["method"] == "DELETE"]
    assert world.list_members() == segment_emails(first) | segment_emails(second)


def test_dry_run_changes_nothing_and_predicts_the_next_real_run(world):
    world.define(make_definition("seg", membership="list"))
    first, second = snapshots()[:2]
    world.snapshot(first)
    world.run("seg")
    world.snapshot(second)
    mark, sent_before = len(world.sim.request_log()), len(world.contact_requests())
    members = world.list_members()
    dry = world.run("seg", dryRun=True)
    assert world.sim.request_log()[mark:] == []
    assert world.list_members() == members
    assert dry["plan"]["seconds_at_budget"] > 0
    assert dry["plan"]["samples"]["leavers"] and all("***" in s for s in dry["plan"]["samples"]["leavers"])
    real = world.run("seg")
    for key in ("joiners", "changed", "leavers", "unchanged", "rejected"):
        assert dry["counts"][key] == real["counts"][key], key
    assert dry["plannedRequests"] == len([r for r in world.contact_requests()[sent_before:] if r["status"] == 200])


def test_unchanged_snapshot_is_not_synced_twice_but_force_resends_everything(world):
    rows = snapshots()[0]
    world.define(make_definition("seg"))
    world.snapshot(rows)
    world.run("seg")
    mark = len(world.contact_requests())
    again = world.run("seg")
    assert again["counts"]["unchanged"] == 150 and len(world.contact_requests()) == mark
    forced = world.run("seg", force=True)
    assert forced["counts"]["joiners"] == 150
    assert len([r for r in world.contact_requests()[mark:] if r["status"] == 200]) == 2
    assert world.field_members() == segment_emails(rows)


def test_run_stopped_between_batches_resumes_without_resending_acknowledged_contacts():
    from function_app import app
    from tests.support import close_world, open_world, wait_until
    from tools.local_host import LocalHost

    world = open_world(rate=5)
    try:
        rows = list(sample_profiles(2500, seed=9))
        world.define(make_definition("seg"))
        world.snapshot(rows)
        run_id = world.start("seg").json()["runId"]
        wait_until(lambda: world.view(run_id)["batches"]["settled"] >= 5)
        world.host.stop()  # the instance goes away; its queue messages stay
        settled = world.view_records(run_id)
        assert 5 <= settled < 25
        world.host = LocalHost(app, world.host.settings, port=0, options=world.host.options,
                               function_key=world.host.function_key).start()
        report = world.wait(run_id)
        assert report["status"] == "succeeded"
        assert world.field_members() == segment_emails(rows)
        written = [r for r in world.sim.request_log() if r["status"] == 200 and r["path"] == "/v1/contacts"]
        assert sum(r["n"] for r in written) == 2500  # no acknowledged contact was sent twice
    finally:
        close_world(world)
