"""The bad-input corpus, end to end: export files and definitions, queue messages and HTTP requests (issue 8).

Every case goes through the real parts (Azurite, the local host running function_app.py, the simulator) and
asserts its exact outcome: the status and message an operator sees (HTTP answer, GET /api/runs/{id}, the run's
report), or the dead-letter record a queue message ends in, with its reason. For every case: no function fails
(the host logs none), nothing reaches Autopilot unless the case is about valid contacts, and valid contacts
next to bad ones still arrive. The reader and definition validators are unit-tested in test_cdm_reader.py and
test_export_config.py; here a representative handful goes through a whole run.

Corpus (75 cases in 69 tests): 10 export-file cases (the first holds five kinds of bad row), 10 configuration
cases (export definitions, and the API key's secret missing from Key Vault), 28 queue-message cases, 27 HTTP
cases.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
import requests
from azure.core.exceptions import ResourceExistsError
from azure.data.tables import TableServiceClient
from azure.storage.queue import BinaryBase64EncodePolicy, QueueClient

from shared.runtime.settings import BATCH_QUEUE, PLAN_QUEUE, POISON_QUEUE
from shared.state.run_records import RunRecords
from tests.support import (
    COLUMN,
    CONTAINER,
    acknowledged_state,
    close_world,
    definition,
    expected_contacts,
    open_world,
    wait_until,
)
from tools.generate_export import sample_profiles, write_export

RUN_ID = "20260302T041500Z-{:08x}"


@pytest.fixture(scope="module")
def shared_world():
    world = open_world()
    yield world
    close_world(world)


class Case:
    """One bad-input case on the module's world: what reached Autopilot and which functions failed meanwhile."""

    def __init__(self, world, caplog):
        self.world, self.caplog = world, caplog
        self.mark = len(world.sim.request_log())
        self._clock = datetime(2026, 3, 2, 4, 15, tzinfo=UTC) + timedelta(minutes=uuid.uuid4().int % 100000)

    @property
    def requests(self) -> list[dict]:
        return self.world.sim.request_log()[self.mark:]

    def function_failures(self) -> list[str]:
        return [r.getMessage() for r in self.caplog.records
                if r.name == "local_host" and r.levelno >= logging.WARNING and "failed" in r.getMessage()]

    def no_function_failed(self) -> None:
        assert self.function_failures() == [], "a function failed on bad input"

    def export(self, name: str, rows=None, **extra) -> dict:
        """An export reading its own prefix of the export container, with `rows` written there as a snapshot."""
        export = definition(name, **extra)
        export["source"]["prefix"] = f"{name}/"
        if rows is not None:
            self.write(name, rows)
        return export

    def write(self, name: str, rows, **options):
        container = self.world.blobs.get_container_client(CONTAINER)
        try:
            container.create_container()
        except ResourceExistsError:
            pass
        self._clock += timedelta(minutes=15)
        return write_export(container, rows, prefix=f"{name}/", time=self._clock, **options)

    def run(self, name: str) -> dict:
        answer = self.world.start(name)
        assert answer.status_code in (200, 202), answer.text
        return self.world.wait(answer.json()["runId"], timeout=60)

    def report(self, run_id: str) -> dict:
        blob = self.world.blobs.get_blob_client("reports", f"{run_id}/report.json")
        return json.loads(blob.download_blob().readall())


@pytest.fixture
def case(shared_world, caplog):
    caplog.set_level(logging.INFO)
    return Case(shared_world, caplog)


def emails(rows) -> set[str]:
    return {r[COLUMN["PrimaryEmail"]].lower() for r in rows}


# === export files, through a whole run ================================================================
def test_rejected_rows_are_reported_and_only_valid_contacts_are_sent(case):
    rows = list(sample_profiles(20, seed=41, start=100_000))
    width = len(rows[0])
    bad = {
        "invalid email": [*rows[0][:1], "not-an-email", *rows[0][2:]],
        "no email": [*rows[0][:1], "", *rows[0][2:]],
        "bad integer": [*rows[1][:COLUMN["LoyaltyPoints"]], "lots", *rows[1][COLUMN["LoyaltyPoints"] + 1:]],
        "short row": list(rows[2][:width - 1]),
    }
    duplicate = list(rows[3])
    duplicate[COLUMN["FirstName"]] = "Second"
    duplicate[COLUMN["PrimaryEmail"]] = duplicate[COLUMN["PrimaryEmail"]].upper()
    valid = rows[3:]
    world = case.world
    world.define(case.export("rows", [*valid, *bad.values(), duplicate]))
    view = case.run("rows")

    assert view["status"] == "succeeded"
    counts = view["counts"]
    assert (counts["read"], counts["rejected"], counts["duplicates"], counts["profiles"]) == (22, 4, 1, 17)
    reasons = sorted(r["reason"] for r in view["rejectedSample"])
    assert any("expected 13 columns, got 12" in r for r in reasons)
    assert any("no email in column PrimaryEmail" in r for r in reasons)
    assert any("invalid email in column PrimaryEmail" in r for r in reasons)
    assert any("column LoyaltyPoints is not a whole number" in r for r in reasons)
    rejected = world.blobs.get_blob_client("reports", f"{view['runId']}/rejected.jsonl").download_blob().readall()
    assert len(rejected.splitlines()) == 4
    assert b"not-an-email" not in rejected  # the address is masked even when it is not one
    contacts = world.sim.contacts()
    held = {email: {k: v for k, v in contacts[email].items() if k not in ("contact_id", "unsubscribed")}
            for email in emails(valid)}
    assert held == expected_contacts(valid)  # the first row of a duplicated email wins
    assert not emails(rows[:3]) & set(contacts)  # rejected rows never reach Autopilot
    assert not [r for r in case.requests if r["status"] != 200]
    case.no_function_failed()


