"""Entra ID app roles for the HTTP API, free of Azure types: which role each operation needs, and whether the
principal the platform forwards holds it.

The API's app registration declares three app roles, assignment required (infra/); each includes the ones
before it in ROLES, so an Operator may read and an Admin may do everything an Operator may. An operation declared
with no role (ANY_CALLER) is for every authenticated principal, one holding no role too: it tells the caller who
it is, and nothing else.

The principal headers are trusted only because the platform's built-in authentication (Easy Auth) drops any
X-MS-CLIENT-PRINCIPAL* header a client sends and sets its own after checking the token. That holds only while
Easy Auth is on: with API_AUTHENTICATION=entra the routes take no function key, so infra/ turns both on together.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping

READER = "Exports.Reader"  # read exports, runs, definitions, connections and the export storage's segments
OPERATOR = "Exports.Operator"  # start, cancel and replay runs; test a connection
ADMIN = "Exports.Admin"  # change the export definitions and connections
ROLES = (READER, OPERATOR, ADMIN)  # each includes those before it
ANY_CALLER = None  # no role needed: any authenticated principal (still 401 without one)

# The role each API operation needs, by the name of its function in shared/http_api.py (function_app.py's route
# of the same name calls it). The one place to say who may do what: a new route gets its line here, or is refused.
OPERATION_ROLES: dict[str, str | None] = {
    "whoami": ANY_CALLER,
    "list_exports": READER,
    "list_runs": READER,
    "get_run": READER,
    "rejected_rows": READER,
    "list_connections": READER,
    "get_definitions": READER,
    "list_segments": READER,
    "list_columns": READER,
    "start_run": OPERATOR,
    "cancel_run": OPERATOR,
    "replay_run": OPERATOR,
    "test_connection": OPERATOR,
    "save_export": ADMIN,
    "save_connection": ADMIN,
}

# Routes that take no role: files with no data in them (the console's page, script and style, which call the API
# above with the caller's own key or token).
UNGUARDED = {"console_file"}

PRINCIPAL_HEADER = "x-ms-client-principal"  # base64 of JSON: {"auth_typ", "claims": [{"typ", "val"}], "role_typ"}
PRINCIPAL_ID_HEADER = "x-ms-client-principal-id"  # the caller's object id
ROLES_CLAIM = "roles"  # the token's claim name; the platform may also map it to the type `role_typ` names
MAX_PRINCIPAL = 64 * 1024  # characters; a token with every claim is a few KB
OBJECT_ID = re.compile(r"[0-9a-fA-F-]{36}")
ASSIGN_HINT = ("an admin assigns app roles in Entra ID > Enterprise applications > the API's app > Users and groups "
               "(to a script's service principal: az rest --method post to Microsoft Graph's servicePrincipals/"
               "<the API's service principal id>/appRoleAssignedTo), then the caller gets a new token")


class PrincipalError(ValueError):
    """The forwarded principal cannot be read; the message says what is wrong with it."""


class UndeclaredOperation(LookupError):
    """An API operation without a line in OPERATION_ROLES: a programming error, and the call is refused."""


def required_role(operation: str) -> str | None:
    """The app role an API operation needs (ANY_CALLER: none); UndeclaredOperation, naming the table, when the
    operation has no line in it."""
    try:
        return OPERATION_ROLES[operation]
    except KeyError:
        raise UndeclaredOperation(f"no app role is declared for the API operation {operation!r}: add it to "
                          "OPERATION_ROLES in shared/api_roles.py") from None


def principal_roles(encoded: str) -> frozenset[str]:
    """The app roles in an X-MS-CLIENT-PRINCIPAL value. App roles are claims of type `roles`, or of the type the
    principal's `role_typ` names (the platform maps some claim names): both count. A claim that is not a
    {"typ": text, "val": text} object grants nothing; a value that is not base64 of a JSON object with a list
    of claims raises PrincipalError."""
    if len(encoded) > MAX_PRINCIPAL:
        raise PrincipalError(f"is {len(encoded)} characters long; at most {MAX_PRINCIPAL} are read")
    try:
        principal = json.loads(base64.b64decode(encoded.strip(), validate=True))
    except (ValueError, RecursionError):  # binascii.Error, JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PrincipalError("is not base64 of JSON") from None
    claims = principal.get("claims") if isinstance(principal, dict) else None
    if not isinstance(claims, list):
        raise PrincipalError("holds no list of claims")
    role_typ = principal.get("role_typ")
    types = {ROLES_CLAIM, role_typ} if isinstance(role_typ, str) else {ROLES_CLAIM}
    return frozenset(claim["val"] for claim in claims
                     if isinstance(claim, dict) and isinstance(claim.get("typ"), str) and claim["typ"] in types
                     and isinstance(claim.get("val"), str))


def allows(held: Iterable[str], needed: str) -> bool:
    """Whether the roles held include `needed`: it, or a role after it in ROLES. Role values are compared
    exactly: Entra puts the value declared on the app registration into the token, case and all, so a value
    differing in case is another role (one the registration does not declare)."""
    return any(role in ROLES and ROLES.index(role) >= ROLES.index(needed) for role in held)


def effective_roles(held: Iterable[str]) -> list[str]:
    """The roles in ROLES that `held` allows, in ROLES' order: an Admin's are all three."""
    held = list(held)
    return [role for role in ROLES if allows(held, role)]


def refusal(headers: Mapping[str, str], operation: str) -> tuple[int, str] | None:
    """None when the forwarded principal may call the operation; else (401 or 403, a message saying what is
    wrong and what to do). An ANY_CALLER operation needs a readable principal and no role. `headers` must look
    names up case-insensitively, as the host's do."""
    needed = required_role(operation)
    encoded = headers.get(PRINCIPAL_HEADER)
    if not encoded:
        return 401, ("this API takes Entra ID tokens (API_AUTHENTICATION is entra) and the request carries no "
                     "authenticated principal: call it with a bearer token for the API's app registration; if "
                     "it did, the app's built-in authentication (Easy Auth) is off")
    try:
        held = principal_roles(encoded)
    except PrincipalError as exc:
        return 401, (f"the authenticated principal forwarded to the app (X-MS-CLIENT-PRINCIPAL) {exc}: is the "
                     "app's built-in authentication (Easy Auth) on, with Entra ID as its provider?")
    if needed is ANY_CALLER or allows(held, needed):
        return None
    return 403, _forbidden(needed, held, headers.get(PRINCIPAL_ID_HEADER, ""))


def _forbidden(needed: str, held: frozenset[str], object_id: str) -> str:
    """The 403 message: the role needed, the roles held (app role values, nothing secret), who holds them and
    how an admin assigns the role. Held values are shortened: a message never echoes much of a request."""
    including = [role for role in ROLES if ROLES.index(role) > ROLES.index(needed)]
    needs = needed + (f" (or {' or '.join(including)})" if including else "")
    shown = ", ".join(sorted(role[:60] for role in held)[:10]) or "no app role"
    caller = f" (object id {object_id})" if OBJECT_ID.fullmatch(object_id) else ""
    declared = {role.lower() for role in ROLES}
    case = " (role values are case-sensitive)" if any(r not in ROLES and r.lower() in declared for r in held) else ""
    return f"this call needs the app role {needs}; the caller{caller} holds {shown}{case}: {ASSIGN_HINT}"
