"""The Autopilot simulator keeps the contract in docs/api-contracts.md: real HTTP on loopback, in process."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tools.autopilot_sim import AutopilotSim, Faults, SimProcess

pytestmark = pytest.mark.serial  # the rate windows are timed

KEY = "test-key"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sim():
    with AutopilotSim(KEY, rate=None) as instance:
        yield instance


@pytest.fixture
def api(sim):
    return Api(sim)


class Api:
    """A pooled session against one simulator, with the key set."""

    def __init__(self, sim: AutopilotSim, key: str | None = KEY):
        self.base = sim.base_url
        self.session = requests.Session()
        if key is not None:
            self.session.headers["autopilotapikey"] = key

    def __call__(self, method: str, path: str, body: object = None, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 5)
        return self.session.request(method, self.base + path, json=body, **kwargs)

    def upsert(self, *contacts: dict) -> requests.Response:
        return self("POST", "/contacts", {"contacts": list(contacts)})

    def new_list(self, name: str) -> str:
        response = self("POST", "/list", {"name": name})
        assert response.status_code == 200, response.text
        return response.json()["list_id"]


def _error(response: requests.Response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["error"], body["message"]


# --- auth and rate limit ------------------------------------------------------------------------------------
def test_missing_and_wrong_key_bodies(sim):
    assert _error(Api(sim, key=None)("GET", "/lists")) == (
        400, "Bad Request", "No autopilotapikey header provided.")
    assert _error(Api(sim, key="nope")("GET", "/lists")) == (
        401, "Unauthorized", "Provided autopilotapikey not valid.")


def test_key_rotation(sim, api):
    sim.set_api_key("new-key")
    assert api("GET", "/lists").status_code == 401
    assert Api(sim, key="new-key")("GET", "/lists").status_code == 200


def test_rate_limit_answers_429_without_retry_after_and_recovers():
    with AutopilotSim(KEY, rate=5) as sim:
        api = Api(sim)
        responses = [api("GET", "/lists") for _ in range(12)]
        assert [r.status_code for r in responses] == [200] * 5 + [429] * 7
        throttled = responses[-1]
        assert throttled.json() == {"error": "Too Many Requests",
                                    "message": "You have exceeded your request rate of 5 r/s."}
        assert "Retry-After" not in throttled.headers
        time.sleep(1.05)
        assert api("GET", "/lists").status_code == 200


def test_throttled_requests_do_not_count_toward_the_window():
    with AutopilotSim(KEY, rate=5) as sim:
        api = Api(sim)
        started = time.monotonic()
        assert all(api("GET", "/lists").status_code == 200 for _ in range(5))
        time.sleep(0.5)
        assert all(api("GET", "/lists").status_code == 429 for _ in range(6))
        time.sleep(max(0.0, started + 1.1 - time.monotonic()))
        # The 6 refusals are less than a second old: had they counted, this would be refused too.
        assert api("GET", "/lists").status_code == 200


def test_a_request_counts_at_its_arrival_not_when_a_busy_simulator_gets_to_it():
    """A thread of the simulator kept waiting (here: its front door held by another) must not stamp the request
    late: evenly paced requests would look bunched and be refused."""
    with AutopilotSim(KEY, rate=5) as sim:
        api = Api(sim)
        with ThreadPoolExecutor(1) as pool:
            with sim._lock:  # the simulator is busy
                sent = time.time()
                answer = pool.submit(api, "GET", "/lists")
                time.sleep(0.3)
            assert answer.result().status_code == 200
        (record,) = sim.request_log()
        assert sent <= record["t"] < sent + 0.1


def test_requests_handled_out_of_arrival_order_are_windowed_by_arrival():
    with AutopilotSim(KEY, rate=2) as sim:
        def at(arrived: float) -> int:
            return sim.dispatch("GET", "/v1/lists", KEY, b"", arrived).status

        assert [at(100.0), at(100.6)] == [200, 200]
        assert at(100.5) == 429  # handled last, but [100.0, 101.0) would hold three
        assert at(99.5) == 200  # no window that holds 99.5 holds two others: [99.5, 100.5) has 100.0 only
        assert at(99.9) == 429  # [99.9, 100.9) would hold 99.9, 100.0 and 100.6
        assert at(101.65) == 200  # the usual case: after every other arrival, [100.65, 101.65] holds none


def test_unauthorised_requests_are_not_rate_limited():
    with AutopilotSim(KEY, rate=2) as sim:
        stranger = Api(sim, key="nope")
        assert {stranger("GET", "/lists").status_code for _ in range(5)} == {401}
        assert Api(sim)("GET", "/lists").status_code == 200


def test_unthrottled_when_rate_is_none(api):
    assert {api("GET", "/lists").status_code for _ in range(30)} == {200}


# --- contacts -----------------------------------------------------------------------------------------------
def test_bulk_limit_is_100(sim, api):
    contacts = [{"Email": f"c{i}@example.com"} for i in range(101)]
    status, error, message = _error(api.upsert(*contacts))
    assert (status, error) == (400, "Bad Request") and "100" in message
    assert sim.contacts() == {}
    response = api.upsert(*contacts[:100])
    assert response.status_code == 200
    body = response.json()
    assert len(body["contact_ids"]) == 100 and len(set(body["contact_ids"])) == 100
    assert body["email_contact_map"]["c7@example.com"] == sim.contacts()["c7@example.com"]["contact_id"]
    assert api("POST", "/contacts", {"contacts": []}).status_code == 400


def test_merge_by_email_in_any_case(sim, api):
    first = api("POST", "/contact", {"contact": {"Email": "Ann@Example.com", "FirstName": "Ann", "LastName": "Lee"}})
    second = api.upsert({"Email": "ann@EXAMPLE.COM", "FirstName": "Anna", "custom": {"string--Team": "blue"}})
    contacts = sim.contacts()
    assert list(contacts) == ["ann@example.com"]
    contact = contacts["ann@example.com"]
    assert first.json()["contact_id"] == second.json()["contact_ids"][0] == contact["contact_id"]
    assert (contact["FirstName"], contact["LastName"]) == ("Anna", "Lee")
    assert contact["custom"] == {"string--Team": "blue"}
    assert second.json()["email_contact_map"] == {"ann@EXAMPLE.COM": contact["contact_id"]}
    api.upsert({"Email": "ANN@example.com", "custom": {"integer--Score": 3}})
    assert sim.contacts()["ann@example.com"]["custom"] == {"string--Team": "blue", "integer--Score": 3}


def test_custom_fields_stored_and_returned_typed(sim, api):
    custom = {"boolean--In--Segment": True, "integer--Visits": 4, "float--Spend": 2, "date--Joined": "2024-05-01",
              "string--Tier": "gold"}
    assert api.upsert({"Email": "a@x.io", "custom": custom}).status_code == 200
    assert sim.contacts()["a@x.io"]["custom"] == custom
    fetched = api("GET", "/contact/a@x.io").json()
    assert {"kind": "In Segment", "value": True, "fieldType": "boolean"} in fetched["custom_fields"]
    assert len(fetched["custom_fields"]) == 5


@pytest.mark.parametrize(("custom", "named"), [
    ({"integer--Visits": True}, "integer--Visits"),
    ({"integer--Visits": 1.5}, "integer--Visits"),
    ({"float--Spend": "2.5"}, "float--Spend"),
    ({"boolean--In--Segment": "true"}, "boolean--In--Segment"),
    ({"date--Joined": "yesterday"}, "date--Joined"),
    ({"string--Tier": 7}, "string--Tier"),
    ({"number--Visits": 1}, "number--Visits"),
    ({"In--Segment": True}, "In--Segment"),
])
def test_custom_field_type_errors_are_refused(sim, api, custom, named):
    status, _, message = _error(api.upsert({"Email": "a@x.io", "custom": custom}))
    assert status == 400 and named in message
    assert sim.contacts() == {}


def test_custom_field_type_is_fixed_by_its_first_write(sim, api):
    assert api.upsert({"Email": "a@x.io", "custom": {"boolean--In--Segment": True}}).status_code == 200
    assert api.upsert({"Email": "b@x.io", "custom": {"string--In--Segment": "yes"}}).status_code == 400
    assert set(sim.contacts()) == {"a@x.io"}


def test_unknown_top_level_fields_are_named(sim, api):
    status, _, message = _error(api.upsert({"Email": "a@x.io", "Nickname": "A", "FirstName": "A"}))
    assert status == 400 and "Nickname" in message and "FirstName" not in message
    assert api.upsert({"Email": "a@x.io", "notify": False, "unsubscribed": False, "owner_name": "o"}).ok


def test_one_invalid_email_refuses_the_whole_bulk_call(sim, api):
    status, _, message = _error(api.upsert({"Email": "good@x.io"}, {"Email": "bad @x.io"}, {"Email": "ok@x.io"}))
    assert status == 400 and "bad @x.io" in message
    assert sim.contacts() == {}
    for bad in ("no-at-sign", "two@@x.io", "@x.io", "a@"):
        assert api.upsert({"Email": bad}).status_code == 400, bad


def test_single_upsert_needs_an_email(sim, api):
    status, _, message = _error(api("POST", "/contact", {"contact": {"FirstName": "Nobody"}}))
    assert status == 400 and "Email" in message
    assert sim.contacts() == {}


def test_autopilot_list_is_honoured_on_single_and_ignored_in_bulk(sim, api):
    list_id = api.new_list("Segment A")
    assert api("POST", "/contact", {"contact": {"Email": "one@x.io", "_autopilot_list": list_id}}).ok
    assert api.upsert({"Email": "two@x.io", "_autopilot_list": list_id}).ok
    assert sim.members(list_id) == {"one@x.io"}
    assert set(sim.contacts()) == {"one@x.io", "two@x.io"}
    missing = api("POST", "/contact", {"contact": {"Email": "three@x.io", "_autopilot_list": "contactlist_nope"}})
    assert missing.status_code == 404
    assert "three@x.io" not in sim.contacts()


def test_autopilot_list_adds_only_a_contact_the_upsert_creates(sim, api):
    """The contract's strict reading: `_autopilot_list` adds on creation; the list endpoint joins anyone."""
    list_id = api.new_list("Segment A")
    assert api.upsert({"Email": "old@x.io"}).ok
    assert api("POST", "/contact", {"contact": {"Email": "OLD@x.io", "_autopilot_list": list_id}}).ok
    assert sim.members(list_id) == set()
    joined = api("POST", f"/list/{list_id}/contact/old@x.io")
    assert joined.status_code == 200 and joined.json() == {}
    assert api("POST", f"/list/{list_id}/contact/old@x.io").json() == {"not_modified": True}
    assert sim.members(list_id) == {"old@x.io"}


