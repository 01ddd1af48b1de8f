"""The app's own signals for alerts: one log record per event, `<event> <JSON object>`, on logger
`autopilot.signals`. In Azure each record lands in Application Insights' `traces` table as its message, where the
alert rules of infra/app/alerts.bicep read it (`parse_json` of the text after the event name). Counts and names
only: never an address or a key.

Events and their fields (tests/test_alerts.py checks that every field a rule reads is written here):
- run_ended: runId, export, connection, status, sent, accepted, refused, failed, deadBatches
- batch_sent: runId, export, connection, requests, throttled (requests sent by one invocation, 429s among them)
- batch_dead: runId, export, connection, batch, contacts
- exports_enabled: exports (the names of the enabled exports, on every timer tick)
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("autopilot.signals")
EVENTS = ("run_ended", "batch_sent", "batch_dead", "exports_enabled")


def emit(event: str, **fields) -> None:
    if event not in EVENTS:
        raise ValueError(f"unknown signal {event!r}")
    log.info("%s %s", event, json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str))
