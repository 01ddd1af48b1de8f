"""What Autopilot has acknowledged, per export and contact: fingerprint of the sent fields and membership.

One Table entity per contact (partition = export). Only a sender that got Autopilot's acknowledgement
writes here, in one transaction per batch, so a crash leaves the state either before or after a batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableClient, TableServiceClient, UpdateMode

STATE_TABLE = "contactstate"
_TRANSACTION_LIMIT = 100  # Table storage's cap on operations per transaction


class Acked(NamedTuple):
    key: str  # normalised (lower-case) email
    fingerprint: str
    member: bool


def row_key(key: str) -> str:
    # Emails may hold characters Table keys forbid ('/', '#', '?'): key by a digest instead.
    return hashlib.sha256(key.encode()).hexdigest()[:40]


class ContactState:
    def __init__(self, table: TableClient, export: str):
        self.table = table  # the STATE_TABLE client, shared by every export
        self.export = export

    @classmethod
    def from_service(cls, tables: TableServiceClient, export: str) -> ContactState:
        return cls(tables.get_table_client(STATE_TABLE), export)

    def load(self) -> Iterator[Acked]:
        rows = self.table.query_entities(
            "PartitionKey eq @p", parameters={"p": self.export}, select=["email", "fp", "member"]
        )
        for e in rows:
            yield Acked(e["email"], e["fp"], bool(e["member"]))

    def acknowledge(self, acks: Iterable[Acked]) -> None:
        ops = [("upsert", self._entity(a), {"mode": UpdateMode.REPLACE}) for a in acks]
        for start in range(0, len(ops), _TRANSACTION_LIMIT):
            self.table.submit_transaction(ops[start : start + _TRANSACTION_LIMIT])

    def lookup(self, keys: Iterable[str]) -> dict[str, Acked]:
        """Point reads, used only for redelivered batches, to skip what was already acknowledged."""
        found = {}
        for key in keys:
            try:
                e = self.table.get_entity(self.export, row_key(key), select=["email", "fp", "member"])
            except ResourceNotFoundError:
                continue
            found[key] = Acked(e["email"], e["fp"], bool(e["member"]))
        return found

    def _entity(self, ack: Acked) -> dict:
        return {
            "PartitionKey": self.export, "RowKey": row_key(ack.key),
            "email": ack.key, "fp": ack.fingerprint, "member": ack.member,
        }