def test_new_email_rekeys_a_contact(sim, api):
    cid = api.upsert({"Email": "old@x.io", "FirstName": "O"}).json()["contact_ids"][0]
    assert api.upsert({"Email": "OLD@x.io", "_NewEmail": "new@x.io"}).ok
    assert list(sim.contacts()) == ["new@x.io"] and sim.contacts()["new@x.io"]["contact_id"] == cid
    api.upsert({"Email": "other@x.io"})
    assert api.upsert({"Email": "other@x.io", "_NewEmail": "new@x.io"}).status_code == 409


def test_get_delete_and_unsubscribe_by_id_or_email(sim, api):
    list_id = api.new_list("L")
    cid = api("POST", "/contact", {"contact": {"Email": "a+tag@x.io", "_autopilot_list": list_id}}).json()[
        "contact_id"]
    fetched = api("GET", "/contact/A%2BTAG@x.io")
    assert fetched.status_code == 200 and fetched.json()["contact_id"] == cid
    assert fetched.json()["lists"] == [list_id]
    assert api("GET", "/contact/a+tag@x.io").status_code == 404  # an unencoded + is a space
    assert api("POST", f"/contact/{cid}/unsubscribe").status_code == 200
    assert sim.contacts()["a+tag@x.io"]["unsubscribed"] is True
    assert api("DELETE", f"/contact/{cid}").status_code == 204
    gone = api("GET", f"/contact/{cid}")
    assert gone.status_code == 404 and gone.json()["message"] == "Contact could not be found."
    assert sim.contacts() == {} and sim.members(list_id) == set()
    assert api("DELETE", "/contact/a%2Btag@x.io").status_code == 404


