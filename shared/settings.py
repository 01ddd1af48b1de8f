"""App settings, read once from the environment into one object (tests build their own)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_BASE_URL = "https://api2.autopilothq.com/v1"
BATCH_QUEUE = "autopilot-batches"
POISON_QUEUE = f"{BATCH_QUEUE}-poison"
HOST_CONNECTION = "AzureWebJobsStorage"


class SettingsError(ValueError):
    """A missing or malformed app setting: the app refuses to run and names it."""


@dataclass(frozen=True)
class Settings:
    autopilot_base_url: str
    requests_per_second: float
    key_vault_url: str
    env: Mapping[str, str] = field(repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        return cls(
            autopilot_base_url=env.get("AUTOPILOT_BASE_URL") or DEFAULT_BASE_URL,
            requests_per_second=_positive_float(env, "AUTOPILOT_REQUESTS_PER_SECOND", 5.0),
            key_vault_url=_required(env, "KEY_VAULT_URL"),
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
