"""Plan a run: stream the snapshot's rows, map and validate them, collapse duplicates, diff against the
acknowledged state, and yield batches. Pure Python: rows in, batches out.

The working set lives in a temporary SQLite file, not in memory, so a million-row export plans in a
bounded footprint. Duplicate emails collapse to the FIRST valid row that carries them (partition order, then
row order); later ones are counted as duplicates.

A record whose source digest (record_digest under ContactMapper.record_seed) equals the one its member was
acknowledged from maps to the document Autopilot already holds: it is neither parsed, validated nor stored,
which is most records of a refresh. The state is read a block of lines at a time (state_lines.Block) and only
the lines of members who left or changed become entries.
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

import numpy as np
import xxhash

from shared.source.cdm_reader import Records, Row
from shared.source.contacts import PERMISSION, ContactMapper, Rejection, mask_email
from shared.source.export_config import ExportDefinition
from shared.state.state_lines import Acked, Block, entry
from shared.state.state_store import Snapshot

BULK_LIMIT = 100  # Autopilot's cap on contacts per POST /contacts, and Ortto's on people per merge
CHUNK = 5000  # differences written to SQLite together
SAMPLE_SIZE = 5
REJECTED_SAMPLE = 20


class MassRemoval(Exception):
    """A run would take more of the audience away than the export allows: nothing is sent without `force`."""


def removal_guard(export: ExportDefinition, counts: dict) -> str | None:
    """Why a run with these counts must not go ahead without `force`, or None. Removals are leavers taken off
    the list (list mode) or unmarked (field mode); kept leavers are not removed."""
    removals = 0 if export.on_leave == "keep" else counts["leavers"]
    members = counts["members_before"]
    if counts["profiles"] == 0 and counts["leavers"]:  # (kept leavers too: each would be a joiner again next time)
        what = "remove" if removals else "take as having left (onLeave keep)"
        why = f"the snapshot has no valid profile, so the run would {what} all {counts['leavers']} members"
    elif not removals:
        return None
    elif (share := 100 * removals / members if members else 100.0) > export.max_removal_percent:
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
    # "upsert": a bulk merge (Ortto: plus one creating new people with the email permission the export chose);
    # Autopilot's list mode: "join" (its contacts merged in bulk, then each joined through the list), "leave"
    # (each taken off the list).
    kind: str
    items: list[Item]

    @property
    def requests(self) -> int:
        if self.kind == "upsert":
            return 1 + any(PERMISSION in item.document for item in self.items)
        return len(self.items) + (self.kind == "join")


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
    new_people: dict = field(default_factory=dict)  # what email permission people the run creates get, at what cost


_SORTED = json.JSONEncoder(sort_keys=True)  # json.dumps(..., sort_keys=True) would build one per call
_quoted = json.encoder.encode_basestring_ascii  # a string as JSON, as the encoder writes it (ensure_ascii)


def fingerprint(document: dict) -> str:
    """Digest of what is sent for a contact; the email's case does not count (Autopilot ignores it)."""
    return encoded(document)[1]


def encoded(document: dict) -> tuple[str, str]:
    """The document as JSON and its fingerprint, from one encoding. The digest is of the sorted JSON with the
    email lower-cased; the email's key is the first `"Email": ` in it (inside a value the quotes are escaped).
    A new person's email permission is not part of the fingerprint: it is sent to people created, never to
    members, so a change of it alone changes nothing to send."""
    if PERMISSION in document:
        return _SORTED.encode(document), encoded({k: v for k, v in document.items() if k != PERMISSION})[1]
    text = _SORTED.encode(document)
    email = document["Email"]
    canonical = text if email.islower() or email == email.lower() else text.replace(
        f'"Email": {_quoted(email)}', f'"Email": {_quoted(email.lower())}', 1)
    return text, hashlib.blake2b(canonical.encode(), digest_size=10).hexdigest()


