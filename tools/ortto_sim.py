"""A local simulator of the Ortto v1 REST API, following `shared/ortto-api.md` (the contract).

The live API cannot be reached from our machines, so tests, benchmarks and the demo talk to this instead.

In process (tests)::

    with OrttoSim("key", rate=10) as sim:             # port 0 picks a free loopback port
        requests.post(sim.base_url + "/person/merge", json={...}, headers={"X-Api-Key": "key"})
        sim.people(); sim.custom_fields(); sim.state(); sim.request_log()
        sim.faults = Faults(fail_rate=0.1)           # replaceable at runtime, as are rate, try_in_seconds,
                                                     # contact_limit and suppressed

As a process::

    python -m tools.ortto_sim --port 0 --rate 30 --api-key KEY [--try-in-seconds 1 --fail-rate 0.01 ...]

It prints `ortto-sim listening on http://127.0.0.1:PORT/v1` and runs until SIGTERM/SIGINT; `OrttoSimProcess`
starts it and reads it back. The request pipeline, the rate limit (a sliding one-second window per key), the
faults and the admin endpoints are tools.sim_base's. `GET /_sim/state` answers `{"people": {lower-case email:
{"id", "fields", "tags": sorted}}, "custom_fields": {id: {"name", "display_type"}}, "bans", "consent_writes",
"subscribe_calls"}`; `POST /_sim/config` also takes `try_in_seconds`, `contact_limit` (null: unlimited) and
`suppressed` (a list of emails).

Endpoints: `POST /v1/person/merge`, `POST /v1/person/get`, `POST /v1/person/custom-field/create`,
`POST /v1/person/custom-field/get`, and `PUT /v1/audience/subscribe`, which applies nothing, answers `{}` and is
counted in `subscribe_calls` (a sync must never call it). Errors answer `{"code", "error", "request_id"}`;
a missing or wrong `X-Api-Key` is 401. A throttled request (rate or burst) gets 429 `{"error": {"code":
"rate-limit", "message": "rate limit", "try-in-seconds": try_in_seconds}}` with no Retry-After header.

Bad-request ban: once BAN_AFTER requests were answered 400 within BAN_WINDOW seconds, every /v1 request for the
next BAN_SECONDS is answered 403 `ip-banned` before routing, auth and throttling, and applies nothing; `bans`
counts the bans. There is one client (loopback), so the ban is simulator-wide.

Choices where the contract is silent:
  - merge: the whole request is validated before anything is applied; one invalid person refuses it (400 naming
    `people[i]`, the field and why). `merge_by` must be `["str::email"]`; `merge_strategy` defaults to 2,
    `find_strategy` to 0 (0, 1 or 2 accepted, ignored); unknown keys at the top, in a person, in a `dtz`, `phn` or
    `geo` value are 400. `phn` needs both `phone` and `parse_with_country_code`. `str::email` must be a
    plausible address (tools.sim_base.plausible_email) and cannot be null; any other field may be null, which
    clears it under strategy 2 and does nothing under 1. A body over 2,000,000 bytes is 413.
  - people are matched by email case-insensitively and keep the email last sent. Strategy 1 fills only absent
    fields, 2 overwrites, 3 leaves existing people untouched (status `ignored`, with their `person_id`); tags
    and unset_tags apply under 1 and 2, and to people created. `skip_non_existing` answers `ignored` (no
    person_id) for people not found. A person created gets `bol::p` true and `bol::sp` false unless sent;
    each person in an accepted merge that carries `bol::p` or `bol::sp` adds one to `consent_writes`.
  - a merge that would take the number of people above `contact_limit` is 507 `contact-limit`, nothing applied.
  - person ids are 24 lower-case hex digits, a creation counter then seeded random digits.
  - custom-field/create: the name must give a non-empty kebab and be at most 255 characters; other keys of
    `field` are ignored. person/get: `fields` is required and every id must exist; `limit` 1 to 500 (default
    500), `offset` from 0; a person's `fields` holds only the asked ids it has a value for.
  - the request log's `n` is the number of people sent in a merge, whatever the status.
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
FIELD_TYPES = {"text": "str", "large_text": "txt", "integer": "int", "decimal": "int", "boolean": "bol",
               "date": "dtz", "phone": "phn", "geo": "geo"}
MERGE_KEYS = frozenset({"people", "merge_by", "merge_strategy", "find_strategy", "async", "skip_non_existing",
                        "suppression_list_field_id"})
PERSON_KEYS = frozenset({"fields", "tags", "unset_tags"})
GET_KEYS = frozenset({"limit", "offset", "fields", "filter"})
DTZ_REQUIRED = frozenset({"year", "month", "day", "timezone"})
DTZ_CLOCK = {"hour": 23, "minute": 59, "second": 59}
MAX_PEOPLE = 100
MAX_CUSTOM_FIELDS = 100
MAX_PAGE = 500
MAX_STRING = 255
MAX_TEXT = 4000
MAX_PAYLOAD = 2_000_000
INT64 = range(-(2**63), 2**63)
ERROR_CODES = {400: "bad-request", 401: "unauthorized", 403: "ip-banned", 404: "not-found",
               405: "method-not-allowed", 409: "field-exists", 411: "length-required", 413: "payload-too-large",
               500: "internal-error", 507: "contact-limit"}


def _error_reply(status: int, message: str) -> _Reply:
    return _Reply(status, {"code": ERROR_CODES[status], "error": message, "request_id": str(uuid.uuid4())})


def _bad(message: str) -> SimError:
    return SimError(_error_reply(400, message))


# --- validation (pure: runs before anything is written, so a refused call changes nothing) ----------------------
def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high  # type(), not isinstance: true and false are not integers


def _is_string(value: object, limit: int = MAX_STRING) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _is_dtz(value: object) -> bool:
    if not isinstance(value, dict) or not DTZ_REQUIRED <= value.keys() <= DTZ_REQUIRED | DTZ_CLOCK.keys():
        return False
    if not isinstance(value["timezone"], str) or not all(type(value[k]) is int for k in ("year", "month", "day")):
        return False
    if not all(_is_int(value.get(k, 0), 0, high) for k, high in DTZ_CLOCK.items()):
        return False
    try:
        date(value["year"], value["month"], value["day"])
    except (ValueError, OverflowError):
        return False
    return True


def _is_phone(value: object) -> bool:
    return (isinstance(value, dict) and value.keys() == {"phone", "parse_with_country_code"}
            and _is_string(value["phone"]) and isinstance(value["parse_with_country_code"], bool))


def _is_geo(value: object) -> bool:
    return isinstance(value, dict) and value.keys() == {"name"} and _is_string(value["name"])


# Per type prefix: the check and what it asks for (the 400's "why").
VALUE_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "str": (_is_string, f"a string of at most {MAX_STRING} characters"),
    "txt": (lambda v: _is_string(v, MAX_TEXT), f"a string of at most {MAX_TEXT:,} characters"),
    "int": (lambda v: type(v) is int and v in INT64, "a JSON integer within int64"),
    "bol": (lambda v: isinstance(v, bool), "true or false"),
    "dtz": (_is_dtz, 'an object with integer "year", "month", "day" forming a real date, a string "timezone" '
                     'and optional integer "hour" (0-23), "minute" and "second" (0-59)'),
    "phn": (_is_phone, 'an object {"phone": string, "parse_with_country_code": boolean}'),
    "geo": (_is_geo, 'an object {"name": string}'),
}


def _check_tags(where: str, person: dict) -> None:
    for key in ("tags", "unset_tags"):
        tags = person.get(key, [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and 0 < len(t) <= MAX_STRING for t in tags):
            raise _bad(f"{where}.{key} must be a list of non-empty strings of at most {MAX_STRING} characters.")
    both = set(person.get("tags", [])) & set(person.get("unset_tags", []))
    if both:
        raise _bad(f"{where}: tag {min(both)!r} is in both tags and unset_tags; the order would be undefined.")


def _check_field(where: str, field_id: str, value: object, custom_fields: dict) -> None:
    if field_id not in STANDARD_FIELDS and field_id not in custom_fields:
        raise _bad(f"{where}: unknown field {field_id}; create custom fields with /v1/person/custom-field/create.")
    check, wanted = VALUE_CHECKS[field_id.split(":", 1)[0]]
    if value is not None and not check(value):
        raise _bad(f"{where}: field {field_id} must be {wanted} or null, got {json.dumps(value)[:100]}.")


def _check_person(index: int, person: object, custom_fields: dict) -> None:
    where = f"people[{index}]"
    if not isinstance(person, dict) or not isinstance(person.get("fields"), dict):
        raise _bad(f"{where} must be an object with a fields object.")
    unknown = sorted(person.keys() - PERSON_KEYS)
    if unknown:
        raise _bad(f"{where}: unknown key(s) {', '.join(unknown)}.")
    email = person["fields"].get(EMAIL)
    if not (plausible_email(email) and _is_string(email)):
        raise _bad(f"{where}: field {EMAIL} must be an email address of at most {MAX_STRING} characters, "
                   f"got {json.dumps(email)[:100]}.")
    for field_id, value in person["fields"].items():
        _check_field(where, field_id, value, custom_fields)
    _check_tags(where, person)


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


# --- state --------------------------------------------------------------------------------------------------
class _Store:
    """People (by lower-case email, in creation order) and custom fields. Only used under the simulator's lock."""

    def __init__(self, seed: int):
        self._ids = random.Random(seed)  # its own generator: fault draws must not depend on how many ids were made
        self._counter = 0
        self.people: dict[str, dict] = {}  # lower-case email -> {"id", "fields", "tags": set}
        self.custom_fields: dict[str, dict] = {}  # id -> {"name", "display_type"}
        self.consent_writes = 0
        self.subscribe_calls = 0

    def new_id(self) -> str:
        self._counter += 1  # leads, so ids sort by creation
        return f"{self._counter:08x}{self._ids.getrandbits(64):016x}"

    def outcomes(self, options: dict, suppressed: frozenset[str]) -> list[str]:
        """What a merge would do to each person, in order, without doing it."""
        strategy, created, out = options.get("merge_strategy", 2), set(), []
        for person in options["people"]:
            key = person["fields"][EMAIL].lower()
            if key in self.people or key in created:
                out.append("ignored" if strategy == 3 else "merged")
            elif options.get("skip_non_existing"):
                out.append("ignored")
            elif "suppression_list_field_id" in options and key in suppressed:
                out.append("suppressed")
            else:
                created.add(key)
                out.append("created")
        return out

    def apply(self, person: dict, outcome: str, strategy: int) -> dict:
        key = person["fields"][EMAIL].lower()
        record = self.people.get(key)
        if outcome == "suppressed":
            return {"status": outcome, "error": "Email is suppressed"}
        if outcome == "ignored":
            return {"status": outcome, **({"person_id": record["id"]} if record else {})}
        if record is None:
            record = {"id": self.new_id(), "fields": dict(CONSENT_DEFAULTS), "tags": set()}
            self.people[key] = record
            strategy = 2  # a new person takes every field sent
        _write_fields(record["fields"], person["fields"], strategy)
        record["fields"][EMAIL] = person["fields"][EMAIL]  # the merge key: always the last one sent
        record["tags"] = (record["tags"] | set(person.get("tags", []))) - set(person.get("unset_tags", []))
        return {"status": outcome, "person_id": record["id"]}

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
    """The Ortto v1 API on 127.0.0.1. `rate`, `faults`, `try_in_seconds`, `contact_limit`, `suppressed` and the
    key may be changed while it runs."""

    NAME = "ortto-sim"
    KEY_HEADER = "X-Api-Key"
    MISSING_KEY_STATUS = 401
    CONFIG_KEYS = (*SimBase.CONFIG_KEYS, "try_in_seconds", "contact_limit", "suppressed")
    BAN_AFTER = 15  # 400s ...
    BAN_WINDOW = 15.0  # ... within this many seconds ...
    BAN_SECONDS = 15.0  # ... ban the client this long

    def __init__(self, api_key: str, rate: float | None = 10.0, port: int = 0, faults: Faults | None = None,
                 seed: int = 0, *, try_in_seconds: float = 1, contact_limit: int | None = None,
                 suppressed: tuple[str, ...] = ()):
        super().__init__(api_key, rate, port, faults, seed)
        self.try_in_seconds = _whole(try_in_seconds)
        self.contact_limit = contact_limit
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
        if "contact_limit" in config:
            if not (config["contact_limit"] is None or _is_int(config["contact_limit"], 0, INT64.stop)):
                raise self._bad_config("contact_limit must be a non-negative integer or null.")
            extra["contact_limit"] = config["contact_limit"]
        if "suppressed" in config:
            emails = config["suppressed"]
            if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
                raise self._bad_config("suppressed must be a list of emails.")
            extra["suppressed"] = frozenset(e.lower() for e in emails)
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
        store = self._store
        for index, person in enumerate(payload["people"]):
            _check_person(index, person, store.custom_fields)
        outcomes = store.outcomes(payload, self.suppressed)
        limit = self.contact_limit
        if limit is not None and len(store.people) + outcomes.count("created") > limit:
            raise SimError(_error_reply(507, f"The account's contact limit ({limit:,}) is reached."))
        store.consent_writes += sum(1 for p in payload["people"] if CONSENT_DEFAULTS.keys() & p["fields"].keys())
        strategy = payload.get("merge_strategy", 2)
        results = [store.apply(p, o, strategy) for p, o in zip(payload["people"], outcomes, strict=True)]
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
        field = payload.get("field") if isinstance(payload, dict) else None
        if not (isinstance(field, dict) and isinstance(field.get("name"), str) and field.get("type") in FIELD_TYPES):
            raise _bad(f'Expected {{"field": {{"name": string, "type": one of {", ".join(FIELD_TYPES)}}}}}.')
        name, display_type = field["name"], field["type"]
        if not _kebab(name) or len(name) > MAX_STRING:
            raise _bad(f"name must hold a letter or digit and be at most {MAX_STRING} characters.")
        field_id = f"{FIELD_TYPES[display_type]}:cm:{_kebab(name)}"
        fields = self._store.custom_fields
        if field_id in fields:
            raise SimError(_error_reply(409, f"Field {field_id} already exists."))
        if len(fields) >= MAX_CUSTOM_FIELDS:
            raise _bad(f"At most {MAX_CUSTOM_FIELDS} custom fields can be created.")
        fields[field_id] = {"name": name, "display_type": display_type}
        return _Reply(200, {"field": {"id": field_id, **fields[field_id]}})

    def _get_fields(self, payload: object) -> _Reply:
        if not isinstance(payload, dict):
            raise _bad("The body must be a JSON object.")
        fields = [{"field": {"id": fid, **field}} for fid, field in self._store.custom_fields.items()]
        return _Reply(200, {"fields": fields})

    def _subscribe(self) -> _Reply:
        self._store.subscribe_calls += 1
        return _Reply(200, {})


# --- process and CLI ---------------------------------------------------------------------------------------
class OrttoSimProcess(sim_base.SimProcess):
    """The simulator in a process of its own, with OrttoSim's state accessors (read over its admin API)."""

    MODULE = "tools.ortto_sim"

    def __init__(self, api_key: str, rate: float | None = 10.0, faults: Faults | None = None, seed: int = 0,
                 log_path: Path | None = None):
        super().__init__(api_key, rate, faults, seed, log_path)

    def people(self) -> dict[str, dict]:
        return self.state()["people"]

    def custom_fields(self) -> dict[str, dict]:
        return self.state()["custom_fields"]


def main(argv: list[str] | None = None) -> int:
    parser = sim_base.arg_parser("tools.ortto_sim", __doc__, rate=10.0)
    parser.add_argument("--try-in-seconds", type=float, default=1.0, help="the 429 body's try-in-seconds")
    args = sim_base.parse_args(parser, argv)
    sim = OrttoSim(args.api_key, rate=args.rate or None, port=args.port, faults=args.faults, seed=args.seed,
                   try_in_seconds=args.try_in_seconds)
    return sim_base.serve(sim, args.state_dump)


if __name__ == "__main__":
    sys.exit(main())
