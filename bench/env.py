"""The benchmarks' local stack: Azurite and the Key Vault stand-in (LocalStack, in this process), the Autopilot
simulator and local Functions hosts as separate processes, and a small client for the app's HTTP API.

Every child process runs in a session of its own, so Ctrl-C reaches only the benchmark, whose `finally`
blocks stop the children one by one (by their own process, never by name).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests
from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient

from shared.runtime.settings import WORKER_THREADS
from shared.state.run_records import FINISHED
from tools.autopilot_sim import SimProcess
from tools.generate_export import write_export
from tools.local_stack import LocalStack
from tools.ortto_sim import OrttoSimProcess

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
CONTAINER = "ciexports"
THREADS = "PYTHON_THREADPOOL_THREAD_COUNT"
_STARTED = time.monotonic()


class BenchError(RuntimeError):
    """The benchmark could not measure what it set out to (a run failed, a process did not start...)."""


def say(message: str) -> None:
    """A progress line, stamped with the seconds since the suite started."""
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", flush=True)


# --- child processes ------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and of its running child processes (a host's scale
    groups) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass  # gone meanwhile
    return children


class Child:
    """One child process with its output in a log file under bench/out."""

    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name, self.argv, self.log_path = name, argv, log_path
        self.proc: subprocess.Popen | None = None

    def start(self, ready: str, timeout: float = 60.0) -> re.Match:
        """Start the process and wait for a line matching `ready` in its output."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(ready, self.log_path.read_text(errors="replace"))
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        self.stop()
        raise BenchError(f"{self.name} did not start (no {ready!r} in its output); its log ends:\n{tail}")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self, timeout: float = 45.0) -> None:
        """SIGTERM (the CLIs stop cleanly on it), SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Host(Child):
    """A local Functions host process (`python -m tools.local_host`, or a module with the same CLI)."""

    def __init__(self, out: Path, name: str, settings: dict[str, str], function_key: str,
                 module: str = "tools.local_host", extra: tuple[str, ...] = (), scale_groups: bool = True):
        settings_file = out / f"{name}.settings.json"
        settings_file.parent.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps({"IsEncrypted": False, "Values": settings}, indent=2))
        self.port = 0  # (the kernel picks it; start() reads it from the host's banner)
        # Each queue-triggered function in a process of its own, as Flex Consumption scales them (--scale-groups);
        # a profiled host keeps them in one process, under its profiler.
        argv = [sys.executable, "-m", module, "--settings", str(settings_file), "--port", str(self.port),
                f"--function-key={function_key}",  # a key may start with "-": one argument, never an option
                *(["--scale-groups"] if scale_groups else []), *extra]
        super().__init__(name, argv, out / f"{name}.log")
        self.function_key = function_key
        self.threads = int(settings[THREADS])

    def start(self, timeout: float = 60.0) -> re.Match:
        """Start the host on a port of the kernel's choosing (one found free beforehand may be taken meanwhile)."""
        banner = super().start(r"local host listening on http://127\.0\.0\.1:(\d+)/api", timeout)
        self.port = int(banner.group(1))
        return banner

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class CoreBurner:
    """A second process burning one core for as long as it runs (`python -c "while True: pass"`): other work on
    the machine, as the issue's "loaded" figure asks. Stopped by its own process id."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.cpu = 0.0

    def __enter__(self) -> CoreBurner:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.cpu = cpu_seconds(self.proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
        self.proc.kill()
        self.proc.wait(10)


# --- the stack ------------------------------------------------------------------------------------
ORTTO_SECRET = "ortto-api-key"


class BenchStack:
    """Azurite + Key Vault stand-in + simulator process for one benchmark; hosts are added on demand. With
    `ortto`, the simulator is Ortto's and every export defined sends to it through an Ortto connection whose rate
    is the host's AUTOPILOT_REQUESTS_PER_SECOND (the app settings' Autopilot account is then left unused). The
    simulator holds every answer `latency` + uniform(0, `jitter`) seconds (a remote API's; `sim.set_latency`
    changes it)."""

    def __init__(self, name: str, sim_rate: float, ortto: bool = False, latency: float = 0.0, jitter: float = 0.0):
        self.name = name
        self.out = OUT / name
        self.api_key = secrets.token_hex(16)
        self.function_key = secrets.token_urlsafe(24)
        self.ortto = ortto
        simulator = OrttoSimProcess if ortto else SimProcess
        self.sim = simulator(self.api_key, sim_rate, log_path=self.out / "simulator.log", latency=latency,
                             jitter=jitter)
        self.stack: LocalStack | None = None
        self.hosts: list[Host] = []
        self._clock = datetime(2026, 3, 2, 4, 15, tzinfo=UTC)
        self._host_count = 0

    def __enter__(self) -> BenchStack:
        shutil.rmtree(self.out, ignore_errors=True)  # scratch of an earlier run
        try:
            self.sim.start()
            # Azurite in memory: its periodic save of a big table database pauses every storage call (tools.azurite)
            self.stack = LocalStack(api_key=self.api_key, autopilot_url=self.sim.base_url, in_memory=True).start()
            self.stack.keyvault.set_secret(ORTTO_SECRET, self.api_key)
            self.blobs = BlobServiceClient.from_connection_string(self.stack.storage)
            for container in ("config", CONTAINER):
                try:
                    self.blobs.create_container(container)
                except ResourceExistsError:
                    pass
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.stop_hosts()
        self.sim.stop()
        if self.stack is not None:
            self.stack.stop()

    def settings(self, rate: float, **overrides: str) -> dict[str, str]:
        """The app settings of a host on this stack, spending `rate` requests per second, with the Azure worker's
        thread count (PYTHON_THREADPOOL_THREAD_COUNT, as infra/ sets it) for the local host's worker pool."""
        values = self.stack.settings(None, AUTOPILOT_REQUESTS_PER_SECOND=f"{rate:g}", **overrides)
        values.setdefault(THREADS, str(WORKER_THREADS))
        return values

    @property
    def worker_threads(self) -> int:
        """The thread count every host of this stack runs its invocations on."""
        return int(self.settings(1.0)[THREADS])

    def host(self, rate: float, module: str = "tools.local_host", extra: tuple[str, ...] = (),
             scale_groups: bool = True, **settings: str) -> Host:
        """Start one more host process (real host.json queue options, `settings` over the stack's app settings) and
        wait until it serves HTTP."""
        self._host_count += 1
        host = Host(self.out, f"host{self._host_count}", self.settings(rate, **settings), self.function_key, module,
                    extra, scale_groups)
        self.hosts.append(host)
        host.start()
        return host

    def stop_hosts(self) -> None:
        while self.hosts:
            self.hosts.pop().stop()

    def define(self, *exports: dict, rate: float | None = None, plan: str | None = None) -> None:
        """Write the export definitions where the app reads them (EXPORTS_BLOB = config/exports.json); on an
        Ortto stack, each export sends through the connection "ortto" at its `plan`'s rate or `rate`."""
        document: dict = {"exports": list(exports)}
        if self.ortto:
            pace = {"plan": plan} if plan else {"requestsPerSecond": rate}
            document["connections"] = [{"name": "ortto", "platform": "ortto", "secretName": ORTTO_SECRET,
                                        "baseUrl": self.sim.base_url, **pace}]
            for export in exports:
                export["destination"]["connection"] = "ortto"
        self.blobs.get_blob_client("config", "exports.json").upload_blob(json.dumps(document), overwrite=True)

    def snapshot(self, rows, segment: str, partitions: int = 1) -> None:
        """Write the next refresh of a segment, as Customer Insights would (15 minutes after the last one)."""
        self._clock += timedelta(minutes=15)
        write_export(self.blobs.get_container_client(CONTAINER), rows, segment=segment, time=self._clock,
                     partitions=partitions)


