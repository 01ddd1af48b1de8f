"""Runs that start when Customer Insights writes a model.json: the Event Grid trigger, fed through the local host's
Event Grid webhook as Event Grid feeds the real one. One snapshot is synced once, whichever of an event, a repeated
event and a timer tick comes first."""

from __future__ import annotations

import threading

import requests

from tests.support import CONTAINER, definition, expected_contacts, wait_until
from tools import event_grid
from tools.generate_export import sample_profiles

FUNCTION = "snapshot_written"


def _models(world) -> list[dict]:
    container = world.blobs.get_container_client(CONTAINER)
    return [event_grid.blob_created(container.get_blob_client(b.name).url, b.size)
            for b in container.list_blobs() if b.name.endswith("model.json")]


def _announce(world, events=None) -> int:
    return event_grid.deliver(world.host.base_url, world.host.function_key, FUNCTION, events or _models(world))


def _runs(world, name: str = "seg") -> list[dict]:
    answer = world.api.get(f"{world.host.base_url}/api/exports/{name}/runs", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["runs"]


def _settled(world, name: str = "seg") -> list[dict]:
    wait_until(lambda: all(r["status"] not in ("queued", "planning", "running") for r in _runs(world, name)), 60)
    return _runs(world, name)


def test_a_model_json_written_starts_a_run_and_a_repeated_event_or_a_tick_starts_none(world):
    rows = list(sample_profiles(30, seed=5))
    world.define(definition("seg"))
    world.snapshot(rows)
    assert _announce(world) == 1
    wait_until(lambda: _runs(world), 30)
    [run] = _settled(world)
    assert run["trigger"] == "event" and run["status"] == "succeeded", run
    assert world.field_members() == set(expected_contacts(rows))
    sent = len(world.contact_requests())

    _announce(world)  # Event Grid delivers at least once: the same event again
    world.host.fire_timer()  # and the backstop's tick
    assert len(_settled(world)) == 1 and len(world.contact_requests()) == sent

    changed = rows[5:]  # the next refresh: its event starts the next run, which sends only the leavers
    world.snapshot(changed)
    _announce(world)
    wait_until(lambda: len(_runs(world)) == 2, 30)
    newest = _settled(world)[0]
    assert newest["trigger"] == "event" and newest["counts"]["leavers"] == 5, newest
    assert world.field_members() == set(expected_contacts(changed))


def test_an_event_and_a_tick_at_once_start_one_run(world):
    world.define(definition("seg"))
    world.snapshot(list(sample_profiles(20, seed=6)))
    tick = threading.Thread(target=world.host.fire_timer)
    tick.start()
    _announce(world)
    tick.join(30)
    wait_until(lambda: _runs(world), 30)
    runs = _settled(world)
    assert len(runs) == 1 and runs[0]["status"] == "succeeded", runs


def test_other_blobs_other_containers_and_disabled_exports_start_nothing(world):
    world.define(definition("seg"), {**definition("off", target="Other"), "enabled": False})
    world.snapshot(list(sample_profiles(10, seed=7)))
    [model] = _models(world)
    csv = {**model, "subject": model["subject"].replace("model.json", "HighValueSegment_1.csv")}
    elsewhere = {**model, "subject": model["subject"].replace(f"/containers/{CONTAINER}/", "/containers/other/")}
    assert _announce(world, [csv]) == 0  # the subscription's filter passes model.json only
    answer = requests.post(f"{world.host.base_url}/runtime/webhooks/eventgrid", json=[csv, elsewhere], timeout=30,
                           params={"functionName": FUNCTION, "code": world.host.function_key})
    assert answer.status_code == 202  # past the filter: a CSV is no snapshot, and no export reads another container
    _announce(world, [model])
    wait_until(lambda: _runs(world), 30)
    assert len(_settled(world)) == 1 and _runs(world, "off") == []


def test_the_event_grid_webhook_wants_the_key_and_answers_event_grids_handshake(world):
    url = f"{world.host.base_url}/runtime/webhooks/eventgrid"
    name = {"functionName": FUNCTION}
    assert requests.post(url, params=name, json=[], timeout=30).status_code == 401
    handshake = requests.post(url, params={**name, "code": world.host.function_key}, timeout=30,
                              headers={"aeg-event-type": "SubscriptionValidation"},
                              json=[{"eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
                                     "data": {"validationCode": "abc-123"}}])
    assert handshake.status_code == 200 and handshake.json() == {"validationResponse": "abc-123"}
    unknown = requests.post(url, params={"functionName": "send_batch",
                                         "code": world.host.function_key}, json=[], timeout=30)
    assert unknown.status_code == 404
