"""One local stack per state folder: a lock file naming the process that holds the folder and the children it
started (Azurite, the simulator). A lock whose holder is gone is stale: the children it left are stopped and
the lock is taken over. Children are also tied to their parent (Linux): they get SIGTERM when it dies, even by
SIGKILL, so a killed `local_run` leaves no Azurite serving its folder."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

LOCK_NAME = "local-stack.lock"
PR_SET_PDEATHSIG = 1
CHILD_NAMES = ("azurite", "autopilot_sim")  # what a child's command line holds (never stop another process)


class FolderInUse(RuntimeError):
    """Another live local stack holds the state folder."""


def tied_to_parent() -> None:
    """A subprocess.Popen preexec_fn: the child gets SIGTERM when its parent dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class StateLock:
    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.was_stale = False  # a holder that was killed left it: its work in the folder's storage is orphaned

    def acquire(self) -> StateLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                self._clear_stale()
                continue
            with os.fdopen(fd, "w") as out:
                json.dump({"pid": os.getpid(), "children": []}, out)
            return self

    def note_children(self, pids: list[int]) -> None:
        self.path.write_text(json.dumps({"pid": os.getpid(), "children": pids}))

    def release(self) -> None:
        if self._read().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _clear_stale(self) -> None:
        held = self._read()
        holder = held.get("pid")
        if isinstance(holder, int) and holder != os.getpid() and _alive(holder):
            raise FolderInUse(f"the state folder {self.path.parent} is in use by another local stack (process "
                              f"{holder}); wait for it to end, or stop it")
        for child in held.get("children", []):  # left running by a holder that was killed
            if isinstance(child, int) and _alive(child) and any(n in _command(child) for n in CHILD_NAMES):
                os.kill(child, signal.SIGKILL)
        self.path.unlink(missing_ok=True)
        self.was_stale = True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) holds nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
