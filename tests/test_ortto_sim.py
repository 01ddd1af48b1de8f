"""The Ortto simulator keeps the contract in docs/api-contracts.md: real HTTP on loopback, in process. Where Ortto's
answer was recorded (tests/fixtures/ortto_recorded.json holds those answers verbatim), the simulator's answer in
the same situation has its shape."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
import requests

from tools.ortto_sim import PLANS, OrttoSim, OrttoSimProcess
from tools.sim_base import Faults

pytestmark = pytest.mark.serial  # the rate windows are timed

KEY = "ortto-test-key"
RECORDED = json.loads((Path(__file__).parent / "fixtures" / "ortto_recorded.json").read_text())


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

    def merge(self, *people: object, **options: object) -> requests.Response:
        body = {"people": list(people), "merge_by": ["str::email"], "merge_strategy": 2, "find_strategy": 0,
                "async": False, **options}
        return self("/person/merge", body)

    def results(self, *people: object, **options: object) -> list[dict]:
        response = self.merge(*people, **options)
        assert response.status_code == 200, response.text
        return response.json()["people"]

    def statuses(self, *people: object, **options: object) -> list[str]:
        return [p["status"] for p in self.results(*people, **options)]

    def create_field(self, name: str, kind: str, **extra: object) -> requests.Response:
        return self("/person/custom-field/create", {"name": name, "type": kind, **extra})


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


def assert_error(response: requests.Response, status: int, *fragments: str) -> dict:
    """An error in the recorded shape: request_id (a uuid), code (the status, a number) and error; no details."""
    body = response.json()
    assert response.status_code == status and list(body) == ["request_id", "code", "error"], response.text
    assert type(body["code"]) is int and body["code"] == status
    uuid.UUID(body["request_id"])
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body


def assert_shape(actual: object, recorded: object, where: str = "body") -> None:
    """`actual` is shaped like `recorded`: the same keys, value types and nesting; each element of a list is shaped
    like the recorded element at its place (or the last one)."""
    assert type(actual) is type(recorded), f"{where}: {type(actual).__name__}, recorded {type(recorded).__name__}"
    if isinstance(recorded, dict):
        assert list(actual) == list(recorded) or set(actual) == set(recorded), f"{where}: keys {list(actual)}"
        for key, value in recorded.items():
            assert_shape(actual[key], value, f"{where}.{key}")
    elif isinstance(recorded, list) and recorded:
        assert actual, f"{where}: empty where the recording has entries"
        for index, item in enumerate(actual):
            assert_shape(item, recorded[min(index, len(recorded) - 1)], f"{where}[{index}]")


def test_the_shape_check_itself_catches_differences():
    assert_shape({"a": [{"b": 1}, {"b": 2}]}, {"a": [{"b": 0}]})
    for actual, recorded in [({"code": "400"}, {"code": 400}), ({"a": 1, "b": 2}, {"a": 1}), ({"a": True}, {"a": 1}),
                             ({"a": []}, {"a": [1]}), ({"a": [{"b": 1, "c": 2}]}, {"a": [{"b": 1}]})]:
        with pytest.raises(AssertionError):
            assert_shape(actual, recorded)


def test_the_fixture_file_holds_every_recorded_answer():
    assert set(RECORDED) == {"merge_ok", "merge_all_suppressed", "merge_invalid_detail", "field_create",
                             "field_get", "rate_limited"}
    assert all(type(r["status"]) is int and isinstance(r["body"], dict) for r in RECORDED.values())


# --- transport ----------------------------------------------------------------------------------------------
def test_key_routing_and_method_errors_have_numeric_codes(sim, api):
    assert_error(Api(sim.base_url, key=None)("/person/custom-field/get", {}), 401, "X-Api-Key")
    assert_error(Api(sim.base_url, key="wrong")("/person/custom-field/get", {}), 401, "not valid")
    assert_error(api("/person/nothing", {}), 404, "/v1/person/nothing")
    wrong = api("/person/merge", method="GET")
    assert_error(wrong, 405)
    assert wrong.headers["Allow"] == "POST"
    assert_error(api("/audience/subscribe", {}), 405)
    assert_error(api("/person/merge", data=b"{"), 400, "not valid JSON")


def test_subscribe_applies_nothing_but_is_counted(sim, api):
    response = api("/audience/subscribe", {"audience_id": "a", "people": []}, method="PUT")
    assert (response.status_code, response.json()) == (200, {})
    assert sim.state()["subscribe_calls"] == 1 and sim.people() == {}


def test_payload_over_two_megabytes_is_413(sim, api):
    big = person("a@example.com", str__first="x" * 2_000_000)
    assert_error(api.merge(big), 413, "2 MB")
    assert sim.people() == {}


def test_fail_fault_answers_500_and_applies_nothing(sim, api):
    sim.faults = Faults(fail_rate=1.0)
    assert_error(api.merge(person("a@example.com")), 500)
    assert sim.people() == {} and sim.request_log()[-1]["fault"] == "fail"


# --- merge --------------------------------------------------------------------------------------------------
def test_merge_creates_then_merges_by_email_case_insensitively(sim, api):
    first = api.results(person("Chris@Example.com", str__first="Chris"))[0]
    assert first["status"] == "created" and re.fullmatch(r"[0-9a-f]{24}", first["person_id"])
    second = api.results(person("chris@example.COM", str__last="Lee"))[0]
    assert second == {"status": "merged", "person_id": first["person_id"]}
    stored = sim.people()
    assert list(stored) == ["chris@example.com"]
    assert stored["chris@example.com"]["fields"] == {
        "str::email": "chris@example.COM", "str::first": "Chris", "str::last": "Lee", "bol::p": True,
        "bol::sp": False}


def test_a_created_and_a_merged_person_answer_in_the_recorded_shape(sim, api):
    api.merge(person("old@example.com"))
    response = api.merge(person("new@example.com"), person("old@example.com"))
    assert response.status_code == RECORDED["merge_ok"]["status"]
    assert_shape(response.json(), RECORDED["merge_ok"]["body"])
    assert [p["status"] for p in response.json()["people"]] == ["created", "merged"]


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
    results = api.results(person("a@example.com", str__first="Y", tags=["t"]), person("b@example.com"),
                          merge_strategy=3)
    assert [r["status"] for r in results] == ["ignored", "created"]
    after = sim.people()["a@example.com"]
    assert results[0]["person_id"] == after["id"]
    assert (after["fields"]["str::first"], after["fields"]["str::email"], after["tags"]) == ("A", "A@Example.com", [])


def test_skip_non_existing_updates_existing_people_only(sim, api):
    api.merge(person("a@example.com"))
    results = api.results(person("a@example.com", str__first="A"), person("new@example.com"), skip_non_existing=True)
    assert [r["status"] for r in results] == ["merged", "ignored"] and "person_id" not in results[1]
    assert api.statuses(person("other@example.com"), skip_non_existing=True) == ["ignored"]  # valid: no 400
    assert set(sim.people()) == {"a@example.com"}


def test_async_merge_applies_and_answers_an_empty_object(sim, api):
    response = api.merge(person("a@example.com", str__first="A"), person("bad"), **{"async": True})
    assert (response.status_code, response.json()) == (200, {})
    assert set(sim.people()) == {"a@example.com"}
    assert sim.people()["a@example.com"]["fields"]["str::first"] == "A"
    refused = api.merge(person("bad"), **{"async": True}).json()  # validated at once: no valid person is a 400
    assert refused["code"] == 400 and refused["details"][0]["status"] == "invalid"


def test_tags_are_added_and_unset_tags_removed(sim, api):
    api.merge(person("a@example.com", tags=["Gold", "Lapsed"]))
    api.merge(person("a@example.com", tags=["VIP"], unset_tags=["Lapsed", "Never had it"]))
    assert sim.people()["a@example.com"]["tags"] == ["Gold", "VIP"]


@pytest.mark.parametrize("doc, error", [
    (person("a@example.com", tags=["x"], unset_tags=["x"]), "failed to validate tags in schema: tag 'x' is in both"),
    (person("a@example.com", tags=[""]), "failed to validate tags in schema: tags must be"),
    (person("a@example.com", unset_tags=["t" * 256]), "failed to validate tags in schema: unset_tags must be"),
    (person("a@example.com", tags="Gold"), "failed to validate tags in schema: tags must be"),
    ({"fields": {"str::email": "a@example.com"}, "tag": ["x"]},
     "failed to validate person in schema: unknown key(s) tag"),
    ({"fields": ["str::email"]}, "failed to validate person in schema: expected an object with a fields object"),
    ("a@example.com", "failed to validate person in schema: expected an object with a fields object"),
    ({"fields": {}}, "failed to validate field str::email in schema: expected an email address"),
])
def test_a_person_with_bad_tags_or_shape_is_invalid_alone(sim, api, doc, error):
    results = api.results(person("ok@example.com", tags=["x"]), doc)
    assert results[0]["status"] == "created"
    assert results[1]["status"] == "invalid" and results[1]["error"].startswith(error), results[1]
    assert set(results[1]) == {"status", "error"}
    assert set(sim.people()) == {"ok@example.com"}


# --- field validation -----------------------------------------------------------------------------------------
CUSTOM = {"str:cm:tier": "text", "txt:cm:notes": "large_text", "int:cm:points": "integer", "bol:cm:vip": "bool",
          "dtz:cm:joined": "date", "phn:cm:work": "phone", "int:cm:spend": "decimal"}
DATE = {"year": 2024, "month": 2, "day": 29, "timezone": "UTC"}
PHONE = {"phone": "+61401234567", "parse_with_country_code": True}


@pytest.fixture
def custom_api(api):
    for field_id, kind in CUSTOM.items():
        assert api.create_field(field_id.split(":")[-1], kind).json()["field_id"] == field_id
    return api


@pytest.mark.parametrize("field_id, value", [
    ("str::first", "x" * 255), ("str:cm:tier", ""), ("txt:cm:notes", "x" * 4000), ("int:cm:points", 2**63 - 1),
    ("int:cm:points", -(2**63)), ("int:cm:spend", 12_345), ("bol:cm:vip", False), ("dtz:cm:joined", DATE),
    ("phn::phone", PHONE), ("phn::phone", {**PHONE, "phone": "61401234567"}),
    ("phn:cm:work", {**PHONE, "phone": "12345678"}), ("phn:cm:work", {**PHONE, "phone": "+123456789012345"}),
    ("geo::city", {"name": "Melbourne"}), ("str::ei", None), ("int:cm:points", None),
])
def test_valid_values_are_stored(sim, custom_api, field_id, value):
    assert custom_api.statuses(person("a@example.com", **{field_id: value})) == ["created"]
    fields = sim.people()["a@example.com"]["fields"]
    assert fields.get(field_id) == value


@pytest.mark.parametrize("field_id, value, why", [
    ("str::first", "x" * 256, "expected a string of at most 255"), ("str:cm:tier", 5, "expected a string"),
    ("txt:cm:notes", "x" * 4001, "expected a string of at most 4,000"), ("int:cm:points", 2**63, "int64"),
    ("int:cm:points", -(2**63) - 1, "int64"), ("int:cm:points", 1.0, "int64"), ("int:cm:points", True, "int64"),
    ("int:cm:spend", "1", "int64"), ("bol:cm:vip", 1, "true or false"), ("bol:cm:vip", "true", "true or false"),
    ("dtz:cm:joined", {**DATE, "day": 30}, "do not form a date"),
    ("dtz:cm:joined", {**DATE, "month": 2.0}, "must be integers"),
    ("dtz:cm:joined", {**DATE, "timezone": ""}, "timezone"),
    ("dtz:cm:joined", {**DATE, "hour": 23}, "no time of day"),
    ("dtz:cm:joined", {**DATE, "minute": 0}, "no time of day"),
    ("dtz:cm:joined", {**DATE, "second": 0}, "no time of day"),
    ("dtz:cm:joined", {"year": 2024, "month": 1, "day": 1}, "no time of day"),
    ("dtz:cm:joined", "2024-01-01", "no time of day"),
    ("phn::phone", "+61401234567", "expected {"), ("phn::phone", {"phone": "+61401234567"}, "expected {"),
    ("phn:cm:work", {**PHONE, "parse_with_country_code": "yes"}, "expected {"),
    ("phn:cm:work", {**PHONE, "extension": "1"}, "expected {"),
    ("phn::phone", {**PHONE, "parse_with_country_code": False}, "parse_with_country_code false is not supported"),
    ("geo::city", "Melbourne", 'expected an object {"name": string}'), ("geo::city", {"name": 3}, "expected an"),
    ("str::email", None, "expected an email address"), ("str::email", "not an email", "expected an email address"),
    ("str::email", "a@" + "x" * 254, "expected an email address"),
])
def test_invalid_values_make_only_that_person_invalid_naming_the_field(sim, custom_api, field_id, value, why):
    results = custom_api.results(person("first@example.com"), person("a@example.com", **{field_id: value}))
    assert results[0]["status"] == "created"
    entry = results[1]
    assert entry["status"] == "invalid" and "person_id" not in entry
    assert entry["error"].startswith(f"failed to validate field {field_id} in schema: ") and why in entry["error"]
    assert_shape(entry, RECORDED["merge_invalid_detail"]["body"])
    assert set(sim.people()) == {"first@example.com"}


@pytest.mark.parametrize("phone", ["0401234567", "+0401234567", "+61 401 234 567", "+61-401-234-567", "1234567",
                                   "1234567890123456", "+", "", "++61401234567", "61401234567x", "٦١٤٠١٢٣٤٥٦٧"])
def test_a_phone_not_in_international_form_is_invalid(sim, api, phone):
    response = api.merge(person("a@example.com", phn__phone={"phone": phone, "parse_with_country_code": True}))
    assert response.json()["details"] == [{"status": "invalid", "error": "failed to validate field phn::phone in "
                                                                         "schema: not a number in international form"}]
    assert sim.people() == {}


def test_unknown_custom_field_is_refused_until_created(sim, api):
    doc = person("a@example.com", **{"str:cm:loyalty-tier": "Gold"})
    refused = api.merge(doc)
    error = "failed to validate field str:cm:loyalty-tier in schema: Object not found"
    assert refused.status_code == 400 and refused.json()["error"] == f"No valid contacts provided ({error})"
    assert refused.json()["details"] == [{"status": "invalid", "error": error}]
    assert api.create_field("Loyalty Tier", "text").status_code == 200
    assert api.statuses(doc) == ["created"]


def test_an_unknown_field_alone_answers_the_recorded_400(sim, api):
    response = api.merge(person("a@example.com", **{"str::x": "y"}))
    assert response.status_code == RECORDED["merge_all_suppressed"]["status"]
    body = response.json()
    assert_shape(body, RECORDED["merge_all_suppressed"]["body"])
    assert_shape(body["details"][0], RECORDED["merge_invalid_detail"]["body"])
    recorded_prefix = RECORDED["merge_invalid_detail"]["body"]["error"].removesuffix("...")
    assert body["details"][0]["error"] == recorded_prefix + "Object not found"
    uuid.UUID(body["request_id"])
    assert sim.people() == {}


@pytest.mark.parametrize("options, fragment", [
    ({"merge_by": ["str::ei"]}, "merge_by"), ({"merge_strategy": 4}, "merge_strategy"),
    ({"find_strategy": "0"}, "find_strategy"), ({"async": "no"}, "async"),
    ({"skip_non_existing": 1}, "skip_non_existing"),
    ({"suppression_list_field_id": "str::ei"}, "suppression_list_field_id"), ({"batch": 1}, "Unknown key(s) batch"),
])
def test_bad_merge_options_are_a_plain_400(sim, api, options, fragment):
    assert_error(api.merge(person("a@example.com"), **options), 400, fragment)  # no details
    assert sim.people() == {}


def test_people_must_be_a_list_of_1_to_100_and_the_body_an_object(sim, api):
    assert_error(api.merge(), 400, "people")
    many = [person(f"p{i}@example.com") for i in range(101)]
    assert_error(api.merge(*many), 400, "people")
    assert_error(api("/person/merge", {"people": many[0], "merge_by": ["str::email"]}), 400, "people")
    assert_error(api("/person/merge", [many[0]]), 400, "JSON object")
    assert sim.people() == {}
    assert api.statuses(*many[:100]) == ["created"] * 100


# --- one by one: mixed calls, suppression, no valid person ------------------------------------------------------
def test_a_mixed_call_applies_only_the_valid_people_and_answers_each_in_order(sim, api):
    api.create_field("Points", "integer")
    api.create_field("Joined", "date")
    api.merge(person("old@example.com", str__first="Before"))  # exists before it is suppressed
    sim.suppressed = frozenset({"old@example.com", "new-s@example.com"})
    invalid = {
        2: (person("nofield@example.com", **{"str:cm:nope": "x"}), "field str:cm:nope in schema: Object not found"),
        3: (person("not an email"), "field str::email in schema: expected an email address"),
        4: (person("points@example.com", **{"int:cm:points": "12"}), "field int:cm:points in schema: expected a JSON"),
        5: (person("clock@example.com", **{"dtz:cm:joined": {**DATE, "hour": 9}}), "field dtz:cm:joined in schema"),
        6: (person("local@example.com", bol__p=False, phn__phone={**PHONE, "phone": "0401234567"}),
            "field phn::phone in schema: not a number in international form"),
        7: ("nobody", "person in schema: expected an object"),
        8: (person("both@example.com", tags=["t"], unset_tags=["t"]), "tags in schema: tag 't' is in both"),
    }
    people = [person("OLD@example.com", str__first="Old"), person("new-s@example.com"),
              *(doc for doc, _ in invalid.values()),
              *(person(f"p{i}@example.com", **{"int:cm:points": i}) for i in range(9, 100))]
    response = api.merge(*people, suppression_list_field_id="str::email")
    assert response.status_code == 200, response.text
    results = response.json()["people"]
    assert len(results) == 100
    assert results[0] == {"status": "merged", "person_id": sim.people()["old@example.com"]["id"]}
    assert results[1] == {"status": "suppressed", "error": "Email is suppressed"}
    for index, (_, error) in invalid.items():
        assert set(results[index]) == {"status", "error"} and results[index]["status"] == "invalid"
        assert results[index]["error"].startswith(f"failed to validate {error}"), results[index]
    assert [r["status"] for r in results[9:]] == ["created"] * 91
    for result in results:  # an accepted person's result as recorded in merge_ok, the others as a detail entry
        if "error" in result:
            assert_shape(result, RECORDED["merge_invalid_detail"]["body"])
        else:
            assert_shape({"people": [result]}, RECORDED["merge_ok"]["body"])
    stored = sim.people()
    assert set(stored) == {"old@example.com"} | {f"p{i}@example.com" for i in range(9, 100)}
    assert stored["old@example.com"]["fields"]["str::first"] == "Old"  # an existing suppressed person is merged
    assert stored["p42@example.com"]["fields"]["int:cm:points"] == 42
    assert [stored[f"p{i}@example.com"]["id"] for i in range(9, 100)] == [r["person_id"] for r in results[9:]]
    assert sim.state()["consent_writes"] == 0  # person 6 sent bol::p, but was not accepted
    assert sim.request_log()[-1]["n"] == 100


def test_an_all_suppressed_call_answers_the_recorded_400_and_applies_nothing(sim, api):
    sim.suppressed = frozenset({"s@example.com"})
    response = api.merge(person("S@example.com", str__first="S"), suppression_list_field_id="str::email")
    recorded = RECORDED["merge_all_suppressed"]
    assert response.status_code == recorded["status"]
    body = response.json()
    assert_shape(body, recorded["body"])
    assert (body["code"], body["error"], body["details"]) == (
        recorded["body"]["code"], recorded["body"]["error"], recorded["body"]["details"])
    assert list(body) == list(recorded["body"])  # request_id, code, error, details: the recorded order
    assert sim.people() == {} and sim.request_log()[-1] == {**sim.request_log()[-1], "n": 1, "status": 400}
    # Without suppression_list_field_id Ortto creates them.
    assert api.statuses(person("s@example.com")) == ["created"]


def test_with_no_valid_person_every_one_is_detailed_in_order_and_nothing_applied(sim, api):
    sim.suppressed = frozenset({"s@example.com"})
    api.merge(person("existing@example.com", str__first="E"))
    response = api.merge(person("existing@example.com", **{"str::x": 1}), person("s@example.com"),
                         person("also@example.com", str__first=7), suppression_list_field_id="str::email")
    body = response.json()
    first = "failed to validate field str::x in schema: Object not found"
    assert response.status_code == 400 and body["error"] == f"No valid contacts provided ({first})"
    assert [d["status"] for d in body["details"]] == ["invalid", "suppressed", "invalid"]
    assert body["details"][0]["error"] == first and body["details"][1]["error"] == "Email is suppressed"
    assert body["details"][2]["error"].startswith("failed to validate field str::first in schema: expected a string")
    assert all(set(d) == {"status", "error"} for d in body["details"])
    assert set(sim.people()) == {"existing@example.com"}
    assert sim.people()["existing@example.com"]["fields"]["str::first"] == "E"


# --- consent ----------------------------------------------------------------------------------------------------
def test_people_created_without_consent_fields_are_subscribed_to_email(sim, api):
    api.merge(person("a@example.com"), person("b@example.com", bol__p=None))  # null: no value, the default holds
    stored = sim.people()
    assert all((p["fields"]["bol::p"], p["fields"]["bol::sp"]) == (True, False) for p in stored.values())
    assert sim.state()["consent_writes"] == 1  # b sent bol::p, as null


def test_append_only_sets_a_new_persons_consent_and_leaves_an_existing_ones(sim, api):
    api.merge(person("old@example.com"))
    results = api.results(person("old@example.com", bol__p=False, str__first="O"),
                          person("new@example.com", bol__p=False, bol__sp=True), merge_strategy=1)
    assert [r["status"] for r in results] == ["merged", "created"]
    stored = sim.state()["people"]
    assert (stored["old@example.com"]["fields"]["bol::p"], stored["old@example.com"]["fields"]["str::first"]) == (
        True, "O")
    assert (stored["new@example.com"]["fields"]["bol::p"], stored["new@example.com"]["fields"]["bol::sp"]) == (
        False, True)
    assert sim.state()["consent_writes"] == 2


def test_overwrite_changes_an_existing_persons_consent_and_is_counted(sim, api):
    api.merge(person("a@example.com"), person("b@example.com"))
    assert sim.state()["consent_writes"] == 0
    api.merge(person("a@example.com", bol__p=False, bol__sp=True), person("b@example.com", str__first="B"))
    assert sim.state()["consent_writes"] == 1
    assert sim.people()["a@example.com"]["fields"]["bol::p"] is False


# --- custom fields --------------------------------------------------------------------------------------------
def test_custom_field_create_answers_the_recorded_flat_body(sim, api):
    recorded = RECORDED["field_create"]
    response = api.create_field("Loyalty tier", "text", track_changes=False)
    assert response.status_code == recorded["status"]
    assert response.json() == recorded["body"]  # the very situation recorded
    assert sim.custom_fields() == {"str:cm:loyalty-tier": {"name": "Loyalty tier", "display_type": "text",
                                                           "track_changes": False}}


def test_custom_field_get_answers_the_recorded_shape_with_tracked_value(sim, api):
    recorded = RECORDED["field_get"]
    assert api("/person/custom-field/get", {}).json() == {"fields": []}
    api.create_field("Job Title", "text", track_changes=True)
    api.create_field("  Loyalty Points (2024)! ", "decimal")
    response = api("/person/custom-field/get", {})
    assert response.status_code == recorded["status"]
    assert_shape(response.json(), recorded["body"])
    listed = response.json()["fields"]
    assert listed[0] == recorded["body"]["fields"][0]  # the very field recorded
    assert listed[1] == {"field": {"id": "int:cm:loyalty-points-2024", "name": "  Loyalty Points (2024)! ",
                                   "display_type": "decimal", "liquid_name": "people.custom.loyalty-points-2024"},
                         "tracked_value": False}
    assert api("/person/custom-field/get").json() == response.json()  # no body at all is fine too
    assert_error(api("/person/custom-field/get", {"limit": 10}), 400, "empty or {}")


@pytest.mark.parametrize("kind, prefix", [("text", "str"), ("large_text", "txt"), ("integer", "int"),
                                          ("decimal", "int"), ("date", "dtz"), ("bool", "bol"), ("phone", "phn")])
def test_each_documented_type_gives_its_prefix(sim, api, kind, prefix):
    assert api.create_field("In Segment", kind).json() == {"name": "In Segment", "field_id": f"{prefix}:cm:in-segment",
                                                           "display_type": kind}


@pytest.mark.parametrize("body, fragment", [
    ({"name": "Tier", "type": "boolean"}, 'type must be one of text, large_text, integer, decimal, date, bool, phone'),
    ({"name": "Tier", "type": "geo"}, "type must be one of"), ({"name": "Tier", "type": "money"}, "type must be"),
    ({"name": "Tier", "type": ["text"]}, "type must be"), ({"name": "Tier"}, "type must be"),
    ({"name": "Tier", "type": "single_select", "values": ["a", "b"]},
     "single_select is not supported by the simulator"),
    ({"name": "Tier", "type": "multi_select", "values": ["a"]}, "multi_select is not supported by the simulator"),
    ({"field": {"name": "Tier", "type": "text"}}, "Unknown key(s) field: the body is flat"),
    ({"name": "Tier", "type": "text", "values": ["a"]}, "Unknown key(s) values"),
    ({"name": "Tier", "type": "text", "track_changes": "no"}, "track_changes must be a boolean"),
    ({"name": "!!!", "type": "text"}, "name must be"), ({"name": "x" * 256, "type": "text"}, "name must be"),
    ({"name": 5, "type": "text"}, "name must be"), ({"type": "text"}, "name must be"),
    (["Tier", "text"], "JSON object"),
])
def test_a_bad_field_create_is_400_and_creates_nothing(sim, api, body, fragment):
    assert_error(api("/person/custom-field/create", body), 400, fragment)
    assert sim.custom_fields() == {}


def test_a_name_that_exists_in_any_type_is_refused_naming_the_field(sim, api):
    api.create_field("Loyalty Tier", "text")
    for name, kind in (("loyalty tier", "integer"), ("LOYALTY-TIER!", "text"), ("Loyalty  Tier", "bool")):
        assert_error(api.create_field(name, kind), 400, repr(name), "str:cm:loyalty-tier", "'Loyalty Tier'")
    assert sim.custom_fields() == {"str:cm:loyalty-tier": {"name": "Loyalty Tier", "display_type": "text",
                                                           "track_changes": False}}
    assert api.create_field("Loyalty Tier 2", "integer").json()["field_id"] == "int:cm:loyalty-tier-2"


def test_at_most_100_custom_fields(sim, api):
    for i in range(100):
        assert api.create_field(f"f{i}", "text").status_code == 200
    assert_error(api.create_field("one more", "text"), 400, "100", "'one more'")
    assert len(sim.custom_fields()) == 100


# --- reading back ---------------------------------------------------------------------------------------------
def test_person_get_pages_in_creation_order_with_only_the_asked_fields(sim, api):
    api.merge(*(person(f"p{i}@example.com", str__first=f"F{i}") for i in range(5)))
    api.merge(person("p0@example.com", str__last="L"))
    first = api("/person/get", {"limit": 2, "offset": 0, "fields": ["str::email", "str::last", "bol::p"],
                                "filter": {"anything": True}}).json()
    assert first["has_more"] is True and first["next_offset"] == 2
    assert [c["fields"] for c in first["contacts"]] == [
        {"str::email": "p0@example.com", "str::last": "L", "bol::p": True},
        {"str::email": "p1@example.com", "bol::p": True}]
    assert first["contacts"][0]["id"] == sim.people()["p0@example.com"]["id"]
    last = api("/person/get", {"limit": 2, "offset": 4, "fields": ["str::first"]}).json()
    assert last == {"contacts": [{"id": sim.people()["p4@example.com"]["id"], "fields": {"str::first": "F4"}}],
                    "has_more": False, "next_offset": 5}
    assert_error(api("/person/get", {"limit": 501, "fields": []}), 400, "limit")
    assert_error(api("/person/get", {"fields": ["str:cm:nope"]}), 400, "str:cm:nope")


# --- rate limit, bursts and the ban ---------------------------------------------------------------------------
def scaled_windows(sim: OrttoSim, factor: float) -> None:
    """Ortto's windows, `factor` times as long: the same requests per unit of rate in each."""
    sim.WINDOWS = tuple((seconds * factor, per_rate) for seconds, per_rate in OrttoSim.WINDOWS)


