"""The operator console: its files as the app serves them, and its pages in a real browser (headless Chromium from
Debian's packages, driven by Selenium) against the local stack. Screenshots of each page are kept in tests/out/."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as seen
from selenium.webdriver.support.ui import Select, WebDriverWait

from shared import console
from shared.source.export_config import CUSTOM_TYPES, STANDARD_FIELDS
from tests.support import COLUMN, CONTAINER, close_world, definition, open_world
from tools.autopilot_sim import Faults
from tools.browser import headless_chromium
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
    script = "\n".join(path.read_text() for path in sorted(console.ROOT.glob("*.js")))
    assert "export-form.js" in (console.ROOT / "app.js").read_text()  # (every module is read here)
    for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                  "setAttribute(\"on", "localStorage", ".style."):
        assert risky not in script, risky
    page = (console.ROOT / "index.html").read_text()
    assert "<script>" not in page and " style=" not in page and " on" + "click" not in page


# === in a browser ===============================================================================================
@pytest.fixture(scope="module")
def chromium():
    """One browser for the module's tests (starting one costs about 2 s of CPU): each test gets it reset."""
    driver = headless_chromium()
    SCREENS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium):
    """The module's browser with no page, no cookie (cookies are per host, not per port: a signed-in test's session
    would reach the next test's app) and no log lines left from an earlier test."""
    chromium.get("about:blank")
    chromium.execute_cdp_cmd("Network.clearBrowserCookies", {})
    chromium.get_log("browser")
    return chromium


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


def _console(browser, world, key: str | None = None) -> str:
    """Open the console of `world` and give it the key (the world's own unless told); the console's address."""
    base = f"{world.host.base_url}/api/console/"
    browser.get(base)
    _wait(browser, "#key-input").send_keys(key or world.host.function_key)
    browser.find_element(By.CSS_SELECTOR, "#key-save").click()
    return base


def _no_script_errors(browser) -> None:
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]
              and "403" not in e["message"] and "409" not in e["message"] and "422" not in e["message"]]
    assert not errors, errors  # no script error, nothing the policy refused


def _definitions(world) -> dict:
    return json.loads(world.blobs.get_blob_client("config", "exports.json").download_blob().readall())


def test_an_admin_adds_an_export_by_form_from_the_segments_and_columns_found_and_a_wrong_field_shows_its_message(
        browser):
    world = open_world()
    try:
        world.define(definition("hv"))
        world.snapshot(sample_profiles(30, seed=5))
        world.snapshot(sample_profiles(30, seed=6), segment="NewsletterFans")
        _console(browser, world)
        _wait(browser, "#add-export").click()
        form = _wait(browser, "#export-form")
        control = lambda path: form.find_element(By.CSS_SELECTOR, f'[data-field="{path}"]')
        control("name").send_keys("fans")
        control("source.container").send_keys(CONTAINER)
        browser.find_element(By.CSS_SELECTOR, "#find-segments").click()
        _wait(browser, '[data-field="source.segment"] option[value="NewsletterFans"]')
        Select(control("source.segment")).select_by_value("NewsletterFans")
        _wait(browser, "#source-status", text="columns in the newest snapshot")
        assert Select(control("fields.Email")).first_selected_option.get_attribute("value") == "PrimaryEmail"
        Select(control("destination.membership")).select_by_value("list")
        control("destination.list").send_keys("Newsletter fans")
        control("dataTransferAcknowledged").click()
        browser.find_element(By.CSS_SELECTOR, "#add-custom-field").click()
        control("customFields[0].name").send_keys("Loyalty--Points")
        Select(control("customFields[0].column")).select_by_value("LoyaltyPoints")
        # The form offers the definitions check's own field names and custom types (the API answers them).
        mapped = form.find_elements(By.CSS_SELECTOR, '[data-field^="fields."]')
        assert [e.get_attribute("data-field").removeprefix("fields.") for e in mapped] == list(STANDARD_FIELDS)
        types = Select(control("customFields[0].type")).options
        assert [o.get_attribute("value") for o in types] == list(CUSTOM_TYPES)
        browser.save_screenshot(str(SCREENS / "export-form.png"))
        browser.find_element(By.CSS_SELECTOR, "#save-export").click()

        _wait(browser, '[data-error-for="customFields[0].name"]', text='"--"')
        assert control("customFields[0].name").get_attribute("aria-invalid") == "true"
        assert browser.switch_to.active_element == control("customFields[0].name")
        assert [e["name"] for e in _definitions(world)["exports"]] == ["hv"]  # nothing written
        browser.save_screenshot(str(SCREENS / "export-form-problem.png"))
        control("customFields[0].name").clear()
        control("customFields[0].name").send_keys("Loyalty Points")
        browser.find_element(By.CSS_SELECTOR, "#save-export").click()
        _wait(browser, 'tr[data-export="fans"]')
        saved = {e["name"]: e for e in _definitions(world)["exports"]}
        fans = saved["fans"]
        assert fans["source"] == {"connection": "EXPORT_STORAGE", "container": CONTAINER, "prefix": "",
                                  "segment": "NewsletterFans"}
        assert fans["destination"]["list"] == "Newsletter fans" and fans["dataTransferAcknowledged"] is True
        assert fans["fields"]["Email"] == "PrimaryEmail"
        assert fans["customFields"] == [{"name": "Loyalty Points", "type": "string", "column": "LoyaltyPoints"}]
        assert saved["hv"] == definition("hv")  # the other export is as it was
        _no_script_errors(browser)
    finally:
        close_world(world)


