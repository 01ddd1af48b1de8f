"""The Autopilot v1 REST client: one pooled `requests` session, timeouts, errors the sender can act on.

Pacing is the caller's: every request first calls `pace()`, which waits for a slot of the shared budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter

from shared.contacts import mask_emails_in
from shared.secrets import ApiKeyProvider

CONNECT_TIMEOUT = 3.05  # seconds; a little over a TCP retransmit window


class AutopilotError(Exception):
    def __init__(self, status: int | None, message: str):
        super().__init__(f"Autopilot answered {status}: {message}" if status else message)
        self.status = status
        self.message = message


class ApiKeyRejected(AutopilotError):
    """Autopilot refused the key even after re-reading it from Key Vault: the run cannot go on."""


class Throttled(AutopilotError):
    def __init__(self, message: str, retry_after: float | None):
        super().__init__(429, message)
        self.retry_after = retry_after


class Transient(AutopilotError):
    """5xx, timeout or dropped connection: the request may or may not have been applied; retry it."""


class Refused(AutopilotError):
    """400: Autopilot refused the request's content."""


def _no_pace() -> None:
    return None


class AutopilotClient:
    def __init__(self, base_url: str, api_key: ApiKeyProvider, read_timeout: float = 10.0, pool_size: int = 32):
        self.base_url = base_url.rstrip("/")
        self.timeout = (CONNECT_TIMEOUT, read_timeout)
        self.api_key = api_key
        self.session = requests.Session()
        self.session.trust_env = False  # no .netrc or proxy look-up on every request
        adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    # --- contacts and lists -----------------------------------------------------------------------
    def upsert_contacts(self, documents: list[dict], pace: Callable[[], None] = _no_pace) -> dict:
        return self.call("POST", "/contacts", {"contacts": documents}, pace)

    def upsert_contact(self, document: dict, list_id: str | None, pace: Callable[[], None] = _no_pace) -> dict:
        contact = dict(document, _autopilot_list=list_id) if list_id else document
        return self.call("POST", "/contact", {"contact": contact}, pace)

    def remove_from_list(self, list_id: str, email: str, pace: Callable[[], None] = _no_pace) -> None:
        try:
            self.call("DELETE", f"/list/{quote(list_id, safe='')}/contact/{quote(email, safe='@')}", None, pace)
        except AutopilotError as exc:
            if exc.status != 404:  # an unknown contact is not on the list: the goal holds
                raise

    def find_list(self, name_or_id: str, pace: Callable[[], None] = _no_pace) -> str | None:
        """The id of the list with that id, or with that title compared without case; None if there is none.
        Two lists with that title are an error naming both ids (which one is meant cannot be guessed)."""
        lists = self.call("GET", "/lists", None, pace).get("lists", [])
        if any(entry.get("list_id") == name_or_id for entry in lists):
            return name_or_id
        found = [entry["list_id"] for entry in lists if str(entry.get("title", "")).casefold() == name_or_id.casefold()]
        if len(found) > 1:
            raise AutopilotError(409, f"Autopilot has {len(found)} lists titled {name_or_id!r} ({', '.join(found)}): "
                                      "name the list by its id in the export's destination.list")
        return found[0] if found else None

    def resolve_list(self, name_or_id: str, pace: Callable[[], None] = _no_pace) -> str:
        """The id of the list with that id or title, created if absent (a concurrent creator's 409 is fine)."""
        found = self.find_list(name_or_id, pace)
        if found:
            return found
        if name_or_id.startswith("contactlist_"):
            raise AutopilotError(404, f"list {name_or_id} does not exist in Autopilot")
        try:
            return self.call("POST", "/list", {"name": name_or_id}, pace)["list_id"]
        except AutopilotError as exc:
            if exc.status != 409:
                raise
        found = self.find_list(name_or_id, pace)
        if not found:  # never go on with an empty id: joins would become plain upserts
            raise AutopilotError(409, f"Autopilot refused to create the list {name_or_id!r} as it exists, yet no "
                                      "list has that title or id; name the list by its id in destination.list")
        return found

    # --- transport --------------------------------------------------------------------------------
    def call(self, method: str, path: str, body: dict | None, pace: Callable[[], None] = _no_pace) -> dict:
        response = self._send(method, path, body, pace)
        if response.status_code == 401:  # the key may have been rotated: re-read it once
            self.api_key.refresh()
            response = self._send(method, path, body, pace)
            if response.status_code == 401:
                raise ApiKeyRejected(401, "Autopilot rejected the API key from Key Vault; update the secret")
        return _result(response)

    def _send(self, method: str, path: str, body: dict | None, pace: Callable[[], None]) -> requests.Response:
        # Everything but the write is done before pacing (the key read, the JSON encoding): the request leaves
        # as soon as its slot comes, never late for it because of work that could have been done earlier.
        headers = {"autopilotapikey": self.api_key.get()}
        request = self.session.prepare_request(requests.Request(method, self.base_url + path, json=body,
                                                                headers=headers))
        pace()
        shown = f"{method} {mask_emails_in(path)}"  # list membership paths hold the address
        try:
            return self.session.send(request, timeout=self.timeout)
        except requests.Timeout:
            raise Transient(None, f"{shown} timed out (the write may have been applied)") from None
        except requests.ConnectionError as exc:
            raise Transient(None, f"{shown}: connection failed ({type(exc).__name__})") from None


def _result(response: requests.Response) -> dict:
    status = response.status_code
    if status < 300:
        return response.json() if response.content else {}
    message = _message(response)
    if status == 429:
        raise Throttled(message, retry_after(response.headers.get("Retry-After")))
    if status >= 500:
        raise Transient(status, message)
    if status == 400:
        raise Refused(status, message)
    raise AutopilotError(status, message)


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date (RFC 9110); None if absent
    or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _message(response: requests.Response) -> str:
    """Autopilot's reason, with any address in it masked: it reaches logs and run reports."""
    try:
        body = response.json()
        text = str(body.get("message") or body.get("error") or body) if isinstance(body, dict) else str(body)
    except ValueError:
        text = response.text or response.reason or ""
    return mask_emails_in(text[:500])
