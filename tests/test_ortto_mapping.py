"""Ortto's side of the mapping: field ids, value forms, the 255/4,000 limits, decimals times 1,000, dates, tags, and
the definitions Ortto cannot take. Pure: no stack."""

from __future__ import annotations

import pytest

from shared import ortto_fields
from shared.cdm_reader import Row
from shared.contacts import Contact, ContactMapper, Rejection
from shared.export_config import ExportConfigError, parse_exports
from shared.planner import Planner, expected_requests
from shared.state_store import Snapshot
from tests.support import definition
from tests.test_planner import partition

ORTTO = {"name": "ortto-eu", "platform": "ortto", "region": "eu", "secretName": "ortto-key"}
COLUMNS = ["Email", "First", "Last", "Phone", "City", "Country", "State", "Postal", "Tier", "Notes", "Points",
           "Spend", "Vip", "Since"]
EVERY_FIELD = {
    "fields": {"Email": "Email", "FirstName": "First", "LastName": "Last", "MobilePhone": "Phone",
               "MailingCity": "City", "MailingCountry": "Country", "MailingState": "State",
               "MailingPostalCode": "Postal"},
    "customFields": [{"name": "Loyalty Tier", "type": "string", "column": "Tier"},
                     {"name": "Agent Notes", "type": "text", "column": "Notes"},
                     {"name": "Loyalty Points", "type": "integer", "column": "Points"},
                     {"name": "Lifetime Spend", "type": "float", "column": "Spend"},
                     {"name": "VIP", "type": "boolean", "column": "Vip"},
                     {"name": "Customer Since", "type": "date", "column": "Since"}],
}


def ortto_export(membership: str = "list", connection: dict = ORTTO, **changes):
    export = definition("o", membership=membership, **changes)
    export.update({k: v for k, v in EVERY_FIELD.items() if k not in changes})
    export["destination"]["connection"] = connection["name"]
    (parsed,) = parse_exports({"connections": [connection], "exports": [export]})
    return parsed


def row(**values) -> Row:
    return Row("part-00000.csv", 2, values_of(**values))


def values_of(**values) -> list[str]:
    base = {"Email": "Chris.Lee@example.com", "First": "Chris", "Last": "Lee", "Phone": "+61401234567",
            "City": "Melbourne", "Country": "Australia", "State": "Victoria", "Postal": "3000", "Tier": "Gold",
            "Notes": "n" * 300, "Points": "1200", "Spend": "12.5", "Vip": "yes", "Since": "2021-03-04"}
    base.update(values)
    return [base[c] for c in COLUMNS]


def test_every_standard_field_and_custom_type_becomes_its_ortto_id_and_form():
    contact = ContactMapper(ortto_export(), COLUMNS).map(row(Since="2021-03-04T10:22:05+02:00"))
    assert isinstance(contact, Contact)
    person = ortto_fields.person(contact.document, True, "High value")
    assert person == {
        "fields": {
            "str::email": "Chris.Lee@example.com", "str::first": "Chris", "str::last": "Lee",
            "phn::phone": {"phone": "+61401234567", "parse_with_country_code": True},
            "geo::city": {"name": "Melbourne"}, "geo::country": {"name": "Australia"},
            "geo::region": {"name": "Victoria"}, "str::postal": "3000",
            "str:cm:loyalty-tier": "Gold", "txt:cm:agent-notes": "n" * 300, "int:cm:loyalty-points": 1200,
            "int:cm:lifetime-spend": 12500, "bol:cm:vip": True,
            "dtz:cm:customer-since": {"year": 2021, "month": 3, "day": 4, "hour": 8, "minute": 22, "second": 5,
                                      "timezone": "UTC"},
        },
        "tags": ["High value"],
    }


def test_a_date_is_a_date_object_decimals_are_scaled_and_rounded():
    contact = ContactMapper(ortto_export(), COLUMNS).map(row(Spend="0.0016", Since="1980-03-04"))
    fields = ortto_fields.person(contact.document, True, None)["fields"]
    assert fields["int:cm:lifetime-spend"] == 2  # 1.6 thousandths, rounded
    assert fields["dtz:cm:customer-since"] == {"year": 1980, "month": 3, "day": 4, "timezone": "UTC"}


def test_leavers_lose_the_tag_and_field_mode_sets_the_membership_field_never_consent():
    leaver = ortto_fields.person({"Email": "a@example.com"}, False, "High value")
    assert leaver == {"fields": {"str::email": "a@example.com"}, "unset_tags": ["High value"]}
    export = ortto_export("field")
    planner = Planner(export, COLUMNS)
    try:
        plan = planner.plan([partition([values_of(), values_of(Email="b@example.com")])], Snapshot.of(()))
        (batch,) = list(plan.batches())
    finally:
        planner.close()
    people = [ortto_fields.person(item.document, item.member, None) for item in batch.items]
    assert all(p["fields"]["bol:cm:in-high-value-segment"] is True and "tags" not in p for p in people)
    assert not any(key in p["fields"] for p in people for key in ("bol::p", "bol::sp"))
    assert ortto_fields.custom_fields(export)["bol:cm:in-high-value-segment"] == ("In High Value Segment", "boolean")


