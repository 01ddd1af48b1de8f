"""The destination connections as the console shows them, and a connection test: is each API key readable from Key
Vault now, and does the destination take it?

A test sends one harmless read (Autopilot: the lists; Ortto: the custom fields), paced by the connection's request
budget like any other request, so it never pushes a running sync over the account's rate. No answer holds a key:
Key Vault's problems name the secret and the vault, and the destination's text is trimmed and checked for it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit

from shared.destinations.accounts import Account
from shared.destinations.rate_budget import Deferred, Pacer
from shared.destinations.secrets import SecretUnavailable
from shared.services import Services
from shared.source.export_config import DEFAULT_ACCOUNT, ORTTO_DEFAULT_PLAN, Connection

SLOT_WAIT = 6.0  # seconds a test waits at most for its request slot (a sender's MAX_WAIT)
KEY_HELP = ("Each connection's API key lives in Key Vault as the secret its secretName names. Store or replace it "
            "with: az keyvault secret set --vault-name {vault} --name <secretName> --file <a file holding only the "
            "key> (a file keeps the key out of your shell history). The app reads it on its next use, and again "
            "whenever the destination refuses the one it holds. Never paste a key into the export definitions.")


class UnknownConnection(LookupError):
    pass


def list_connections(svc: Services) -> dict:
    """GET /api/connections: every connection of the definitions, resolved as runs use it, with which exports send
    to it and whether its key can be read now."""
    definitions = svc.definitions()
    shown = []
    for connection in definitions.connections:
        account = svc.account(connection)
        exports = [e.name for e in definitions.exports if e.account.name == connection.name]
        shown.append({**_described(connection, account), "exports": exports, **_key_state(account)})
    return {"connections": shown, "keyHelp": KEY_HELP.format(vault=_vault_name(svc.settings.key_vault_url))}


def _described(connection: Connection, account: Account) -> dict:
    """The connection as in force: the document's values, else its platform's, else the app settings'."""
    resolved = account.connection
    default_plan = connection.ortto and connection.plan is None and connection.rate is None
    return {"name": connection.name, "platform": resolved.platform,
            "region": resolved.region or ("us" if resolved.ortto else None),
            "plan": ORTTO_DEFAULT_PLAN if default_plan else resolved.plan,
            "requestsPerSecond": float(resolved.rate), "baseUrl": resolved.base_url,
            "secretName": resolved.secret_name, "fromAppSettings": connection.name == DEFAULT_ACCOUNT}


def _key_state(account: Account) -> dict:
    """Whether the key can be read (a cached key counts: it was read and not refused since)."""
    try:
        account.api_key.get()
    except SecretUnavailable as exc:  # (names the secret and the vault, never a value)
        return {"keyReadable": False, "keyProblem": str(exc)}
    return {"keyReadable": True, "keyProblem": None}


def _vault_name(url: str) -> str:
    """The vault's name, as `az keyvault` wants it, from KEY_VAULT_URL (https://<name>.vault.azure.net)."""
    host = urlsplit(url).hostname or ""
    return host.split(".")[0] if host.endswith(".vault.azure.net") else "<vault>"


def test_connection(svc: Services, name: str) -> dict:
    """POST /api/connections/{name}/test: one harmless read with the connection's key; UnknownConnection if the
    definitions have no connection of that name."""
    connection = next((c for c in svc.definitions().connections if c.name == name), None)
    if connection is None:
        raise UnknownConnection(f"no connection named {name[:80]!r} (\"default\" is the app settings' account)")
    account = svc.account(connection)
    client = account.client
    answer = {"connection": name, "call": client.check_call}
    problem = _key_state(account)["keyProblem"]
    if problem:
        return {**answer, "outcome": "no-key", "status": None, "detail": problem, "elapsedMs": 0}
    pacer = Pacer(account.budget, max_wait=SLOT_WAIT)
    try:
        probe = client.run_sync(lambda: client.check(pacer))
    except Deferred as exc:
        free = datetime.fromtimestamp(exc.at, UTC).strftime("%H:%M:%S UTC")
        return {**answer, "outcome": "throttled", "status": None, "elapsedMs": 0,
                "detail": f"the connection's request budget is booked by running syncs until {free}: test again then"}
    if probe.outcome == "throttled" and probe.status == 429:  # the account is at its limit: every sender holds off
        account.budget.throttled(probe.retry_after)
    return {**answer, "outcome": probe.outcome, "status": probe.status, "detail": probe.detail,
            "elapsedMs": round(probe.elapsed * 1000)}