class Planner:
    """Plans one run of an export against its acknowledged state, in three streaming passes:

    1. the state's members: the source digest each was acknowledged from (Sources);
    2. the segment's records: one whose digest is an acknowledged member's is that member, unchanged, and is
       neither parsed nor kept; every other record is parsed, mapped, validated and kept (table `seg`);
    3. the state again, block by block: the parsed rows looked up in it by key, its unsighted members taken as
       leavers; joiners, changed members and leavers go to table `diff`.
    """

    def __init__(self, export: ExportDefinition, columns: list[str], list_ops_per_message: int = 10):
        self.export = export
        self.columns = list(columns)
        self.mapper = ContactMapper(export, columns)
        self.list_ops = max(1, list_ops_per_message)
        # Every change goes in 100-contact merges: field mode, and both modes on Ortto (membership is a tag set or
        # unset in the merge itself). Autopilot's lists take one request per joiner and leaver.
        self.bulk_only = export.membership == "field" or export.account.ortto
        self._dir = tempfile.TemporaryDirectory(prefix="plan-")
        self.db = sqlite3.connect(f"{self._dir.name}/plan.sqlite")
        self.db.executescript(
            """
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16000;
            CREATE TABLE seg(key TEXT PRIMARY KEY, fp TEXT, doc INT, source TEXT, row INT) WITHOUT ROWID;
            CREATE TABLE docs(id INTEGER PRIMARY KEY, doc TEXT);
            CREATE TABLE diff(kind TEXT, key TEXT, fp TEXT, doc INT, source TEXT);
            """
        )
        self.rejections_path = f"{self._dir.name}/rejected.jsonl"
        self._docs = self._rows_seen = self._rejected = self._valid = self._dropped = 0
        self._stream: list[Item] | None = None  # a streamed first sync's joiners, as each chunk is stored

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()

    def plan(self, partitions: Iterable[Records], state: Snapshot, force: bool = False) -> Plan:
        """`state`: the acknowledged state (it is read twice)."""
        plan = Plan(rejections_file=self.rejections_path)
        sources = Sources()
        members = sources.collect(state.blocks(), skip=not force)
        with open(self.rejections_path, "w", encoding="utf-8") as rejected:
            for records in partitions:
                for _ in self._load(records, sources, rejected, plan):
                    pass
        profiles = self._merge(state, sources, force)
        if profiles > self.export.max_profiles:
            raise TooManyProfiles(self.export.name, profiles, self.export.max_profiles)
        self._count(plan, profiles, members, sources.seen)
        keep = self.export.on_leave == "keep"
        plan.batches = lambda: self._batches(keep)
        kept = (lambda: (Acked(k, fp, False) for k, fp, *_ in self._rows("leavers"))) if keep else (lambda: iter(()))
        plan.settled = lambda: chain(kept(), (Acked(k, fp, True, source) for k, fp, _, source in
                                              self._rows("resourced")))
        return plan

    def first_sync(self, partitions: Iterable[Records]) -> Plan:
        """A first sync (no acknowledged state) planned as it is read: every profile joins and the first row of a
        key wins, so a row is final once stored and its batch can go at once. `plan.batches()` reads the segment
        (once); plan.counts and plan.requests are complete when it ends. maxProfiles is the caller's to check
        first (cdm_reader.records_fit): a streamed run cannot take back what it sent."""
        plan = Plan(rejections_file=self.rejections_path)
        plan.batches = lambda: self._batches_of(self._streamed(partitions, plan), (), ())
        return plan

    def _streamed(self, partitions: Iterable[Records], plan: Plan) -> Iterator[Item]:
        self._stream = []
        with open(self.rejections_path, "w", encoding="utf-8") as rejected:
            for records in partitions:
                for _ in self._load(records, Sources(), rejected, plan):
                    yield from self._stream
                    self._stream.clear()
        self._count(plan, self._all_join(), 0, 0)

    def _count(self, plan: Plan, profiles: int, members: int, seen: int) -> None:
        valid = self._valid + seen
        plan.counts = {"read": valid + self._rejected, "valid": valid, "rejected": self._rejected,
                       "duplicates": valid - profiles, "profiles": profiles, "members_before": members,
                       "values_left_out": self._dropped}
        self._diff(plan)

    # --- pass 2: the segment's records ------------------------------------------------------------
    def _load(self, records: Records, sources: Sources, rejected, plan: Plan) -> Iterator[None]:
        """Read a partition, a chunk at a time (yielding after each, so a streamed first sync sends as it reads)."""
        seed = self.mapper.record_seed(records.settings)
        for chunk in records:
            first = self._rows_seen
            self._rows_seen += len(chunk)
            digests = [record_digest(seed, text) for _, _, text in chunk]
            unseen = np.flatnonzero(~sources.sight(digests, first)).tolist()  # (a header is never acknowledged)
            fresh = [(n, chunk[n], digests[n]) for n in unseen]
            if fresh:
                self._store(records, fresh, first, rejected, plan)
            yield

    def _store(self, records: Records, fresh: list, first: int, rejected, plan: Plan) -> None:
        rows = records.parse([record for _, record, _ in fresh], self.columns)
        by_number = {record[0]: (first + n, f"{digest:016x}") for n, record, digest in fresh}
        docs, seg, documents = [], [], []
        for row in rows:
            result = self.mapper.map(row) if isinstance(row, Row) else Rejection(row.partition, row.number,
                                                                                 row.reason, "")
            if isinstance(result, Rejection):
                self._reject(result, rejected, plan)
                continue
            for reason in result.dropped:  # a value left out (a phone Ortto could not read): the rest is sent
                self._dropped += 1
                self._write_rejection(Rejection(row.partition, row.number, reason, mask_email(result.key)),
                                      rejected, plan, sent=True)
            text, fp = encoded(result.document)
            order, source = by_number[row.number]
            docs.append((self._docs, text))
            documents.append(result.document)
            seg.append((result.key, fp, self._docs, source, order))
            self._docs += 1
        if self._stream is None:  # (a streamed first sync sends the documents it has: none is read back)
            self.db.executemany("INSERT INTO docs VALUES (?,?)", docs)
        # The first valid row of a key wins (rows are stored in order): later ones are duplicates.
        stored = self.db.total_changes
        self.db.executemany("INSERT OR IGNORE INTO seg VALUES (?,?,?,?,?)", seg)
        self._valid += len(seg)
        if self._stream is not None:
            everyone = self.db.total_changes - stored == len(seg)
            self._stream.extend(self._joiner(key, fp, document, source)
                                for (key, fp, doc, source, _), document in zip(seg, documents, strict=True)
                                if everyone or self._won(key, doc))

    def _won(self, key: str, doc: int) -> bool:
        return self.db.execute("SELECT doc FROM seg WHERE key = ?", (key,)).fetchone()[0] == doc

    def _reject(self, result: Rejection, rejected, plan: Plan) -> None:
        self._rejected += 1
        self._write_rejection(result, rejected, plan)

    @staticmethod
    def _write_rejection(result: Rejection, rejected, plan: Plan, sent: bool = False) -> None:
        """A rejected row, or (`sent`) a value left out of a contact that is sent without it."""
        record = {"partition": result.partition, "row": result.row, "reason": result.reason, "email": result.email}
        if sent:
            record["contactSent"] = True
        rejected.write(json.dumps(record) + "\n")
        if len(plan.rejected_sample) < REJECTED_SAMPLE:
            plan.rejected_sample.append(record)

    # --- pass 3: the state, block by block, with the parsed rows ----------------------------------
    def _merge(self, state: Snapshot, sources: Sources, force: bool) -> int:
        """Classify every parsed row and every unsighted member into `diff`; returns the segment's distinct
        profiles. A member whose record was taken as unchanged (sighted at row r) is unchanged, unless an earlier
        row with its key was parsed (that row wins: the sighted record is its duplicate)."""
        if not sources.entries:
            return self._all_join()
        profiles, diff = 0, []
        parsed = self.db.execute("SELECT key, fp, doc, source, row FROM seg ORDER BY key")
        row = next(parsed, None)
        for block in state.blocks():
            seen = sources.seen_at(block)
            profiles += int(np.count_nonzero(seen >= 0))
            taken, last = set(), block.key(-1)
            while row is not None and row[0] <= last:  # the parsed rows of this block's keys
                at = block.find(row[0])
                taken.add(at)
                profiles += _classify(row, entry(block.lines[at]) if at >= 0 else None, int(seen[at]), force, diff)
                row = next(parsed, None)
            for at in np.flatnonzero((seen < 0) & block.member).tolist():
                if at not in taken:
                    left = entry(block.lines[at])
                    diff.append(("leavers", left.key, left.fingerprint, None, ""))
            if len(diff) >= CHUNK:
                self._add_diff(diff)
        while row is not None:  # parsed rows of keys after the state's last
            diff.append(("joiners", *row[:4]))
            profiles += 1
            row = next(parsed, None)
        self._add_diff(diff)
        self.db.execute("CREATE INDEX diff_kind ON diff(kind, key)")
        return profiles

    def _all_join(self) -> int:
        """No state (a first sync): every profile joins; returns how many."""
        self.db.execute("INSERT INTO diff SELECT 'joiners', key, fp, doc, source FROM seg")
        self.db.execute("CREATE INDEX diff_kind ON diff(kind, key)")
        return self.db.execute("SELECT count(*) FROM seg").fetchone()[0]

    def _add_diff(self, diff: list) -> None:
        self.db.executemany("INSERT INTO diff VALUES (?,?,?,?,?)", diff)
        diff.clear()

    def _diff(self, plan: Plan) -> None:
        found = dict(self.db.execute("SELECT kind, count(*) FROM diff GROUP BY kind").fetchall())
        for name in ("joiners", "changed", "leavers"):
            plan.counts[name] = found.get(name, 0)
            rows = self.db.execute("SELECT key FROM diff WHERE kind = ? ORDER BY key LIMIT ?", (name, SAMPLE_SIZE))
            plan.samples[name] = [mask_email(r[0]) for r in rows]
        plan.counts["unchanged"] = plan.counts["profiles"] - plan.counts["joiners"] - plan.counts["changed"]
        keep = self.export.on_leave == "keep"
        plan.counts["kept_leavers"] = plan.counts["leavers"] if keep else 0
        chosen = self.export.email_permission != "ortto-default"
        plan.requests = expected_requests(
            self.bulk_only, plan.counts["joiners"], plan.counts["changed"], 0 if keep else plan.counts["leavers"],
            list_ops=self.list_ops, permission=chosen)
        plan.new_people = new_people(self.export, plan.counts["joiners"] if chosen else 0)

    def _rows(self, kind: str) -> Iterator[tuple]:
        return self.db.execute("SELECT d.key, d.fp, docs.doc, d.source FROM diff d LEFT JOIN docs ON docs.id = d.doc "
                               "WHERE d.kind = ? ORDER BY d.key", (kind,))

    def _batches(self, keep: bool) -> Iterator[Batch]:
        joins = (self._member(r, new=True) for r in self._rows("joiners"))
        changes = (self._member(r) for r in self._rows("changed"))
        leaves = iter(()) if keep else (self._leaver(k, fp) for k, fp, *_ in self._rows("leavers"))
        return self._batches_of(joins, changes, leaves)

    def _batches_of(self, joins: Iterable[Item], changes: Iterable[Item], leaves: Iterable[Item]) -> Iterator[Batch]:
        if self.bulk_only:
            yield from _chunks("upsert", chain(joins, changes, leaves), BULK_LIMIT)
        else:
            yield from _chunks("join", joins, self.list_ops)
            yield from _chunks("upsert", changes, BULK_LIMIT)
            yield from _chunks("leave", leaves, self.list_ops)

    def _member(self, row, new: bool = False) -> Item:
        key, fp, doc, source = row
        return self._joiner(key, fp, json.loads(doc), source, new)

    def _joiner(self, key: str, fp: str, document: dict, source: str, new: bool = True) -> Item:
        """A member's item; `new`: a joiner, who may not exist in the destination yet and so is the only kind to
        carry the email permission chosen for new people (a column's value, or false)."""
        if not new:
            document.pop(PERMISSION, None)
        elif self.export.email_permission == "false":
            document[PERMISSION] = False
        if self.export.membership == "field":
            document["custom"] = {**document.get("custom", {}), self.export.membership_key: True}
        return Item(key, fp, True, document, source)

    def _leaver(self, key: str, fp: str) -> Item:
        document = {"Email": key}
        if self.export.membership == "field":
            document["custom"] = {self.export.membership_key: False}
        return Item(key, fp, False, document)


