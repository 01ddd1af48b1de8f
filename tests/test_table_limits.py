"""Azure Table storage's limits hold on the local stack too (Azurite enforces none), and a batch outcome fits them
by construction: a dead batch of 100 contacts with a long reason is recorded."""

from __future__ import annotations

import time

import pytest
from azure.data.tables import TableTransactionError

from shared.runtime.storage import StorageConnection
from shared.runtime.table_limits import PROPERTY_MAX, TableLimitError, check_entity
from shared.state.run_records import BATCHES_TABLE, BatchOutcome, RunRecords, grouped, problems


@pytest.fixture
def tables(azurite):
    client = StorageConnection("HOST", {"HOST": azurite.connection_string}).tables
    for name in (BATCHES_TABLE, "runs", "limits"):
        try:
            client.create_table(name)
        except Exception:  # already there from an earlier test
            pass
    yield client
    client.close()


def test_a_property_over_64_kib_is_refused_as_azure_refuses_it(tables):
    table = tables.get_table_client("limits")
    with pytest.raises(TableLimitError, match="PropertyValueTooLarge: property 'note'"):
        table.create_entity({"PartitionKey": "p", "RowKey": "big", "note": "é" * (PROPERTY_MAX // 2 + 1)})
    table.create_entity({"PartitionKey": "p", "RowKey": "fits", "note": "é" * (PROPERTY_MAX // 2)})
    with pytest.raises(TableLimitError, match="property 'blob'"):
        table.upsert_entity({"PartitionKey": "p", "RowKey": "fits", "blob": b"x" * (PROPERTY_MAX + 1)})


def test_an_entity_over_1_mib_is_refused(tables):
    entity = {"PartitionKey": "p", "RowKey": "wide", **{f"p{i}": "x" * 30_000 for i in range(20)}}
    with pytest.raises(TableLimitError, match="EntityTooLarge"):
        tables.get_table_client("limits").create_entity(entity)


def test_a_transaction_of_more_than_100_entities_is_refused(tables):
    operations = [("upsert", {"PartitionKey": "t", "RowKey": f"{i:03d}"}) for i in range(101)]
    with pytest.raises((TableLimitError, TableTransactionError), match="at most 100"):
        tables.get_table_client("limits").submit_transaction(operations)


def test_a_dead_batch_of_100_contacts_with_a_long_reason_is_recorded(tables):
    reason = "dead batch: gave up after 8 attempts: " + "Autopilot answered 500: " + "x" * 470
    detail = [{"email": f"ab***@c***.example{i}", "reason": reason[:500]} for i in range(100)]
    ungrouped = {"PartitionKey": "r", "RowKey": "000001", "outcome": str(detail)}
    with pytest.raises(TableLimitError):  # as each contact's copy of the reason was stored before
        check_entity(ungrouped)
    records = RunRecords(tables)
    run_id = f"20260302T041500Z-{time.monotonic_ns() % 16**8:08x}"
    outcome = BatchOutcome(1, "upsert", "dead", 100, 0, 0, 100, detail, "gave up after 8 attempts")
    assert records.record_batch(run_id, outcome)
    [stored] = records.batch_outcomes(run_id)
    assert stored["outcome"] == grouped(detail) and len(stored["outcome"]) == 1
    assert problems(stored) == detail  # the report still lists every contact with its reason
