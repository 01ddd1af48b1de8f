"""The Ortto simulator keeps the contract in shared/ortto-api.md: real HTTP on loopback, in process."""

from __future__ import annotations

import re
import time
import uuid

import pytest
import requests

from tools.ortto_sim import OrttoSim, OrttoSimProcess
from tools.sim_base import Faults

KEY = "ortto-test-key"


@pytest.fixture
def sim():
    """Unthrottled, so only the tests that set a rate or faults meet 429s."""
    with OrttoSim(KEY, rate=None) as instance:
        yield instance


class Api(requests.Session):
    """Calls to one simulator's /v1 with the key set (none if `key` is None); POST unless told."""

    def __init__(self, base_url: str, key: str | None = KEY):
        super().__init__()
        self.base = base_url
        self.headers.update({"X-Api-Key": key} if key is not None else {})

    def __call__(self, path: str, body: object = None, method: str = "POST", **kwargs) -> requests.Response:
        return self.request(method, self.base + path, json=body, timeout=5, **kwargs)

    def merge(self, *people: dict, **options: object) -> requests.Response:
        body = {"people": list(people), "merge_by": ["str::email"], "merge_strategy": 2, "find_strategy": 0,
                "async": False, **options}
        return self("/person/merge", body)

    def statuses(self, *people: dict, **options: object) -> list[str]:
        response = self.merge(*people, **options)
        assert response.status_code == 200, response.text
        return [p["status"] for p in response.json()["people"]]

    def create_field(self, name: str, kind: str) -> requests.Response:
        return self("/person/custom-field/create", {"field": {"name": name, "type": kind}})


@pytest.fixture
def api(sim):
    """A session with the key; its pooled connection is closed after the test."""
    with Api(sim.base_url) as session:
        yield session


def person(email: str, tags: list[str] | None = None, unset_tags: list[str] | None = None, **fields: object) -> dict:
    """A merge person; keyword fields spell `::` as `__` (str__first=... is str::first), or pass **{id: value}."""
    doc: dict = {"fields": {"str::email": email, **{k.replace("__", "::"): v for k, v in fields.items()}}}
    if tags is not None:
        doc["tags"] = tags
    if unset_tags is not None:
        doc["unset_tags"] = unset_tags
    return doc


def assert_error(response: requests.Response, status: int, code: str, *fragments: str) -> None:
    body = response.json()
    assert (response.status_code, body["code"]) == (status, code), response.text
    uuid.UUID(body["request_id"])
    for fragment in fragments:
        assert fragment in body["error"], body["error"]


# --- transport ----------------------------------------------------------------------------------------------
def test_key_routing_and_method_errors(sim, api):
    assert_error(Api(sim.base_url, key=None)("/person/custom-field/get", {}), 401, "unauthorized")
    assert_error(Api(sim.base_url, key="wrong")("/person/custom-field/get", {}), 401, "unauthorized")
    assert_error(api("/person/nothing", {}), 404, "not-found")
    wrong = api("/person/merge", method="GET")
    assert_error(wrong, 405, "method-not-allowed")
    assert wrong.headers["Allow"] == "POST"
    assert_error(api("/audience/subscribe", {}), 405, "method-not-allowed")


def test_subscribe_applies_nothing_but_is_counted(sim, api):
    response = api("/audience/subscribe", {"audience_id": "a", "people": []}, method="PUT")
    assert (response.status_code, response.json()) == (200, {})
    assert sim.state()["subscribe_calls"] == 1 and sim.people() == {}


def test_payload_over_two_megabytes_is_413(sim, api):
    big = person("a@example.com", str__first="x" * 2_000_000)
    assert_error(api.merge(big), 413, "payload-too-large")
    assert sim.people() == {}


def test_fail_fault_answers_500_and_applies_nothing(sim, api):
    sim.faults = Faults(fail_rate=1.0)
    assert_error(api.merge(person("a@example.com")), 500, "internal-error")
    assert sim.people() == {} and sim.request_log()[-1]["fault"] == "fail"