def _failed_run(case, name: str, export: dict, *fragments: str) -> dict:
    """Start the export; the run fails while planning, says why in GET /api/runs/{id} and in its report, and
    sends nothing."""
    case.world.define(export)
    view = case.run(name)
    assert view["status"] == "failed", view
    for fragment in fragments:
        assert fragment in (view["error"] or ""), view["error"]
    report = case.report(view["runId"])
    assert (report["status"], report["error"]) == ("failed", view["error"])
    assert case.requests == []
    case.no_function_failed()
    return view


def test_export_without_any_model_json_fails_the_run_and_says_where_it_looked(case):
    container = case.world.blobs.get_container_client(CONTAINER)
    try:
        container.create_container()
    except ResourceExistsError:
        pass
    container.upload_blob("nomodel/HighValueSegment/2026/03/02/0415/HighValueSegment_1.csv", b'"a","b"\r\n')
    _failed_run(case, "nomodel", case.export("nomodel"), "no model.json found", "prefix 'nomodel/'")


def test_segment_missing_from_model_json_fails_the_run_and_lists_what_is_there(case):
    export = case.export("noseg", list(sample_profiles(5)), segment="LapsedBuyers")
    _failed_run(case, "noseg", export, "segment 'LapsedBuyers' is not in any model.json", "'HighValueSegment'")


def test_damaged_csv_fails_the_run_before_anything_is_sent(case):
    written = case.write("broken", list(sample_profiles(30, seed=42)))
    data = case.world.blobs.get_blob_client(CONTAINER, written.partitions[0]).download_blob().readall()
    damaged = data.replace(b'","', b'"x","', 1)  # text after a closing quote on the first row
    case.world.blobs.get_blob_client(CONTAINER, written.partitions[0]).upload_blob(damaged, overwrite=True)
    _failed_run(case, "broken", case.export("broken"), "is not valid CSV", "re-run the export")


def test_model_json_that_is_not_json_fails_the_run(case):
    written = case.write("badmodel", list(sample_profiles(5)))
    case.world.blobs.get_blob_client(CONTAINER, written.model).upload_blob(b'{"entities": [', overwrite=True)
    _failed_run(case, "badmodel", case.export("badmodel"), written.model, "is not valid JSON")


def test_mapping_to_a_column_the_snapshot_lacks_fails_the_run_naming_both(case):
    export = case.export("nocol", list(sample_profiles(5)))
    export["fields"]["FirstName"] = "GivenName"
    _failed_run(case, "nocol", export, 'fields.FirstName is mapped to column "GivenName"', "CompanyName")


def test_more_valid_profiles_than_max_profiles_sends_nothing(case):
    export = case.export("toomany", list(sample_profiles(12)), maxProfiles=10)
    _failed_run(case, "toomany", export, "12 valid profiles, more than its maxProfiles of 10", "nothing was sent")


def test_a_first_sync_with_more_rows_than_max_profiles_but_fewer_valid_ones_is_sent_whole(case):
    """Its records outnumber maxProfiles, so it is not sent while it is planned (the count comes while the first
    page is planned, before anything is queued); planned whole, its 10 valid profiles fit, and go."""
    rows = [list(r) for r in sample_profiles(13)]
    for row in rows[:3]:
        row[COLUMN["PrimaryEmail"]] = "not-an-email"
    case.world.define(case.export("fits", [tuple(r) for r in rows], maxProfiles=10))
    view = case.run("fits")
    assert view["status"] == "succeeded", view
    assert (view["counts"]["valid"], view["counts"]["rejected"], view["counts"]["accepted"]) == (10, 3, 10)
    assert not view["plan"].get("streamed")
    case.no_function_failed()


def test_connection_setting_that_does_not_exist_fails_the_run_naming_it(case):
    export = case.export("noconn", list(sample_profiles(3)))
    export["source"]["connection"] = "CUSTOMER_STORAGE"
    _failed_run(case, "noconn", export, "CUSTOMER_STORAGE")


def test_export_container_that_does_not_exist_fails_the_run_naming_it(case):
    export = case.export("nocontainer", None)
    export["source"]["container"] = "no-such-container"
    _failed_run(case, "nocontainer", export, "no-such-container")


