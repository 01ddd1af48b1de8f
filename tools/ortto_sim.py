"""A local simulator of the Ortto v1 REST API, following `docs/api-contracts.md`.

The live API cannot be reached from our machines, so tests, benchmarks and the demo talk to this instead. Where
the contract quotes a recorded answer ([R]) the simulator answers in that shape (tests/fixtures/ortto_recorded.json
holds them verbatim, and tests/test_ortto_sim.py compares); where it is silent, the simulator is strict.

In process (tests)::

    with OrttoSim("key", plan="professional") as sim:  # port 0 picks a free loopback port; rate=10 is the same
        requests.post(sim.base_url + "/person/merge", json={...}, headers={"X-Api-Key": "key"})
        sim.people(); sim.custom_fields(); sim.state(); sim.request_log()
        sim.faults = Faults(fail_rate=0.1)           # replaceable at runtime, as are rate, try_in_seconds,
                                                     # suppressed, latency and jitter

As a process::

    SIM_API_KEY=KEY python -m tools.ortto_sim --port 0 --rate 30 [--plan business --latency 0.3 ...]

It prints `ortto-sim listening on http://127.0.0.1:PORT/v1` and runs until SIGTERM/SIGINT; `OrttoSimProcess`
starts it and reads it back. The request pipeline, the faults, the latency (`--latency`, `--jitter`) and the admin
endpoints are tools.sim_base's. `GET /_sim/state` answers `{"people": {lower-case email: {"id", "fields" (bol::p
and bol::sp included), "tags": sorted}}, "custom_fields": {id: {"name", "display_type", "track_changes"}}, "bans",
"consent_writes", "subscribe_calls"}`; `POST /_sim/config` also takes `try_in_seconds`, `suppressed` (a list of
emails) and `plan`.

Endpoints: `POST /v1/person/merge`, `POST /v1/person/get`, `POST /v1/person/custom-field/create`,
`POST /v1/person/custom-field/get`, and `PUT /v1/audience/subscribe`, which applies nothing, answers `{}` and is
counted in `subscribe_calls` (a sync must never call it). Every error answers `{"request_id": uuid, "code": the
HTTP status as a number, "error": text}`, plus `"details"` for a merge with no valid person; a missing or wrong
`X-Api-Key` is 401. There is no contact limit (the contract: Ortto keeps accepting people, nothing answers 507).

Rate limit, by plan (PLANS: free 1/s, campaigns 5, professional 10, business 30): `rate` is the plan's sustained
rate (`plan` sets it, and wins over a `rate` given with it: constructor, CLI, /_sim/config), and a key
may make 20 x rate requests in any sliding 10 s and 60 x rate in any sliding 60 s (WINDOWS; sim_base's one-second
window is not used). Only accepted requests count; `rate` None or 0 is unthrottled. A throttled request (windows
or burst fault) gets 429 `{"error": {"code": "rate-limit", "message": "rate limit", "try-in-seconds":
try_in_seconds}}` with no Retry-After header; try_in_seconds is a setting (default 1), not the time the windows
need. The per-IP limits (2,000 per 10 s, 6,000 per 60 s) are not simulated.

Bad-request ban: once BAN_AFTER requests were answered 400 within BAN_WINDOW seconds, every /v1 request for the
next BAN_SECONDS is answered 403 (the error shape above) before routing, auth and throttling, and applies
nothing; `bans` counts the bans. There is one client (loopback), so the ban is simulator-wide. Every 400 counts,
a merge's "No valid contacts provided" included: the contract does not say which 400s Ortto counts.

Merge (the contract: people are validated one by one):
  - the request as a whole is checked first, and a fault there is a plain 400 (no details) applying nothing: the
    body is an object with only the documented keys, `people` a list of 1 to 100, `merge_by` exactly
    `["str::email"]`, `merge_strategy` 1-3 (default 2), `find_strategy` 0-2 (default 0, ignored), `async` and
    `skip_non_existing` booleans, `suppression_list_field_id` (if sent) `"str::email"`. A body over 2,000,000
    bytes is 413.
  - then each person. A person's first problem makes their result `{"status": "invalid", "error": "failed to
    validate field <id> in schema: <why>"}` ("failed to validate person ..." or "... tags ..." when no field is
    at fault): not an object with a `fields` object, or a key other than fields/tags/unset_tags (person); no
    plausible `str::email` of at most 255 characters (tools.sim_base.plausible_email); a field id that is neither
    standard nor created ("Object not found", as recorded); a value of the wrong type (null is allowed, except
    for the email); tags or unset_tags not lists of 1-255 character strings, or a tag in both (tags).
    Values: `str` 255 characters, `txt` 4,000, `int` a JSON integer within int64, `bol` true/false, `dtz` exactly
    year, month, day (integers forming a real date) and timezone (a non-empty string, not checked against a zone
    database), so hour/minute/second are invalid; `geo` exactly `{"name": string}`; `phn` exactly `{"phone":
    string, "parse_with_country_code": true}` with the number in international form: an optional "+", then 8 to
    15 digits, the first not 0, nothing else ("not a number in international form"). The contract documents
    only `true` and says local numbers must be made international first, so `false` is refused too.
  - a new person whose email is in `suppressed` is `{"status": "suppressed", "error": "Email is suppressed"}` when
    the call sends `suppression_list_field_id`; an existing one is merged as usual.
  - if no person is valid (each invalid or suppressed) the call is 400 `{"request_id", "code": 400, "error": "No
    valid contacts provided (<the first person's error>)", "details": [{"status", "error"} per person, in
    order]}` and applies nothing. Otherwise it is 200 and applies the valid people only: with `async: false`
    `{"people": [...]}`, one result per person in order, `{"status", "person_id"}` or, for an invalid or
    suppressed person, `{"status", "error"}`; with `async: true` `{}` (validated and applied at once).
  - people are matched by email case-insensitively and keep the email last sent; a repeated email in one call
    merges into the first. Strategy 1 writes only fields the person has no value for (null does nothing), 2
    overwrites (null clears), 3 leaves existing people untouched (status `ignored`, with their `person_id`).
    A new person has no values, so under any strategy gets every non-null field sent, then `bol::p` true and
    `bol::sp` false unless sent with a value. Tags and unset_tags apply under 1 and 2, and to people created.
    `skip_non_existing` answers `ignored` (no person_id) for people not found. Each accepted person (not invalid
    or suppressed) carrying `bol::p` or `bol::sp` adds one to `consent_writes`.
  - person ids are 24 lower-case hex digits, a creation counter then seeded random digits. The request log's
    `n` is the number of people sent, whatever the answer.

Custom fields:
  - create takes a flat `{"name", "type", "track_changes" (optional boolean)}`; any other key is 400 (the old
    nested `{"field": {...}}` included). Types and prefixes: text str, large_text txt, integer int, decimal int,
    date dtz, bool bol, phone phn. `boolean` (and `geo`) are not types: 400. single_select and multi_select are
    refused with 400 as not supported by the simulator: the contract gives neither their id prefix nor the form
    of their values. The name must give a non-empty kebab (lower-case letters and digits joined by "-") and be
    at most 255 characters; the id is `<prefix>:cm:<kebab>`. A name whose kebab any field already has, of any
    type, is 400 naming that field, nothing created (undocumented; names are unique across types). At most
    MAX_CUSTOM_FIELDS (100, Professional). The answer is `{"name", "field_id", "display_type"}`.
  - get takes no body or `{}` (any key is 400) and answers `{"fields": [{"field": {"id", "name", "display_type",
    "liquid_name": "people.custom.<kebab>"}, "tracked_value": track_changes as created}]}`, in creation order,
    custom fields only.
  - person/get: `fields` is required and every id must exist; `limit` 1 to 500 (default 500), `offset` from 0; a
    person's `fields` holds only the asked ids they have a value for.
"""