# --- lists ---------------------------------------------------------------------------------------------------
def test_duplicate_list_name_is_409(sim, api):
    list_id = api.new_list("Newsletter")
    duplicate = api("POST", "/list", {"name": "Newsletter"})
    assert _error(duplicate) == (409, "Conflict", "A list with this name already exists.")
    assert api("POST", "/list", {"name": "newsletter"}).status_code == 200  # titles are case-sensitive
    lists = api("GET", "/lists").json()["lists"]
    assert {"list_id": list_id, "title": "Newsletter"} in lists and len(lists) == 2
    assert sim.lists()[list_id] == "Newsletter"


def test_bookmark_paging_over_250_members(sim, api):
    list_id = api.new_list("Big")
    emails = [f"m{i:03}@x.io" for i in range(250)]
    for i in range(0, 250, 100):
        api.upsert(*({"Email": e} for e in emails[i:i + 100]))
    for email in emails:
        assert api("POST", f"/list/{list_id}/contact/{email}").status_code == 200
    pages, path = [], f"/list/{list_id}/contacts"
    while True:
        page = api("GET", path).json()
        pages.append(page)
        if "bookmark" not in page:
            break
        path = f"/list/{list_id}/contacts/{page['bookmark']}"
    assert [len(p["contacts"]) for p in pages] == [100, 100, 50]
    assert {p["total_contacts"] for p in pages} == {250}
    seen = [c["Email"] for p in pages for c in p["contacts"]]
    assert len(seen) == len(set(seen)) == 250 and set(seen) == sim.members(list_id)
    assert api("GET", "/list/contactlist_nope/contacts").status_code == 404


