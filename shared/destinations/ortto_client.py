"""The Ortto v1 REST client (`docs/api-contracts.md`): people merged 100 at a time, membership as a tag or a
boolean field in the same merge, custom fields created before the first merge that needs them.

Merges are synchronous (`async: false`): the answer says, person by person, whether Ortto created, merged or
suppressed them, and only what Ortto says it applied may enter the acknowledged state. An asynchronous merge
answers before anything is applied, so a run could not tell what reached the account. Our own rate budget
keeps the number of merges in flight low, which is why Ortto advises async for large volumes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

from shared.destinations.api_client import Answer, ApiClient, ApiError, Pace, Refused, Throttled, no_pace
from shared.source import ortto_fields
from shared.source.contacts import PERMISSION, mask_emails_in
from shared.source.export_config import ExportDefinition

ACKED = ("created", "merged")
# Ortto bans a caller's address for 15 s after 15 malformed requests in 15 s. Splitting a refused merge to find
# the person it refuses sends several refused requests in a row (8 for one person in 100): an instance sends at
# most BAD_MOST in any window, so two instances behind one outbound address stay clear of the ban too.
BAN_WINDOW = 15.0
BAD_MOST = 7


class BadRequests:
    """The times of the 400s this instance was answered by one account, to keep clear of Ortto's ban."""

    def __init__(self):
        self.most, self.window = BAD_MOST, BAN_WINDOW
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    async def wait(self) -> None:
        """Sleep until one more refused request would still keep below the limit (at most one window)."""
        while (delay := self._delay()) > 0:
            await asyncio.sleep(delay)

    def _delay(self) -> float:
        with self._lock:
            now = time.monotonic()
            while self._times and self._times[0] <= now - self.window:
                self._times.popleft()
            return self._times[0] + self.window - now if len(self._times) >= self.most else 0.0

    def add(self) -> None:
        with self._lock:
            self._times.append(time.monotonic())


class PeopleRefused(Refused):
    """A merge Ortto refused because none of its people was valid: `details` has its reason for each (400)."""

    def __init__(self, message: str, details: list, service: str):
        super().__init__(400, message, service)
        self.details = details


