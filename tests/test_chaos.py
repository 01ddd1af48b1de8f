"""Chaos: Autopilot faults at scale, a host killed mid-run, Azurite restarted mid-run, the API key rotated mid-run.

Each test ends by comparing what Autopilot holds with the segment, contact by contact: nobody lost, nobody twice,
nobody unsubscribed, and the run's report telling the truth about it. The fault mix is the issue's: 10% 500s,
5% timeouts after the write was committed, 429 bursts and dropped connections, drawn from the simulator's
seeded generator (seed 0; the draw order still depends on which worker asks first).

Timeouts: the client's read timeout is the app setting AUTOPILOT_TIMEOUT_SECONDS (10 s by default). Here it is
0.5 s, and the simulator answers a "timeout" request after 1 s, so every timeout is a real client timeout after
the commit, and 5% of them cost seconds instead of minutes.

The two chaos runs also search every log record (DEBUG included), run record, report, dead batch and HTTP answer
for the API key and the segment's addresses (tests/test_secret_hygiene.py). The crash test runs the local host
as a process of its own and kills it with SIGKILL; the rest run it in this process, as the `world` fixture does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from azure.core.exceptions import ResourceExistsError
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import BinaryBase64EncodePolicy, QueueClient

from shared.destinations import rate_budget
from shared.runtime.settings import BATCH_QUEUE, POISON_QUEUE
from shared.state.run_records import FINISHED, BatchOutcome, RunRecords
from tests.support import (
    CONTAINER,
    FIELD_KEY,
    acknowledged_state,
    close_world,
    definition,
    expected_contacts,
    open_world,
    wait_until,
)
from tests.test_secret_hygiene import Exposure, _urllib3_request_line, emails_of, scanning_logs
from tools.autopilot_sim import THROTTLED_BURST, AutopilotSim, Faults, _error_body, _Reply
from tools.generate_export import sample_profiles, write_export
from tools.local_stack import SECRET_NAME, LocalStack

ROOT = Path(__file__).resolve().parent.parent
# 429 bursts of 3 start at 3% of requests in field mode (~250 requests) and 0.6% in list mode (~1,200), so each
# run sees several; dropped connections at 3%.
FIELD_CHAOS = Faults(fail_rate=0.10, timeout_rate=0.05, timeout_seconds=1.0, drop_rate=0.03, burst_rate=0.03,
                     burst_length=3)
LIST_CHAOS = replace(FIELD_CHAOS, burst_rate=0.006)
QUICK_TIMEOUT = {"AUTOPILOT_TIMEOUT_SECONDS": "0.5"}
WRITES = ("/v1/contact", "/v1/contacts")


# --- checks shared by the tests --------------------------------------------------------------------
def held(contacts: dict[str, dict]) -> dict[str, dict]:
    return {email: {k: v for k, v in c.items() if k not in ("contact_id", "unsubscribed", "lists", "custom_fields")}
            for email, c in contacts.items()}


def members_of(sim, membership: str) -> set[str]:
    if membership == "field":
        return {email for email, c in sim.contacts().items() if c.get("custom", {}).get(FIELD_KEY) is True}
    ids = [list_id for list_id, title in sim.lists().items() if title == "High value"]
    return sim.members(ids[0]) if ids else set()


def assert_exact(sim, rows, membership: str) -> None:
    """Autopilot holds exactly the segment: every contact once, with its fields, a member, subscribed."""
    want = expected_contacts(rows)
    if membership == "list":  # no membership field in list mode
        want = {email: {**c, "custom": {k: v for k, v in c["custom"].items() if k != FIELD_KEY}}
                for email, c in want.items()}
    assert members_of(sim, membership) == set(want), "the members differ from the segment"
    contacts = sim.contacts()
    assert len(contacts) == len(want), "a contact is missing, or one exists twice"
    assert held(contacts) == want
    assert not [email for email, c in contacts.items() if c.get("unsubscribed")], "a contact was unsubscribed"


def assert_nothing_harmful_sent(log: list[dict]) -> None:
    """No unsubscribe, no contact deleted, no bulk call over the cap, nothing Autopilot refused as malformed."""
    assert not [r for r in log if r["path"].endswith("/unsubscribe")]
    assert not [r for r in log if r["method"] == "DELETE" and r["path"].startswith("/v1/contact/")]
    assert max((r.get("n", 0) for r in log), default=0) <= 100
    assert not [r for r in log if r["status"] == 400], "a malformed request reached Autopilot"


def assert_counts_are_the_truth(world, view: dict, export: str) -> None:
    """A first run's `accepted` is exactly what it acknowledged, each of them really held by Autopilot, and every
    contact it counts as failed is listed (masked) in its report."""
    counts = view["counts"]
    assert counts["accepted"] + counts["failed"] + counts["refused"] == counts["sent"]
    acknowledged = {a.key for a in acknowledged_state(world.stack.storage, export) if a.member}
    assert len(acknowledged) == counts["accepted"]
    assert acknowledged <= set(world.sim.contacts()), "a contact counted as accepted is not in Autopilot"
    report = json.loads(world.blobs.get_blob_client("reports", f"{view['runId']}/report.json").download_blob()
                        .readall())
    assert (report["status"], report["counts"]) == (view["status"], view["counts"])
    assert len(report["deliveryProblems"]) == counts["failed"] + counts["refused"]
    assert all("***@" in p["email"] for p in report["deliveryProblems"])


def assert_settled(storage: str, run_id: str) -> None:
    """Nothing half-finished: no message left on either queue, no run still active, no dead batch."""
    queues = [QueueClient.from_connection_string(storage, q) for q in (BATCH_QUEUE, POISON_QUEUE)]
    wait_until(lambda: all(q.get_queue_properties().approximate_message_count == 0 for q in queues), timeout=30)
    with TableServiceClient.from_connection_string(storage) as tables:
        records = RunRecords(tables)
        assert records.active() == []
        outcomes = records.batch_outcomes(run_id)
        assert outcomes and {o["status"] for o in outcomes} == {"done"}
        assert len(outcomes) == int(records.get(run_id)["planned_batches"])


def wait_quietly(world, run_id: str, timeout: float) -> dict:
    """World.wait, polling every 2 s so that watching a 200-batch run does not slow it down."""
    return world.wait(run_id, timeout, poll=2.0)


def chaos_run(world, export: str, rows, faults: Faults, timeout: float) -> tuple[dict, dict | None]:
    """The run under faults, then at most one follow-up run (faults over) for what it reported as failed."""
    world.sim.faults = faults
    response = world.start(export)
    assert response.status_code == 202, response.text
    first = wait_quietly(world, response.json()["runId"], timeout=timeout)
    world.sim.faults = Faults()
    seen = Counter(r.get("fault") for r in world.sim.request_log())
    assert seen["fail"] and seen["timeout"] and seen["drop"] and seen["burst"], f"not every fault happened: {seen}"
    assert first["status"] in ("succeeded", "partially succeeded"), first
    assert first["counts"]["sent"] == len(rows) and first["counts"]["refused"] == 0
    assert_counts_are_the_truth(world, first, export)
    follow = None
    if first["counts"]["failed"]:
        follow = wait_quietly(world, world.start(export).json()["runId"], timeout=60)
        # The follow-up sends exactly the contacts the first run reported as failed, nobody else.
        assert follow["counts"]["joiners"] == first["counts"]["failed"], (first["counts"], follow["counts"])
        assert follow["status"] == "succeeded", follow
    return first, follow


# --- Autopilot faults at scale ---------------------------------------------------------------------
CHAOS_RUNS = {  # membership: (profiles, seed, partitions, faults, planned requests)
    "field": (20_000, 31, 4, FIELD_CHAOS, 200),
    "list": (1000, 32, 1, LIST_CHAOS, 1000 + 10),  # a list call a joiner, and a merge a message of 100 joiners
}


@pytest.mark.long
@pytest.mark.parametrize("membership", CHAOS_RUNS)
def test_chaos_run_ends_exact(membership, monkeypatch):
    """20,000 profiles in field mode, 1,000 joiners in list mode."""
    # The simulator's bursts are counted in requests, not seconds: each 429 of a burst comes after the hold the one
    # before it started, so from the third 429 on every one holds every sender off for HOLD_MOST (5 s), about 150 s
    # in all in list mode. The holds' lengths are test_rate_budget's; here a shorter cap only shortens the wait.
    monkeypatch.setattr(rate_budget, "HOLD_MOST", 1.0)
    profiles, seed, partitions, faults, planned = CHAOS_RUNS[membership]
    world = open_world(rate=100, settings=QUICK_TIMEOUT)
    try:
        rows = list(sample_profiles(profiles, seed=seed))
        exposure = Exposure([world.stack.api_key], emails_of(rows))
        exposure.watch(world.api)
        world.define(definition("hv", membership=membership))
        world.snapshot(rows, partitions=partitions)
        with scanning_logs(exposure, skip=_urllib3_request_line) as scan:
            first, follow = chaos_run(world, "hv", rows, faults, timeout=240)
        assert first["plannedRequests"] == planned

        assert_exact(world.sim, rows, membership)
        assert_settled(world.stack.storage, (follow or first)["runId"])
        log = world.sim.request_log()
        assert_nothing_harmful_sent(log)
        assert not [r for r in log if r["method"] == "DELETE"], "a member was taken off the list"
        assert scan.seen["autopilot"] and scan.seen["azure"]
        exposure.storage(world.stack.storage)
        exposure.assert_clean()
    finally:
        close_world(world)


def test_list_mode_above_50_requests_per_second_is_not_stuck():
    world = open_world(rate=100)
    try:
        rows = list(sample_profiles(150, seed=33))
        world.define(definition("lv", membership="list"))
        world.snapshot(rows)
        response = world.start("lv")
        view = world.wait(response.json()["runId"], timeout=15)
        assert view["status"] == "succeeded", view
        assert world.list_members() == emails_of(rows)
    finally:
        close_world(world)


class ThrottlesEveryNth(AutopilotSim):
    """The simulator, answering every n-th authorised request with a 429 burst of one: a steady drizzle of
    throttling that a long list-mode batch always meets, however well it paces itself."""

    def __init__(self, api_key: str, every: int):
        super().__init__(api_key, rate=None)
        self.every, self.seen = every, 0

    def _throttle(self, key, faults, record):
        self.seen += 1
        if self.seen % self.every == 0:
            record["fault"] = "burst"
            return _Reply(429, _error_body(429, THROTTLED_BURST))
        return super()._throttle(key, faults, record)


def _world_with(sim: AutopilotSim, key: str, rate: float, settings: dict | None = None):
    world = open_world(rate=rate, settings=settings, api_key=key, autopilot_url=sim.base_url)
    world.sim = sim
    return world


@pytest.mark.long
def test_list_batches_that_keep_making_progress_are_never_given_up():
    key = "k-" + "7" * 30
    sim = ThrottlesEveryNth(key, every=25).start()
    world = _world_with(sim, key, rate=50, settings={"AUTOPILOT_MAX_ATTEMPTS": "3"})
    try:
        rows = list(sample_profiles(200, seed=34))
        world.define(definition("lv", membership="list"))
        world.snapshot(rows)
        view = world.wait(world.start("lv").json()["runId"], timeout=60)
        assert sum(1 for r in sim.request_log() if r.get("fault") == "burst") >= 6  # 3+ per 100-contact batch
        assert view["status"] == "succeeded", (view["counts"], view["deliveryProblems"][:2])
        assert world.list_members() == emails_of(rows)
    finally:
        close_world(world)
        sim.stop()


# --- the host killed in the middle of a run --------------------------------------------------------
class RecordingSim(AutopilotSim):
    """The simulator, also noting each contact a write applied (2xx, timeouts included: they commit)."""

    def __init__(self, api_key: str):
        super().__init__(api_key, rate=None)
        self.applied: list[str] = []
        self._applied_lock = threading.Lock()

    def dispatch(self, method, raw_path, api_key, body, arrived=None):
        reply = super().dispatch(method, raw_path, api_key, body, arrived)
        if method == "POST" and raw_path.split("?")[0] in WRITES and not reply.drop and reply.status == 200:
            payload = json.loads(body)
            docs = payload["contacts"] if "contacts" in payload else [payload["contact"]]
            with self._applied_lock:
                self.applied.extend(doc["Email"].lower() for doc in docs)
        return reply


# The local host keeps a received message invisible for 600 s (as the Functions host does, renewing it while the
# function runs); after a SIGKILL the messages it held come back only then. The test shortens that lease to 15 s
# in the host process it starts, so a crashed run resumes within the test's time.
HOST_BOOT = "import sys, tools.local_host as h; h.LEASE_SECONDS = 15; h.main(sys.argv[1:])"


class HostProcess:
    def __init__(self, settings_file: Path, log_file: Path, key: str, boot: str = HOST_BOOT):
        self.settings_file, self.log_file, self.key, self.boot = settings_file, log_file, key, boot
        self.port = 0  # the kernel picks it (one found free beforehand may be taken meanwhile): see start()
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> HostProcess:
        log = open(self.log_file, "ab")  # handed to the child, which keeps its own descriptor
        offset = log.tell()  # (a restarted host appends to the same log)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.boot, "--settings", str(self.settings_file), "--port", "0",
             "--function-key", self.key], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until(lambda: self._listening(offset), timeout=60)
        wait_until(self._answers, timeout=60)
        return self

    def _listening(self, offset: int) -> bool:
        """Whether this process has printed its banner; reads its port from it."""
        assert self.proc.poll() is None, self.log_file.read_text()[-3000:]
        banner = re.search(r"local host listening on http://127\.0\.0\.1:(\d+)/api",
                           self.log_file.read_bytes()[offset:].decode(errors="replace"))
        if banner:
            self.port = int(banner.group(1))
        return banner is not None

    def _answers(self) -> bool:
        assert self.proc.poll() is None, self.log_file.read_text()[-3000:]
        try:
            return requests.get(f"{self.base}/exports", headers=self.headers, timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    @property
    def headers(self) -> dict:
        return {"x-functions-key": self.key, "Content-Type": "application/json"}

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def _stack_with_export(stack: LocalStack, tmp_path: Path, rows, **settings: str) -> tuple[BlobServiceClient, Path]:
    """Export "hv" defined and a snapshot of `rows` on the stack; the local.settings.json a host process reads."""
    blobs = BlobServiceClient.from_connection_string(stack.storage)
    for name in ("config", CONTAINER):
        try:
            blobs.create_container(name)
        except ResourceExistsError:
            pass
    blobs.get_blob_client("config", "exports.json").upload_blob(json.dumps({"exports": [definition("hv")]}))
    write_export(blobs.get_container_client(CONTAINER), rows, time="2026-03-02T04:30:00Z")
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"IsEncrypted": False, "Values": stack.settings(None, **settings)}))
    return blobs, path


@pytest.mark.long
def test_host_killed_mid_run_resumes_exactly_without_resending_acknowledged_contacts(tmp_path):
    key = "crash-key-" + "3" * 22
    sim = RecordingSim(key).start()
    stack = LocalStack(tmp_path / "stack", api_key=key, rate=10, autopilot_url=sim.base_url).start()
    host = None
    try:
        rows = list(sample_profiles(3000, seed=35))
        blobs, settings = _stack_with_export(stack, tmp_path, rows)
        host = HostProcess(settings, tmp_path / "host.log", "fk-" + "9" * 20).start()
        started = requests.post(f"{host.base}/exports/hv/runs", headers=host.headers, json={}, timeout=60)
        run_id = started.json()["runId"]
        tables = TableServiceClient.from_connection_string(stack.storage)
        records = RunRecords(tables)
        wait_until(lambda: len(records.batch_outcomes(run_id)) >= 6, timeout=60)

        host.kill()
        settled_at_kill = len(records.batch_outcomes(run_id))
        acknowledged = {a.key for a in records.acknowledged(run_id)}
        mark = len(sim.applied)
        assert 6 <= settled_at_kill < 30 and len(acknowledged) >= 600, (settled_at_kill, len(acknowledged))
        assert records.get(run_id)["status"] == "running"

        host = HostProcess(settings, tmp_path / "host.log", host.key).start()
        view = {}
        deadline = time.monotonic() + 60  # the lease (15 s) plus the rest of the run
        while time.monotonic() < deadline and view.get("status") not in FINISHED:
            view = requests.get(f"{host.base}/runs/{run_id}", headers=host.headers, timeout=30).json()
            time.sleep(0.2)
        assert view["status"] == "succeeded", (view["status"], view["batches"], records.get(run_id).get("done"))
        assert view["counts"]["accepted"] == 3000 and view["batches"] == {"planned": 30, "settled": 30, "dead": 0}
        assert_exact(sim, rows, "field")
        resent = Counter(email for email in sim.applied[mark:] if email in acknowledged)
        assert not resent, f"{len(resent)} contacts acknowledged before the kill were sent again"
        assert set(sim.applied) == emails_of(rows)
        assert_nothing_harmful_sent(sim.request_log())
        assert_settled(stack.storage, run_id)
        tables.close()
        blobs.close()
    finally:
        if host:
            host.stop()
        stack.stop()
        sim.stop()


def test_run_whose_done_hint_missed_a_batch_still_finishes():
    """What a crash between `record_batch` and `after_batch` leaves behind, made deterministic: batch 1's outcome
    is recorded but the run's hint never counted it; its message comes back (it was never deleted), and batch 2
    arrives and settles."""
    world = open_world()
    try:
        run_id = "20260302T043000Z-0d0e0a0d"
        first = BatchOutcome(1, "upsert", "done", 1, 1, 0, 0, [])
        with TableServiceClient.from_connection_string(world.stack.storage) as tables:
            records = RunRecords(tables)
            records.create(run_id, "crash", status="running", planned_batches=2, trigger="http")
            assert records.record_batch(run_id, first)  # ...and the instance died before after_batch
        queue = QueueClient.from_connection_string(world.stack.storage, BATCH_QUEUE,
                                                   message_encode_policy=BinaryBase64EncodePolicy())
        for batch in (1, 2):
            email = f"batch-{batch}@example.net"
            item = {"k": email, "f": "0" * 20, "m": True, "d": {"Email": email, "custom": {FIELD_KEY: True}}}
            message = {"run": run_id, "export": "crash", "batch": batch, "kind": "upsert", "items": [item]}
            queue.send_message(json.dumps(message).encode())
        wait_until(lambda: world.view(run_id)["batches"]["settled"] == 2, timeout=20)
        time.sleep(1.0)
        assert world.view(run_id)["status"] == "succeeded"
    finally:
        close_world(world)


# --- Azurite restarted in the middle of a run ------------------------------------------------------
@pytest.mark.long
def test_azurite_restarted_mid_run_recovers_or_fails_loudly(monkeypatch):
    # The in-process local host holds received messages for LEASE_SECONDS (600 s, like the Functions host); a
    # function that fails while storage is down cannot give its message back, so it returns after the lease.
    monkeypatch.setattr("tools.local_host.LEASE_SECONDS", 10)
    world = open_world(rate=10)
    try:
        rows = list(sample_profiles(3000, seed=36))
        world.define(definition("hv"))
        world.snapshot(rows)
        run_id = world.start("hv").json()["runId"]
        wait_until(lambda: world.view(run_id)["batches"]["settled"] >= 5, timeout=60)
        world.stack.azurite.restart()
        view = wait_quietly(world, run_id, timeout=120)

        members = world.field_members()
        assert members <= emails_of(rows)
        if view["status"] == "succeeded":
            assert_exact(world.sim, rows, "field")
            assert view["counts"]["accepted"] == 3000
        else:  # a clear status: what failed is counted and said, and a follow-up run completes the segment
            assert view["status"] in ("partially succeeded", "failed") and (view["error"] or view["counts"]["failed"])
            assert view["counts"]["accepted"] + view["counts"]["failed"] == 3000
            assert world.run("hv")["status"] == "succeeded"
            assert_exact(world.sim, rows, "field")
        assert_nothing_harmful_sent(world.sim.request_log())
    finally:
        close_world(world)


# --- the API key rotated in the middle of a run -----------------------------------------------------
def test_key_rotated_in_autopilot_then_in_key_vault_mid_run_the_run_goes_on():
    """The real order of a rotation: Autopilot issues a new key (the old one stops working at once), then the
    operator stores it in Key Vault a moment later. The run must go on with the new key."""
    world = open_world(rate=50)
    try:
        rows = list(sample_profiles(250, seed=37))
        new_key = "rotated-" + "5" * 24
        exposure = Exposure([world.stack.api_key, new_key], emails_of(rows))
        exposure.watch(world.api)
        world.define(definition("lv", membership="list"))
        world.snapshot(rows)
        run_id = world.start("lv").json()["runId"]
        wait_until(lambda: len(world.list_members()) >= 40, timeout=60)
        world.sim.set_api_key(new_key)
        time.sleep(1.0)
        world.stack.keyvault.set_secret(SECRET_NAME, new_key)
        view = world.wait(run_id, timeout=90)

        assert any(r["status"] == 401 for r in world.sim.request_log())
        assert view["status"] == "succeeded", (view["status"], view["error"])
        assert_exact(world.sim, rows, "list")
        exposure.storage(world.stack.storage)
        exposure.assert_clean()
    finally:
        close_world(world)


# --- cancel, replay, take-over after a kill and a forced rerun on one export --------------------------------
# The host restarted after the kill takes over a run whose record has not changed for 2 s (30 min in production),
# so the take-over's copies meet the originals the killed host held, which come back after its 15-s lease.
TAKING_OVER_BOOT = HOST_BOOT.replace("h.LEASE_SECONDS = 15;", "h.LEASE_SECONDS = 15; import shared.pipeline.runs as r; "
                                                               "r.STUCK_AFTER = 2;")


def _unchanged_for(records: RunRecords, run_id: str, seconds: float) -> bool:
    """Whether the run's record is the same `seconds` later (a run whose messages are all leased to a dead host)."""
    before = records.runs.get_entity("run", run_id).metadata["etag"]
    time.sleep(seconds)
    return records.runs.get_entity("run", run_id).metadata["etag"] == before