def test_an_edit_made_meanwhile_by_someone_else_is_refused_and_kept(browser):
    world = open_world()
    try:
        world.define(definition("hv"))
        world.snapshot(sample_profiles(30, seed=5))
        base = _console(browser, world)
        browser.get(f"{base}#/exports/hv/edit")
        form = _wait(browser, "#export-form")
        _wait(browser, "#source-status", text="columns in the newest snapshot")
        someone_else = definition("hv", maxProfiles=5000)
        world.define(someone_else)  # saved by someone else after this page read the definitions
        field = form.find_element(By.CSS_SELECTOR, '[data-field="maxRemovalPercent"]')
        field.clear()
        field.send_keys("35")
        browser.find_element(By.CSS_SELECTOR, "#save-export").click()
        _wait(browser, "#message", text="409")
        assert "someone else" in browser.find_element(By.CSS_SELECTOR, "#message").text
        assert _definitions(world)["exports"] == [someone_else]  # not overwritten
        browser.refresh()
        form = _wait(browser, "#export-form")
        assert form.find_element(By.CSS_SELECTOR, '[data-field="maxProfiles"]').get_attribute("value") == "5000"
    finally:
        close_world(world)


def test_the_connections_page_tests_a_key_and_says_how_to_set_one_never_showing_it(browser):
    world = open_world()
    try:
        world.define(definition("hv"))
        base = _console(browser, world)
        browser.get(f"{base}#/connections")
        row = _wait(browser, 'tr[data-connection="default"]')
        assert "readable" in row.find_element(By.CSS_SELECTOR, 'td[data-field="key"]').text
        assert "hv" in row.text and "az keyvault secret set" in _wait(browser, "#key-help").text
        row.find_element(By.CSS_SELECTOR, 'button[data-action="test"]').click()
        result = _wait(browser, 'tr[data-connection="default"] [data-field="test-result"] strong')
        assert result.text == "key accepted"
        assert row.find_element(By.CSS_SELECTOR, '[data-field="test-result"]').get_attribute(
            "data-outcome") == "accepted"
        browser.save_screenshot(str(SCREENS / "connections.png"))
        assert world.stack.api_key not in browser.page_source
        _no_script_errors(browser)
    finally:
        close_world(world)