def test_paging_survives_removals_between_pages(sim, api):
    list_id = api.new_list("Churn")
    api.upsert(*({"Email": f"m{i:03}@x.io"} for i in range(100)))
    api.upsert(*({"Email": f"n{i:03}@x.io"} for i in range(50)))
    for email in sim.contacts():
        api("POST", f"/list/{list_id}/contact/{email}")
    first = api("GET", f"/list/{list_id}/contacts").json()
    for contact in first["contacts"][:10]:  # remove members already seen, as a sync would
        api("DELETE", f"/list/{list_id}/contact/{contact['contact_id']}")
    second = api("GET", f"/list/{list_id}/contacts/{first['bookmark']}").json()
    assert len(second["contacts"]) == 50 and second["total_contacts"] == 140 and "bookmark" not in second


def test_membership_calls(sim, api):
    list_id = api.new_list("L")
    api.upsert({"Email": "a@x.io"})
    member = f"/list/{list_id}/contact/a@x.io"
    absent = api("GET", member)
    assert absent.status_code == 404 and absent.content == b""
    added = api("POST", member)
    assert added.status_code == 200 and added.json() == {}
    assert api("POST", f"/list/{list_id}/contact/A@X.IO").json() == {"not_modified": True}
    assert api("GET", member).status_code == 200 and api("GET", member).json()["Email"] == "a@x.io"
    assert sim.members(list_id) == {"a@x.io"}
    assert api("DELETE", member).status_code == 200
    assert api("DELETE", member).status_code == 200  # not a member any more: still 200
    assert api("GET", member).status_code == 404
    assert sim.members(list_id) == set()
    assert api("POST", f"/list/{list_id}/contact/nobody@x.io").status_code == 404
    for method in ("GET", "POST", "DELETE"):
        assert api(method, "/list/contactlist_nope/contact/a@x.io").status_code == 404, method


