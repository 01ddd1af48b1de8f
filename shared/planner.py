"""Plan a run: stream the snapshot's rows, map and validate them, collapse duplicates, diff against the
acknowledged state, and yield batches. Pure Python: rows in, batches out.

The working set lives in a temporary SQLite file, not in memory, so a million-row export plans in a
bounded footprint. Duplicate emails collapse to the FIRST valid row that carries them (partition order, then
row order); later ones are counted as duplicates.

A row whose source digest (ContactMapper.source) equals the one its member was acknowledged with maps to the
document Autopilot already holds: it is neither validated nor encoded again, which is most rows of a refresh.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import tempfile
from array import array
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice

from shared.cdm_reader import BadRow, Row
from shared.contacts import Contact, ContactMapper, Rejection, mask_email
from shared.export_config import ExportDefinition
from shared.state_store import Acked

BULK_LIMIT = 100  # Autopilot's cap on contacts per POST /contacts
CHUNK = 5000  # rows looked up and stored together
SAMPLE_SIZE = 5
REJECTED_SAMPLE = 20


class MassRemoval(Exception):
    """A run would take more of the audience away than the export allows: nothing is sent without `force`."""


def removal_guard(export: ExportDefinition, counts: dict) -> str | None:
    """Why a run with these counts must not go ahead without `force`, or None. Removals are leavers taken off
    the list (list mode) or unmarked (field mode); kept leavers are not removed."""
    removals = 0 if export.on_leave == "keep" else counts["leavers"]
    members = counts["members_before"]
    if not removals:
        return None
    share = 100 * removals / members if members else 100.0
    if counts["profiles"] == 0:
        why = f"the snapshot has no valid profile, so the run would remove all {removals} members"
    elif share > export.max_removal_percent:
        why = (f"the run would remove {removals} of the {members} members acknowledged so far ({share:.1f}%), "
               f"more than maxRemovalPercent {export.max_removal_percent:g}")
    else:
        return None
    return (f"export {export.name!r}: {why}; nothing was sent. If the segment really shrank, start the run with "
            "force, or raise maxRemovalPercent on the export")


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
    source: str = ""


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
    # What the run acknowledges without sending anything: kept leavers (members no more, left in Autopilot), and
    # unchanged members acknowledged from another form of their row (an older app's state, a mapping change that
    # left the document as it was), whose new source digest lets the next run skip them.
    settled: Callable[[], Iterator[Acked]] = lambda: iter(())


_SORTED = json.JSONEncoder(sort_keys=True)  # json.dumps(..., sort_keys=True) would build one per call
_quoted = json.encoder.encode_basestring_ascii  # a string as JSON, as the encoder writes it (ensure_ascii)


def fingerprint(document: dict) -> str:
    """Digest of what is sent for a contact; the email's case does not count (Autopilot ignores it)."""
    return encoded(document)[1]