def test_the_windows_are_the_contracts():
    assert OrttoSim.WINDOWS == ((10.0, 20), (60.0, 60))
    assert PLANS == {"free": 1, "campaigns": 5, "professional": 10, "business": 30}


def test_throttled_request_gets_the_recorded_429_body_and_is_not_applied(sim, api):
    sim.rate, sim.try_in_seconds = 0.1, 7  # 2 per 10 s
    assert api.merge(person("a@example.com")).status_code == 200
    assert api.merge(person("b@example.com")).status_code == 200
    throttled = api.merge(person("c@example.com"))
    assert throttled.status_code == RECORDED["rate_limited"]["status"]
    assert "Retry-After" not in throttled.headers and not any(h.lower().startswith("x-rate") for h in throttled.headers)
    assert_shape(throttled.json(), RECORDED["rate_limited"]["body"])
    assert throttled.json() == {"error": {"code": "rate-limit", "message": "rate limit", "try-in-seconds": 7}}
    assert set(sim.people()) == {"a@example.com", "b@example.com"}


def test_at_rate_5_a_burst_of_100_is_accepted_and_the_101st_within_10_s_is_not(sim, api):
    sim.rate = 5  # Campaigns: 100 per 10 s; sim_base's one-second window would have refused the 6th
    started = time.monotonic()
    statuses = [api("/person/custom-field/get", {}).status_code for _ in range(100)]
    assert time.monotonic() - started < 10  # all inside one 10-s window (on loopback, well under a second)
    assert statuses == [200] * 100
    assert api("/person/custom-field/get", {}).status_code == 429
    assert [r["status"] for r in sim.request_log()].count(429) == 1