def test_timer_skips_an_export_it_cannot_read_and_still_starts_the_others(case):
    gone = case.export("gone", None, target="In Gone Segment")
    gone["source"]["container"] = "no-such-container"
    fine = case.export("fine", list(sample_profiles(8, seed=43, start=500_000)))
    case.world.define(gone, fine)
    case.world.host.fire_timer()
    listed = {e["name"]: e for e in case.world.api.get(f"{case.world.host.base_url}/api/exports",
                                                        timeout=30).json()["exports"]}
    assert listed["fine"]["lastRun"] is not None
    assert case.world.wait(listed["fine"]["lastRun"]["runId"])["status"] == "succeeded"


# === export definitions ================================================================================
def _without_email(doc):
    del doc["exports"][0]["fields"]["Email"]


def _unknown_membership(doc):
    doc["exports"][0]["destination"]["membership"] = "segment"


def _duplicate_names(doc):
    doc["exports"].append(json.loads(json.dumps(doc["exports"][0])))


def _negative_limit(doc):
    doc["exports"][0]["maxProfiles"] = -5


def _maps_unsubscribed(doc):
    doc["exports"][0]["fields"]["unsubscribed"] = "IsVip"


DEFINITIONS = {
    "missing email mapping": (_without_email, 'fields must map "Email" to the column holding the email address'),
    "unknown membership type": (_unknown_membership, 'destination.membership must be "list" or "field", got "segment"'),
    "duplicate export names": (_duplicate_names, 'name is already the name of exports[0]; export names must be unique'),
    "negative limit": (_negative_limit, "maxProfiles must be a positive whole number, got -5"),
    "maps the subscription": (_maps_unsubscribed, "cannot be mapped: this app never changes a contact's subscription"),
}


@pytest.mark.parametrize("mutate,message", DEFINITIONS.values(), ids=DEFINITIONS.keys())
def test_invalid_definitions_are_refused_with_the_fix_named(case, mutate, message):
    document = {"exports": [case.export("defs", list(sample_profiles(3)))]}
    mutate(document)
    blob = case.world.blobs.get_blob_client("config", "exports.json")
    blob.upload_blob(json.dumps(document), overwrite=True)
    answer = case.world.start("defs")
    assert answer.status_code == 422 and message in answer.json()["error"], answer.text
    assert "config/exports.json" in answer.json()["error"]  # where the document lives
    listed = case.world.api.get(f"{case.world.host.base_url}/api/exports", timeout=30)
    assert listed.status_code == 500 and message in listed.json()["error"]
    assert case.requests == []
    case.no_function_failed()


def test_definitions_document_that_is_not_json_is_refused_with_its_position(case):
    case.world.blobs.get_blob_client("config", "exports.json").upload_blob(b'{"exports": [}', overwrite=True)
    answer = case.world.start("defs")
    assert answer.status_code == 422, answer.text
    assert "is not valid JSON" in answer.json()["error"] and "line 1 column 14" in answer.json()["error"]
    case.no_function_failed()


def test_export_without_data_transfer_acknowledgement_never_sends(case):
    rows = list(sample_profiles(6, seed=44, start=200_000))
    export = case.export("noack", rows, dataTransferAcknowledged=False)
    case.world.define(export)
    answer = case.world.start("noack")
    assert answer.status_code == 422 and '"dataTransferAcknowledged": true' in answer.json()["error"]
    case.world.host.fire_timer()  # the timer must not send it either
    time.sleep(1.0)
    assert case.requests == []
    assert not emails(rows) & set(case.world.sim.contacts())
    case.no_function_failed()


def test_timer_with_an_invalid_definitions_document_logs_it_and_does_not_fail(case):
    document = {"exports": [case.export("defs", list(sample_profiles(3)))]}
    _without_email(document)
    case.world.blobs.get_blob_client("config", "exports.json").upload_blob(json.dumps(document), overwrite=True)
    case.world.host.fire_timer()
    logged = [r.getMessage() for r in case.caplog.records if r.levelno >= logging.ERROR]
    assert any('must map "Email"' in line for line in logged)


# === queue messages, through the real queue ===========================================================
def _message(marker: str, **changes) -> dict:
    item = {"k": f"{marker}@example.net", "f": "0" * 20, "m": True, "d": {"Email": f"{marker}@example.net"}}
    message = {"run": RUN_ID.format(0xDEAD), "export": marker, "batch": 1, "kind": "upsert", "items": [item]}
    message.update(changes)
    return {k: v for k, v in message.items() if v is not ...}


def _items(marker: str, n: int, **document) -> list[dict]:
    return [{"k": f"{marker}-{i}@example.net", "f": "0" * 20, "m": True,
             "d": {"Email": f"{marker}-{i}@example.net", **document}} for i in range(n)]