# --- protocol --------------------------------------------------------------------------------------------------
def test_unknown_route_wrong_method_and_bad_json(api):
    assert api("GET", "/no/such/thing").status_code == 404
    wrong = api("PUT", "/lists")
    assert wrong.status_code == 405 and wrong.json()["code"] == "MethodNotAllowedError"
    assert wrong.headers["Allow"] == "GET"
    bad = api("POST", "/contacts", data=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"] == "Bad Request"


def test_keep_alive_serves_several_requests_on_one_connection(sim):
    connection = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    try:
        for _ in range(3):  # a wrong Content-Length or a closed socket would break the second request
            connection.request("GET", "/v1/lists", headers={"autopilotapikey": KEY})
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read()) == {"lists": []}
            assert response.getheader("Connection") != "close"
    finally:
        connection.close()


def test_request_log_records_contact_counts_and_status(sim, api):
    before = time.time()
    api.upsert(*({"Email": f"c{i}@x.io"} for i in range(3)))
    api("POST", "/contact", {"contact": {"Email": "d@x.io"}})
    api("GET", "/lists")
    log = sim.request_log()
    assert [(r["method"], r["path"], r["status"], r.get("n")) for r in log] == [
        ("POST", "/v1/contacts", 200, 3), ("POST", "/v1/contact", 200, 1), ("GET", "/v1/lists", 200, None)]
    assert all(before <= r["t"] <= time.time() for r in log)
    sim.reset_log()
    assert sim.request_log() == []


def test_admin_endpoints_need_no_key_and_are_not_faulted(sim, api):
    list_id = api.new_list("L")
    api("POST", "/contact", {"contact": {"Email": "A@x.io", "_autopilot_list": list_id}})
    sim.faults = Faults(fail_rate=1.0)
    admin = f"http://127.0.0.1:{sim.port}/_sim"
    state = requests.get(f"{admin}/state", timeout=5).json()
    assert set(state["contacts"]) == {"a@x.io"} and state["lists"] == {list_id: "L"}
    assert state["members"] == {list_id: ["a@x.io"]}
    assert len(requests.get(f"{admin}/log", timeout=5).json()["log"]) == 2
    assert requests.post(f"{admin}/reset-log", timeout=5).status_code == 200
    assert sim.request_log() == []
    config = requests.post(f"{admin}/config", json={"faults": {}, "rate": None}, timeout=5)
    assert config.status_code == 200 and sim.faults == Faults()
    assert requests.post(f"{admin}/config", json={"faults": {"fail_rate": 2}}, timeout=5).status_code == 400


# --- faults -------------------------------------------------------------------------------------------------
def test_fail_fault_answers_500_and_writes_nothing(sim, api):
    sim.faults = Faults(fail_rate=1.0)
    status, error, _ = _error(api.upsert({"Email": "a@x.io"}))
    assert (status, error) == (500, "Internal Server Error")
    assert sim.contacts() == {}
    assert sim.request_log()[-1]["fault"] == "fail"


def test_timeout_fault_applies_the_write_before_the_client_gives_up(sim, api):
    sim.faults = Faults(timeout_rate=1.0, timeout_seconds=1.5)
    with pytest.raises(requests.ReadTimeout):
        api("POST", "/contacts", {"contacts": [{"Email": "late@x.io"}]}, timeout=(2, 0.4))
    assert "late@x.io" in sim.contacts()
    assert sim.request_log()[-1]["fault"] == "timeout"


def test_drop_fault_resets_the_connection_and_writes_nothing(sim, api):
    sim.faults = Faults(drop_rate=1.0)
    with pytest.raises(requests.ConnectionError):
        api.upsert({"Email": "a@x.io"})
    assert sim.contacts() == {}
    assert sim.request_log()[-1]["fault"] == "drop" and sim.request_log()[-1]["status"] is None
    sim.faults = Faults()
    assert api.upsert({"Email": "a@x.io"}).status_code == 200  # the session recovers on a new connection


def test_burst_fault_throttles_a_run_of_requests(sim, api):
    sim.faults = Faults(burst_rate=1.0, burst_length=3)
    first = api("GET", "/lists")
    assert first.status_code == 429 and "Retry-After" not in first.headers
    sim.faults = Faults()  # the burst already started runs to its end
    assert [api("GET", "/lists").status_code for _ in range(3)] == [429, 429, 200]
    assert [r.get("fault") for r in sim.request_log()] == ["burst"] * 3 + [None]