def test_the_10_s_and_60_s_windows_at_rate_1_and_throttled_requests_do_not_count(sim, api):
    """Free (rate 1): 20 per 10 s and 60 per 60 s, here with both windows 20 times shorter (0.5 s and 3 s)."""
    scaled_windows(sim, 1 / 20)
    sim.rate = 1
    short, long = (seconds for seconds, _ in sim.WINDOWS)

    def send(n: int) -> list[int]:
        return [api("/person/custom-field/get", {}).status_code for _ in range(n)]

    first = time.monotonic()
    assert send(21) == [200] * 20 + [429]
    last = time.monotonic()
    time.sleep(max(0.0, first + short - 0.15 - time.monotonic()))
    assert send(3) == [429] * 3  # still inside the first 20's 10-s window; these must not count
    time.sleep(max(0.0, last + short + 0.02 - time.monotonic()))
    assert send(21) == [200] * 20 + [429]  # the 10-s window is free again: 40 in the 60-s window
    time.sleep(short + 0.02)
    assert send(20) == [200] * 20  # 60 in the 60-s window
    time.sleep(short + 0.02)
    assert send(1) == [429]  # the 10-s window is empty: the 60-s one refuses
    assert time.monotonic() < first + long, "too slow to reach the 60-s window's limit inside it"
    time.sleep(max(0.0, last + long + 0.02 - time.monotonic()))
    assert send(21) == [200] * 20 + [429]  # the first 20 left the 60-s window


