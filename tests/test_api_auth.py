"""Entra ID for the HTTP API: with API_AUTHENTICATION=entra the platform's built-in authentication checks the
token (infra/app/function.bicep) and forwards the principal; the app runs a call only for a principal holding the
app role it needs (shared/api_roles.py). Locally, the host's Easy Auth stand-in (tools/easy_auth_standin.py) does the
platform's part: tests send it tokens they mint, and it forwards the principal in them as the platform would."""

from __future__ import annotations

import base64
import json

import azure.functions as func
import pytest
import requests

import function_app
from shared import api_roles, http_api
from shared.api_roles import ADMIN, OPERATOR, READER
from tests.support import close_world, definition, open_world, wait_until
from tools import easy_auth_standin as easy_auth
from tools.generate_export import sample_profiles
from tools.local_host import app_under, index
from tools.local_stack import EASY_AUTH_KEY

ROLE_URI = "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"
OBJECT_ID = "6e4a1b3c-0000-4000-8000-000000000001"
NO_RUN = "20990101T000000Z-00000000"


def encode(principal) -> str:
    return base64.b64encode(json.dumps(principal).encode()).decode()


def principal(*roles: str, typ: str = "roles", name: str | None = "ops@contoso.example") -> dict:
    """What Easy Auth forwards for an Entra ID token carrying these app roles (claims of type `typ`); an app-only
    token (a script's client credentials) has no name."""
    claims = [{"typ": "aud", "val": "api://autopilot-sync"}, {"typ": "http://schemas.microsoft.com/identity/claims/"
                                                              "objectidentifier", "val": OBJECT_ID}]
    claims += [{"typ": typ, "val": role} for role in roles]
    if name:
        claims.append({"typ": "name", "val": name})
    return {"auth_typ": "aad", "claims": claims, "name_typ": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/"
            "name", "role_typ": ROLE_URI}


def forwarded(*roles: str, typ: str = "roles") -> dict[str, str]:
    """The principal headers the platform forwards to the app for a token carrying these app roles."""
    return {"X-MS-CLIENT-PRINCIPAL": encode(principal(*roles, typ=typ)), "X-MS-CLIENT-PRINCIPAL-ID": OBJECT_ID,
            "X-MS-CLIENT-PRINCIPAL-NAME": "ops@contoso.example"}


def token(value: dict | bytes, **options) -> str:
    """A token for the local host's Easy Auth stand-in (any host this process started: one key per process)."""
    return easy_auth.mint(value, OBJECT_ID, "ops@contoso.example", EASY_AUTH_KEY, **options)


def headers(*roles: str, typ: str = "roles") -> dict[str, str]:
    """What a caller holding these app roles sends a host that takes Entra ID tokens: its bearer token."""
    return {"Authorization": f"Bearer {token(principal(*roles, typ=typ))}"}


# === the app setting ===========================================================================================
@pytest.mark.parametrize("value, level", [
    ("entra", func.AuthLevel.ANONYMOUS), ("Entra", func.AuthLevel.ANONYMOUS), ("function-key", func.AuthLevel.FUNCTION),
    ("", func.AuthLevel.FUNCTION), ("oauth", func.AuthLevel.FUNCTION),  # a bad value keeps the keys
])
def test_the_routes_take_function_keys_unless_the_platform_checks_entra_tokens(monkeypatch, value, level):
    monkeypatch.setenv("API_AUTHENTICATION", value)
    assert function_app._auth_level() == level


def test_a_bad_authentication_setting_answers_500_naming_it():
    world = open_world(settings={"API_AUTHENTICATION": "oauth"})
    try:
        answer = world.api.get(f"{world.host.base_url}/api/exports", timeout=30)
    finally:
        close_world(world)
    assert answer.status_code == 500 and "API_AUTHENTICATION" in answer.json()["error"]


