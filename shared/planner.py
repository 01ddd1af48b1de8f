"""Plan a run: stream the snapshot's rows, map and validate them, collapse duplicates, diff against the
acknowledged state, and yield batches. Pure Python: rows in, batches out.

The working set lives in a temporary SQLite file, not in memory, so a million-row export plans in a
bounded footprint. Duplicate emails collapse to the FIRST row that carries them (partition order, then
row order); later ones are counted as duplicates.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice

from shared.cdm_reader import BadRow, Row
from shared.contacts import Contact, ContactMapper, Rejection, mask_email
from shared.export_config import ExportDefinition
from shared.state_store import Acked

BULK_LIMIT = 100  # Autopilot's cap on contacts per POST /contacts
SAMPLE_SIZE = 5
REJECTED_SAMPLE = 20


class TooManyProfiles(Exception):
    def __init__(self, export: str, valid: int, limit: int):
        super().__init__(
            f"export {export!r} has {valid} valid profiles, more than its maxProfiles of {limit}: "
            "nothing was sent; raise maxProfiles or narrow the segment"
        )


@dataclass(frozen=True)
class Item:
    key: str
    fingerprint: str
    member: bool
    document: dict


@dataclass(frozen=True)
class Batch:
    kind: str  # "upsert" (bulk POST /contacts), "join" (POST /contact with list), "leave" (DELETE from list)
    items: list[Item]

    @property
    def requests(self) -> int:
        return 1 if self.kind == "upsert" else len(self.items)


@dataclass
class Plan:
    counts: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    rejected_sample: list = field(default_factory=list)
    rejections_file: str = ""
    requests: int = 0
    batches: Callable[[], Iterator[Batch]] = lambda: iter(())
    kept_leavers: Callable[[], Iterator[Acked]] = lambda: iter(())


def fingerprint(document: dict) -> str:
    """Digest of what is sent for a contact; the email's case does not count (Autopilot ignores it)."""
    return encoded(document)[1]


def encoded(document: dict) -> tuple[str, str]:
    """The document as JSON and its fingerprint, from one encoding. The digest is of the sorted JSON with the
    email lower-cased; the email's key is the first `"Email": ` in it (inside a value the quotes are escaped)."""
    text = json.dumps(document, sort_keys=True)
    email = document["Email"]
    canonical = text if email.islower() or email == email.lower() else text.replace(
        f'"Email": {json.dumps(email)}', f'"Email": {json.dumps(email.lower())}', 1)
    return text, hashlib.blake2b(canonical.encode(), digest_size=10).hexdigest()


