"""A small local Functions host: drives the very decorated functions of `function_app.py` on the local stack.

Azure Functions Core Tools cannot be installed offline, so this host does, for development and tests, what
the real host does: it polls the Azurite queues and calls the queue-triggered functions with base64-decoded
messages (honouring host.json's batchSize, newBatchThreshold, maxDequeueCount then `<queue>-poison`,
visibilityTimeout and maxPollingInterval), serves the HTTP functions on loopback under /api with function-key
checks, fires the timer on demand (as the real host's admin API does: POST /admin/functions/{name}), and takes
Event Grid's deliveries for Event Grid triggers where the real host does (POST
/runtime/webhooks/eventgrid?functionName={name}, keyed: the real host wants its eventgrid_extension key, this one
its function key): the subscription handshake answered, then each event one invocation, the answer after them
(an error answer makes Event Grid deliver again). When the app takes Entra ID tokens (API_AUTHENTICATION=entra),
tools/easy_auth_standin.py stands in front of it for the platform's built-in authentication.

    python -m tools.local_host --settings local.settings.json --port 7071
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import importlib.util
import inspect
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import azure.functions as func
from azure.core.exceptions import ResourceExistsError
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest
from azure.storage.queue import QueueClient

from shared.runtime.settings import SettingsError, api_authentication
from shared.runtime.storage import pooled_transport
from tools import easy_auth_standin as easy_auth
from tools.event_grid import WEBHOOK_PATH
from tools.http_framing import FramingError, read_body

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("local_host")
LEASE_SECONDS = 600  # how long a message stays invisible while a function works on it (the real host renews)


_indexed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # app -> its functions


def index(app: func.FunctionApp) -> list:
    """The app's functions. `get_functions()` may run once per app (a second call fails its unique-name check,
    as the real host only indexes once), so several hosts in one process share the first result. (Keyed by the
    app itself: an id can be reused by a later app once the first is collected.)"""
    if app not in _indexed:
        _indexed[app] = app.get_functions()
    return _indexed[app]


@dataclass(frozen=True)
class QueueOptions:
    """The `extensions.queues` part of host.json, with the real host's defaults."""

    batch_size: int = 16
    new_batch_threshold: int = 8
    max_dequeue_count: int = 5
    visibility_timeout: float = 0.0
    max_polling_interval: float = 60.0

    @classmethod
    def from_host_json(cls, path: Path = ROOT / "host.json") -> QueueOptions:
        queues = json.loads(path.read_text()).get("extensions", {}).get("queues", {})
        return cls(
            batch_size=int(queues.get("batchSize", cls.batch_size)),
            new_batch_threshold=int(queues.get("newBatchThreshold", cls.new_batch_threshold)),
            max_dequeue_count=int(queues.get("maxDequeueCount", cls.max_dequeue_count)),
            visibility_timeout=_timespan(queues.get("visibilityTimeout", "00:00:00")),
            max_polling_interval=_timespan(queues.get("maxPollingInterval", "00:01:00")),
        )


def _timespan(value: str) -> float:
    hours, minutes, seconds = value.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


