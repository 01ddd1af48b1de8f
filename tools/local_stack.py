"""The embedded local stack: Azurite, the Key Vault stand-in and the Autopilot simulator, all on loopback.

The demo, the local run command, the tests and the benchmarks all start the stack through this one class,
so they run the product against the same real parts.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from pathlib import Path

from shared.runtime.settings import DEFAULT_SCHEDULE, WORKER_THREADS
from tools.autopilot_sim import Faults, SimProcess
from tools.azurite import Azurite
from tools.easy_auth_standin import KEY_SETTING
from tools.keyvault_standin import KeyVaultStandIn
from tools.state_lock import StateLock

SECRET_NAME = "autopilot-api-key"
LOCAL_API_HOSTS = frozenset({"127.0.0.1", "localhost"})  # the simulators: ALLOWED_API_HOSTS on the local stack
# One key per process for the local Easy Auth stand-in: a test mints tokens for any host it started with it, and a
# scale group's process gets it in its settings file. Never an Azure setting.
EASY_AUTH_KEY = secrets.token_urlsafe(32)


class LocalStack:
    def __init__(self, state_dir: str | Path | None = None, *, api_key: str | None = None, rate: float = 5.0,
                 autopilot_url: str | None = None, faults: Faults | None = None, in_memory: bool = False):
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="local-stack-"))
        self.api_key = api_key or secrets.token_hex(16)
        self.rate = rate
        self.autopilot_url = autopilot_url
        self.faults = faults
        self.azurite = Azurite(self.state_dir / "azurite", in_memory=in_memory)
        self.keyvault = KeyVaultStandIn(state_dir=self.state_dir / "keyvault")
        self.sim: SimProcess | None = None
        self._lock: StateLock | None = None

    @property
    def left_by_a_killed_stack(self) -> bool:
        """The state folder's lock was stale: the stack before this one was killed, not stopped."""
        return bool(self._lock and self._lock.was_stale)

    def start(self) -> LocalStack:
        """Raises state_lock.FolderInUse when another live local stack holds the state folder."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = StateLock(self.state_dir).acquire()
        self.azurite.start()
        self.keyvault.start()
        self.keyvault.set_secret(SECRET_NAME, self.api_key)
        if self.autopilot_url is None:
            self.sim = SimProcess(self.api_key, rate=self.rate, faults=self.faults).start()
            self.autopilot_url = self.sim.base_url
        self._lock.note_children([p.pid for p in (self.azurite.process, self.sim and self.sim.process) if p])
        return self

    def stop(self) -> None:
        if self.sim:
            self.sim.stop()
        self.keyvault.stop()
        self.azurite.stop()
        if self._lock:
            self._lock.release()
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def storage(self) -> str:
        return self.azurite.connection_string

    def settings(self, exports: dict | str | None = None, **overrides: str) -> dict[str, str]:
        """App settings for the Function App on this stack (the local form of what infra/ sets in Azure)."""
        document = exports if isinstance(exports, str) or exports is None else json.dumps(exports)
        values = {
            "FUNCTIONS_WORKER_RUNTIME": "python",
            "AzureWebJobsStorage": self.storage,
            "EXPORT_STORAGE": self.storage,
            "EXPORT_SCHEDULE": DEFAULT_SCHEDULE,
            "EXPORTS": document or "",
            "EXPORTS_BLOB": "config/exports.json",
            "KEY_VAULT_URL": self.keyvault.url,
            "KEY_VAULT_CA_FILE": str(self.keyvault.ca_file),
            "AUTOPILOT_API_KEY_SECRET_NAME": SECRET_NAME,
            "AUTOPILOT_BASE_URL": self.autopilot_url or "",
            "ALLOWED_API_HOSTS": ",".join(sorted(LOCAL_API_HOSTS)),
            "AUTOPILOT_REQUESTS_PER_SECOND": str(self.rate),
            "PYTHON_THREADPOOL_THREAD_COUNT": str(WORKER_THREADS),
            KEY_SETTING: EASY_AUTH_KEY,  # read only by the local host's stand-in, when API_AUTHENTICATION is entra
        }
        values.update(overrides)
        return values