UNREADABLE = {
    "not JSON": (lambda m: f"{{not json {m}".encode(), "message is not JSON"),
    "not UTF-8": (lambda m: b"\xff\xfe\xfd " + m.encode(), "message is not JSON"),
    "JSON but a list": (lambda m: json.dumps([m]).encode(), "message is not a JSON object"),
    "JSON but a string": (lambda m: json.dumps(m).encode(), "message is not a JSON object"),
    "unknown field": (lambda m: json.dumps(_message(m, unsubscribe=True)).encode(),
                      "wrong message schema: unknown field 'unsubscribe'"),
    "missing fields": (lambda m: json.dumps({"run": m}).encode(), "wrong message schema: missing field 'export'"),
    "unknown kind": (lambda m: json.dumps(_message(m, kind="unsubscribe")).encode(),
                     "kind must be one of upsert, join, leave, not 'unsubscribe'"),
    "no items": (lambda m: json.dumps(_message(m, items=[])).encode(), "items must be a non-empty list"),
    "items not a list": (lambda m: json.dumps(_message(m, items={"k": m})).encode(), "items must be a non-empty list"),
    "item without Email": (lambda m: json.dumps(_message(m, items=[{"k": m, "d": {"FirstName": "x"}}])).encode(),
                           "item 0 needs a key 'k' and a document 'd' with an Email"),
    "batch of 101 contacts": (lambda m: json.dumps(_message(m, items=_items(m, 101))).encode(),
                              "batch holds 101 contacts; at most 100 are allowed"),
    "pointer to a missing blob": (lambda m: json.dumps(_message(m, items=None, blob=f"batches/{m}/000001-0.json"))
                                  .encode(), "message points at a missing blob: batches/{m}/000001-0.json"),
    "pointer outside its container": (lambda m: json.dumps(_message(m, items=None, blob="config/exports.json"))
                                      .encode(), "message points outside the 'batches' container"),
    "item key not text": (lambda m: json.dumps(_message(m, items=[{"k": 7, "d": {"Email": f"{m}@example.net"}}]))
                          .encode(), "item 0 needs a key 'k' and a document 'd' with an Email"),
}


def _send(world, body: bytes, queue: str = BATCH_QUEUE) -> None:
    client = QueueClient.from_connection_string(world.stack.storage, queue,
                                                message_encode_policy=BinaryBase64EncodePolicy())
    client.send_message(body)


def _dead_with(world, marker: str, timeout: float = 20.0) -> tuple[str, dict]:
    """The dead-letter blob that holds `marker`, once the poison trigger has written it."""
    found: list = []

    def look() -> bool:
        container = world.blobs.get_container_client("dead")
        for blob in container.list_blobs(name_starts_with="unreadable/"):
            data = container.download_blob(blob.name).readall().decode("utf-8", "replace")
            if marker in data:
                found.append((blob.name, json.loads(data)))
                return True
        return False

    wait_until(look, timeout=timeout)
    return found[0]