def record_digest(seed: int, text: str) -> int:
    """A record's 64-bit source digest under a mapper's record seed (ContactMapper.record_seed): XXH3, cheap
    enough for every record of every refresh (a collision is one chance in 2**64 per pair)."""
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogateescape"), seed)


def _classify(row: tuple, member: Acked | None, seen_at: int, force: bool, diff: list) -> int:
    """Put a parsed row in `diff` by the entry of its key (None: the state has none) and where that member's
    unchanged record was sighted (-1: nowhere); returns 1 if it is a profile not counted among the sighted."""
    if member is None:
        diff.append(("joiners", *row[:4]))
        return 1
    if 0 <= seen_at < row[4]:
        return 0  # the member's unchanged record came first: this row is its duplicate
    kind = _kind(member, row, force)
    if kind:
        diff.append((kind, *row[:4]))
    return 0 if seen_at >= 0 else 1


def _kind(entry: Acked, row: tuple, force: bool) -> str | None:
    """How a parsed row differs from what its key's member was acknowledged as (None: not at all)."""
    if force or not entry.member:
        return "joiners"
    if entry.fingerprint != row[1]:
        return "changed"
    return "resourced" if entry.source != row[3] else None


class Sources:
    """The source digests the state's members were acknowledged from, sorted (8 bytes each; a Python set of ints
    takes about 50), and the first segment row each was sighted at."""

    UNSEEN = np.iinfo(np.int32).max

    def __init__(self):
        self.digests = np.zeros(0, np.uint64)
        self.first = np.zeros(0, np.int32)
        self.entries = self.seen = 0

    def collect(self, blocks: Iterable[Block], skip: bool) -> int:
        """Read the state once; returns how many members it has. `skip` False: no record is taken as unchanged."""
        members, parts = 0, []
        for block in blocks:
            self.entries += len(block.lines)
            members += int(np.count_nonzero(block.member))
            if skip:
                parts.append(block.digest[block.digest != 0])
        if parts:
            self.digests = np.concatenate(parts)
            parts.clear()
            self.digests.sort()
        self.first = np.full(len(self.digests), self.UNSEEN, np.int32)
        return members

    def sight(self, digests: list[int], first_row: int) -> np.ndarray:
        """Which of these records (rows first_row, first_row + 1, ...) an acknowledged member was sent from; the
        first sighting of each is kept (a later one is a duplicate of the same record, counted as seen)."""
        if not len(self.digests):
            return np.zeros(len(digests), bool)
        wanted = np.array(digests, np.uint64)
        at = np.minimum(np.searchsorted(self.digests, wanted), len(self.digests) - 1)
        found = self.digests[at] == wanted
        rows = np.flatnonzero(found)
        np.minimum.at(self.first, at[rows], (rows + first_row).astype(np.int32))
        self.seen += len(rows)
        return found

    def seen_at(self, block: Block) -> np.ndarray:
        """For each line of a state block, the segment row its member's record was sighted at, or -1."""
        if not len(self.digests):
            return np.full(len(block.lines), -1)
        at = np.minimum(np.searchsorted(self.digests, block.digest), len(self.digests) - 1)
        first = self.first[at]
        return np.where((block.digest != 0) & (self.digests[at] == block.digest) & (first != self.UNSEEN), first, -1)


