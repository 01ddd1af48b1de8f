"""The operator console: its files as the app serves them, and its pages in a real browser (headless Chromium from
Debian's packages, driven by Selenium) against the local stack. Screenshots of each page are kept in tests/out/."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as seen
from selenium.webdriver.support.ui import WebDriverWait

from shared import console
from tests.support import COLUMN, close_world, definition, open_world
from tools.generate_export import sample_profiles

SCREENS = Path(__file__).resolve().parent / "out" / "console"


# === the files ==================================================================================================
def test_the_page_and_its_files_come_with_a_policy_that_allows_no_inline_script_or_other_origin():
    status, headers, body = console.console_file("")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"./app.js" in body
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert console.console_file("app.js")[1]["Content-Type"].startswith("text/javascript")
    assert console.console_file("app.css")[1]["Content-Type"].startswith("text/css")


@pytest.mark.parametrize("path", ["../function_app.py", "..%2Ffunction_app.py", "/etc/passwd", "app.py",
                                  "sub/app.js", ".app.js", "APP.JS", "index.html/", "nothing.js"])
def test_nothing_but_the_console_s_own_files_is_served(path):
    status, headers, body = console.console_file(path)
    assert status == 404 and body == b"no such console file" and "Content-Security-Policy" in headers


def test_the_console_s_script_builds_pages_without_html_from_data():
    """Values from a CSV, a definition or an API's answer reach the page as text only: no HTML is built from
    strings, no handler is inline, nothing is evaluated (the policy forbids it too)."""
    script = (console.ROOT / "app.js").read_text()
    for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                  "setAttribute(\"on", "localStorage", ".style."):
        assert risky not in script, risky
    page = (console.ROOT / "index.html").read_text()
    assert "<script>" not in page and " style=" not in page and " on" + "click" not in page


# === in a browser ===============================================================================================
def _browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)


@pytest.fixture
def browser():
    driver = _browser()
    SCREENS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _wait(driver, css: str, timeout: float = 30, text: str | None = None):
    wait = WebDriverWait(driver, timeout, poll_frequency=0.1)
    if text is not None:
        wait.until(seen.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))
    return wait.until(seen.visibility_of_element_located((By.CSS_SELECTOR, css)))


def _with_bad_emails(count: int, bad: int) -> list[tuple]:
    """`count` profiles, the last `bad` of them with an address that is not one."""
    rows = [list(row) for row in sample_profiles(count, seed=91)]
    for number, row in enumerate(rows[count - bad:]):
        row[COLUMN["PrimaryEmail"]] = f"not-an-address-{number}"
    return [tuple(row) for row in rows]


def test_the_rejected_rows_route_answers_every_row_masked_and_says_when_it_stops(world, monkeypatch):
    from shared import http_api

    world.define(definition("hv"))
    world.snapshot(_with_bad_emails(60, 30))
    run_id = world.run("hv")["runId"]
    url = f"{world.host.base_url}/api/runs/{run_id}/rejected"
    answer = world.api.get(url, timeout=30).json()
    assert (len(answer["rows"]), answer["truncated"]) == (30, False)  # the view's sample holds 20
    assert {row["row"] for row in answer["rows"]} == set(range(31, 61))  # data rows, counted from 1
    assert all("PrimaryEmail" in row["reason"] and "not-an-address" not in row["email"] for row in answer["rows"])
    monkeypatch.setattr(http_api, "REJECTED_MOST", 10)
    answer = world.api.get(url, timeout=30).json()
    assert (len(answer["rows"]), answer["truncated"]) == (10, True)
    assert world.api.get(url.replace(run_id, "20260101T000000Z-0123abcd"), timeout=30).status_code == 404


def test_an_operator_signs_in_with_a_key_dry_runs_runs_and_reads_the_history(browser, tmp_path):
    world = open_world()
    try:
        world.define(definition("hv"))
        world.snapshot(_with_bad_emails(325, 25))
        base = f"{world.host.base_url}/api/console/"
        assert requests.get(f"{world.host.base_url}/api/exports", timeout=30).status_code == 401  # the data needs a key
        browser.get(base)
        _wait(browser, "#key-input").send_keys(world.host.function_key)
        browser.find_element("css selector", "#key-save").click()
        row = _wait(browser, 'tr[data-export="hv"]')
        browser.save_screenshot(str(SCREENS / "exports.png"))

        row.find_element("css selector", 'button[data-action="dry-run"]').click()
        _wait(browser, "#run-status", timeout=60, text="dry run")
        _wait(browser, "#plan-preview")
        browser.save_screenshot(str(SCREENS / "dry-run.png"))

        browser.get(base)
        _wait(browser, 'tr[data-export="hv"] button[data-action="run"]').click()
        _wait(browser, "#run-status", timeout=90, text="succeeded")
        assert "300" in _wait(browser, "#run-counts").text
        assert "of 50.0 requests/s" in _wait(browser, "#run-rate").text  # the connection's rate (open_world's)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#rejected-table tbody tr")) == 20  # the view's sample
        browser.save_screenshot(str(SCREENS / "run.png"))
        browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
        _wait(browser, "#download-all-rejected").click()
        saved = tmp_path / f"rejected-{browser.current_url.rsplit('/', 1)[-1]}-all.csv"
        WebDriverWait(browser, 30).until(lambda _: saved.exists())
        lines = saved.read_text().splitlines()
        assert len(lines) == 26 and lines[0].startswith('"partition","row","reason","email"')
        run_id = browser.current_url.rsplit("/", 1)[-1]

        browser.get(f"{base}#/exports/hv")
        _wait(browser, f'tr[data-run="{run_id}"]')
        assert browser.find_elements("css selector", "#runs-chart rect")
        browser.save_screenshot(str(SCREENS / "history.png"))
        assert len(world.field_members()) == 300
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors  # no script error, nothing the policy refused
        assert world.host.function_key not in browser.page_source
    finally:
        close_world(world)


def test_make_console_serves_the_demo_export_and_never_prints_its_key(tmp_path):
    """`make console` (tools/console.py): the page and the demo's export are served; the key is in a file only its
    owner reads, not in the output; SIGTERM stops it and everything it started."""
    root = Path(__file__).resolve().parent.parent
    log = tmp_path / "console.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "tools.console", "--port", "0"], cwd=root, stdout=out,
                                   stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items()
                                                                  if k != "LOCAL_FUNCTION_KEY"})
    try:
        deadline = time.monotonic() + 90
        while "The console:" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.2)
        url = re.search(r"The console: (\S+)", log.read_text()).group(1)
        page = requests.get(url, timeout=30)
        assert page.status_code == 200 and "Content-Security-Policy" in page.headers
        key_file = root / ".local" / "console-key"
        key = key_file.read_text().strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and key not in log.read_text()
        exports = requests.get(url.replace("/console/", "/exports"), headers={"x-functions-key": key}, timeout=30)
        assert [e["name"] for e in exports.json()["exports"]] == ["high-value"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