# === the route -> role table ===================================================================================
def _http_routes() -> dict[str, list[str]]:
    """The API's routes: every HTTP route but those serving files with no data (api_roles.UNGUARDED)."""
    return {f.get_function_name(): [str(m.value) for m in f.get_trigger().get_dict_repr()["methods"]]
            for f in index(function_app.app) if f.get_trigger().get_dict_repr()["type"] == "httpTrigger"
            and f.get_function_name() not in api_roles.UNGUARDED}


def test_every_route_declares_its_role_reads_need_reader_runs_operator_and_edits_admin():
    wanted = {"GET": READER, "POST": OPERATOR, "PUT": ADMIN}
    expected = {name: wanted[methods[0]] for name, methods in _http_routes().items()}
    expected["whoami"] = api_roles.ANY_CALLER  # who am I: any authenticated caller
    assert {name: api_roles.required_role(name) for name in _http_routes()} == expected
    assert set(api_roles.OPERATION_ROLES) == set(_http_routes())  # no stale line either


def test_each_route_hands_over_the_http_api_call_its_role_is_declared_for(monkeypatch):
    """The table is keyed by the http_api function's name: each route must call the function of its own name."""
    called = {}
    monkeypatch.setattr(http_api, "guarded", lambda method, hdrs, call, *args: called.setdefault("call", call) and
                        (200, {}))
    for f in index(function_app.app):
        if f.get_function_name() in _http_routes():
            called.clear()
            f.get_user_function()(func.HttpRequest("GET", "http://h/api/x", body=b"", route_params={"name": "hv"}))
            assert called["call"].__name__ == f.get_function_name()


def test_an_operation_without_a_declared_role_is_refused_naming_the_table():
    with pytest.raises(api_roles.UndeclaredOperation, match=r"OPERATION_ROLES in shared/api_roles\.py"):
        api_roles.refusal(forwarded(ADMIN), "delete_everything")
    status, body = http_api._role_refusal(_lower(forwarded(ADMIN)), "delete_everything")  # the host answers 500
    assert status == 500 and "no app role is declared for the API operation 'delete_everything'" in body["error"]


def test_an_admin_route_asks_for_admin():
    status, message = api_roles.refusal(_lower(forwarded(OPERATOR)), "save_export")
    assert status == 403 and message.startswith("this call needs the app role Exports.Admin;")
    assert api_roles.refusal(_lower(forwarded(ADMIN)), "save_export") is None


def test_an_operation_for_any_caller_needs_a_principal_but_no_role():
    assert api_roles.refusal(_lower(forwarded()), "whoami") is None
    assert api_roles.refusal({}, "whoami")[0] == 401
    assert api_roles.refusal({"x-ms-client-principal": "not base64!"}, "whoami")[0] == 401


@pytest.mark.parametrize("held, effective", [
    ((), []), ((READER,), [READER]), ((OPERATOR,), [READER, OPERATOR]), ((ADMIN,), [READER, OPERATOR, ADMIN]),
    (("exports.admin", "Other.Role"), []), ((READER, ADMIN), [READER, OPERATOR, ADMIN]),
])
def test_the_effective_roles_are_those_held_with_the_ones_they_include(held, effective):
    assert api_roles.effective_roles(held) == effective


def _lower(hdrs: dict) -> dict:
    """The host's headers are looked up in lower case."""
    return {k.lower(): v for k, v in hdrs.items()}


# === decoding the principal ====================================================================================
@pytest.mark.parametrize("roles, needed, allowed", [
    ((READER,), READER, True), ((READER,), OPERATOR, False), ((READER,), ADMIN, False),
    ((OPERATOR,), READER, True), ((OPERATOR,), OPERATOR, True), ((OPERATOR,), ADMIN, False),
    ((ADMIN,), READER, True), ((ADMIN,), OPERATOR, True), ((ADMIN,), ADMIN, True),
    ((), READER, False), (("Exports.Auditor", "Other.Admin"), READER, False), ((READER, OPERATOR), OPERATOR, True),
    (("exports.operator",), OPERATOR, False), (("EXPORTS.READER",), READER, False),  # values are case-sensitive
])
def test_each_role_includes_the_ones_below_it(roles, needed, allowed):
    assert api_roles.allows(roles, needed) is allowed


