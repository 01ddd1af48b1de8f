"""Indexing: the Functions host finds every function, with the right trigger, queue, route and schedule."""

from __future__ import annotations

import json
from pathlib import Path

from function_app import app
from tools.local_host import index

ROOT = Path(__file__).resolve().parent.parent


def _triggers() -> dict[str, dict]:
    return {f.get_function_name(): f.get_trigger().get_dict_repr() for f in index(app)}


def test_every_function_is_indexed_with_its_trigger():
    triggers = _triggers()
    assert {name: t["type"] for name, t in triggers.items()} == {
        "scheduled_sync": "timerTrigger",
        "snapshot_written": "eventGridTrigger",
        "start_run": "httpTrigger",
        "list_runs": "httpTrigger",
        "get_run": "httpTrigger",
        "rejected_rows": "httpTrigger",
        "list_exports": "httpTrigger",
        "replay_run": "httpTrigger",
        "cancel_run": "httpTrigger",
        "whoami": "httpTrigger",
        "list_connections": "httpTrigger",
        "test_connection": "httpTrigger",
        "get_definitions": "httpTrigger",
        "save_export": "httpTrigger",
        "save_connection": "httpTrigger",
        "list_segments": "httpTrigger",
        "list_columns": "httpTrigger",
        "console_file": "httpTrigger",
        "plan_run": "queueTrigger",
        "record_failed_plan": "queueTrigger",
        "send_batch": "queueTrigger",
        "record_dead_batch": "queueTrigger",
    }


def test_timer_reads_its_schedule_from_an_app_setting_and_does_not_run_on_start_up():
    timer = _triggers()["scheduled_sync"]
    assert timer["schedule"] == "%EXPORT_SCHEDULE%"
    assert timer["runOnStartup"] is False
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    assert sample["EXPORT_SCHEDULE"].count(" ") == 5  # NCRONTAB has six fields


def test_queue_triggers_listen_on_the_plan_and_batch_queues_and_their_poison_queues():
    triggers = _triggers()
    queues = {"plan_run": "autopilot-plans", "record_failed_plan": "autopilot-plans-poison",
              "send_batch": "autopilot-batches", "record_dead_batch": "autopilot-batches-poison"}
    assert {name: triggers[name]["queueName"] for name in queues} == queues
    assert {triggers[n]["connection"] for n in queues} == {"AzureWebJobsStorage"}


def test_http_routes_need_a_function_key_but_the_console_s_own_files():
    routes = {name: t for name, t in _triggers().items() if t["type"] == "httpTrigger"}
    assert {n: (t["route"], [str(m.value) for m in t["methods"]]) for n, t in routes.items()} == {
        "start_run": ("exports/{name}/runs", ["POST"]),
        "list_runs": ("exports/{name}/runs", ["GET"]),
        "get_run": ("runs/{run_id}", ["GET"]),
        "rejected_rows": ("runs/{run_id}/rejected", ["GET"]),
        "list_exports": ("exports", ["GET"]),
        "replay_run": ("runs/{run_id}/replay", ["POST"]),
        "cancel_run": ("runs/{run_id}/cancel", ["POST"]),
        "whoami": ("me", ["GET"]),
        "list_connections": ("connections", ["GET"]),
        "test_connection": ("connections/{name}/test", ["POST"]),
        "get_definitions": ("definitions", ["GET"]),
        "save_export": ("definitions/exports/{name}", ["PUT"]),
        "save_connection": ("definitions/connections/{name}", ["PUT"]),
        "list_segments": ("sources/segments", ["GET"]),
        "list_columns": ("sources/columns", ["GET"]),
        "console_file": ("console/{*path}", ["GET"]),
    }
    keyless = {n for n, t in routes.items() if str(t["authLevel"].value) != "function"}
    assert keyless == {"console_file"} and str(routes["console_file"]["authLevel"].value) == "anonymous"


def test_host_json_poisons_after_a_bounded_number_of_tries_and_uses_base64():
    queues = json.loads((ROOT / "host.json").read_text())["extensions"]["queues"]
    assert queues["messageEncoding"] == "base64"
    assert 1 < queues["maxDequeueCount"] <= 10
