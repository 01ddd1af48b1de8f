"""The operator console's routes, through the local host over HTTP: who am I, the connections and their test, the
export definitions read and edited one item at a time (never over someone else's edit), the export storage's
segments and columns, and a run's dead batches."""

from __future__ import annotations

import json
import secrets
import socket

import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError

from shared import services
from shared.api_roles import ADMIN, OPERATOR, READER
from shared.pipeline import reports
from shared.source import export_config
from shared.state.run_records import BatchOutcome
from tests.support import close_world, definition, open_world, wait_until
from tests.test_api_auth import OBJECT_ID
from tests.test_api_auth import headers as entra_headers
from tools.generate_export import sample_profiles, write_export
from tools.ortto_sim import OrttoSim
from tools.sim_base import Faults

ALL_ROLES = [READER, OPERATOR, ADMIN]
BLOB = ("config", "exports.json")


@pytest.fixture(scope="module")
def world():
    instance = open_world(settings={"AUTOPILOT_MAX_ATTEMPTS": "2"})
    yield instance
    close_world(instance)


def url(world, path: str) -> str:
    return f"{world.host.base_url}{path}"


def get(world, path: str, **options):
    return world.api.get(url(world, path), timeout=60, **options)


def put(world, path: str, body, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return world.api.put(url(world, path), data=data, headers=headers or {}, timeout=60)


def store(world, document: dict | None) -> None:
    """Write the definitions blob as a person would (None: delete it)."""
    blob = world.blobs.get_blob_client(*BLOB)
    if document is None:
        try:
            blob.delete_blob()
        except ResourceNotFoundError:
            pass
    else:
        blob.upload_blob(json.dumps(document), overwrite=True)


def stored(world) -> tuple[dict, str]:
    download = world.blobs.get_blob_client(*BLOB).download_blob()
    return json.loads(download.readall()), download.properties.etag


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# === who am I ==================================================================================================
def test_a_function_key_holds_every_role(world):
    answer = get(world, "/api/me")
    assert answer.status_code == 200
    assert answer.json() == {"authentication": "key", "roles": ALL_ROLES, "principalId": None}
    assert world.api.get(url(world, "/api/me"), headers={"x-functions-key": "wrong"}, timeout=30).status_code == 401


# === connections ===============================================================================================
def _connections_document(world, *connections: dict) -> None:
    """Export "hv" on the default connection, and "eu" on connection "eu" when one is given."""
    eu = definition("eu", target="In EU Segment")
    eu["destination"]["connection"] = "eu"
    on_eu = [eu] if any(c["name"] == "eu" for c in connections) else []
    store(world, {"connections": list(connections), "exports": [definition("hv"), *on_eu]})


def _connection(name: str, secret: str, base_url: str, **extra) -> dict:
    return {"name": name, "secretName": secret, "baseUrl": base_url, **extra}


def test_the_connections_are_listed_as_in_force_with_whether_each_key_is_readable(world):
    world.stack.keyvault.set_secret("eu-key", secrets.token_hex(16))
    _connections_document(world, _connection("eu", "eu-key", world.sim.base_url, requestsPerSecond=2),
                          _connection("keyless", "never-stored-key", world.sim.base_url))
    answer = get(world, "/api/connections")
    assert answer.status_code == 200, answer.text[:300]
    body = answer.json()
    shown = {c["name"]: c for c in body["connections"]}
    assert list(shown) == ["default", "eu", "keyless"]
    assert shown["default"] == {
        "name": "default", "platform": "autopilot", "region": None, "plan": None,
        "requestsPerSecond": float(world.stack.rate), "baseUrl": world.sim.base_url, "secretName": "autopilot-api-key",
        "exports": ["hv"], "fromAppSettings": True, "keyReadable": True, "keyProblem": None}
    assert (shown["eu"]["requestsPerSecond"], shown["eu"]["exports"], shown["eu"]["fromAppSettings"]) == (2.0, ["eu"],
                                                                                                          False)
    assert shown["eu"]["keyReadable"] is True
    keyless = shown["keyless"]
    assert keyless["keyReadable"] is False and keyless["exports"] == []
    assert "'never-stored-key'" in keyless["keyProblem"] and "does not exist" in keyless["keyProblem"]
    assert "az keyvault secret set" in body["keyHelp"] and "--file" in body["keyHelp"]
    assert world.stack.api_key not in answer.text


def test_an_ortto_connection_shows_its_region_plan_and_rate(world):
    world.stack.keyvault.set_secret("ortto-key", secrets.token_hex(16))
    store(world, {"connections": [{"name": "ortto", "platform": "ortto", "region": "eu", "plan": "business",
                                   "secretName": "ortto-key"}], "exports": []})
    (_, ortto) = get(world, "/api/connections").json()["connections"]
    assert (ortto["platform"], ortto["region"], ortto["plan"]) == ("ortto", "eu", "business")
    assert (ortto["baseUrl"], ortto["requestsPerSecond"]) == ("https://api.eu.ap3api.com/v1", 30.0)


def _test(world, name: str) -> dict:
    answer = world.api.post(url(world, f"/api/connections/{name}/test"), timeout=60)
    assert answer.status_code == 200, answer.text[:300]
    return answer.json()


def test_a_connection_whose_key_the_destination_takes_is_accepted_after_one_read(world):
    _connections_document(world)
    world.sim.reset_log()
    result = _test(world, "default")
    assert {k: result[k] for k in ("connection", "outcome", "status", "call")} == {
        "connection": "default", "outcome": "accepted", "status": 200, "call": "GET /v1/lists"}
    assert isinstance(result["elapsedMs"], int) and 0 <= result["elapsedMs"] < 10_000
    assert [(r["method"], r["path"], r["status"]) for r in world.sim.request_log()] == [("GET", "/v1/lists", 200)]


def test_a_wrong_key_is_refused_with_the_destinations_words_and_never_shown(world):
    wrong = secrets.token_hex(16)
    world.stack.keyvault.set_secret("wrong-key", wrong)
    _connections_document(world, _connection("eu", "wrong-key", world.sim.base_url))
    world.sim.reset_log()
    answer = world.api.post(url(world, "/api/connections/eu/test"), timeout=60)
    result = answer.json()
    assert (result["outcome"], result["status"]) == ("refused", 401)
    assert result["detail"] == "Provided autopilotapikey not valid."
    assert wrong not in answer.text and world.stack.api_key not in answer.text
    assert [r["status"] for r in world.sim.request_log()] == [401]  # the same key re-read: not sent again


def test_a_key_that_cannot_be_read_makes_no_call(world):
    _connections_document(world, _connection("eu", "never-stored-key", world.sim.base_url))
    world.sim.reset_log()
    result = _test(world, "eu")
    assert (result["outcome"], result["status"], result["elapsedMs"]) == ("no-key", None, 0)
    assert "'never-stored-key'" in result["detail"]
    assert world.sim.request_log() == []


def test_a_throttled_destination_says_so(world):
    world.stack.keyvault.set_secret("busy-key", world.stack.api_key)
    _connections_document(world, _connection("eu", "busy-key", world.sim.base_url))
    world.sim.faults = Faults(burst_rate=1.0, burst_length=1)
    try:
        result = _test(world, "eu")
    finally:
        world.sim.faults = Faults()
    assert (result["outcome"], result["status"]) == ("throttled", 429)


def test_a_destination_that_does_not_answer_is_unreachable(world):
    world.stack.keyvault.set_secret("eu-key", secrets.token_hex(16))
    _connections_document(world, _connection("eu", "eu-key", f"http://127.0.0.1:{closed_port()}/v1"))
    result = _test(world, "eu")
    assert (result["outcome"], result["status"]) == ("unreachable", None)
    assert "connection failed" in result["detail"]


def test_a_failing_destination_is_unreachable(world):
    _connections_document(world)
    world.sim.faults = Faults(fail_rate=1.0)
    try:
        result = _test(world, "default")
    finally:
        world.sim.faults = Faults()
    assert (result["outcome"], result["status"]) == ("unreachable", 500)


def test_an_unknown_connection_is_404(world):
    _connections_document(world)
    for name in ("nope", "Default", "a" * 80):
        answer = world.api.post(url(world, f"/api/connections/{name}/test"), timeout=30)
        assert answer.status_code == 404 and "no connection named" in answer.json()["error"], name


def test_an_ortto_key_is_tested_with_a_read_of_the_custom_fields_and_a_ban_is_throttling(world):
    key = secrets.token_hex(16)
    world.stack.keyvault.set_secret("ortto-test-key", key)
    with OrttoSim(key, rate=None) as sim:
        store(world, {"connections": [{"name": "ortto", "platform": "ortto", "secretName": "ortto-test-key",
                                       "baseUrl": sim.base_url}], "exports": []})
        accepted = _test(world, "ortto")
        assert (accepted["outcome"], accepted["status"]) == ("accepted", 200)
        assert accepted["call"] == "POST /v1/person/custom-field/get"
        sim.set_api_key(secrets.token_hex(16))
        refused = _test(world, "ortto")
        assert (refused["outcome"], refused["status"]) == ("refused", 401)
        assert "not valid" in refused["detail"] and key not in json.dumps(refused)
        sim.set_api_key(key)
        for _ in range(OrttoSim.BAN_AFTER):  # malformed merges until Ortto bans the address
            requests.post(f"{sim.base_url}/person/merge", json={}, headers={"X-Api-Key": key}, timeout=10)
        banned = _test(world, "ortto")
        assert (banned["outcome"], banned["status"]) == ("throttled", 403)
        assert "banned" in banned["detail"]


# === the definitions ===========================================================================================
# What the console's export form offers: the definitions check's own names, so it keeps no copy of them.
VOCABULARY = {"standardFields": list(export_config.STANDARD_FIELDS), "customTypes": list(export_config.CUSTOM_TYPES)}


def test_before_the_blob_exists_the_document_is_empty_and_a_save_creates_it_with_if_none_match(world):
    store(world, None)
    answer = get(world, "/api/definitions")
    assert answer.json() == {"etag": None, "editable": True, "source": "blob config/exports.json (EXPORTS_BLOB)",
                             "document": {"connections": [], "exports": []}, "vocabulary": VOCABULARY}
    without = put(world, "/api/definitions/exports/hv", definition("hv"))
    assert without.status_code == 428 and "If-None-Match: *" in without.json()["error"]
    created = put(world, "/api/definitions/exports/hv", definition("hv"), {"If-None-Match": "*"})
    assert created.status_code == 200, created.text[:300]
    document, etag = stored(world)
    assert created.json() == {"etag": etag, "document": document}
    assert document == {"connections": [], "exports": [definition("hv")]}
    text = world.blobs.get_blob_client(*BLOB).download_blob().readall().decode()
    assert text.startswith('{\n  "connections": []')  # indented, for people who edit it by hand
    again = put(world, "/api/definitions/exports/hv", definition("hv"), {"If-None-Match": "*"})
    assert again.status_code == 409 and again.json()["etag"] == etag  # created meanwhile: by us


def test_an_export_is_added_then_edited_on_the_version_loaded(world):
    store(world, {"exports": [definition("hv")]})
    loaded = get(world, "/api/definitions").json()
    assert loaded["etag"] == stored(world)[1] and loaded["document"] == {"exports": [definition("hv")]}
    news = definition("news", membership="list", target="Newsletter")
    added = put(world, "/api/definitions/exports/news", news, {"If-Match": loaded["etag"]})
    assert added.status_code == 200, added.text[:300]
    assert [e["name"] for e in added.json()["document"]["exports"]] == ["hv", "news"]
    edited = put(world, "/api/definitions/exports/news", {**news, "maxProfiles": 500},
                 {"If-Match": added.json()["etag"]})
    assert edited.status_code == 200, edited.text[:300]
    document, etag = stored(world)
    assert edited.json()["etag"] == etag and document["exports"] == [definition("hv"), {**news, "maxProfiles": 500}]
    assert {e["name"]: e["maxProfiles"] for e in get(world, "/api/exports").json()["exports"]} == {
        "hv": 100_000, "news": 500}  # the app reads what was saved


def test_a_connection_is_saved_the_same_way(world):
    store(world, {"exports": [definition("hv")]})
    etag = get(world, "/api/definitions").json()["etag"]
    connection = {"name": "eu", "secretName": "eu-key", "requestsPerSecond": 3}
    saved = put(world, "/api/definitions/connections/eu", connection, {"If-Match": etag})
    assert saved.status_code == 200, saved.text[:300]
    assert stored(world)[0] == {"exports": [definition("hv")], "connections": [connection]}
    assert [c["name"] for c in get(world, "/api/connections").json()["connections"]] == ["default", "eu"]


def test_a_connection_pointed_at_a_host_the_deployer_did_not_allow_is_not_saved(world):
    """An Admin may not send a connection's key to a host of their choosing: the platforms' APIs, or the hosts app
    setting ALLOWED_API_HOSTS lists (the local stack's: the simulators on loopback)."""
    store(world, {"exports": [definition("hv")]})
    before = stored(world)
    elsewhere = {"name": "eu", "secretName": "eu-key", "baseUrl": "https://collector.example.com/v1"}
    refused = put(world, "/api/definitions/connections/eu", elsewhere, {"If-Match": before[1]})
    assert refused.status_code == 422, refused.text[:300]
    (problem,) = refused.json()["problems"]
    assert (problem["at"], problem["field"]) == ("connections[0]", "baseUrl")
    assert "collector.example.com" in problem["message"] and "ALLOWED_API_HOSTS" in problem["message"]
    assert stored(world) == before
    local = dict(elsewhere, baseUrl=world.sim.base_url)  # http://127.0.0.1:<port>/v1
    assert put(world, "/api/definitions/connections/eu", local, {"If-Match": before[1]}).status_code == 200


@pytest.mark.parametrize("if_match", [None, "*"])
def test_a_save_without_the_version_it_was_made_on_is_428(world, if_match):
    store(world, {"exports": [definition("hv")]})
    before = stored(world)
    refused = put(world, "/api/definitions/exports/news", definition("news", target="x"),
                  {"If-Match": if_match} if if_match else {})
    assert refused.status_code == 428 and "If-Match" in refused.json()["error"]
    assert stored(world) == before


def test_a_save_on_a_stale_version_is_409_and_keeps_the_other_edit(world):
    store(world, {"exports": [definition("hv")]})
    loaded = get(world, "/api/definitions").json()["etag"]
    theirs = definition("theirs", target="Theirs")
    store(world, {"exports": [definition("hv"), theirs]})  # someone else saved meanwhile
    ours = definition("ours", target="Ours")
    conflict = put(world, "/api/definitions/exports/ours", ours, {"If-Match": loaded})
    assert conflict.status_code == 409
    document, current = stored(world)
    assert conflict.json()["etag"] == current != loaded
    assert "changed by someone else" in conflict.json()["error"]
    assert document["exports"] == [definition("hv"), theirs]  # nothing of ours written over theirs
    retried = put(world, "/api/definitions/exports/ours", ours, {"If-Match": current})
    assert retried.status_code == 200
    assert [e["name"] for e in stored(world)[0]["exports"]] == ["hv", "theirs", "ours"]


def test_a_save_that_would_break_the_document_is_422_with_each_problem_located(world):
    store(world, {"exports": [definition("hv")]})
    before = stored(world)
    news = definition("news", membership="list", target="x")
    del news["destination"]["list"]
    news["fields"]["Emial"] = "PrimaryEmail"
    answer = put(world, "/api/definitions/exports/news", news, {"If-Match": before[1]})
    assert answer.status_code == 422, answer.text[:300]
    body = answer.json()
    assert "2 problems" in body["error"] and "nothing was saved" in body["error"]
    where = 'exports[1] "news"'
    assert {"at": where, "field": "destination.list", "message": "is required"} in body["problems"]
    assert any(p["at"] == where and p["field"] == "fields.Emial" and 'did you mean "Email"' in p["message"]
               for p in body["problems"])
    assert stored(world) == before


def test_each_problem_is_located_and_reads_as_its_message_did():
    from shared.source.export_config import ExportConfigError, Located, parse_exports

    news = definition("news", membership="list", target="x")
    del news["destination"]["list"]
    with pytest.raises(ExportConfigError) as refused:
        parse_exports({"connections": [{"name": "eu", "secretName": "bad name!"}], "exports": [news], "x": 1})
    located = refused.value.located
    assert Located("connections[0]", "secretName", "must be a Key Vault secret name (1-127 letters, digits and "
                   'hyphens), got "bad name!"') in located
    assert Located('exports[0] "news"', "destination.list", "is required") in located
    assert Located("", "x", "is not a known key; known keys: $schema, connections, exports") in located
    assert refused.value.problems == [f"{p.at}: {p.field} {p.message}" if p.at else f"{p.field} {p.message}"
                                      for p in located]


@pytest.mark.parametrize("name, body, status, fragment", [
    ("news", {"name": "other"}, 400, 'must be \'news\''),
    ("news", b"{not json", 400, "not valid JSON"),
    ("news", [1], 400, "JSON object"),
    ("News", {"name": "News"}, 400, "lower-case"),
])
def test_a_malformed_save_is_400_naming_what_is_wrong(world, name, body, status, fragment):
    store(world, {"exports": [definition("hv")]})
    before = stored(world)
    answer = put(world, f"/api/definitions/exports/{name}", body, {"If-Match": before[1]})
    assert answer.status_code == status and fragment in answer.json()["error"], answer.text[:300]
    assert stored(world) == before


def test_a_save_must_say_its_body_is_json(world):
    store(world, {"exports": [definition("hv")]})
    before = stored(world)
    answer = put(world, "/api/definitions/exports/hv", definition("hv"),
                 {"If-Match": before[1], "Content-Type": "text/plain"})
    assert answer.status_code == 415 and "a PUT to this API must carry" in answer.json()["error"]
    assert stored(world) == before


def test_definitions_in_the_app_setting_are_shown_and_not_editable(world, monkeypatch):
    document = {"exports": [definition("hv")]}
    monkeypatch.setitem(services.current().settings.env, "EXPORTS", json.dumps(document))
    shown = get(world, "/api/definitions").json()
    assert shown == {"etag": None, "editable": False, "source": "app setting EXPORTS", "document": document,
                     "vocabulary": VOCABULARY}
    refused = put(world, "/api/definitions/exports/hv", definition("hv"), {"If-Match": '"0x1"'})
    assert refused.status_code == 409 and "app setting EXPORTS" in refused.json()["error"]


# === the export storage's segments and columns =================================================================
SOURCE = "browse"
COLUMNS = ("Id", "E_Mail_Address", "GivenName", "Surname", "Points")


@pytest.fixture(scope="module")
def source(world):
    """Two exports in one container: HighValueSegment in both (newest in the second), OnlyFirst in the first."""
    container = world.blobs.get_container_client(SOURCE)
    container.create_container()
    rows = [[str(i), f"p{i}@example.com", "Ann", "Lee", str(i)] for i in range(3)]
    first = write_export(container, rows, columns=COLUMNS, segment="OnlyFirst", export_name="First",
                         time="2026-03-01T04:00:00Z")
    write_export(container, rows, columns=COLUMNS, segment="HighValueSegment", export_name="First",
                 time="2026-03-01T05:00:00Z")
    second = write_export(container, rows, columns=COLUMNS, data_types={"Points": "int64"},
                          segment="HighValueSegment", export_name="Second", time="2026-03-02T04:00:00Z")
    model = container.get_blob_client(second.model)
    data = json.loads(model.download_blob().readall())
    del data["entities"][0]["attributes"][0]["dataType"]  # a model.json may leave it out
    model.upload_blob(json.dumps(data), overwrite=True)
    return first.model, second.model


def test_the_segments_are_listed_each_with_its_newest_model(world, source):
    first, second = source
    answer = get(world, f"/api/sources/segments?connection=EXPORT_STORAGE&container={SOURCE}")
    assert answer.status_code == 200, answer.text[:300]
    assert [(s["name"], s["model"]) for s in answer.json()["segments"]] == [
        ("HighValueSegment", second), ("OnlyFirst", first)]
    assert answer.json()["segments"][0]["modified"] == "2026-03-02T04:00:00Z"
    under = get(world, f"/api/sources/segments?container={SOURCE}&prefix=nothing-here/").json()
    assert under == {"segments": []}


def test_a_segments_columns_come_with_their_types_and_suggested_fields(world, source):
    answer = get(world, f"/api/sources/columns?connection=EXPORT_STORAGE&container={SOURCE}&segment=HighValueSegment")
    assert answer.status_code == 200, answer.text[:300]
    body = answer.json()
    assert (body["segment"], body["model"]) == ("HighValueSegment", source[1]) and len(body["snapshot"]) == 32
    assert body["columns"] == [{"name": "Id", "dataType": None}, {"name": "E_Mail_Address", "dataType": "string"},
                               {"name": "GivenName", "dataType": "string"}, {"name": "Surname", "dataType": "string"},
                               {"name": "Points", "dataType": "int64"}]
    assert body["suggested"] == {"Email": "E_Mail_Address", "FirstName": "GivenName", "LastName": "Surname"}
    other = get(world, f"/api/sources/columns?container={SOURCE}&segment=OnlyFirst").json()
    assert other["model"] == source[0] and other["columns"][0] == {"name": "Id", "dataType": "string"}


def test_the_suggestions_prefer_the_usual_names_and_leave_out_what_is_not_there():
    from shared.source_browse import suggested

    assert suggested(("PrimaryEmail", "Email", "first_name", "Name")) == {
        "Email": "Email", "FirstName": "first_name", "LastName": None}
    assert suggested(("Id",)) == {"Email": None, "FirstName": None, "LastName": None}


@pytest.mark.parametrize("query, status, fragment", [
    ("container=browse&connection=NO_SUCH_SETTING", 400, "no app setting 'NO_SUCH_SETTING'"),
    ("container=browse&connection=DefaultEndpointsProtocol%3Dhttps", 400, "query parameter connection"),
    ("container=browse&connection=KEY_VAULT_URL", 400, "does not hold a storage connection"),
    ("container=Bad_Name", 400, "query parameter container"),
    ("", 400, "query parameter container"),
    ("container=nosuchcontainer", 404, "does not exist"),
])
def test_a_bad_source_is_refused_naming_it(world, source, query, status, fragment):
    answer = get(world, f"/api/sources/segments?{query}")
    assert answer.status_code == status and fragment in answer.json()["error"], answer.text[:300]


@pytest.mark.parametrize("query, status, fragment", [
    (f"container={SOURCE}&segment=Nope", 404, "segment 'Nope' is not in any model.json"),
    (f"container={SOURCE}", 400, "query parameter segment"),
    ("container=nosuchcontainer&segment=HighValueSegment", 404, "does not exist"),
])
def test_columns_of_what_is_not_there_are_404(world, source, query, status, fragment):
    answer = get(world, f"/api/sources/columns?{query}")
    assert answer.status_code == status and fragment in answer.json()["error"], answer.text[:300]


# === a run's dead batches ======================================================================================
def test_a_runs_dead_batches_are_listed_and_shown_while_replayed(world):
    store(world, {"exports": [definition("hv")]})
    world.snapshot(list(sample_profiles(40, seed=301)))
    world.sim.faults = Faults(fail_rate=1.0)
    try:
        report = world.run("hv")
        assert report["status"] == "failed" and report["batches"]["dead"] == 1, report
        (dead,) = report["deadBatchList"]
        assert (dead["batch"], dead["contacts"], dead["replaying"]) == (1, 40, False)
        assert dead["kind"] and "gave up after 2 attempts" in dead["reason"]
        run_id = report["runId"]
        assert world.api.post(url(world, f"/api/runs/{run_id}/replay"), timeout=30).json()["replayedBatches"] == 1
        wait_until(lambda: [d["replaying"] for d in world.view(run_id)["deadBatchList"]] == [True], timeout=30)
        again = world.wait(run_id)  # still failing: dead once more
    finally:
        world.sim.faults = Faults()
    assert [(d["batch"], d["replaying"]) for d in again["deadBatchList"]] == [(1, False)]


def test_a_run_without_dead_batches_lists_none(world):
    store(world, {"exports": [definition("hv")]})
    world.snapshot(list(sample_profiles(5, seed=302)))
    report = world.run("hv", dryRun=True)
    assert report["deadBatchList"] == [] and report["batches"]["dead"] == 0


def test_the_dead_batch_list_masks_emails_and_is_capped(world, monkeypatch):
    svc = services.current()
    run_id = "20200302T050000Z-00000dea"  # (an export of its own: no replay of "hv" ever sees it)
    svc.records.create(run_id, "ghost", status="running", planned_batches=3, trigger="http")
    for batch in (1, 2, 3):
        outcome = BatchOutcome(batch, "upsert", "dead", 100, 0, 0, 100, [],
                               error=f"gave up: Autopilot refused jane.doe{batch}@example.com")
        assert svc.records.record_batch(run_id, outcome)
        reports.after_batch(svc, run_id, outcome)
    monkeypatch.setattr(reports, "DEAD_LISTED", 2)
    view = world.view(run_id)
    assert view["batches"]["dead"] == 3 and [d["batch"] for d in view["deadBatchList"]] == [1, 2]
    assert view["deadBatchList"][0]["reason"] == "gave up: Autopilot refused ja***@e***.com"
    assert "example.com" not in json.dumps(view["deadBatchList"])


# === when the timer next looks =================================================================================
@pytest.mark.parametrize("schedule, now, expected", [
    ("0 */15 * * * *", "2026-12-07T19:50:03+00:00", "2026-12-07T20:00:00+00:00"),
    ("", "2026-12-07T19:50:03+00:00", "2026-12-07T20:00:00+00:00"),  # infra's default
    ("30 5 2 * * 1-5", "2026-12-05T10:00:00+00:00", "2026-12-07T02:05:30+00:00"),  # Saturday: Monday's
    ("0 0 * * * *", "2026-12-07T21:30:00+02:00", "2026-12-07T20:00:00+00:00"),  # read in UTC
])
def test_the_next_tick_is_the_schedule_s_next_time_in_utc(schedule, now, expected):
    from datetime import datetime

    from shared.pipeline.runs import next_tick

    assert next_tick({"EXPORT_SCHEDULE": schedule}, datetime.fromisoformat(now)).isoformat() == expected


@pytest.mark.parametrize("schedule", ["*/15 * * * *", "every 15 minutes", "0 */15 * * * * *", "61 * * * * *"])
def test_a_schedule_the_host_would_refuse_has_no_next_tick(schedule):
    from datetime import UTC, datetime

    from shared.pipeline.runs import next_tick

    assert next_tick({"EXPORT_SCHEDULE": schedule}, datetime.now(UTC)) is None


def test_the_exports_list_says_when_an_enabled_export_next_starts_and_a_disabled_one_never(world):
    store(world, {"exports": [definition("on"), definition("off", enabled=False, target="Other")]})
    listed = {e["name"]: e for e in get(world, "/api/exports").json()["exports"]}
    minute = int(listed["on"]["nextStart"][14:16])
    assert listed["on"]["nextStart"].endswith(":00Z") and minute % 15 == 0  # the world's schedule: every 15 min
    assert listed["off"]["nextStart"] is None


# === writes from another site ==================================================================================
NO_SUCH_RUN = "/api/runs/20990101T000000Z-00000000/cancel"


@pytest.mark.parametrize("sent, status", [
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Sec-Fetch-Site": "same-site"}, 403),  # a sibling subdomain is another origin
    ({"Sec-Fetch-Site": "same-origin", "Origin": "https://evil.example"}, 404),  # the browser's own word wins
    ({"Origin": "https://evil.example"}, 403),  # an older browser: Origin only
    ({"Origin": "null"}, 403),  # a sandboxed frame or a file
    ({"Sec-Fetch-Site": "none"}, 404),  # typed or bookmarked by the user: not another site's page
    ({}, 404),  # a script: neither header
])
def test_a_browser_s_write_from_another_site_is_refused_even_as_json(world, sent, status):
    answer = requests.post(url(world, NO_SUCH_RUN), data="{}", timeout=30,
                           headers={"x-functions-key": world.host.function_key, "Content-Type": "application/json",
                                    **sent})
    assert answer.status_code == status, answer.text
    if status == 403:
        assert "another site" in answer.json()["error"]


def test_a_write_whose_origin_is_the_app_itself_goes_through(world):
    origin = world.host.base_url  # http://127.0.0.1:<port>: what a browser on the console sends
    answer = requests.post(url(world, NO_SUCH_RUN), data="{}", timeout=30, headers={
        "x-functions-key": world.host.function_key, "Content-Type": "application/json", "Origin": origin})
    assert answer.status_code == 404


# === roles, with Entra ID ======================================================================================
@pytest.fixture(scope="module")
def entra_world():
    # (last in the file: the app settings are the process's, so the module's other world reads these from now on)
    instance = open_world(settings={"API_AUTHENTICATION": "entra"})
    instance.define(definition("hv"))
    instance.snapshot(list(sample_profiles(3, seed=303)))
    yield instance
    close_world(instance)


def _as(world, method: str, path: str, roles: tuple, extra: dict | None = None, **options):
    return world.api.request(method, url(world, path), headers={**entra_headers(*roles), **(extra or {})},
                             timeout=60, **options)


@pytest.mark.parametrize("roles, effective", [
    ((READER,), [READER]), ((OPERATOR,), [READER, OPERATOR]), ((ADMIN,), ALL_ROLES), ((), []),
], ids=["reader", "operator", "admin", "no role"])
def test_whoami_with_entra_names_the_effective_roles_and_the_object_id(entra_world, roles, effective):
    answer = _as(entra_world, "GET", "/api/me", roles)
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json() == {"authentication": "entra", "roles": effective, "principalId": OBJECT_ID}


def test_whoami_without_a_principal_is_401(entra_world):
    assert entra_world.api.get(url(entra_world, "/api/me"), timeout=30).status_code == 401


@pytest.mark.parametrize("roles", [(READER,), (OPERATOR,)], ids=["reader", "operator"])
def test_only_an_admin_may_save_a_definition(entra_world, roles):
    entra_world.define(definition("hv"))
    etag = _as(entra_world, "GET", "/api/definitions", roles).json()["etag"]
    for path, item in (("exports/news", definition("news", target="x")), ("connections/eu", {"name": "eu"})):
        refused = _as(entra_world, "PUT", f"/api/definitions/{path}", roles, {"If-Match": etag},
                      data=json.dumps(item))
        assert refused.status_code == 403, refused.text[:300]
        assert "needs the app role Exports.Admin" in refused.json()["error"]
    assert stored(entra_world)[1] == etag
    admin = _as(entra_world, "PUT", "/api/definitions/exports/news", (ADMIN,), {"If-Match": etag},
                data=json.dumps(definition("news", target="x")))
    assert admin.status_code == 200, admin.text[:300]


def test_a_reader_reads_connections_definitions_and_sources_but_may_not_test_a_connection(entra_world):
    for path in ("/api/connections", "/api/definitions", "/api/sources/segments?container=ciexports",
                 "/api/sources/columns?container=ciexports&segment=HighValueSegment"):
        answer = _as(entra_world, "GET", path, (READER,))
        assert answer.status_code == 200, (path, answer.text[:300])
    refused = _as(entra_world, "POST", "/api/connections/default/test", (READER,))
    assert refused.status_code == 403 and "needs the app role Exports.Operator" in refused.json()["error"]
    assert _as(entra_world, "POST", "/api/connections/default/test", (OPERATOR,)).json()["outcome"] == "accepted"

