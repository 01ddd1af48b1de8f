"""The export definitions document: what it accepts, and the one message that lists every mistake."""

from __future__ import annotations

import copy
import json

import pytest
from azure.core.exceptions import ResourceNotFoundError
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.source.export_config import (
    PLAN_RATES,
    Connection,
    CustomField,
    ExportConfigError,
    load_exports,
    parse_exports,
)

EXPORT = {
    "name": "high-value", "enabled": True, "dataTransferAcknowledged": True,
    "source": {"connection": "EXPORT_STORAGE", "container": "ciexports", "prefix": "", "segment": "HighValueSegment"},
    "destination": {"membership": "list", "list": "High value customers", "onLeave": "remove"},
    "fields": {"Email": "PrimaryEmail", "FirstName": "FirstName", "LastName": "LastName", "Company": "CompanyName"},
    "customFields": [{"name": "Loyalty Points", "type": "integer", "column": "LoyaltyPoints"}],
    "maxProfiles": 100000,
    "maxRemovalPercent": 20,
}
MINIMAL = {"name": "lapsed", "source": {"container": "ciexports", "segment": "LapsedBuyers"},
           "destination": {"membership": "field", "field": "In Lapsed Buyers"}, "fields": {"Email": "EmailAddress"}}


def document(*exports: dict) -> dict:
    return {"exports": [copy.deepcopy(e) for e in exports]}


def problems_of(doc) -> list[str]:
    with pytest.raises(ExportConfigError) as caught:
        parse_exports(doc)
    return caught.value.problems


def test_full_definition_is_read_with_every_attribute():
    (export,) = parse_exports(document(EXPORT))
    assert (export.name, export.enabled, export.acknowledged) == ("high-value", True, True)
    assert (export.connection, export.container, export.prefix, export.segment) == (
        "EXPORT_STORAGE", "ciexports", "", "HighValueSegment")
    assert (export.membership, export.list, export.field, export.on_leave) == (
        "list", "High value customers", None, "remove")
    assert export.fields == EXPORT["fields"]
    assert export.custom_fields == (CustomField("Loyalty Points", "integer", "LoyaltyPoints"),)
    assert export.custom_fields[0].key == "integer--Loyalty--Points"
    assert export.max_profiles == 100000
    assert export.membership_key is None


def test_defaults_fill_what_the_document_leaves_out():
    (export,) = parse_exports(document(MINIMAL))
    assert export.enabled is True and export.acknowledged is False
    assert (export.connection, export.prefix, export.on_leave, export.max_profiles) == (
        "EXPORT_STORAGE", "", "remove", 100000)
    assert export.custom_fields == ()


def test_field_mode_sends_membership_as_a_typed_boolean_key():
    (export,) = parse_exports(document(dict(MINIMAL, destination={"membership": "field",
                                                                    "field": "In High  Value Segment"})))
    assert export.membership_key == "boolean--In--High--Value--Segment"


def test_public_view_has_the_document_shape_and_parses_back_to_the_same_definition():
    exports = parse_exports(document(EXPORT, MINIMAL))
    # (the account it sends to is shown even when the document leaves it to the default)
    assert exports[0].public() == {**EXPORT, "destination": {"connection": "default", **EXPORT["destination"]}}
    assert parse_exports({"exports": [e.public() for e in exports]}) == exports
    json.dumps([e.public() for e in exports])  # plain JSON


def test_document_may_be_text_or_bytes_with_a_byte_order_mark():
    text = json.dumps(document(EXPORT))
    assert parse_exports(text) == parse_exports(b"\xef\xbb\xbf" + text.encode())


