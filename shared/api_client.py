"""What the destinations' REST clients share: one pooled `requests` session, timeouts, the key read again on a
401, and errors the sender can act on. Pacing is the caller's: every request first calls `pace()`, which waits
for a slot of the connection's shared budget, and `pace.left(at)` once it has been written."""

from __future__ import annotations

import threading
import time
from email.utils import parsedate_to_datetime
from typing import Protocol

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError

from shared.contacts import mask_emails_in
from shared.secrets import ApiKeyProvider

CONNECT_TIMEOUT = 3.05  # seconds; a little over a TCP retransmit window


class ApiError(Exception):
    def __init__(self, status: int | None, message: str, service: str = "the destination"):
        super().__init__(f"{service} answered {status}: {message}" if status else message)
        self.status = status
        self.message = message


class ApiKeyRejected(ApiError):
    """The destination refused the key even after re-reading it from Key Vault: the run cannot go on."""


class Throttled(ApiError):
    def __init__(self, message: str, retry_after: float | None, service: str = "the destination"):
        super().__init__(429, message, service)
        self.retry_after = retry_after


class Transient(ApiError):
    """5xx, timeout or dropped connection: the request may or may not have been applied; retry it."""


class Refused(ApiError):
    """400 (or 413, a body too large): the destination refused the request's content; a smaller request may pass."""


class Permanent(ApiError):
    """Another 4xx (403, 404, 409, 422...): the destination refuses the request as it is, and sending it again
    cannot change that; the batch's rest fails with the reason instead of being delivered again."""


class Pace(Protocol):
    """Waits for a request's slot (the call), then learns when the request was written (`left`)."""

    def __call__(self) -> None: ...

    def left(self, at: float) -> None: ...


class _NoPace:
    def __call__(self) -> None:
        return None

    def left(self, at: float) -> None:
        return None


no_pace: Pace = _NoPace()


class _Written(threading.local):
    at: float | None = None  # when the current thread's connection last finished writing a request


_written = _Written()


class _TimedConnection:
    """Notes when a request has been written: the time that counts toward the API's rate window, after work the
    pacer cannot see (the request's headers and body written, the thread switched out between them)."""

    def request(self, *args, **kwargs) -> None:
        super().request(*args, **kwargs)
        _written.at = time.time()


class _TimedHTTPPool(HTTPConnectionPool):
    ConnectionCls = type("TimedHTTPConnection", (_TimedConnection, HTTPConnection), {})


class _TimedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = type("TimedHTTPSConnection", (_TimedConnection, HTTPSConnection), {})


class ApiClient:
    """A destination's transport. Subclasses name the service and its key header, and may read their own error
    bodies (`_message`, `_retry_after`) and statuses (`_error`)."""

    SERVICE = "the destination"
    KEY_HEADER = ""

    def __init__(self, base_url: str, api_key: ApiKeyProvider, read_timeout: float = 10.0, pool_size: int = 32):
        self.base_url = base_url.rstrip("/")
        self.timeout = (CONNECT_TIMEOUT, read_timeout)
        self.api_key = api_key
        self.session = requests.Session()
        self.session.trust_env = False  # no .netrc or proxy look-up on every request
        adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
        adapter.poolmanager.pool_classes_by_scheme = {"http": _TimedHTTPPool, "https": _TimedHTTPSPool}
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def call(self, method: str, path: str, body: dict | None, pace: Pace = no_pace) -> dict:
        response = self._send(method, path, body, pace)
        if response.status_code == 401:  # the key may have been rotated: re-read it once
            self.api_key.refresh()
            response = self._send(method, path, body, pace)
            if response.status_code == 401:
                raise ApiKeyRejected(401, f"{self.SERVICE} rejected the API key from Key Vault; update the secret",
                                     self.SERVICE)
        return self._result(response)

    def _send(self, method: str, path: str, body: dict | None, pace: Pace) -> requests.Response:
        # Everything but the write is done before pacing (the key read, the JSON encoding, the connection): the
        # request leaves as soon as its slot comes, never late for it because of work that could have been done.
        headers = {self.KEY_HEADER: self.api_key.get()}
        request = self.session.prepare_request(requests.Request(method, self.base_url + path, json=body,
                                                                headers=headers))
        self._connect_ahead(request)
        pace()
        shown = f"{method} {mask_emails_in(path)}"  # Autopilot's list membership paths hold the address
        _written.at = None
        try:
            return self.session.send(request, timeout=self.timeout)
        except requests.Timeout:
            raise Transient(None, f"{shown} timed out (the write may have been applied)") from None
        except requests.ConnectionError as exc:
            raise Transient(None, f"{shown}: connection failed ({type(exc).__name__})") from None
        finally:
            if _written.at is not None:
                pace.left(_written.at)

    def _connect_ahead(self, request: requests.PreparedRequest) -> None:
        """Open the connection the request will take before its slot, not after it: a new connection costs the
        API's round trips (TCP, then TLS), and spent after the slot they would make the request late, which the
        pacer owes from the whole schedule after it. A failure here is left for the send to meet and report."""
        pool = self.session.get_adapter(request.url).get_connection_with_tls_context(request, self.session.verify)
        connection = pool._get_conn()  # the idle connection the send takes next (the pool is last in, first out)
        try:
            if connection.is_closed:
                connection.timeout = CONNECT_TIMEOUT
                connection.connect()
        except (OSError, HTTPError):
            connection.close()
        finally:
            pool._put_conn(connection)

    def _result(self, response: requests.Response) -> dict:
        status = response.status_code
        if status < 300:
            return response.json() if response.content else {}
        message = mask_emails_in(self._message(response)[:500])  # it reaches logs and run reports
        if status == 429:
            raise Throttled(message, self._retry_after(response), self.SERVICE)
        raise self._error(status, message)

    def _error(self, status: int, message: str) -> ApiError:
        if status >= 500:
            return Transient(status, message, self.SERVICE)
        if status in (400, 413):
            return Refused(status, message, self.SERVICE)
        if 400 <= status < 500:
            return Permanent(status, message, self.SERVICE)
        return ApiError(status, message, self.SERVICE)

    def _retry_after(self, response: requests.Response) -> float | None:
        return retry_after(response.headers.get("Retry-After"))

    def _message(self, response: requests.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            return response.text or response.reason or ""
        return str(body.get("message") or body.get("error") or body) if isinstance(body, dict) else str(body)

    def close(self) -> None:
        self.session.close()


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
