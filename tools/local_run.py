"""Run one export end to end on the local stack and write its run report.

    AUTOPILOT_API_KEY=... python -m tools.local_run --export-dir DIR --exports-config FILE --export NAME \\
        [--autopilot-url URL] [--secrets-file FILE] [--report FILE] [--dry-run] [--force] [--state-dir DIR]

DIR mirrors the export container's content (as Customer Insights writes it); it is uploaded to Azurite. The
API key (the default connection's) is stored in the Key Vault stand-in and read back by the app through the real
Key Vault client; the keys of the definitions' other connections come from --secrets-file, a JSON object of
secret name -> value (kept out of the command line, where `ps` shows it). The
run goes through the same functions as in Azure: the model.json it uploads is announced to the Event Grid trigger
as Event Grid does (tools.event_grid), which starts the run; the HTTP trigger's answer names that run (or starts
one: always so for --dry-run and --force, on-demand runs), and the queue trigger sends it.
With --state-dir the stack's storage is kept, so the next run of the same export is incremental; one local stack
at a time uses a state folder, and the same command after a local_run was killed resumes the run it left. Ctrl-C
cancels the run and waits for what is in flight to settle (exit status 130); a second Ctrl-C leaves at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import requests

from shared.runtime.settings import Settings, SettingsError
from shared.source.export_config import SECRET_NAME_RE, ExportConfigError, parse_exports
from shared.state.run_records import ACTIVE, FINISHED
from tools import event_grid
from tools.local_host import LocalHost, ScaleGroups
from tools.local_stack import LOCAL_API_HOSTS, LocalStack
from tools.state_lock import FolderInUse


class UsageError(Exception):
    """A bad argument or input file: reported in one line, exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.local_run", description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", required=True, type=Path, help="folder mirroring the export container")
    parser.add_argument("--exports-config", required=True, type=Path, help="export definitions (JSON)")
    parser.add_argument("--export", required=True, help="name of the export to run")
    parser.add_argument("--autopilot-url", help="an Autopilot-compatible API; default: start the simulator")
    parser.add_argument("--secrets-file", type=Path, help="JSON object of Key Vault secret name -> value: the keys "
                                                           "of the definitions' other connections")
    parser.add_argument("--report", type=Path, help="write the run report (JSON) here")
    parser.add_argument("--dry-run", action="store_true", help="report what would be sent; send nothing")
    parser.add_argument("--force", action="store_true", help="full resync: ignore what was already sent")
    parser.add_argument("--state-dir", type=Path, help="keep the local stack's storage here between runs")
    parser.add_argument("--timeout", type=float, default=3600, help="give up waiting after this many seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s %(message)s")
    try:
        report = run(args)
    except (UsageError, ExportConfigError, SettingsError, FolderInUse) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("left without waiting; the local stack is stopped", file=sys.stderr)
        return 130
    text = json.dumps(report, indent=2)
    if args.report:
        args.report.write_text(text)
    print(text)
    return 0 if report["status"] in ("succeeded", "dry run") else 130 if report["status"] == "cancelled" else 1


def run(args: argparse.Namespace) -> dict:
    exports = _read_exports(args.exports_config, args.export)
    api_key = os.environ.get("AUTOPILOT_API_KEY", "")
    if not api_key:
        raise UsageError("set the environment variable AUTOPILOT_API_KEY (the key is stored in the Key Vault "
                         "stand-in and read back by the app)")
    if not args.export_dir.is_dir():
        raise UsageError(f"--export-dir {args.export_dir} is not a folder")
    rate = Settings.from_env({**os.environ, "KEY_VAULT_URL": "-"}).requests_per_second
    secrets = _read_secrets(args.secrets_file)
    with LocalStack(args.state_dir, api_key=api_key, rate=rate, autopilot_url=args.autopilot_url) as stack:
        for name, value in secrets.items():
            stack.keyvault.set_secret(name, value)
        definition = next(e for e in parse_exports(exports, api_hosts=LOCAL_API_HOSTS) if e.name == args.export)
        models = upload_folder(stack.storage, definition.container, args.export_dir)
        settings = stack.settings(exports)
        resume = stack.left_by_a_killed_stack
        # What Event Grid does in Azure: the model.json written starts the run. No event for a dry run or a forced
        # one (on-demand runs), nor when resuming (that model.json was there before).
        announce = not (args.dry_run or args.force or resume)
        # Each queue-triggered function in a process of its own, as Flex Consumption runs them (tools.local_host).
        with LocalHost(_app(), settings, port=0, groups=ScaleGroups()) as host:
            if announce:
                event_grid.deliver(host.base_url, host.function_key, "snapshot_written",
                                   [event_grid.blob_created(url, size) for url, size in models])
            return _run_and_wait(host, args, resume, announce)