# --- the app's HTTP API ---------------------------------------------------------------------------
class Api:
    def __init__(self, host: Host):
        self.base_url = host.base_url
        self.http = requests.Session()
        self.http.headers.update({"x-functions-key": host.function_key, "Content-Type": "application/json"})
        self.views: list[tuple[float, float, int]] = []  # (epoch seconds, seconds the GET took, batches settled)

    def start(self, export: str, **options) -> dict:
        """POST /api/exports/{name}/runs: records the run and queues its planning, then answers with its view."""
        response = self.http.post(f"{self.base_url}/api/exports/{export}/runs", json=options, timeout=900)
        if response.status_code not in (200, 202):
            raise BenchError(f"starting a run of {export} answered {response.status_code}: {response.text[:500]}")
        return response.json()

    def view(self, run_id: str) -> dict:
        started = time.perf_counter()
        response = self.http.get(f"{self.base_url}/api/runs/{run_id}", timeout=60)
        took = time.perf_counter() - started
        response.raise_for_status()
        view = response.json()
        self.views.append((time.time(), took, view["batches"]["settled"]))
        return view

    def wait(self, run_id: str, timeout: float, stall: float = 120.0, report: float = 15.0,
             every: float | None = None) -> dict:
        """Poll the run until it is final; a progress line every `report` seconds. Gives up after `timeout`, or
        when no batch settled for `stall` seconds (a stuck run would otherwise hold the suite for its timeout).

        Polls every `every` seconds (tools/local_run.py polls every 0.5 s), or often at first and every 3 s
        later. Each GET's time is kept in `views` (figures come from the run's own timestamps, not from when
        the poll saw them)."""
        now = time.monotonic()
        deadline, next_report = now + timeout, now + report
        settled, progressed, interval = -1, now, every or 0.25
        while True:
            view = self.view(run_id)
            if view["status"] in FINISHED:
                return view
            now = time.monotonic()
            if view["batches"]["settled"] != settled:
                settled, progressed = view["batches"]["settled"], now
            if now > deadline or now - progressed > stall:
                why = f"within {timeout:.0f}s" if now > deadline else f"(no batch settled for {stall:.0f}s)"
                raise BenchError(f"run {run_id} did not finish {why}: status {view['status']}, "
                                 f"{settled}/{view['batches']['planned']} batches settled")
            if now >= next_report:
                say(f"  run {run_id}: {view['status']}, {view['batches']['settled']}/{view['batches']['planned']} "
                    "batches settled")
                next_report += report
            time.sleep(interval)
            interval = every or min(3.0, interval * 1.5)