class Planner:
    def __init__(self, export: ExportDefinition, columns: list[str], list_ops_per_message: int = 10):
        self.export = export
        self.mapper = ContactMapper(export, columns)
        self.list_ops = max(1, list_ops_per_message)
        self._dir = tempfile.TemporaryDirectory(prefix="plan-")
        self.db = sqlite3.connect(f"{self._dir.name}/plan.sqlite")
        self.db.executescript(
            """
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16000;
            CREATE TABLE seg(key TEXT PRIMARY KEY, fp TEXT, doc TEXT) WITHOUT ROWID;
            CREATE TABLE acked(key TEXT PRIMARY KEY, fp TEXT, member INT) WITHOUT ROWID;
            """
        )
        self.rejections_path = f"{self._dir.name}/rejected.jsonl"

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()

    def plan(self, rows: Iterable[Row | BadRow], acked: Iterable[Acked], force: bool = False) -> Plan:
        plan = Plan(rejections_file=self.rejections_path)
        read, valid = self._load_segment(rows, plan)
        inserted = self.db.execute("SELECT count(*) FROM seg").fetchone()[0]
        if inserted > self.export.max_profiles:
            raise TooManyProfiles(self.export.name, inserted, self.export.max_profiles)
        self.db.executemany("INSERT OR REPLACE INTO acked VALUES (?,?,?)",
                            ((a.key, a.fingerprint, int(a.member)) for a in acked))
        plan.counts = {"read": read, "valid": valid, "rejected": read - valid, "duplicates": valid - inserted,
                       "profiles": inserted}
        self._diff(plan, force)
        return plan

    def _load_segment(self, rows: Iterable[Row | BadRow], plan: Plan) -> tuple[int, int]:
        read = valid = 0
        with open(self.rejections_path, "w", encoding="utf-8") as rejected:
            contacts = self._contacts(rows, rejected, plan)
            while chunk := list(islice(contacts, 5000)):
                self.db.executemany("INSERT OR IGNORE INTO seg VALUES (?,?,?)", chunk)
                valid += len(chunk)
        read = valid + self._rejected
        return read, valid

    def _contacts(self, rows, rejected_file, plan: Plan) -> Iterator[tuple[str, str, str]]:
        self._rejected = 0
        for row in rows:
            if isinstance(row, BadRow):
                result = Rejection(row.partition, row.number, row.reason, "")
            else:
                result = self.mapper.map(row)
            if isinstance(result, Contact):
                text, fp = encoded(result.document)
                yield result.key, fp, text
                continue
            self._rejected += 1
            record = {"partition": result.partition, "row": result.row, "reason": result.reason, "email": result.email}
            rejected_file.write(json.dumps(record) + "\n")
            if len(plan.rejected_sample) < REJECTED_SAMPLE:
                plan.rejected_sample.append(record)

    # The diff as SQL: counts and samples first, batches streamed afterwards (never all in memory).
    def _queries(self, force: bool) -> dict[str, str]:
        member_fp = "CASE WHEN a.member = 1 THEN a.fp END"
        return {
            "joiners": "SELECT s.key, s.fp, s.doc FROM seg s LEFT JOIN acked a ON a.key = s.key "
                       f"WHERE {'1' if force else f'{member_fp} IS NULL'}",
            "changed": "SELECT s.key, s.fp, s.doc FROM seg s JOIN acked a ON a.key = s.key "
                       f"WHERE {'0' if force else 'a.member = 1 AND a.fp != s.fp'}",
            "leavers": "SELECT a.key, a.fp, NULL FROM acked a "
                       "WHERE a.member = 1 AND a.key NOT IN (SELECT key FROM seg)",
        }

    def _diff(self, plan: Plan, force: bool) -> None:
        queries = self._queries(force)
        for name, sql in queries.items():
            plan.counts[name] = self.db.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]
            rows = self.db.execute(f"{sql} ORDER BY 1 LIMIT {SAMPLE_SIZE}").fetchall()
            plan.samples[name] = [mask_email(r[0]) for r in rows]
        plan.counts["unchanged"] = plan.counts["profiles"] - plan.counts["joiners"] - plan.counts["changed"]
        keep = self.export.on_leave == "keep"
        plan.counts["kept_leavers"] = plan.counts["leavers"] if keep else 0
        plan.requests = expected_requests(
            self.export.membership, plan.counts["joiners"], plan.counts["changed"],
            0 if keep else plan.counts["leavers"])
        plan.batches = lambda: self._batches(queries, keep)
        plan.kept_leavers = lambda: (
            (Acked(k, fp, False) for k, fp, _ in self._rows(queries["leavers"])) if keep else iter(()))

    def _rows(self, sql: str) -> Iterator[tuple]:
        return self.db.execute(f"{sql} ORDER BY 1")

    def _batches(self, queries: dict[str, str], keep: bool) -> Iterator[Batch]:
        joins = (self._member(r) for r in self._rows(queries["joiners"]))
        changes = (self._member(r) for r in self._rows(queries["changed"]))
        leaves = iter(()) if keep else (self._leaver(k, fp) for k, fp, _ in self._rows(queries["leavers"]))
        if self.export.membership == "field":
            yield from _chunks("upsert", chain(joins, changes, leaves), BULK_LIMIT)
        else:
            yield from _chunks("join", joins, self.list_ops)
            yield from _chunks("upsert", changes, BULK_LIMIT)
            yield from _chunks("leave", leaves, self.list_ops)

    def _member(self, row) -> Item:
        key, fp, doc = row
        document = json.loads(doc)
        if self.export.membership == "field":
            document["custom"] = {**document.get("custom", {}), self.export.membership_key: True}
        return Item(key, fp, True, document)

    def _leaver(self, key: str, fp: str) -> Item:
        document = {"Email": key}
        if self.export.membership == "field":
            document["custom"] = {self.export.membership_key: False}
        return Item(key, fp, False, document)


def expected_requests(membership: str, joiners: int, changed: int, leavers: int) -> int:
    """The contact requests a run must send (the incremental issue's formulas)."""
    if membership == "field":
        return math.ceil((joiners + changed + leavers) / BULK_LIMIT)
    return joiners + leavers + math.ceil(changed / BULK_LIMIT)


def _chunks(kind: str, items: Iterable[Item], size: int) -> Iterator[Batch]:
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield Batch(kind, chunk)
