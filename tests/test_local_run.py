"""`python -m tools.local_run` as a user runs it: killed half way (SIGKILL to its process group), the same command
resumes the run it left and ends with the exact list; its children die with it; a state folder in use by a live
stack is refused, a stale lock is cleared."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import definition, wait_until
from tests.test_incremental import segment_emails
from tools.autopilot_sim import SimProcess
from tools.generate_export import sample_profiles, write_export
from tools.local_stack import LocalStack
from tools.state_lock import LOCK_NAME, StateLock

KEY = "local-run-test-key"
ROOT = Path(__file__).resolve().parent.parent
# Azurite saves each store of its folder every 5 s: a SIGKILL loses what it was told in the last 5 s, and once in
# five runs (session 8) a batch settled 6 s before the kill was lost too (a save under way, or late): two periods.
SAVED = 11.0


def _processes_using(folder: Path) -> list[int]:
    """Live processes whose command line names `folder` (an Azurite serving it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(folder) in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") \
                        and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.fixture
def setup(tmp_path):
    rows = list(sample_profiles(120, seed=81))
    write_export(tmp_path / "export", rows, time="2026-03-02T04:15:00Z")
    config = tmp_path / "exports.json"
    config.write_text(json.dumps({"exports": [definition("seg", "list")]}))
    sim = SimProcess(KEY, rate=5).start()
    try:
        yield tmp_path, rows, config, sim
    finally:
        sim.stop()


def _command(tmp_path: Path, config: Path, sim) -> list[str]:
    return [sys.executable, "-m", "tools.local_run", "--export-dir", str(tmp_path / "export"), "--exports-config",
            str(config), "--export", "seg", "--autopilot-url", sim.base_url, "--state-dir", str(tmp_path / "state")]


def _env() -> dict:
    # Two worker threads: two of the six messages of 20 send at once (with the default 6 threads all six could
    # still be in flight at a kill, and every join be sent again).
    return {**os.environ, "AUTOPILOT_API_KEY": KEY, "AUTOPILOT_REQUESTS_PER_SECOND": "5",
            "PYTHON_THREADPOOL_THREAD_COUNT": "2"}


def _joins(sim) -> list[dict]:
    return [r for r in sim.request_log()
            if r["method"] == "POST" and r["path"].startswith("/v1/list/") and r["status"] == 200]


@pytest.mark.long
def test_a_killed_local_run_leaves_no_process_and_the_same_command_resumes_its_run(setup):
    tmp_path, rows, config, sim = setup
    first = subprocess.Popen(_command(tmp_path, config, sim), cwd=ROOT, env=_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # the first two messages are sent by the 40th join; Azurite writes its folder to disk every 5 s
        wait_until(lambda: len(_joins(sim)) >= 40, timeout=120)
        time.sleep(SAVED)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    sent_before = len(_joins(sim))
    # Azurite got SIGTERM with its parent's death; whether it has exited yet or lingers on its timers, the next
    # command's stale lock stops it (no process is left at the end, asserted below).
    assert (tmp_path / "state" / LOCK_NAME).exists()  # left behind: stale

    again = subprocess.run(_command(tmp_path, config, sim), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming run" in again.stderr
    report = json.loads(again.stdout)
    assert report["status"] == "succeeded" and report["counts"]["joiners"] == 120
    lists = sim.lists()
    assert len(lists) == 1 and sim.members(next(iter(lists))) == segment_emails(rows)
    joins = [r for r in _joins(sim)]
    # Sent again: only contacts of batches not settled (and saved) at the kill, never the first two messages'.
    assert 120 <= len(joins) <= 120 + sent_before - 40, (len(joins), sent_before)
    assert not _processes_using(tmp_path / "state") and not (tmp_path / "state" / LOCK_NAME).exists()


def test_a_state_folder_held_by_a_live_stack_is_refused(setup):
    tmp_path, _rows, config, sim = setup
    with LocalStack(tmp_path / "state", api_key=KEY, autopilot_url=sim.base_url):
        refused = subprocess.run(_command(tmp_path, config, sim), cwd=ROOT, env=_env(), capture_output=True,
                                 text=True, timeout=120)
    assert refused.returncode == 2 and "in use by another local stack" in refused.stderr, refused.stderr
    assert not _joins(sim)


def test_a_stale_lock_is_cleared_and_the_children_it_names_are_stopped(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "azurite"])
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "children": [orphan.pid]}))
    lock = StateLock(tmp_path).acquire()
    try:
        assert orphan.wait(10) == -signal.SIGKILL
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()



@pytest.mark.long
def test_ctrl_c_cancels_the_run_and_waits_for_it_then_a_second_leaves_at_once(setup):
    tmp_path, _rows, config, sim = setup
    command = [*_command(tmp_path, config, sim), "--report", str(tmp_path / "report.json")]
    env = {**_env(), "AUTOPILOT_TIMEOUT_SECONDS": "2"}
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(_joins(sim)) >= 10, timeout=120)
    first.send_signal(signal.SIGINT)  # Ctrl-C: cancel, wait for the run to settle
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "cancelling run" in err, err[-2000:]
    report = json.loads(out)
    counts = report["counts"]
    assert report["status"] == "cancelled" and counts["accepted"] + counts["cancelled"] == 120
    assert len(_joins(sim)) == counts["accepted"] < 120
    assert not _processes_using(tmp_path / "state")

    second = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(_joins(sim)) >= counts["accepted"] + 5, timeout=120)
    second.send_signal(signal.SIGINT)
    time.sleep(1)  # it is cancelling now, waiting (about 8 s) for the cancel's answer
    second.send_signal(signal.SIGINT)  # the second Ctrl-C: leave now
    _, err = second.communicate(timeout=30)
    assert second.returncode == 130 and "left without waiting" in err, err[-2000:]
    assert not _processes_using(tmp_path / "state")
