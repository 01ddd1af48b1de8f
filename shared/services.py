"""The clients one Function instance uses, built once and lazily from the settings; tests may swap them."""

from __future__ import annotations

import threading
from functools import cached_property

from azure.core.exceptions import ResourceExistsError
from azure.data.tables import TableClient
from azure.storage.blob import ContainerClient

from shared.destinations.accounts import Account
from shared.runtime.settings import BATCH_QUEUE, HOST_CONNECTION, PLAN_QUEUE, POISON_QUEUE, Settings
from shared.runtime.storage import StorageConnection
from shared.source.export_config import Connection, Definitions, ExportDefinition, load_definitions
from shared.state.run_records import BATCHES_TABLE, RUNS_TABLE, RunRecords
from shared.state.state_store import STATE_CONTAINER, STATE_TABLE, Destination, ExportState

BUDGET_TABLE = "ratebudget"
CONTAINERS = ("batches", "reports", "config", "dead", STATE_CONTAINER)


class UnknownExport(LookupError):
    pass


def find_export(svc: Services, name: str) -> ExportDefinition:
    for export in svc.exports():
        if export.name == name:
            return export
    raise UnknownExport(f"no export named {name!r}")


class Services:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.host = StorageConnection(HOST_CONNECTION, settings.env)
        self._ready = False
        self._lock = threading.Lock()
        self._connections: dict[str, StorageConnection] = {HOST_CONNECTION: self.host}
        self._accounts: dict[Connection, Account] = {}

    @cached_property
    def records(self) -> RunRecords:
        return RunRecords(self.host.tables)

    @cached_property
    def budgets(self) -> TableClient:
        return self.host.tables.get_table_client(BUDGET_TABLE)

    def account(self, connection: Connection) -> Account:
        """The clients of one Autopilot connection in this instance, built on first use."""
        with self._lock:
            if connection not in self._accounts:
                self._accounts[connection] = Account.open(connection, self.settings, self.budgets)
            return self._accounts[connection]

    def run_account(self, run_id: str) -> Account:
        """The account a run was planned for (its record keeps the connection)."""
        return self.account(Connection.from_text(self.records.account(run_id)))

    @cached_property
    def queue(self):
        return self.host.queue(BATCH_QUEUE)

    @cached_property
    def poison_queue(self):
        return self.host.queue(POISON_QUEUE)

    @cached_property
    def plan_queue(self):
        return self.host.queue(PLAN_QUEUE)

    @cached_property
    def state_table(self) -> TableClient:
        return self.host.tables.get_table_client(STATE_TABLE)

    def state(self, export: str) -> ExportState:
        return ExportState(self.host.blob, self.state_table, export)

    def destination(self, export: ExportDefinition) -> Destination:
        """Whose state a run of `export` reads and writes: its Autopilot account and membership target."""
        target = export.list if export.membership == "list" else export.membership_key
        return Destination(self.account(export.account).described, export.membership, target or "")

    def exports(self) -> tuple[ExportDefinition, ...]:
        """Read on every use, so an edited definitions document applies to the next run."""
        return self.definitions().exports

    def definitions(self) -> Definitions:
        """The whole definitions document, validated: exports and connections."""
        return load_definitions(self.settings.env, self._read_host_blob)

    def export_container(self, export: ExportDefinition) -> ContainerClient:
        return self.source_container(export.connection, export.container)

    def source_container(self, setting: str, container: str) -> ContainerClient:
        """A container of the storage account that app setting `setting` connects to (one client per setting)."""
        with self._lock:
            if setting not in self._connections:
                self._connections[setting] = StorageConnection(setting, self.settings.env)
            connection = self._connections[setting]
        return connection.blob.get_container_client(container)

    def _read_host_blob(self, container: str, path: str) -> bytes:
        return self.host.blob.get_blob_client(container, path).download_blob().readall()

    def ensure_resources(self) -> None:
        """Create the tables, queues and containers the app uses (provisioned by infra/ in Azure)."""
        with self._lock:
            if self._ready:
                return
            for table in (RUNS_TABLE, BATCHES_TABLE, STATE_TABLE, BUDGET_TABLE):
                _ignore_exists(lambda t=table: self.host.tables.create_table(t))
            for queue in (self.queue, self.poison_queue, self.plan_queue):
                _ignore_exists(queue.create_queue)
            for container in CONTAINERS:
                _ignore_exists(lambda c=container: self.host.blob.create_container(c))
            # Every table client is built now, before any request is in flight: azure-data-tables'
            # get_table_client() re-links the policies all its pipelines share, and doing that while another
            # thread sends breaks that request ("'_SansIOHTTPPolicyRunner' object has no attribute 'next'").
            _ = self.records, self.budgets, self.state_table
            self._ready = True


    def close(self) -> None:
        """Close every pooled connection (a stopped host must not keep Azurite or Autopilot sockets open)."""
        for connection in self._connections.values():
            connection.close()
        built = self.__dict__
        for name in ("queue", "poison_queue", "plan_queue"):
            if name in built:
                built[name].close()
        for account in self._accounts.values():
            account.close()


def _ignore_exists(create) -> None:
    try:
        create()
    except ResourceExistsError:
        pass


_current: Services | None = None
_current_lock = threading.Lock()


def current() -> Services:
    """The process's services, built from the environment on first use (never at import time)."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Services(Settings.from_env())
        services = _current
    services.ensure_resources()
    return services


def use(services: Services | None) -> None:
    """Replace the process's services (tests, the local host), closing the ones replaced."""
    global _current
    with _current_lock:
        previous, _current = _current, services
    if previous is not None and previous is not services:
        previous.close()
