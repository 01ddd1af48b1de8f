"""Rows to Autopilot contacts: field mapping, typed custom fields, email validation, masking, and speed."""

from __future__ import annotations

from pathlib import Path

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.source.cdm_reader import Row, find_snapshot, read_rows
from shared.source.contacts import Contact, ContactMapper, MappingError, Rejection, email_problem, mask_email
from shared.source.export_config import ExportConfigError, parse_exports
from tools.generate_export import write_export

SAMPLE = Path(__file__).resolve().parent / "fixtures" / "ci-export"
COLUMNS = ("Id", "Mail", "First", "Points", "Score", "Vip", "Since", "Note")


def export_with(fields: dict, custom: list | None = None, name: str = "test-export"):
    return parse_exports({"exports": [{
        "name": name, "source": {"container": "ciexports", "segment": "Seg"},
        "destination": {"membership": "list", "list": "L"}, "fields": fields, "customFields": custom or []}]})[0]


TYPED = export_with({"Email": "Mail", "FirstName": "First"}, [
    {"name": "Points", "type": "integer", "column": "Points"}, {"name": "Score", "type": "float", "column": "Score"},
    {"name": "Is VIP", "type": "boolean", "column": "Vip"},
    {"name": "Customer Since", "type": "date", "column": "Since"},
    {"name": "Note", "type": "string", "column": "Note"},
])


def row(*values: str, number: int = 7) -> Row:
    return Row("p.csv", number, list(values))


def typed(**overrides: str) -> Contact | Rejection:
    values = dict(zip(COLUMNS, ["1", "ana@example.com", "Ana", "", "", "", "", ""], strict=True), **overrides)
    return ContactMapper(TYPED, COLUMNS).map(row(*values.values()))


# --- the sample export (tests/fixtures/ci-export) ------------------------------------------------
def test_the_sample_export_maps_to_four_contacts_and_two_rejections(container):
    for path in SAMPLE.rglob("*"):
        if path.is_file():
            container.upload_blob(path.relative_to(SAMPLE).as_posix(), path.read_bytes())
    export = export_with({"Email": "EmailAddress", "FirstName": "FirstName", "LastName": "LastName",
                          "MailingCity": "City"},
                         [{"name": "Last Purchase", "type": "date", "column": "LastPurchase"},
                          {"name": "Lifetime Value", "type": "float", "column": "LifetimeValue"}])
    snapshot = find_snapshot(container, "", "LapsedBuyers")
    mapper = ContactMapper(export, snapshot.columns)
    results = [mapper.map(r) for r in read_rows(container, snapshot)]
    partition = snapshot.partitions[0].name
    assert results == [
        Contact("maria.lopez@fabrikam.example", {
            "Email": "maria.lopez@fabrikam.example", "FirstName": "María", "LastName": "López",
            "MailingCity": "Sevilla",
            "custom": {"date--Last--Purchase": "2025-06-14T10:22:00Z", "float--Lifetime--Value": 1840.5}}),
        Contact("ken.obi@contoso.example", {
            "Email": "KEN.OBI@Contoso.example", "FirstName": "Ken", "LastName": "Obi", "MailingCity": "Lagos",
            "custom": {"date--Last--Purchase": "2025-02-01T08:00:00Z", "float--Lifetime--Value": 312.0}}),
        Rejection(partition, 3, "no email in column EmailAddress", ""),
        Contact("p.schmidt@northwind.example", {
            "Email": "p.schmidt@northwind.example", "FirstName": "Peter", "MailingCity": "Köln",
            "custom": {"date--Last--Purchase": "2025-04-09T12:00:00Z"}}),
        Rejection(partition, 5, "invalid email in column EmailAddress: An email address must have an @-sign.",
                  "no***"),
        Contact("jo@tailspin.example", {
            "Email": "jo@tailspin.example", "FirstName": "Jo", "LastName": "Ng", "MailingCity": "Hong Kong, Kowloon",
            "custom": {"date--Last--Purchase": "2025-05-05T05:05:05Z", "float--Lifetime--Value": 2010.0}}),
    ]