def _read_exports(path: Path, name: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read --exports-config {path}: {exc.strerror}") from None
    names = [e.name for e in parse_exports(text, str(path), LOCAL_API_HOSTS)]
    if name not in names:
        raise UsageError(f"{path} has no export named {name!r} (it has: {', '.join(names) or 'none'})")
    return text


def _read_secrets(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        secrets = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read --secrets-file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"--secrets-file {path} is not JSON: {exc}") from None  # (the message quotes no value)
    bad = [name for name, value in secrets.items() if not (isinstance(value, str) and value and
                                                            SECRET_NAME_RE.fullmatch(name))] \
        if isinstance(secrets, dict) else None
    if bad is None or bad:
        raise UsageError(f"--secrets-file {path} must be a JSON object of Key Vault secret name (letters, digits, "
                         f"hyphens) -> non-empty text{'; wrong: ' + ', '.join(map(repr, bad[:5])) if bad else ''}")
    return secrets


def _app():
    from function_app import app  # imported late: the host sets the app settings first

    return app


def upload_folder(connection: str, container: str, folder: Path) -> list[tuple[str, int]]:
    """Mirror a folder into a blob container (paths relative to the folder); returns the URL and size of each
    model.json written (Customer Insights writes it last; so does this)."""
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    client = BlobServiceClient.from_connection_string(connection).get_container_client(container)
    try:
        client.create_container()
    except ResourceExistsError:
        pass
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: (p.name == "model.json", p))
    models = []
    for path in files:
        with path.open("rb") as data:
            blob = client.upload_blob(path.relative_to(folder).as_posix(), data, overwrite=True)
        if path.name == "model.json":
            models.append((blob.url, path.stat().st_size))
    return models


def _run_and_wait(host: LocalHost, args: argparse.Namespace, resume: bool, announced: bool) -> dict:
    api = requests.Session()
    api.headers.update({"x-functions-key": host.function_key, "Content-Type": "application/json"})
    body = {"dryRun": args.dry_run, "force": args.force}
    started = api.post(f"{host.base_url}/api/exports/{args.export}/runs", json=body, timeout=600)
    view = started.json()
    busy = started.status_code == 409 and view.get("runId")
    url = host.base_url + view["statusUrl"] if busy or started.ok else ""
    current = api.get(url, timeout=30).json() if busy else view  # the run in progress
    if busy and announced and current.get("trigger") == "event":
        # The model.json event started it (had it not, its snapshot was synced before: the POST starts a run)
        print(f"following run {view['runId']}, started by the model.json event", file=sys.stderr)
    elif busy and resume and not args.force:
        # The run in progress was left by a local_run that was killed (the state folder's lock was stale): what its
        # host had taken from the queues is leased to that dead host for minutes, so the run is taken over (its
        # unsettled batches queued again; one that turns up twice is sent once) and waited for here.
        print(f"resuming run {view['runId']}, left unfinished by a local_run that was killed", file=sys.stderr)
        _take_over(view["runId"])
    elif not started.ok:
        raise UsageError(f"the run was refused ({started.status_code}): {view.get('error')}")
    view = current
    try:
        return _wait(api, url, view, args.timeout)
    except KeyboardInterrupt:  # cancel the run and wait for it to settle; a second Ctrl-C leaves at once
        print(f"\ncancelling run {view['runId']} (Ctrl-C again to leave at once) ...", file=sys.stderr)
        cancelled = api.post(f"{host.base_url}/api/runs/{view['runId']}/cancel", timeout=120)
        return _wait(api, url, api.get(url, timeout=30).json() if cancelled.ok else view, args.timeout)


def _take_over(run_id: str) -> None:
    from shared import services
    from shared.pipeline import runs  # the app's own take-over, in this process (the host runs here)

    svc = services.current()
    run = svc.records.get(run_id)
    if run and run.get("status") in ACTIVE:
        runs.take_over(svc, run)


def _wait(api: requests.Session, url: str, view: dict, timeout: float) -> dict:
    bar = _progress_bar(view)
    deadline = time.monotonic() + timeout
    while view["status"] not in FINISHED:
        if time.monotonic() > deadline:
            raise UsageError(f"run {view['runId']} did not finish within {timeout:.0f}s; see {url}")
        time.sleep(0.5)
        view = api.get(url, timeout=30).json()
        if bar is not None:
            bar.total = view["batches"]["planned"] or bar.total
            bar.update(view["batches"]["settled"] - bar.n)
    if bar is not None:
        bar.close()
    return view


def _progress_bar(view: dict):
    if not sys.stderr.isatty() or view["status"] in FINISHED:
        return None
    from tqdm import tqdm

    return tqdm(total=view["batches"]["planned"], unit="batch", desc=f"run {view['runId']}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