# --- merge --------------------------------------------------------------------------------------------------
def test_merge_creates_then_merges_by_email_case_insensitively(sim, api):
    first = api.merge(person("Chris@Example.com", str__first="Chris")).json()["people"][0]
    assert first["status"] == "created" and re.fullmatch(r"[0-9a-f]{24}", first["person_id"])
    second = api.merge(person("chris@example.COM", str__last="Lee")).json()["people"][0]
    assert second == {"status": "merged", "person_id": first["person_id"]}
    stored = sim.people()
    assert list(stored) == ["chris@example.com"]
    assert stored["chris@example.com"]["fields"] == {
        "str::email": "chris@example.COM", "str::first": "Chris", "str::last": "Lee", "bol::p": True,
        "bol::sp": False}


def test_repeated_email_in_one_request_merges_into_the_first(sim, api):
    assert api.statuses(person("a@example.com", str__first="A"), person("A@example.com", str__last="B")) == [
        "created", "merged"]
    assert sim.people()["a@example.com"]["fields"]["str::last"] == "B"
    assert sim.request_log()[-1]["n"] == 2


def test_strategy_2_overwrites_keeps_unsent_and_null_clears(sim, api):
    api.merge(person("a@example.com", str__first="A", str__last="L", str__postal="3000"))
    api.merge(person("a@example.com", str__first="B", str__postal=None))
    fields = sim.people()["a@example.com"]["fields"]
    assert (fields["str::first"], fields["str::last"], "str::postal" in fields) == ("B", "L", False)


def test_strategy_1_fills_only_empty_fields_and_3_only_creates(sim, api):
    api.merge(person("a@example.com", str__first="A", str__postal="3000"))
    merged = person("A@Example.com", str__first="X", str__last="L", str__postal=None)
    assert api.statuses(merged, merge_strategy=1) == ["merged"]
    fields = sim.people()["a@example.com"]["fields"]
    assert (fields["str::first"], fields["str::last"], fields["str::postal"]) == ("A", "L", "3000")
    assert fields["str::email"] == "A@Example.com"  # the merge key is always the last one sent
    results = api.merge(person("a@example.com", str__first="Y", tags=["t"]), person("b@example.com"),
                        merge_strategy=3).json()["people"]
    assert [r["status"] for r in results] == ["ignored", "created"]
    after = sim.people()["a@example.com"]
    assert results[0]["person_id"] == after["id"]
    assert (after["fields"]["str::first"], after["fields"]["str::email"], after["tags"]) == ("A", "A@Example.com", [])


def test_skip_non_existing_updates_existing_people_only(sim, api):
    api.merge(person("a@example.com"))
    response = api.merge(person("a@example.com", str__first="A"), person("new@example.com"), skip_non_existing=True)
    results = response.json()["people"]
    assert [r["status"] for r in results] == ["merged", "ignored"] and "person_id" not in results[1]
    assert set(sim.people()) == {"a@example.com"}


def test_async_merge_applies_and_answers_an_empty_object(sim, api):
    response = api.merge(person("a@example.com", str__first="A"), **{"async": True})
    assert (response.status_code, response.json()) == (200, {})
    assert sim.people()["a@example.com"]["fields"]["str::first"] == "A"


def test_tags_are_added_and_unset_tags_removed(sim, api):
    api.merge(person("a@example.com", tags=["Gold", "Lapsed"]))
    api.merge(person("a@example.com", tags=["VIP"], unset_tags=["Lapsed", "Never had it"]))
    assert sim.people()["a@example.com"]["tags"] == ["Gold", "VIP"]


@pytest.mark.parametrize("doc, fragment", [
    (person("a@example.com", tags=["x"], unset_tags=["x"]), "'x' is in both"),
    (person("a@example.com", tags=[""]), "people[1].tags"),
    (person("a@example.com", unset_tags=["t" * 256]), "people[1].unset_tags"),
    (person("a@example.com", tags="Gold"), "people[1].tags"),
    ({"fields": {"str::email": "a@example.com"}, "tag": ["x"]}, "unknown key(s) tag"),
])
def test_bad_tags_refuse_the_whole_request(sim, api, doc, fragment):
    assert_error(api.merge(person("ok@example.com"), doc), 400, "bad-request", fragment)
    assert sim.people() == {}


# --- field validation -----------------------------------------------------------------------------------------
CUSTOM = {"str:cm:tier": "text", "txt:cm:notes": "large_text", "int:cm:points": "integer", "bol:cm:vip": "boolean",
          "dtz:cm:joined": "date", "phn:cm:work": "phone", "geo:cm:home": "geo"}
