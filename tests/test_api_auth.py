"""Entra ID for the HTTP API: with API_AUTHENTICATION=entra the platform's built-in authentication checks the
token (infra/app/function.bicep) and the app refuses any request without the principal it forwards."""

from __future__ import annotations

import azure.functions as func
import pytest

import function_app
from shared.http_api import PRINCIPAL_HEADER
from tests.support import close_world, definition, open_world


@pytest.mark.parametrize("value, level", [
    ("entra", func.AuthLevel.ANONYMOUS), ("Entra", func.AuthLevel.ANONYMOUS), ("function-key", func.AuthLevel.FUNCTION),
    ("", func.AuthLevel.FUNCTION), ("oauth", func.AuthLevel.FUNCTION),  # a bad value keeps the keys
])
def test_the_routes_take_function_keys_unless_the_platform_checks_entra_tokens(monkeypatch, value, level):
    monkeypatch.setenv("API_AUTHENTICATION", value)
    assert function_app._auth_level() == level


@pytest.fixture
def entra_world():
    world = open_world(settings={"API_AUTHENTICATION": "entra"})
    yield world
    close_world(world)


def test_with_entra_a_request_without_the_platforms_principal_is_refused(entra_world):
    entra_world.define(definition("hv"))
    url = f"{entra_world.host.base_url}/api/exports"
    refused = entra_world.api.get(url, timeout=30)
    assert refused.status_code == 401 and "Entra ID" in refused.json()["error"]
    allowed = entra_world.api.get(url, headers={PRINCIPAL_HEADER: "6e4a1b3c-0000-4000-8000-000000000001"}, timeout=30)
    assert allowed.status_code == 200 and [e["name"] for e in allowed.json()["exports"]] == ["hv"]


def test_a_bad_authentication_setting_answers_500_naming_it():
    world = open_world(settings={"API_AUTHENTICATION": "oauth"})
    try:
        answer = world.api.get(f"{world.host.base_url}/api/exports", timeout=30)
    finally:
        close_world(world)
    assert answer.status_code == 500 and "API_AUTHENTICATION" in answer.json()["error"]
