"""What the API simulators (tools.autopilot_sim, tools.ortto_sim) share: the HTTP server, the front door
(routing, API key, rate limit, bursts, faults, request log), the admin endpoints, the CLI and the process wrapper.

Request pipeline, in order: routing (unknown path 404, wrong method 405), auth (missing key
`MISSING_KEY_STATUS`, wrong key 401), throttling, faults, then the call itself. Only authorised, routable
requests count toward the rate limit: at most `rate` accepted requests per key in any sliding one-second window
(WINDOWS: a subclass may count other windows, as (seconds, requests per unit of rate) pairs); a throttled request
gets 429 (the subclass's body) and does not count. `rate` None or 0 means unthrottled. A request counts at its
arrival: when its first byte reached the simulator's socket, by the kernel's receive timestamp (SO_TIMESTAMPNS),
as an API's gateway stamps what comes off the wire. The time its thread gets to it is later by however long the
machine kept that thread waiting (on a busy 2-core machine, now and then 30 ms): counted then, an evenly paced
client would look bunched. Threads may so handle requests out of arrival order: a request is refused if any
window holding its arrival would hold one too many, whichever was handled first.

Faults (`Faults`, drawn from a `random.Random(seed)` under the state lock, so a sequential client sees the same
faults on every run with the same seed and configuration):
  - burst_rate: chance that a request starts a run of `burst_length` 429s (itself being the first of them);
    a burst in progress runs to its end even if `faults` is replaced.
  - fail_rate: 500 (or `fail_status`) without applying the call.
  - timeout_rate: the call IS applied, then the answer waits `timeout_seconds`, so a client with a shorter read
    timeout times out after the commit.
  - drop_rate: the connection is reset (TCP RST) without any response and without applying the call.
  fail, timeout and drop share one draw per request, so their rates must add up to at most 1.

Latency (a remote API answers 100-500 ms after the request, where loopback answers in about 1 ms): every answer
to a /v1 request is held `latency + uniform(0, jitter)` seconds (both default 0) before it is written. Only the
answer waits: the request is logged, counted toward the rate windows, faulted and applied when it arrives, as a
remote API's gateway and store see it; a request that arrives while another's answer waits is not held behind it
(each connection has a thread of its own, so the waits overlap). The wait is the one a timeout fault uses (the
two add up); a dropped connection is reset at once; admin endpoints never wait. The jitter is drawn, as the
request arrives, from a `random.Random` of its own seeded from `seed`, so fault draws do not depend on it and a
sequential client sees the same waits on every run. A request's log record has `latency`, the seconds its answer
was held, when that is not 0.

Admin endpoints, outside /v1, need no key, are never throttled, faulted or delayed and are not logged:
`GET /_sim/state`, `GET /_sim/log`, `POST /_sim/reset-log`, `POST /_sim/config` with any of `{"api_key": ...,
"rate": ..., "faults": {...Faults fields...}, "latency": seconds, "jitter": seconds}` (latency and jitter
non-negative numbers; it answers the rate, faults, latency and jitter now in force) and the subclass's own keys.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote_plus

from tools.state_lock import tied_to_parent

Route = tuple[dict[str, Callable], tuple]  # the actions by method, and the arguments taken from the path


@dataclass(frozen=True)
class Faults:
    """Injected failures; see the module docstring. Rates are fractions of authorised, unthrottled requests."""

    fail_rate: float = 0.0
    timeout_rate: float = 0.0
    drop_rate: float = 0.0
    burst_rate: float = 0.0
    burst_length: int = 5
    timeout_seconds: float = 12.0
    fail_status: int = 500  # what a `fail` answers: 500 by default; a 4xx to see how the client treats a refusal

    def __post_init__(self) -> None:
        for name in ("fail_rate", "timeout_rate", "drop_rate", "burst_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.fail_rate + self.timeout_rate + self.drop_rate > 1.0:
            raise ValueError("fail_rate + timeout_rate + drop_rate must not exceed 1")
        if self.burst_length < 1 or self.timeout_seconds < 0:
            raise ValueError("burst_length must be at least 1 and timeout_seconds not negative")
        if not 400 <= self.fail_status <= 599 or self.fail_status in (401, 429):
            raise ValueError("fail_status must be a 4xx or 5xx other than 401 and 429 (those are the key and the rate)")

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


class SimError(Exception):
    """Raised anywhere in a call to end it with `reply`."""

    def __init__(self, reply: _Reply):
        super().__init__(reply.payload)
        self.reply = reply


def plausible_email(value: object) -> bool:
    """One "@" with text on both sides and no whitespace: the bar a bulk upsert holds every contact to."""
    if not isinstance(value, str) or value.count("@") != 1 or any(c.isspace() for c in value):
        return False
    local, domain = value.split("@")
    return bool(local and domain)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def check_latency(latency: object, jitter: object) -> None:
    """Raises ValueError unless both are finite non-negative numbers (seconds)."""
    for name, value in (("latency", latency), ("jitter", jitter)):
        if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                and value >= 0):
            raise ValueError(f"{name} must be a non-negative number of seconds, got {json.dumps(value, default=repr)}")


# --- the simulator --------------------------------------------------------------------------------------------
class SimBase:
    """An API on 127.0.0.1 behind the shared front door. `rate`, `faults`, `latency`, `jitter` and the key may
    change while it runs.

    A subclass names itself (NAME), its key header (KEY_HEADER), answers errors in its API's shape (`_error`,
    `_throttled`), routes (`_route`), turns a body into call arguments (`_prepare`) and reports `state()`."""

    NAME = "sim"
    KEY_HEADER = "x-api-key"
    MISSING_KEY_STATUS = 401
    CONFIG_KEYS: tuple[str, ...] = ("api_key", "rate", "faults", "latency", "jitter")
    WINDOWS: tuple[tuple[float, float], ...] = ((1.0, 1),)  # (seconds, accepted requests per unit of rate)

    def __init__(self, api_key: str, rate: float | None, port: int = 0, faults: Faults | None = None,
                 seed: int = 0, *, latency: float = 0.0, jitter: float = 0.0):
        check_latency(latency, jitter)
        self.rate = rate
        self.faults = faults or Faults()
        self.latency = latency  # seconds every answer waits, plus uniform(0, jitter): see the module docstring
        self.jitter = jitter
        self._api_key = api_key
        self._requested_port = port
        # The front door (log, key, limiter, bursts, config) has a lock of its own, apart from the store's: a
        # request is logged and counted against the rate as it arrives, as an API gateway does, not after the
        # requests ahead of it have been applied (that queued their stamps behind each other's work).
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()  # the subclass's store, and the fault generator
        self._rng = random.Random(seed)
        self._jitter_rng = random.Random(f"{seed}:jitter")  # its own: fault draws must not depend on the jitter's
        self._windows: dict[str, tuple[list[float], ...]] = {}  # per key, sorted arrivals in each of WINDOWS
        self._burst_left = 0
        self._log: list[dict] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- what a subclass provides -------------------------------------------------------------------------
    def _error(self, status: int, message: str) -> _Reply:
        raise NotImplementedError

    def _throttled(self, burst: bool) -> _Reply:
        raise NotImplementedError

    def _route(self, segments: list[str]) -> Route | None:
        """The route for a path below /v1, split into decoded segments; None: no such path."""
        raise NotImplementedError

    def _prepare(self, action: Callable, args: tuple, body: bytes, record: dict) -> tuple:
        """The action's arguments, given the body; may note details in the log `record` or raise SimError."""
        return args

    def state(self) -> dict:
        raise NotImplementedError

    def _check_config(self, config: dict) -> dict:
        """Validates the subclass's CONFIG_KEYS in `config`; returns attribute -> value to set."""
        return {}

    # lifecycle
    def start(self) -> SimBase:
        self._stopping.clear()
        self._server = _Server(self, self._requested_port)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=self.NAME, daemon=True)
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

    def __enter__(self) -> SimBase:
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

    # front-door accessors (snapshots, safe from any thread)
    def request_log(self) -> list[dict]:
        with self._lock:
            return [dict(record) for record in self._log]

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()

    def set_api_key(self, key: str) -> None:
        with self._lock:
            self._api_key = key

    # request handling
    def dispatch(self, method: str, raw_path: str, api_key: str | None, body: bytes,
                 arrived: float | None = None) -> _Reply:
        """Answer one request that arrived at `arrived` (epoch seconds; None: now). Called by the HTTP handler, for
        each request on its own thread."""
        path = raw_path.split("?", 1)[0]
        if path.startswith("/_sim/"):
            return self._admin(method, path, body)
        with self._lock:
            record: dict = {"t": arrived or time.time(), "method": method, "path": path}
            self._log.append(record)
            admitted = self._admit(method, path, api_key, record)
            latency = self.latency + (self._jitter_rng.uniform(0.0, self.jitter) if self.jitter else 0.0)
        reply = admitted if isinstance(admitted, _Reply) else self._call(*admitted, body, record)
        record["status"] = None if reply.drop else reply.status
        if latency and not reply.drop:
            reply.delay += latency  # the handler holds the answer (applied, counted and logged already)
            record["latency"] = latency
        return reply

    def _admit(self, method: str, path: str, api_key: str | None, record: dict) -> _Reply | tuple:
        """The front door: a reply for a request it refuses, else the call to make (action, args, faults)."""
        segments = [unquote_plus(s) for s in path.split("/") if s]
        route = self._route(segments[1:]) if segments[:1] == ["v1"] else None
        if route is None:
            return self._error(404, f"{path} does not exist.")
        actions, args = route
        action = actions.get(method)
        if action is None:
            reply = self._error(405, f"{method} is not allowed")
            reply.headers = (("Allow", ", ".join(actions)),)
            return reply
        if api_key is None:
            return self._error(self.MISSING_KEY_STATUS, f"No {self.KEY_HEADER} header provided.")
        if api_key != self._api_key:
            return self._error(401, f"Provided {self.KEY_HEADER} not valid.")
        faults = self.faults
        return self._throttle(api_key, faults, record) or (action, args, faults)

    def _call(self, action: Callable, args: tuple, faults: Faults, body: bytes, record: dict) -> _Reply:
        try:
            args = self._prepare(action, args, body, record)
        except SimError as exc:
            return exc.reply
        with self._store_lock:
            fault = self._draw_fault(faults)
            if fault:
                record["fault"] = fault
            if fault == "fail":
                what = "internal error" if faults.fail_status == 500 else str(faults.fail_status)
                return self._error(faults.fail_status, f"Simulated {what}; nothing was applied.")
            if fault == "drop":
                return _Reply(0, drop=True)
            try:
                reply = action(*args)
            except SimError as exc:
                reply = exc.reply
        if fault == "timeout":
            reply.delay = faults.timeout_seconds
        return reply

    def _throttle(self, key: str, faults: Faults, record: dict) -> _Reply | None:
        if self._burst_left or (faults.burst_rate and self._rng.random() < faults.burst_rate):
            self._burst_left = (self._burst_left or faults.burst_length) - 1
            record["fault"] = "burst"
            return self._throttled(burst=True)
        if not self.rate:
            return None
        arrived = record["t"]
        windows = self._windows.setdefault(key, tuple([] for _ in self.WINDOWS))
        for (seconds, per_rate), stamps in zip(self.WINDOWS, windows, strict=True):
            if stamps:
                del stamps[:bisect_right(stamps, stamps[-1] - seconds - STRAGGLER)]
            if _busiest(stamps, arrived, seconds) >= per_rate * self.rate:
                return self._throttled(burst=False)
        for stamps in windows:
            insort(stamps, arrived)  # only accepted requests count toward the windows
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

    def _json(self, body: bytes) -> object:
        try:
            return json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise SimError(self._error(400, "The request body is not valid JSON.")) from None

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
                    self._configure(self._json(body))
                except SimError as exc:
                    return exc.reply
                return _Reply(200, {"rate": self.rate, "faults": asdict(self.faults), "latency": self.latency,
                                    "jitter": self.jitter})
        return self._admin_more(method, path, body) or self._error(404, f"{method} {path} does not exist.")

    def _admin_more(self, method: str, path: str, body: bytes) -> _Reply | None:
        """A subclass's own admin endpoints (what a user does in the service's app); None: no such endpoint."""
        return None

    def _configure(self, config: object) -> None:
        if not isinstance(config, dict) or config.keys() - set(self.CONFIG_KEYS):
            raise self._bad_config(f"Expected a JSON object with any of {', '.join(self.CONFIG_KEYS)}.")
        rate = config.get("rate", self.rate)
        if not (rate is None or (isinstance(rate, int | float) and not isinstance(rate, bool) and rate >= 0)):
            raise self._bad_config("rate must be a non-negative number or null.")
        try:
            faults = Faults(**config["faults"]) if "faults" in config else self.faults
        except (TypeError, ValueError) as exc:
            raise self._bad_config(f"Invalid faults: {exc}") from None
        latency, jitter = config.get("latency", self.latency), config.get("jitter", self.jitter)
        try:
            check_latency(latency, jitter)
        except ValueError as exc:
            raise self._bad_config(f"{exc}.") from None
        extra = self._check_config(config)
        with self._lock:
            self.faults = faults
            self.rate = rate
            self.latency, self.jitter = latency, jitter
            self._api_key = config.get("api_key", self._api_key)
            for name, value in extra.items():
                setattr(self, name, value)

    def _bad_config(self, message: str) -> SimError:
        return SimError(self._error(400, message))


