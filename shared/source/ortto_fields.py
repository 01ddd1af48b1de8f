"""Ortto's person fields: which of the export's fields Ortto has, the id each custom field gets, the limits a
value must keep to, and the person object a planned contact becomes (`docs/api-contracts.md`).

Planning keeps one form of a contact for every platform (Autopilot's field names, custom values under their
typed keys), so state, fingerprints and messages stay one code path; a contact becomes an Ortto person only
as its merge request is built, by `person`, a pure function of that form.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (export_config checks definitions with this module: no import cycle at run time)
    from shared.source.export_config import ExportDefinition

# The export's standard fields Ortto has, and their ids. Phone and MobilePhone are one Ortto field.
STANDARD = {"Email": "str::email", "FirstName": "str::first", "LastName": "str::last", "Phone": "phn::phone",
            "MobilePhone": "phn::phone", "MailingCity": "geo::city", "MailingCountry": "geo::country",
            "MailingState": "geo::region", "MailingPostalCode": "str::postal"}
PREFIX = {"string": "str", "text": "txt", "integer": "int", "float": "int", "boolean": "bol", "date": "dtz"}
# The custom-field create types (Ortto's API, docs/api-contracts.md): the boolean one is named `bool`, not `boolean`.
DISPLAY_TYPE = {"string": "text", "text": "large_text", "integer": "integer", "float": "decimal",
                "boolean": "bool", "date": "date"}
STRING_MAX, TEXT_MAX = 255, 4000
INT64_MAX = 2**63 - 1
DECIMAL_SCALE = 1000  # Ortto keeps a decimal as an integer: 12.5 is sent as 12500
_NOT_KEBAB = re.compile(r"[^a-z0-9]+")


def kebab(name: str) -> str:
    """An Ortto custom field's id part: `Loyalty Tier` → `loyalty-tier`."""
    return _NOT_KEBAB.sub("-", name.lower()).strip("-")


def field_id(kind: str, name: str) -> str:
    return f"{PREFIX[kind]}:cm:{kebab(name)}"


def custom_fields(export: ExportDefinition) -> dict[str, tuple[str, str]]:
    """The custom fields a run of `export` writes: id → (name, Ortto display type); with the membership field
    in field mode."""
    wanted = [(f.type, f.name) for f in export.custom_fields]
    if export.membership == "field" and export.field:
        wanted.append(("boolean", export.field))
    return {field_id(kind, name): (name, DISPLAY_TYPE[kind]) for kind, name in wanted}


def definition_problems(export: ExportDefinition) -> list[tuple[str, str]]:
    """Why `export` cannot be sent to Ortto as defined: (JSON path, problem) pairs."""
    problems = [(f"fields.{key}", "is not an Ortto person field; map it as a customFields entry (Ortto's fields: "
                 f"{', '.join(STANDARD)})") for key in export.fields if key not in STANDARD]
    if "Phone" in export.fields and "MobilePhone" in export.fields:
        problems.append(("fields.MobilePhone", "and fields.Phone are both Ortto's one phone field (phn::phone); "
                         "map only one"))
    seen: dict[str, str] = {}
    named = [(f"customFields[{i}].name", c.type, c.name) for i, c in enumerate(export.custom_fields)]
    if export.membership == "field" and export.field:
        named.append(("destination.field", "boolean", export.field))
    for path, kind, name in named:
        ident = field_id(kind, name)
        if not kebab(name):
            problems.append((path, f"{name!r} has no letter or digit to make an Ortto field id from"))
        elif ident in seen:
            problems.append((path, f"gives the Ortto field id {ident}, as {seen[ident]} does; rename one"))
        seen.setdefault(ident, path)
    if export.membership == "list" and export.list and len(export.list) > STRING_MAX:
        problems.append(("destination.list", f"is the Ortto tag's name: at most {STRING_MAX} characters"))
    return problems


def value_problem(kind: str, value) -> str | None:
    """Why a converted custom value (contacts.CONVERTERS) cannot go to Ortto, or None."""
    if kind in ("string", "text"):
        most = STRING_MAX if kind == "string" else TEXT_MAX
        return f"has {len(value)} characters; Ortto's {kind} fields hold at most {most}" if len(value) > most else None
    if kind in ("integer", "float"):
        return f"is beyond Ortto's number range (±{INT64_MAX})" if abs(_number(kind, value)) > INT64_MAX else None
    return None


def person(document: dict, member: bool, tag: str | None) -> dict:
    """The Ortto person a planned contact becomes; `tag` (tag mode) is set on members and unset on leavers.
    Consent fields (bol::p, bol::sp) are never sent: a merge must not change anyone's subscription."""
    fields = {}
    for key, value in document.items():
        if key == "custom":
            for typed, custom in value.items():
                kind, ident = _custom_id(typed)
                fields[ident] = _custom_value(kind, custom)
        else:
            fields[STANDARD[key]] = _standard_value(STANDARD[key], value)
    found = {"fields": fields}
    if tag:
        found["tags" if member else "unset_tags"] = [tag]
    return found


@lru_cache(maxsize=1024)
def _custom_id(typed: str) -> tuple[str, str]:
    """A planned custom key (`float--Lifetime--Value`) as its type and Ortto id; cached: it is met per person."""
    kind, _, words = typed.partition("--")
    return kind, f"{PREFIX[kind]}:cm:{kebab(words)}"


def _number(kind: str, value):
    """A number as Ortto keeps it: a decimal multiplied by DECIMAL_SCALE and rounded."""
    return round(value * DECIMAL_SCALE) if kind == "float" else value


def _standard_value(ident: str, value: str):
    if ident.startswith("phn:"):
        return {"phone": value, "parse_with_country_code": True}
    if ident.startswith("geo:"):
        return {"name": value}
    return value


def _custom_value(kind: str, value):
    if kind in ("integer", "float"):
        return _number(kind, value)
    if kind == "date":
        return dtz(value)
    return value


def dtz(value: str) -> dict:
    """An ISO date as Ortto's date object: year, month, day and timezone only, since `dtz` has no documented place
    for a time of day. The mapper gives an Ortto export's dates as written (contacts.to_written_date); a value with
    a time (a document planned before that rule) keeps the date written in it, the time is not sent. An operator
    who wants the time kept maps the column as a "string" custom field instead."""
    day = date.fromisoformat(value) if "T" not in value else datetime.fromisoformat(value.removesuffix("Z")).date()
    return {"year": day.year, "month": day.month, "day": day.day, "timezone": "UTC"}