class LocalHost:
    """Hosts one FunctionApp: queue pollers, an HTTP server and timer firing, on the app settings given."""

    def __init__(self, app: func.FunctionApp, settings: dict[str, str], *, port: int | None = None,
                 function_key: str | None = None, options: QueueOptions | None = None,
                 only: Collection[str] | None = None, groups: ScaleGroups | None = None):
        self.app = app
        self.settings = settings
        self.port = port
        self.function_key = function_key or secrets.token_urlsafe(24)
        self.options = options or QueueOptions.from_host_json()
        self.functions = {f.get_function_name(): f for f in index(app) if only is None or f.get_function_name() in only}
        if only is not None and set(only) - set(self.functions):
            raise ValueError(f"no such function: {', '.join(sorted(set(only) - set(self.functions)))}")
        # With `groups`, each queue-triggered function runs in a process of its own, as Flex Consumption runs each
        # on instances of its own (per-function scaling): planning does not share the senders' interpreter.
        self.groups = groups
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self.invocations = 0
        # A worker thread pool per scale group, as Flex Consumption runs them: the HTTP functions together on their
        # own instances, every other function on instances of its own (per-function scaling). Each pool has the
        # Python worker's PYTHON_THREADPOOL_THREAD_COUNT threads.
        self.threads = worker_threads(settings)
        self.easy_auth_key = _easy_auth_key(settings) if port is not None else None
        self._workers: dict[str, ThreadPoolExecutor] = {}
        self._loops: dict[str, tuple[asyncio.AbstractEventLoop, threading.Thread]] = {}
        self._pools_lock = threading.Lock()
        self._started = False
        self._replaced: dict[str, str | None] = {}  # environment values start() replaced

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> LocalHost:
        from shared import services

        # As the real host exposes app settings to the worker; stop() puts back what they replaced, so a later
        # host in this process does not inherit a setting its own settings leave out.
        self._replaced = {name: os.environ.get(name) for name in self.settings}
        os.environ.update(self.settings)
        services.use(None)  # a fresh worker builds its clients from those settings
        self._started = True
        queued = [name for name, f in self.functions.items() if _trigger_type(f) == "queueTrigger"]
        if self.groups:
            self.groups.start(queued, self.settings)
        else:
            for name in queued:
                self._spawn(QueuePoller(self, name, self.functions[name].get_trigger().get_dict_repr()).run,
                            f"queue-{name}")
        if self.port is not None:
            self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
            self._server.daemon_threads = True
            self.port = self._server.server_address[1]
            self._spawn(self._server.serve_forever, "http")
        return self

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        if self.groups:
            self.groups.stop()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=30)
        for worker in self._workers.values():
            worker.shutdown(wait=True, cancel_futures=True)
        from shared import services

        services.use(None)  # closes the worker's connections (its loops still run), as a stopped worker would
        for loop, thread in self._loops.values():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()
        self._loops.clear()
        self._started = False
        for name, value in self._replaced.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def __enter__(self) -> LocalHost:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- invoking functions -----------------------------------------------------------------------
    def call(self, name: str, **arguments):
        """Run one invocation as the Python worker does and wait for it (the host's dispatcher waits too): a
        coroutine function on the worker's event loop, any other on its thread pool."""
        self.invocations += 1
        function = self.functions[name].get_user_function()
        coroutine = inspect.iscoroutinefunction(function)
        if not self._started:  # not started: tests that call a function directly
            return asyncio.run(function(**arguments)) if coroutine else function(**arguments)
        if coroutine:
            return asyncio.run_coroutine_threadsafe(function(**arguments), self._loop(name)).result()
        return self._worker(name).submit(function, **arguments).result()

    def _group(self, name: str) -> str:
        """The function's scale group on Flex Consumption: HTTP functions share instances, the others have their own."""
        return "http" if _trigger_type(self.functions[name]) == "httpTrigger" else name

    def _worker(self, name: str) -> ThreadPoolExecutor:
        group = self._group(name)
        with self._pools_lock:
            if group not in self._workers:
                self._workers[group] = ThreadPoolExecutor(self.threads, thread_name_prefix=f"worker-{group}")
            return self._workers[group]

    def _loop(self, name: str) -> asyncio.AbstractEventLoop:
        """The event loop of the function's worker, on a thread of its own (the worker's main thread in Azure)."""
        group = self._group(name)
        with self._pools_lock:
            if group not in self._loops:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=self._run_loop, args=(loop,), name=f"loop-{group}", daemon=True)
                thread.start()
                self._loops[group] = (loop, thread)
            return self._loops[group][0]

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_forever()

    def fire_timer(self, name: str | None = None, past_due: bool = False) -> None:
        """Fire a timer-triggered function now (the first one when no name is given)."""
        name = name or next(n for n, f in self.functions.items() if _trigger_type(f) == "timerTrigger")
        arg = self.functions[name].get_trigger().get_dict_repr()["name"]
        self.call(name, **{arg: TimerRequest(past_due=past_due)})

    def deliver_events(self, name: str, events: list[dict]) -> None:
        """Run Event Grid-triggered function `name` once per event (Event Grid schema), as the real host does with
        what Event Grid posts; the first failure is raised."""
        arg = self.functions[name].get_trigger().get_dict_repr()["name"]
        for event in events:
            when = event.get("eventTime")
            self.call(name, **{arg: func.EventGridEvent(
                id=str(event.get("id", "")), data=event.get("data") or {}, topic=str(event.get("topic", "")),
                subject=str(event.get("subject", "")), event_type=str(event.get("eventType", "")),
                event_time=datetime.fromisoformat(when) if when else None,
                data_version=str(event.get("dataVersion", "")))})

    def connection_string(self, setting: str) -> str:
        from shared.runtime.storage import DEV_STORAGE

        value = self.settings.get(setting) or os.environ.get(setting, "")
        return DEV_STORAGE if value.lower() == "usedevelopmentstorage=true" else value