def test_roles_are_read_from_the_roles_claim_and_from_the_claim_type_role_typ_names():
    assert api_roles.principal_roles(encode(principal(OPERATOR))) == {OPERATOR}
    assert api_roles.principal_roles(encode(principal(READER, typ=ROLE_URI))) == {READER}
    both = principal(READER)
    both["claims"].append({"typ": ROLE_URI, "val": ADMIN})
    assert api_roles.principal_roles(encode(both)) == {READER, ADMIN}


def test_an_app_only_token_has_its_roles_in_the_same_claim():
    assert api_roles.principal_roles(encode(principal(OPERATOR, name=None))) == {OPERATOR}


def test_other_claims_and_malformed_claims_grant_nothing():
    value = principal(READER)
    value["claims"] += [{"typ": "groups", "val": ADMIN}, {"typ": "scp", "val": OPERATOR}, "Exports.Admin",
                        {"typ": "roles", "val": ["Exports.Admin"]}, {"typ": ["roles"], "val": ADMIN}, {"val": ADMIN},
                        {"typ": "roles"}, None]
    value["role_typ"] = ["roles"]  # not text: only `roles` counts
    assert api_roles.principal_roles(encode(value)) == {READER}


@pytest.mark.parametrize("value, fragment", [
    ("not base64!", "is not base64 of JSON"),
    ("é", "is not base64 of JSON"),
    (base64.b64encode(b"\xff\xfe{not json").decode(), "is not base64 of JSON"),
    (base64.b64encode(b"{\"claims\": [").decode(), "is not base64 of JSON"),
    (encode([{"typ": "roles", "val": ADMIN}]), "holds no list of claims"),
    (encode({"auth_typ": "aad"}), "holds no list of claims"),
    (encode({"claims": {"roles": ADMIN}}), "holds no list of claims"),
    (encode({"claims": "Exports.Admin"}), "holds no list of claims"),
    (base64.b64encode(b"[" * 100_000 + b"]" * 100_000).decode(), "characters long"),
    (base64.b64encode(b"[" * 20_000 + b"]" * 20_000).decode(), "is not base64 of JSON"),  # too deep to parse
])
def test_a_garbled_principal_says_what_is_wrong(value, fragment):
    with pytest.raises(api_roles.PrincipalError, match=fragment):
        api_roles.principal_roles(value)


def test_the_403_names_the_role_needed_the_roles_held_and_how_to_assign_one_and_nothing_else():
    hdrs = _lower(forwarded(READER, "exports.operator"))
    status, message = api_roles.refusal(hdrs, "start_run")
    assert status == 403
    assert message.startswith("this call needs the app role Exports.Operator (or Exports.Admin); the caller (object "
                              f"id {OBJECT_ID}) holds Exports.Reader, exports.operator (role values are "
                              "case-sensitive): an admin assigns app roles in Entra ID > Enterprise applications > ")
    assert "Users and groups" in message and "appRoleAssignedTo" in message
    assert "ops@contoso.example" not in message and hdrs["x-ms-client-principal"] not in message


# === through the host, as the platform forwards the principal =================================================
@pytest.fixture(scope="module")
def entra_world():
    world = open_world(settings={"API_AUTHENTICATION": "entra"})
    world.define(definition("hv"), definition("adm", target="In Admin Segment"))
    world.snapshot(list(sample_profiles(4, seed=48, start=420_000)))
    yield world
    close_world(world)


def _call(world, method: str, path: str, hdrs: dict, **options):
    return world.api.request(method, world.host.base_url + path, headers=hdrs, timeout=60, **options)


def _dry_run(world, export: str, hdrs: dict) -> str:
    """Start a dry run as this principal, wait (reading as it) until it ends; its id."""
    started = _call(world, "POST", f"/api/exports/{export}/runs", hdrs, json={"dryRun": True})
    assert started.status_code == 202, started.text[:300]
    run_id = started.json()["runId"]
    wait_until(lambda: _call(world, "GET", f"/api/runs/{run_id}", hdrs).json()["status"] == "dry run", timeout=60)
    return run_id


