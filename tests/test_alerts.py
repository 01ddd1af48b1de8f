"""The alert rules read what the app writes: every event and field each rule's query in infra/app/alerts.bicep
reads is written by the app (shared/runtime/signals.py) in end-to-end runs, so a rename cannot silently blind an
alert."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from pycep import BicepParser

from shared.runtime.signals import EVENTS
from shared.state.run_records import FINISHED
from tests.support import close_world, definition, open_world
from tools.autopilot_sim import Faults
from tools.generate_export import sample_profiles

ALERTS = Path(__file__).resolve().parents[1] / "infra" / "app" / "alerts.bicep"


def rules() -> dict[str, str]:
    template = BicepParser().parse(file_path=ALERTS)
    return {rule["name"]: rule["query"] for rule in template["variables"]["rules"]["value"]}


def reads(query: str) -> dict[str, set[str]]:
    """{event: the JSON fields the query reads from its records}: each `startswith "<event> "` up to the next."""
    found: dict[str, set[str]] = {}
    for part in query.split('startswith "')[1:]:
        event = part[:part.index(" ")]
        found.setdefault(event, set()).update(re.findall(r"\br\.(\w+)", part))
    return found


def test_every_rule_reads_known_events_and_filters_on_real_statuses():
    queries = rules()
    assert set(queries) == {"run-failed", "dead-batches", "export-not-synced", "throttled", "timer-silent"}
    for name, query in queries.items():
        assert reads(query), f"{name} reads no event"
        assert set(reads(query)) <= set(EVENTS), name
        for status in re.findall(r'"([a-z ]+)"', query.split("r.status")[-1])[:2] if "r.status" in query else []:
            assert status in FINISHED, f"{name} filters on a status no run ends with: {status!r}"


def test_the_heartbeat_fires_when_the_timer_writes_nothing_and_the_others_on_any_row():
    template = BicepParser().parse(file_path=ALERTS)
    fires = {rule["name"]: (rule["operator"], rule["threshold"]) for rule in template["variables"]["rules"]["value"]}
    assert fires.pop("timer-silent") == ("LessThan", 1)  # no exports_enabled record in its window
    assert set(fires.values()) == {("GreaterThan", 0)}
    assert "exports_enabled" in reads(rules()["timer-silent"])
    criteria = template["resources"]["alertRules"]["config"]["config"]["properties"]["criteria"]["allOf"][0]
    for key in ("operator", "threshold"):  # each rule's own, not one for all
        assert criteria[key]["operator"]["operands"] == {"operand_1": "rule", "operand_2": key}


def test_the_records_alerts_count_are_never_sampled_away():
    """Application Insights' adaptive sampling drops a share of each type it samples: a run_ended or batch_dead
    record dropped is a failure no alert sees, an exports_enabled dropped a heartbeat missed. They are traces."""
    host = json.loads((Path(__file__).resolve().parents[1] / "host.json").read_text())
    sampling = host["logging"]["applicationInsights"]["samplingSettings"]
    assert not sampling["isEnabled"] or "Trace" in sampling["excludedTypes"].split(";")


class Signals(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: dict[str, list[dict]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        event, _, data = record.getMessage().partition(" ")
        self.records.setdefault(event, []).append(json.loads(data))


@pytest.fixture
def signals():
    handler, logger = Signals(), logging.getLogger("autopilot.signals")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


def test_the_app_writes_every_field_every_rule_reads(signals):
    world = open_world(settings={"AUTOPILOT_MAX_ATTEMPTS": "1"})
    try:
        world.define(definition("hv"), definition("lost", segment="LostSegment", target="In Lost Segment"))
        world.snapshot(list(sample_profiles(1000, seed=31)))  # 10 requests: some get a 429
        world.snapshot(list(sample_profiles(100, seed=32)), segment="LostSegment")
        world.sim.faults = Faults(burst_rate=0.3, burst_length=1)  # 429s, retried: the run succeeds
        assert world.run("hv")["status"] == "succeeded"
        world.sim.faults = Faults(fail_rate=1.0)  # every request 500: its one attempt used, the batch is dead
        assert world.run("lost")["status"] == "failed"
        world.sim.faults = Faults()
        world.host.fire_timer()
    finally:
        close_world(world)
    written = signals.records
    assert any(r["throttled"] for r in written["batch_sent"])
    assert any(r["status"] == "failed" for r in written["run_ended"])
    for name, query in rules().items():
        for event, fields in reads(query).items():
            assert event in written, f"rule {name} reads {event!r} records, which the app did not write"
            missing = fields - set(written[event][0])
            assert not missing, f"rule {name} reads {sorted(missing)} of {event!r}, which the app does not write"
    assert set(written["exports_enabled"][-1]["exports"]) == {"hv", "lost"}
    assert all("@" not in json.dumps(records) for records in written.values())  # counts and names, no address
