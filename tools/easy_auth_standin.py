"""A local stand-in for App Service built-in authentication (Easy Auth), in front of the local host whenever the
app's settings say API_AUTHENTICATION=entra.

In Azure, Easy Auth checks each request's Entra ID token (a bearer, or the AppServiceAuthSession cookie a browser
sign-in sets), drops any X-MS-CLIENT-PRINCIPAL* header the client sent, sets its own, and answers 401 to a request
without a valid token (infra/app/function.bicep: Return401, except its excludedPaths). There is no Entra ID locally,
so a token here is this module's: an HMAC-SHA256-signed, expiring envelope around the principal the platform would
forward, keyed by LOCAL_EASY_AUTH_KEY (tools/local_stack.py gives every stack of a process the same key, so a test
mints tokens for any host it started). The principal is forwarded byte for byte, base64'd as the platform does:
the stand-in vouches for who sent it, not for its shape, so tests can still send a garbled one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import json
import time
from collections.abc import Mapping

KEY_SETTING = "LOCAL_EASY_AUTH_KEY"  # local only: Azure's Easy Auth has Entra ID's keys, not this one
COOKIE = "AppServiceAuthSession"
LIFETIME = 3600  # seconds: about an Entra ID access token's
PRINCIPAL_PREFIX = "x-ms-client-principal"  # every header the platform owns starts so; a client's are dropped
PRINCIPAL = "X-MS-CLIENT-PRINCIPAL"
PRINCIPAL_ID, PRINCIPAL_NAME = f"{PRINCIPAL}-ID", f"{PRINCIPAL}-NAME"
# infra/app/function.bicep's excludedPaths: the console's files (no data in them) and Event Grid's webhook (keyed).
EXCLUDED_PREFIX, EXCLUDED_PATH = "/api/console/", "/runtime/webhooks/eventgrid"
SIGN_IN_PATH = "/.auth/login/aad"
PAGE_HEADERS = {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store",
                "Content-Security-Policy": "default-src 'none'; base-uri 'none'; form-action 'none'; "
                                           "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(body: str, key: str) -> str:
    return _b64(hmac.new(key.encode(), body.encode(), hashlib.sha256).digest())


def mint(principal: dict | bytes, object_id: str, name: str, key: str, *, lifetime: float = LIFETIME,
         now: float | None = None) -> str:
    """A token for this principal (a dict is sent as its JSON; bytes as they are), valid for `lifetime` seconds."""
    raw = json.dumps(principal).encode() if isinstance(principal, dict) else bytes(principal)
    expires = (time.time() if now is None else now) + lifetime
    body = _b64(json.dumps({"p": _b64(raw), "oid": object_id, "name": name, "exp": expires}).encode())
    return f"{body}.{_signature(body, key)}"


def verify(token: str, key: str, *, now: float | None = None) -> tuple[bytes, str, str] | None:
    """(principal bytes, object id, name) of a token this key signed and not yet expired; else None."""
    body, _, signature = token.partition(".")
    if not key or not hmac.compare_digest(signature.encode(), _signature(body, key).encode()):
        return None
    try:
        claims = json.loads(_unb64(body))
        principal, expires = _unb64(claims["p"]), float(claims["exp"])
        object_id, name = str(claims["oid"]), str(claims["name"])
    except (ValueError, KeyError, TypeError, binascii.Error):  # signed by us, so only an old format gets here
        return None
    return (principal, object_id, name) if (time.time() if now is None else now) < expires else None


def token_of(headers: Mapping[str, str]) -> str | None:
    """The bearer token, else the session cookie's value, else None (as Easy Auth, the bearer goes first)."""
    scheme, _, bearer = (headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and bearer.strip():
        return bearer.strip()
    for part in (headers.get("Cookie") or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return value
    return None


def excluded(path: str) -> bool:
    """Paths the platform lets through without a token (the console's '/api/console/*', Event Grid's webhook)."""
    return path.startswith(EXCLUDED_PREFIX) or path == EXCLUDED_PATH


def principal_headers(token: str | None, key: str) -> dict[str, str] | None:
    """The headers the platform sets for a valid token, or None (the request is then unauthenticated)."""
    checked = verify(token, key) if token else None
    if checked is None:
        return None
    principal, object_id, name = checked
    return {PRINCIPAL: base64.b64encode(principal).decode(), PRINCIPAL_ID: object_id, PRINCIPAL_NAME: name}


def unauthenticated(token: str | None) -> dict[str, str]:
    """Return401's answer, in JSON as every local answer, saying what was missing."""
    what = ("the token (bearer or AppServiceAuthSession cookie) is not valid: tampered, expired or minted with "
            "another LOCAL_EASY_AUTH_KEY") if token else ("the request carries no token: send Authorization: Bearer "
                                                         "<token>, or sign in (the AppServiceAuthSession cookie)")
    return {"error": f"401 from the built-in authentication's local stand-in: {what}; client-sent "
                     "X-MS-CLIENT-PRINCIPAL headers are dropped"}


def sign_in_page(redirect: str) -> tuple[int, bytes]:
    """GET /.auth/login/aad?post_login_redirect_uri=...: there is no Entra ID locally, so a page saying so, with a
    link back. Only a path on this host is a way back (no open redirect); anything else is refused, 400."""
    if not redirect.startswith("/") or redirect.startswith(("//", "/\\")) or not redirect.isprintable():
        return 400, _page("Refused", "post_login_redirect_uri must be a path on this host, such as /api/console/.")
    back = f'<p><a href="{html.escape(redirect)}">Back to {html.escape(redirect[:200])}</a></p>'
    return 200, _page("Local sign-in stand-in", "This is the local stand-in of the app's built-in authentication: "
                      "there is no Entra ID here. Locally, sign-in is a token minted with tools/easy_auth_standin.py "
                      "(as the tests do), sent as a bearer or the AppServiceAuthSession cookie.", back)


def _page(title: str, text: str, extra: str = "") -> bytes:
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>"
            f"<body><h1>{title}</h1><p>{html.escape(text)}</p>{extra}</body></html>").encode()
