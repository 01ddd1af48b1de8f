"""The Ortto client against Ortto's recorded answers (tests/fixtures/ortto_recorded.json, quoted from the API
contract), served over real HTTP by a loopback server that replays them: what the client makes of each, and
how many requests it spends."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.destinations import ortto_client
from shared.destinations.api_client import ApiError, Refused, Throttled
from shared.destinations.ortto_client import OrttoClient
from shared.destinations.secrets import ApiKeyProvider, LocalStandInCredential
from shared.source.export_config import parse_exports
from tools.keyvault_standin import KeyVaultStandIn
from tools.ortto_sim import OrttoSim

RECORDED = json.loads((Path(__file__).parent / "fixtures" / "ortto_recorded.json").read_text())
SECRET, KEY = "ortto-key", "ortto-test-key-0123"


class Replay(ThreadingHTTPServer):
    """Answers each request with the next queued (status, body) and keeps what it was sent."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers: list[tuple[int, dict]] = []
        self.received: list[tuple[str, dict]] = []

    def queue(self, *names: str) -> None:
        self.answers += [(RECORDED[n]["status"], RECORDED[n]["body"]) for n in names]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.server.received.append((self.path, body))
        status, answer = self.server.answers.pop(0) if self.server.answers else (500, {"error": "nothing queued"})
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def replay() -> Iterator[Replay]:
    server = Replay()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(replay) -> Iterator[OrttoClient]:
    with KeyVaultStandIn(secrets={SECRET: KEY}) as vault:
        provider = ApiKeyProvider(vault.url, SECRET, credential_factory=LocalStandInCredential, client_options={
            "connection_verify": str(vault.ca_file), "verify_challenge_resource": False})
        api = OrttoClient(f"http://127.0.0.1:{replay.server_address[1]}/v1", provider)
        yield Blocking(api)
        api.close()
        provider.close()


class Blocking:
    """The client's coroutines called as planning calls them, each on a loop of its own (ApiClient.run_sync)."""

    def __init__(self, api: OrttoClient):
        self.api = api

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.api.run_sync(lambda: getattr(self.api, name)(*args, **kwargs))


def item(email: str, **extra) -> dict:
    return {"k": email.lower(), "m": True, "d": {"Email": email, **extra}}


def test_a_merge_s_recorded_answer_acknowledges_each_person_in_order(client, replay):
    replay.queue("merge_ok")
    outcomes = client.merge([item("a@x.io"), item("b@x.io")], "Tag")
    assert outcomes == [("acked", "", "created"), ("acked", "", "merged")]
    path, body = replay.received[0]
    assert path == "/v1/person/merge" and body["merge_strategy"] == 2 and body["async"] is False
    assert body["people"][0] == {"fields": {"str::email": "a@x.io"}, "tags": ["Tag"]}


def test_an_all_suppressed_400_is_read_person_by_person_in_one_request(client, replay):
    replay.queue("merge_all_suppressed")
    outcomes = client.merge([item("gone@x.io")], None)
    assert outcomes == [("refused", "Ortto suppressed this person: Email is suppressed", "suppressed")]
    assert len(replay.received) == 1


def test_a_200_with_an_invalid_person_refuses_that_person_only(client, replay):
    invalid = RECORDED["merge_invalid_detail"]["body"]
    replay.answers.append((200, {"people": [RECORDED["merge_ok"]["body"]["people"][0], invalid]}))
    outcomes = client.merge([item("a@x.io"), item("b@x.io")], None)
    assert outcomes[0] == ("acked", "", "created")
    assert outcomes[1][0] == "refused" and "failed to validate field str::x" in outcomes[1][1]


def test_a_400_whose_details_do_not_match_the_people_is_a_whole_refusal_to_split(client, replay):
    replay.queue("merge_all_suppressed")  # one entry for two people: not a verdict on each
    with pytest.raises(Refused) as refused:
        client.merge([item("a@x.io"), item("b@x.io")], None)
    assert "No valid contacts provided" in refused.value.message


def test_new_people_get_the_chosen_permission_by_an_append_only_merge(client, replay):
    replay.queue("merge_ok")
    outcomes = client.create_new([item("a@x.io", _permission=False), item("b@x.io", _permission=True)])
    assert [o[2] for o in outcomes] == ["created", "merged"]
    _, body = replay.received[0]
    assert body["merge_strategy"] == 1  # writes bol::p only where a person has none: never an existing one's
    assert [p["fields"] for p in body["people"]] == [{"str::email": "a@x.io", "bol::p": False},
                                                      {"str::email": "b@x.io", "bol::p": True}]