from __future__ import annotations

import copy
import json
import random
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import date
from pathlib import Path

from tools import sim_base
from tools.sim_base import Faults, Route, SimBase, SimError, _Reply, plausible_email

EMAIL = "str::email"
CONSENT_DEFAULTS = {"bol::p": True, "bol::sp": False}
STANDARD_FIELDS = frozenset({
    EMAIL, "str::first", "str::last", "phn::phone", "geo::city", "geo::country", "geo::region", "str::postal",
    "str::ei", *CONSENT_DEFAULTS,
})
FIELD_TYPES = {"text": "str", "large_text": "txt", "integer": "int", "decimal": "int", "date": "dtz", "bool": "bol",
               "phone": "phn"}
UNSUPPORTED_TYPES = ("single_select", "multi_select")  # documented, but with no id prefix or value form given
FIELD_KEYS = frozenset({"name", "type", "track_changes"})
PLANS = {"free": 1, "campaigns": 5, "professional": 10, "business": 30}  # sustained requests/s
MERGE_KEYS = frozenset({"people", "merge_by", "merge_strategy", "find_strategy", "async", "skip_non_existing",
                        "suppression_list_field_id"})
PERSON_KEYS = frozenset({"fields", "tags", "unset_tags"})
GET_KEYS = frozenset({"limit", "offset", "fields", "filter"})
DTZ_KEYS = frozenset({"year", "month", "day", "timezone"})
INTERNATIONAL = re.compile(r"\+?[1-9][0-9]{7,14}")  # [0-9], not \d: other scripts' digits are not a number
SUPPRESSED = "Email is suppressed"  # the recorded text
MAX_PEOPLE = 100
MAX_CUSTOM_FIELDS = 100
MAX_PAGE = 500
MAX_STRING = 255
MAX_TEXT = 4000
MAX_PAYLOAD = 2_000_000
INT64 = range(-(2**63), 2**63)