@pytest.mark.parametrize("change, problem", [
    (lambda e: e["fields"].pop("Email"),
     'exports[0] "high-value": fields must map "Email" to the column holding the email address (it is required)'),
    (lambda e: e["customFields"][0].update(type="int"),
     'exports[0] "high-value": customFields[0].type must be one of "string", "text", "integer", "float", "boolean", '
     '"date", got "int"'),
    (lambda e: e.update(maxProfiles=-5),
     'exports[0] "high-value": maxProfiles must be a positive whole number, got -5'),
    (lambda e: e.update(maxProfiles=0), 'exports[0] "high-value": maxProfiles must be a positive whole number, got 0'),
    (lambda e: e.update(maxProfiles="100"),
     'exports[0] "high-value": maxProfiles must be a positive whole number, got "100"'),
    (lambda e: e.update(maxProfile=10),
     'exports[0] "high-value": maxProfile is not a known key (did you mean "maxProfiles"?); known keys: name, enabled, '
     "dataTransferAcknowledged, source, destination, fields, customFields, maxProfiles, maxRemovalPercent, "
     "phoneRegion"),
    (lambda e: e.update(maxRemovalPercent=120),
     'exports[0] "high-value": maxRemovalPercent must be a number from 0 to 100, got 120'),
    (lambda e: e.update(maxRemovalPercent=True),
     'exports[0] "high-value": maxRemovalPercent must be a number from 0 to 100, got true'),
    (lambda e: e["source"].update(Segment="X"),
     'exports[0] "high-value": source.Segment is not a known key (did you mean "segment"?); known keys: connection, '
     "container, prefix, segment"),
    (lambda e: e.update(name="../x"),
     'exports[0] "../x": name must be 1-63 lower-case letters, digits or hyphens, starting with a letter or digit '
     '(it appears in URLs and table keys), got "../x"'),
    (lambda e: e.update(name="High-Value"),
     'exports[0] "High-Value": name must be 1-63 lower-case letters, digits or hyphens, starting with a letter or '
     'digit (it appears in URLs and table keys), got "High-Value"'),
    (lambda e: e.pop("name"), "exports[0]: name is required"),
    (lambda e: e["destination"].update(membership="lists"),
     'exports[0] "high-value": destination.membership must be "list" or "field", got "lists"'),
    (lambda e: e["destination"].pop("list"), 'exports[0] "high-value": destination.list is required'),
    (lambda e: e.update(destination={"membership": "field"}), 'exports[0] "high-value": destination.field is required'),
    (lambda e: e["destination"].update(field="In Segment"),
     'exports[0] "high-value": destination.field is only used when membership is "field"; remove it or change the '
     "membership"),
    (lambda e: e["destination"].update(onLeave="delete"),
     'exports[0] "high-value": destination.onLeave must be "remove" or "keep", got "delete"'),
    (lambda e: e["fields"].update(unsubscribed="Unsub"),
     'exports[0] "high-value": fields.unsubscribed cannot be mapped: this app never changes a contact\'s subscription'),
    (lambda e: e["source"].update(segment=""), 'exports[0] "high-value": source.segment must not be empty'),
    (lambda e: e["fields"].update(Email="  "), 'exports[0] "high-value": fields.Email must not be empty'),
    (lambda e: e.update(enabled="yes"), 'exports[0] "high-value": enabled must be true or false, got "yes"'),
    (lambda e: e.update(dataTransferAcknowledged="true"),
     'exports[0] "high-value": dataTransferAcknowledged must be true or false, got "true"'),
    (lambda e: e.update(fields=["Email"]), 'exports[0] "high-value": fields must be an object, got a list'),
    (lambda e: e["customFields"].append({"name": "loyalty  points", "type": "float", "column": "X"}),
     'exports[0] "high-value": customFields[1].name "loyalty  points" is already defined by customFields[0]'),
    (lambda e: e["source"].update(connection="DefaultEndpointsProtocol=https;AccountName=x"),
     'exports[0] "high-value": source.connection must name an app setting (letters, digits, underscores), not hold a '
     'connection string or URL; got "DefaultEndpointsProtocol=https;AccountName=x"'),
    (lambda e: e["source"].update(container="CI_Exports"),
     'exports[0] "high-value": source.container is not a valid blob container name (3-63 lower-case letters, digits '
     'and single hyphens), got "CI_Exports"'),
    (lambda e: e.pop("source"), 'exports[0] "high-value": source is required (an object)'),
    (lambda e: e.update(destination={"membership": "field", "field": "In Segment"},
                        customFields=[{"name": "In  Segment", "type": "boolean", "column": "X"}]),
     'exports[0] "high-value": destination.field is also the name of a boolean custom field; the membership field '
     "needs a name of its own"),
])
def test_each_mistake_is_named_with_its_export_and_json_path(change, problem):
    export = copy.deepcopy(EXPORT)
    change(export)
    assert problems_of(document(export)) == [problem]


