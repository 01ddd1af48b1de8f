"""`make console`: the operator console on the local stack, with the demo's export and data.

Starts Azurite, the Autopilot simulator (20 requests/s), the Key Vault stand-in and the local Functions host, writes
the demo's export definition and a 5,000-profile export, and prints the console's address. The function key the
page asks for is LOCAL_FUNCTION_KEY's, else a new one written to .local/console-key (readable by its owner only;
never printed). Runs until Ctrl-C, then stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient

from tools.demo import EXPORT, PROFILES
from tools.generate_export import sample_profiles, write_export
from tools.local_host import LocalHost, ScaleGroups
from tools.local_stack import LocalStack

RATE = 20.0
KEY_FILE = Path(__file__).resolve().parent.parent / ".local" / "console-key"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.console", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=7071)
    args = parser.parse_args(argv)
    stack = LocalStack(rate=RATE).start()
    try:
        from function_app import app

        key, where = _function_key()
        host = LocalHost(app, stack.settings(None), port=args.port, function_key=key, groups=ScaleGroups()).start()
        try:
            _demo_data(stack)
            print(f"\nThe console: {host.base_url}/api/console/\nThe function key it asks for: {where}\n"
                  "Ctrl-C stops the console and the local stack.", flush=True)
            stopped = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stopped.set())
            try:
                stopped.wait()
            except KeyboardInterrupt:
                pass
        finally:
            host.stop()
    finally:
        stack.stop()
    return 0


def _function_key() -> tuple[str, str]:
    """The key for this console's session, and where the user finds it."""
    if os.environ.get("LOCAL_FUNCTION_KEY"):
        return os.environ["LOCAL_FUNCTION_KEY"], "LOCAL_FUNCTION_KEY's"
    key = secrets.token_urlsafe(24)
    KEY_FILE.parent.mkdir(exist_ok=True)
    KEY_FILE.unlink(missing_ok=True)
    descriptor = os.open(KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    return key, f"in {KEY_FILE} (cat it; a new one each start)"


def _demo_data(stack: LocalStack) -> None:
    """The demo's export definition, and a snapshot of its segment as Customer Insights writes one."""
    blobs = BlobServiceClient.from_connection_string(stack.storage)
    with blobs:
        for name in ("config", EXPORT["source"]["container"]):
            try:
                blobs.create_container(name)
            except ResourceExistsError:
                pass
        blobs.get_blob_client("config", "exports.json").upload_blob(json.dumps({"exports": [EXPORT]}), overwrite=True)
        write_export(blobs.get_container_client(EXPORT["source"]["container"]), list(sample_profiles(PROFILES, seed=1)),
                     time=datetime(2026, 3, 2, 4, 15, tzinfo=UTC), partitions=2)


if __name__ == "__main__":
    sys.exit(main())