def _error_reply(status: int, message: str, details: list | None = None) -> _Reply:
    body = {"request_id": str(uuid.uuid4()), "code": status, "error": message}  # the recorded order
    if details is not None:
        body["details"] = details
    return _Reply(status, body)


def _bad(message: str) -> SimError:
    return SimError(_error_reply(400, message))


class _Invalid(Exception):
    """One person's problem: their result is `invalid` with this text, and the rest of the call goes on."""


def _invalid(subject: str, why: str) -> _Invalid:
    return _Invalid(f"failed to validate {subject} in schema: {why}")


# --- validation (pure: runs before anything is written, so a refused call changes nothing) ----------------------
def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high  # type(), not isinstance: true and false are not integers


def _is_string(value: object, limit: int = MAX_STRING) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _dtz_problem(value: object) -> str | None:
    if not isinstance(value, dict) or value.keys() != DTZ_KEYS:
        return 'expected exactly "year", "month", "day" and "timezone" (a dtz has no time of day)'
    if not all(type(value[k]) is int for k in ("year", "month", "day")):
        return "year, month and day must be integers"
    if not (isinstance(value["timezone"], str) and 0 < len(value["timezone"]) <= MAX_STRING):
        return "timezone must be a non-empty string"
    try:
        date(value["year"], value["month"], value["day"])
    except (ValueError, OverflowError):
        return "year, month and day do not form a date"
    return None


def _phone_problem(value: object) -> str | None:
    if not (isinstance(value, dict) and value.keys() == {"phone", "parse_with_country_code"}
            and isinstance(value["phone"], str) and isinstance(value["parse_with_country_code"], bool)):
        return 'expected {"phone": string, "parse_with_country_code": boolean}'
    if not value["parse_with_country_code"]:
        # The contract shows no other form: a local number is to be made international first.
        return "parse_with_country_code false is not supported: send the number in international form with true"
    if not INTERNATIONAL.fullmatch(value["phone"]):
        return "not a number in international form"
    return None