def test_a_reader_reads_exports_and_runs_but_may_not_start_cancel_or_replay(entra_world):
    run_id = _dry_run(entra_world, "hv", headers(OPERATOR))  # an Operator may start one
    reader = headers(READER)
    exports = _call(entra_world, "GET", "/api/exports", reader)
    assert exports.status_code == 200 and [e["name"] for e in exports.json()["exports"]] == ["hv", "adm"]
    history = _call(entra_world, "GET", "/api/exports/hv/runs", reader)
    assert history.status_code == 200 and [r["runId"] for r in history.json()["runs"]] == [run_id]
    view = _call(entra_world, "GET", f"/api/runs/{run_id}", reader)
    assert view.status_code == 200 and view.json()["status"] == "dry run"
    for path, body in [("/api/exports/hv/runs", {"dryRun": True}), (f"/api/runs/{run_id}/cancel", None),
                       (f"/api/runs/{run_id}/replay", None), (f"/api/runs/{NO_RUN}/cancel", None)]:
        refused = _call(entra_world, "POST", path, reader, json=body)
        assert refused.status_code == 403, (path, refused.text[:300])
        assert "needs the app role Exports.Operator" in refused.json()["error"]
        assert "holds Exports.Reader" in refused.json()["error"]
    assert [r["runId"] for r in _call(entra_world, "GET", "/api/exports/hv/runs", reader).json()["runs"]] == [run_id]


def test_an_admin_may_do_what_an_operator_may(entra_world):
    run_id = _dry_run(entra_world, "adm", headers(ADMIN))
    assert _call(entra_world, "GET", f"/api/runs/{run_id}", headers(ADMIN)).status_code == 200


def test_roles_in_the_claim_type_role_typ_names_count(entra_world):
    assert _call(entra_world, "GET", "/api/exports", headers(READER, typ=ROLE_URI)).status_code == 200
    refused = _call(entra_world, "POST", f"/api/runs/{NO_RUN}/replay", headers(READER, typ=ROLE_URI))
    assert refused.status_code == 403 and "holds Exports.Reader" in refused.json()["error"]


@pytest.mark.parametrize("roles, held", [((), "holds no app role"), (("exports.reader",), "case-sensitive"),
                                         (("Exports.Auditor",), "holds Exports.Auditor")])
def test_a_principal_without_the_role_is_refused_403_saying_how_to_get_it(entra_world, roles, held):
    refused = _call(entra_world, "GET", "/api/exports", headers(*roles))
    assert refused.status_code == 403 and refused.headers["Content-Type"].startswith("application/json")
    error = refused.json()["error"]
    assert "needs the app role Exports.Reader (or Exports.Operator or Exports.Admin)" in error and held in error
    assert "Enterprise applications" in error


def test_without_the_platforms_principal_the_app_itself_refuses_401_saying_easy_auth_may_be_off():
    """The app's own guard, behind the platform's: a principal header absent or empty is no principal."""
    for hdrs in ({}, {"x-ms-client-principal-id": OBJECT_ID}, {"x-ms-client-principal": ""}):
        status, message = api_roles.refusal(hdrs, "list_exports")
        assert status == 401 and "carries no authenticated principal" in message and "Easy Auth" in message


def test_a_token_forwarding_an_empty_principal_reaches_the_apps_own_401(entra_world):
    refused = _call(entra_world, "GET", "/api/exports", {"Authorization": f"Bearer {token(b'')}"})
    assert refused.status_code == 401 and "carries no authenticated principal" in refused.json()["error"]


