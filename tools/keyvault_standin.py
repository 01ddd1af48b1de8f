"""A local HTTPS stand-in for Azure Key Vault's secrets API, good enough for the real `SecretClient`.

It speaks the subset the product and local tools use: the bearer challenge (401 + WWW-Authenticate), then
`GET /secrets/{name}[/{version}]` and `PUT /secrets/{name}`. Any bearer token is accepted: the point is to
exercise the real client and its challenge flow, not Entra ID. TLS is real (a `trustme` CA, loopback only),
because the client refuses bearer tokens over plain HTTP.

Clients must pass `verify_challenge_resource=False` (the challenge names vault.azure.net, not 127.0.0.1)
and `connection_verify=<ca_file>`.

With `state_dir`, secrets and the CA persist there, so a restarted stand-in serves the same secrets and an
earlier `ca_file` path still verifies it. The state file holds secret values in clear text: it is a local
test fixture, never a real vault. Secret values are never logged.

CLI: `python -m tools.keyvault_standin --port P --state-dir DIR` runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
TENANT = "00000000-0000-0000-0000-000000000000"  # placeholder: the client only parses it, nobody signs in
CHALLENGE = f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="https://vault.azure.net"'
STATE_FILE = "secrets.json"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
SOCKET_TIMEOUT = 10.0  # bounds the TLS handshake and idle keep-alive reads of one connection
_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")  # Key Vault's own rule for secret names
_SECRET_PATH = re.compile(r"^/secrets/(?P<name>[^/?]+)/?(?P<version>[^/?]*)/?$")


class _Vault:
    """Thread-safe versioned secret store; writes through to a JSON file when it has one."""

    def __init__(self, path: Path | None):
        self._path = path
        self._lock = threading.Lock()
        self._secrets: dict[str, list[dict[str, Any]]] = self._load()

    def _load(self) -> dict[str, list[dict[str, Any]]]:
        if self._path is None or not self._path.exists():
            return {}
        return json.loads(self._path.read_text(encoding="utf-8"))["secrets"]

    def set(self, name: str, value: str) -> dict[str, Any]:
        version = {"version": uuid.uuid4().hex, "value": value, "created": int(time.time())}
        with self._lock:
            self._secrets.setdefault(name, []).append(version)
            self._save()
        return version

    def get(self, name: str, version: str = "") -> dict[str, Any] | None:
        with self._lock:
            versions = self._secrets.get(name, [])
            if not version:
                return versions[-1] if versions else None
            return next((v for v in versions if v["version"] == version), None)

    def _save(self) -> None:
        if self._path is None:
            return
        # Write-then-rename, so a stand-in killed mid-write never leaves a half file; 0600 as it holds values.
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"secrets": self._secrets}, out)
        os.replace(tmp, self._path)


class _Server(ThreadingHTTPServer):
    """Does the TLS handshake in the per-connection thread (not in accept), and can drop live connections."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], standin: KeyVaultStandIn, context: ssl.SSLContext):
        super().__init__(address, _Handler)
        self.standin = standin
        self._context = context
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        request.settimeout(SOCKET_TIMEOUT)
        tls = self._context.wrap_socket(request, server_side=True)
        with self._open_lock:
            self._open.add(tls)
        try:
            super().finish_request(tls, client_address)
        finally:
            with self._open_lock:
                self._open.discard(tls)
            tls.close()

    def drop_connections(self) -> None:
        """Close keep-alive connections too, so a stopped stand-in really stops answering."""
        with self._open_lock:
            for conn in list(self._open):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Failed handshakes and dropped connections are routine here; keep stderr clean.
        log.debug("connection from %s ended with %s", client_address, sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real service
    server: _Server

    def do_GET(self) -> None:
        self._dispatch(self._get_secret)

    def do_PUT(self) -> None:
        self._dispatch(self._put_secret)

    def _dispatch(self, action: Callable[[str, str, bytes], None]) -> None:
        body = self._read_body()  # always drained, so a keep-alive connection stays in step
        if not self._has_bearer():
            self.server.standin._count_challenge()
            self._reply(401, _error("Unauthorized", "AKV10000: Request is missing a Bearer or PoP token."),
                        {"WWW-Authenticate": CHALLENGE})
            return
        match = _SECRET_PATH.match(self.path.split("?", 1)[0])
        if not match:
            self._reply(404, _error("NotFound", f"the stand-in does not serve {self.command} {self.path}"))
            return
        action(match["name"], match["version"], body)

    def _get_secret(self, name: str, version: str, _body: bytes) -> None:
        self.server.standin._count_read(name)
        found = self.server.standin._vault.get(name, version)
        if found is None:
            missing = f"{name}/{version}" if version else name
            self._reply(404, _error(
                "SecretNotFound",
                f"A secret with (name/id) {missing} was not found in this key vault. If you recently deleted this "
                "secret you may be able to recover it using the correct recovery command.",
            ))
            return
        self._reply(200, self._bundle(name, found))

    def _put_secret(self, name: str, version: str, body: bytes) -> None:
        value = _json_value(body)
        if version or not _NAME.match(name) or value is None:
            self._reply(400, _error("BadParameter", "expected PUT /secrets/{name} with a JSON body {\"value\": ...}"))
            return
        self._reply(200, self._bundle(name, self.server.standin._vault.set(name, value)))

    def _bundle(self, name: str, version: dict[str, Any]) -> dict[str, Any]:
        host = self.headers.get("Host") or f"{HOST}:{self.server.server_address[1]}"
        return {
            "value": version["value"],
            "id": f"https://{host}/secrets/{name}/{version['version']}",
            "attributes": {
                "enabled": True,
                "created": version["created"],
                "updated": version["created"],
                "recoveryLevel": "Recoverable+Purgeable",
            },
        }

    def _has_bearer(self) -> bool:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and bool(token.strip())

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _reply(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Method, path (secret name at most) and status only: never bodies, never headers (the token).
        log.debug("%s %s -> %s", self.command, self.path.split("?", 1)[0], code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("keyvault-standin: " + format, *args)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _json_value(body: bytes) -> str | None:
    try:
        value = json.loads(body or b"null")
    except ValueError:
        return None
    return value.get("value") if isinstance(value, dict) and isinstance(value.get("value"), str) else None


class KeyVaultStandIn:
    """One stand-in vault on `https://127.0.0.1:<port>/`; see the module docstring."""

    def __init__(self, port: int = 0, secrets: dict[str, str] | None = None, state_dir: str | Path | None = None):
        self.port = port
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._vault = _Vault(self.state_dir / STATE_FILE if self.state_dir else None)
        self._seed = dict(secrets or {})
        self._temp_dir: Path | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._counts_lock = threading.Lock()
        self.requests: list[str] = []  # secret name of every authenticated GET /secrets/..., in order
        self.challenges = 0  # requests answered 401 for lack of a bearer token

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}/"

    @property
    def ca_file(self) -> Path:
        return self._cert_dir() / CA_CERT_FILE

    def reads(self, name: str) -> int:
        """How many authenticated GETs asked for `name` (found or not)."""
        with self._counts_lock:
            return self.requests.count(name)

    def set_secret(self, name: str, value: str) -> str:
        """Store a new version (rotation) and return its version id."""
        if not _NAME.match(name):
            raise ValueError(f"invalid Key Vault secret name {name!r}")
        return self._vault.set(name, value)["version"]

    def start(self) -> KeyVaultStandIn:
        for name, value in self._seed.items():
            current = self._vault.get(name)
            if current is None or current["value"] != value:  # a restart with the same seed adds no version
                self.set_secret(name, value)
        self._server = _Server((HOST, self.port), self, self._tls_context())
        self.port = self._server.server_address[1]
        # A short poll interval: shutdown() waits for the serve loop to notice, and tests stop stand-ins often.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="keyvault-standin",
                                        daemon=True)
        self._thread.start()
        log.info("keyvault-standin listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.drop_connections()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> KeyVaultStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _count_read(self, name: str) -> None:
        with self._counts_lock:
            self.requests.append(name)

    def _count_challenge(self) -> None:
        with self._counts_lock:
            self.challenges += 1

    def _cert_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        if self._temp_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="keyvault-standin-"))
        return self._temp_dir

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._load_or_make_ca().issue_cert(HOST, "localhost").configure_cert(context)
        return context

    def _load_or_make_ca(self) -> trustme.CA:
        """Reuse a persisted CA, so a `ca_file` handed out before a restart still verifies the new server cert."""
        directory = self._cert_dir()
        cert, key = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        if cert.exists() and key.exists():
            return trustme.CA.from_pem(cert.read_bytes(), key.read_bytes())
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(ca.private_key_pem.bytes())
        ca.cert_pem.write_to_path(str(cert))
        return ca


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.keyvault_standin", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--state-dir", help="folder for secrets.json and the CA; kept across runs")
    args = parser.parse_args(argv)

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    with KeyVaultStandIn(port=args.port, state_dir=args.state_dir) as standin:
        print(f"keyvault-standin listening on {standin.url} ca={standin.ca_file}", flush=True)
        while not stopping.wait(1.0):  # a timed wait, so signals are handled promptly on every platform
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
