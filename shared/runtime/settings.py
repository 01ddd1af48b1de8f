"""App settings, read once from the environment into one object (tests build their own)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_BASE_URL = "https://api2.autopilothq.com/v1"
DEFAULT_SCHEDULE = "0 */15 * * * *"  # EXPORT_SCHEDULE unless set (infra/ and the local stack set this)
BATCH_QUEUE = "autopilot-batches"
POISON_QUEUE = f"{BATCH_QUEUE}-poison"
PLAN_QUEUE = "autopilot-plans"  # planning jobs and the windows of batches a run queues as it sends
PLAN_POISON_QUEUE = f"{PLAN_QUEUE}-poison"
# Where the host moves a message whose poison handler failed on every delivery: nothing is triggered by them, so
# retention.sweep keeps each in the `dead` container and empties them.
UNHANDLED_QUEUES = (f"{POISON_QUEUE}-poison", f"{PLAN_POISON_QUEUE}-poison")
HOST_CONNECTION = "AzureWebJobsStorage"
# Threads of the Python worker (PYTHON_THREADPOOL_THREAD_COUNT, set by infra/ and the local stack) for its
# synchronous functions: planning, the timer, the HTTP API, dead batches. Sending is asynchronous (an awaited request
# holds no thread); Azure's default for Python 3.11 is min(32, cores + 4), 5 or 6 on a Flex instance.
WORKER_THREADS = 16
DEFAULT_RATE_MARGIN = 0.025  # AUTOPILOT_RATE_MARGIN's default: what it absorbs, see rate_budget.MARGIN


class SettingsError(ValueError):
    """A missing or malformed app setting: the app refuses to run and names it."""


@dataclass(frozen=True)
class Settings:
    autopilot_base_url: str
    requests_per_second: float
    key_vault_url: str
    request_timeout: float = 10.0  # seconds to wait for Autopilot's answer before retrying
    max_attempts: int = 8  # deliveries of a batch before its rest is parked as a dead batch
    rate_margin: float = DEFAULT_RATE_MARGIN  # requests are spaced (1 + margin) / rate apart
    retention_days: int = 30  # days a finished run's records and outcomes are kept (infra's lifecycle rule: blobs)
    env: Mapping[str, str] = field(repr=False, default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        return cls(
            autopilot_base_url=env.get("AUTOPILOT_BASE_URL") or DEFAULT_BASE_URL,
            requests_per_second=_positive_float(env, "AUTOPILOT_REQUESTS_PER_SECOND", 5.0),
            key_vault_url=_required(env, "KEY_VAULT_URL"),
            request_timeout=_positive_float(env, "AUTOPILOT_TIMEOUT_SECONDS", 10.0),
            max_attempts=_positive_int(env, "AUTOPILOT_MAX_ATTEMPTS", 8),
            rate_margin=_positive_float(env, "AUTOPILOT_RATE_MARGIN", DEFAULT_RATE_MARGIN),
            retention_days=_positive_int(env, "RETENTION_DAYS", 30),
            env=env,
        )


def _required(env: Mapping[str, str], name: str) -> str:
    value = (env.get(name) or "").strip()
    if not value:
        raise SettingsError(f"app setting {name} is required but not set")
    return value


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"app setting {name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"app setting {name} must be greater than 0, got {raw!r}")
    return value


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _positive_float(env, name, default)
    if value != int(value):
        raise SettingsError(f"app setting {name} must be a whole number, got {env[name]!r}")
    return int(value)


API_AUTHENTICATION = ("function-key", "entra")


def api_authentication(env: Mapping[str, str]) -> str:
    """How HTTP callers authenticate (API_AUTHENTICATION): `function-key` (the default), or `entra` when the
    platform's built-in authentication checks an Entra ID token before any function runs (infra sets both)."""
    value = (env.get("API_AUTHENTICATION") or API_AUTHENTICATION[0]).strip().lower()
    if value not in API_AUTHENTICATION:
        raise SettingsError(f"app setting API_AUTHENTICATION must be one of {', '.join(API_AUTHENTICATION)}, "
                            f"got {value[:40]!r}")
    return value