def _checked(check: Callable[[object], bool], wanted: str) -> Callable[[object], str | None]:
    return lambda value: None if check(value) else f"expected {wanted} or null, got {json.dumps(value)[:100]}"


# Per type prefix: what is wrong with a (non-null) value, or None.
VALUE_PROBLEMS: dict[str, Callable[[object], str | None]] = {
    "str": _checked(_is_string, f"a string of at most {MAX_STRING} characters"),
    "txt": _checked(lambda v: _is_string(v, MAX_TEXT), f"a string of at most {MAX_TEXT:,} characters"),
    "int": _checked(lambda v: type(v) is int and v in INT64, "a JSON integer within int64"),
    "bol": _checked(lambda v: isinstance(v, bool), "true or false"),
    "geo": _checked(lambda v: isinstance(v, dict) and v.keys() == {"name"} and _is_string(v["name"]),
                    'an object {"name": string}'),
    "dtz": _dtz_problem,
    "phn": _phone_problem,
}


def _check_field(field_id: str, value: object, custom_fields: dict) -> None:
    if field_id not in STANDARD_FIELDS and field_id not in custom_fields:
        raise _invalid(f"field {field_id}", "Object not found")  # the recorded text
    problem = None if value is None else VALUE_PROBLEMS[field_id.split(":", 1)[0]](value)
    if problem:
        raise _invalid(f"field {field_id}", problem)


