"""Start and stop Azurite (Blob, Queue, Table emulator) on loopback for tests, the demo and benchmarks.

Azurite comes from the committed package.json/package-lock.json (`npm ci`), so nothing is installed by hand.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tools.state_lock import tied_to_parent

ROOT = Path(__file__).resolve().parent.parent
AZURITE_BIN = ROOT / "node_modules" / ".bin" / "azurite"
MEMORY_SWEEPS = Path(__file__).resolve().parent / "azurite_memory.cjs"  # why: see the file
ACCOUNT = "devstoreaccount1"
# Azurite's published development key: public, identical in every Azurite install, not a secret.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


SERVICES = ("blob", "queue", "table")
# Azurite prints one line per service once it listens, e.g. "Azurite Queue service is successfully listening at
# http://127.0.0.1:41303" (with or without --silent, which only silences its access log).
LISTENING = re.compile(r"Azurite (Blob|Queue|Table) service is successfully listening at http://127\.0\.0\.1:(\d+)")


class Azurite:
    """One Azurite process with its own data folder and free ports; `connection_string` points at it.
    `in_memory`: nothing is written to disk (a restart loses the data). Azurite saves its table database to disk
    every 5 s, and while it serialises a big one (a run's outcomes with their acknowledgements) every storage
    call waits: pauses of over a second that Azure's Table service does not have. Benchmarks run in memory, where
    Azurite's sweep of consumed queue messages comes an hour apart instead of every minute (azurite_memory.cjs)."""

    def __init__(self, location: str | os.PathLike | None = None, in_memory: bool = False):
        self.in_memory = in_memory
        self._own_location = location is None
        self.location = Path(location or tempfile.mkdtemp(prefix="azurite-"))
        # 0: Azurite binds ports the kernel picks, read from its log on start. A port found free beforehand can be
        # taken by a parallel test's Azurite first, and ours would then talk to that one's services.
        self.ports = dict.fromkeys(SERVICES, 0)
        self._proc: subprocess.Popen | None = None

    @property
    def connection_string(self) -> str:
        host = "http://127.0.0.1"
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={host}:{self.ports['blob']}/{ACCOUNT};"
            f"QueueEndpoint={host}:{self.ports['queue']}/{ACCOUNT};"
            f"TableEndpoint={host}:{self.ports['table']}/{ACCOUNT};"
        )

    def start(self, timeout: float = 30.0) -> Azurite:
        if not AZURITE_BIN.exists():
            raise RuntimeError(f"{AZURITE_BIN} is missing: run `npm ci` (make does this)")
        self.location.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(AZURITE_BIN), "--silent", "--skipApiVersionCheck", "--loose", "--disableProductStyleUrl",
            "--disableTelemetry",  # (Azurite collects telemetry unless told: nothing leaves a test machine)
            *(["--inMemoryPersistence"] if self.in_memory else ["--location", str(self.location)]),
            "--blobHost", "127.0.0.1", "--blobPort", str(self.ports["blob"]),
            "--queueHost", "127.0.0.1", "--queuePort", str(self.ports["queue"]),
            "--tableHost", "127.0.0.1", "--tablePort", str(self.ports["table"]),
        ]
        log_path = self.location / "azurite.log"
        log = open(log_path, "ab")
        offset = log.tell()
        env = {**os.environ, "NODE_OPTIONS": f"--require {MEMORY_SWEEPS}"} if self.in_memory else None
        # A process group of its own (stop() ends node's children too), ended with its parent if that dies.
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, preexec_fn=tied_to_parent,
                                      env=env)
        log.close()  # the child keeps its own descriptor
        self.ports = self._wait_listening(log_path, offset, timeout)
        return self

    def _wait_listening(self, log_path: Path, offset: int, timeout: float) -> dict[str, int]:
        """The ports this process listens on, from its own log lines (a port that answers may be another's)."""
        deadline = time.monotonic() + timeout
        while True:
            text = log_path.read_bytes()[offset:].decode(errors="replace")
            found = {service.lower(): int(port) for service, port in LISTENING.findall(text)}
            if len(found) == len(SERVICES):
                wrong = {s: p for s, p in found.items() if self.ports[s] not in (0, p)}
                if wrong:
                    raise RuntimeError(f"Azurite listens on {wrong}, not the ports asked for: {self.ports}")
                return found
            if self._proc.poll() is not None or "EADDRINUSE" in text:
                self.stop()
                raise RuntimeError(f"Azurite could not start (a port in use?): see {log_path}\n{text[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"Azurite did not listen within {timeout}s: see {log_path}")
            time.sleep(0.05)

    @property
    def process(self) -> subprocess.Popen | None:
        return self._proc

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            log = self.location / "azurite.log"
            closed_before = _closed_services(log)
            os.killpg(self._proc.pid, signal.SIGTERM)
            # After serving traffic Azurite lingers on its timers once its services have closed (and saved
            # their data); waiting for those "closed" lines, then killing, makes a stop take milliseconds.
            deadline = time.monotonic() + 10
            while self._proc.poll() is None and time.monotonic() < deadline:
                if _closed_services(log) - closed_before >= 3:
                    break
                time.sleep(0.02)
            if self._proc.poll() is None:
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(5)
        self._proc = None

    def restart(self) -> None:
        """Stop and start on the same ports and data folder (fault tests); fails if another process took one."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_location:
            shutil.rmtree(self.location, ignore_errors=True)

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _closed_services(log: Path) -> int:
    try:
        return log.read_text(errors="replace").count("successfully closed")
    except OSError:
        return 0
