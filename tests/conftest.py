"""Shared fixtures: real Azurite on loopback, started once per test session."""

from __future__ import annotations

import uuid

import pytest
from azure.storage.blob import BlobServiceClient

from tools.azurite import Azurite


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Tests marked `long` first, each followed by one other. `make test`'s workers (xdist, --maxschedchunk 1) are
    handed two tests each, then one at a time as they free up: a long test started last, or queued behind another
    on one worker, would keep that worker busy for minutes after the others have finished."""
    long = [item for item in items if item.get_closest_marker("long")]
    if not long:
        return
    rest = [item for item in items if not item.get_closest_marker("long")]
    ordered = []
    for item in long:
        ordered += [item, *rest[:1]]
        rest = rest[1:]
    items[:] = ordered + rest


@pytest.fixture(scope="session")
def azurite():
    with Azurite() as instance:
        yield instance


@pytest.fixture
def storage_connection(azurite) -> str:
    return azurite.connection_string


@pytest.fixture
def blob_service(azurite) -> BlobServiceClient:
    return BlobServiceClient.from_connection_string(azurite.connection_string)


@pytest.fixture
def container(blob_service):
    """A fresh, uniquely named blob container for one test."""
    client = blob_service.create_container(f"t{uuid.uuid4().hex[:20]}")
    yield client
    client.delete_container()


@pytest.fixture
def world():
    """A fresh local stack with the local host running function_app.py on it."""
    from tests.support import close_world, open_world

    instance = open_world()
    yield instance
    close_world(instance)