@pytest.mark.long
def test_an_operator_cancels_a_long_run_from_its_page(browser):
    world = open_world(rate=5)
    try:
        world.define(definition("hv"))
        world.snapshot(sample_profiles(3000, seed=8))  # 30 upserts at 5/s: 6 s of sending at least
        _console(browser, world)
        _wait(browser, 'tr[data-export="hv"] button[data-action="run"]').click()
        _wait(browser, "#run-status", timeout=60, text="running")
        _wait(browser, "#cancel-run").click()
        _wait(browser, "#run-status", timeout=90, text="cancelled")
        run_id = browser.current_url.rsplit("/", 1)[-1]
        view = world.api.get(f"{world.host.base_url}/api/runs/{run_id}", timeout=30).json()
        assert view["status"] == "cancelled" and len(world.field_members()) < 3000
        assert not browser.find_element(By.CSS_SELECTOR, "#cancel-run").is_displayed()
        browser.save_screenshot(str(SCREENS / "cancelled.png"))
    finally:
        close_world(world)


def test_an_operator_sees_a_run_s_dead_batch_and_replays_it(browser):
    world = open_world(settings={"AUTOPILOT_MAX_ATTEMPTS": "2"})
    try:
        world.sim.faults = Faults(fail_rate=1.0)
        world.define(definition("hv"))
        world.snapshot(sample_profiles(40, seed=12))
        report = world.run("hv")
        assert report["status"] == "failed" and report["batches"]["dead"] == 1
        world.sim.faults = Faults()
        base = _console(browser, world)
        browser.get(f"{base}#/runs/{report['runId']}")
        row = _wait(browser, "#dead-table tbody tr[data-batch]")
        assert "40" in row.text
        browser.save_screenshot(str(SCREENS / "dead-batch.png"))
        _wait(browser, "#replay-run").click()
        _wait(browser, "#run-status", timeout=90, text="succeeded")
        assert len(world.field_members()) == 40
    finally:
        close_world(world)


def test_a_reader_signed_in_sees_the_exports_without_run_buttons_and_the_server_refuses_a_run(browser):
    from tests.test_api_auth import headers, principal, token

    world = open_world(settings={"API_AUTHENTICATION": "entra"})
    try:
        world.define(definition("hv"))
        base = f"{world.host.base_url}/api/console/"
        browser.get(base)  # the console's files need no sign-in; the data does
        browser.add_cookie({"name": "AppServiceAuthSession", "value": token(principal("Exports.Reader")), "path": "/"})
        _wait(browser, "#no-key").click()
        row = _wait(browser, 'tr[data-export="hv"]')
        assert "Reader" in _wait(browser, "#role-state").text
        assert not row.find_elements(By.CSS_SELECTOR, "button[data-action]")  # no run, dry run or resync
        assert not browser.find_elements(By.CSS_SELECTOR, "#add-export")
        browser.save_screenshot(str(SCREENS / "reader.png"))
        status = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch("/api/exports/hv/runs", {method: "POST", headers: {"Content-Type": "application/json"},
              body: "{}", credentials: "same-origin"}).then((r) => done(r.status), () => done(0));""")
        assert status == 403  # the page only hides it: the server refuses it
        runs = requests.get(f"{world.host.base_url}/api/exports/hv/runs", headers=headers("Exports.Reader"), timeout=30)
        assert runs.status_code == 200 and runs.json()["runs"] == []  # nothing was started
    finally:
        close_world(world)


def test_the_console_works_from_the_keyboard(browser):
    world = open_world()
    try:
        world.define(definition("hv"))
        world.snapshot(sample_profiles(20, seed=3))
        base = _console(browser, world)
        _wait(browser, 'tr[data-export="hv"]')
        browser.get("about:blank")
        browser.get(f"{base}#/exports")  # a fresh load: the focus starts at the top of the page
        _wait(browser, 'tr[data-export="hv"]')
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys(Keys.TAB)
        assert browser.switch_to.active_element.get_attribute("id") == "skip-link"
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        assert browser.switch_to.active_element.get_attribute("id") == "main"
        for _ in range(60):  # to the export's dry-run button, by Tab alone
            browser.switch_to.active_element.send_keys(Keys.TAB)
            if browser.switch_to.active_element.get_attribute("data-action") == "dry-run":
                break
        else:
            pytest.fail("no dry-run button was reached with Tab")
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        _wait(browser, "#run-status", timeout=60, text="dry run")
        assert browser.switch_to.active_element.get_attribute("id") == "page-title"  # the new page is announced
    finally:
        close_world(world)