# --- documents ----------------------------------------------------------------------------------
def test_email_is_trimmed_the_key_lower_cased_and_empty_values_left_out():
    mapped = typed(Mail="  Ana.Silva@Example.COM ", First="   ")
    assert mapped == Contact("ana.silva@example.com", {"Email": "Ana.Silva@Example.COM"})


@pytest.mark.parametrize("column, raw, key, value", [
    ("Points", "12", "integer--Points", 12),
    ("Points", "-3", "integer--Points", -3),
    ("Points", "12.00", "integer--Points", 12),
    ("Score", "1e3", "float--Score", 1000.0),
    ("Score", " .5 ", "float--Score", 0.5),
    ("Vip", "Yes", "boolean--Is--VIP", True),
    ("Vip", "FALSE", "boolean--Is--VIP", False),
    ("Vip", "0", "boolean--Is--VIP", False),
    ("Since", "2025-06-14", "date--Customer--Since", "2025-06-14"),
    ("Since", "2025-06-14T12:22:00+02:00", "date--Customer--Since", "2025-06-14T10:22:00Z"),
    ("Since", "2025-06-14 10:22", "date--Customer--Since", "2025-06-14T10:22:00Z"),
    ("Since", "2025-06-14T10:22:00.1234567Z", "date--Customer--Since", "2025-06-14T10:22:00.123Z"),
    ("Note", 'said "hi", left', "string--Note", 'said "hi", left'),
])
def test_custom_values_convert_by_type(column, raw, key, value):
    mapped = typed(**{column: raw})
    assert isinstance(mapped, Contact)
    assert mapped.document["custom"] == {key: value}
    assert type(mapped.document["custom"][key]) is type(value)


@pytest.mark.parametrize("column, raw, reason", [
    ("Points", "12.5", 'column Points is not a whole number (custom field "Points", type integer)'),
    ("Points", "1_000", 'column Points is not a whole number (custom field "Points", type integer)'),
    ("Score", "nan", 'column Score is not a number (custom field "Score", type float)'),
    ("Score", "1e999", 'column Score is not a number (custom field "Score", type float)'),
    ("Vip", "maybe", 'column Vip is not true/false, yes/no or 1/0 (custom field "Is VIP", type boolean)'),
    ("Since", "14/06/2025", 'column Since is not an ISO 8601 date (custom field "Customer Since", type date)'),
])
def test_a_value_that_cannot_convert_rejects_the_row_naming_column_and_type(column, raw, reason):
    assert typed(**{column: raw}) == Rejection("p.csv", 7, reason, "a***@e***.com")


@pytest.mark.parametrize("field", ["Phone", "MobilePhone"])
@pytest.mark.parametrize("written", ["0401 234 567", "0401 234", "+1 555 0123", "call me after 5"])
def test_autopilot_phones_are_sent_as_written(field, written):
    # Autopilot's contract documents no phone format: nothing is reformatted, nothing dropped
    export = export_with({"Email": "Mail", field: "Note"})
    contact = ContactMapper(export, COLUMNS).map(row("1", "ana@example.com", "", "", "", "", "", f" {written} "))
    assert contact == Contact("ana@example.com", {"Email": "ana@example.com", field: written})
    assert contact.dropped == ()


def test_autopilot_dates_still_become_utc_even_across_midnight():
    # (Ortto's keep the day written: tests/test_ortto_mapping.py)
    mapped = typed(Since="2025-06-14T23:30:00-05:00")
    assert mapped.document == {"Email": "ana@example.com", "FirstName": "Ana",
                               "custom": {"date--Customer--Since": "2025-06-15T04:30:00Z"}}


def test_missing_and_invalid_emails_are_rejected_with_the_reason():
    assert typed(Mail=" ") == Rejection("p.csv", 7, "no email in column Mail", "")
    assert typed(Mail="ana@@example.com") == Rejection(
        "p.csv", 7, "invalid email in column Mail: The part after the @-sign contains invalid characters: '@'.",
        "an***@e***.com")
    assert typed(Mail="ana@example.test").reason == (
        "invalid email in column Mail: The part after the @-sign is a special-use or reserved name that cannot be "
        "used with email.")


