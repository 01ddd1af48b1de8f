"""The Function App's triggers. Each hands over to `shared/` at once; Azure types stay in this file."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys

import azure.functions as func

from shared import console, http_api, services
from shared.pipeline import delivery, retention, runs
from shared.runtime.settings import (
    BATCH_QUEUE,
    HOST_CONNECTION,
    PLAN_POISON_QUEUE,
    PLAN_QUEUE,
    POISON_QUEUE,
    SettingsError,
    api_authentication,
)


def _auth_level() -> func.AuthLevel:
    """Function keys, unless the platform checks Entra ID tokens (then http_api.guarded checks the principal it
    forwards). A bad value keeps the keys, and every call answers 500 naming the setting."""
    try:
        entra = api_authentication(os.environ) == "entra"
    except SettingsError:
        entra = False
    return func.AuthLevel.ANONYMOUS if entra else func.AuthLevel.FUNCTION


app = func.FunctionApp(http_auth_level=_auth_level())
log = logging.getLogger("autopilot.triggers")
# The Azure SDKs log every storage and Key Vault request at INFO: noise in the logs, and cost in App Insights.
logging.getLogger("azure").setLevel(logging.WARNING)
# A sender must wake within a few ms of its request slot (rate_budget.TOLERANCE) while other threads of the
# worker encode and queue batches: hand the GIL over every 1 ms instead of Python's default 5 ms.
sys.setswitchinterval(0.001)
# Planning allocates objects by the million and the worker's full collections paused every thread for 50-75 ms
# (a sender waking up to 3 request slots late): the imports are moved out of the collector's sight, and young
# objects are collected every 50,000 allocations instead of 700, so most of a planned chunk's objects die first.
gc.set_threshold(50000, 20, 20)


def _answer(req: func.HttpRequest, call, *args) -> func.HttpResponse:
    status, body = http_api.guarded(req.method, req.headers, call, *args)
    return func.HttpResponse(json.dumps(body, default=str), status_code=status, mimetype="application/json")


@app.timer_trigger(arg_name="timer", schedule="%EXPORT_SCHEDULE%", run_on_startup=False, use_monitor=True)
def scheduled_sync(timer: func.TimerRequest) -> None:
    """Queue a planning job for every enabled export with a snapshot not yet synced; once an hour, delete what is
    past retention."""
    if timer.past_due:
        log.warning("the export schedule is past due; running now")
    svc = services.current()
    runs.scheduled_tick(svc)
    try:
        retention.sweep_if_due(svc)
    except Exception:  # the tick's own work is done: a later sweep tries again
        log.exception("the retention sweep failed")


@app.event_grid_trigger(arg_name="event")
def snapshot_written(event: func.EventGridEvent) -> None:
    """Customer Insights wrote a model.json: Event Grid's subscription on the export account (infra/app/events.bicep)
    passes BlobCreated events of model.json blobs. Runs start within seconds instead of at the next tick."""
    runs.snapshot_written(services.current(), event.event_type, event.subject)


@app.route(route="exports/{name}/runs", methods=["POST"])
def start_run(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.start_run, req.route_params.get("name", ""), req.get_body())


@app.route(route="exports/{name}/runs", methods=["GET"])
def list_runs(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.list_runs, req.route_params.get("name", ""), dict(req.params))


@app.route(route="runs/{run_id}", methods=["GET"])
def get_run(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.get_run, req.route_params.get("run_id", ""))


@app.route(route="runs/{run_id}/rejected", methods=["GET"])
def rejected_rows(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.rejected_rows, req.route_params.get("run_id", ""))


@app.route(route="exports", methods=["GET"])
def list_exports(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.list_exports)


@app.route(route="runs/{run_id}/replay", methods=["POST"])
def replay_run(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.replay_run, req.route_params.get("run_id", ""))


@app.route(route="runs/{run_id}/cancel", methods=["POST"])
def cancel_run(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.cancel_run, req.route_params.get("run_id", ""))


@app.route(route="me", methods=["GET"])
def whoami(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.whoami, req.headers)


@app.route(route="connections", methods=["GET"])
def list_connections(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.list_connections)


@app.route(route="connections/{name}/test", methods=["POST"])
def test_connection(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.test_connection, req.route_params.get("name", ""))


@app.route(route="definitions", methods=["GET"])
def get_definitions(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.get_definitions)


@app.route(route="definitions/exports/{name}", methods=["PUT"])
def save_export(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.save_export, req.route_params.get("name", ""), req.get_body(), *_versions(req))


@app.route(route="definitions/connections/{name}", methods=["PUT"])
def save_connection(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.save_connection, req.route_params.get("name", ""), req.get_body(), *_versions(req))


def _versions(req: func.HttpRequest) -> tuple[str | None, str | None]:
    """The If-Match and If-None-Match headers: the version of the definitions an edit was made on."""
    return req.headers.get("if-match"), req.headers.get("if-none-match")


@app.route(route="sources/segments", methods=["GET"])
def list_segments(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.list_segments, dict(req.params))


@app.route(route="sources/columns", methods=["GET"])
def list_columns(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(req, http_api.list_columns, dict(req.params))


@app.route(route="console/{*path}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def console_file(req: func.HttpRequest) -> func.HttpResponse:
    """The operator console's page, script and style (no data: the page calls the API with the caller's key)."""
    status, headers, body = console.console_file(req.route_params.get("path") or "")
    return func.HttpResponse(body, status_code=status, headers=headers, mimetype=headers["Content-Type"])


@app.queue_trigger(arg_name="msg", queue_name=PLAN_QUEUE, connection=HOST_CONNECTION)
def plan_run(msg: func.QueueMessage) -> None:
    """Plan a queued run, or queue the next window of a running run's batches."""
    runs.handle_plan_message(services.current(), msg.get_body(), msg.dequeue_count or 1)


@app.queue_trigger(arg_name="msg", queue_name=PLAN_POISON_QUEUE, connection=HOST_CONNECTION)
def record_failed_plan(msg: func.QueueMessage) -> None:
    """A planning job that failed on every delivery: its run fails, saying so, and frees its export."""
    runs.fail_planning(services.current(), msg.get_body())


@app.queue_trigger(arg_name="msg", queue_name=BATCH_QUEUE, connection=HOST_CONNECTION)
async def send_batch(msg: func.QueueMessage) -> None:
    """Send one batch to its destination; an exception makes the host retry it, then poison it. Asynchronous: the
    worker runs invocations on its event loop, so one instance keeps as many requests in flight as the rate and the
    API's answer time need (host.json's batchSize + newBatchThreshold at most), each holding no thread."""
    await delivery.process_batch(services.current(), msg.get_body(), msg.dequeue_count or 1)


@app.queue_trigger(arg_name="msg", queue_name=POISON_QUEUE, connection=HOST_CONNECTION)
def record_dead_batch(msg: func.QueueMessage) -> None:
    """Settle a dead batch on its run (kept in the `dead` container for replay)."""
    delivery.record_dead(services.current(), msg.get_body())


gc.freeze()  # everything imported and defined so far lives as long as the worker
