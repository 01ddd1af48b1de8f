"""A local simulator of the Autopilot v1 REST API, following `shared/autopilot-api.md` (the contract).

The live API cannot be reached from our machines, so tests, benchmarks and the demo talk to this instead.

In process (tests)::

    with AutopilotSim("key", rate=5) as sim:          # port 0 picks a free loopback port
        requests.get(sim.base_url + "/lists", headers={"autopilotapikey": "key"})
        sim.contacts(); sim.members(list_id); sim.request_log()
        sim.faults = Faults(fail_rate=0.1)           # replaceable at runtime

As a process (benchmarks, demo)::

    python -m tools.autopilot_sim --port 8765 --rate 5 --api-key KEY [--fail-rate 0.01 ...]

It prints `autopilot-sim listening on http://127.0.0.1:PORT/v1` and runs until SIGTERM/SIGINT. Admin endpoints,
outside /v1, need no key, are never throttled or faulted and are not logged:
`GET /_sim/state` (contacts, lists, members), `GET /_sim/log`, `POST /_sim/reset-log`,
`POST /_sim/config` with any of `{"api_key": ..., "rate": ..., "faults": {...Faults fields...}}`.

Request pipeline, in order: routing (unknown path 404, wrong method 405), auth (missing key 400, wrong key 401),
throttling, faults, then the call itself. Only authorised, routable requests count toward the rate limit: at
most `rate` accepted requests per key in any sliding one-second window; a throttled request gets 429 without a
Retry-After header (none was ever observed live) and does not count. `rate` None or 0 means unthrottled.

Faults (`Faults`, drawn from a `random.Random(seed)` under the state lock, so a sequential client sees the same
faults on every run with the same seed and configuration):
  - burst_rate: chance that a request starts a run of `burst_length` 429s (itself being the first of them);
    a burst in progress runs to its end even if `faults` is replaced.
  - fail_rate: 500 without applying the call.
  - timeout_rate: the call IS applied, then the answer waits `timeout_seconds`, so a client with a shorter read
    timeout times out after the commit (the contract: "your request will still be completed").
  - drop_rate: the connection is reset (TCP RST) without any response and without applying the call.
  fail, timeout and drop share one draw per request, so their rates must add up to at most 1.

Choices where the contract is silent: a custom field's type is fixed by its first write (a later write with
another type is 400); custom values must not be null; standard fields take JSON scalars; `+` in a path decodes to
a space (the contract asks clients to send `%2B`); `_NewEmail` re-keys a contact (409 if the new email belongs
to another contact); bookmarks are the last contact id of a page and pages are in contact-id order, so adding or
removing members between pages never repeats or skips the others; the request log's `path` is the raw path
without query string and `n` counts the contacts sent in contact writes, whatever the status.

Measuring throughput (no timing assertions in the tests): start `python -m tools.autopilot_sim --port 8765
--rate 0 --api-key k`, then run N threads, each with its own `requests.Session`, posting
`{"contacts": [{"Email": "tN-i@example.com"}]}` to /v1/contacts for a few seconds, and divide the number of
200s by the elapsed time (or count the `GET /_sim/log` entries). Expect well over 500 requests/s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from bisect import bisect_left, bisect_right, insort
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote_plus

from tools.state_lock import tied_to_parent

STANDARD_FIELDS = frozenset({
    "Email", "FirstName", "LastName", "Salutation", "Company", "NumberOfEmployees", "Title", "Industry", "Phone",
    "MobilePhone", "Fax", "Website", "MailingStreet", "MailingCity", "MailingState", "MailingPostalCode",
    "MailingCountry", "LeadSource", "Status", "LinkedIn", "Twitter", "owner_name", "unsubscribed",
})
SPECIAL_KEYS = frozenset({"_autopilot_list", "_NewEmail", "notify", "custom", "unsubscribed"})
ALLOWED_KEYS = STANDARD_FIELDS | SPECIAL_KEYS
MAX_BULK = 100
PAGE_SIZE = 100
CUSTOM_KEY = re.compile(r"(string|integer|float|date|boolean)--(\S+)")
THROTTLED_BURST = "Your request was throttled. Please try again later."


@dataclass(frozen=True)
class Faults:
    """Injected failures; see the module docstring. Rates are fractions of authorised, unthrottled requests."""

    fail_rate: float = 0.0
    timeout_rate: float = 0.0
    drop_rate: float = 0.0
    burst_rate: float = 0.0
    burst_length: int = 5
    timeout_seconds: float = 12.0

    def __post_init__(self) -> None:
        for name in ("fail_rate", "timeout_rate", "drop_rate", "burst_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.fail_rate + self.timeout_rate + self.drop_rate > 1.0:
            raise ValueError("fail_rate + timeout_rate + drop_rate must not exceed 1")
        if self.burst_length < 1 or self.timeout_seconds < 0:
            raise ValueError("burst_length must be at least 1 and timeout_seconds not negative")

    @property
    def outcome_total(self) -> float:
        return self.fail_rate + self.timeout_rate + self.drop_rate


@dataclass(slots=True)
class _Reply:
    status: int
    payload: object = None  # None: empty body
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    drop: bool = False


def _error_body(status: int, message: str) -> dict:
    return {"error": HTTPStatus(status).phrase, "message": message}


class ApiError(Exception):
    """An error answer; `message=None` answers with an empty body (as some Autopilot 404s do)."""

    def __init__(self, status: int, message: str | None):
        super().__init__(message)
        self.reply = _Reply(status, None if message is None else _error_body(status, message))


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


# --- validation (pure: runs before anything is written, so a refused call changes nothing) ----------------------
def _is_date(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)  # Python 3.11 parses the common ISO 8601 forms, including a trailing Z
    except ValueError:
        return False
    return True


_TYPE_CHECKS: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "date": _is_date,
}


def plausible_email(value: object) -> bool:
    """One "@" with text on both sides and no whitespace: the bar a bulk upsert holds every contact to."""
    if not isinstance(value, str) or value.count("@") != 1 or any(c.isspace() for c in value):
        return False
    local, domain = value.split("@")
    return bool(local and domain)


def _check_custom(custom: object) -> None:
    if not isinstance(custom, dict):
        raise _bad("custom must be a JSON object.")
    for key, value in custom.items():
        match = CUSTOM_KEY.fullmatch(key)
        if match is None:
            raise _bad(f"Invalid custom field key {key!r}: expected <type>--<Name> (spaces as --) with type "
                       "string, integer, float, date or boolean.")
        if not _TYPE_CHECKS[match[1]](value):
            raise _bad(f"Custom field {key!r} needs a {match[1]} value, got {json.dumps(value)}.")


def _check_contact(doc: object) -> None:
    if not isinstance(doc, dict):
        raise _bad("Each contact must be a JSON object.")
    email = doc.get("Email")
    if email is None:
        raise _bad("Contact has no Email; Email is required.")
    if not plausible_email(email):
        raise _bad(f"Invalid Email {json.dumps(email)}.")
    unknown = sorted(doc.keys() - ALLOWED_KEYS)
    if unknown:
        raise _bad(f"Unknown contact field(s): {', '.join(unknown)}.")
    for key in doc.keys() & STANDARD_FIELDS:
        if not (doc[key] is None or isinstance(doc[key], str | int | float)):
            raise _bad(f"Field {key} must be a string, number, boolean or null.")
    for key in ("unsubscribed", "notify"):
        if key in doc and not isinstance(doc[key], bool):
            raise _bad(f"Field {key} must be a boolean.")
    if "_NewEmail" in doc and not plausible_email(doc["_NewEmail"]):
        raise _bad(f"Invalid _NewEmail {json.dumps(doc['_NewEmail'])}.")
    if "_autopilot_list" in doc and not isinstance(doc["_autopilot_list"], str):
        raise _bad("_autopilot_list must be a list id string.")
    _check_custom(doc.get("custom", {}))


def _check_batch_rekeys(docs: list[dict]) -> None:
    """Within one bulk call a _NewEmail must not collide with any other email in it, so applying the contacts
    one by one can never hit a conflict half-way (the call is all or nothing)."""
    if not any("_NewEmail" in doc for doc in docs):
        return
    seen = Counter(doc["Email"].lower() for doc in docs)
    seen.update(doc["_NewEmail"].lower() for doc in docs if "_NewEmail" in doc)
    for doc in docs:
        new = doc.get("_NewEmail", "").lower()
        if new and new != doc["Email"].lower() and seen[new] > 1:
            raise _bad(f"_NewEmail {doc['_NewEmail']} collides with another contact in this request.")


def _field(payload: object, key: str, kind: type) -> object:
    value = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(value, kind):
        raise _bad(f"The request body must be a JSON object with {key!r} ({kind.__name__}).")
    return value


def _custom_field(key: str, value: object) -> dict:
    kind, name = key.split("--", 1)
    return {"kind": name.replace("--", " "), "value": value, "fieldType": kind}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse_json(body: bytes) -> object:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise _bad("The request body is not valid JSON.") from None


# --- state --------------------------------------------------------------------------------------------------
class _Members:
    """One list's members: a set for lookups plus the ids in sorted order, so a bookmark (the last id of a page)
    keeps its place when members are added or removed between pages."""

    __slots__ = ("ids", "order")

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.order: list[str] = []

    def add(self, cid: str) -> bool:
        if cid in self.ids:
            return False
        self.ids.add(cid)
        insort(self.order, cid)
        return True

    def discard(self, cid: str) -> bool:
        if cid not in self.ids:
            return False
        self.ids.remove(cid)
        del self.order[bisect_left(self.order, cid)]
        return True

    def page(self, bookmark: str | None) -> tuple[list[str], str | None]:
        start = bisect_right(self.order, bookmark) if bookmark else 0
        chunk = self.order[start:start + PAGE_SIZE]
        more = start + PAGE_SIZE < len(self.order)
        return chunk, (chunk[-1] if more else None)


class _Store:
    """Contacts, lists and memberships. Not thread-safe: the simulator only calls it under its lock."""

    def __init__(self, seed: int):
        self._ids = random.Random(seed)  # its own generator: fault draws must not depend on how many ids were made
        self._counter = 0
        self.contacts: dict[str, dict] = {}  # contact_id -> record
        self.by_email: dict[str, str] = {}  # lower-case email -> contact_id
        self.lists: dict[str, str] = {}  # list_id -> title
        self.members: dict[str, _Members] = {}
        self.field_types: dict[str, str] = {}  # custom field name -> type, fixed by its first write

    def new_id(self, prefix: str) -> str:
        # The counter leads so ids sort by creation (list pages); the random tail makes them look like Autopilot's.
        self._counter += 1
        tail = f"{self._ids.getrandbits(96):024X}"
        return f"{prefix}_{self._counter:08X}-{tail[:4]}-{tail[4:8]}-{tail[8:12]}-{tail[12:]}"

    def find(self, who: str) -> dict | None:
        cid = who if who in self.contacts else self.by_email.get(who.lower())
        return self.contacts.get(cid) if cid else None

    def check(self, docs: list[dict]) -> None:
        """Conflicts with stored state: custom field types and _NewEmail owners."""
        types = dict(self.field_types)
        for doc in docs:
            for key in doc.get("custom", {}):
                kind, name = key.split("--", 1)
                known = types.setdefault(name, kind)
                if known != kind:
                    raise _bad(f"Custom field {name!r} is a {known} field; {key!r} does not match it.")
            new = doc.get("_NewEmail")
            owner = self.by_email.get(new.lower()) if new else None
            if owner is not None and owner != self.by_email.get(doc["Email"].lower()):
                raise ApiError(409, f"_NewEmail {new} already belongs to another contact.")

    def upsert(self, doc: dict) -> str:
        key = doc["Email"].lower()
        record = self.contacts.get(self.by_email.get(key, ""))
        if record is None:
            record = {"contact_id": self.new_id("person"), "custom": {}, "unsubscribed": False}
            self.contacts[record["contact_id"]] = record
            self.by_email[key] = record["contact_id"]
        record.update((k, v) for k, v in doc.items() if k in STANDARD_FIELDS)
        for custom_key, value in doc.get("custom", {}).items():
            kind, name = custom_key.split("--", 1)
            self.field_types.setdefault(name, kind)
            record["custom"][custom_key] = value
        if "_NewEmail" in doc:
            del self.by_email[key]
            self.by_email[doc["_NewEmail"].lower()] = record["contact_id"]
            record["Email"] = doc["_NewEmail"]
        return record["contact_id"]

    def delete(self, record: dict) -> None:
        cid = record["contact_id"]
        del self.contacts[cid]
        del self.by_email[record["Email"].lower()]
        for members in self.members.values():
            members.discard(cid)

    def public(self, record: dict) -> dict:
        out = {k: v for k, v in record.items() if k != "custom"}
        out["custom_fields"] = [_custom_field(k, v) for k, v in record["custom"].items()]
        out["lists"] = [lid for lid, members in self.members.items() if record["contact_id"] in members.ids]
        return out

    def snapshot_contacts(self) -> dict[str, dict]:
        return {r["Email"].lower(): {**r, "custom": dict(r["custom"])} for r in self.contacts.values()}

    def member_emails(self, list_id: str) -> set[str]:
        return {self.contacts[cid]["Email"].lower() for cid in self.members[list_id].ids}


# --- the simulator --------------------------------------------------------------------------------------------
class AutopilotSim:
    """The Autopilot v1 API on 127.0.0.1. `rate`, `faults` and the key may be changed while it runs."""

    def __init__(self, api_key: str, rate: float | None = 5.0, port: int = 0, faults: Faults | None = None,
                 seed: int = 0):
        self.rate = rate
        self.faults = faults or Faults()
        self._api_key = api_key
        self._requested_port = port
        # The front door (log, key, limiter, bursts, config) has a lock of its own, apart from the store's: a
        # request is logged and counted against the rate as it arrives, as an API gateway does, not after the
        # requests ahead of it have been applied (that queued their stamps behind each other's work).
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()  # the contacts and lists, and the fault generator
        self._rng = random.Random(seed)
        self._store = _Store(seed)
        self._windows: dict[str, deque[float]] = {}
        self._burst_left = 0
        self._log: list[dict] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> AutopilotSim:
        self._stopping.clear()
        self._server = _Server(self, self._requested_port)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="autopilot-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in a timeout fault
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> AutopilotSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the simulator is not running")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # state accessors (snapshots, safe from any thread)
    def contacts(self) -> dict[str, dict]:
        with self._store_lock:
            return self._store.snapshot_contacts()

    def lists(self) -> dict[str, str]:
        with self._store_lock:
            return dict(self._store.lists)

    def members(self, list_id: str) -> set[str]:
        with self._store_lock:
            return self._store.member_emails(list_id)

    def request_log(self) -> list[dict]:
        with self._lock:
            return [dict(record) for record in self._log]

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()

    def set_api_key(self, key: str) -> None:
        with self._lock:
            self._api_key = key

    def state(self) -> dict:
        with self._store_lock:
            store = self._store
            members = {lid: sorted(store.member_emails(lid)) for lid in store.lists}
            return {"contacts": store.snapshot_contacts(), "lists": dict(store.lists), "members": members}

    # request handling
    def dispatch(self, method: str, raw_path: str, api_key: str | None, body: bytes) -> _Reply:
        """Answer one request. Called by the HTTP handler, for each request on its own thread."""
        path = raw_path.split("?", 1)[0]
        if path.startswith("/_sim/"):
            return self._admin(method, path, body)
        with self._lock:
            record: dict = {"t": time.time(), "method": method, "path": path}
            self._log.append(record)
            admitted = self._admit(method, path, api_key, record)
        reply = admitted if isinstance(admitted, _Reply) else self._call(*admitted, body, record)
        record["status"] = None if reply.drop else reply.status
        return reply

    def _admit(self, method: str, path: str, api_key: str | None, record: dict) -> _Reply | tuple:
        """The front door: a reply for a request it refuses, else the call to make (action, args, faults)."""
        segments = [unquote_plus(s) for s in path.split("/") if s]
        route = self._route(segments[1:]) if segments[:1] == ["v1"] else None
        if route is None:
            return _Reply(404, _error_body(404, f"{path} does not exist."))
        actions, args = route
        action = actions.get(method)
        if action is None:
            return _Reply(405, {"code": "MethodNotAllowedError", "message": f"{method} is not allowed"},
                          headers=(("Allow", ", ".join(actions)),))
        if api_key is None:
            return _Reply(400, _error_body(400, "No autopilotapikey header provided."))
        if api_key != self._api_key:
            return _Reply(401, _error_body(401, "Provided autopilotapikey not valid."))
        faults = self.faults
        return self._throttle(api_key, faults, record) or (action, args, faults)

    def _call(self, action: Callable, args: tuple, faults: Faults, body: bytes, record: dict) -> _Reply:
        if action in (self._post_contact, self._post_contacts, self._post_list):
            try:
                args = (_parse_json(body), *args)
            except ApiError as exc:
                return exc.reply
            if action != self._post_list:
                record["n"] = _count_contacts(args[0])
        with self._store_lock:
            fault = self._draw_fault(faults)
            if fault:
                record["fault"] = fault
            if fault == "fail":
                return _Reply(500, _error_body(500, "Simulated internal error; nothing was applied."))
            if fault == "drop":
                return _Reply(0, drop=True)
            try:
                reply = action(*args)
            except ApiError as exc:
                reply = exc.reply
        if fault == "timeout":
            reply.delay = faults.timeout_seconds
        return reply

    def _throttle(self, key: str, faults: Faults, record: dict) -> _Reply | None:
        if self._burst_left or (faults.burst_rate and self._rng.random() < faults.burst_rate):
            self._burst_left = (self._burst_left or faults.burst_length) - 1
            record["fault"] = "burst"
            return _Reply(429, _error_body(429, THROTTLED_BURST))
        if not self.rate:
            return None
        now = time.monotonic()
        window = self._windows.setdefault(key, deque())
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= self.rate:
            return _Reply(429, _error_body(429, f"You have exceeded your request rate of {self.rate:g} r/s."))
        window.append(now)  # only accepted requests count toward the window
        return None

    def _draw_fault(self, faults: Faults) -> str | None:
        if not faults.outcome_total:
            return None
        draw = self._rng.random()
        if draw < faults.fail_rate:
            return "fail"
        if draw < faults.fail_rate + faults.timeout_rate:
            return "timeout"
        return "drop" if draw < faults.outcome_total else None

    def _route(self, segments: list[str]) -> tuple[dict[str, Callable], tuple] | None:
        match segments:
            case ["contact"]:
                return {"POST": self._post_contact}, ()
            case ["contacts"]:
                return {"POST": self._post_contacts}, ()
            case ["contacts", "custom_fields"]:
                return {"GET": self._get_custom_fields}, ()
            case ["contact", who]:
                return {"GET": self._get_contact, "DELETE": self._delete_contact}, (who,)
            case ["contact", who, "unsubscribe"]:
                return {"POST": self._unsubscribe}, (who,)
            case ["lists"]:
                return {"GET": self._get_lists}, ()
            case ["list"]:
                return {"POST": self._post_list}, ()
            case ["list", list_id, "contacts", *rest] if len(rest) <= 1:
                return {"GET": self._get_list_contacts}, (list_id, *rest)
            case ["list", list_id, "contact", who]:
                return {"GET": self._get_member, "POST": self._add_member, "DELETE": self._remove_member}, (
                    list_id, who)
        return None

    # --- API calls (run under the lock) -------------------------------------------------------------------
    def _post_contact(self, payload: object) -> _Reply:
        doc = _field(payload, "contact", dict)
        _check_contact(doc)
        list_id = doc.get("_autopilot_list")
        if list_id is not None:
            self._require_list(list_id)  # before writing: an unknown list refuses the whole call
        self._store.check([doc])
        cid = self._store.upsert(doc)
        if list_id is not None:
            self._store.members[list_id].add(cid)
        return _Reply(200, {"contact_id": cid})

    def _post_contacts(self, payload: object) -> _Reply:
        docs = _field(payload, "contacts", list)
        if not docs:
            raise _bad("contacts must not be empty.")
        if len(docs) > MAX_BULK:
            raise _bad(f"At most {MAX_BULK} contacts can be sent in one request; got {len(docs)}.")
        for doc in docs:
            _check_contact(doc)  # any invalid contact refuses the whole call: clients must split to find it
        _check_batch_rekeys(docs)
        self._store.check(docs)
        ids = [self._store.upsert(doc) for doc in docs]  # _autopilot_list is not honoured in bulk (contract)
        mapping = {doc["Email"]: cid for doc, cid in zip(docs, ids, strict=True)}
        return _Reply(200, {"contact_ids": ids, "email_contact_map": mapping})

    def _get_custom_fields(self) -> _Reply:
        types = self._store.field_types
        return _Reply(200, [{"name": name.replace("--", " "), "fieldType": kind} for name, kind in types.items()])

    def _get_contact(self, who: str) -> _Reply:
        return _Reply(200, self._store.public(self._require_contact(who)))

    def _delete_contact(self, who: str) -> _Reply:
        self._store.delete(self._require_contact(who))
        return _Reply(204)

    def _unsubscribe(self, who: str) -> _Reply:
        self._require_contact(who)["unsubscribed"] = True
        return _Reply(200, {})

    def _get_lists(self) -> _Reply:
        lists = [{"list_id": lid, "title": title} for lid, title in self._store.lists.items()]
        return _Reply(200, {"lists": lists})

    def _post_list(self, payload: object) -> _Reply:
        name = _field(payload, "name", str)
        if not name.strip():
            raise _bad("name must not be empty.")
        if name in self._store.lists.values():
            raise ApiError(409, "A list with this name already exists.")
        list_id = self._store.new_id("contactlist")
        self._store.lists[list_id] = name
        self._store.members[list_id] = _Members()
        return _Reply(200, {"list_id": list_id})

    def _get_list_contacts(self, list_id: str, bookmark: str | None = None) -> _Reply:
        members = self._require_list(list_id)
        chunk, next_bookmark = members.page(bookmark)
        body = {"contacts": [self._store.public(self._store.contacts[cid]) for cid in chunk],
                "total_contacts": len(members.order)}
        if next_bookmark:
            body["bookmark"] = next_bookmark
        return _Reply(200, body)

    def _get_member(self, list_id: str, who: str) -> _Reply:
        members = self._require_list(list_id)
        record = self._store.find(who)
        if record is None or record["contact_id"] not in members.ids:
            raise ApiError(404, None)  # Autopilot answers "not a member" with an empty 404
        return _Reply(200, self._store.public(record))

    def _add_member(self, list_id: str, who: str) -> _Reply:
        members = self._require_list(list_id)
        added = members.add(self._require_contact(who)["contact_id"])
        return _Reply(200, {} if added else {"not_modified": True})

    def _remove_member(self, list_id: str, who: str) -> _Reply:
        members = self._require_list(list_id)
        record = self._store.find(who)
        if record is not None:
            members.discard(record["contact_id"])
        return _Reply(200, {})

    def _require_contact(self, who: str) -> dict:
        record = self._store.find(who)
        if record is None:
            raise ApiError(404, "Contact could not be found.")
        return record

    def _require_list(self, list_id: str) -> _Members:
        members = self._store.members.get(list_id)
        if members is None:
            raise ApiError(404, "List could not be found.")
        return members

    # --- admin endpoints (no auth, no faults, no log) -------------------------------------------------------
    def _admin(self, method: str, path: str, body: bytes) -> _Reply:
        match method, path:
            case "GET", "/_sim/state":
                return _Reply(200, self.state())
            case "GET", "/_sim/log":
                return _Reply(200, {"log": self.request_log()})
            case "POST", "/_sim/reset-log":
                self.reset_log()
                return _Reply(200, {})
            case "POST", "/_sim/config":
                try:
                    self._configure(_parse_json(body))
                except ApiError as exc:
                    return exc.reply
                return _Reply(200, {"rate": self.rate, "faults": asdict(self.faults)})
        return _Reply(404, _error_body(404, f"{method} {path} does not exist."))

    def _configure(self, config: object) -> None:
        if not isinstance(config, dict) or config.keys() - {"api_key", "rate", "faults"}:
            raise _bad("Expected a JSON object with any of api_key, rate, faults.")
        rate = config.get("rate", self.rate)
        if not (rate is None or (isinstance(rate, int | float) and not isinstance(rate, bool) and rate >= 0)):
            raise _bad("rate must be a non-negative number or null.")
        try:
            faults = Faults(**config["faults"]) if "faults" in config else self.faults
        except (TypeError, ValueError) as exc:
            raise _bad(f"Invalid faults: {exc}") from None
        with self._lock:
            self.faults = faults
            self.rate = rate
            self._api_key = config.get("api_key", self._api_key)


def _count_contacts(payload: object) -> int:
    if not isinstance(payload, dict):
        return 0
    if isinstance(payload.get("contacts"), list):
        return len(payload["contacts"])
    return 1 if isinstance(payload.get("contact"), dict) else 0


# --- HTTP --------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so pooled sessions reuse connections; every answer has a length
    disable_nagle_algorithm = True  # headers and body are separate writes; Nagle would hold back the body
    server_version = "autopilot-sim"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: a stderr line per request would cost more than the request itself."""

    def _serve(self) -> None:
        body = self._read_body()
        if body is None:
            return
        sim = self.server.sim
        reply = sim.dispatch(self.command, self.path, self.headers.get("autopilotapikey"), body)
        if reply.drop:
            self._reset()
            return
        if reply.delay:
            sim._stopping.wait(reply.delay)  # the write is already applied: a "timeout after commit"
        self._send(reply)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send(_Reply(411, _error_body(411, "Send the body with a Content-Length.")))
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send(_Reply(400, _error_body(400, "Invalid Content-Length.")))
            return None
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        # SO_LINGER 0 turns the close into a TCP reset: the client's connection dies with no response at all.
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _send(self, reply: _Reply) -> None:
        body = b"" if reply.payload is None else json.dumps(reply.payload, separators=(",", ":")).encode()
        self.send_response(reply.status)
        if body:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        if reply.status != 204:
            self.send_header("Content-Length", str(len(body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a client holding a connection open must never keep the process alive
    request_queue_size = 128  # benchmarks open many pooled connections at once

    def __init__(self, sim: AutopilotSim, port: int):
        self.sim = sim
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's own does a reverse DNS lookup we do not need
        self.server_name, self.server_port = self.server_address[:2]

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        """End idle keep-alive connections, so their handler threads exit when the simulator stops."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client hung up mid-request: normal under fault tests, not a simulator bug
        super().handle_error(request, client_address)


# --- CLI ---------------------------------------------------------------------------------------------------
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.autopilot_sim", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--rate", type=float, default=5.0, help="requests/s per key; 0 = unthrottled")
    parser.add_argument("--api-key", required=True, help="the key the simulator accepts")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--timeout-rate", type=float, default=0.0)
    parser.add_argument("--timeout-seconds", type=float, default=12.0)
    parser.add_argument("--drop-rate", type=float, default=0.0)
    parser.add_argument("--burst-rate", type=float, default=0.0)
    parser.add_argument("--burst-length", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state-dump", type=Path, help="write the final state as JSON here on exit")
    args = parser.parse_args(argv)
    try:
        args.faults = Faults(args.fail_rate, args.timeout_rate, args.drop_rate, args.burst_rate, args.burst_length,
                             args.timeout_seconds)
    except ValueError as exc:
        parser.error(str(exc))
    return args


class SimProcess:
    """The simulator in a process of its own, with AutopilotSim's state accessors (read over its admin API).

    Rate-discipline checks need it: in one process with the Function workers, the simulator's request
    timestamps would carry the workers' GIL stalls rather than the arrival times Autopilot would see."""

    def __init__(self, api_key: str, rate: float | None = 5.0, faults: Faults | None = None, seed: int = 0,
                 log_path: Path | None = None):
        self._argv = [sys.executable, "-m", "tools.autopilot_sim", "--port", "0", "--rate", str(rate or 0),
                      "--api-key", api_key, "--seed", str(seed)]
        self._faults = faults or Faults()
        self._proc: subprocess.Popen | None = None
        self._log_path = log_path  # where its log lines go (default: this process's stderr)
        self.base_url = ""

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def process(self) -> subprocess.Popen | None:
        return self._proc

    def start(self, timeout: float = 30.0) -> SimProcess:
        root = Path(__file__).resolve().parent.parent
        log = None
        if self._log_path:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self._log_path, "wb")  # the child keeps its own copy of the descriptor
        # A session of its own: Ctrl-C in a terminal reaches only the caller, which stops the simulator itself
        # (or its death does: tied_to_parent).
        self._proc = subprocess.Popen(self._argv, cwd=root, stdout=subprocess.PIPE, stderr=log, text=True,
                                      start_new_session=True, preexec_fn=tied_to_parent)
        if log:
            log.close()
        ready = threading.Timer(timeout, self._proc.kill)  # bounds the wait for the "listening" line
        ready.start()
        line = self._proc.stdout.readline()
        ready.cancel()
        found = re.search(r"listening on (http://\S+/v1)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"the Autopilot simulator did not start: {line!r}")
        self.base_url = found.group(1)
        self.faults = self._faults
        return self

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        if self._proc and self._proc.stdout:
            self._proc.stdout.close()

    def _admin(self, method: str, path: str, body: dict | None = None) -> dict:
        origin = self.base_url.removesuffix("/v1")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(origin + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read() or b"{}")

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._admin("POST", "/_sim/config", {"faults": asdict(faults)})
        self._faults = faults

    def set_api_key(self, key: str) -> None:
        self._admin("POST", "/_sim/config", {"api_key": key})

    def set_rate(self, rate: float) -> None:
        """Requests per second per key; 0 means unthrottled."""
        self._admin("POST", "/_sim/config", {"rate": rate})

    def contacts(self) -> dict[str, dict]:
        return self._admin("GET", "/_sim/state")["contacts"]

    def lists(self) -> dict[str, str]:
        return self._admin("GET", "/_sim/state")["lists"]

    def members(self, list_id: str) -> set[str]:
        return set(self._admin("GET", "/_sim/state")["members"][list_id])

    def request_log(self) -> list[dict]:
        return self._admin("GET", "/_sim/log")["log"]

    def reset_log(self) -> None:
        self._admin("POST", "/_sim/reset-log")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # before any thread starts, so all inherit the mask
    sim = AutopilotSim(args.api_key, rate=args.rate or None, port=args.port, faults=args.faults, seed=args.seed)
    sim.start()
    try:
        print(f"autopilot-sim listening on {sim.base_url}", flush=True)
        signal.sigwait(stop_signals)
        if args.state_dump:
            args.state_dump.write_text(json.dumps(sim.state(), indent=1))
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
