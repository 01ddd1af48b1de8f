"""A local simulator of the Autopilot v1 REST API, following `docs/api-contracts.md`.

The live API cannot be reached from our machines, so tests, benchmarks and the demo talk to this instead.

In process (tests)::

    with AutopilotSim("key", rate=5) as sim:          # port 0 picks a free loopback port
        requests.get(sim.base_url + "/lists", headers={"autopilotapikey": "key"})
        sim.contacts(); sim.members(list_id); sim.request_log()
        sim.faults = Faults(fail_rate=0.1)           # replaceable at runtime

As a process (benchmarks, demo)::

    SIM_API_KEY=KEY python -m tools.autopilot_sim --port 8765 --rate 5 [--fail-rate 0.01 ...] [--latency 0.3]

It prints `autopilot-sim listening on http://127.0.0.1:PORT/v1` and runs until SIGTERM/SIGINT. The request
pipeline, the rate limit, the faults, the latency (`--latency`, `--jitter`) and the admin endpoints are
tools.sim_base's; `GET /_sim/state` answers contacts, lists and members. Here a missing key is 400 (a wrong one
401), and a 429 has no Retry-After header (none was ever observed live). A timeout fault applies the call before
the answer waits, as the contract says: "your request will still be completed".

Choices where the contract is silent: a custom field's type is fixed by its first write (a later write with
another type is 400); custom values must not be null; standard fields take JSON scalars; `+` in a path decodes to
a space (the contract asks clients to send `%2B`); `_NewEmail` re-keys a contact (409 if the new email belongs
to another contact); bookmarks are the last contact id of a page and pages are in contact-id order, so adding or
removing members between pages never repeats or skips the others; `_autopilot_list` in a single upsert adds the
contact to the list only when the upsert creates it (the contract's strict reading: no source shows it adding a
contact that exists); the request log's `path` is the raw path
without query string and `n` counts the contacts sent in contact writes, whatever the status.

Measuring throughput (no timing assertions in the tests): start `SIM_API_KEY=k python -m tools.autopilot_sim
--port 8765 --rate 0`, then run N threads, each with its own `requests.Session`, posting
`{"contacts": [{"Email": "tN-i@example.com"}]}` to /v1/contacts for a few seconds, and divide the number of
200s by the elapsed time (or count the `GET /_sim/log` entries). Expect well over 500 requests/s on 2 cores.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from bisect import bisect_left, bisect_right, insort
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from http import HTTPStatus

from tools import sim_base
from tools.sim_base import Faults, Route, SimBase, SimError, _Reply, plausible_email

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


def _error_body(status: int, message: str) -> dict:
    return {"error": HTTPStatus(status).phrase, "message": message}


class ApiError(SimError):
    """An error answer; `message=None` answers with an empty body (as some Autopilot 404s do)."""

    def __init__(self, status: int, message: str | None):
        super().__init__(_Reply(status, None if message is None else _error_body(status, message)))


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
class AutopilotSim(SimBase):
    """The Autopilot v1 API on 127.0.0.1. `rate`, `faults` and the key may be changed while it runs."""

    NAME = "autopilot-sim"
    KEY_HEADER = "autopilotapikey"
    MISSING_KEY_STATUS = 400

    def __init__(self, api_key: str, rate: float | None = 5.0, port: int = 0, faults: Faults | None = None,
                 seed: int = 0, *, latency: float = 0.0, jitter: float = 0.0):
        super().__init__(api_key, rate, port, faults, seed, latency=latency, jitter=jitter)
        self._store = _Store(seed)

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

    def _admin_more(self, method: str, path: str, body: bytes) -> _Reply | None:
        """`POST /_sim/delete-list {"list_id"}`: what a user deleting a list in Autopilot's app does (the API has no
        call for it)."""
        if (method, path) != ("POST", "/_sim/delete-list"):
            return None
        data = self._json(body)
        list_id = data.get("list_id") if isinstance(data, dict) else None
        with self._store_lock:
            if list_id not in self._store.lists:
                return self._error(404, "List could not be found.")
            del self._store.lists[list_id]
            self._store.members.pop(list_id, None)
        return _Reply(200, {})

    def state(self) -> dict:
        with self._store_lock:
            store = self._store
            members = {lid: sorted(store.member_emails(lid)) for lid in store.lists}
            return {"contacts": store.snapshot_contacts(), "lists": dict(store.lists), "members": members}

    # the front door's hooks
    def _error(self, status: int, message: str) -> _Reply:
        if status == 405:
            return _Reply(405, {"code": "MethodNotAllowedError", "message": message})
        return _Reply(status, _error_body(status, message))

    def _throttled(self, burst: bool) -> _Reply:
        message = THROTTLED_BURST if burst else f"You have exceeded your request rate of {self.rate:g} r/s."
        return _Reply(429, _error_body(429, message))

    def _prepare(self, action: Callable, args: tuple, body: bytes, record: dict) -> tuple:
        if action not in (self._post_contact, self._post_contacts, self._post_list):
            return args
        payload = self._json(body)
        if action != self._post_list:
            record["n"] = _count_contacts(payload)
        return (payload, *args)

    def _route(self, segments: list[str]) -> Route | None:
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
        created = self._store.find(doc["Email"]) is None
        cid = self._store.upsert(doc)
        if list_id is not None and created:  # read strictly: a list on creation only (the contract)
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


def _count_contacts(payload: object) -> int:
    if not isinstance(payload, dict):
        return 0
    if isinstance(payload.get("contacts"), list):
        return len(payload["contacts"])
    return 1 if isinstance(payload.get("contact"), dict) else 0


# --- CLI ---------------------------------------------------------------------------------------------------
class SimProcess(sim_base.SimProcess):
    """The simulator in a process of its own, with AutopilotSim's state accessors (read over its admin API)."""

    MODULE = "tools.autopilot_sim"

    def contacts(self) -> dict[str, dict]:
        return self.state()["contacts"]

    def lists(self) -> dict[str, str]:
        return self.state()["lists"]

    def members(self, list_id: str) -> set[str]:
        return set(self.state()["members"][list_id])

    def delete_list(self, list_id: str) -> None:
        self._admin("POST", "/_sim/delete-list", {"list_id": list_id})


def main(argv: list[str] | None = None) -> int:
    args = sim_base.parse_args(sim_base.arg_parser("tools.autopilot_sim", __doc__, rate=5.0), argv)
    sim = AutopilotSim(args.api_key, rate=args.rate or None, port=args.port, faults=args.faults, seed=args.seed,
                       latency=args.latency, jitter=args.jitter)
    return sim_base.serve(sim, args.state_dump)


if __name__ == "__main__":
    sys.exit(main())