def test_a_mapped_column_missing_from_the_snapshot_is_a_mapping_error():
    export = export_with({"Email": "PrimaryEmail", "FirstName": "First"},
                         [{"name": "Points", "type": "integer", "column": "LoyaltyPoints"}], name="high-value")
    with pytest.raises(MappingError) as caught:
        ContactMapper(export, COLUMNS)
    assert isinstance(caught.value, ExportConfigError)
    assert str(caught.value) == (
        'export "high-value": fields.Email is mapped to column "PrimaryEmail", which the snapshot does not have\n'
        'export "high-value": customFields "Points" is mapped to column "LoyaltyPoints", which the snapshot does not '
        "have\ncolumns in the snapshot: Id, Mail, First, Points, Score, Vip, Since, Note")
    assert len(caught.value.problems) == 2


def test_an_export_of_only_invalid_emails_gives_only_rejections(container):
    junk = [(str(i), email, "X") for i, email in enumerate(["", "nobody", "a@b", "x@@y.com", "@example.com"])]
    write_export(container, junk, columns=("Id", "Email", "Name"), time="2026-03-02T04:15:00Z")
    snapshot = find_snapshot(container, "", "HighValueSegment")
    mapper = ContactMapper(export_with({"Email": "Email"}), snapshot.columns)
    results = [mapper.map(r) for r in read_rows(container, snapshot)]
    assert [type(r) for r in results] == [Rejection] * 5
    assert [r.reason for r in results] == [
        "no email in column Email",
        "invalid email in column Email: An email address must have an @-sign.",
        "invalid email in column Email: The part after the @-sign is not valid. It should have a period.",
        "invalid email in column Email: The part after the @-sign contains invalid characters: '@'.",
        "invalid email in column Email: There must be something before the @-sign.",
    ]


# --- masking ------------------------------------------------------------------------------------
@pytest.mark.parametrize("email, masked", [
    ("maria.lopez@fabrikam.example", "ma***@f***.example"),
    ("  KEN.OBI@Contoso.example ", "KE***@C***.example"),
    ("ab@x.com", "a***@x***.com"),
    ("a@mail.example.co.uk", "***@m***.uk"),
    ("not-an-email", "no***"),
    ("x", "***"),
    ("user@localhost", "us***@l***"),
    ("\n\t@\x00.x", "***@?***.x"),
    ("", ""),
    (None, ""),
])
def test_mask_email_never_shows_the_whole_address(email, masked):
    assert mask_email(email) == masked


@given(st.emails())
def test_a_masked_address_is_never_the_address(email):
    masked = mask_email(email)
    assert "***" in masked and email.lower() not in masked.lower()


# --- the fast email check agrees with email_validator -------------------------------------------
def validator_problem(email: str) -> str | None:
    try:
        validate_email(email, check_deliverability=False)
    except EmailNotValidError as exc:
        return str(exc)
    return None


addresses = st.builds(
    lambda local, domain, tld: f"{local}@{domain}{tld}",
    st.text(st.sampled_from(list("aZ09._-+'\"é ()<>@")), max_size=70),
    st.text(st.sampled_from(list("aZ09.-_é[]")), max_size=70),
    st.sampled_from(["", ".com", ".test", ".example", ".c0m", ".xn--p1ai", ".COM"]),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(addresses, st.emails(), st.text(max_size=40)))
@example("a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ".com")
@example("user@xn--bcher-kva.example")
@example("user@EXAMPLE.localhost")
@example("a@123.456")
@example("info@example.com")
def test_the_fast_email_check_gives_email_validators_verdict(email):
    email = email.strip()
    assert email_problem(email) == validator_problem(email)


def test_addresses_inside_free_text_are_masked():
    from shared.source.contacts import mask_emails_in

    text = mask_emails_in('Invalid Email "maria.lopez@fabrikam.example". Also ken@contoso.example, done')
    assert "maria.lopez@" not in text and "ken@contoso" not in text
    assert text == 'Invalid Email "ma***@f***.example". Also k***@c***.example, done'
