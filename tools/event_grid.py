"""What Event Grid does for the app in Azure, on the local stack: deliver a Microsoft.Storage.BlobCreated event to
the host's Event Grid webhook when a model.json is written.

In Azure the export account's system topic sends every BlobCreated event whose subject ends in /model.json (the
subscription's filter, infra/app/events.bicep) to the Event Grid-triggered function `snapshot_written`. Locally,
whoever uploads the model.json (`local_run`, the demo) calls `deliver` afterwards: the same event schema and
filter, to the route the real host serves (`/runtime/webhooks/eventgrid?functionName=<name>`). Not simulated:
Event Grid's delivery delay (about a second), its retries and dead-lettering, and deliveries lost or repeated (a
test delivers an event twice itself).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import requests

from shared.pipeline.runs import BLOB_CREATED

SUBJECT_ENDS_WITH = "/model.json"  # the subscription's filter: nothing else reaches the app
WEBHOOK_PATH = "/runtime/webhooks/eventgrid"  # the real host's route for Event Grid deliveries


def blob_created(blob_url: str, length: int) -> dict:
    """A BlobCreated event (Event Grid schema) for the blob at `blob_url` (https://<account>/<container>/<name>)."""
    account_path = blob_url.split("://", 1)[-1].split("/", 1)[1]
    container, _, name = account_path.partition("/")
    if account_path.startswith("devstoreaccount1/"):  # Azurite's path-style URL: the account comes first
        container, _, name = name.partition("/")
    return {
        "id": str(uuid.uuid4()),
        "topic": "/subscriptions/local/resourceGroups/local/providers/Microsoft.Storage/storageAccounts/local",
        "subject": f"/blobServices/default/containers/{container}/blobs/{name}",
        "eventType": BLOB_CREATED,
        "eventTime": datetime.now(UTC).isoformat(),
        "dataVersion": "",
        "metadataVersion": "1",
        "data": {"api": "PutBlob", "blobType": "BlockBlob", "contentType": "application/json",
                 "contentLength": length, "url": blob_url},
    }


def wanted(event: dict) -> bool:
    """The subscription's filter: BlobCreated events of blobs named model.json."""
    return event.get("eventType") == BLOB_CREATED and str(event.get("subject", "")).endswith(SUBJECT_ENDS_WITH)


def deliver(host_url: str, key: str, function: str, events: list[dict], timeout: float = 30) -> int:
    """POST the events that pass the filter to the host's Event Grid webhook, as Event Grid does; returns how many.
    The host answers once the function has run for each (a failure raises here, where Event Grid would retry)."""
    events = [e for e in events if wanted(e)]
    if events:
        answer = requests.post(f"{host_url}{WEBHOOK_PATH}", params={"functionName": function, "code": key},
                               json=events, timeout=timeout, headers={"aeg-event-type": "Notification"})
        answer.raise_for_status()
    return len(events)

