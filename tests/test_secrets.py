"""ApiKeyProvider against the Key Vault stand-in, through the real azure-keyvault-secrets SecretClient."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from azure.keyvault.secrets import SecretClient
from azure.keyvault.secrets._shared import http_challenge_cache

from shared.destinations.secrets import ApiKeyProvider, LocalStandInCredential, SecretUnavailable
from shared.runtime.settings import SettingsError
from tools.keyvault_standin import KeyVaultStandIn

ROOT = Path(__file__).resolve().parent.parent
NAME = "autopilot-api-key"
KEY_1 = "ap-key-one-0123456789"
KEY_2 = "ap-key-two-9876543210"


@pytest.fixture
def standin() -> Iterator[KeyVaultStandIn]:
    with KeyVaultStandIn(secrets={NAME: KEY_1}) as instance:  # port 0: the OS picks a free port
        # The SDK caches each vault's challenge by host and port for the whole process; a stand-in of an earlier
        # test may have had this port, and its cached challenge would skip the one this test counts.
        http_challenge_cache.remove_challenge_for_url(instance.url)
        yield instance


def _settings(standin: KeyVaultStandIn, **extra: str) -> dict[str, str]:
    return {"KEY_VAULT_URL": standin.url, "KEY_VAULT_CA_FILE": str(standin.ca_file), **extra}


@pytest.fixture
def provider(standin: KeyVaultStandIn) -> Iterator[ApiKeyProvider]:
    instance = ApiKeyProvider.from_settings(_settings(standin))
    yield instance
    instance.close()


def _client(standin: KeyVaultStandIn) -> SecretClient:
    return SecretClient(standin.url, LocalStandInCredential(), connection_verify=str(standin.ca_file),
                        verify_challenge_resource=False)


def test_reads_the_secret_through_the_challenge(standin, provider):
    assert provider.secret_name == NAME
    assert standin.reads(NAME) == 0  # construction did not touch Key Vault
    assert provider.get() == KEY_1
    assert standin.challenges == 1  # the real client went through the 401 challenge first
    assert standin.reads(NAME) == 1


def test_many_gets_read_key_vault_once(standin, provider):
    values = {provider.get() for _ in range(50)}
    assert values == {KEY_1}
    assert standin.reads(NAME) == 1


def test_rotation_applies_after_refresh(standin, provider):
    assert provider.get() == KEY_1
    standin.set_secret(NAME, KEY_2)
    assert provider.get() == KEY_1  # still the cached key: no read per use
    assert standin.reads(NAME) == 1
    provider.refresh()
    assert provider.get() == KEY_2
    assert standin.reads(NAME) == 2


def test_concurrent_refreshes_cause_one_reread(standin, provider):
    threads = 16
    barrier = threading.Barrier(threads, timeout=10)
    results: list[str] = []

    def worker() -> None:
        provider.get()  # every thread uses the old key ...
        barrier.wait()  # ... and all of them get a 401 before any re-reads
        provider.refresh()
        results.append(provider.get())

    standin.set_secret(NAME, KEY_2)
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(20)
    assert results == [KEY_2] * threads
    assert standin.reads(NAME) == 2  # the first read plus a single re-read


def test_refresh_with_a_stale_value_only_drops_that_value(standin, provider):
    assert provider.get() == KEY_1
    standin.set_secret(NAME, KEY_2)
    provider.refresh(stale="some-older-key")  # cache already holds something newer than what was rejected
    assert provider.get() == KEY_1
    provider.refresh(stale=KEY_1)
    assert provider.get() == KEY_2
    assert standin.reads(NAME) == 2


def test_missing_secret_raises_secret_unavailable(standin):
    provider = ApiKeyProvider.from_settings(_settings(standin, AUTOPILOT_API_KEY_SECRET_NAME="no-such-secret"))
    with pytest.raises(SecretUnavailable) as caught:
        provider.get()
    message = str(caught.value)
    assert "no-such-secret" in message and standin.url in message
    assert KEY_1 not in message and KEY_1 not in repr(caught.value.__cause__)
    assert isinstance(caught.value, RuntimeError)
    provider.close()


def test_stopped_vault_raises_secret_unavailable(tmp_path):
    with KeyVaultStandIn(secrets={NAME: KEY_1}, state_dir=tmp_path) as standin:
        # What from_settings builds locally, minus retries so the refused connection fails fast.
        provider = ApiKeyProvider(standin.url, NAME, credential_factory=LocalStandInCredential, client_options={
            "connection_verify": str(standin.ca_file), "verify_challenge_resource": False, "retry_total": 0})
        assert provider.get() == KEY_1  # leaves a keep-alive connection in the client's pool
    provider.refresh()
    with pytest.raises(SecretUnavailable, match="unreachable") as caught:
        provider.get()  # stop() also closed that pooled connection: nothing answers any more
    assert NAME in str(caught.value) and KEY_1 not in str(caught.value)
    provider.close()


def test_key_vault_url_is_required():
    with pytest.raises(SettingsError, match="KEY_VAULT_URL"):
        ApiKeyProvider.from_settings({"AUTOPILOT_API_KEY_SECRET_NAME": NAME})
    with pytest.raises(SettingsError, match="https"):
        ApiKeyProvider.from_settings({"KEY_VAULT_URL": "http://127.0.0.1:1/"})


def test_azure_settings_build_no_client_until_first_get():
    provider = ApiKeyProvider.from_settings({"KEY_VAULT_URL": "https://example.vault.azure.net/",
                                             "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000001"})
    assert provider.secret_name == NAME
    assert provider._client is None  # lazy: no credential, no client, no network yet


def test_repr_and_logs_never_show_the_key(standin, provider, caplog):
    caplog.set_level(logging.DEBUG)
    provider.get()
    standin.set_secret(NAME, KEY_2)
    provider.refresh()
    provider.get()
    assert KEY_1 not in repr(provider) and KEY_2 not in repr(provider)
    assert KEY_2 not in str(provider)
    assert caplog.records  # something was logged, and none of it is a key
    assert KEY_1 not in caplog.text and KEY_2 not in caplog.text


def test_standin_challenges_a_request_without_a_bearer_token(standin):
    url = f"{standin.url}secrets/{NAME}/?api-version=7.5"
    refused = requests.get(url, verify=str(standin.ca_file), timeout=10)
    assert refused.status_code == 401
    challenge = refused.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer authorization="https://login.microsoftonline.com/')
    assert 'resource="https://vault.azure.net"' in challenge
    assert KEY_1 not in refused.text
    assert standin.reads(NAME) == 0

    accepted = requests.get(url, headers={"Authorization": "Bearer anything"}, verify=str(standin.ca_file), timeout=10)
    assert accepted.status_code == 200
    body = accepted.json()
    assert body["value"] == KEY_1
    assert body["id"].startswith(f"{standin.url}secrets/{NAME}/")
    assert body["attributes"]["enabled"] is True


def test_standin_set_and_versioned_get_through_the_real_client(standin):
    client = _client(standin)
    stored = client.set_secret(NAME, KEY_2)
    assert client.get_secret(NAME).value == KEY_2
    assert client.get_secret(NAME, stored.properties.version).value == KEY_2
    client.close()
    bad = requests.put(f"{standin.url}secrets/{NAME}?api-version=7.5", json={"wrong": 1},
                       headers={"Authorization": "Bearer x"}, verify=str(standin.ca_file), timeout=10)
    assert bad.status_code == 400


def test_state_dir_keeps_secrets_and_ca_across_restart(tmp_path):
    with KeyVaultStandIn(state_dir=tmp_path) as first:
        port, ca_file = first.port, first.ca_file
        version = _client(first).set_secret(NAME, KEY_1).properties.version  # stored via the real client's PUT
    assert ca_file.exists()
    with KeyVaultStandIn(port=port, state_dir=tmp_path) as second:
        assert second.ca_file == ca_file  # a CA path handed out earlier still verifies the restarted server
        provider = ApiKeyProvider.from_settings({"KEY_VAULT_URL": second.url, "KEY_VAULT_CA_FILE": str(ca_file)})
        assert provider.get() == KEY_1
        assert _client(second).get_secret(NAME).properties.version == version
        provider.close()
    assert oct((tmp_path / "secrets.json").stat().st_mode & 0o777) == "0o600"


def test_cli_serves_until_sigterm(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tools.keyvault_standin", "--port", "0", "--state-dir", str(tmp_path)]
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 30)  # bounded: never hang on a silent child
            assert ready, "the stand-in CLI printed nothing within 30s"
            line = proc.stdout.readline().strip()  # printed only once it is listening
            assert line.startswith("keyvault-standin listening on https://127.0.0.1:")
            url, ca_file = line.split(" ")[3], line.split(" ca=")[1]
            assert url.endswith("/") and Path(ca_file) == tmp_path / "ca.pem"
            client = SecretClient(url, LocalStandInCredential(), connection_verify=ca_file,
                                  verify_challenge_resource=False)
            client.set_secret(NAME, KEY_1)
            assert client.get_secret(NAME).value == KEY_1
            client.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            assert KEY_1 not in proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