DATE = {"year": 2024, "month": 2, "day": 29, "timezone": "UTC"}
PHONE = {"phone": "+61401234567", "parse_with_country_code": True}


@pytest.fixture
def custom_api(api):
    for field_id, kind in CUSTOM.items():
        assert api.create_field(field_id.split(":")[-1], kind).json()["field"]["id"] == field_id
    return api


@pytest.mark.parametrize("field_id, value", [
    ("str::first", "x" * 255), ("str:cm:tier", ""), ("txt:cm:notes", "x" * 4000), ("int:cm:points", 2**63 - 1),
    ("int:cm:points", -(2**63)), ("bol:cm:vip", False), ("dtz:cm:joined", DATE),
    ("dtz:cm:joined", {**DATE, "hour": 23, "minute": 59, "second": 0}), ("phn::phone", PHONE),
    ("phn:cm:work", {**PHONE, "parse_with_country_code": False}), ("geo::city", {"name": "Melbourne"}),
    ("geo:cm:home", {"name": "Home"}), ("str::ei", None), ("int:cm:points", None),
])
def test_valid_values_are_stored(sim, custom_api, field_id, value):
    assert custom_api.statuses(person("a@example.com", **{field_id: value})) == ["created"]
    fields = sim.people()["a@example.com"]["fields"]
    assert fields.get(field_id) == value


@pytest.mark.parametrize("field_id, value", [
    ("str::first", "x" * 256), ("str:cm:tier", 5), ("txt:cm:notes", "x" * 4001), ("int:cm:points", 2**63),
    ("int:cm:points", -(2**63) - 1), ("int:cm:points", 1.0), ("int:cm:points", True), ("int:cm:points", "1"),
    ("bol:cm:vip", 1), ("bol:cm:vip", "true"), ("dtz:cm:joined", {**DATE, "day": 30}),
    ("dtz:cm:joined", {**DATE, "hour": 24}), ("dtz:cm:joined", {**DATE, "month": 2.0}),
    ("dtz:cm:joined", {"year": 2024, "month": 1, "day": 1}), ("dtz:cm:joined", "2024-01-01"),
    ("dtz:cm:joined", {**DATE, "weekday": 1}), ("phn::phone", "+61401234567"), ("phn::phone", {"phone": "+61"}),
    ("phn:cm:work", {**PHONE, "parse_with_country_code": "yes"}), ("geo::city", "Melbourne"),
    ("geo:cm:home", {"name": 3}), ("str::email", None), ("str::email", "not an email"),
])
def test_invalid_values_refuse_the_request_naming_person_and_field(sim, custom_api, field_id, value):
    doc = person("a@example.com", **{field_id: value})
    response = custom_api.merge(person("first@example.com"), doc)
    assert_error(response, 400, "bad-request", f"people[1]: field {field_id} must be")
    assert sim.people() == {}


def test_unknown_custom_field_is_refused_until_created(sim, api):
    doc = person("a@example.com", **{"str:cm:loyalty-tier": "Gold"})
    assert_error(api.merge(doc), 400, "bad-request", "people[0]: unknown field str:cm:loyalty-tier")
    assert_error(api.merge(person("a@example.com", str__nickname="x")), 400, "bad-request", "str::nickname")
    assert api.create_field("Loyalty Tier", "text").status_code == 200
    assert api.statuses(doc) == ["created"]


@pytest.mark.parametrize("options, fragment", [
    ({"merge_by": ["str::ei"]}, "merge_by"), ({"merge_strategy": 4}, "merge_strategy"),
    ({"async": "no"}, "async"), ({"suppression_list_field_id": "str::ei"}, "suppression_list_field_id"),
    ({"batch": 1}, "Unknown key(s) batch"),
])
def test_bad_merge_options_are_400(sim, api, options, fragment):
    assert_error(api.merge(person("a@example.com"), **options), 400, "bad-request", fragment)
    assert sim.people() == {}


def test_people_count_must_be_1_to_100(sim, api):
    assert_error(api.merge(), 400, "bad-request", "people")
    many = [person(f"p{i}@example.com") for i in range(101)]
    assert_error(api.merge(*many), 400, "bad-request", "people")
    assert api.statuses(*many[:100]) == ["created"] * 100


