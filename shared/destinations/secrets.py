"""The Autopilot API key, read from Azure Key Vault on first use and cached until a caller reports it stale.

One code path for Azure and local runs: the real `SecretClient` reads the secret. Locally (KEY_VAULT_CA_FILE
set) it talks to tools/keyvault_standin.py, so only the credential and two TLS/challenge options differ.
The key is never logged and never appears in repr() or in error messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenCredential, TokenRequestOptions
from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from azure.keyvault.secrets import SecretClient

from shared.runtime.settings import SettingsError

log = logging.getLogger(__name__)

DEFAULT_SECRET_NAME = "autopilot-api-key"
_LOCAL_TOKEN = "local-keyvault-standin"  # not a secret: the stand-in accepts any bearer token
_LOCAL_TOKEN_LIFETIME = 3600


class SecretUnavailable(RuntimeError):
    """The API key could not be read from Key Vault (missing, refused, unreachable). Never carries the value."""


class LocalStandInCredential:
    """Local runs only: hands the Key Vault stand-in a fixed dummy token.

    The stand-in accepts any bearer token, and DefaultAzureCredential would try the network (IMDS, az CLI,
    Entra ID) for a token that nothing checks. Never used when KEY_VAULT_CA_FILE is unset, i.e. in Azure.
    """

    def get_token(self, *scopes: str, claims: str | None = None, tenant_id: str | None = None,
                  enable_cae: bool = False, **kwargs: Any) -> AccessToken:
        return AccessToken(_LOCAL_TOKEN, int(time.time()) + _LOCAL_TOKEN_LIFETIME)

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        return AccessTokenInfo(_LOCAL_TOKEN, int(time.time()) + _LOCAL_TOKEN_LIFETIME)

    def close(self) -> None:
        """Nothing to release; present because credentials are closed with their clients."""


def _azure_credential(client_id: str | None) -> TokenCredential:
    # Imported here: azure.identity is only needed in Azure, and constructing it stays off the import path.
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    return ManagedIdentityCredential(client_id=client_id) if client_id else DefaultAzureCredential()


class ApiKeyProvider:
    """`get()` returns the cached key (reading Key Vault once); `refresh()` drops it after a 401.

    Concurrent refreshes after one rejected key cause one re-read: each cached read has a generation, each
    thread remembers the generation it last got, and `refresh()` only drops the cache if it still holds that
    generation (or, with `stale=`, that value). A thread whose key was already replaced just re-gets.
    """

    def __init__(self, vault_url: str, secret_name: str = DEFAULT_SECRET_NAME, *,
                 credential_factory: Callable[[], TokenCredential], client_options: Mapping[str, Any] | None = None):
        self.vault_url = vault_url
        self.secret_name = secret_name
        self._credential_factory = credential_factory
        self._client_options = dict(client_options or {})
        self._client: SecretClient | None = None
        self._lock = threading.Lock()
        self._cached: tuple[str, int] | None = None  # (value, generation), swapped as one object
        self._generation = 0
        self._seen = threading.local()

    @classmethod
    def from_settings(cls, env: Mapping[str, str], secret_name: str | None = None) -> ApiKeyProvider:
        """The vault and credential from the app settings; the secret is `secret_name`, else the default
        connection's (AUTOPILOT_API_KEY_SECRET_NAME, else autopilot-api-key)."""
        vault_url = _setting(env, "KEY_VAULT_URL")
        if not vault_url:
            raise SettingsError("app setting KEY_VAULT_URL is required but not set")
        if not vault_url.lower().startswith("https://"):
            raise SettingsError(f"app setting KEY_VAULT_URL must be an https:// URL, got {vault_url!r}")
        secret_name = secret_name or _setting(env, "AUTOPILOT_API_KEY_SECRET_NAME") or DEFAULT_SECRET_NAME
        ca_file = _setting(env, "KEY_VAULT_CA_FILE")
        if ca_file:  # local stand-in: its own CA, and a challenge naming vault.azure.net rather than 127.0.0.1
            factory: Callable[[], TokenCredential] = LocalStandInCredential
            options: dict[str, Any] = {"connection_verify": ca_file, "verify_challenge_resource": False}
        else:
            client_id = _setting(env, "AZURE_CLIENT_ID") or None
            factory, options = (lambda: _azure_credential(client_id)), {}
        return cls(vault_url, secret_name, credential_factory=factory, client_options=options)

    def get(self) -> str:
        cached = self._cached
        if cached is None:
            with self._lock:
                if self._cached is None:
                    self._cached = self._read()
                cached = self._cached
        self._seen.generation = cached[1]
        return cached[0]

    def peek(self) -> str | None:
        """The cached key, or None when the next get() has to read Key Vault (asynchronous callers then call
        get() on a thread: it blocks)."""
        cached = self._cached
        return cached[0] if cached else None

    def refresh(self, stale: str | None = None) -> None:
        """Drop the cached key so the next `get()` re-reads it, unless someone already replaced it.

        `stale` is the key the caller saw rejected; without it, the key this thread last got from `get()`.
        """
        seen = getattr(self._seen, "generation", None)
        with self._lock:
            cached = self._cached
            if cached is None:
                return
            if stale is not None and cached[0] != stale:
                return
            if stale is None and seen is not None and cached[1] != seen:
                return
            self._cached = None
        log.info("API key cache for secret %s dropped; the next use re-reads Key Vault", self.secret_name)

    def close(self) -> None:
        """Release the Key Vault client's connections (tests and short-lived tools)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        return f"ApiKeyProvider(vault_url={self.vault_url!r}, secret_name={self.secret_name!r}, " \
               f"cached={self._cached is not None})"

    __str__ = __repr__

    def _read(self) -> tuple[str, int]:
        """Read the secret (caller holds the lock); every failure becomes SecretUnavailable."""
        where = f"secret {self.secret_name!r} in Key Vault {self.vault_url}"
        try:
            secret = self._secret_client().get_secret(self.secret_name)
        except ResourceNotFoundError as exc:
            raise SecretUnavailable(f"{where} does not exist; store the API key there") from exc
        except ClientAuthenticationError as exc:
            raise SecretUnavailable(f"could not read {where}: authentication failed ({type(exc).__name__})") from exc
        except HttpResponseError as exc:
            raise SecretUnavailable(f"could not read {where}: Key Vault answered HTTP {exc.status_code}") from exc
        except AzureError as exc:  # ServiceRequestError and friends: unreachable, TLS failure, timeout
            raise SecretUnavailable(f"could not read {where}: Key Vault unreachable ({type(exc).__name__})") from exc
        except OSError as exc:  # requests raises this itself for a KEY_VAULT_CA_FILE that does not exist
            raise SecretUnavailable(f"could not read {where}: {exc}") from exc
        # Trailing whitespace from a pasted key would only be rejected later as an invalid header value.
        value = (secret.value or "").strip()
        if not value:
            raise SecretUnavailable(f"{where} is empty")
        self._generation += 1
        log.info("read API key from %s (version %s)", where, secret.properties.version)
        return value, self._generation

    def _secret_client(self) -> SecretClient:
        # Built on first read, so importing or constructing the provider never touches the network.
        if self._client is None:
            self._client = SecretClient(self.vault_url, self._credential_factory(), **self._client_options)
        return self._client


def _setting(env: Mapping[str, str], name: str) -> str:
    return (env.get(name) or "").strip()
