"""Several Autopilot accounts: the definitions' `connections`, each export sending to the one it names with that
account's own key, URL and rate budget, against two simulators."""

from __future__ import annotations

import secrets
import time

import pytest

from shared.source.export_config import ExportConfigError, allowed_api_hosts, parse_definitions, parse_exports
from tests.support import definition, expected_contacts
from tools.autopilot_sim import SimProcess
from tools.generate_export import sample_profiles

EU = {"name": "marketing-eu", "secretName": "autopilot-eu-key", "requestsPerSecond": 2}


def _document(*exports: dict, connections=(EU,)) -> dict:
    return {"connections": list(connections), "exports": list(exports)}


def _on(connection: str, export: dict) -> dict:
    export["destination"]["connection"] = connection
    return export


def test_an_export_names_its_connection_and_one_without_uses_the_app_settings_account():
    us, eu = parse_exports(_document(definition("us"), _on("marketing-eu", definition("eu"))))
    assert us.account.name == "default" and us.account.secret_name is None  # the app settings give the rest
    assert (eu.account.name, eu.account.secret_name, eu.account.rate) == ("marketing-eu", "autopilot-eu-key", 2.0)
    assert eu.public()["destination"]["connection"] == "marketing-eu"
    assert us.membership_key == eu.membership_key  # one field on two accounts: two audiences, both allowed


def test_a_document_without_connections_keeps_working():
    (only,) = parse_exports({"exports": [definition("hv")]})
    assert only.account.name == "default"


@pytest.mark.parametrize("connections, export, expected", [
    ([EU], _on("marketing-us", definition("x")),
     'exports[0] "x": destination.connection names no connection: "marketing-us" is not in "connections"'),
    ([EU, EU], definition("x"), 'connections[1]: name "marketing-eu" is already defined'),
    ([dict(EU, name="default")], definition("x"), 'connections[0]: name "default" is the connection the app'),
    ([dict(EU, secretName="eu key!")], definition("x"), "connections[0]: secretName must be a Key Vault secret"),
    ([dict(EU, requestsPerSecond=0)], definition("x"), "connections[0]: requestsPerSecond must be a number above 0"),
    ([dict(EU, baseUrl="api.example.com")], definition("x"), "connections[0]: baseUrl must be an https:// URL"),
    ([dict(EU, baseUrl="https://collector.example.com/v1")], definition("x"),
     "connections[0]: baseUrl names collector.example.com, which is not the platform's API"),
    ([dict(EU, baseUrl="http://api2.autopilothq.com/v1")], definition("x"),  # the key in clear text
     "connections[0]: baseUrl names api2.autopilothq.com, which is not the platform's API (api2.autopilothq.com, "
     "api.ap3api.com, api.eu.ap3api.com, api.au.ap3api.com, over https)"),
    ([dict(EU, baseUrl="https://api2.autopilothq.com@collector.example.com/v1")], definition("x"),
     "connections[0]: baseUrl must be an https:// URL"),
    ([dict(EU, apiKey="k")], definition("x"), 'connections[0]: apiKey is not a known key'),
    ([EU], [_on("marketing-eu", definition("a")), _on("marketing-eu", definition("b"))],
     'exports[1] "b": destination.field is also the field of exports[0] "a"'),
])
def test_bad_connections_and_references_are_refused_naming_where(connections, export, expected):
    exports = export if isinstance(export, list) else [export]
    with pytest.raises(ExportConfigError) as refused:
        parse_exports(_document(*exports, connections=connections))
    assert expected in str(refused.value)