class ScaleGroups:
    """Runs each queue-triggered function in a host process of its own (`python -m <module> --functions NAME`),
    as Flex Consumption runs each on instances of its own: the planner's CPU and the queue pollers' parsing do not
    hold the senders' interpreter lock. The processes stop with their parent, even a killed one."""

    READY_WITHIN = 60.0

    def __init__(self, module: str = "tools.local_host"):
        self.module = module
        self._procs: list[subprocess.Popen] = []
        self._folder: tempfile.TemporaryDirectory | None = None

    def start(self, names: list[str], settings: dict[str, str]) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="local-host-")  # private (0700): the settings go here
        folder = Path(self._folder.name)
        (folder / "settings.json").write_text(json.dumps({"IsEncrypted": False, "Values": settings}))
        for name in names:
            self._procs.append(subprocess.Popen(
                [sys.executable, "-m", self.module, "--settings", str(folder / "settings.json"), "--no-http",
                 "--functions", name, "--ready-file", str(folder / name), "--parent", str(os.getpid())],
                cwd=ROOT))  # (no function key: they serve no HTTP)
        deadline = time.monotonic() + self.READY_WITHIN
        while not all((folder / name).exists() for name in names):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self._procs):
                self.stop()
                raise RuntimeError(f"the hosts of {', '.join(names)} did not start (see their output above)")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._procs.clear()
        if self._folder:
            self._folder.cleanup()
            self._folder = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]


def worker_threads(settings: dict[str, str]) -> int:
    """PYTHON_THREADPOOL_THREAD_COUNT, else the Python worker's default: min(32, cores + 4)."""
    value = settings.get("PYTHON_THREADPOOL_THREAD_COUNT") or os.environ.get("PYTHON_THREADPOOL_THREAD_COUNT")
    return int(value) if value else min(32, (os.cpu_count() or 1) + 4)


def _easy_auth_key(settings: dict[str, str]) -> str | None:
    """The key of the Easy Auth stand-in when the app takes Entra ID tokens (the setting as the app reads it: this
    host's settings, else the environment), else None. In Azure, infra turns Easy Auth on with that setting: a
    host without the stand-in would let a client's own principal headers through, kinder than Azure."""
    merged = {**os.environ, **settings}
    try:
        entra = api_authentication(merged) == "entra"
    except SettingsError:
        return None  # the app keeps function keys and answers 500 naming the setting
    if entra and not merged.get(easy_auth.KEY_SETTING):
        raise ValueError(f"API_AUTHENTICATION is entra: the local Easy Auth stand-in needs {easy_auth.KEY_SETTING} "
                         "(tools.local_stack.LocalStack.settings() sets one)")
    return merged[easy_auth.KEY_SETTING] if entra else None


def _trigger_type(function) -> str:
    return function.get_trigger().get_binding_name()