def _fault_pattern(seed: int, jitter: float = 0.0) -> list[int]:
    faults = Faults(fail_rate=0.3, burst_rate=0.1, burst_length=2)
    with AutopilotSim(KEY, rate=None, faults=faults, seed=seed, jitter=jitter) as sim:
        api = Api(sim)
        return [api("GET", "/lists").status_code for _ in range(40)]


def test_seeded_faults_are_reproducible():
    pattern = _fault_pattern(7)
    assert {200, 429, 500} <= set(pattern)
    assert _fault_pattern(7) == pattern
    assert _fault_pattern(8) != pattern


def test_faults_validate_their_rates():
    with pytest.raises(ValueError):
        Faults(fail_rate=0.6, drop_rate=0.6)
    with pytest.raises(ValueError):
        Faults(burst_rate=1.5)


# --- latency ------------------------------------------------------------------------------------------------
def _timed(api: Api, method: str, path: str, body: object = None) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = api(method, path, body)
    return response, time.monotonic() - started


def test_latency_delays_the_answer_by_latency_plus_jitter():
    with AutopilotSim(KEY, rate=None, latency=0.3, jitter=0.1) as sim:
        response, took = _timed(Api(sim), "GET", "/lists")
        assert response.status_code == 200
        [record] = sim.request_log()
        assert 0.3 <= record["latency"] <= 0.4
        assert record["latency"] <= took < 0.4 + 0.15


def test_concurrent_answers_wait_side_by_side_not_one_after_the_other():
    with AutopilotSim(KEY, rate=None, latency=0.3) as sim, ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        answers = list(pool.map(lambda _: _timed(Api(sim), "GET", "/lists"), range(2)))
        took = time.monotonic() - started
    assert [r.status_code for r, _ in answers] == [200, 200]
    assert all(0.3 <= each < 0.5 for _, each in answers) and took < 0.55


def test_a_request_counts_toward_the_rate_and_is_applied_when_it_arrives_not_when_answered():
    with AutopilotSim(KEY, rate=2, latency=0.5) as sim, ThreadPoolExecutor(3) as pool:
        started = time.time()
        first = [pool.submit(_timed, Api(sim), "POST", "/contacts", {"contacts": [{"Email": f"c{i}@x.io"}]})
                 for i in range(2)]
        time.sleep(0.15)
        # Both writes arrived and were applied; neither is answered yet.
        assert set(sim.contacts()) == {"c0@x.io", "c1@x.io"} and not any(f.done() for f in first)
        third = pool.submit(_timed, Api(sim), "GET", "/lists")
        # Counted at arrival, the two unanswered requests fill the 1-s window at 2 r/s: the third is refused,
        # and its 429 waits the latency too.
        assert [f.result()[0].status_code for f in (*first, third)] == [200, 200, 429]
        assert 0.5 <= third.result()[1] < 0.7
        assert [r["status"] for r in sim.request_log()] == [200, 200, 429]
        assert all(r["t"] - started < 0.3 for r in sim.request_log())  # logged as they arrived


def test_admin_endpoints_and_dropped_connections_do_not_wait(sim, api):
    sim.latency = 1.0
    started = time.monotonic()
    assert requests.get(f"http://127.0.0.1:{sim.port}/_sim/state", timeout=5).status_code == 200
    sim.faults = Faults(drop_rate=1.0)
    with pytest.raises(requests.ConnectionError):
        api.upsert({"Email": "a@x.io"})
    assert time.monotonic() - started < 0.5
    assert "latency" not in sim.request_log()[-1]


def test_jitter_has_a_generator_of_its_own_so_fault_draws_do_not_change():
    def waits(seed: int) -> list[float]:
        with AutopilotSim(KEY, rate=None, seed=seed, jitter=0.01) as sim:
            api = Api(sim)
            for _ in range(5):
                api("GET", "/lists")
            return [r["latency"] for r in sim.request_log()]

    assert _fault_pattern(7, jitter=0.005) == _fault_pattern(7)
    assert waits(3) == waits(3) != waits(4)
    assert all(0 < wait <= 0.01 for wait in waits(3))