def expected_requests(bulk_only: bool, joiners: int, changed: int, leavers: int, list_ops: int = 10,
                      permission: bool = False) -> int:
    """The contact requests a run must send; `bulk_only`: every change goes in merges (Planner.bulk_only), each
    merge of joiners preceded by one creating them with their email permission when the export chose one
    (`permission`: Ortto); else Autopilot's list mode: joiners merged `list_ops` at a time (a join message), then
    one list call each, changed members merged 100 at a time, one list call a leaver."""
    if bulk_only:
        return math.ceil((joiners + changed + leavers) / BULK_LIMIT) + (math.ceil(joiners / BULK_LIMIT)
                                                                         if permission else 0)
    return joiners + math.ceil(joiners / list_ops) + leavers + math.ceil(changed / BULK_LIMIT)


def new_people(export: ExportDefinition, joiners: int) -> dict:
    """The email permission of the people a run creates (joiners the destination does not hold yet), stated in
    the plan, and the requests it adds (`joiners`: those given a chosen permission)."""
    if not export.account.ortto:
        given = "true: Autopilot gives a contact created without 'unsubscribed' email permission"
    else:
        given = {"ortto-default": "true: Ortto subscribes a person created without 'bol::p' (its default)",
                 "false": "false (destination.newPeople.emailPermission)",
                 "column": f"from column {export.email_permission_column} (destination.newPeople.emailPermission)"
                 }[export.email_permission]
    return {"emailPermission": given, "existingPeopleKeepTheirs": True,
            "addedRequests": math.ceil(joiners / BULK_LIMIT)}


def list_ops_for(rate: float) -> int:
    """Contacts in a list-mode message: about two seconds of per-contact requests, never more than a batch may
    hold."""
    return min(BULK_LIMIT, max(1, int(2 * rate)))


def _chunks(kind: str, items: Iterable[Item], size: int) -> Iterator[Batch]:
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield Batch(kind, chunk)
