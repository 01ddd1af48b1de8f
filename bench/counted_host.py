"""The local Functions host with every Azure SDK request attributed to the invocation that made it, for the
benchmarks' storage-request counts (big_segments, throughput, rate_discipline).

    python -m bench.counted_host --settings FILE --port P --function-key K

Same CLI and behaviour as `python -m tools.local_host` (real host.json queue options, worker pools of
PYTHON_THREADPOOL_THREAD_COUNT threads); the only differences are in the log: every Azure SDK request is one
short line (`sdk` logger: `METHOD URL -> STATUS`, written by a wrapper around the SDK's transport: the SDK's own
request logging formats every header and cost as much CPU as the app's sending itself), and each line carries
`[<thread> <function>#<message id>]`, the queue-triggered invocation it belongs to (its function running on a
worker thread, and the trigger's own delete of the message after it on the poller's thread), or `-` outside one.
`requests_by_invocation` reads such a log back.
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from azure.core.pipeline.transport import RequestsTransport

from tools import local_host
from tools.local_host import QueuePoller, host_from_args, host_parser, load_app, serve

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s %(invocation)s] %(message)s"
_invocation = contextvars.ContextVar("invocation", default="-")
sdk_log = logging.getLogger("sdk")


def _counted(send):
    def wrapper(self, request, **kwargs):
        try:
            response = send(self, request, **kwargs)
        except Exception as exc:
            sdk_log.info("%s %s -> %s", request.method, request.url, type(exc).__name__)
            raise
        sdk_log.info("%s %s -> %d", request.method, request.url, response.status_code)
        return response

    return wrapper


class _Tag(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.invocation = _invocation.get()
        return True


def _tagged(invoke):
    def wrapper(poller: QueuePoller, message) -> None:
        token = _invocation.set(f"{poller.name}#{message.id}")
        try:
            invoke(poller, message)
        finally:
            _invocation.reset(token)

    return wrapper


class TagCarryingPool(ThreadPoolExecutor):
    """A pool whose tasks carry the submitting thread's invocation tag: the poller hands the function to a
    worker pool (LocalHost.call), and what the function logs there belongs to the poller's invocation. (An
    asynchronous function's task, and what it runs on the blocking pool, carry it by themselves: a task and
    shared.runtime.blocking.off run in a copy of the context they were started from.)"""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    args = host_parser(__doc__.splitlines()[0]).parse_args(argv)
    app, values = load_app(args)
    RequestsTransport.send = _counted(RequestsTransport.send)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Tag())
        handler.setFormatter(logging.Formatter(FORMAT))
    QueuePoller._invoke = _tagged(QueuePoller._invoke)
    local_host.ThreadPoolExecutor = TagCarryingPool  # the host's pools (pollers' and the worker's)
    host = host_from_args(args, app, values, "bench.counted_host")
    serve(host, "local host listening on {url}/api (requests counted per invocation; worker threads "
          f"{host.threads}; functions: " + ", ".join(host.functions) + ")", args)


# --- reading the log back -------------------------------------------------------------------------
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ (\S+) \[(.*?) (-|[\w-]+#[\w-]+)\] ", re.M)
_REQUEST = re.compile(r"^(\w+) (\S+) -> (\w+)")


def records(text: str):
    """(logger, thread, invocation, message) for every record of a counted host's log."""
    starts = list(_RECORD.finditer(text))
    for match, following in zip(starts, [*starts[1:], None], strict=True):
        end = following.start() if following else len(text)
        yield match[1], match[2], match[3], text[match.end():end]


def describe(method: str, url: str, ports: dict[str, int]) -> str:
    """A storage request as `service name: what`, e.g. `table runs: GET entity`, `queue autopilot-batches:
    DELETE message`, `blob state: GET`; anything not on the storage ports is `other <host>: METHOD`."""
    parts = urlsplit(url)
    service = next((s for s, port in ports.items() if parts.port == port), None)
    if service is None:
        return f"other {parts.hostname}:{parts.port}: {method}"
    segments = [s for s in parts.path.split("/") if s][1:]  # after the account name
    if service == "table":
        name = segments[0] if segments else ""
        table, _, key = name.partition("(")
        what = "entity" if "PartitionKey" in key else "query" if method == "GET" else "insert" if method == "POST" \
            else "table"
        return f"table {table}: {method} {what}"
    if service == "queue":
        queue = segments[0] if segments else ""
        what = "message" if len(segments) > 2 else "messages" if len(segments) == 2 else "queue"
        return f"queue {queue}: {method} {what}"
    return f"blob {segments[0] if segments else ''}: {method}"


def requests_by_invocation(log_path: Path, ports: dict[str, int], start: int = 0) -> tuple[dict, dict]:
    """From byte `start` of a counted host's log: {invocation: [request descriptions]} for queue-triggered
    invocations, and {invocation: [messages logged by the app]} (to tell what each invocation did)."""
    text = log_path.read_bytes()[start:].decode(errors="replace")
    requests: dict[str, list[str]] = defaultdict(list)
    messages: dict[str, list[str]] = defaultdict(list)
    for logger, thread, invocation, message in records(text):
        key = invocation if invocation != "-" else f"-{thread}"
        found = _REQUEST.match(message)
        if found and logger == "sdk":
            requests[key].append(describe(found[1], found[2], ports))
        elif logger.startswith("autopilot"):
            messages[key].append(message.strip())
    return dict(requests), dict(messages)


if __name__ == "__main__":
    main()