def test_a_plan_sets_the_sustained_rate(sim):
    assert OrttoSim(KEY, plan="campaigns").rate == 5
    assert OrttoSim(KEY, rate=3, plan="business").rate == 30  # the plan wins
    with pytest.raises(ValueError, match="plan must be one of"):
        OrttoSim(KEY, plan="enterprise")
    origin = sim.base_url.removesuffix("/v1")
    assert requests.post(origin + "/_sim/config", json={"plan": "free"}, timeout=5).json()["rate"] == 1
    assert requests.post(origin + "/_sim/config", json={"plan": "free", "rate": 7}, timeout=5).json()["rate"] == 1
    for bad in ("Free", None, ["free"]):
        refused = requests.post(origin + "/_sim/config", json={"plan": bad}, timeout=5)
        assert refused.status_code == 400 and "plan must be one of" in refused.json()["error"]
    assert sim.rate == 1


def test_bursts_answer_the_same_429_body(sim, api):
    sim.faults = Faults(burst_rate=1.0, burst_length=2)
    responses = [api.merge(person("a@example.com")) for _ in range(2)]
    assert [r.status_code for r in responses] == [429, 429]
    assert responses[0].json()["error"] == {"code": "rate-limit", "message": "rate limit", "try-in-seconds": 1}
    assert [r["fault"] for r in sim.request_log()] == ["burst", "burst"]
    assert sim.people() == {}