# --- HTTP --------------------------------------------------------------------------------------------------
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python's socket module does not name it
TIMESPEC = struct.Struct("qq")  # the control message's struct timespec: seconds, nanoseconds
STRAGGLER = 1.0  # seconds a request's handling may lag a later one's; arrivals older than that are forgotten


def _busiest(stamps: list[float], arrived: float, seconds: float) -> int:
    """The most accepted arrivals (`stamps`, sorted) in any window of `seconds` that also holds `arrived`. Such a
    window starts in (arrived - seconds, arrived]; the busiest starts just after arrived - seconds, at an arrival
    in that range, or at `arrived` itself."""
    low, high = bisect_right(stamps, arrived - seconds), bisect_right(stamps, arrived)
    most = high - low
    if high == len(stamps):
        return most  # nothing arrived after it: the usual case
    starts = [stamps[i] for i in range(low, high)] + [arrived]
    return max(most, *(bisect_left(stamps, start + seconds) - bisect_left(stamps, start) for start in starts))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so pooled sessions reuse connections; every answer has a length
    disable_nagle_algorithm = True  # headers and body are separate writes; Nagle would hold back the body
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)
        self.arrived: float | None = None

    def handle_one_request(self) -> None:
        self.arrived = self._arrival()
        super().handle_one_request()

    def _arrival(self) -> float | None:
        """When the next request's first byte reached the socket, by the kernel's receive timestamp; None when the
        connection ended. Peeked, before the buffered reader takes the bytes (clients do not pipeline: at a request's
        start nothing of it is buffered yet)."""
        try:
            data, ancillary, _, _ = self.connection.recvmsg(1, socket.CMSG_SPACE(TIMESPEC.size), socket.MSG_PEEK)
        except OSError:
            return None
        for level, kind, payload in ancillary:
            if data and level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = TIMESPEC.unpack(payload[:TIMESPEC.size])
                return seconds + nanoseconds / 1e9
        return None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def version_string(self) -> str:
        return self.server.sim.NAME

    def log_message(self, format: str, *args: object) -> None:
        """Silent: a stderr line per request would cost more than the request itself."""

    def _serve(self) -> None:
        body = self._read_body()
        if body is None:
            return
        sim = self.server.sim
        reply = sim.dispatch(self.command, self.path, self.headers.get(sim.KEY_HEADER), body, self.arrived)
        if reply.drop:
            self._reset()
            return
        if reply.delay:
            # The call is already applied: the simulated latency, and a timeout fault's "timeout after commit".
            # Only this connection's thread waits; stopping the simulator wakes it.
            sim._stopping.wait(reply.delay)
        self._send(reply)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send(self.server.sim._error(411, "Send the body with a Content-Length."))
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send(self.server.sim._error(400, "Invalid Content-Length."))
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

    def __init__(self, sim: SimBase, port: int):
        self.sim = sim
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's own does a reverse DNS lookup we do not need
        # Accepted connections inherit it, so a connection's first request, there before its thread, is stamped too.
        self.socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
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
def arg_parser(module: str, doc: str, rate: float) -> argparse.ArgumentParser:
    """The flags every simulator takes; a simulator may add its own before `parse_args`."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--rate", type=float, default=rate, help="requests/s per key; 0 = unthrottled")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--timeout-rate", type=float, default=0.0)
    parser.add_argument("--timeout-seconds", type=float, default=12.0)
    parser.add_argument("--drop-rate", type=float, default=0.0)
    parser.add_argument("--burst-rate", type=float, default=0.0)
    parser.add_argument("--burst-length", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds every /v1 answer waits (default 0)")
    parser.add_argument("--jitter", type=float, default=0.0,
                        help="plus a uniform random 0..JITTER seconds, drawn per request (default 0)")
    parser.add_argument("--state-dump", type=Path, help="write the final state as JSON here on exit")
    return parser


KEY_VARIABLE = "SIM_API_KEY"  # the key the simulator accepts: from the environment, never on a command line `ps` shows


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    args.api_key = os.environ.get(KEY_VARIABLE, "")
    if not args.api_key:
        parser.error(f"set the environment variable {KEY_VARIABLE} to the API key the simulator accepts")
    try:
        args.faults = Faults(args.fail_rate, args.timeout_rate, args.drop_rate, args.burst_rate, args.burst_length,
                             args.timeout_seconds)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        check_latency(args.latency, args.jitter)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def serve(sim: SimBase, state_dump: Path | None) -> int:
    """Run `sim` (not yet started) until SIGTERM/SIGINT, then write its state to `state_dump` if given."""
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # before any thread starts, so all inherit the mask
    # No full collections: with 100,000 people stored, each paused every request thread for 40 to 66 ms, once every
    # 7 s, so requests that left on time were stamped late, bunched, and the next second's first request drew a 429
    # that a real API's gateway would not send. The store holds no cycles; young objects are still collected.
    gc.set_threshold(700, 10, 1_000_000_000)
    sim.start()
    try:
        print(f"{sim.NAME} listening on {sim.base_url}", flush=True)
        signal.sigwait(stop_signals)
        if state_dump:
            state_dump.write_text(json.dumps(sim.state(), indent=1))
    finally:
        sim.stop()
    return 0


class SimProcess:
    """A simulator (the module MODULE, run with `python -m`) in a process of its own, read over its admin API.

    Rate-discipline checks need it: in one process with the Function workers, the simulator's request
    timestamps would carry the workers' GIL stalls rather than the arrival times the real API would see."""

    MODULE = ""

    def __init__(self, api_key: str, rate: float | None = 5.0, faults: Faults | None = None, seed: int = 0,
                 log_path: Path | None = None, *, latency: float = 0.0, jitter: float = 0.0):
        check_latency(latency, jitter)  # here, not as a process that never says it listens
        self._argv = [sys.executable, "-m", self.MODULE, "--port", "0", "--rate", str(rate or 0), "--seed", str(seed)]
        if latency or jitter:
            self._argv += ["--latency", repr(float(latency)), "--jitter", repr(float(jitter))]
        self._env = {**os.environ, KEY_VARIABLE: api_key}
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
        self._proc = subprocess.Popen(self._argv, cwd=root, env=self._env, stdout=subprocess.PIPE, stderr=log,
                                      text=True, start_new_session=True, preexec_fn=tied_to_parent)
        if log:
            log.close()
        ready = threading.Timer(timeout, self._proc.kill)  # bounds the wait for the "listening" line
        ready.start()
        line = self._proc.stdout.readline()
        ready.cancel()
        found = re.search(r"listening on (http://\S+/v1)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"the simulator {self.MODULE} did not start: {line!r}")
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

    def configure(self, **config: object) -> dict:
        """POST /_sim/config with these keys; `faults` may be a Faults."""
        faults = config.get("faults")
        if isinstance(faults, Faults):
            config["faults"] = asdict(faults)
        answer = self._admin("POST", "/_sim/config", config)
        if isinstance(faults, Faults):
            self._faults = faults
        return answer

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self.configure(faults=faults)

    def set_api_key(self, key: str) -> None:
        self.configure(api_key=key)

    def set_rate(self, rate: float) -> None:
        """Requests per second per key; 0 means unthrottled."""
        self.configure(rate=rate)

    def set_latency(self, latency: float, jitter: float = 0.0) -> None:
        """Every answer waits `latency` + uniform(0, `jitter`) seconds from now on (0, 0: answer at once)."""
        self.configure(latency=latency, jitter=jitter)

    def state(self) -> dict:
        return self._admin("GET", "/_sim/state")

    def request_log(self) -> list[dict]:
        return self._admin("GET", "/_sim/log")["log"]

    def reset_log(self) -> None:
        self._admin("POST", "/_sim/reset-log")