@pytest.mark.parametrize("value", [
    b"<xml/>", b"\xff\xfe{not json", json.dumps(["Exports.Admin"]).encode(), json.dumps({"claims": "roles"}).encode(),
    json.dumps({"claims": None, "role_typ": ROLE_URI}).encode(), b"[" * 5000 + b"]" * 5000,
], ids=["not JSON", "not UTF-8", "not an object", "claims not a list", "claims null", "deeply nested"])
def test_a_garbled_principal_is_refused_401_never_500(entra_world, value):
    """The platform vouches for who sent a principal, not for its shape: a garbled one, inside a valid token."""
    refused = _call(entra_world, "POST", "/api/exports/hv/runs", {"Authorization": f"Bearer {token(value)}"}, json={})
    assert refused.status_code == 401, refused.text[:300]
    assert refused.json()["error"].startswith("the authenticated principal forwarded to the app "
                                              "(X-MS-CLIENT-PRINCIPAL) ")
    assert "Traceback" not in refused.text and base64.b64encode(value).decode() not in refused.text


# === the local Easy Auth stand-in: never kinder than the platform ==============================================
def _stand_in_401(answer) -> str:
    assert answer.status_code == 401, answer.text[:300]
    assert answer.headers["Content-Type"].startswith("application/json")
    return answer.json()["error"]


@pytest.mark.parametrize("hdrs", [
    {}, {"X-MS-CLIENT-PRINCIPAL-ID": OBJECT_ID}, {"X-MS-CLIENT-PRINCIPAL": ""}, forwarded(ADMIN),
    {"x-ms-client-principal": encode(principal(ADMIN)), "Authorization": "Basic b3BzOnB3"},
], ids=["nothing", "only the object id", "empty principal", "an admin principal", "with a basic authorization"])
def test_a_request_without_a_token_is_refused_401_whatever_principal_headers_it_sends(entra_world, hdrs):
    error = _stand_in_401(_call(entra_world, "GET", "/api/exports", hdrs))
    assert "carries no token" in error and "X-MS-CLIENT-PRINCIPAL headers are dropped" in error


@pytest.mark.parametrize("extra", [forwarded(ADMIN), {"x-ms-client-principal": encode(principal(ADMIN)),
                                                      "X-Ms-Client-Principal-Idp": "aad"}], ids=["as sent", "cased"])
def test_a_client_sent_principal_beside_a_valid_token_is_dropped(entra_world, extra):
    """A Reader's token with an Admin principal header beside it: still only a Reader's call."""
    refused = _call(entra_world, "POST", "/api/exports/hv/runs", {**headers(READER), **extra}, json={"dryRun": True})
    assert refused.status_code == 403, refused.text[:300]
    assert "holds Exports.Reader: an admin assigns" in refused.json()["error"]