def test_duplicate_export_names_are_refused():
    assert problems_of(document(EXPORT, MINIMAL, EXPORT)) == [
        'exports[2] "high-value": name is already the name of exports[0]; export names must be unique']


def test_duplicate_export_names_are_refused_once_without_a_list_clash_on_top():
    assert len(problems_of(document(EXPORT, EXPORT))) == 1


@pytest.mark.parametrize("first, second, path", [
    ({"membership": "list", "list": "High value customers"}, {"membership": "list", "list": "HIGH VALUE customers"},
     "destination.list"),
    ({"membership": "field", "field": "In Lapsed Buyers"}, {"membership": "field", "field": "in lapsed buyers"},
     "destination.field"),
])
def test_two_exports_on_one_list_or_field_are_refused_naming_both(first, second, path):
    one = {**EXPORT, "name": "one", "destination": first}
    two = {**MINIMAL, "name": "two", "destination": second}
    assert problems_of(document(one, MINIMAL | {"name": "other", "destination": {"membership": "list", "list": "x"}},
                                two)) == [
        f'exports[2] "two": {path} is also the {first["membership"]} of exports[0] "one": two exports on one list or '
        "field remove each other's members; give each its own"]


def test_exports_on_different_lists_and_fields_are_accepted():
    lists = [{**EXPORT, "name": f"e{n}", "destination": {"membership": m, m: f"Segment {n}"}}
             for n, m in enumerate(["list", "list", "field", "field"])]
    assert len(parse_exports(document(*lists))) == 4


def test_all_problems_are_reported_at_once_in_one_message():
    broken = copy.deepcopy(EXPORT)
    broken["destination"]["membership"] = "lists"
    broken["maxProfiles"] = -1
    other = dict(copy.deepcopy(MINIMAL), fields={"email": "EmailAddress"})
    with pytest.raises(ExportConfigError) as caught:
        parse_exports(json.dumps(document(broken, other)), source="app setting EXPORTS")
    message = str(caught.value)
    assert message.startswith("app setting EXPORTS: 4 problems in the export definitions:\n")
    assert caught.value.problems == [
        'exports[0] "high-value": destination.membership must be "list" or "field", got "lists"',
        'exports[0] "high-value": maxProfiles must be a positive whole number, got -1',
        'exports[1] "lapsed": fields.email is not an Autopilot standard field (did you mean "Email"?); use one of '
        "Email, FirstName, LastName, Salutation, Company, NumberOfEmployees, Title, Industry, Phone, MobilePhone, Fax, "
        "Website, MailingStreet, MailingCity, MailingState, MailingPostalCode, MailingCountry, LeadSource, Status, "
        "LinkedIn, Twitter, owner_name, or a customFields entry",
        'exports[1] "lapsed": fields must map "Email" to the column holding the email address (it is required)',
    ]
    assert all(p in message for p in caught.value.problems)


def test_text_that_is_not_json_names_the_source_line_and_column():
    with pytest.raises(ExportConfigError) as caught:
        parse_exports('{"exports": [\n  {"name": "x",}\n]}', source="app setting EXPORTS")
    assert str(caught.value) == ("app setting EXPORTS is not valid JSON: Expecting property name enclosed in double "
                                 "quotes at line 2 column 16")


def test_repeated_json_key_is_a_problem_not_a_silent_overwrite():
    text = json.dumps(document(EXPORT)).replace('"maxProfiles": 100000', '"maxProfiles": 5, "maxProfiles": 100000')
    assert problems_of(text) == ['key "maxProfiles" appears twice in one object (JSON keeps only the last)']