class Operator:
    """What an operator does over the HTTP API of the host process."""

    def __init__(self, host: HostProcess):
        self.host = host

    def post(self, path: str, body: dict | None = None) -> dict:
        answer = requests.post(f"{self.host.base}{path}", headers=self.host.headers, json=body or {}, timeout=120)
        assert answer.status_code in (200, 202), (path, answer.status_code, answer.text)
        return answer.json()

    def fire_timer(self) -> None:
        admin = self.host.base.removesuffix("/api") + "/admin/functions/scheduled_sync"
        assert requests.post(admin, headers=self.host.headers, timeout=120).status_code == 202

    def view(self, run_id: str) -> dict:
        return requests.get(f"{self.host.base}/runs/{run_id}", headers=self.host.headers, timeout=30).json()

    def settled(self, run_id: str) -> int:
        return self.view(run_id)["batches"]["settled"]

    def wait(self, run_id: str, timeout: float = 90) -> dict:
        wait_until(lambda: self.view(run_id)["status"] in FINISHED, timeout=timeout)
        return self.view(run_id)


@pytest.mark.long
def test_cancel_replay_take_over_after_a_kill_and_a_forced_rerun_leave_the_destination_exact(tmp_path):
    key = "mixed-key-" + "4" * 22
    sim = RecordingSim(key).start()
    stack = LocalStack(tmp_path / "stack", api_key=key, rate=5, autopilot_url=sim.base_url).start()
    host = None
    try:
        first_rows = list(sample_profiles(3000, seed=37))
        blobs, settings = _stack_with_export(stack, tmp_path, first_rows, AUTOPILOT_MAX_ATTEMPTS="1",
                                             AUTOPILOT_TIMEOUT_SECONDS="3")
        host = HostProcess(settings, tmp_path / "host.log", "fk-" + "8" * 20).start()
        op = Operator(host)
        records = RunRecords(TableServiceClient.from_connection_string(stack.storage))

        # 1. A run cancelled part way.
        cancelled = op.post("/exports/hv/runs")["runId"]
        wait_until(lambda: op.settled(cancelled) >= 3, timeout=30)
        op.post(f"/runs/{cancelled}/cancel")
        assert op.wait(cancelled)["status"] == "cancelled"

        # 2. The rest fails on every delivery (its batches dead), then is replayed; the host is killed while the
        # replay sends, and the restarted host takes the run over while the killed one's messages come back.
        sim.faults = Faults(fail_rate=1.0)
        dead = op.post("/exports/hv/runs")["runId"]
        failed = op.wait(dead)
        assert failed["status"] == "failed" and failed["batches"]["dead"] >= 3, failed
        sim.faults = Faults()
        # Requests in flight at the kill: their messages stay leased. Well under the 3-s read timeout: with 1 s, a
        # loaded machine (the suite's parallel workers) timed some out after the simulator had applied them, and
        # their redelivery applied them again (a re-send the assertion below rightly counts).
        sim.latency = 0.8
        assert op.post(f"/runs/{dead}/replay")["replayedBatches"] == failed["batches"]["dead"]
        wait_until(lambda: sum(o["status"] == "done" for o in records.batch_outcomes(dead)) >= 1, timeout=30)
        host.kill()
        sim.latency = 0.0
        host = HostProcess(settings, tmp_path / "host.log", host.key, boot=TAKING_OVER_BOOT).start()
        op = Operator(host)
        wait_until(lambda: _unchanged_for(records, dead, 2.5), timeout=30)  # the rest is with the dead host
        op.fire_timer()  # the run is taken over
        assert records.get(dead).get("taken_over")
        assert op.wait(dead, timeout=120)["status"] == "succeeded"

        # 3. A new snapshot (leavers, joiners, changes); its run is superseded by a forced rerun part way.
        rows = first_rows[300:] + list(sample_profiles(3300, seed=38))[3000:]
        write_export(blobs.get_container_client(CONTAINER), rows, time="2026-03-03T04:30:00Z")
        superseded = op.post("/exports/hv/runs")["runId"]
        wait_until(lambda: op.settled(superseded) >= 2, timeout=60)
        forced = op.post("/exports/hv/runs", {"force": True})["runId"]
        assert op.wait(superseded)["status"] == "failed"
        final = op.wait(forced, timeout=120)
        assert final["status"] == "succeeded", final

        # The destination is the newest snapshot; nobody was sent more than once beyond what was acknowledged;
        # the state is what the destination holds.
        want, contacts = expected_contacts(rows), sim.contacts()
        assert {e for e, c in contacts.items() if c.get("custom", {}).get(FIELD_KEY) is True} == set(want)
        assert held({e: contacts[e] for e in want}) == want
        assert set(contacts) == emails_of(first_rows) | set(want)  # the leavers kept, no longer members
        acknowledged = Counter(a.key for run in (cancelled, dead, superseded, forced)
                               for a in records.acknowledged(run))
        applied = Counter(sim.applied)
        assert not {e: n for e, n in applied.items() if n > acknowledged[e] + 1}
        state = {a.key: a.member for a in acknowledged_state(stack.storage, "hv")}
        assert state == {e: c.get("custom", {}).get(FIELD_KEY) is True for e, c in contacts.items()}
        assert_nothing_harmful_sent(sim.request_log())
        records.runs.close()
        blobs.close()
    finally:
        if host:
            host.stop()
        stack.stop()
        sim.stop()
