"""`make demo`: the main job on the embedded local stack, as a user would run it.

Generates a Customer Insights export of 5,000 profiles, syncs it to the Autopilot simulator in field mode with
`tools.local_run`, then writes the next refresh (2% churn), shows a dry run of it and syncs only the difference.
`--ortto` (`make demo-ortto`) does the same to the Ortto simulator, through an Ortto connection in tag mode.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from tools import local_run
from tools.autopilot_sim import SimProcess
from tools.generate_export import sample_profiles, write_export
from tools.ortto_sim import OrttoSimProcess

PROFILES = 5000
EXPORT = {
    "name": "high-value", "enabled": True, "dataTransferAcknowledged": True,
    "source": {"connection": "EXPORT_STORAGE", "container": "ciexports", "segment": "HighValueSegment"},
    "destination": {"membership": "field", "field": "In High Value Segment", "onLeave": "remove"},
    "fields": {"Email": "PrimaryEmail", "FirstName": "FirstName", "LastName": "LastName", "Company": "CompanyName",
               "MailingCity": "City", "MailingCountry": "Country"},
    "customFields": [{"name": "Loyalty Points", "type": "integer", "column": "LoyaltyPoints"},
                     {"name": "Lifetime Value", "type": "float", "column": "LifetimeValue"},
                     {"name": "Last Purchase", "type": "date", "column": "LastPurchase"}],
}


ORTTO_SECRET = "ortto-api-key"
ORTTO_TAG = "High value customers"


def ortto_export(base_url: str, rate: float) -> dict:
    """The same export sent to an Ortto account: membership is a tag; Company, which Ortto has no person field for,
    becomes a custom field; people it creates get no email permission (the export's choice: Ortto's own default
    would subscribe them); phones are read as US numbers where they carry no country code."""
    export = json.loads(json.dumps(EXPORT))
    export["destination"] = {"connection": "ortto", "membership": "list", "list": ORTTO_TAG, "onLeave": "remove",
                             "newPeople": {"emailPermission": False}}
    export["phoneRegion"] = "US"
    export["fields"]["Phone"] = "Phone"
    export["customFields"].append({"name": "Company", "type": "string", "column": export["fields"].pop("Company")})
    connection = {"name": "ortto", "platform": "ortto", "secretName": ORTTO_SECRET, "baseUrl": base_url,
                  "requestsPerSecond": rate}
    return {"connections": [connection], "exports": [export]}


def churned(rows: list[tuple]) -> list[tuple]:
    """The next refresh: 50 profiles leave, 50 change their city, 50 new ones join, one row turns invalid."""
    kept = [list(r) for r in rows[50:]]
    for row in kept[:50]:
        row[6] = "Reykjavík"
    kept[100][1] = "not-an-email"
    return [tuple(r) for r in kept] + list(sample_profiles(50, seed=1, start=PROFILES))


def summary(title: str, report: dict) -> str:
    c = report["counts"]
    started = " (started by the model.json event)" if report.get("trigger") == "event" else ""
    return (f"{title}: {report['status']}{started}; read {c['read']}, valid {c['valid']}, rejected {c['rejected']}; "
            f"joiners {c['joiners']}, changed {c['changed']}, leavers {c['leavers']}, unchanged {c['unchanged']}; "
            f"requests {report['plannedRequests']}; accepted {c['accepted']}, refused {c['refused']}, "
            f"failed {c['failed']}" + _ortto_results(c))


def _ortto_results(counts: dict) -> str:
    """What Ortto said of the people sent, and the email permission of those it created."""
    results = counts.get("results")
    if not results:
        return ""
    said = ", ".join(f"{status} {n}" for status, n in results.items())
    given = ", ".join(f"{n} {permission}" for permission, n in counts.get("created_with_email_permission", {}).items())
    return f"\n  Ortto: {said}" + (f"; email permission of the people created: {given}" if given else "")


def main(argv: list[str] | None = None) -> int:
    ortto = "--ortto" in (sys.argv[1:] if argv is None else argv)
    api_key = secrets.token_hex(16)  # a throwaway key for the local simulator, never printed
    os.environ["AUTOPILOT_API_KEY"] = api_key
    work = Path(tempfile.mkdtemp(prefix="demo-"))
    export_dir, config, keys = work / "export", work / "exports.json", work / "secrets.json"
    rows = list(sample_profiles(PROFILES, seed=1))
    rate = float(os.environ.get("AUTOPILOT_REQUESTS_PER_SECOND", "10" if ortto else "5"))
    sim = (OrttoSimProcess if ortto else SimProcess)(api_key, rate=rate).start()
    extra = []
    if ortto:
        config.write_text(json.dumps(ortto_export(sim.base_url, rate), indent=2))
        keys.touch(mode=0o600)  # the simulator's throwaway key, still no one else's to read
        keys.write_text(json.dumps({ORTTO_SECRET: api_key}))
        extra = ["--secrets-file", str(keys)]
    else:
        config.write_text(json.dumps({"exports": [EXPORT]}, indent=2))
    try:
        steps = [("first sync", rows, []), ("next refresh, dry run", churned(rows), ["--dry-run"]),
                 ("next refresh", None, [])]
        lines = []
        for number, (title, snapshot, flags) in enumerate(steps, start=1):
            if snapshot is not None:
                write_export(export_dir, snapshot, time=datetime(2026, 3, 2, 4, 15 * number, tzinfo=UTC),
                             partitions=2, container_name="ciexports")
            print(f"\n== {title} ==", flush=True)
            report = work / f"report-{number}.json"
            argv = ["--export-dir", str(export_dir), "--exports-config", str(config), "--export", "high-value",
                    "--autopilot-url", sim.base_url, "--state-dir", str(work / "state"), "--report", str(report),
                    *extra]
            status = local_run.main(argv + flags)
            lines.append(summary(title, json.loads(report.read_text())))
            if status:
                break
        if ortto:
            members = sum(1 for p in sim.people().values() if ORTTO_TAG in p["tags"])
        else:
            members = sum(1 for c in sim.contacts().values() if c["custom"].get("boolean--In--High--Value--Segment"))
    finally:
        sim.stop()
    print("\n== what happened ==\n" + "\n".join(lines))
    where = f"Ortto (simulator) now tags {members} people {ORTTO_TAG!r}" if ortto else \
        f"Autopilot (simulator) now holds {members} segment members"
    print(f"{where}. Reports and state are in {work}")
    return status


if __name__ == "__main__":
    sys.exit(main())