def _export(*custom: dict):
    document = {"connections": [{"name": "o", "platform": "ortto", "secretName": SECRET}], "exports": [{
        "name": "e", "dataTransferAcknowledged": True, "source": {"container": "ci-exports", "segment": "S"},
        "destination": {"connection": "o", "membership": "list", "list": "Tag"}, "fields": {"Email": "E"},
        "customFields": list(custom)}]}
    return parse_exports(document)[0]


def test_custom_fields_are_listed_then_created_by_the_flat_body(client, replay):
    replay.queue("field_get", "field_create")
    tag = client.prepare(_export({"name": "Job Title", "type": "string", "column": "J"},
                                 {"name": "Loyalty tier", "type": "string", "column": "T"}))
    assert tag == "Tag"
    assert [path for path, _ in replay.received] == ["/v1/person/custom-field/get", "/v1/person/custom-field/create"]
    assert replay.received[1][1] == {"name": "Loyalty tier", "type": "text", "track_changes": False}


def test_a_field_of_another_type_with_the_name_is_reported_not_created(client, replay):
    replay.queue("field_get")  # Job Title exists as text
    with pytest.raises(ApiError, match=r"Job Title.*another type"):
        client.prepare(_export({"name": "Job Title", "type": "integer", "column": "J"}))
    assert len(replay.received) == 1


def test_the_429_s_try_in_seconds_is_the_wait(client, replay):
    replay.queue("rate_limited")
    with pytest.raises(Throttled) as throttled:
        client.merge([item("a@x.io")], None)
    assert throttled.value.retry_after == RECORDED["rate_limited"]["body"]["error"]["try-in-seconds"]


def test_a_merge_too_large_is_refused_to_be_split_and_a_ban_is_waited_out(client, replay):
    replay.answers += [(413, {"request_id": "r", "code": 413, "error": "payload too large"}),
                       (403, {"request_id": "r", "code": 403, "error": "banned"})]
    with pytest.raises(Refused):  # the sender splits a refused merge: halves of under 2 MB pass
        client.merge([item("a@x.io"), item("b@x.io")], None)
    with pytest.raises(Throttled) as banned:
        client.merge([item("a@x.io")], None)
    assert banned.value.retry_after == ortto_client.BAN_WINDOW


@pytest.fixture
def sim_client() -> Iterator[tuple[OrttoSim, Blocking]]:
    with KeyVaultStandIn(secrets={SECRET: KEY}) as vault, OrttoSim(KEY, rate=None, latency=0.2) as sim:
        provider = ApiKeyProvider(vault.url, SECRET, credential_factory=LocalStandInCredential, client_options={
            "connection_verify": str(vault.ca_file), "verify_challenge_resource": False})
        api = OrttoClient(sim.base_url, provider)
        yield sim, Blocking(api)
        api.close()
        provider.close()


def test_missing_custom_fields_are_created_side_by_side_not_one_after_the_other(sim_client):
    """With an API 0.2 s away, each field created in turn would hold up the first merge 0.2 s more: all the creates
    are sent before the first is answered."""
    sim, client = sim_client
    client.prepare(_export({"name": "Job Title", "type": "string", "column": "J"},
                           {"name": "Loyalty Points", "type": "integer", "column": "L"},
                           {"name": "Joined", "type": "date", "column": "D"}))
    assert set(sim.custom_fields()) == {"str:cm:job-title", "int:cm:loyalty-points", "dtz:cm:joined"}
    creates = [r for r in sim.request_log() if r["path"].endswith("/custom-field/create")]
    assert len(creates) == 3 and max(r["t"] for r in creates) - min(r["t"] for r in creates) < 0.2


def test_a_field_that_cannot_be_created_is_reported_after_the_others_are_made(sim_client):
    sim, client = sim_client
    client.prepare(_export({"name": "Job Title", "type": "string", "column": "J"}))
    with pytest.raises(ApiError, match=r"Job Title.*another type"):
        client.prepare(_export({"name": "Job Title", "type": "integer", "column": "J"},
                               {"name": "Loyalty Points", "type": "integer", "column": "L"}))
    assert set(sim.custom_fields()) == {"str:cm:job-title", "int:cm:loyalty-points"}