def test_bad_requests_ban_the_client_then_the_ban_ends(sim, api):
    sim.BAN_AFTER, sim.BAN_WINDOW, sim.BAN_SECONDS = 3, 5.0, 0.5
    for _ in range(2):  # a merge with no valid person is a 400 and counts
        assert api.merge(person("not an email")).status_code == 400
    assert api.merge(person("a@example.com")).status_code == 200  # a good request does not reset the count
    assert sim.state()["bans"] == 0
    assert api("/person/merge", data=b"{").status_code == 400  # bad JSON counts too: the third 400
    banned = api.merge(person("b@example.com"))
    assert_error(banned, 403, "banned")
    assert_error(Api(sim.base_url, key="wrong")("/nowhere"), 403, "banned")  # before routing and auth
    assert set(sim.people()) == {"a@example.com"} and sim.state()["bans"] == 1
    time.sleep(0.6)
    assert api.merge(person("b@example.com")).status_code == 200


def test_old_bad_requests_fall_out_of_the_ban_window(sim, api):
    sim.BAN_AFTER, sim.BAN_WINDOW = 2, 0.3
    assert api.merge(person("bad")).status_code == 400
    time.sleep(0.4)
    assert api.merge(person("bad")).status_code == 400
    assert api.merge(person("a@example.com")).status_code == 200 and sim.state()["bans"] == 0


