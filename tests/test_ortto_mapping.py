"""Ortto's side of the mapping: field ids, value forms, the 255/4,000 limits, decimals times 1,000, dates, tags,
phones in international form, new people's email permission, and the definitions Ortto cannot take. Pure: no
stack."""

from __future__ import annotations

import pytest

from shared.pipeline.planner import Planner, expected_requests
from shared.source import ortto_fields
from shared.source.cdm_reader import Row
from shared.source.contacts import Contact, ContactMapper, MappingError, Rejection
from shared.source.export_config import ExportConfigError, parse_exports
from shared.state.state_store import Snapshot
from tests.support import definition
from tests.test_planner import partition
from tools.generate_export import STANDARD_COLUMNS, sample_profiles

ORTTO = {"name": "ortto-eu", "platform": "ortto", "region": "eu", "secretName": "ortto-key"}
COLUMNS = ["Email", "First", "Last", "Phone", "City", "Country", "State", "Postal", "Tier", "Notes", "Points",
           "Spend", "Vip", "Since", "Consent"]
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
            "Notes": "n" * 300, "Points": "1200", "Spend": "12.5", "Vip": "yes", "Since": "2021-03-04", "Consent": ""}
    base.update(values)
    return [base[c] for c in COLUMNS]


def test_every_standard_field_and_custom_type_becomes_its_ortto_id_and_form():
    # (01:22 at +02:00 is still March 3rd in UTC: the date written is the one sent)
    contact = ContactMapper(ortto_export(), COLUMNS).map(row(Since="2021-03-04T01:22:05+02:00"))
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
            "dtz:cm:customer-since": {"year": 2021, "month": 3, "day": 4, "timezone": "UTC"},
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
    assert ortto_fields.custom_fields(export)["bol:cm:in-high-value-segment"] == ("In High Value Segment", "bool")


def test_custom_fields_are_created_with_orttos_type_names():
    # the create call names the boolean type `bool`; `boolean` is not one of Ortto's types
    assert ortto_fields.DISPLAY_TYPE["boolean"] == "bool"
    assert ortto_fields.custom_fields(ortto_export()) == {
        "str:cm:loyalty-tier": ("Loyalty Tier", "text"), "txt:cm:agent-notes": ("Agent Notes", "large_text"),
        "int:cm:loyalty-points": ("Loyalty Points", "integer"), "int:cm:lifetime-spend": ("Lifetime Spend", "decimal"),
        "bol:cm:vip": ("VIP", "bool"), "dtz:cm:customer-since": ("Customer Since", "date")}


# --- dates: the day written, no time of day -----------------------------------------------------------
@pytest.mark.parametrize("written, day", [
    ("2021-03-04", (2021, 3, 4)),
    ("2021-03-04T23:30:00-05:00", (2021, 3, 4)),  # March 5th in UTC
    ("2021-03-04T01:22:05+02:00", (2021, 3, 4)),  # March 3rd in UTC
    ("2021-03-04 23:59:59.9999999", (2021, 3, 4)),
    ("2021-03-04T10:22:05Z", (2021, 3, 4)),
])
def test_a_date_with_a_time_of_day_keeps_the_date_written_and_sends_no_time(written, day):
    contact = ContactMapper(ortto_export(), COLUMNS).map(row(Since=written))
    assert contact.document["custom"]["date--Customer--Since"] == "{:04d}-{:02d}-{:02d}".format(*day)
    sent = ortto_fields.person(contact.document, True, None)["fields"]["dtz:cm:customer-since"]
    assert sent == dict(zip(("year", "month", "day"), day, strict=True), timezone="UTC")


def test_dtz_of_a_value_with_a_time_keeps_its_date_and_drops_the_time():
    # (a document planned before dates were kept as written carries a UTC time)
    assert ortto_fields.dtz("2025-06-14T23:22:00Z") == {"year": 2025, "month": 6, "day": 14, "timezone": "UTC"}
    assert ortto_fields.dtz("2025-06-14T00:00:00.123Z") == {"year": 2025, "month": 6, "day": 14, "timezone": "UTC"}


def test_an_unreadable_date_still_rejects_the_row():
    result = ContactMapper(ortto_export(), COLUMNS).map(row(Since="14/06/2025"))
    assert result == Rejection("part-00000.csv", 2, 'column Since is not an ISO 8601 date (custom field "Customer '
                               'Since", type date)', "Ch***@e***.com")


# --- phones: international form -------------------------------------------------------------------
def phone_of(value: str, region: str | None = None, field: str = "MobilePhone") -> Contact | Rejection:
    fields = {**EVERY_FIELD["fields"], field: "Phone"}
    if field == "Phone":
        fields.pop("MobilePhone")
    export = ortto_export(fields=fields, **({"phoneRegion": region} if region else {}))
    return ContactMapper(export, COLUMNS).map(row(Phone=value))


