"""The local world for end-to-end tests: a fresh stack (Azurite, Key Vault stand-in, simulator) and a local
host running function_app.py on it, driven over HTTP the way an operator would."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import requests
from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient

from shared.state.run_records import FINISHED
from tools.generate_export import STANDARD_COLUMNS, write_export
from tools.local_host import LocalHost, QueueOptions, app_under
from tools.local_stack import LocalStack

COLUMN = {name: i for i, name in enumerate(STANDARD_COLUMNS)}
FIELD_KEY = "boolean--In--High--Value--Segment"


def expected_contacts(rows) -> dict[str, dict]:
    """What Autopilot must hold for these rows under tests.support.definition's mapping (empty values omitted)."""
    fields = {"FirstName": "FirstName", "LastName": "LastName", "Company": "CompanyName", "MailingCity": "City"}
    result = {}
    for row in rows:
        contact = {field: row[COLUMN[column]] for field, column in fields.items() if row[COLUMN[column]]}
        contact["Email"] = row[COLUMN["PrimaryEmail"]]
        points = row[COLUMN["LoyaltyPoints"]]
        contact["custom"] = {FIELD_KEY: True, **({"integer--Loyalty--Points": int(points)} if points else {})}
        result[contact["Email"].lower()] = contact
    return result


CONTAINER = "ciexports"
# Quick polling and retries, so a test's run takes seconds (the real host.json values are tested elsewhere).
FAST_QUEUES = QueueOptions(batch_size=32, new_batch_threshold=48, max_dequeue_count=3, visibility_timeout=0.5,
                           max_polling_interval=0.2)


def definition(name: str, membership: str = "field", **extra) -> dict:
    """An export definition in the document's own shape, mapping the generator's standard columns."""
    destination = {"membership": membership, "onLeave": extra.pop("on_leave", "remove")}
    target = extra.pop("target", "In High Value Segment" if membership == "field" else "High value")
    destination[membership] = target  # two exports on one list or field are refused: give others a `target`
    return {
        "name": name, "enabled": True, "dataTransferAcknowledged": True,
        "source": {"connection": "EXPORT_STORAGE", "container": CONTAINER, "prefix": "",
                   "segment": extra.pop("segment", "HighValueSegment")},
        "destination": destination,
        "fields": {"Email": "PrimaryEmail", "FirstName": "FirstName", "LastName": "LastName",
                   "Company": "CompanyName", "MailingCity": "City"},
        "customFields": [{"name": "Loyalty Points", "type": "integer", "column": "LoyaltyPoints"}],
        **extra,
    }


class World:
    def __init__(self, stack: LocalStack, host: LocalHost):
        self.stack, self.host = stack, host
        self.sim = stack.sim
        self.blobs = BlobServiceClient.from_connection_string(stack.storage)
        self.api = requests.Session()
        self.api.headers.update({"x-functions-key": host.function_key, "Content-Type": "application/json"})
        self._clock = datetime(2026, 3, 2, 4, 15, tzinfo=UTC)

    def define(self, *exports: dict) -> None:
        """Write the export definitions document where the app reads it (EXPORTS_BLOB)."""
        self.blobs.get_blob_client("config", "exports.json").upload_blob(
            json.dumps({"exports": list(exports)}), overwrite=True)

    def snapshot(self, rows, *, segment: str = "HighValueSegment", columns=STANDARD_COLUMNS, **options) -> None:
        """Write the next refresh of a segment, as Customer Insights would (15 minutes after the last)."""
        container = self.blobs.get_container_client(CONTAINER)
        try:
            container.create_container()
        except ResourceExistsError:
            pass
        self._clock += timedelta(minutes=15)
        write_export(container, rows, columns=columns, segment=segment, time=self._clock, **options)

    def start(self, name: str, **options) -> requests.Response:
        return self.api.post(f"{self.host.base_url}/api/exports/{name}/runs", json=options, timeout=120)

    def view(self, run_id: str) -> dict:
        return self.api.get(f"{self.host.base_url}/api/runs/{run_id}", timeout=30).json()

    def wait(self, run_id: str, timeout: float = 90.0, poll: float = 0.1) -> dict:
        """Poll the run until it ends. A long run wants a slower `poll`: each view sums every batch outcome, and
        the host runs in this process."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.view(run_id)
            if view["status"] in FINISHED:
                return view
            time.sleep(poll)
        raise AssertionError(f"run {run_id} did not finish in {timeout}s: {self.view(run_id)}")

    def view_records(self, run_id: str) -> int:
        """Batches of a run settled so far, read from the run records (works while no host serves HTTP)."""
        from azure.data.tables import TableServiceClient

        from shared.state.run_records import RunRecords

        with TableServiceClient.from_connection_string(self.stack.storage) as tables:
            return len(RunRecords(tables).batch_outcomes(run_id))

    def run(self, name: str, **options) -> dict:
        response = self.start(name, **options)
        assert response.status_code in (200, 202), response.text
        return self.wait(response.json()["runId"])

    # --- what Autopilot holds ---------------------------------------------------------------------
    def field_members(self, key: str = "boolean--In--High--Value--Segment") -> set[str]:
        return {email for email, c in self.sim.contacts().items() if c.get("custom", {}).get(key) is True}

    def list_members(self, title: str = "High value") -> set[str]:
        ids = [list_id for list_id, name in self.sim.lists().items() if name == title]
        return self.sim.members(ids[0]) if ids else set()

    def contact_requests(self) -> list[dict]:
        """Logged requests that carry contacts or membership (not the list look-up), answered or not."""
        return [r for r in self.sim.request_log()
                if r["path"].endswith(("/contact", "/contacts")) or "/contact/" in r["path"]]


def acknowledged_state(storage: str, export: str) -> list:
    """The acknowledged state of the export's current destination, as planning reads it (its snapshot), once the
    ended runs' acknowledgements are folded into it (a run's end folds right after marking it finished)."""
    from types import SimpleNamespace

    from azure.data.tables import TableServiceClient

    from shared.state.state_store import STATE_TABLE, ExportState

    with TableServiceClient.from_connection_string(storage) as tables, \
            BlobServiceClient.from_connection_string(storage) as blobs:
        state = ExportState(blobs, tables.get_table_client(STATE_TABLE), export)
        try:
            wait_until(lambda: not state.head()[0]["pending"], timeout=10)
        except AssertionError:
            pass  # a run still sending, or one a test crashed: its acknowledgements are not in the snapshot yet
        head, _ = state.head()
        return list(state.load(SimpleNamespace(id=head["destination"]))) if head["destination"] else []


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def open_world(rate: float = 50.0, queues: QueueOptions = FAST_QUEUES, settings: dict | None = None,
               only: tuple[str, ...] | None = None, **stack_options):
    """Start a fresh stack and a local host on it; the caller stops both (see the `world` fixture).
    `settings` overrides app settings, e.g. {"AUTOPILOT_TIMEOUT_SECONDS": "1", "AUTOPILOT_MAX_ATTEMPTS": "2"};
    `only`: the host runs these functions only."""
    stack = LocalStack(rate=rate, **stack_options).start()
    settings = stack.settings(None, **(settings or {}))
    from shared import services

    # The app as the real host loads it under these settings (API_AUTHENTICATION=entra: routes without keys).
    host = LocalHost(app_under(settings), settings, port=0, options=queues, only=only).start()
    services.current()  # creates the queues, tables and containers (infra/ does this in Azure)
    return World(stack, host)


def close_world(world: World) -> None:
    world.host.stop()
    world.blobs.close()
    world.stack.stop()