def test_a_person_in_a_partly_valid_merge_does_not_count_toward_the_ban(sim, api):
    sim.BAN_AFTER = 2
    for _ in range(3):
        assert api.merge(person("a@example.com"), person("bad")).status_code == 200
    assert sim.state()["bans"] == 0


# --- admin --------------------------------------------------------------------------------------------------------
def test_admin_config_validates_and_applies(sim):
    origin = sim.base_url.removesuffix("/v1")
    for bad in ({"contact_limit": None}, {"try_in_seconds": True}, {"suppressed": "a@example.com"}, {"seed": 1}):
        refused = requests.post(origin + "/_sim/config", json=bad, timeout=5)
        assert refused.status_code == 400 and type(refused.json()["code"]) is int, bad
    good = {"try_in_seconds": 2.5, "suppressed": ["A@example.com"], "rate": 4}
    assert requests.post(origin + "/_sim/config", json=good, timeout=5).status_code == 200
    assert (sim.try_in_seconds, sim.suppressed, sim.rate) == (2.5, frozenset({"a@example.com"}), 4)
    assert not hasattr(sim, "contact_limit")
    state = requests.get(origin + "/_sim/state", timeout=5).json()
    assert state == {"people": {}, "custom_fields": {}, "bans": 0, "consent_writes": 0, "subscribe_calls": 0}