@pytest.mark.parametrize("value, region, field, e164", [
    ("0401 234 567", "AU", "MobilePhone", "+61401234567"),
    ("(03) 9123 4567", "AU", "Phone", "+61391234567"),
    ("020 7946 0018", "GB", "Phone", "+442079460018"),
    ("+61 401 234 567", None, "MobilePhone", "+61401234567"),  # a leading + needs no region
    ("+44 20 7946 0018", "AU", "Phone", "+442079460018"),  # and wins over the region
    ("0011 61 401 234 567", "AU", "MobilePhone", "+61401234567"),  # the region's international prefix
])
def test_an_ortto_phone_is_sent_in_international_form(value, region, field, e164):
    contact = phone_of(value, region, field)
    assert isinstance(contact, Contact) and contact.dropped == ()
    assert contact.document[field] == e164
    assert ortto_fields.person(contact.document, True, None)["fields"]["phn::phone"] == {
        "phone": e164, "parse_with_country_code": True}


@pytest.mark.parametrize("value, region, reason", [
    ("0401 234", "AU", 'column Phone: "0401 234" is not a phone number of region AU; left out, not sent'),
    ("0401 234 567", None, 'column Phone: "0401 234 567" is not a phone number in international form (+ and country '
                           "code; no phoneRegion is set); left out, not sent"),
    ("call me", "AU", 'column Phone: "call me" is not a phone number of region AU; left out, not sent'),
    ("+1 555 0123", "US", 'column Phone: "+1 555 0123" is not a phone number of region US; left out, not sent'),
    ("9" * 60, "AU", f'column Phone: "{"9" * 40}..." is not a phone number of region AU; left out, not sent'),
    ("chris.lee@example.com", "AU",
     'column Phone: "ch***@e***.com" is not a phone number of region AU; left out, not sent'),
])
def test_an_unreadable_phone_is_left_out_with_its_reason_and_the_contact_still_sent(value, region, reason):
    contact = phone_of(value, region)
    assert isinstance(contact, Contact)
    assert contact.dropped == (reason,)
    assert "MobilePhone" not in contact.document
    assert contact.document["FirstName"] == "Chris" and contact.document["custom"]["boolean--VIP"] is True
    assert "phn::phone" not in ortto_fields.person(contact.document, True, None)["fields"]


def test_the_generators_phones_are_all_sent():
    # demos and tests map the generator's Phone column to Ortto: no number of it may be dropped
    export = definition("g", membership="list", fields={"Email": "PrimaryEmail", "Phone": "Phone"}, customFields=[])
    export["destination"]["connection"] = ORTTO["name"]
    (parsed,) = parse_exports({"connections": [ORTTO], "exports": [export]})
    mapper = ContactMapper(parsed, STANDARD_COLUMNS)
    contacts = [mapper.map(Row("p.csv", n, list(values))) for n, values in enumerate(sample_profiles(300))]
    assert all(isinstance(c, Contact) and c.dropped == () for c in contacts)
    assert sum("Phone" in c.document for c in contacts) > 150


def test_an_empty_phone_is_neither_sent_nor_dropped():
    contact = phone_of("  ", "AU")
    assert "MobilePhone" not in contact.document and contact.dropped == ()


def test_the_mapping_seed_changes_with_the_phone_region_and_the_permission():
    plain = ContactMapper(ortto_export(), COLUMNS).record_seed("csv")
    assert ContactMapper(ortto_export(phoneRegion="AU"), COLUMNS).record_seed("csv") != plain
    assert ContactMapper(consent_export(False), COLUMNS).record_seed("csv") != plain
    assert ContactMapper(consent_export({"column": "Consent"}), COLUMNS).record_seed("csv") != plain


# --- new people's email permission ---------------------------------------------------------------
def consent_export(permission):
    export = definition("o", membership="list")
    export.update(EVERY_FIELD)
    export["destination"].update(connection=ORTTO["name"], newPeople={"emailPermission": permission})
    (parsed,) = parse_exports({"connections": [ORTTO], "exports": [export]})
    return parsed


@pytest.mark.parametrize("written, permission", [
    ("true", True), ("Yes", True), ("1", True), (" FALSE ", False), ("no", False), ("0", False), ("", False),
    ("  ", False),  # no consent recorded: none given
])
def test_the_consent_column_gives_each_document_its_permission(written, permission):
    contact = ContactMapper(consent_export({"column": "Consent"}), COLUMNS).map(row(Consent=written))
    assert isinstance(contact, Contact)
    assert contact.document["_permission"] is permission
    plain = ContactMapper(ortto_export(), COLUMNS).map(row(Consent=written))
    assert {k: v for k, v in contact.document.items() if k != "_permission"} == plain.document  # nothing else


def test_an_unreadable_consent_rejects_the_row_naming_the_column():
    result = ContactMapper(consent_export({"column": "Consent"}), COLUMNS).map(row(Consent="maybe"))
    assert result == Rejection("part-00000.csv", 2, "column Consent is not true/false, yes/no or 1/0 (the email "
                               "permission of new people, destination.newPeople.emailPermission)", "Ch***@e***.com")


def test_a_consent_column_the_snapshot_lacks_is_a_mapping_error():
    export = consent_export({"column": "OptIn"})
    with pytest.raises(MappingError) as caught:
        ContactMapper(export, COLUMNS)
    assert caught.value.problems == ['export "o": destination.newPeople.emailPermission is mapped to column "OptIn", '
                                     "which the snapshot does not have"]


@pytest.mark.parametrize("permission", [False, "ortto-default"])
def test_only_the_consent_column_mode_puts_a_permission_in_the_document(permission):
    contact = ContactMapper(consent_export(permission), COLUMNS).map(row(Consent="yes"))
    assert "_permission" not in contact.document


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

