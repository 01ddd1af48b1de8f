"""The Azurite each test starts is its own: parallel test workers must never share one by accident."""

from __future__ import annotations

import pytest
from azure.data.tables import TableServiceClient

from tools.azurite import Azurite


def test_the_ports_are_those_azurite_itself_reports_and_reach_its_services(azurite):
    ports = dict(azurite.ports)
    assert all(ports.values()) and len(set(ports.values())) == 3
    tables = TableServiceClient.from_connection_string(azurite.connection_string)
    tables.create_table("portcheck")
    assert "portcheck" in [t.name for t in tables.list_tables()]
    tables.delete_table("portcheck")


def test_an_azurite_whose_port_another_process_holds_refuses_to_start(azurite):
    # Before, it was given ports found free beforehand and waited for anything to answer on them: a parallel
    # test's Azurite that took one first answered, and a table call met a queue service ("InvalidResourceName").
    second = Azurite(in_memory=True)
    second.ports = dict(azurite.ports)
    with pytest.raises(RuntimeError, match="could not start"):
        second.start(timeout=20)
    assert second.process is None
    second.close()
