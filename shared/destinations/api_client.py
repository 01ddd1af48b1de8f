"""What the destinations' REST clients share: an asynchronous HTTP client (aiohttp) with pooled keep-alive
connections, timeouts, the key read again on a 401, and errors the sender can act on. Requests are awaited, not
waited for on a thread: one instance keeps as many in flight as the rate and the API's answer time need (50 a
second answered in 0.5 s is 25 at once). Pacing is the caller's: every request first awaits `pace()`, which waits
for a slot of the connection's shared budget, and `pace.left(at)` once it has been written.

Synchronous code (planning readies the destination) runs a call with `run_sync`, on an event loop of its own."""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp

from shared.destinations.secrets import ApiKeyProvider
from shared.runtime.blocking import off
from shared.source.contacts import mask_emails_in

CONNECT_TIMEOUT = 3.05  # seconds; a little over a TCP retransmit window
T = TypeVar("T")


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
    """Waits for a request's slot (awaited), then learns when the request was written (`left`)."""

    async def __call__(self) -> None: ...

    def left(self, at: float) -> None: ...


class _NoPace:
    async def __call__(self) -> None:
        return None

    def left(self, at: float) -> None:
        return None


no_pace: Pace = _NoPace()


@dataclass(frozen=True)
class Answer:
    """A destination's answer, read whole (its body is a few KB at most)."""

    status_code: int
    content: bytes
    headers: dict
    reason_phrase: str = ""

    def json(self):
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


@dataclass(frozen=True)
class Probe:
    """What a connection test's one harmless read got: its outcome (accepted, refused, throttled or unreachable),
    the HTTP status (None: no answer), the seconds from its slot to the answer, the destination's text (trimmed,
    emails masked; never the key) and, after a 429, how long it asked callers to wait."""

    outcome: str
    status: int | None
    elapsed: float
    detail: str
    retry_after: float | None = None


class _Timed:
    """A pace that notes when the request's slot came, so a probe times the request, not its wait for the slot."""

    def __init__(self, pace: Pace):
        self.pace, self.started = pace, None

    async def __call__(self) -> None:
        await self.pace()
        self.started = time.monotonic()

    def left(self, at: float) -> None:
        self.pace.left(at)

    def elapsed(self) -> float:
        return time.monotonic() - self.started if self.started is not None else 0.0


async def _on_sent(session, context, params) -> None:
    """aiohttp's trace of a request body sent: when the request left (what the API's rate window counts)."""
    context.trace_request_ctx["written"] = time.time()