@pytest.mark.parametrize("doc, problem", [
    ([], 'the document must be an object {"exports": [...]}, got a list'),
    ({}, '"exports" is required: a list of export definitions'),
    ({"exports": {}}, '"exports" must be a list, got an object'),
    ({"exports": [], "export": []},
     'export is not a known key (did you mean "exports"?); known keys: $schema, connections, exports'),
    ({"exports": ["x"]}, "exports[0]: must be an object, got a string"),
])
def test_document_shape_problems(doc, problem):
    assert problems_of(doc) == [problem]


def test_an_unacknowledged_export_validates_but_may_not_run():
    (export,) = parse_exports(document(MINIMAL))
    with pytest.raises(ExportConfigError) as caught:
        export.check_runnable()
    assert str(caught.value) == (
        'export "lapsed" may not run yet: sending its profiles to Autopilot moves customer data outside the Customer '
        "Insights compliance boundary. Once your Customer Insights admin has agreed to that, set "
        '"dataTransferAcknowledged": true on this export in the export definitions (app setting EXPORTS or the blob '
        "named by EXPORTS_BLOB).")
    parse_exports(document(EXPORT))[0].check_runnable()


# --- Ortto: the plan's rate, phone regions, new people's email permission -----------------------------
ORTTO = {"name": "ortto-au", "platform": "ortto", "region": "au", "secretName": "ortto-key"}
ORTTO_EXPORT = {**MINIMAL, "destination": {"connection": "ortto-au", "membership": "list", "list": "Lapsed"}}


def ortto_document(connection: dict | None = None, **export) -> dict:
    """One export (ORTTO_EXPORT changed by `export`; `destination` keys are added to its destination) on one
    connection (ORTTO unless given)."""
    definition = copy.deepcopy(ORTTO_EXPORT)
    definition["destination"].update(export.pop("destination", {}))
    return {"connections": [connection or ORTTO], "exports": [{**definition, **export}]}


def resolved_rate(connection: dict) -> float:
    (export,) = parse_exports(ortto_document(connection))
    return export.account.resolved("app-key", "https://autopilot.example", 2.0).rate


@pytest.mark.parametrize("plan, rate", [("free", 1.0), ("campaigns", 5.0), ("professional", 10.0),
                                        ("business", 30.0), (None, 10.0)])
def test_an_ortto_connection_takes_its_rate_from_its_plan(plan, rate):
    connection = dict(ORTTO, plan=plan) if plan else ORTTO
    assert resolved_rate(connection) == rate == PLAN_RATES.get(plan or "professional")
    assert resolved_rate(dict(ORTTO, requestsPerSecond=4)) == 4.0  # a rate of its own, without a plan, is kept


def test_the_plan_survives_the_run_record_and_the_public_view():
    (export,) = parse_exports(ortto_document(dict(ORTTO, plan="campaigns")))
    assert export.account.plan == "campaigns"
    assert export.account.public()["plan"] == "campaigns"
    assert Connection.from_text(export.account.text()) == export.account
    assert Connection.from_text(export.account.text()).resolved("k", "u", 2.0).rate == 5.0


@pytest.mark.parametrize("connection, problem", [
    (dict(ORTTO, plan="business", requestsPerSecond=30),
     "connections[0]: plan and requestsPerSecond both set the rate: give only one (the plans' rates, requests/s: "
     "free 1, campaigns 5, professional 10, business 30)"),
    (dict(ORTTO, plan="Business"),
     'connections[0]: plan must be one of "free", "campaigns", "professional", "business", got "Business"'),
    ({"name": "ortto-au", "secretName": "k", "plan": "free"},
     'connections[0]: plan is only used by an Ortto connection ("platform": "ortto"); an Autopilot connection\'s '
     "rate is requestsPerSecond"),
    ({"name": "ortto-au", "secretName": "k", "phoneRegion": "AU"},
     'connections[0]: phoneRegion is only used by an Ortto connection ("platform": "ortto"): Autopilot\'s contract '
     "documents no phone format, so phones go to it as written"),
    (dict(ORTTO, phoneRegion="au"),
     'connections[0]: phoneRegion must be a country\'s ISO 3166-1 alpha-2 code such as "AU", "GB" or "US" (did you '
     'mean "AU"?), got "au"'),
    (dict(ORTTO, phoneRegion="XX"),
     'connections[0]: phoneRegion must be a country\'s ISO 3166-1 alpha-2 code such as "AU", "GB" or "US", got "XX"'),
    (dict(ORTTO, phoneRegion=61),
     "connections[0]: phoneRegion must be a string, got a number 61"),
])
def test_connection_settings_ortto_cannot_use_are_refused_naming_the_path(connection, problem):
    assert problem in problems_of(ortto_document(connection))


