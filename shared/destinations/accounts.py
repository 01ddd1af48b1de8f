"""An Account: the clients of one destination connection (export_config.Connection) in one instance: its cached
API key (read again on a 401, rotated on its own), its platform's client (Autopilot or Ortto: the one seam between
the platforms), and its rate budget, which every instance and every export on that connection share, and no other
connection's export waits for."""

from __future__ import annotations

from dataclasses import dataclass

from azure.data.tables import TableClient

from shared.destinations.autopilot_client import AutopilotClient
from shared.destinations.ortto_client import OrttoClient
from shared.destinations.rate_budget import RateBudget
from shared.destinations.secrets import ApiKeyProvider
from shared.runtime.settings import Settings
from shared.source.export_config import DEFAULT_ACCOUNT, Connection

DEFAULT_BUDGET_KEY = "autopilot"  # the default connection's budget entity, as before connections existed


@dataclass
class Account:
    connection: Connection  # resolved
    api_key: ApiKeyProvider
    client: AutopilotClient | OrttoClient
    budget: RateBudget

    @classmethod
    def open(cls, connection: Connection, settings: Settings, budgets: TableClient) -> Account:
        api_key = ApiKeyProvider.from_settings(settings.env, connection.secret_name)  # (default: the app setting's)
        connection = connection.resolved(api_key.secret_name, settings.autopilot_base_url, settings.requests_per_second)
        platform = OrttoClient if connection.ortto else AutopilotClient
        client = platform(connection.base_url, api_key, settings.request_timeout)
        key = DEFAULT_BUDGET_KEY if connection.name == DEFAULT_ACCOUNT else f"connection~{connection.name}"
        budget = RateBudget(budgets, connection.rate, key=key, margin=settings.rate_margin)
        return cls(connection, api_key, client, budget)

    @property
    def described(self) -> str:
        """The account as run views and the state name it: its API and the secret holding its key."""
        return f"{self.connection.base_url} (key {self.connection.secret_name})"

    def close(self) -> None:
        self.client.close()
        self.api_key.close()
