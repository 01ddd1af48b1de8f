"""The Ortto v1 REST client (`../shared/ortto-api.md`): people merged 100 at a time, membership as a tag or a
boolean field in the same merge, custom fields created before the first merge that needs them.

Merges are synchronous (`async: false`): the answer says, person by person, whether Ortto created, merged or
suppressed them, and only what Ortto says it applied may enter the acknowledged state. An asynchronous merge
answers before anything is applied, so a run could not tell what reached the account. Our own rate budget
keeps the number of merges in flight low, which is why Ortto advises async for large volumes.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import requests

from shared import ortto_fields
from shared.api_client import ApiClient, ApiError, ContactLimit, Pace, no_pace
from shared.export_config import ExportDefinition

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

    def wait(self) -> None:
        """Sleep until one more refused request would still keep below the limit (at most one window)."""
        while (delay := self._delay()) > 0:
            time.sleep(delay)

    def _delay(self) -> float:
        with self._lock:
            now = time.monotonic()
            while self._times and self._times[0] <= now - self.window:
                self._times.popleft()
            return self._times[0] + self.window - now if len(self._times) >= self.most else 0.0

    def add(self) -> None:
        with self._lock:
            self._times.append(time.monotonic())


class OrttoClient(ApiClient):
    SERVICE = "Ortto"
    KEY_HEADER = "X-Api-Key"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_requests = BadRequests()

    def prepare(self, export: ExportDefinition, pace: Pace = no_pace) -> str:
        """Create the custom fields the run writes that the account lacks (once per run, before any merge);
        returns the tag in tag mode."""
        wanted = ortto_fields.custom_fields(export)
        if wanted:
            found = self.call("POST", "/person/custom-field/get", {}, pace).get("fields", [])
            have = {entry.get("field", {}).get("id") for entry in found}
            for ident, (name, display_type) in wanted.items():
                if ident not in have:
                    self._create_field(ident, name, display_type, pace)
        return export.list if export.membership == "list" else ""

    def _create_field(self, ident: str, name: str, display_type: str, pace: Pace) -> None:
        try:
            created = self.call("POST", "/person/custom-field/create",
                                {"field": {"name": name, "type": display_type}}, pace)
        except ApiError as exc:
            if exc.status == 409:  # created meanwhile by another run
                return
            raise
        given = created.get("field", {}).get("id")
        if given != ident:
            raise ApiError(None, f"Ortto created the custom field {name!r} as {given!r}, not {ident!r}: rename the "
                                 "field in the export definitions", self.SERVICE)

    def merge(self, items: list[dict], target: str | None, pace: Pace = no_pace) -> list[tuple[str, str, str]]:
        """Merge a batch's people in one request: (outcome, reason, Ortto's status) per item, in order."""
        body = {"people": [ortto_fields.person(item["d"], bool(item.get("m", True)), target) for item in items],
                "merge_by": ["str::email"], "merge_strategy": 2, "find_strategy": 0, "async": False,
                "suppression_list_field_id": "str::email"}  # never re-create someone Ortto suppressed
        self.bad_requests.wait()
        people = self.call("POST", "/person/merge", body, pace).get("people", [])
        if len(people) != len(items):
            reason = f"Ortto answered {len(people)} results for {len(items)} people"
            return [("failed", reason, "") for _ in items]
        return [_outcome(person) for person in people]

    def _result(self, response: requests.Response) -> dict:
        if response.status_code == 400:
            self.bad_requests.add()
        return super()._result(response)

    def _error(self, status: int, message: str) -> ApiError:
        if status == 507:
            return ContactLimit(status, f"{message}: the Ortto account's contact limit is reached; nothing more is "
                                        "sent (raise the plan's limit or narrow the segment, then start a new run)",
                                self.SERVICE)
        return super()._error(status, message)

    def _retry_after(self, response: requests.Response) -> float | None:
        try:
            seconds = response.json()["error"]["try-in-seconds"]
        except (ValueError, KeyError, TypeError):
            return None
        return max(0.0, float(seconds)) if isinstance(seconds, int | float) else None

    def _message(self, response: requests.Response) -> str:
        """Ortto's reason, with its request id for Ortto's support."""
        try:
            body = response.json()
        except ValueError:
            return response.text or response.reason or ""
        if not isinstance(body, dict):
            return str(body)
        error = body.get("error")
        text = error.get("message") if isinstance(error, dict) else error
        request_id = body.get("request_id")
        return f"{text or body}" + (f" (request_id {request_id})" if request_id else "")


def _outcome(person: dict) -> tuple[str, str, str]:
    status = str(person.get("status", ""))
    if status in ACKED:
        return "acked", "", status
    if status == "suppressed":
        return "refused", f"Ortto suppressed this person: {person.get('error') or 'on the suppression list'}", status
    return "failed", f"Ortto answered {status or 'no status'} for this person", status
