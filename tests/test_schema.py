"""The published JSON Schema of the definitions (schema/exports.schema.json, for editors' completion) describes
the same document the app's checker accepts: the same keys and choices, the checker's valid documents valid, its
shape errors errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from shared.source import export_config as config
from shared.source.export_config import ExportConfigError, ExportDefinition, parse_exports
from tests.support import definition

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "schema" / "exports.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)
DEFS = SCHEMA["$defs"]
EU = {"name": "marketing-eu", "secretName": "autopilot-eu-key", "requestsPerSecond": 5,
      "baseUrl": "https://api2.autopilothq.com/v1"}
ORTTO = {"name": "ortto-au", "platform": "ortto", "region": "au", "plan": "business", "secretName": "ortto-key",
         "phoneRegion": "AU"}


def test_the_schema_is_valid_and_names_the_keys_and_choices_the_checker_knows():
    Draft202012Validator.check_schema(SCHEMA)
    export = DEFS["export"]["properties"]
    assert set(SCHEMA["properties"]) - {"$schema"} == {"connections", "exports"}
    assert set(export) == set(config.EXPORT_KEYS)
    assert set(export["source"]["properties"]) == set(config.SOURCE_KEYS)
    assert set(export["destination"]["properties"]) == set(config.DESTINATION_KEYS)
    assert set(export["customFields"]["items"]["properties"]) == set(config.CUSTOM_KEYS)
    assert set(DEFS["connection"]["properties"]) == set(config.CONNECTION_KEYS)
    assert DEFS["connection"]["properties"]["plan"]["enum"] == list(config.PLAN_RATES)
    new_people = export["destination"]["properties"]["newPeople"]["properties"]
    assert set(new_people) == set(config.NEW_PEOPLE_KEYS)
    assert new_people["emailPermission"]["default"] == ExportDefinition("x").email_permission
    assert export["fields"]["propertyNames"]["enum"] == list(config.STANDARD_FIELDS)
    assert export["customFields"]["items"]["properties"]["type"]["enum"] == list(config.CUSTOM_TYPES)
    assert export["maxProfiles"]["default"] == config.DEFAULT_MAX_PROFILES


def _on(connection: str, export: dict) -> dict:
    export["destination"]["connection"] = connection
    return export


def _ortto(name: str, new_people: dict | None = None, **extra) -> dict:
    """An export to the ORTTO connection (Company is no Ortto person field)."""
    export = _on("ortto-au", definition(name, membership="list", target=f"Tag {name}", **extra))
    export["fields"].pop("Company")
    if new_people is not None:
        export["destination"]["newPeople"] = new_people
    return export


VALID = {
    "one field-mode export": {"exports": [definition("hv")]},
    "list mode, keep leavers, limits": {"exports": [definition("lv", membership="list", on_leave="keep",
                                                               maxProfiles=5000, maxRemovalPercent=12.5)]},
    "two accounts": {"connections": [EU], "exports": [definition("us"), _on("marketing-eu", definition("eu"))]},
    "with $schema for editors": {"$schema": "./schema/exports.schema.json", "exports": [definition("hv")]},
    "ortto: plan, phone regions, permission from a column": {
        "connections": [ORTTO],
        "exports": [_ortto("gb", {"emailPermission": {"column": "Consent"}}, phoneRegion="GB"), _ortto("au", {})]},
    "ortto: new people without permission, or as Ortto does": {
        "connections": [{**ORTTO, "plan": "free"}],
        "exports": [_ortto("a", {"emailPermission": False}), _ortto("b", {"emailPermission": "ortto-default"})]},
}


@pytest.mark.parametrize("document", VALID.values(), ids=VALID.keys())
def test_what_the_checker_accepts_the_schema_accepts(document):
    parse_exports(document)
    assert list(VALIDATOR.iter_errors(document)) == []


def _with(change) -> dict:
    document = {"connections": [dict(EU)], "exports": [definition("hv")]}
    change(document)
    return document


INVALID = {
    "unknown key": _with(lambda d: d["exports"][0].update(colour="blue")),
    "unknown membership": _with(lambda d: d["exports"][0]["destination"].update(membership="lists")),
    "no Email mapping": _with(lambda d: d["exports"][0]["fields"].pop("Email")),
    "not a standard field": _with(lambda d: d["exports"][0]["fields"].update(Nickname="Nick")),
    "bad custom type": _with(lambda d: d["exports"][0]["customFields"][0].update(type="money")),
    "negative limit": _with(lambda d: d["exports"][0].update(maxProfiles=-1)),
    "connection named default": _with(lambda d: d["connections"][0].update(name="default")),
    "secret name with a space": _with(lambda d: d["connections"][0].update(secretName="eu key")),
    "no exports": {"connections": []},
    "plan and requestsPerSecond": _with(lambda d: d["connections"].append({**ORTTO, "requestsPerSecond": 30})),
    "unknown plan": _with(lambda d: d["connections"].append({**ORTTO, "plan": "enterprise-plus"})),
    "plan on Autopilot": _with(lambda d: d["connections"][0].update(plan="business")),
    "phoneRegion on Autopilot": _with(lambda d: d["connections"][0].update(phoneRegion="AU")),
    "phoneRegion in lower case": _with(lambda d: d["connections"].append({**ORTTO, "phoneRegion": "au"})),
    "export phoneRegion not a code": _with(lambda d: d.update(connections=[ORTTO], exports=[_ortto(
        "x", phoneRegion="Australia")])),
    "emailPermission true": _with(lambda d: d.update(connections=[ORTTO], exports=[_ortto(
        "x", {"emailPermission": True})])),
    "emailPermission unknown word": _with(lambda d: d.update(connections=[ORTTO], exports=[_ortto(
        "x", {"emailPermission": "subscribed"})])),
    "emailPermission column empty": _with(lambda d: d.update(connections=[ORTTO], exports=[_ortto(
        "x", {"emailPermission": {"column": ""}})])),
    "emailPermission column and more": _with(lambda d: d.update(connections=[ORTTO], exports=[_ortto(
        "x", {"emailPermission": {"column": "C", "default": True}})])),
    "newPeople unknown key": _with(lambda d: d.update(connections=[ORTTO], exports=[_ortto(
        "x", {"smsPermission": False})])),
}


@pytest.mark.parametrize("document", INVALID.values(), ids=INVALID.keys())
def test_what_the_schema_refuses_the_checker_refuses_too(document):
    assert list(VALIDATOR.iter_errors(document))
    with pytest.raises(ExportConfigError):
        parse_exports(document)