@pytest.mark.parametrize("bad", [{"latency": -0.1}, {"jitter": -1}, {"latency": "0.3"}, {"latency": True},
                                 {"jitter": None}])
def test_latency_config_must_be_a_non_negative_number(sim, bad):
    refused = requests.post(f"http://127.0.0.1:{sim.port}/_sim/config", json=bad, timeout=5)
    assert refused.status_code == 400
    assert "must be a non-negative number of seconds" in refused.json()["message"]
    assert (sim.latency, sim.jitter) == (0, 0)


def test_latency_config_applies_at_run_time(sim, api):
    answer = requests.post(f"http://127.0.0.1:{sim.port}/_sim/config", json={"latency": 0.2, "jitter": 0}, timeout=5)
    assert answer.status_code == 200 and (answer.json()["latency"], answer.json()["jitter"]) == (0.2, 0)
    assert _timed(api, "GET", "/lists")[1] >= 0.2
    with pytest.raises(ValueError):
        AutopilotSim(KEY, latency=-1)


# --- CLI ---------------------------------------------------------------------------------------------------
def test_cli_serves_until_sigterm(tmp_path):
    dump = tmp_path / "state.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.autopilot_sim", "--port", "0", "--rate", "0", "--state-dump", str(dump)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "SIM_API_KEY": "cli-key"})
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("autopilot-sim listening on http://127.0.0.1:") and line.endswith("/v1")
        base = line.rsplit(" ", 1)[1]
        headers = {"autopilotapikey": "cli-key"}
        assert requests.post(base + "/contacts", json={"contacts": [{"Email": "a@x.io"}]}, headers=headers,
                             timeout=5).status_code == 200
        state = requests.get(base.removesuffix("/v1") + "/_sim/state", timeout=5).json()
        assert list(state["contacts"]) == ["a@x.io"]
        proc.terminate()
        assert proc.wait(5) == 0
        assert list(json.loads(dump.read_text())["contacts"]) == ["a@x.io"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_cli_takes_its_key_from_the_environment_never_the_command_line():
    missing = subprocess.run([sys.executable, "-m", "tools.autopilot_sim", "--port", "0"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30, env={k: v for k, v in os.environ.items()
                                                                               if k != "SIM_API_KEY"})
    assert missing.returncode == 2 and "SIM_API_KEY" in missing.stderr
    sim = SimProcess("a-secret-key-0123", rate=0).start()
    try:
        command_line = Path(f"/proc/{sim.pid}/cmdline").read_bytes()  # what ps shows
        assert b"a-secret-key-0123" not in command_line and b"tools.autopilot_sim" in command_line
        assert requests.post(sim.base_url + "/contacts", json={"contacts": [{"Email": "a@x.io"}]},
                             headers={"autopilotapikey": "a-secret-key-0123"}, timeout=5).status_code == 200
    finally:
        sim.stop()


def test_process_wrapper_takes_latency_on_its_command_line_and_at_run_time():
    sim = SimProcess(KEY, rate=0, latency=0.25).start()  # ... python -m tools.autopilot_sim --latency 0.25 --jitter 0.0
    try:
        assert b"--latency\x000.25" in Path(f"/proc/{sim.pid}/cmdline").read_bytes()
        api = requests.Session()
        api.headers["autopilotapikey"] = KEY
        started = time.monotonic()
        assert api.get(sim.base_url + "/lists", timeout=5).status_code == 200
        assert time.monotonic() - started >= 0.25
        sim.set_latency(0)
        started = time.monotonic()
        assert api.get(sim.base_url + "/lists", timeout=5).status_code == 200
        assert time.monotonic() - started < 0.2
        assert [r.get("latency") for r in sim.request_log()] == [0.25, None]
        assert sim.configure(jitter=0.05)["jitter"] == 0.05
    finally:
        sim.stop()
    with pytest.raises(ValueError):
        SimProcess(KEY, latency=-0.5)