# --- custom fields --------------------------------------------------------------------------------------------
def test_custom_field_create_get_and_409(sim, api):
    created = api.create_field("  Loyalty Tier (2024)! ", "decimal")
    assert created.json() == {"field": {"id": "int:cm:loyalty-tier-2024", "name": "  Loyalty Tier (2024)! ",
                                        "display_type": "decimal"}}
    assert_error(api.create_field("loyalty tier 2024", "integer"), 409, "field-exists")
    assert api.create_field("loyalty tier 2024", "text").json()["field"]["id"] == "str:cm:loyalty-tier-2024"
    assert_error(api.create_field("!!!", "text"), 400, "bad-request")
    assert_error(api.create_field("Tier", "money"), 400, "bad-request")
    listed = api("/person/custom-field/get", {}).json()["fields"]
    assert [f["field"]["id"] for f in listed] == ["int:cm:loyalty-tier-2024", "str:cm:loyalty-tier-2024"]
    assert api("/person/custom-field/get").json()["fields"] == listed  # an empty body is allowed too
    assert sim.custom_fields()["int:cm:loyalty-tier-2024"] == {"name": "  Loyalty Tier (2024)! ",
                                                               "display_type": "decimal"}


def test_at_most_100_custom_fields(sim, api):
    for i in range(100):
        assert api.create_field(f"f{i}", "text").status_code == 200
    assert_error(api.create_field("one more", "text"), 400, "bad-request", "100")
    assert len(sim.custom_fields()) == 100


# --- reading back ---------------------------------------------------------------------------------------------
def test_person_get_pages_in_creation_order_with_only_the_asked_fields(sim, api):
    api.merge(*(person(f"p{i}@example.com", str__first=f"F{i}") for i in range(5)))
    api.merge(person("p0@example.com", str__last="L"))
    first = api("/person/get", {"limit": 2, "offset": 0, "fields": ["str::email", "str::last"],
                                "filter": {"anything": True}}).json()
    assert first["has_more"] is True and first["next_offset"] == 2
    assert [c["fields"] for c in first["contacts"]] == [{"str::email": "p0@example.com", "str::last": "L"},
                                                        {"str::email": "p1@example.com"}]
    assert first["contacts"][0]["id"] == sim.people()["p0@example.com"]["id"]
    last = api("/person/get", {"limit": 2, "offset": 4, "fields": ["str::first"]}).json()
    assert last == {"contacts": [{"id": sim.people()["p4@example.com"]["id"], "fields": {"str::first": "F4"}}],
                    "has_more": False, "next_offset": 5}
    assert_error(api("/person/get", {"limit": 501, "fields": []}), 400, "bad-request", "limit")
    assert_error(api("/person/get", {"fields": ["str:cm:nope"]}), 400, "bad-request", "str:cm:nope")


# --- rate limit, bursts and the ban ---------------------------------------------------------------------------
def test_throttled_request_gets_the_ortto_429_body_and_is_not_applied(sim, api):
    sim.rate, sim.try_in_seconds = 2, 7
    assert api.merge(person("a@example.com")).status_code == 200
    assert api.merge(person("b@example.com")).status_code == 200
    throttled = api.merge(person("c@example.com"))
    assert throttled.status_code == 429 and "Retry-After" not in throttled.headers
    assert throttled.json() == {"error": {"code": "rate-limit", "message": "rate limit", "try-in-seconds": 7}}
    assert set(sim.people()) == {"a@example.com", "b@example.com"}


def test_bursts_answer_the_same_429_body(sim, api):
    sim.faults = Faults(burst_rate=1.0, burst_length=2)
    responses = [api.merge(person("a@example.com")) for _ in range(2)]
    assert [r.status_code for r in responses] == [429, 429]
    assert responses[0].json()["error"] == {"code": "rate-limit", "message": "rate limit", "try-in-seconds": 1}
    assert [r["fault"] for r in sim.request_log()] == ["burst", "burst"]


def test_bad_requests_ban_the_client_then_the_ban_ends(sim, api):
    sim.BAN_AFTER, sim.BAN_WINDOW, sim.BAN_SECONDS = 3, 5.0, 0.5
    for _ in range(2):
        assert api.merge(person("not an email")).status_code == 400
    assert api.merge(person("a@example.com")).status_code == 200  # a good request does not reset the count
    assert sim.state()["bans"] == 0
    assert api("/person/merge", data=b"{").status_code == 400  # bad JSON counts too: the third 400
    banned = api.merge(person("b@example.com"))
    assert_error(banned, 403, "ip-banned")
    assert_error(Api(sim.base_url, key="wrong")("/nowhere"), 403, "ip-banned")  # before routing and auth
    assert set(sim.people()) == {"a@example.com"} and sim.state()["bans"] == 1
    time.sleep(0.6)
    assert api.merge(person("b@example.com")).status_code == 200