@pytest.mark.parametrize("values, reason", [
    ({"Tier": "x" * 256}, 'column Tier has 256 characters; Ortto\'s string fields hold at most 255 (custom field '
                          '"Loyalty Tier", type string)'),
    ({"Notes": "x" * 4001}, "column Notes has 4001 characters; Ortto's text fields hold at most 4000"),
    ({"First": "x" * 256}, "column First has 256 characters; Ortto's FirstName field holds at most 255"),
    ({"Spend": "1e16"}, "column Spend is beyond Ortto's number range"),
    ({"Points": str(2**63)}, "column Points is beyond Ortto's number range"),
])
def test_a_value_ortto_would_refuse_is_a_rejected_row_naming_column_and_limit(values, reason):
    result = ContactMapper(ortto_export(), COLUMNS).map(row(**values))
    assert isinstance(result, Rejection) and result.reason.startswith(reason), result
    assert result.email == "Ch***@e***.com"


def test_values_at_the_limits_pass_and_autopilot_keeps_no_ortto_limit():
    assert isinstance(ContactMapper(ortto_export(), COLUMNS).map(
        row(Tier="x" * 255, Notes="x" * 4000, First="x" * 255)), Contact)
    autopilot = definition("a")
    autopilot["customFields"] = [{"name": "Loyalty Tier", "type": "string", "column": "Tier"}]
    autopilot["fields"] = {"Email": "Email"}
    (parsed,) = parse_exports({"exports": [autopilot]})
    assert isinstance(ContactMapper(parsed, COLUMNS).map(row(Tier="x" * 300)), Contact)


def test_the_mapping_seed_differs_by_platform():
    customs = [c for c in EVERY_FIELD["customFields"] if c["type"] != "text"]
    autopilot = ortto_export(connection={"name": "ap", "secretName": "k"}, customFields=customs)
    ortto = ortto_export(customFields=customs)
    assert ContactMapper(ortto, COLUMNS).record_seed("csv") != ContactMapper(autopilot, COLUMNS).record_seed("csv")


@pytest.mark.parametrize("change, problem", [
    (lambda e: e["fields"].update(Company="Company"), 'fields.Company is not an Ortto person field'),
    (lambda e: e["fields"].update(Phone="Phone"), "fields.MobilePhone and fields.Phone are both Ortto's one phone"),
    (lambda e: e["customFields"].append({"name": "loyalty-tier!", "type": "string", "column": "Tier"}),
     "customFields[6].name gives the Ortto field id str:cm:loyalty-tier, as customFields[0].name does"),
    (lambda e: e["customFields"].append({"name": "%%", "type": "string", "column": "Tier"}),
     "customFields[6].name '%%' has no letter or digit"),
    (lambda e: e["destination"].update(list="t" * 256), "destination.list is the Ortto tag's name: at most 255"),
])
def test_definitions_ortto_cannot_take_are_refused_naming_where(change, problem):
    export = definition("o")
    export.update(EVERY_FIELD, destination={"connection": "ortto-eu", "membership": "list", "list": "HV"})
    export["fields"] = dict(EVERY_FIELD["fields"])
    export["customFields"] = list(EVERY_FIELD["customFields"])
    change(export)
    with pytest.raises(ExportConfigError) as refused:
        parse_exports({"connections": [ORTTO], "exports": [export]})
    assert problem in str(refused.value)


def test_connections_name_their_platform_and_region():
    eu, us = ortto_export().account, ortto_export(connection=dict(ORTTO, region="us")).account
    assert eu.resolved("default-key", "https://autopilot", 5).base_url == "https://api.eu.ap3api.com/v1"
    assert us.resolved("default-key", "https://autopilot", 5).rate == 10.0  # the Professional plan's
    assert eu.resolved("default-key", "https://autopilot", 5).secret_name == "ortto-key"
    with pytest.raises(ExportConfigError, match="region is only used by an Ortto connection"):
        ortto_export(connection=dict(ORTTO, platform="autopilot"))
    with pytest.raises(ExportConfigError, match='"text" is an Ortto type'):
        export = definition("a")
        export["customFields"] = [{"name": "Notes", "type": "text", "column": "Notes"}]
        parse_exports({"exports": [export]})


def test_both_modes_send_every_change_in_100_person_merges():
    for membership in ("list", "field"):
        planner = Planner(ortto_export(membership), COLUMNS)
        try:
            rows = [values_of(Email=f"p{n}@example.com") for n in range(250)]
            plan = planner.plan([partition(rows)], Snapshot.of(()))
            batches = list(plan.batches())
        finally:
            planner.close()
        assert [(b.kind, len(b.items)) for b in batches] == [("upsert", 100), ("upsert", 100), ("upsert", 50)]
        assert plan.requests == expected_requests(True, 250, 0, 0) == 3