class QueuePoller:
    """Polls one queue the way the Functions host does and runs its function on a pool of workers."""

    def __init__(self, host: LocalHost, name: str, binding: dict):
        self.host, self.name, self.opts = host, name, host.options
        connection = host.connection_string(binding.get("connection") or "AzureWebJobsStorage")
        # The Functions host polls in .NET, costing the Python worker nothing: the pollers' own client cost is kept
        # as low as the app's (the same pooled transport, no proxy look-up per request).
        self.queue = QueueClient.from_connection_string(connection, binding["queueName"], transport=pooled_transport())
        self.poison = QueueClient.from_connection_string(connection, binding["queueName"] + "-poison",
                                                         transport=pooled_transport())
        self.arg = binding["name"]
        self._busy = 0
        self._lock = threading.Lock()

    def run(self) -> None:
        for queue in (self.queue, self.poison):
            try:
                queue.create_queue()
            except ResourceExistsError:
                pass
        idle = 0.1
        with ThreadPoolExecutor(self.opts.batch_size + self.opts.new_batch_threshold) as pool:
            while not self.host._stop.is_set():
                got = self._fetch(pool)
                idle = 0.1 if got else min(idle * 2, self.opts.max_polling_interval)
                self.host._stop.wait(idle if not got else 0.01)
        self.queue.close()
        self.poison.close()

    def _fetch(self, pool: ThreadPoolExecutor) -> int:
        with self._lock:
            if self._busy > self.opts.new_batch_threshold:
                return 1  # enough in hand: check again soon without fetching
        try:
            messages = list(self.queue.receive_messages(
                messages_per_page=self.opts.batch_size, max_messages=self.opts.batch_size,
                visibility_timeout=LEASE_SECONDS))
        except Exception as exc:  # storage unreachable (Azurite restarting): keep polling
            log.warning("queue %s: receive failed: %s", self.queue.queue_name, type(exc).__name__)
            return 0
        for message in messages:
            with self._lock:
                self._busy += 1
            pool.submit(self._invoke, message)
        return len(messages)

    def _invoke(self, message) -> None:
        try:
            self._run_function(message)
        except Exception as exc:
            self._failed(message, exc)
        else:
            self._ignore_gone(lambda: self.queue.delete_message(message))
        finally:
            with self._lock:
                self._busy -= 1

    def _run_function(self, message) -> None:
        try:
            body = base64.b64decode(message.content, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("message is not valid base64 (the queue trigger expects base64)") from None
        self.host.call(self.name, **{self.arg: QueueMessage(
            id=message.id, body=body, dequeue_count=message.dequeue_count, pop_receipt=message.pop_receipt)})

    def _failed(self, message, exc: Exception) -> None:
        log.warning("function %s failed on message %s (try %d): %s: %s", self.name, message.id,
                    message.dequeue_count, type(exc).__name__, exc)
        if message.dequeue_count >= self.opts.max_dequeue_count:
            self._ignore_gone(lambda: self.poison.send_message(message.content))
            self._ignore_gone(lambda: self.queue.delete_message(message))
        else:
            self._ignore_gone(lambda: self.queue.update_message(
                message, visibility_timeout=int(self.opts.visibility_timeout)))

    @staticmethod
    def _ignore_gone(action) -> None:
        try:
            action()
        except Exception as exc:  # the message came back to another poller meanwhile: it will be seen again
            log.warning("queue bookkeeping failed: %s", type(exc).__name__)


# --- HTTP -----------------------------------------------------------------------------------------
MAX_BODY = 100 * 1024 * 1024  # the real host's request size limit
BODY_TIMEOUT = 10.0  # seconds of silence after which a request body that has not all come is refused (408)


def _query(query: str) -> dict[str, str]:
    """The query's parameters as the real host hands them over: a name given twice has its values joined with a
    comma (ASP.NET's reading), blank values kept."""
    return {name: ",".join(values) for name, values in parse_qs(query, keep_blank_values=True).items()}


def _routes(host: LocalHost) -> list[tuple[re.Pattern, set[str], str, str, str]]:
    routes = []
    for name, function in host.functions.items():
        trigger = function.get_trigger().get_dict_repr()
        if trigger["type"] != "httpTrigger":
            continue
        pattern = re.sub(r"\{\*(\w+)\}", r"(?P<\1>.*)", trigger.get("route") or name)  # a catch-all: the rest
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        methods = {str(getattr(m, "value", m)).upper() for m in trigger.get("methods") or ["GET", "POST"]}
        auth = str(getattr(trigger.get("authLevel"), "value", trigger.get("authLevel") or "function")).lower()
        routes.append((re.compile(f"/api/{pattern}"), methods, name, trigger["name"], auth))
    return routes


def _handler_for(host: LocalHost):
    routes = _routes(host)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version, sys_version = "local-functions-host", ""  # never Python's version
        default_request_version = "HTTP/1.1"  # a refused request line is answered with a status line and headers

        def log_message(self, *args) -> None:  # quiet: the functions log what matters
            pass

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own refusals (a bad request line, an unknown method) in JSON, as every answer."""
            self._send(code, {"error": message or HTTPStatus(code).phrase}, close=True)

        def __getattr__(self, name: str):
            # Every method (PATCH, OPTIONS, TRACE, any token) is dispatched: the key first, then 405 in JSON.
            if name.startswith("do_"):
                return self._dispatch
            raise AttributeError(name)

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            try:
                body = read_body(self.headers, self.rfile, self.connection, MAX_BODY, BODY_TIMEOUT)
            except FramingError as exc:
                return self._send(exc.status, {"error": str(exc)}, close=True)
            params = _query(url.query)
            if host.easy_auth_key is not None and self._easy_auth(url.path, params):
                return None  # answered by the platform's authentication, as in Azure before the host
            if url.path.startswith("/admin/functions/"):
                return self._admin(url.path.rsplit("/", 1)[-1], params)
            if url.path == WEBHOOK_PATH:
                return self._event_grid(params, body)
            matched = [(route, match) for route in routes if (match := route[0].fullmatch(url.path))]
            if any(auth != "anonymous" for (_, _, _, _, auth), _ in matched) and not self._authorised(params):
                return self._send(401, {"error": "a function key is required (?code=... or x-functions-key)"})
            for (_, methods, name, arg, _), match in matched:  # one route may be served per method by several
                if self.command not in methods:
                    continue
                request = func.HttpRequest(self.command, f"{host.base_url}{self.path}", headers=dict(self.headers),
                                           params=params, route_params=match.groupdict(), body=body)
                try:
                    response = host.call(name, **{arg: request})
                except Exception as exc:
                    log.exception("function %s failed", name)
                    return self._send(500, {"error": f"function {name} failed: {type(exc).__name__}"})
                return self._raw(response.status_code, response.get_body(), response.mimetype,
                                 headers=dict(response.headers))
            if matched:
                allowed = sorted({m for (_, methods, *_), _ in matched for m in methods})
                return self._send(405, {"error": f"{self.command[:20]} is not allowed here; allowed: "
                                                 f"{', '.join(allowed)}"}, allow=", ".join(allowed))
            self._send(404, {"error": "no function serves this route"})

        def _easy_auth(self, path: str, params: dict) -> bool:
            """The Easy Auth stand-in: drop the client's principal headers, set the platform's for a valid token,
            serve the sign-in stand-in; True when it answered (401, or the sign-in page)."""
            for name in {n.lower() for n in self.headers if n.lower().startswith(easy_auth.PRINCIPAL_PREFIX)}:
                del self.headers[name]
            if path == easy_auth.SIGN_IN_PATH:
                if self.command not in ("GET", "HEAD"):
                    self._send(405, {"error": "the sign-in takes GET"}, allow="GET, HEAD")
                    return True
                status, page = easy_auth.sign_in_page(params.get("post_login_redirect_uri", ""))
                self._raw(status, page, easy_auth.PAGE_HEADERS["Content-Type"], headers=easy_auth.PAGE_HEADERS)
                return True
            if easy_auth.excluded(path):
                return False  # let through with no principal, whatever token it carries
            token = easy_auth.token_of(self.headers)
            forwarded = easy_auth.principal_headers(token, host.easy_auth_key)
            if forwarded is None:
                self._send(401, easy_auth.unauthenticated(token))
                return True
            for name, value in forwarded.items():
                self.headers[name] = value
            return False

        def _authorised(self, params: dict) -> bool:
            given = self.headers.get("x-functions-key") or params.get("code") or ""
            return secrets.compare_digest(given.encode(), host.function_key.encode())

        def _admin(self, name: str, params: dict) -> None:
            if self.command != "POST" or not self._authorised(params):
                return self._send(401, {"error": "the admin API needs POST and the key"})
            if name not in host.functions or _trigger_type(host.functions[name]) != "timerTrigger":
                return self._send(404, {"error": f"no timer function {name!r}"})
            try:
                host.fire_timer(name)
            except Exception as exc:
                log.exception("timer %s failed", name)
                return self._send(500, {"error": f"function {name} failed: {type(exc).__name__}"})
            self._send(202, {"fired": name})

        def _event_grid(self, params: dict, body: bytes) -> None:
            if self.command != "POST" or not self._authorised(params):
                return self._send(401, {"error": "the Event Grid webhook needs POST and the key"})
            name = params.get("functionName", "")
            if name not in host.functions or _trigger_type(host.functions[name]) != "eventGridTrigger":
                return self._send(404, {"error": f"no Event Grid-triggered function {name!r}"})
            try:
                events = json.loads(body)
            except ValueError:
                return self._send(400, {"error": "the body is not JSON"})
            events = events if isinstance(events, list) else [events]
            if self.headers.get("aeg-event-type") == "SubscriptionValidation":  # Event Grid's handshake
                return self._send(200, {"validationResponse": events[0].get("data", {}).get("validationCode")})
            try:
                host.deliver_events(name, events)
            except Exception as exc:
                log.exception("function %s failed", name)
                return self._send(500, {"error": f"function {name} failed: {type(exc).__name__}"})
            self._send(202, {"delivered": len(events)})

        def _send(self, status: int, body: dict, close: bool = False, allow: str = "") -> None:
            self._raw(status, json.dumps(body).encode(), "application/json", close, allow)

        def _raw(self, status: int, body: bytes, mimetype: str | None, close: bool = False, allow: str = "",
                 headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", mimetype or "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():  # the function's own (the console's policy)
                if name.lower() not in ("content-type", "content-length"):
                    self.send_header(name, value)
            if allow:
                self.send_header("Allow", allow)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


# --- command line ---------------------------------------------------------------------------------
def host_parser(description: str) -> argparse.ArgumentParser:
    """The command line every local host shares (bench/profiled_host.py adds its own options)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--settings", default="local.settings.json", help="local.settings.json-style file")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--function-key", default=os.environ.get("LOCAL_FUNCTION_KEY"))
    parser.add_argument("--scale-groups", action="store_true",
                        help="run each queue-triggered function in a process of its own (Flex Consumption's "
                             "per-function scaling)")
    parser.add_argument("--functions", help="comma-separated: host only these functions")
    parser.add_argument("--no-http", action="store_true", help="serve no HTTP (a scale group's process)")
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)  # touched once started
    parser.add_argument("--parent", type=int, help=argparse.SUPPRESS)  # stop when this process is gone
    return parser