def test_a_base_url_may_name_the_platforms_apis_or_a_host_the_deployer_allows():
    """A connection's key goes where its baseUrl points; the console's Admins edit the definitions, the deployer
    the app settings (ALLOWED_API_HOSTS)."""
    official = [dict(EU, name=f"c{i}", baseUrl=url) for i, url in enumerate(
        ("https://api2.autopilothq.com/v1", "https://API.EU.AP3API.COM/v1", "https://api.ap3api.com:443/v1"))]
    assert len(parse_definitions(_document(definition("x"), connections=official)).connections) == 4
    proxy = dict(EU, baseUrl="http://egress.internal:8080/autopilot/v1")
    with pytest.raises(ExportConfigError, match=r"baseUrl names egress\.internal"):
        parse_exports(_document(definition("x"), connections=[proxy]))
    hosts = allowed_api_hosts({"ALLOWED_API_HOSTS": " Egress.Internal , ,127.0.0.1"})
    assert hosts == {"egress.internal", "127.0.0.1"}
    (connection,) = parse_definitions(_document(definition("x"), connections=[proxy]), api_hosts=hosts).connections[1:]
    assert connection.base_url == proxy["baseUrl"]
    assert allowed_api_hosts({}) == frozenset()


@pytest.fixture
def second_account(world):
    """A second Autopilot account: its own simulator (own key, 2 requests/s) and its key in Key Vault."""
    key = secrets.token_hex(16)
    sim = SimProcess(key, rate=EU["requestsPerSecond"]).start()
    world.stack.keyvault.set_secret(EU["secretName"], key)
    yield sim, dict(EU, baseUrl=sim.base_url)
    sim.stop()


def _define(world, connection: dict, *exports: dict) -> None:
    import json

    world.blobs.get_blob_client("config", "exports.json").upload_blob(
        json.dumps(_document(*exports, connections=[connection])), overwrite=True)


def test_each_export_lands_in_its_own_account_with_its_own_key_and_budget(world, second_account):
    sim, connection = second_account
    us_rows, eu_rows = list(sample_profiles(1000, seed=21)), list(sample_profiles(600, seed=22))
    _define(world, connection, definition("us"),
            _on(connection["name"], definition("eu", segment="EuSegment")))
    world.snapshot(us_rows)
    world.snapshot(eu_rows, segment="EuSegment")

    eu_run = world.start("eu").json()["runId"]  # 6 requests at 2/s: about 2.5 s of its budget
    us = world.run("us")  # 10 requests at the default account's 50/s: never waits for the busy one
    eu = world.wait(eu_run)

    assert us["status"] == eu["status"] == "succeeded"
    assert us["timings"]["finished"] < eu["timings"]["finished"]
    assert set(world.sim.contacts()) == set(expected_contacts(us_rows))
    assert set(sim.contacts()) == set(expected_contacts(eu_rows))
    eu_sent = sorted(r["t"] for r in sim.request_log() if r["path"].endswith("/contacts"))
    # Its own 2/s, as the API counts it: never a third request within a second (a 429 would add a seventh).
    assert len(eu_sent) == 6 and all(c - a >= 1.0 for a, c in zip(eu_sent, eu_sent[2:], strict=False))
    assert eu["destination"]["connection"] == "marketing-eu" and "autopilot-eu-key" in eu["destination"]["name"]


def test_a_key_rotated_on_one_account_does_not_disturb_the_other(world, second_account):
    sim, connection = second_account
    _define(world, connection, definition("us"), _on(connection["name"], definition("eu", segment="EuSegment")))
    world.snapshot(list(sample_profiles(200, seed=23)))
    world.snapshot(list(sample_profiles(200, seed=24)), segment="EuSegment")
    assert world.run("us")["status"] == world.run("eu")["status"] == "succeeded"

    rotated = secrets.token_hex(16)  # the EU admin rotates: Autopilot first, then Key Vault
    sim.set_api_key(rotated)
    world.stack.keyvault.set_secret(connection["secretName"], rotated)
    world.sim.reset_log()
    world.snapshot(list(sample_profiles(210, seed=23)))
    world.snapshot(list(sample_profiles(210, seed=24)), segment="EuSegment")
    started = time.monotonic()
    assert world.run("us")["status"] == "succeeded"
    assert world.run("eu")["status"] == "succeeded"  # one 401, the key read again, then sent
    assert time.monotonic() - started < 60
    assert all(r["status"] != 401 for r in world.sim.request_log())  # the default account never saw a bad key
    assert any(r["status"] == 401 for r in sim.request_log())
    assert set(sim.contacts()) == set(expected_contacts(sample_profiles(210, seed=24)))