class OrttoClient(ApiClient):
    SERVICE = "Ortto"
    KEY_HEADER = "X-Api-Key"
    # A connection test: list the account's custom fields (every Ortto call is a POST; this one only reads).
    CHECK = ("POST", "/person/custom-field/get", {})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_requests = BadRequests()

    def _probe_outcome(self, status: int, detail: str) -> str:
        # A 403 is the bad-request ban when its text says so (it lifts by itself), else a refused key.
        if status == 403 and any(word in detail.lower() for word in ("banned", "too many")):
            return "throttled"
        return super()._probe_outcome(status, detail)

    async def prepare(self, export: ExportDefinition, pace: Pace = no_pace) -> str:
        """Create the custom fields the run writes that the account lacks (once per run, before any merge; its
        calls take slots of the connection's budget like every other); returns the tag in tag mode."""
        wanted = ortto_fields.custom_fields(export)
        if wanted:
            have = await self._fields(pace)
            # Each field is created on its own, so all at once: with an API 0.3 s away, one at a time cost 0.3 s a
            # field before the first merge.
            made = await asyncio.gather(*(self._create_field(ident, name, display_type, have, pace)
                                          for ident, (name, display_type) in wanted.items() if ident not in have),
                                        return_exceptions=True)  # (each one ends before the first problem is raised)
            for problem in (outcome for outcome in made if isinstance(outcome, BaseException)):
                raise problem
        return export.list if export.membership == "list" else ""

    async def _fields(self, pace: Pace) -> dict[str, str]:
        """The account's custom fields: id → name."""
        found = (await self.call("POST", "/person/custom-field/get", {}, pace)).get("fields", [])
        return {entry["field"]["id"]: entry["field"].get("name", "") for entry in found
                if isinstance(entry, dict) and isinstance(entry.get("field"), dict) and "id" in entry["field"]}

    async def _create_field(self, ident: str, name: str, display_type: str, have: dict[str, str],
                            pace: Pace) -> None:
        # Names are unique across types and a field cannot be changed: one of another type blocks ours for good.
        clash = [other for other in have if other.split(":cm:")[-1] == ident.split(":cm:")[-1]]
        if clash:
            raise ApiError(None, f"Ortto has a custom field {have[clash[0]]!r} of another type ({clash[0]}); the "
                                 f"export writes {name!r} as {ident}: rename the export's field", self.SERVICE)
        try:
            created = await self.call("POST", "/person/custom-field/create",
                                {"name": name, "type": display_type, "track_changes": False}, pace)
        except ApiError as exc:
            if ident in await self._fields(pace):  # created meanwhile by another run (Ortto's answer is undocumented)
                return
            raise ApiError(exc.status, f"Ortto refused to create the custom field {name!r} ({display_type}): "
                                       f"{exc.message}", self.SERVICE) from None
        given = created.get("field_id")
        if given != ident:
            raise ApiError(None, f"Ortto created the custom field {name!r} as {given!r}, not {ident!r}: rename the "
                                 "field in the export definitions", self.SERVICE)

    async def merge(self, items: list[dict], target: str | None, pace: Pace = no_pace) -> list[tuple[str, str, str]]:
        """Merge a batch's people in one request (overwrite): (outcome, reason, Ortto's status) per item."""
        people = [ortto_fields.person(_without_permission(item["d"]), bool(item.get("m", True)), target)
                  for item in items]
        return await self._merge(people, strategy=2, pace=pace)

    async def create_new(self, items: list[dict], pace: Pace = no_pace) -> list[tuple[str, str, str]]:
        """Give new people the email permission their export chose: an append-only merge (merge_strategy 1)
        writes `bol::p` only where a person has none, so a person it creates gets it and an existing one keeps
        theirs. Without it Ortto creates every new person subscribed."""
        people = [{"fields": {"str::email": item["d"]["Email"], "bol::p": item["d"][PERMISSION]}}
                  for item in items]
        return await self._merge(people, strategy=1, pace=pace)

    async def _merge(self, people: list[dict], strategy: int, pace: Pace) -> list[tuple[str, str, str]]:
        body = {"people": people, "merge_by": ["str::email"], "merge_strategy": strategy, "find_strategy": 0,
                "async": False, "suppression_list_field_id": "str::email"}  # never re-create someone suppressed
        await self.bad_requests.wait()
        try:
            results = (await self.call("POST", "/person/merge", body, pace)).get("people", [])
        except PeopleRefused as exc:
            if len(exc.details) != len(people):
                raise Refused(400, exc.message, self.SERVICE) from None  # not one reason a person: split it
            results = exc.details  # every person refused, each for a reason of their own: nothing to split
        if len(results) != len(people):
            reason = f"Ortto answered {len(results)} results for {len(people)} people"
            return [("failed", reason, "") for _ in people]
        return [_outcome(person) for person in results]

    def _result(self, response: Answer) -> dict:
        if response.status_code == 400:
            self.bad_requests.add()  # (an all-refused merge too: whether Ortto counts it toward the ban is unknown)
            details = _details(response)
            if details is not None:
                raise PeopleRefused(mask_emails_in(self._message(response)[:500]), details, self.SERVICE)
        return super()._result(response)

    def _error(self, status: int, message: str) -> ApiError:
        if status == 403:  # Ortto bans an address for a while after too many bad requests: wait it out
            return Throttled(f"{message} (Ortto's bad-request ban)", BAN_WINDOW, self.SERVICE)
        return super()._error(status, message)

    def _retry_after(self, response: Answer) -> float | None:
        try:
            seconds = response.json()["error"]["try-in-seconds"]
        except (ValueError, KeyError, TypeError):
            return None
        return max(0.0, float(seconds)) if isinstance(seconds, int | float) else None

    def _message(self, response: Answer) -> str:
        """Ortto's reason, with its request id for Ortto's support."""
        try:
            body = response.json()
        except ValueError:
            return response.text or response.reason_phrase or ""
        if not isinstance(body, dict):
            return str(body)
        error = body.get("error")
        text = error.get("message") if isinstance(error, dict) else error
        request_id = body.get("request_id")
        return f"{text or body}" + (f" (request_id {request_id})" if request_id else "")


def _without_permission(document: dict) -> dict:
    return {k: v for k, v in document.items() if k != PERMISSION} if PERMISSION in document else document


def _details(response: Answer) -> list | None:
    """The per-person entries of a 400 (Ortto's "No valid contacts provided"), or None if it has none."""
    try:
        details = response.json().get("details")
    except (ValueError, AttributeError):
        return None
    if isinstance(details, list) and details and all(isinstance(d, dict) and "status" in d for d in details):
        return details
    return None


def _outcome(person: dict) -> tuple[str, str, str]:
    """A person's result: acknowledged, refused by Ortto for a reason of its own (never sent again in this run),
    or failed (an answer this client does not know)."""
    status = str(person.get("status", ""))
    if status in ACKED:
        return "acked", "", status
    error = mask_emails_in(str(person.get("error") or "")[:300])
    if status == "suppressed":
        return "refused", f"Ortto suppressed this person: {error or 'on the suppression list'}", status
    if status == "invalid":
        return "refused", f"Ortto refused this person: {error or 'invalid'}", status
    return "failed", f"Ortto answered {status or 'no status'} for this person", status