def host_from_args(args: argparse.Namespace, app, values: dict[str, str], module: str) -> LocalHost:
    """The LocalHost the command line asks for; `module` is run again for each scale group's process."""
    return LocalHost(app, values, port=None if args.no_http else args.port, function_key=args.function_key,
                     only=args.functions.split(",") if args.functions else None,
                     groups=ScaleGroups(module) if args.scale_groups else None)


def load_app(args: argparse.Namespace):
    """Logging as the Functions host sets it up, then the app (loaded under its settings) and its settings."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    values = json.loads(Path(args.settings).read_text())["Values"]
    return app_under(values), values


_copies: dict[func.AuthLevel, func.FunctionApp] = {}  # function_app's app imported under another auth level


def app_under(settings: dict[str, str]) -> func.FunctionApp:
    """function_app's app as the real host loads it: imported with its app settings in the environment, which set
    its routes' auth level (API_AUTHENTICATION=entra: anonymous, Easy Auth in front). This process's own import
    serves when its level agrees; else a copy of the module, imported once under the settings. Without it, a host
    in Entra mode kept the function keys of the process's import, and a signed-in browser (no key) got 401."""
    import function_app

    with mock.patch.dict(os.environ, settings):
        level = function_app._auth_level()
        if level == function_app.app._auth_level:  # (azure-functions keeps the app's default level there)
            return function_app.app
        if level not in _copies:
            spec = importlib.util.spec_from_file_location(f"function_app_{level.name.lower()}",
                                                          ROOT / "function_app.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _copies[level] = module.app
    return _copies[level]


def serve(host: LocalHost, banner: str, args: argparse.Namespace | None = None) -> None:
    """Run until SIGTERM or SIGINT (or, for a scale group's process, until its parent is gone), then stop the host
    cleanly."""
    host.start()
    if host.port is None:  # a scale group's process: its parent's output (tools.local_run's report) is stdout
        print("local host process of " + ", ".join(host.functions) + " polling (no HTTP)", file=sys.stderr,
              flush=True)
    else:
        print(banner.format(url=host.base_url), flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    if args and args.ready_file:
        args.ready_file.touch()
    while not done.wait(1.0):
        if args and args.parent and os.getppid() != args.parent:
            break  # the parent was killed: a scale group never outlives its host
    host.stop()


def main(argv: list[str] | None = None) -> None:
    args = host_parser(__doc__.splitlines()[0]).parse_args(argv)
    app, values = load_app(args)
    host = host_from_args(args, app, values, "tools.local_host")
    serve(host, "local host listening on {url}/api (functions: " + ", ".join(host.functions) + ")", args)


if __name__ == "__main__":
    main()