class ApiClient:
    """A destination's transport. Subclasses name the service and its key header, and may read their own error
    bodies (`_message`, `_retry_after`) and statuses (`_error`)."""

    SERVICE = "the destination"
    KEY_HEADER = ""
    CHECK: tuple[str, str, dict | None] = ("", "", None)  # a connection test's harmless read: method, path, body

    def __init__(self, base_url: str, api_key: ApiKeyProvider, read_timeout: float = 10.0, pool_size: int = 100):
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=read_timeout)
        self.pool_size = pool_size
        self.api_key = api_key
        # A client session belongs to the event loop it was made on: one per loop (the worker's, a run_sync's).
        self._sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None:
            trace = aiohttp.TraceConfig()
            trace.on_request_chunk_sent.append(_on_sent)
            session = self._sessions[loop] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.pool_size), timeout=self.timeout, trace_configs=[trace],
                trust_env=False)  # no .netrc or proxy look-up on every request
        return session

    async def call(self, method: str, path: str, body: dict | None, pace: Pace = no_pace) -> dict:
        key = self.api_key.peek() or await off(self.api_key.get)
        response = await self._send(method, path, body, pace, key)
        if response.status_code == 401:  # the key may have been rotated: re-read it once
            await off(self.api_key.refresh, key)
            response = await self._send(method, path, body, pace, await off(self.api_key.get))
            if response.status_code == 401:
                raise ApiKeyRejected(401, f"{self.SERVICE} rejected the API key from Key Vault; update the secret",
                                     self.SERVICE)
        return self._result(response)

    async def _send(self, method: str, path: str, body: dict | None, pace: Pace, key: str) -> Answer:
        # Everything but the write is done before pacing (the key read, the JSON encoding): the request leaves as
        # soon as its slot comes, never late for it because of work that could have been done before.
        session = self._session()
        headers = {self.KEY_HEADER: key}
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        sent: dict = {}
        await pace()
        shown = f"{method} {mask_emails_in(path)}"  # Autopilot's list membership paths hold the address
        try:
            async with session.request(method, self.base_url + path, data=data, headers=headers,
                                       trace_request_ctx=sent) as response:
                return Answer(response.status, await response.read(), dict(response.headers), response.reason or "")
        except TimeoutError:
            raise Transient(None, f"{shown} timed out (the write may have been applied)") from None
        except aiohttp.ClientError as exc:
            raise Transient(None, f"{shown}: connection failed ({type(exc).__name__})") from None
        finally:
            if "written" in sent:
                pace.left(sent["written"])

    @property
    def check_call(self) -> str:
        """What a connection test sends, as the console shows it (e.g. "GET /v1/lists")."""
        return f"{self.CHECK[0]} {urlsplit(self.base_url).path}{self.CHECK[1]}"

    async def check(self, pace: Pace = no_pace) -> Probe:
        """A connection test: send CHECK with the key from Key Vault and say what the destination made of it. A 401
        re-reads the key and tries once more only if Key Vault holds another key by now (a rotation)."""
        key = self.api_key.peek() or await off(self.api_key.get)
        probe = await self._probe(*self.CHECK, pace, key)
        if probe.status == 401:
            await off(self.api_key.refresh, key)
            fresh = await off(self.api_key.get)
            if fresh != key:
                probe = await self._probe(*self.CHECK, pace, fresh)
        return probe

    async def _probe(self, method: str, path: str, body: dict | None, pace: Pace, key: str) -> Probe:
        timed = _Timed(pace)
        try:
            answer = await self._send(method, path, body, timed, key)
        except Transient as exc:
            return Probe("unreachable", None, timed.elapsed(), exc.message[:200])
        status = answer.status_code
        text = f"{self.SERVICE} answered {status}" if status < 300 else self._message(answer)
        detail = mask_emails_in(text[:200]).replace(key, "***")  # (no API echoes the key; never pass one on)
        retry = self._retry_after(answer) if status == 429 else None
        return Probe(self._probe_outcome(status, detail), status, timed.elapsed(), detail, retry)

    def _probe_outcome(self, status: int, detail: str) -> str:
        """A test's answer in a word: 429 throttled, 5xx unreachable (not working now), any other 4xx refused."""
        if status < 300:
            return "accepted"
        if status == 429:
            return "throttled"
        return "unreachable" if status >= 500 else "refused"

    def _result(self, response: Answer) -> dict:
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

    def _retry_after(self, response: Answer) -> float | None:
        return retry_after(response.headers.get("Retry-After"))

    def _message(self, response: Answer) -> str:
        try:
            body = response.json()
        except ValueError:
            return response.text or response.reason_phrase or ""
        return str(body.get("message") or body.get("error") or body) if isinstance(body, dict) else str(body)

    def run_sync(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run `call()` (one of this client's coroutines) from synchronous code, on an event loop of its own."""
        async def once() -> T:
            try:
                return await call()
            finally:
                await self.aclose()

        return asyncio.run(once())

    async def aclose(self) -> None:
        """Close the running loop's connections."""
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None:
            await session.close()

    def close(self) -> None:
        """Close every running loop's connections, from outside those loops (a worker stopping); those of a
        closed loop went with it."""
        sessions, self._sessions = list(self._sessions.items()), weakref.WeakKeyDictionary()
        for loop, session in sessions:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=10)


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