def test_old_bad_requests_fall_out_of_the_ban_window(sim, api):
    sim.BAN_AFTER, sim.BAN_WINDOW = 2, 0.3
    assert api.merge(person("bad")).status_code == 400
    time.sleep(0.4)
    assert api.merge(person("bad")).status_code == 400
    assert api.merge(person("a@example.com")).status_code == 200 and sim.state()["bans"] == 0


# --- account limits, suppression and consent --------------------------------------------------------------------
def test_contact_limit_answers_507_and_applies_nothing(sim, api):
    sim.contact_limit = 2
    api.merge(person("a@example.com"))
    refused = api.merge(person("a@example.com", str__first="A"), person("b@example.com"), person("c@example.com"))
    assert_error(refused, 507, "contact-limit")
    assert sim.people()["a@example.com"]["fields"].get("str::first") is None and len(sim.people()) == 1
    assert api.statuses(person("a@example.com"), person("b@example.com"), person("B@example.com")) == [
        "merged", "created", "merged"]
    assert api.statuses(person("a@example.com", str__first="A")) == ["merged"]  # at the limit, merges still work


def test_suppressed_emails_are_not_created_when_asked(sim, api):
    sim.suppressed = frozenset({"s@example.com", "old@example.com"})
    api.merge(person("old@example.com"))  # created: no suppression_list_field_id
    response = api.merge(person("S@example.com"), person("old@example.com", str__first="O"),
                         suppression_list_field_id="str::email")
    assert response.json()["people"][0] == {"status": "suppressed", "error": "Email is suppressed"}
    assert response.json()["people"][1]["status"] == "merged"
    assert set(sim.people()) == {"old@example.com"}


def test_consent_fields_are_applied_and_counted(sim, api):
    api.merge(person("a@example.com"), person("b@example.com"))
    assert sim.state()["consent_writes"] == 0
    assert sim.people()["a@example.com"]["fields"]["bol::p"] is True
    api.merge(person("a@example.com", bol__p=False, bol__sp=True), person("b@example.com", str__first="B"))
    assert sim.state()["consent_writes"] == 1
    assert sim.people()["a@example.com"]["fields"]["bol::p"] is False


def test_admin_config_validates_and_applies(sim):
    origin = sim.base_url.removesuffix("/v1")
    for bad in ({"contact_limit": -1}, {"try_in_seconds": True}, {"suppressed": "a@example.com"}, {"seed": 1}):
        assert requests.post(origin + "/_sim/config", json=bad, timeout=5).status_code == 400, bad
    good = {"try_in_seconds": 2.5, "contact_limit": None, "suppressed": ["A@example.com"], "rate": 4}
    assert requests.post(origin + "/_sim/config", json=good, timeout=5).status_code == 200
    assert (sim.try_in_seconds, sim.contact_limit, sim.suppressed, sim.rate) == (
        2.5, None, frozenset({"a@example.com"}), 4)
    state = requests.get(origin + "/_sim/state", timeout=5).json()
    assert state == {"people": {}, "custom_fields": {}, "bans": 0, "consent_writes": 0, "subscribe_calls": 0}


# --- as a process -----------------------------------------------------------------------------------------------
def test_process_wrapper_starts_answers_and_is_configurable():
    sim = OrttoSimProcess(KEY, rate=0).start()
    try:
        api = Api(sim.base_url)
        assert api.statuses(person("a@example.com")) == ["created"]
        assert list(sim.people()) == ["a@example.com"] and sim.custom_fields() == {}
        sim.configure(try_in_seconds=3, suppressed=["X@example.com"])
        assert api.statuses(person("x@example.com"), suppression_list_field_id="str::email") == ["suppressed"]
        sim.set_rate(1)
        assert api.merge(person("a@example.com")).status_code == 200
        assert api.merge(person("a@example.com")).json()["error"]["try-in-seconds"] == 3
        assert [r["status"] for r in sim.request_log()] == [200, 200, 200, 429]
        assert sim.state()["bans"] == 0
    finally:
        sim.stop()
