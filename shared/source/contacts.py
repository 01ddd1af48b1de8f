"""Turn a snapshot row into the Autopilot contact it describes, or into the reason it cannot be sent.

Empty values are left out of the contact document: Autopilot keeps fields a request omits, so a profile
with a gap never blanks out data someone entered in Autopilot.

For an Ortto export a few values take Ortto's form here, since they decide what a record maps to: a phone
number becomes international (E.164, read with the export's phoneRegion), a date keeps the day written in the
CSV, and in consent-column mode the document carries `_permission` (the email permission a new person gets).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import DOT_ATOM_TEXT  # the library's own rule for plain ASCII local parts

from shared.source import ortto_fields
from shared.source.cdm_reader import Row
from shared.source.export_config import ExportConfigError, ExportDefinition

PERMISSION = "_permission"  # a document's key for the email permission a new person gets (Ortto; not a field)
EMAIL_MAX_LENGTH = 254
# Part of every record digest's key: change it with any rule that changes what a row maps to (CSV parsing,
# validation, conversions, the document's form or its fingerprint), so no record is taken as unchanged across it.
MAPPING_RULES = "2026-12-07"
_HOSTNAME = re.compile(r"[A-Za-z0-9.-]+")
_INTEGER = re.compile(r"[+-]?\d+(?:\.0*)?", re.ASCII)  # "12.0" is 12; "12.5" is not an integer
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
PHONE_FIELDS = ("Phone", "MobilePhone")  # Ortto's one phone field (phn::phone), which needs international form
PERMISSION_KEY = "_permission"  # a document's email permission for a new Ortto person (consent-column mode only)
SHOWN_PHONE_MAX = 40  # characters of an unreadable number a reason quotes


def mask_email(email: str) -> str:
    """A log-safe hint of an address: `maria.lopez@fabrikam.example` → `ma***@f***.example`.

    At most two characters of the local part (fewer for short ones), the first character of the domain and its
    top-level label; never the whole address. Anything that is not an address is masked the same way.
    """
    text = email.strip() if isinstance(email, str) else ""
    if not text:
        return ""
    local, at, domain = text.rpartition("@")
    if not at:
        return f"{_visible(text[:min(2, len(text) // 2)])}***"
    masked = f"{_visible(local[:min(2, len(local) // 2)])}***@{_visible(domain[:1])}***"
    labels = domain.split(".")
    return f"{masked}.{_visible(labels[-1][:24])}" if len(labels) > 1 and labels[-1] else masked


_EMAIL_LIKE = re.compile(r"[^\s\"'<>(),;:]+@[^\s\"'<>(),;:]+")


def mask_emails_in(text: str) -> str:
    """Mask every address-like word of a free text (Autopilot's error messages may quote the contact)."""
    return _EMAIL_LIKE.sub(lambda m: mask_email(m.group(0).rstrip(".")), text)


def _visible(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def email_problem(email: str) -> str | None:
    """email_validator's reason why `email` (already trimmed) is not a valid address, or None; no DNS.

    Fast path, same verdicts: a plain ASCII address's local part is checked with the library's own pattern
    and its domain with validate_email once per domain (cached), since domains repeat across a segment.
    Everything else goes through validate_email whole.
    """
    local, at, domain = email.partition("@")
    if (at and len(email) <= EMAIL_MAX_LENGTH and DOT_ATOM_TEXT.match(local) and _HOSTNAME.fullmatch(domain)
            and "xn--" not in domain.lower()):  # punycode would grow when normalized: let the library measure it
        return _domain_problem(domain)
    return _problem(email)


@lru_cache(maxsize=8192)
def _domain_problem(domain: str) -> str | None:
    return _problem(f"a@{domain}")


def _problem(email: str) -> str | None:
    try:
        validate_email(email, check_deliverability=False)
    except EmailNotValidError as exc:
        return str(exc)
    return None


# --- custom field values --------------------------------------------------------------------------
def to_integer(value: str) -> int:
    if not _INTEGER.fullmatch(value):
        raise ValueError(value)
    return int(value.partition(".")[0])


def to_float(value: str) -> float:
    number = float(value) if _FLOAT.fullmatch(value) else math.nan
    if not math.isfinite(number):  # NaN and infinities are not JSON
        raise ValueError(value)
    return number


def to_boolean(value: str) -> bool:
    return _BOOLEANS[value.lower()]  # KeyError for anything else: map() turns it into a rejection


def to_date(value: str) -> str:
    """Lenient ISO 8601: a date stays a date (`2025-06-14`); a time becomes UTC (`2025-06-14T10:22:00Z`).

    A time without a zone is taken as UTC (Customer Insights documents none); fractions are kept to
    milliseconds when present.
    """
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        pass
    moment = datetime.fromisoformat(value)
    moment = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    spec = "milliseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def to_written_date(value: str) -> str:
    """The date as written (`2025-06-14T23:30:00-05:00` → `2025-06-14`): Ortto's date fields hold a day and no time
    of day (`dtz`: docs/api-contracts.md) and the day the CSV shows is the one a reader of the export means, not the day
    the time falls on in UTC. The time is dropped: an operator who wants it kept maps the column as a "string"
    custom field instead. Accepts what to_date accepts."""
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        return datetime.fromisoformat(value).date().isoformat()


def to_e164(value: str, region: str | None) -> str:
    """A phone number in international form (`0401 234 567` with region AU → `+61401234567`): Ortto files a number
    by the country code it starts with, so a local one must be turned first. ValueError when it cannot be read as a
    valid number: no region and no leading +, not a number, or not a valid one of its region."""
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        raise ValueError(value) from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError(value)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def phone_dropped(column: str, value: str, region: str | None) -> str:
    """Why a phone number was left out of a contact (the contact is still sent): quotes at most SHOWN_PHONE_MAX
    characters of it, never an address someone typed into the column."""
    shown = value if len(value) <= SHOWN_PHONE_MAX else value[:SHOWN_PHONE_MAX] + "..."
    shown = mask_emails_in(json.dumps(shown, ensure_ascii=False))
    where = f"of region {region}" if region else "in international form (+ and country code; no phoneRegion is set)"
    return f"column {column}: {shown} is not a phone number {where}; left out, not sent"


CONVERTERS: dict[str, Callable[[str], Any]] = {
    "string": str, "text": str, "integer": to_integer, "float": to_float, "boolean": to_boolean, "date": to_date,
}
# Ortto's: a date keeps the day written (to_written_date); everything else converts as for Autopilot.
ORTTO_CONVERTERS = {**CONVERTERS, "date": to_written_date}
_EXPECTED = {"integer": "a whole number", "float": "a number", "boolean": "true/false, yes/no or 1/0",
             "date": "an ISO 8601 date", "string": "text", "text": "text"}


# --- mapping --------------------------------------------------------------------------------------
class MappingError(ExportConfigError):
    """The export maps a field to a column the snapshot does not have."""


@dataclass(frozen=True, slots=True)
class Contact:
    key: str  # the normalised email: trimmed, lower-cased
    document: dict
    dropped: tuple[str, ...] = ()  # one reason per value left out of the document (the contact is still sent)


@dataclass(frozen=True, slots=True)
class Rejection:
    partition: str
    row: int
    reason: str
    email: str = ""  # masked


class ContactMapper:
    """Maps rows of one snapshot for one export; column positions are resolved once, here."""

    def __init__(self, export: ExportDefinition, columns: Sequence[str]):
        index: dict[str, int] = {}
        for position, column in enumerate(columns):
            index.setdefault(column, position)
        self._check_columns(export, columns, index)
        self.email_column = export.fields["Email"]
        self._email = index[self.email_column]
        self._ortto = export.account.ortto
        # Ortto's phone is read into international form (Autopilot's contract documents no format: as written).
        self._region = export.phone_region if self._ortto else None
        self._fields = [(key, index[column], self._ortto and key in PHONE_FIELDS)
                        for key, column in export.fields.items() if key != "Email"]
        converters = ORTTO_CONVERTERS if self._ortto else CONVERTERS
        self._custom = [
            (field.key, index[field.column], converters[field.type],
             f"column {field.column} is not {_EXPECTED[field.type]} (custom field \"{field.name}\", type {field.type})")
            for field in export.custom_fields
        ]
        self._permission = self._permission_column(export, index)
        # Ortto's limits, checked here so a value it would refuse is a rejected row, never a refused request.
        self._types = {field.key: (field.type, field.column, field.name) for field in export.custom_fields}
        self._columns_of = dict(export.fields)
        self._mapping = [MAPPING_RULES, list(export.fields.items()),
                         [(f.key, f.column, f.type) for f in export.custom_fields], export.account.platform,
                         self._region, export.email_permission, export.email_permission_column]
        self._columns = list(columns)

    @staticmethod
    def _permission_column(export: ExportDefinition, index: dict[str, int]) -> tuple[int, str] | None:
        """(position, reason if unreadable) of the consent column, in consent-column mode."""
        column = export.email_permission_column
        if export.email_permission != "column" or not column:
            return None
        return index[column], (f"column {column} is not {_EXPECTED['boolean']} (the email permission of new people, "
                               "destination.newPeople.emailPermission)")

    @staticmethod
    def _check_columns(export: ExportDefinition, columns: Sequence[str], index: dict[str, int]) -> None:
        if "Email" not in export.fields:
            raise MappingError(f'export "{export.name}": fields maps no "Email" column; the email is required')
        wanted = [(f"fields.{key}", column) for key, column in export.fields.items()]
        wanted += [(f'customFields "{field.name}"', field.column) for field in export.custom_fields]
        if export.email_permission == "column" and export.email_permission_column:
            wanted.append(("destination.newPeople.emailPermission", export.email_permission_column))
        problems = [f'export "{export.name}": {label} is mapped to column "{column}", which the snapshot does not have'
                    for label, column in wanted if column not in index]
        if problems:
            available = ", ".join(columns)
            raise MappingError("\n".join(problems) + f"\ncolumns in the snapshot: {available}", problems)

    def record_seed(self, settings) -> int:
        """The seed of the digests of records read with these CSV settings (cdm_reader.CsvSettings) and mapped
        by this mapper: records with equal digests under one seed map to equal documents, so a record whose digest
        was acknowledged needs no parsing or mapping. Everything a record's document depends on is in it."""
        text = json.dumps([self._mapping, self._columns, repr(settings)]).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest())

    def map(self, row: Row) -> Contact | Rejection:
        values = row.values
        email = values[self._email].strip()
        if not email:
            return Rejection(row.partition, row.number, f"no email in column {self.email_column}")
        problem = email_problem(email)
        if problem:
            return Rejection(row.partition, row.number, f"invalid email in column {self.email_column}: {problem}",
                             mask_email(email))
        document: dict[str, Any] = {"Email": email}
        dropped: list[str] = []
        for key, position, phone in self._fields:
            value = values[position].strip()
            if value and phone:
                try:
                    value = to_e164(value, self._region)
                except ValueError:  # one unreadable number must not keep the rest of the contact from Ortto
                    dropped.append(phone_dropped(self._columns[position], value, self._region))
                    continue
            if value:
                document[key] = value
        if self._custom:
            custom = {}
            for key, position, convert, reason in self._custom:
                value = values[position].strip()
                if value:
                    try:
                        custom[key] = convert(value)
                    except (ValueError, KeyError, OverflowError):
                        return Rejection(row.partition, row.number, reason, mask_email(email))
            if custom:
                document["custom"] = custom
        if self._ortto and (problem := self._ortto_problem(document)):
            return Rejection(row.partition, row.number, problem, mask_email(email))
        if self._permission:
            position, reason = self._permission
            value = values[position].strip()
            try:  # empty: no consent recorded, so none given
                document[PERMISSION_KEY] = to_boolean(value) if value else False
            except KeyError:
                return Rejection(row.partition, row.number, reason, mask_email(email))
        return Contact(email.lower(), document, tuple(dropped))

    def _ortto_problem(self, document: dict) -> str | None:
        for key, value in document.items():
            if key == "custom":
                for typed, custom in value.items():
                    kind, column, name = self._types[typed]
                    if problem := ortto_fields.value_problem(kind, custom):
                        return f'column {column} {problem} (custom field "{name}", type {kind})'
            elif len(value) > ortto_fields.STRING_MAX:
                return (f"column {self._columns_of[key]} has {len(value)} characters; Ortto's {key} field holds at "
                        f"most {ortto_fields.STRING_MAX}")
        return None