@pytest.mark.parametrize("make,reason", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_unreadable_queue_message_is_dead_lettered_with_its_reason(case, make, reason):
    marker = f"bad{uuid.uuid4().hex[:10]}"
    body = make(marker)
    _send(case.world, body)
    name, dead = _dead_with(case.world, marker)

    assert reason.replace("{m}", marker) in dead["reason"], dead["reason"]
    assert marker in dead["body"]  # kept for a human to read
    logged = [r.getMessage() for r in case.caplog.records if r.name.startswith("autopilot")]
    assert any("rejected queue message" in line and reason.replace("{m}", marker) in line for line in logged)
    assert any(name in line for line in logged)  # the log says where the dead message is kept
    assert case.requests == []
    case.no_function_failed()


def test_queue_message_for_an_unknown_run_is_dead_and_sends_nothing(case):
    run_id = RUN_ID.format(uuid.uuid4().int & 0xFFFFFFFF)
    marker = f"orphan{uuid.uuid4().hex[:8]}"
    _send(case.world, json.dumps(_message(marker, run=run_id, batch=3)).encode())
    blob = case.world.blobs.get_blob_client("dead", f"{run_id}/000003.json")
    wait_until(blob.exists, timeout=20)
    kept = json.loads(blob.download_blob().readall())
    assert (kept["run"], kept["batch"], kept["export"]) == (run_id, 3, marker)
    logged = [r.getMessage() for r in case.caplog.records if r.name.startswith("autopilot")]
    assert any(f"unknown run {run_id!r}" in line for line in logged)
    assert case.requests == []
    assert case.world.view(run_id).get("error", "").startswith("no run with id")
    case.no_function_failed()


def test_copy_of_an_already_settled_batch_is_ignored(case):
    rows = list(sample_profiles(15, seed=45, start=300_000))
    case.world.define(case.export("again", rows))
    view = case.run("again")
    assert view["status"] == "succeeded"
    mark = len(case.world.sim.request_log())
    acked = acknowledged_state(case.world.stack.storage, "again")
    items = [{"k": a.key, "f": a.fingerprint, "m": True, "d": {"Email": a.key, "FirstName": "Changed"}}
             for a in acked]
    _send(case.world, json.dumps(_message("again", run=view["runId"], items=items)).encode())
    queue = QueueClient.from_connection_string(case.world.stack.storage, BATCH_QUEUE)
    wait_until(lambda: queue.get_queue_properties().approximate_message_count == 0, timeout=20)
    time.sleep(0.5)
    assert case.world.sim.request_log()[mark:] == []
    assert case.world.view(view["runId"])["counts"] == view["counts"]
    assert all(c.get("FirstName") != "Changed" for c in case.world.sim.contacts().values())
    case.no_function_failed()


def test_message_that_is_not_base64_is_kept_in_a_poison_queue_untouched(case):
    """The queue trigger only takes base64 (host.json messageEncoding): the host cannot hand this message to any
    function, retries it, and parks it, unread, in `<queue>-poison`, then in `<queue>-poison-poison` (the poison
    trigger cannot read it either). Nothing of the product runs on it, and it is never lost."""
    marker = f"raw{uuid.uuid4().hex[:10]}"
    QueueClient.from_connection_string(case.world.stack.storage, BATCH_QUEUE).send_message(f"plain text {marker}!")
    parked = QueueClient.from_connection_string(case.world.stack.storage, f"{POISON_QUEUE}-poison")

    def find() -> bool:
        try:
            return any(marker in m.content for m in parked.peek_messages(max_messages=32))
        except Exception:  # the queue is created when the host first parks a message there
            return False

    wait_until(find, timeout=30)
    assert case.requests == []
    failures = case.function_failures()  # the host's binding fails, by design; no product code ran
    assert failures and all("not valid base64" in line for line in failures)


def test_garbage_on_the_poison_queue_is_kept_as_an_unreadable_dead_message(case):
    marker = f"junk{uuid.uuid4().hex[:10]}"
    _send(case.world, f"<<{marker}>>".encode(), queue=POISON_QUEUE)
    _, dead = _dead_with(case.world, marker)
    assert dead["reason"].startswith("message is not JSON") and marker in dead["body"]
    assert case.requests == []
    case.no_function_failed()


# === HTTP requests ====================================================================================
HTTP = {
    # name: (method, path, body, headers, status, fragment of the error)
    "no function key": ("POST", "/api/exports/hv/runs", b"{}", {"x-functions-key": None}, 401, "function key"),
    "wrong function key": ("GET", "/api/exports", b"", {"x-functions-key": "nope"}, 401, "function key"),
    "key in the wrong header": ("GET", "/api/runs/20260302T041500Z-00000000", b"",
                                {"x-functions-key": None, "authorization": "Bearer x"}, 401, "function key"),
    "malformed JSON": ("POST", "/api/exports/hv/runs", b'{"dryRun": tru', {}, 400, "request body is not valid JSON"),
    "JSON but not an object": ("POST", "/api/exports/hv/runs", b"[true]", {}, 400, "must be a JSON object"),
    "unknown option": ("POST", "/api/exports/hv/runs", b'{"dryRun": true, "deleteAll": true}', {}, 400,
                       "unknown option(s) deleteAll"),
    "option of the wrong type": ("POST", "/api/exports/hv/runs", b'{"force": "yes"}', {}, 400,
                                 "option(s) force must be true or false"),
    "huge body": ("POST", "/api/exports/hv/runs", b" " * (2 * 1024 * 1024), {}, 400,
                  "request body is 2097152 bytes; at most 16384 are accepted"),
    "body that is not UTF-8": ("POST", "/api/exports/hv/runs", b"\x80\x81{}", {}, 400, "not valid JSON"),
    "deeply nested JSON": ("POST", "/api/exports/hv/runs", b"[" * 5000 + b"]" * 5000, {}, 400, "not valid JSON"),
    "unknown export": ("POST", "/api/exports/nope/runs", b"", {}, 404, "no export named 'nope'"),
    "export name with capitals": ("POST", "/api/exports/HV/runs", b"", {}, 404, "no export named 'HV'"),
    "path traversal, encoded": ("POST", "/api/exports/..%2F..%2Fconfig/runs", b"", {}, 404, "no export named"),
    "path traversal, dots": ("POST", "/api/exports/../runs", b"", {}, 404, ""),
    "path traversal, double encoded": ("POST", "/api/exports/%252e%252e%252fconfig/runs", b"", {}, 404,
                                       "no export named"),
    "NUL in the name": ("POST", "/api/exports/hv%00/runs", b"", {}, 404, "no export named"),
    "very long name": ("POST", "/api/exports/" + "a" * 5000 + "/runs", b"", {}, 404, "no export named 'aaaa"),
    "run id that does not exist": ("GET", "/api/runs/20990101T000000Z-00000000", b"", {}, 404,
                                   "no run with id '20990101T000000Z-00000000'"),
    "run id with an OData filter": ("GET", "/api/runs/x'%20or%20PartitionKey%20ne%20'", b"", {}, 404,
                                    "no run with id"),
    "run id climbing out": ("GET", "/api/runs/..%2F..%2Fadmin%2Ffunctions", b"", {}, 404, "no run with id"),
    "run id with a wildcard": ("GET", "/api/runs/*", b"", {}, 404, "no run with id '*'"),
    "replay of a run that does not exist": ("POST", "/api/runs/20990101T000000Z-00000000/replay", b"", {}, 404,
                                            "no run with id"),
    "replay with a malformed run id": ("POST", "/api/runs/;drop/replay", b"", {}, 404, "no run with id"),
    "wrong method": ("DELETE", "/api/exports/hv/runs", b"", {}, 405, "DELETE is not allowed here"),
    "DELETE a run": ("DELETE", "/api/runs/20990101T000000Z-00000000", b"", {}, 405, "DELETE is not allowed here"),
    "unknown route": ("GET", "/api/secrets", b"", {}, 404, "no function serves this route"),
    "admin API without its key": ("POST", "/admin/functions/scheduled_sync", b"", {"x-functions-key": None}, 401,
                                  "the admin API needs POST and the key"),
    # The probe's four 500s and an Arabic-Indic digit: a query value is ASCII digits in range, given once.
    "limit ²": ("GET", "/api/exports/hv/runs?limit=%C2%B2", b"", {}, 400, "query parameter limit"),
    "limit ①": ("GET", "/api/exports/hv/runs?limit=%E2%91%A0", b"", {}, 400, "query parameter limit"),
    "limit of 10,000 nines": ("GET", "/api/exports/hv/runs?limit=" + "9" * 10_000, b"", {}, 400,
                              "query parameter limit"),
    "limit given twice": ("GET", "/api/exports/hv/runs?limit=5&limit=%C2%B2", b"", {}, 400,
                          "query parameter limit"),
    "limit ٣": ("GET", "/api/exports/hv/runs?limit=%D9%A3", b"", {}, 400, "query parameter limit"),
    "before in another script's digits": ("GET", "/api/exports/hv/runs?before=%D9%A3", b"", {}, 400,
                                          "query parameter before"),
    # A state-changing POST that a browser form could send cross-site is refused.
    "form-encoded POST": ("POST", "/api/exports/hv/runs", b"dryRun=true",
                          {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    "text/plain POST": ("POST", "/api/exports/hv/runs", b'{"dryRun": true}', {"Content-Type": "text/plain"}, 415,
                        "application/json"),
    "POST without a Content-Type": ("POST", "/api/runs/20990101T000000Z-00000000/cancel", b"",
                                    {"Content-Type": None}, 415, "application/json"),
    # Every method is answered in JSON, the key checked first.
    "PUT": ("PUT", "/api/exports/hv/runs", b"", {}, 405, "PUT is not allowed here"),
    "PATCH": ("PATCH", "/api/exports/hv/runs", b"", {}, 405, "PATCH is not allowed here"),
    "OPTIONS": ("OPTIONS", "/api/runs/20990101T000000Z-00000000", b"", {}, 405, "OPTIONS is not allowed here"),
    "TRACE": ("TRACE", "/api/exports", b"", {}, 405, "TRACE is not allowed here"),
    "DELETE without the key": ("DELETE", "/api/exports/hv/runs", b"", {"x-functions-key": None}, 401,
                               "function key"),
    "PATCH without the key": ("PATCH", "/api/exports", b"", {"x-functions-key": None}, 401, "function key"),
}


@pytest.mark.parametrize("method,path,body,headers,status,fragment", HTTP.values(), ids=HTTP.keys())
def test_hostile_http_request_gets_a_clear_json_answer(case, method, path, body, headers, status, fragment):
    world = case.world
    world.define(case.export("hv", list(sample_profiles(4, seed=46, start=400_000))))
    session_headers = dict(world.api.headers)
    for name, value in headers.items():
        if value is None:
            session_headers.pop(name, None)
        else:
            session_headers[name] = value
    answer = requests.request(method, world.host.base_url + path, data=body, headers=session_headers, timeout=30)
    assert answer.status_code == status, answer.text[:300]
    assert answer.headers["Content-Type"].startswith("application/json")
    error = answer.json()["error"]
    assert fragment in error
    assert len(error) < 400  # a long or hostile input is never echoed whole
    assert "Traceback" not in answer.text and world.stack.api_key not in answer.text
    assert case.requests == []
    case.no_function_failed()


def _runs(case) -> list[str]:
    """The run ids of export "hv" (defined here), newest first, through the API."""
    case.world.define(case.export("hv"))
    answer = case.world.api.get(f"{case.world.host.base_url}/api/exports/hv/runs?limit=100", timeout=30)
    return [run["runId"] for run in answer.json()["runs"]]


def _raw_request(world, head: str, body: bytes = b"", timeout: float = 30) -> tuple[int, dict, dict]:
    """Send a hand-framed request to the local host; its status, headers and JSON body."""
    connection = http.client.HTTPConnection("127.0.0.1", urlsplit(world.host.base_url).port, timeout=timeout)
    try:
        connection.connect()
        key = world.api.headers["x-functions-key"]
        connection.sock.sendall(head.replace("{key}", key).encode() + body)
        response = http.client.HTTPResponse(connection.sock, method=head.split(" ", 1)[0])
        response.begin()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.serial  # the answer is timed
@pytest.mark.parametrize("length,status,fragment", [("-1", 400, "Content-Length must be a whole number"),
                                                    ("abc", 400, "Content-Length must be a whole number"),
                                                    ("\u0663", 400, "Content-Length must be a whole number")])
def test_a_bad_content_length_is_answered_at_once(case, length, status, fragment):
    before = _runs(case)
    head = (f"POST /api/exports/hv/runs HTTP/1.1\r\nHost: x\r\nx-functions-key: {{key}}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n")
    started = time.monotonic()
    answer, headers, body = _raw_request(case.world, head, b'{"dryRun": true}', timeout=5)
    assert (answer, headers["Content-Type"]) == (status, "application/json") and fragment in body["error"]
    assert time.monotonic() - started < 2 and _runs(case) == before


def test_a_body_shorter_than_its_length_is_refused_after_the_read_timeout(case, monkeypatch):
    from tools import local_host

    monkeypatch.setattr(local_host, "BODY_TIMEOUT", 1.0)
    before = _runs(case)
    head = ("POST /api/exports/hv/runs HTTP/1.1\r\nHost: x\r\nx-functions-key: {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 40\r\n\r\n")
    answer, _, body = _raw_request(case.world, head, b'{"dryRun": true}', timeout=10)
    assert answer == 408 and "did not arrive within 1 s" in body["error"]
    assert _runs(case) == before


def test_a_chunked_dry_run_is_a_dry_run(case):
    """Python's requests sends a generator body chunked: it must be read, not taken as no options."""
    world = case.world
    world.define(case.export("hv", list(sample_profiles(4, seed=47, start=410_000))))
    answer = world.api.post(f"{world.host.base_url}/api/exports/hv/runs", data=iter([b'{"dryRun"', b": true}"]),
                            timeout=30)
    assert answer.status_code == 202 and answer.json()["dryRun"] is True, answer.text[:300]
    assert world.wait(answer.json()["runId"], timeout=60)["status"] == "dry run"
    assert case.requests == []


def test_a_malformed_chunk_is_refused(case):
    head = ("POST /api/exports/hv/runs HTTP/1.1\r\nHost: x\r\nx-functions-key: {key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    answer, _, body = _raw_request(case.world, head, b"zz\r\n{}\r\n0\r\n\r\n", timeout=5)
    assert answer == 400 and "size in hexadecimal" in body["error"]


def test_every_answer_is_json_and_names_no_python_version(case):
    answer, headers, body = _raw_request(case.world, "BREW /api/exports HTTP/1.1\r\nHost: x\r\n"
                                                     "x-functions-key: {key}\r\n\r\n")
    assert answer == 405 and headers["Content-Type"] == "application/json" and "BREW" in body["error"]
    answer, headers, body = _raw_request(case.world, "GET /api/exports HTTP/1.1 extra\r\n\r\n")
    assert answer == 400 and headers["Content-Type"] == "application/json" and body["error"]
    assert "Python" not in headers["Server"]


# === configuration the product does not handle yet ===================================================

@pytest.fixture
def app_setting(monkeypatch, shared_world):
    """Change an app setting of the module's world, as an operator would (the worker restarts with it). A restart
    comes once the world is quiet: replacing the services closes their clients, and a delivery still under way
    from an earlier test (on a parallel worker, the module's tests before this one may be any of them) would fail
    on a closed transport."""
    from shared import services

    def change(name: str, value: str) -> None:
        _quiet(shared_world)
        monkeypatch.setenv(name, value)
        services.use(None)

    yield change
    _quiet(shared_world)
    monkeypatch.undo()
    services.use(None)


def _quiet(world) -> None:
    """Wait until no message is queued or being handled (a message counts until its function deletes it)."""
    queues = [QueueClient.from_connection_string(world.stack.storage, q) for q in (BATCH_QUEUE, PLAN_QUEUE)]
    wait_until(lambda: all(q.get_queue_properties().approximate_message_count == 0 for q in queues), timeout=90)


@pytest.mark.parametrize("membership", ["field", "list"])
def test_api_key_secret_missing_from_key_vault_fails_the_run_naming_the_secret(case, app_setting, membership):
    app_setting("AUTOPILOT_API_KEY_SECRET_NAME", "no-such-secret")
    app_setting("AUTOPILOT_MAX_ATTEMPTS", "2")
    name = f"nokey-{membership}"
    case.world.define(case.export(name, list(sample_profiles(10, seed=47, start=600_000)), membership=membership))
    answer = case.world.start(name)
    assert answer.status_code in (200, 202), answer.text
    view = case.world.wait(answer.json()["runId"], timeout=60)
    assert view["status"] == "failed"
    assert "no-such-secret" in (view["error"] or "") and "does not exist" in view["error"]
    assert case.requests == []
    assert view["batches"]["planned"] == 0  # the key is read while the run is planned: nothing was queued
    case.no_function_failed()


# === queue messages the product does not handle yet (last: their failed deliveries go on in the background) =====
TYPE_ERRORS = {
    "batch number as text": {"batch": "7"},
    "run id as a number": {"run": 20260302},
    "carry as a list": {"carry": []},
    "carried results that are not counts": {"carry": {"results": {"created": "many"}}},
    "attempt as text": {"attempt": "1"},
}


def _dead_letters(world, markers: list[str], timeout: float) -> dict[str, dict]:
    found: dict[str, dict] = {}

    def look() -> bool:
        container = world.blobs.get_container_client("dead")
        for blob in container.list_blobs(name_starts_with="unreadable/"):
            data = container.download_blob(blob.name).readall().decode("utf-8", "replace")
            found.update({m: json.loads(data) for m in markers if m in data})
        return len(found) == len(markers)

    try:
        wait_until(look, timeout=timeout)
    except AssertionError:
        pass
    return found


def test_queue_messages_with_wrongly_typed_fields_are_dead_lettered_with_their_reason(case):
    markers = {}
    for name, changes in TYPE_ERRORS.items():
        marker = f"typ{uuid.uuid4().hex[:10]}"
        markers[marker] = name
        _send(case.world, json.dumps({**_message(marker, **changes), "export": marker}).encode())
    dead = _dead_letters(case.world, list(markers), timeout=5)
    assert case.requests == []
    missing = [markers[m] for m in markers if m not in dead]
    assert not missing, f"not dead-lettered with a reason: {missing}"
    assert all("wrong message schema" in d["reason"] for d in dead.values())
    case.no_function_failed()


def test_queue_message_pointing_outside_its_container_with_dots_is_dead_lettered(case):
    marker = f"dots{uuid.uuid4().hex[:10]}"
    _send(case.world, json.dumps(_message(marker, items=None, blob="batches/../config/exports.json")).encode())
    dead = _dead_letters(case.world, [marker], timeout=5)
    assert case.requests == []
    assert marker in dead and "message points outside the 'batches' container" in dead[marker]["reason"]
    case.no_function_failed()


def test_queue_message_too_big_to_wrap_for_the_poison_queue_is_still_dead_lettered(case):
    marker = f"big{uuid.uuid4().hex[:10]}"
    body = json.dumps(_message(marker, items=_items(marker, 101, FirstName='"' * 150))).encode()
    assert len(base64.b64encode(body)) <= 64 * 1024  # the queue accepts it
    wrapped = json.dumps({"poison_reason": "x" * 60, "body": body.decode()}).encode()
    assert len(base64.b64encode(wrapped)) > 64 * 1024  # its poison wrapper does not fit
    _send(case.world, body)
    dead = _dead_letters(case.world, [marker], timeout=5)
    assert case.requests == []
    assert marker in dead and "batch holds 101 contacts" in dead[marker]["reason"]
    case.no_function_failed()


FORGED = {
    "unsubscribes": {"unsubscribed": True},
    "re-keys": {"_NewEmail": "someone-else@example.net"},
    "joins a list in bulk": {"_autopilot_list": "contactlist_other"},
    "key is not its Email": {"Email": "another-person@example.net"},
}


def test_messages_whose_documents_could_change_a_subscription_or_identity_are_refused(case):
    run_id = RUN_ID.format(uuid.uuid4().int & 0xFFFFFFFF)
    with TableServiceClient.from_connection_string(case.world.stack.storage) as tables:
        RunRecords(tables).create(run_id, "forged", status="running", planned_batches=9, trigger="http")
    markers = {}
    for batch, (name, document) in enumerate(FORGED.items(), start=1):
        marker = f"forged{uuid.uuid4().hex[:8]}"
        markers[marker] = name
        item = {"k": f"{marker}@example.net", "f": "0" * 20, "m": True,
                "d": {"Email": f"{marker}@example.net", **document}}
        message = _message(marker, run=run_id, export="forged", batch=batch, items=[item])
        _send(case.world, json.dumps(message).encode())
    dead = _dead_letters(case.world, list(markers), timeout=5)
    assert not [c for c in case.world.sim.contacts().values() if c.get("unsubscribed")], "a contact was unsubscribed"
    assert case.requests == []
    missing = [markers[m] for m in markers if m not in dead]
    assert not missing, f"not refused: {missing}"



def test_two_oversized_messages_of_one_batch_and_attempt_keep_their_own_items(storage_connection):
    """A rest re-queued after a 429 and a replay's copy of the same batch can be queued at once: each message's
    blob is its own."""
    from azure.storage.blob import BlobServiceClient

    from shared.pipeline import batch_messages
    from shared.pipeline.batch_messages import BATCH_CONTAINER, BatchMessage

    blobs = BlobServiceClient.from_connection_string(storage_connection)
    try:
        blobs.create_container(BATCH_CONTAINER)
    except ResourceExistsError:
        pass

    def message(letter: str) -> BatchMessage:
        emails = [f"{letter}{n}@example.com" for n in range(100)]
        items = [{"k": e, "f": "x", "m": True, "r": "", "d": {"Email": e, "FirstName": letter * 900}} for e in emails]
        return BatchMessage("20260101T000000Z-0000abcd", "seg", 7, "upsert", items)

    first, second = (batch_messages.encode(message(letter), blobs) for letter in "ab")
    assert b'"blob"' in first and b'"blob"' in second
    assert batch_messages.decode(first, blobs).items[0]["k"] == "a0@example.com"
    assert batch_messages.decode(second, blobs).items[0]["k"] == "b0@example.com"