def encoded(document: dict) -> tuple[str, str]:
    """The document as JSON and its fingerprint, from one encoding. The digest is of the sorted JSON with the
    email lower-cased; the email's key is the first `"Email": ` in it (inside a value the quotes are escaped)."""
    text = _SORTED.encode(document)
    email = document["Email"]
    canonical = text if email.islower() or email == email.lower() else text.replace(
        f'"Email": {_quoted(email)}', f'"Email": {_quoted(email.lower())}', 1)
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
            CREATE TABLE seg(key TEXT PRIMARY KEY, fp TEXT, doc INT, source TEXT) WITHOUT ROWID;
            CREATE TABLE docs(id INTEGER PRIMARY KEY, doc TEXT);
            CREATE TABLE acked(key TEXT PRIMARY KEY, fp TEXT, member INT, source TEXT) WITHOUT ROWID;
            CREATE TABLE diff(kind TEXT, key TEXT, fp TEXT, doc INT, source TEXT);
            """
        )
        self.rejections_path = f"{self._dir.name}/rejected.jsonl"

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()

    def plan(self, rows: Iterable[Row | BadRow], acked: Iterable[Acked], force: bool = False) -> Plan:
        plan = Plan(rejections_file=self.rejections_path)
        members = Digests()
        self.db.executemany("INSERT OR REPLACE INTO acked VALUES (?,?,?,?)", members.collect(acked))
        read, valid = self._load_segment(rows, plan, members.sealed() if not force else Digests())
        inserted = self.db.execute("SELECT count(*) FROM seg").fetchone()[0]
        if inserted > self.export.max_profiles:
            raise TooManyProfiles(self.export.name, inserted, self.export.max_profiles)
        plan.counts = {"read": read, "valid": valid, "rejected": read - valid, "duplicates": valid - inserted,
                       "profiles": inserted}
        self._diff(plan, force)
        return plan

    def _load_segment(self, rows: Iterable[Row | BadRow], plan: Plan, unchanged: Digests) -> tuple[int, int]:
        valid = docs = 0
        self._rejected = 0
        rows = iter(rows)
        with open(self.rejections_path, "w", encoding="utf-8") as rejected:
            while chunk := list(islice(rows, CHUNK)):
                contacts = self._contacts(chunk, rejected, plan, unchanged)
                # Documents go to an append-only table; the keyed table stays small (its inserts are in random
                # order). A row taken as unchanged has no document: it is never sent.
                texts, seg = [], []
                for key, fp, source, text in contacts:
                    if text is not None:
                        texts.append((docs, text))
                        docs += 1
                    seg.append((key, fp, docs - 1 if text is not None else None, source))
                self.db.executemany("INSERT INTO docs VALUES (?,?)", texts)
                self.db.executemany("INSERT OR IGNORE INTO seg VALUES (?,?,?,?)", seg)
                valid += len(contacts)
        return valid + self._rejected, valid

    def _contacts(self, chunk: list, rejected_file, plan: Plan, unchanged: Digests) -> list[tuple]:
        """The chunk's valid contacts in row order: (key, fingerprint, source digest, JSON document), both None
        for a row unchanged since its member was acknowledged; rejected rows are written to `rejected_file`."""
        contacts = []
        for row in chunk:
            key, source = self.mapper.source(row) if isinstance(row, Row) else ("", None)
            if source in unchanged:
                contacts.append((key, None, None, None))
                continue
            result = self.mapper.map(row) if source is not None else Rejection(row.partition, row.number,
                                                                                row.reason, "")
            if isinstance(result, Contact):
                text, fp = encoded(result.document)
                contacts.append((key, fp, f"{source:016x}", text))
                continue
            self._rejected += 1
            record = {"partition": result.partition, "row": result.row, "reason": result.reason, "email": result.email}
            rejected_file.write(json.dumps(record) + "\n")
            if len(plan.rejected_sample) < REJECTED_SAMPLE:
                plan.rejected_sample.append(record)
        return contacts

    # The diff in two passes over the tables (segment against state, state against segment) into a small table of
    # what must be sent; counts, samples and batches come from that table (batches streamed, never all in memory).
    def _classify(self, force: bool) -> None:
        kind = "'joiners'" if force else "CASE WHEN a.key IS NULL OR a.member = 0 THEN 'joiners' ELSE 'changed' END"
        send = "1" if force else "a.key IS NULL OR a.member = 0 OR a.fp != s.fp"  # an unchanged row's fp is NULL
        self.db.executescript(f"""
            INSERT INTO diff SELECT {kind}, s.key, s.fp, s.doc, s.source FROM seg s
                LEFT JOIN acked a ON a.key = s.key WHERE {send};
            INSERT INTO diff SELECT 'leavers', a.key, a.fp, NULL, '' FROM acked a
                WHERE a.member = 1 AND NOT EXISTS (SELECT 1 FROM seg s WHERE s.key = a.key);
            INSERT INTO diff SELECT 'resourced', s.key, s.fp, NULL, s.source FROM seg s JOIN acked a ON a.key = s.key
                WHERE {"0" if force else "a.member = 1 AND s.fp = a.fp AND s.source != a.source"};
            CREATE INDEX diff_kind ON diff(kind, key);
            """)

    def _diff(self, plan: Plan, force: bool) -> None:
        self._classify(force)
        found = dict(self.db.execute("SELECT kind, count(*) FROM diff GROUP BY kind").fetchall())
        for name in ("joiners", "changed", "leavers"):
            plan.counts[name] = found.get(name, 0)
            rows = self.db.execute("SELECT key FROM diff WHERE kind = ? ORDER BY key LIMIT ?", (name, SAMPLE_SIZE))
            plan.samples[name] = [mask_email(r[0]) for r in rows]
        plan.counts["unchanged"] = plan.counts["profiles"] - plan.counts["joiners"] - plan.counts["changed"]
        plan.counts["members_before"] = self.db.execute("SELECT count(*) FROM acked WHERE member = 1").fetchone()[0]
        keep = self.export.on_leave == "keep"
        plan.counts["kept_leavers"] = plan.counts["leavers"] if keep else 0
        plan.requests = expected_requests(
            self.export.membership, plan.counts["joiners"], plan.counts["changed"],
            0 if keep else plan.counts["leavers"])
        plan.batches = lambda: self._batches(keep)
        kept = (lambda: (Acked(k, fp, False) for k, fp, *_ in self._rows("leavers"))) if keep else (lambda: iter(()))
        plan.settled = lambda: chain(kept(), (Acked(k, fp, True, source) for k, fp, _, source in
                                              self._rows("resourced")))

    def _rows(self, kind: str) -> Iterator[tuple]:
        return self.db.execute("SELECT d.key, d.fp, docs.doc, d.source FROM diff d LEFT JOIN docs ON docs.id = d.doc "
                               "WHERE d.kind = ? ORDER BY d.key", (kind,))

    def _batches(self, keep: bool) -> Iterator[Batch]:
        joins = (self._member(r) for r in self._rows("joiners"))
        changes = (self._member(r) for r in self._rows("changed"))
        leaves = iter(()) if keep else (self._leaver(k, fp) for k, fp, *_ in self._rows("leavers"))
        if self.export.membership == "field":
            yield from _chunks("upsert", chain(joins, changes, leaves), BULK_LIMIT)
        else:
            yield from _chunks("join", joins, self.list_ops)
            yield from _chunks("upsert", changes, BULK_LIMIT)
            yield from _chunks("leave", leaves, self.list_ops)

    def _member(self, row) -> Item:
        key, fp, doc, source = row
        document = json.loads(doc)
        if self.export.membership == "field":
            document["custom"] = {**document.get("custom", {}), self.export.membership_key: True}
        return Item(key, fp, True, document, source)

    def _leaver(self, key: str, fp: str) -> Item:
        document = {"Email": key}
        if self.export.membership == "field":
            document["custom"] = {self.export.membership_key: False}
        return Item(key, fp, False, document)


class Digests:
    """A set of 64-bit digests at 8 bytes each (a Python set of ints takes about 50): sorted arrays by top bits.
    `collect` passes acknowledgements through, keeping the source digests of members; `sealed` sorts them."""

    def __init__(self):
        self._buckets: dict[int, array] = defaultdict(lambda: array("Q"))

    def collect(self, acked: Iterable[Acked]) -> Iterator[Acked]:
        buckets = self._buckets
        for entry in acked:
            if entry.member and entry.source:
                digest = int(entry.source, 16)
                buckets[digest >> 52].append(digest)
            yield entry

    def sealed(self) -> Digests:
        self._buckets = {top: array("Q", sorted(bucket)) for top, bucket in self._buckets.items()}
        return self

    def __contains__(self, digest: int | None) -> bool:
        bucket = self._buckets.get(digest >> 52) if digest is not None else None
        if not bucket:
            return False
        at = bisect_left(bucket, digest)
        return at < len(bucket) and bucket[at] == digest


def expected_requests(membership: str, joiners: int, changed: int, leavers: int) -> int:
    """The contact requests a run must send (the incremental issue's formulas)."""
    if membership == "field":
        return math.ceil((joiners + changed + leavers) / BULK_LIMIT)
    return joiners + leavers + math.ceil(changed / BULK_LIMIT)


def _chunks(kind: str, items: Iterable[Item], size: int) -> Iterator[Batch]:
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield Batch(kind, chunk)