def _check_tags(person: dict) -> None:
    for key in ("tags", "unset_tags"):
        tags = person.get(key, [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and 0 < len(t) <= MAX_STRING for t in tags):
            raise _invalid("tags", f"{key} must be a list of non-empty strings of at most {MAX_STRING} characters")
    both = set(person.get("tags", [])) & set(person.get("unset_tags", []))
    if both:
        raise _invalid("tags", f"tag {min(both)!r} is in both tags and unset_tags; the order would be undefined")


def _check_person(person: object, custom_fields: dict) -> None:
    if not isinstance(person, dict) or not isinstance(person.get("fields"), dict):
        raise _invalid("person", "expected an object with a fields object")
    unknown = sorted(person.keys() - PERSON_KEYS)
    if unknown:
        raise _invalid("person", f"unknown key(s) {', '.join(unknown)}")
    email = person["fields"].get(EMAIL)
    if not (plausible_email(email) and _is_string(email)):
        raise _invalid(f"field {EMAIL}", f"expected an email address of at most {MAX_STRING} characters, "
                                         f"got {json.dumps(email)[:100]}")
    for field_id, value in person["fields"].items():
        _check_field(field_id, value, custom_fields)
    _check_tags(person)


def _person_error(person: object, custom_fields: dict) -> str | None:
    try:
        _check_person(person, custom_fields)
    except _Invalid as exc:
        return str(exc)
    return None


def _check_merge_options(payload: object) -> None:
    if not isinstance(payload, dict):
        raise _bad("The body must be a JSON object.")
    unknown = sorted(payload.keys() - MERGE_KEYS)
    if unknown:
        raise _bad(f"Unknown key(s) {', '.join(unknown)}.")
    people = payload.get("people")
    if not isinstance(people, list) or not 1 <= len(people) <= MAX_PEOPLE:
        raise _bad(f"people must be a list of 1 to {MAX_PEOPLE} people.")
    if payload.get("merge_by") != [EMAIL]:
        raise _bad(f'merge_by must be ["{EMAIL}"]: the simulator merges by email only.')
    if not _is_int(payload.get("merge_strategy", 2), 1, 3) or not _is_int(payload.get("find_strategy", 0), 0, 2):
        raise _bad("merge_strategy must be 1, 2 or 3 and find_strategy 0, 1 or 2.")
    if not all(isinstance(payload.get(key, False), bool) for key in ("async", "skip_non_existing")):
        raise _bad("async and skip_non_existing must be booleans.")
    if payload.get("suppression_list_field_id", EMAIL) != EMAIL:
        raise _bad(f"suppression_list_field_id must be {EMAIL}.")


def _field_request(payload: object) -> tuple[str, str, bool]:
    """The name, type and track_changes of a custom-field/create body."""
    if not isinstance(payload, dict):
        raise _bad("The body must be a JSON object.")
    if payload.get("type") in UNSUPPORTED_TYPES:
        raise _bad(f"Type {payload['type']} is not supported by the simulator: the contract gives neither its field "
                   "id prefix nor the form of its values.")
    unknown = sorted(payload.keys() - FIELD_KEYS)
    if unknown:
        raise _bad(f'Unknown key(s) {", ".join(unknown)}: the body is flat, {{"name": string, "type": string, '
                   f'"track_changes": boolean (optional)}}.')
    name, kind, track = payload.get("name"), payload.get("type"), payload.get("track_changes", False)
    if not isinstance(kind, str) or kind not in FIELD_TYPES:  # a list would not even hash
        raise _bad(f"type must be one of {', '.join(FIELD_TYPES)}, got {json.dumps(kind)[:100]}.")
    if not isinstance(track, bool):
        raise _bad("track_changes must be a boolean.")
    if not (isinstance(name, str) and _kebab(name) and len(name) <= MAX_STRING):
        raise _bad(f"name must be a string holding a letter or digit, of at most {MAX_STRING} characters.")
    return name, kind, track


def _page_options(payload: object, custom_fields: dict) -> tuple[int, int, list[str]]:
    if not isinstance(payload, dict) or payload.keys() - GET_KEYS or not isinstance(payload.get("fields"), list):
        raise _bad(f"The body must be a JSON object with fields (a list) and any of {', '.join(sorted(GET_KEYS))}.")
    limit, offset = payload.get("limit", MAX_PAGE), payload.get("offset", 0)
    if not _is_int(limit, 1, MAX_PAGE) or not _is_int(offset, 0, INT64.stop):
        raise _bad(f"limit must be an integer from 1 to {MAX_PAGE} and offset one from 0.")
    unknown = [f for f in payload["fields"] if f not in STANDARD_FIELDS and f not in custom_fields]
    if unknown:
        raise _bad(f"Unknown field(s) {', '.join(map(str, unknown))}.")
    return limit, offset, payload["fields"]


def _kebab(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _whole(seconds: float) -> float:
    """Seconds as Ortto writes them (an integer) when they are whole."""
    return int(seconds) if float(seconds).is_integer() else seconds


def _plan_rate(plan: object) -> int:
    if not isinstance(plan, str) or plan not in PLANS:
        raise ValueError(f"plan must be one of {', '.join(PLANS)}")
    return PLANS[plan]


# --- state --------------------------------------------------------------------------------------------------
class _Store:
    """People (by lower-case email, in creation order) and custom fields. Only used under the simulator's lock."""

    def __init__(self, seed: int):
        self._ids = random.Random(seed)  # its own generator: fault draws must not depend on how many ids were made
        self._counter = 0
        self.people: dict[str, dict] = {}  # lower-case email -> {"id", "fields", "tags": set}
        self.custom_fields: dict[str, dict] = {}  # id -> {"name", "display_type", "track_changes"}
        self.consent_writes = 0
        self.subscribe_calls = 0

    def new_id(self) -> str:
        self._counter += 1  # leads, so ids sort by creation
        return f"{self._counter:08x}{self._ids.getrandbits(64):016x}"

    def outcomes(self, options: dict, errors: list[str | None], suppressed: frozenset[str]) -> list[dict]:
        """What a merge would do to each person, in order, without doing it: {"status"} or {"status", "error"}."""
        strategy, created, out = options.get("merge_strategy", 2), set(), []
        for person, error in zip(options["people"], errors, strict=True):
            key = None if error else person["fields"][EMAIL].lower()
            if error:
                out.append({"status": "invalid", "error": error})
            elif key in self.people or key in created:
                out.append({"status": "ignored" if strategy == 3 else "merged"})
            elif options.get("skip_non_existing"):
                out.append({"status": "ignored"})
            elif "suppression_list_field_id" in options and key in suppressed:
                out.append({"status": "suppressed", "error": SUPPRESSED})
            else:
                created.add(key)
                out.append({"status": "created"})
        return out

    def apply(self, person: dict, outcome: dict, strategy: int) -> dict:
        if "error" in outcome:
            return outcome  # invalid or suppressed: nothing written, no person_id
        key = person["fields"][EMAIL].lower()
        record = self.people.get(key)
        if outcome["status"] == "ignored":
            return {**outcome, **({"person_id": record["id"]} if record else {})}
        if record is None:
            record = self._create(key, person["fields"])
        else:
            _write_fields(record["fields"], person["fields"], strategy)
        record["fields"][EMAIL] = person["fields"][EMAIL]  # the merge key: always the last one sent
        record["tags"] = (record["tags"] | set(person.get("tags", []))) - set(person.get("unset_tags", []))
        return {**outcome, "person_id": record["id"]}

    def _create(self, key: str, sent: dict) -> dict:
        record = {"id": self.new_id(), "fields": {}, "tags": set()}
        _write_fields(record["fields"], sent, 1)  # a new person has no values: every non-null one sent is written
        for field_id, default in CONSENT_DEFAULTS.items():
            record["fields"].setdefault(field_id, default)  # Ortto's defaults: subscribed to email, not to SMS
        self.people[key] = record
        return record

    def snapshot(self) -> dict:
        people = {key: {"id": r["id"], "fields": copy.deepcopy(r["fields"]), "tags": sorted(r["tags"])}
                  for key, r in self.people.items()}
        return {"people": people, "custom_fields": copy.deepcopy(self.custom_fields),
                "consent_writes": self.consent_writes, "subscribe_calls": self.subscribe_calls}


def _write_fields(stored: dict, sent: dict, strategy: int) -> None:
    for field_id, value in sent.items():
        if value is None:
            if strategy == 2:
                stored.pop(field_id, None)
        elif strategy == 2 or field_id not in stored:
            stored[field_id] = value


# --- the simulator --------------------------------------------------------------------------------------------
class OrttoSim(SimBase):
    """The Ortto v1 API on 127.0.0.1. `rate`, `faults`, `try_in_seconds`, `suppressed` and the key may be changed
    while it runs; `plan` sets `rate` to the plan's sustained figure."""

    NAME = "ortto-sim"
    KEY_HEADER = "X-Api-Key"
    MISSING_KEY_STATUS = 401
    CONFIG_KEYS = (*SimBase.CONFIG_KEYS, "try_in_seconds", "suppressed", "plan")
    # Ortto's two sliding windows: (seconds, requests allowed per unit of the sustained rate). A test may scale
    # the seconds down; the proportions are the contract's.
    WINDOWS: tuple[tuple[float, float], ...] = ((10.0, 20), (60.0, 60))
    BAN_AFTER = 15  # 400s ...
    BAN_WINDOW = 15.0  # ... within this many seconds ...
    BAN_SECONDS = 15.0  # ... ban the client this long

    def __init__(self, api_key: str, rate: float | None = 10.0, port: int = 0, faults: Faults | None = None,
                 seed: int = 0, *, plan: str | None = None, try_in_seconds: float = 1,
                 suppressed: tuple[str, ...] = (), latency: float = 0.0, jitter: float = 0.0):
        super().__init__(api_key, _plan_rate(plan) if plan is not None else rate, port, faults, seed,
                         latency=latency, jitter=jitter)
        self.try_in_seconds = _whole(try_in_seconds)
        self.suppressed = frozenset(email.lower() for email in suppressed)
        self.bans = 0
        self._bad_requests: deque[float] = deque()  # when recent 400s were answered (front-door lock)
        self._banned_until = 0.0
        self._store = _Store(seed)

    # state accessors (snapshots, safe from any thread)
    def state(self) -> dict:
        with self._store_lock:
            return {**self._store.snapshot(), "bans": self.bans}

    def people(self) -> dict[str, dict]:
        return self.state()["people"]

    def custom_fields(self) -> dict[str, dict]:
        return self.state()["custom_fields"]

    # the front door's hooks
    def _error(self, status: int, message: str) -> _Reply:
        return _error_reply(status, message)

    def _throttled(self, burst: bool) -> _Reply:
        return _Reply(429, {"error": {"code": "rate-limit", "message": "rate limit",
                                      "try-in-seconds": self.try_in_seconds}})

    def _admit(self, method: str, path: str, api_key: str | None, record: dict) -> _Reply | tuple:
        # An IP ban sits in front of everything: a banned client is neither routed, authorised nor counted.
        if time.monotonic() < self._banned_until:
            return _error_reply(403, "Too many bad requests: this IP address is banned for a while.")
        return super()._admit(method, path, api_key, record)

    def _call(self, action: Callable, args: tuple, faults: Faults, body: bytes, record: dict) -> _Reply:
        reply = super()._call(action, args, faults, body, record)
        if reply.status == 400:
            self._count_bad_request()
        return reply

    def _count_bad_request(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._bad_requests.append(now)
            while self._bad_requests[0] <= now - self.BAN_WINDOW:
                self._bad_requests.popleft()
            if len(self._bad_requests) >= self.BAN_AFTER:
                self._bad_requests.clear()
                self._banned_until = now + self.BAN_SECONDS
                self.bans += 1

    def _prepare(self, action: Callable, args: tuple, body: bytes, record: dict) -> tuple:
        if len(body) > MAX_PAYLOAD:
            raise SimError(_error_reply(413, f"The body is {len(body):,} bytes; the limit is 2 MB."))
        if action == self._subscribe:
            return args
        payload = self._json(body) if body or action != self._get_fields else {}
        if action == self._merge and isinstance(payload, dict) and isinstance(payload.get("people"), list):
            record["n"] = len(payload["people"])
        return (payload,)

    def _check_config(self, config: dict) -> dict:
        extra = {}
        if "try_in_seconds" in config:
            seconds = config["try_in_seconds"]
            if not (isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0):
                raise self._bad_config("try_in_seconds must be a non-negative number.")
            extra["try_in_seconds"] = _whole(seconds)
        if "suppressed" in config:
            emails = config["suppressed"]
            if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
                raise self._bad_config("suppressed must be a list of emails.")
            extra["suppressed"] = frozenset(e.lower() for e in emails)
        if "plan" in config:
            try:
                extra["rate"] = _plan_rate(config["plan"])  # set after `rate`, so the plan wins
            except ValueError as exc:
                raise self._bad_config(f"{exc}.") from None
        return extra

    def _route(self, segments: list[str]) -> Route | None:
        match segments:
            case ["person", "merge"]:
                return {"POST": self._merge}, ()
            case ["person", "get"]:
                return {"POST": self._get_people}, ()
            case ["person", "custom-field", "create"]:
                return {"POST": self._create_field}, ()
            case ["person", "custom-field", "get"]:
                return {"POST": self._get_fields}, ()
            case ["audience", "subscribe"]:
                return {"PUT": self._subscribe}, ()
        return None

    # --- API calls (run under the store lock) -----------------------------------------------------------------
    def _merge(self, payload: object) -> _Reply:
        _check_merge_options(payload)
        store, people = self._store, payload["people"]
        errors = [_person_error(p, store.custom_fields) for p in people]
        outcomes = store.outcomes(payload, errors, self.suppressed)
        if all("error" in o for o in outcomes):
            raise SimError(_error_reply(400, f"No valid contacts provided ({outcomes[0]['error']})", outcomes))
        store.consent_writes += sum(1 for p, o in zip(people, outcomes, strict=True)
                                    if "error" not in o and CONSENT_DEFAULTS.keys() & p["fields"].keys())
        strategy = payload.get("merge_strategy", 2)
        results = [store.apply(p, o, strategy) for p, o in zip(people, outcomes, strict=True)]
        return _Reply(200, {} if payload.get("async") else {"people": results})

    def _get_people(self, payload: object) -> _Reply:
        limit, offset, field_ids = _page_options(payload, self._store.custom_fields)
        records = list(self._store.people.values())
        page = records[offset:offset + limit]
        contacts = [{"id": r["id"], "fields": {f: r["fields"][f] for f in field_ids if f in r["fields"]}}
                    for r in page]
        return _Reply(200, {"contacts": contacts, "has_more": offset + limit < len(records),
                            "next_offset": offset + len(page)})

    def _create_field(self, payload: object) -> _Reply:
        name, kind, track = _field_request(payload)
        fields, kebab = self._store.custom_fields, _kebab(name)
        taken = next((fid for fid in fields if fid.split(":cm:", 1)[1] == kebab), None)
        if taken:
            raise _bad(f"A custom field named {name!r} cannot be created: {taken} ({fields[taken]['name']!r}) has "
                       "that name; names are unique across types. Nothing was created.")
        if len(fields) >= MAX_CUSTOM_FIELDS:
            raise _bad(f"At most {MAX_CUSTOM_FIELDS} custom fields can be created; {name!r} was not.")
        field_id = f"{FIELD_TYPES[kind]}:cm:{kebab}"
        fields[field_id] = {"name": name, "display_type": kind, "track_changes": track}
        return _Reply(200, {"name": name, "field_id": field_id, "display_type": kind})

    def _get_fields(self, payload: object) -> _Reply:
        if payload != {}:
            raise _bad("The body must be empty or {}.")
        fields = [{"field": {"id": fid, "name": f["name"], "display_type": f["display_type"],
                             "liquid_name": f"people.custom.{fid.split(':cm:', 1)[1]}"},
                   "tracked_value": f["track_changes"]}
                  for fid, f in self._store.custom_fields.items()]
        return _Reply(200, {"fields": fields})

    def _subscribe(self) -> _Reply:
        self._store.subscribe_calls += 1
        return _Reply(200, {})


# --- process and CLI ---------------------------------------------------------------------------------------
class OrttoSimProcess(sim_base.SimProcess):
    """The simulator in a process of its own, with OrttoSim's state accessors (read over its admin API)."""

    MODULE = "tools.ortto_sim"

    def __init__(self, api_key: str, rate: float | None = 10.0, faults: Faults | None = None, seed: int = 0,
                 log_path: Path | None = None, *, plan: str | None = None, latency: float = 0.0,
                 jitter: float = 0.0):
        super().__init__(api_key, rate, faults, seed, log_path, latency=latency, jitter=jitter)
        if plan is not None:
            _plan_rate(plan)  # a bad plan fails here, not as a process that never says it listens
            self._argv += ["--plan", plan]

    def people(self) -> dict[str, dict]:
        return self.state()["people"]

    def custom_fields(self) -> dict[str, dict]:
        return self.state()["custom_fields"]


def main(argv: list[str] | None = None) -> int:
    parser = sim_base.arg_parser("tools.ortto_sim", __doc__, rate=10.0)
    parser.add_argument("--plan", choices=PLANS, help="sets the rate to the plan's sustained figure (wins over --rate)")
    parser.add_argument("--try-in-seconds", type=float, default=1.0, help="the 429 body's try-in-seconds")
    args = sim_base.parse_args(parser, argv)
    sim = OrttoSim(args.api_key, rate=args.rate or None, port=args.port, faults=args.faults, seed=args.seed,
                   plan=args.plan, try_in_seconds=args.try_in_seconds, latency=args.latency, jitter=args.jitter)
    return sim_base.serve(sim, args.state_dump)


if __name__ == "__main__":
    sys.exit(main())