def _tampered(value: str) -> str:
    body, _, signature = value.partition(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["p"] = base64.urlsafe_b64encode(json.dumps(principal(ADMIN)).encode()).decode().rstrip("=")
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=") + "." + signature


@pytest.mark.parametrize("value", [
    _tampered(token(principal(READER))), token(principal(ADMIN), lifetime=-1),
    easy_auth.mint(principal(ADMIN), OBJECT_ID, "x", "another key"), token(principal(ADMIN)).split(".")[0],
    "garbage",
], ids=["tampered", "expired", "another key", "unsigned", "garbage"])
def test_a_tampered_expired_or_foreign_token_is_refused_401(entra_world, value):
    for hdrs in ({"Authorization": f"Bearer {value}"}, {"Cookie": f"{easy_auth.COOKIE}={value}"}):
        error = _stand_in_401(_call(entra_world, "GET", "/api/exports", hdrs))
        assert "is not valid" in error


def test_the_session_cookie_works_as_the_bearer_does(entra_world):
    reader = f"theme=dark; {easy_auth.COOKIE}={token(principal(READER))}; other=1"
    assert _call(entra_world, "GET", "/api/exports", {"Cookie": reader}).status_code == 200
    refused = _call(entra_world, "POST", f"/api/runs/{NO_RUN}/replay", {"Cookie": reader})
    assert refused.status_code == 403 and "holds Exports.Reader" in refused.json()["error"]
    # The bearer goes first: an invalid one is not rescued by a valid cookie.
    both = {"Cookie": reader, "Authorization": "Bearer garbage"}
    assert _call(entra_world, "GET", "/api/exports", both).status_code == 401


def test_behind_the_stand_in_the_routes_take_no_function_key_as_in_azure(entra_world):
    """In Azure the worker imports the app with API_AUTHENTICATION=entra set, so its routes take no key; the local
    host loads the app under its settings too, and a browser signed in (a cookie, never a key) is served."""
    cookie = {"Cookie": f"{easy_auth.COOKIE}={token(principal(READER))}"}
    assert requests.get(f"{entra_world.host.base_url}/api/exports", headers=cookie, timeout=30).status_code == 200
    assert app_under({"API_AUTHENTICATION": "function-key"}) is function_app.app
    levels = {f.get_function_name(): f.get_trigger().get_dict_repr()["authLevel"]
              for f in index(app_under({"API_AUTHENTICATION": "entra"}))
              if f.get_trigger().get_dict_repr()["type"] == "httpTrigger"}
    assert set(levels.values()) == {func.AuthLevel.ANONYMOUS} and "list_exports" in levels


def test_the_consoles_files_are_excluded_and_nothing_beside_them(entra_world):
    """infra/app/function.bicep excludes '/api/console/*': the page, script and style, with no token nor key."""
    base = entra_world.host.base_url
    page = requests.get(f"{base}/api/console/", timeout=30)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert requests.get(f"{base}/api/console/app.js", timeout=30).status_code == 200
    assert requests.get(f"{base}/api/console/missing.css", timeout=30).status_code == 404  # the app's own answer
    for path in ("/api/console", "/api/consoles/x", "/api/exports", "/admin/functions/scheduled_sync"):
        assert "carries no token" in _stand_in_401(requests.get(base + path, timeout=30)), path


def test_the_sign_in_stand_in_says_it_is_local_and_refuses_a_redirect_off_the_host(entra_world):
    url = f"{entra_world.host.base_url}{easy_auth.SIGN_IN_PATH}"
    page = requests.get(url, params={"post_login_redirect_uri": "/api/console/#/runs/x"}, timeout=30)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "local stand-in" in page.text and 'href="/api/console/#/runs/x"' in page.text
    assert "<script" not in page.text and "script-src" not in page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example/", "api/console/", "", "/a\nb"):
        refused = requests.get(url, params={"post_login_redirect_uri": target}, timeout=30)
        assert refused.status_code == 400 and "evil" not in refused.text, target
    assert requests.post(url, timeout=30).status_code == 405


# === the stand-in's tokens =====================================================================================
def test_a_token_carries_the_principal_byte_for_byte_until_it_expires():
    raw = b"\x00 any bytes \xff"
    value = easy_auth.mint(raw, OBJECT_ID, "ops", "k", lifetime=60, now=1000.0)
    assert easy_auth.verify(value, "k", now=1059.0) == (raw, OBJECT_ID, "ops")
    assert easy_auth.verify(value, "k", now=1060.0) is None
    assert easy_auth.verify(value, "other", now=1000.0) is None and easy_auth.verify(value, "", now=1000.0) is None
    assert easy_auth.verify(easy_auth.mint({"a": 1}, "o", "n", "k"), "k")[0] == b'{"a": 1}'


def test_the_token_is_read_from_the_bearer_first_then_the_cookie():
    assert easy_auth.token_of({"Authorization": "bearer abc", "Cookie": f"{easy_auth.COOKIE}=def"}) == "abc"
    assert easy_auth.token_of({"Authorization": "Basic abc", "Cookie": f"a=b; {easy_auth.COOKIE}=def"}) == "def"
    assert easy_auth.token_of({"Cookie": f"x{easy_auth.COOKIE}=def"}) is None and easy_auth.token_of({}) is None


def test_the_host_refuses_entra_without_the_stand_ins_key(monkeypatch):
    from tools.local_host import LocalHost

    monkeypatch.delenv(easy_auth.KEY_SETTING, raising=False)
    with pytest.raises(ValueError, match=easy_auth.KEY_SETTING):
        LocalHost(function_app.app, {"API_AUTHENTICATION": "entra"}, port=0)