def test_phone_region_comes_from_the_connection_unless_the_export_names_its_own():
    connection = dict(ORTTO, phoneRegion="AU")
    assert parse_exports(ortto_document())[0].phone_region is None
    assert parse_exports(ortto_document(connection))[0].phone_region == "AU"
    (export,) = parse_exports(ortto_document(connection, phoneRegion="GB"))
    assert export.phone_region == "GB"
    assert export.public()["phoneRegion"] == "GB"
    assert parse_exports({"connections": [ORTTO], "exports": [export.public()]}) == (export,)


def test_phone_region_on_an_autopilot_export_is_refused():
    assert problems_of(document(dict(MINIMAL, phoneRegion="AU"))) == [
        'exports[0] "lapsed": phoneRegion only applies to Ortto exports: Autopilot\'s contract documents no phone '
        "format, so phones go to it as written"]
    assert problems_of(ortto_document(phoneRegion="ZZ")) == [
        'exports[0] "lapsed": phoneRegion must be a country\'s ISO 3166-1 alpha-2 code such as "AU", "GB" or "US", '
        'got "ZZ"']


@pytest.mark.parametrize("new_people, permission, column, shown", [
    (None, "ortto-default", None, None),
    ({}, "ortto-default", None, None),
    ({"emailPermission": "ortto-default"}, "ortto-default", None, None),
    ({"emailPermission": False}, "false", None, {"emailPermission": False}),
    ({"emailPermission": {"column": " Consent "}}, "column", "Consent", {"emailPermission": {"column": "Consent"}}),
])
def test_new_peoples_email_permission_is_read_and_shown_in_the_documents_shape(new_people, permission, column, shown):
    destination = {} if new_people is None else {"newPeople": new_people}
    (export,) = parse_exports(ortto_document(destination=destination))
    assert (export.email_permission, export.email_permission_column) == (permission, column)
    assert export.public()["destination"].get("newPeople") == shown
    assert parse_exports({"connections": [ORTTO], "exports": [export.public()]}) == (export,)


PERMISSION = 'exports[0] "lapsed": destination.newPeople.emailPermission'


@pytest.mark.parametrize("new_people, problem", [
    ({"emailPermission": True},
     f'{PERMISSION} must not be true: "ortto-default" already subscribes every new person (Ortto\'s own behaviour), '
     'and true would be the same choice spelt differently; write "ortto-default" or leave emailPermission out'),
    ({"emailPermission": "subscribed"},
     f'{PERMISSION} must be "ortto-default", false or {{"column": "<CSV column>"}}, got "subscribed"'),
    ({"emailPermission": 0}, f'{PERMISSION} must be "ortto-default", false or {{"column": "<CSV column>"}}, got 0'),
    ({"emailPermission": None},
     f'{PERMISSION} must be "ortto-default", false or {{"column": "<CSV column>"}}, got null'),
    ({"emailPermission": {}}, f"{PERMISSION}.column is required"),
    ({"emailPermission": {"column": " "}}, f"{PERMISSION}.column must not be empty"),
    ({"emailPermission": {"column": 3}}, f"{PERMISSION}.column must be a string, got a number 3"),
    ({"emailPermission": {"column": "Consent", "Column": "X"}},
     f'{PERMISSION}.Column is not a known key (did you mean "column"?); known keys: column'),
    ({"emailpermission": False},
     'exports[0] "lapsed": destination.newPeople.emailpermission is not a known key (did you mean '
     '"emailPermission"?); known keys: emailPermission'),
    (False, 'exports[0] "lapsed": destination.newPeople must be an object, got a boolean'),
])
def test_bad_new_people_settings_are_named_with_their_path(new_people, problem):
    assert problems_of(ortto_document(destination={"newPeople": new_people})) == [problem]


