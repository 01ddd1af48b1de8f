"""The clients one instance shares between its threads, on real Azurite."""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest

from shared.runtime.settings import Settings, SettingsError
from shared.runtime.storage import StorageConnection
from shared.services import Services
from shared.source.export_config import Connection
from shared.state.state_store import Destination
from tools.local_stack import LocalStack


@pytest.fixture
def services(tmp_path):
    stack = LocalStack(tmp_path / "stack").start()
    svc = Services(Settings.from_env(stack.settings(None)))
    svc.ensure_resources()
    yield svc
    svc.close()
    stack.stop()


BASE = {"KEY_VAULT_URL": "https://vault.example/"}


@pytest.mark.parametrize("name,value,problem", [
    ("AUTOPILOT_RATE_MARGIN", "2,5%", "must be a number, got '2,5%'"),
    ("AUTOPILOT_RATE_MARGIN", "0", "must be greater than 0"),
    ("AUTOPILOT_REQUESTS_PER_SECOND", "-5", "must be greater than 0"),
    ("AUTOPILOT_MAX_ATTEMPTS", "2.5", "must be a whole number"),
    ("AUTOPILOT_TIMEOUT_SECONDS", "ten", "must be a number"),
])
def test_a_malformed_setting_refuses_to_start_naming_it(name, value, problem):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({**BASE, name: value})
    assert f"app setting {name} {problem}" in str(refused.value)


def test_the_rate_margin_setting_spaces_the_shared_budget(services):
    assert services.account(Connection()).budget.interval == pytest.approx(1.025 / 5)  # the default
    wider = Services(Settings.from_env({**services.settings.env, "AUTOPILOT_RATE_MARGIN": "0.1"}))
    try:
        budget = wider.account(Connection()).budget
        first = budget.reserve(1, ahead=60)
        assert budget.reserve(1) == pytest.approx(first + 1.1 / 5)
    finally:
        wider.close()


def test_threads_using_the_state_of_new_exports_do_not_break_each_others_requests(services):
    """azure-data-tables re-links shared policies whenever a table client is built: building one per use broke
    requests in flight in other threads. Bounded: 3 sending and 3 opening threads for 4 seconds."""
    errors: list[BaseException] = []
    stop = time.monotonic() + 4

    def send(n: int) -> None:  # requests through the state table, as planners and folds do
        state = services.state(f"export-{n}")
        try:
            for count in range(1_000_000):
                if time.monotonic() > stop:
                    break
                destination = Destination("https://autopilot.test", "list", f"list {count}")
                state.register(f"20260302T043000Z-{count:08x}", destination)
                assert state.previous_destination() == destination.name
        except BaseException as exc:  # any failure of a thread fails the test
            errors.append(exc)

    def open_states(n: int) -> None:  # meanwhile, other batches open the state of other exports
        for count in range(1_000_000):
            if time.monotonic() > stop:
                break
            services.state(f"other-{n}-{count}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # hand the GIL over often, as the app does (function_app.py)
    try:
        threads = [threading.Thread(target=job, args=(n,)) for n in range(3) for job in (send, open_states)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, f"{len(errors)} threads failed, first: {errors[0]!r}"


class ResettingProxy:
    """A TCP proxy to one Azurite service that resets its first `resets` connections once a request arrives (as a
    server does to a pooled keep-alive connection it has closed), and forwards every later one."""

    def __init__(self, target: tuple[str, int], resets: int = 1):
        self.target, self.resets = target, resets
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.resets:
                self.resets -= 1
                client.recv(65536)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self.server.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.mark.serial  # the retry is timed
@pytest.mark.parametrize("service", ["Queue", "Blob"])
def test_a_reset_storage_connection_is_retried_within_a_second_not_after_the_sdks_15_s(azurite, service):
    """One reset connection while a page of batches was queued held a run's sending for 18 s (the storage SDKs'
    default first retry comes after 12 to 18 s)."""
    settings = dict(part.split("=", 1) for part in azurite.connection_string.split(";") if part)
    endpoint = urlsplit(settings[f"{service}Endpoint"])
    proxy = ResettingProxy((endpoint.hostname, endpoint.port))
    settings[f"{service}Endpoint"] = endpoint._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    connection = StorageConnection("S", {"S": ";".join(f"{k}={v}" for k, v in settings.items())})
    name = f"r{uuid.uuid4().hex[:12]}"
    try:
        started = time.monotonic()
        if service == "Queue":
            queue = connection.queue(name)
            queue.create_queue()
            queue.close()
        else:
            connection.blob.create_container(name)
        assert proxy.resets == 0 and time.monotonic() - started < 3
    finally:
        proxy.close()
        connection.close()