def test_latency_holds_every_answer_and_is_validated_with_the_numeric_code(sim, api):
    origin = sim.base_url.removesuffix("/v1")
    for bad in ({"latency": -1}, {"jitter": "0.1"}):
        refused = requests.post(origin + "/_sim/config", json=bad, timeout=5)
        assert refused.status_code == 400 and refused.json()["code"] == 400, bad
        assert "non-negative number of seconds" in refused.json()["error"]
    assert requests.post(origin + "/_sim/config", json={"latency": 0.2, "rate": 0.05}, timeout=5).status_code == 200
    started = time.monotonic()
    assert api.statuses(person("a@example.com")) == ["created"]
    assert api.merge(person("a@example.com")).status_code == 429  # rate 0.05: one request per 10 s window
    assert time.monotonic() - started >= 0.4  # the 429 waits too
    assert [(r["status"], r["latency"]) for r in sim.request_log()] == [(200, 0.2), (429, 0.2)]


# --- as a process -----------------------------------------------------------------------------------------------
def test_process_wrapper_starts_answers_and_is_configurable():
    sim = OrttoSimProcess(KEY, rate=30).start()  # SIM_API_KEY=KEY python -m tools.ortto_sim --port 0 --rate 30
    try:
        assert sim.configure()["rate"] == 30
        api = Api(sim.base_url)
        assert api.statuses(person("a@example.com")) == ["created"]
        assert list(sim.people()) == ["a@example.com"] and sim.people()["a@example.com"]["fields"]["bol::p"] is True
        assert api.create_field("Tier", "text").json()["field_id"] == "str:cm:tier"
        assert sim.custom_fields() == {"str:cm:tier": {"name": "Tier", "display_type": "text", "track_changes": False}}
        sim.configure(try_in_seconds=3, suppressed=["X@example.com"])
        refused = api.merge(person("x@example.com"), suppression_list_field_id="str::email").json()
        assert refused["error"] == "No valid contacts provided (Email is suppressed)"
        sim.set_rate(0.25)  # 5 per 10 s, and the 3 requests above count
        assert api.merge(person("a@example.com")).status_code == 200
        assert api.merge(person("a@example.com")).status_code == 200
        assert api.merge(person("a@example.com")).json()["error"]["try-in-seconds"] == 3
        assert [r["status"] for r in sim.request_log()] == [200, 200, 400, 200, 200, 429]
        assert sim.state()["bans"] == 0
    finally:
        sim.stop()


def test_process_wrapper_takes_a_plan():
    sim = OrttoSimProcess(KEY, plan="free").start()  # --rate 10 --plan free: the plan wins
    try:
        assert sim.configure()["rate"] == 1
    finally:
        sim.stop()
    with pytest.raises(ValueError):
        OrttoSimProcess(KEY, plan="gold")


def test_process_wrapper_takes_latency():
    sim = OrttoSimProcess(KEY, rate=30, latency=0.2).start()  # ... python -m tools.ortto_sim --latency 0.2
    try:
        started = time.monotonic()
        assert Api(sim.base_url).statuses(person("a@example.com")) == ["created"]
        assert time.monotonic() - started >= 0.2
        sim.set_latency(0.1, jitter=0.1)
        assert (sim.configure()["latency"], sim.configure()["jitter"]) == (0.1, 0.1)
    finally:
        sim.stop()