@pytest.mark.parametrize("permission", [False, {"column": "Consent"}])
def test_new_peoples_permission_is_refused_on_autopilot(permission):
    export = copy.deepcopy(MINIMAL)
    export["destination"]["newPeople"] = {"emailPermission": permission}
    assert problems_of(document(export)) == [
        f"{PERMISSION} only applies to Ortto exports: Autopilot has no append-only write, so a contact's permission "
        "could not be set for new contacts without changing existing ones; new Autopilot contacts get email "
        "permission"]
    export["destination"]["newPeople"] = {"emailPermission": "ortto-default"}  # what Autopilot does anyway
    assert parse_exports(document(export))[0].email_permission == "ortto-default"


# --- where the document comes from ----------------------------------------------------------------
def no_blob(container: str, path: str) -> bytes:
    raise AssertionError("EXPORTS wins: the blob must not be read")


def test_exports_setting_is_used_when_set():
    exports = load_exports({"EXPORTS": json.dumps(document(EXPORT)), "EXPORTS_BLOB": "config/x.json"}, no_blob)
    assert [e.name for e in exports] == ["high-value"]


def test_exports_blob_is_read_from_host_storage(blob_service, container):
    container.upload_blob("defs/exports.json", json.dumps(document(MINIMAL)).encode())
    read = lambda c, p: blob_service.get_blob_client(c, p).download_blob().readall()
    env = {"EXPORTS": "  ", "EXPORTS_BLOB": f"{container.container_name}/defs/exports.json"}
    assert [e.name for e in load_exports(env, read)] == ["lapsed"]


def test_missing_exports_blob_is_named(blob_service, container):
    read = lambda c, p: blob_service.get_blob_client(c, p).download_blob().readall()
    env = {"EXPORTS_BLOB": f"{container.container_name}/defs/missing.json"}
    with pytest.raises(ExportConfigError) as caught:
        load_exports(env, read)
    assert str(caught.value) == (
        f"app setting EXPORTS_BLOB names blob 'defs/missing.json' in container '{container.container_name}' of the "
        "app's storage, but it does not exist: upload the export definitions there or fix the setting")


def test_problems_in_the_blob_name_the_blob():
    read = lambda c, p: b'{"exports": [{"name": "x"}]'
    with pytest.raises(ExportConfigError, match=r"^blob config/exports.json \(EXPORTS_BLOB\) is not valid JSON"):
        load_exports({"EXPORTS_BLOB": "config/exports.json"}, read)


@pytest.mark.parametrize("env, message", [
    ({}, "no export definitions: set app setting EXPORTS to the JSON document, or EXPORTS_BLOB to <container>/<path> "
         "of a blob holding it in the app's own storage (AzureWebJobsStorage)"),
    ({"EXPORTS_BLOB": "just-a-container"},
     "app setting EXPORTS_BLOB must be <container>/<path>, got 'just-a-container'"),
])
def test_without_a_usable_setting_the_message_says_what_to_set(env, message):
    def missing(container: str, path: str) -> bytes:
        raise ResourceNotFoundError("gone")

    with pytest.raises(ExportConfigError) as caught:
        load_exports(env, missing)
    assert str(caught.value) == message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["", "list", "field", "x", "../a", "Email",
                                                                      "ortto", "AU", "au", "free", "ortto-default"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["name", "source", "destination", "fields", "Email", "membership", "list", "field",
                         "segment", "container", "customFields", "type", "column", "maxProfiles", "exports", "zz",
                         "newPeople", "emailPermission", "phoneRegion", "plan", "connections", "platform"]),
        inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(json_values, st.fixed_dictionaries({"exports": st.lists(json_values, max_size=3)})))
def test_any_json_gives_definitions_or_an_export_config_error_never_a_crash(doc):
    try:
        parse_exports(doc)
    except ExportConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
