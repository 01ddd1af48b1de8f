"""What the benchmarks sync: export definitions and segment rows (a base segment, and the same segment after
churn: some profiles joined, some changed, some left)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from bench.env import CONTAINER
from tools.generate_export import profile, sample_profiles

FIRST_NAME = 2  # position of FirstName in the generator's STANDARD_COLUMNS


def export_doc(name: str, segment: str, membership: str, max_profiles: int = 100_000) -> dict:
    """An export definition mapping the generator's columns (the shape tests/support.py uses)."""
    destination = {"membership": membership, "onLeave": "remove"}
    destination.update({"field": f"In Bench {name}"} if membership == "field" else {"list": f"Bench {name}"})
    return {
        "name": name, "enabled": True, "dataTransferAcknowledged": True,
        "source": {"connection": "EXPORT_STORAGE", "container": CONTAINER, "prefix": "", "segment": segment},
        "destination": destination,
        "fields": {"Email": "PrimaryEmail", "FirstName": "FirstName", "LastName": "LastName",
                   "Company": "CompanyName", "MailingCity": "City"},
        "customFields": [{"name": "Loyalty Points", "type": "integer", "column": "LoyaltyPoints"}],
        "maxProfiles": max_profiles,
    }


@dataclass(frozen=True)
class Churn:
    """A churned segment: profiles 0..leaves-1 left, the next `changes` changed, `joins` new ones at the end."""

    profiles: int
    joins: int
    changes: int
    leaves: int

    @classmethod
    def of(cls, profiles: int, fraction: float = 0.01) -> Churn:
        """`fraction` of the segment churns, split evenly between joins, changes and leaves."""
        total = max(3, round(profiles * fraction))
        joins = math.ceil(total / 3)
        changes = math.ceil((total - joins) / 2)
        return cls(profiles, joins, changes, total - joins - changes)

    def rows(self) -> Iterator[tuple[str, ...]]:
        for i in range(self.leaves, self.profiles + self.joins):
            yield self.row(i)

    def row(self, i: int, base: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """Profile i as the churned segment holds it (`base`: profile(i), when already made)."""
        row = base or profile(i)
        if self.leaves <= i < self.leaves + self.changes:
            row = (*row[:FIRST_NAME], f"Changed{i}", *row[FIRST_NAME + 1:])
        return row

    def as_dict(self) -> dict:
        return {"profiles": self.profiles, "joins": self.joins, "changes": self.changes, "leaves": self.leaves}


def base_rows(profiles: int):
    return sample_profiles(profiles)


def partitions_for(rows: int) -> int:
    """Customer Insights splits big exports into several partitions; so do the benchmarks (one per 250k rows)."""
    return 1 + rows // 250_000


class StateLines:
    """The state lines (key, fingerprint, member, source digest) a first sync of generated rows leaves: each row
    mapped, fingerprinted and digested as the planner does it, its record as stack.snapshot writes it."""

    def __init__(self, definition: dict):
        import io

        from shared.source.cdm_reader import csv_settings
        from shared.source.contacts import ContactMapper
        from shared.source.export_config import parse_exports
        from tools.generate_export import STANDARD_COLUMNS, CsvFormat

        self.mapper = ContactMapper(parse_exports({"exports": [definition]})[0], STANDARD_COLUMNS)
        fmt = CsvFormat()
        self.seed = self.mapper.record_seed(csv_settings(fmt.file_format_settings()))
        self._text = io.StringIO()
        self._writer = fmt.writer(self._text)

    def line(self, number: int, row: tuple[str, ...]) -> str:
        """The row's state line, or "" if the row is rejected."""
        from shared.pipeline.planner import fingerprint, record_digest
        from shared.source.cdm_reader import Row
        from shared.source.contacts import Contact

        contact = self.mapper.map(Row("base", number, list(row)))
        if not isinstance(contact, Contact):
            return ""
        self._text.seek(0)
        self._text.truncate()
        self._writer.writerow(row)
        digest = record_digest(self.seed, self._text.getvalue().removesuffix("\n"))
        return f"{contact.key}\t{fingerprint(contact.document)}\t1\t{digest:016x}\n"
