"""The operator console's files (console/ beside function_app.py), served by the app itself: no second service.

Only the files there, by flat name, in four types; everything else is 404. The console's data comes from the HTTP
API (shared/http_api.py), with the same key or Entra ID roles as any caller: the files hold nothing secret, so the
route takes no key (the page asks for one). Each answer forbids inline script and style, framing, and any origin
but the app's own (Content-Security-Policy), so a value that slipped past the page's escaping could not run.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "console"
TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8",
         "svg": "image/svg+xml"}
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\.(html|js|css|svg)")
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
          "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def console_file(path: str) -> tuple[int, dict[str, str], bytes]:
    """GET /api/console/{path}: (status, headers, body); an empty path is the page itself."""
    name = path or "index.html"
    match = NAME.fullmatch(name)
    file = ROOT / name
    if not match or not file.is_file():
        return 404, {**HEADERS, "Content-Type": "text/plain; charset=utf-8"}, b"no such console file"
    return 200, {**HEADERS, "Content-Type": TYPES[match.group(1)]}, file.read_bytes()
