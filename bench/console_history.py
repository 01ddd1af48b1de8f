"""Benchmark 11: the console's run history with 1,000 runs of one export (issue 30: it loads in under 1 s).

One real run of a small export is made, and its finished record cloned 999 times under new run ids (with the
export's index entries, as RunRecords.create writes them), so every page reads records shaped as the app writes
them. Measured: the API's first page and an old page (GET /api/exports/{name}/runs, 20 runs each), and the
console's history page in headless Chromium, from a fresh load of the page to its 20 rows and chart drawn.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta

from azure.data.tables import TableServiceClient
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from bench.data import base_rows, export_doc
from bench.env import Api, BenchError, BenchStack, CoreBurner, say
from bench.measure import Result
from shared.state.run_records import RunRecords
from tools.browser import headless_chromium

EXPORT, SEGMENT = "history", "HistorySegment"
RUNS = 1_000
LOADS = 7
TARGET_SECONDS = 1.0


def console_history(quick: bool) -> Result:
    runs = 200 if quick else RUNS
    result = Result("console_history", f"Console: the run history of an export with {runs:,} runs")
    result.inputs = {"runs": runs, "page": "20 runs", "browser": "headless Chromium (Debian), Selenium",
                     "loads": LOADS}
    with BenchStack(result.name, sim_rate=0) as stack:
        stack.define(export_doc(EXPORT, SEGMENT, "field"))
        stack.snapshot(base_rows(500), SEGMENT)
        host = stack.host(rate=50.0)
        api = Api(host)
        first = api.wait(api.start(EXPORT)["runId"], timeout=300)
        if first["status"] != "succeeded":
            raise BenchError(f"the seed run ended {first['status']}: {first.get('error')}")
        ids = _clone(stack, first["runId"], runs - 1)
        say(f"  {runs} runs of {EXPORT} recorded")
        oldest_page = ids[-21]  # the cursor of the page of the 20 oldest runs
        for label, query in (("first page", ""), ("an old page", f"&before={oldest_page}")):
            times = _api_times(api, query)
            result.add(f"API, {label}: median of {LOADS} GETs", statistics.median(times), "s")
        for label, loaded in (("idle machine", False), ("one core kept busy by another process", True)):
            with CoreBurner() if loaded else nullcontext():
                times = _page_times(stack, host)
            result.add(f"console history page, fresh load to 20 rows and chart, {label} (median of {LOADS})",
                       statistics.median(times), "s", f"< {TARGET_SECONDS:g}", max(times) < TARGET_SECONDS)
            result.add(f"console history page, slowest load, {label}", max(times), "s")
    return result


def _clone(stack: BenchStack, run_id: str, count: int) -> list[str]:
    """`count` copies of a finished run's record under older run ids, written as the app writes runs; the ids of
    all runs, newest first."""
    records = RunRecords(TableServiceClient.from_connection_string(stack.stack.storage))
    fields = {k: v for k, v in records.get(run_id).items() if k not in ("PartitionKey", "RowKey", "export", "created")}
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [f"{(start + timedelta(hours=i)).strftime('%Y%m%dT%H%M%SZ')}-{i:08x}" for i in range(count)]
    for rid in ids:
        records.create(rid, EXPORT, **fields)
    return [run_id, *reversed(ids)]


def _api_times(api: Api, query: str) -> list[float]:
    times = []
    for _ in range(LOADS):
        started = time.perf_counter()
        answer = api.http.get(f"{api.base_url}/api/exports/{EXPORT}/runs?limit=20{query}", timeout=60)
        times.append(time.perf_counter() - started)
        if answer.status_code != 200 or len(answer.json()["runs"]) != 20:
            raise BenchError(f"the history answered {answer.status_code}: {answer.text[:300]}")
    return times


def _page_times(stack: BenchStack, host) -> list[float]:
    """Seconds from asking for the history page (a fresh load, the key already in the tab's session storage) to
    its 20 rows and its chart's bars on screen."""
    browser = headless_chromium()
    try:
        base = f"{host.base_url}/api/console/"
        browser.get(base)
        browser.find_element(By.CSS_SELECTOR, "#key-input").send_keys(stack.function_key)
        browser.find_element(By.CSS_SELECTOR, "#key-save").click()
        times = []
        for _ in range(LOADS):
            browser.get("about:blank")
            started = time.perf_counter()
            browser.get(f"{base}#/exports/{EXPORT}")
            WebDriverWait(browser, 30, poll_frequency=0.01).until(
                lambda b: len(b.find_elements(By.CSS_SELECTOR, "#runs-table tr[data-run]")) == 20
                and b.find_elements(By.CSS_SELECTOR, "#runs-chart rect.bar-joiners"))
            times.append(time.perf_counter() - started)
        return times
    finally:
        browser.quit()
