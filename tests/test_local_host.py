"""The local host behaves like the Functions host where the product relies on it."""

from __future__ import annotations

import base64
import time
import uuid

import azure.functions as func
import pytest
import requests
from azure.storage.queue import QueueClient

from tools.local_host import ROOT, LocalHost, QueueOptions


def _wait_for(predicate, timeout: float = 20.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


@pytest.fixture
def queue_name() -> str:
    return f"q{uuid.uuid4().hex[:12]}"


def _app(queue_name: str, seen: list) -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

    @app.queue_trigger(arg_name="msg", queue_name=queue_name, connection="AzureWebJobsStorage")
    def always_fails(msg: func.QueueMessage) -> None:
        seen.append((msg.get_body(), msg.dequeue_count))
        raise RuntimeError("this function always fails")

    @app.route(route="echo/{word}", methods=["POST"])
    def echo(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse(req.route_params["word"] + ":" + req.get_body().decode(), status_code=201)

    return app


def test_message_that_always_fails_moves_to_poison_queue_after_max_dequeue_count(storage_connection, queue_name):
    seen: list = []
    options = QueueOptions(batch_size=4, new_batch_threshold=2, max_dequeue_count=3, visibility_timeout=0,
                           max_polling_interval=0.2)
    settings = {"AzureWebJobsStorage": storage_connection}
    with LocalHost(_app(queue_name, seen), settings, options=options):
        queue = QueueClient.from_connection_string(storage_connection, queue_name)
        _wait_for(lambda: _exists(queue))
        queue.send_message(base64.b64encode(b"hello").decode())
        poison = QueueClient.from_connection_string(storage_connection, f"{queue_name}-poison")
        poisoned = _wait_for(lambda: list(poison.peek_messages(max_messages=5)))
    assert [body for body, _ in seen] == [b"hello"] * 3
    assert [count for _, count in seen] == [1, 2, 3]
    assert base64.b64decode(poisoned[0].content) == b"hello"
    assert queue.get_queue_properties().approximate_message_count == 0


def _exists(queue: QueueClient) -> bool:
    try:
        queue.get_queue_properties()
        return True
    except Exception:
        return False


def test_http_function_needs_the_function_key(storage_connection, queue_name):
    settings = {"AzureWebJobsStorage": storage_connection}
    with LocalHost(_app(queue_name, []), settings, port=0, function_key="k3y") as host:
        url = f"{host.base_url}/api/echo/hi"
        assert requests.post(url, data=b"x", timeout=5).status_code == 401
        assert requests.post(url, data=b"x", params={"code": "wrong"}, timeout=5).status_code == 401
        ok = requests.post(url, data=b"there", headers={"x-functions-key": "k3y"}, timeout=5)
        assert (ok.status_code, ok.text) == (201, "hi:there")
        assert requests.get(url, params={"code": "k3y"}, timeout=5).status_code == 405
        assert requests.post(f"{host.base_url}/api/nothing", params={"code": "k3y"}, timeout=5).status_code == 404


def test_options_come_from_host_json():
    options = QueueOptions.from_host_json()
    assert options.max_dequeue_count == 5
    assert options.batch_size == 32  # Flex's target executions per instance: about two pages of batches a host
    assert options.new_batch_threshold == 48  # 48 to 80 sends in flight per instance: 50 r/s answered in 0.5 s
    assert options.max_polling_interval == 0.1


def test_host_json_polls_often_enough_for_the_rate_budgets_lead():
    """A message becomes visible LEAD before its turn: an idle poller must find it before then."""
    from shared.destinations.rate_budget import LEAD

    polling = QueueOptions.from_host_json().max_polling_interval
    assert polling + 0.25 <= LEAD


def test_the_worker_runs_as_many_invocations_at_once_as_its_thread_count_and_no_more():
    """PYTHON_THREADPOOL_THREAD_COUNT sizes the one worker pool every trigger shares, as in Azure."""
    import threading
    import time

    import azure.functions as func

    app = func.FunctionApp()
    running, peak, lock = [0], [0], threading.Lock()

    @app.route(route="slow", auth_level=func.AuthLevel.ANONYMOUS)
    def slow(req: func.HttpRequest) -> func.HttpResponse:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return func.HttpResponse("ok")

    host = LocalHost(app, {"PYTHON_THREADPOOL_THREAD_COUNT": "3"}, port=None).start()
    try:
        assert host.threads == 3
        calls = [threading.Thread(target=host.call, args=("slow",),
                                  kwargs={"req": func.HttpRequest("GET", "/api/slow", body=b"")}) for _ in range(9)]
        for call in calls:
            call.start()
        for call in calls:
            call.join(10)
        assert peak[0] == 3
    finally:
        host.stop()


def test_infra_and_the_local_stack_give_the_worker_the_same_thread_count():
    import json
    import re

    from shared.runtime.settings import WORKER_THREADS

    bicep = (ROOT / "infra" / "app" / "function.bicep").read_text()
    infra = re.search(r"name: 'PYTHON_THREADPOOL_THREAD_COUNT'\s+value: '(\d+)'", bicep)
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    assert infra and int(infra.group(1)) == WORKER_THREADS == int(sample["PYTHON_THREADPOOL_THREAD_COUNT"])


@pytest.mark.serial  # answers are timed
def test_http_functions_never_wait_for_threads_the_other_triggers_hold():
    """Flex scales the HTTP functions as a group on instances of their own: busy senders never delay the API."""
    import threading

    import azure.functions as func
    from azure.functions.timer import TimerRequest

    app = func.FunctionApp()
    release = threading.Event()

    @app.timer_trigger(arg_name="timer", schedule="0 0 * * * *")
    def busy(timer: func.TimerRequest) -> None:
        release.wait(10)

    @app.route(route="quick", auth_level=func.AuthLevel.ANONYMOUS)
    def quick(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("ok")

    host = LocalHost(app, {"PYTHON_THREADPOOL_THREAD_COUNT": "1"}, port=None).start()
    try:
        holder = threading.Thread(target=host.call, args=("busy",), kwargs={"timer": TimerRequest()})
        holder.start()
        began = time.monotonic()
        host.call("quick", req=func.HttpRequest("GET", "/api/quick", body=b""))
        assert time.monotonic() - began < 1.0
    finally:
        release.set()
        holder.join(10)
        host.stop()


def test_scale_groups_run_each_queue_function_in_a_process_of_its_own_and_die_with_their_host(tmp_path):
    """As Flex Consumption runs each queue-triggered function on instances of its own: a run is planned and sent
    by the scale groups' processes (the host itself polls no queue), and they never outlive it, even killed."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import threading

    from shared import services
    from tests.support import World, close_world, definition
    from tools.generate_export import sample_profiles
    from tools.local_host import ScaleGroups
    from tools.local_stack import LocalStack

    stack = LocalStack(rate=50.0).start()
    settings = stack.settings(None)
    from function_app import app

    host = LocalHost(app, settings, port=0, groups=ScaleGroups()).start()
    services.current()
    world = World(stack, host)
    try:
        assert not [t.name for t in threading.enumerate() if t.name.startswith("queue-")]
        children = list(host.groups.pids)
        assert len(children) == 4  # plan_run, record_failed_plan, send_batch, record_dead_batch
        world.define(definition("grouped"))
        world.snapshot(sample_profiles(250, seed=3))
        view = world.wait(world.start("grouped").json()["runId"], timeout=60)
        assert view["status"] == "succeeded" and view["counts"]["accepted"] == 250
        assert len(world.sim.contacts()) == 250
        # A killed host's scale groups stop too (they watch their parent).
        settings_file = tmp_path / "settings.json"
        settings_file.write_text(json.dumps({"Values": settings}))
        parent = subprocess.Popen([sys.executable, "-m", "tools.local_host", "--settings", str(settings_file),
                                   "--port", "0", "--scale-groups"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, **settings})
        _wait_for(lambda: "local host listening" in parent.stdout.readline(), timeout=60)
        orphans = [int(p.name) for p in __import__("pathlib").Path("/proc").glob("[0-9]*")
                   if _ppid(p) == parent.pid]
        assert len(orphans) == 4
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        _wait_for(lambda: not any(_alive(pid) for pid in orphans), timeout=10)
    finally:
        close_world(world)
    assert not any(_alive(pid) for pid in children)  # stopped with their host


def _ppid(proc_dir) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
