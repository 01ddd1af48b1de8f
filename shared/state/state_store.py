"""What Autopilot acknowledged, per export and destination: a snapshot planning reads in one pass, plus the
acknowledgements of runs not yet folded into it.

- Snapshot: blob `state/<export>/<destination id>.gz`, gzip text: a JSON header line, then one line per contact
  `key<TAB>fingerprint<TAB>1|0<TAB>source` (member or not; the digest of the row it was mapped from, which lets
  planning skip unchanged rows unmapped; empty in version 1) sorted by key, then `#end<TAB><count>`. Replaced
  whole, with an If-Match on the blob it was folded from, so two folders can never interleave.
- Acknowledgements since: each settled batch's acknowledgements are written in its outcome entity, in the same
  write (run_records.record_batch); what a run settles while planning (kept leavers) goes to a blob of its own,
  `state/<export>/runs/<run>.acks`, deleted once the run has no entry left pending.
- Head: entity (`~head`, <export>) in the `contactstate` table: the destination of the export's last run and
  `pending`, the runs whose acknowledgements are not yet in a snapshot.

Why a crash loses nothing: a run is registered as pending before its first batch is queued; folding writes the
new snapshot (naming the folded runs in its header) before it drops them from `pending`, so a crash in between
leaves runs that the next fold finds already folded and drops; planning folds every ended pending run before it
reads the snapshot. Runs of one export never overlap (run_records.acquire), so folds follow run order.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sqlite3
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableClient, UpdateMode
from azure.storage.blob import BlobServiceClient

from shared.state.state_lines import Acked, BadLine, Block, parse_block, text

STATE_TABLE = "contactstate"  # also holds the acknowledged state of versions before snapshots (partition = export)
STATE_CONTAINER = "state"
VERSION = 2
READABLE = (1, 2)  # version 1 has no source digests: its rows are all mapped again
HEAD = "~head"  # no export name starts with '~'
FOLDED_KEPT = 50  # run entries a snapshot header remembers as folded
_END = b"#end\t"  # the end mark's start: "#end<TAB><count>"
READ_BLOCK = 1 << 20  # bytes of a snapshot decompressed and parsed at once


class StateUnreadable(Exception):
    """A snapshot that cannot be read: the run fails before anything is sent."""

    def __init__(self, blob: str, why: str):
        super().__init__(f"the acknowledged state {STATE_CONTAINER}/{blob} cannot be read ({why}); nothing was "
                         "sent. Start the run with force to rebuild it from the segment (every member is sent again)")


@dataclass(frozen=True)
class Destination:
    """Where a state belongs: the Autopilot account (API and key) and the membership it keeps."""

    account: str  # the API's base URL and the Key Vault secret holding its key
    mode: str  # "list" or "field"
    target: str  # the list's title or id, or the membership field's key

    @property
    def id(self) -> str:
        text = json.dumps([self.account, self.mode, self.target])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"{self.mode} {self.target!r} on {self.account}"

    def public(self) -> dict:
        return {"id": self.id, "membership": self.mode, "target": self.target, "account": self.account}

    @classmethod
    def from_public(cls, data: dict) -> Destination:
        return cls(data["account"], data["membership"], data["target"])


def encode_acks(acks: Iterable[Acked]) -> bytes:
    """Acknowledgements as they travel in a batch outcome (a Table binary property of at most 64 KiB)."""
    return zlib.compress("\n".join(map(text, acks)).encode(), 6)


def decode_acks(data: bytes | None) -> list[Acked]:
    if not data:
        return []
    return _acks(zlib.decompress(data))


class Snapshot:
    """A snapshot's entries, checked as they are read, as often as the reader needs: Blocks of lines for planning,
    Acked entries for the rest. `open_entries` opens a binary stream of its entry lines then its end mark (None:
    there is no snapshot)."""

    def __init__(self, name: str, open_entries: Callable[[], BinaryIO] | None):
        self.name, self._open = name, open_entries

    @classmethod
    def of(cls, acks: Iterable[Acked], name: str = "(in memory)") -> Snapshot:
        """Entries held in memory (sorted by key), read as a snapshot blob is."""
        lines = [text(a).encode() + b"\n" for a in acks]
        data = b"".join(lines) + _END + str(len(lines)).encode() + b"\n"
        return cls(name, lambda: io.BytesIO(data))

    def entries(self) -> Iterator[Acked]:
        for block in self.blocks():
            yield from block.entries()

    def blocks(self) -> Iterator[Block]:
        if self._open is None:
            return
        try:
            with self._open() as data:
                yield from self._checked(data)
        except StateUnreadable:
            raise
        except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as exc:
            raise StateUnreadable(self.name, f"{type(exc).__name__}: {str(exc)[:120]}") from None

    def _checked(self, data: BinaryIO) -> Iterator[Block]:
        count, previous, tail, end = 0, b"", b"", None
        while chunk := data.read(READ_BLOCK):
            if end is not None:
                raise StateUnreadable(self.name, f"its end mark does not match its {count} entries")
            whole = tail + chunk
            cut = whole.rfind(b"\n") + 1
            whole, tail = whole[:cut], whole[cut:]
            last = whole.rfind(b"\n", 0, len(whole) - 1) + 1  # where the block's last line starts
            if whole.startswith(_END, last):
                end, whole = whole[last:-1], whole[:last]
            try:
                block = parse_block(whole, previous)
            except BadLine as bad:
                raise StateUnreadable(self.name, f"entry {count + bad.index + 1} {bad.why}") from None
            if block.lines:
                count, previous = count + len(block.lines), block.lines[-1]
                yield block
        if end is None or tail:
            raise StateUnreadable(self.name, f"truncated after {count} entries (no end mark)")
        if end != _END + str(count).encode():
            raise StateUnreadable(self.name, f"its end mark does not match its {count} entries")


class ExportState:
    """The acknowledged state of one export (every destination it ever had)."""

    def __init__(self, blobs: BlobServiceClient, table: TableClient, export: str):
        self.container = blobs.get_container_client(STATE_CONTAINER)
        self.table = table
        self.export = export

    # --- the head ---------------------------------------------------------------------------------
    def head(self) -> tuple[dict, str | None]:
        try:
            entity = self.table.get_entity(HEAD, self.export)
        except ResourceNotFoundError:
            return {"destination": "", "destination_name": "", "pending": []}, None
        return {"destination": entity.get("destination", ""), "destination_name": entity.get("destination_name", ""),
                "pending": json.loads(entity.get("pending") or "[]")}, entity.metadata["etag"]

    def previous_destination(self) -> str:
        """The name of the destination the export's last run sent to ("" if none)."""
        return self.head()[0]["destination_name"]

    def register(self, run_id: str, destination: Destination, entry: str | None = None) -> None:
        """Record that `run_id` is about to send to `destination`: its acknowledgements are pending until folded.
        `entry` names a later registration of the same run (a replay), so a fold does not skip it as done."""
        entry = entry or run_id
        self._change_head(lambda head: {
            **head, "destination": destination.id, "destination_name": destination.name,
            "pending": head["pending"] + ([] if any(p["entry"] == entry for p in head["pending"])
                                          else [{"entry": entry, "run": run_id, "state": destination.id}])})

    def _change_head(self, change: Callable[[dict], dict]) -> dict:
        """Apply `change` to the head, read again until no other instance changed it meanwhile; the new head."""
        while True:
            head, etag = self.head()
            new = change(head)
            entity = {"PartitionKey": HEAD, "RowKey": self.export, "destination": new["destination"],
                      "destination_name": new["destination_name"], "pending": json.dumps(new["pending"])}
            try:
                if etag is None:
                    self.table.create_entity(entity)
                else:
                    self.table.update_entity(entity, mode=UpdateMode.REPLACE, etag=etag,
                                             match_condition=MatchConditions.IfNotModified)
                return new
            except (ResourceExistsError, ResourceModifiedError):
                continue  # another instance changed the head: read it again

    # --- snapshots --------------------------------------------------------------------------------
    def blob_name(self, destination: Destination) -> str:
        return f"{self.export}/{destination.id}.gz"

    def load(self, destination: Destination) -> Iterator[Acked]:
        """Stream the destination's snapshot (nothing if it has none); raises StateUnreadable when it is broken."""
        with self.reading(destination) as snapshot:
            yield from snapshot.entries()

    @contextmanager
    def reading(self, destination: Destination) -> Iterator[Snapshot]:
        """The destination's snapshot, downloaded once for the block, read as often as the reader needs."""
        name = self.blob_name(destination)
        with self._download(name) as (path, _etag):
            yield self._snapshot(name, path, destination)

    def has_snapshot(self, destination: Destination) -> bool:
        return self.container.get_blob_client(self.blob_name(destination)).exists()

    def check(self, destination: Destination) -> None:
        """Read the whole snapshot once; raises StateUnreadable if it is broken."""
        with self.reading(destination) as snapshot:
            for _ in snapshot.blocks():
                pass

    def _snapshot(self, name: str, path: str | None, destination: Destination) -> Snapshot:
        """The downloaded snapshot at `path` (None: there is none)."""
        return Snapshot(name, path and (lambda: self._open(path, name, destination)))

    def _open(self, path: str, name: str, destination: Destination):
        """The snapshot's gzip stream, its header read and checked."""
        data = gzip.open(path, "rb")
        try:
            self._check_header(name, json.loads(data.readline() or b"null"), destination)
        except BaseException:
            data.close()
            raise
        return data

    def _check_header(self, name: str, header, destination: Destination) -> None:
        if not isinstance(header, dict) or header.get("version") not in READABLE:
            raise StateUnreadable(name, f"unknown version {_version(header)}; this app reads "
                                        f"{' and '.join(map(str, READABLE))}")
        if header.get("export") != self.export or header.get("destination") != destination.id:
            raise StateUnreadable(name, "its header names another export or destination")

    @staticmethod
    def _header(path: str) -> dict:
        try:
            with gzip.open(path, "rt", encoding="utf-8") as lines:
                header = json.loads(next(lines, "") or "{}")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError):
            return {}
        return header if isinstance(header, dict) else {}

    def _download(self, name: str):
        return _Download(self.container.get_blob_client(name))

    def write(self, destination: Destination, entries: Iterable[Acked], folded: list[str], etag: str | None,
              **header) -> None:
        """Replace the snapshot with `entries` (sorted by key), only if it is still the blob at `etag`
        (None: only if there is none). Raises ResourceModifiedError/ResourceExistsError when it changed."""
        fd, path = tempfile.mkstemp(prefix="state-", suffix=".gz")
        os.close(fd)
        try:
            count = 0
            with gzip.open(path, "wt", encoding="utf-8", compresslevel=3, newline="\n") as out:
                out.write(json.dumps({"version": VERSION, "export": self.export, "destination": destination.id,
                                      "name": destination.name, "folded": folded[-FOLDED_KEPT:], **header}) + "\n")
                for entry in entries:
                    out.write(text(entry) + "\n")
                    count += 1
                out.write(f"{_END.decode()}{count}\n")
            blob = self.container.get_blob_client(self.blob_name(destination))
            condition = ({"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag
                         else {"if_none_match": "*"})
            with open(path, "rb") as data:
                blob.upload_blob(data, overwrite=True, **condition)
        finally:
            os.unlink(path)

    # --- folding ----------------------------------------------------------------------------------
    def fold(self, destination: Destination, acks_of: Callable[[str], Iterable[Acked] | None],
             rebuild: Callable[[str], bool] = lambda run: False) -> int:
        """Fold the pending runs of `destination` whose acknowledgements are final into its snapshot; returns how
        many. `acks_of(run)` gives a run's acknowledgements in settling order, or None while it still sends;
        `rebuild(run)` is true for a run that replaces a broken snapshot instead of adding to it."""
        while True:
            head, _ = self.head()
            entries = [p for p in head["pending"] if p["state"] == destination.id]
            if not entries:
                return 0
            try:
                done = self._fold_entries(destination, entries, acks_of, rebuild)
            except (ResourceModifiedError, ResourceExistsError):
                continue  # another instance folded first: start again from its snapshot
            left = {p["run"] for p in self._forget(done)["pending"]}
            for run_id in {p["run"] for p in entries if p["entry"] in done} - left:
                self.drop_planned(run_id)
            return len(done)

    def _forget(self, entries: set[str]) -> dict:
        return self._change_head(lambda h: {**h, "pending": [p for p in h["pending"] if p["entry"] not in entries]})

    def _fold_entries(self, destination, entries, acks_of, rebuild) -> set[str]:
        name = self.blob_name(destination)
        with self._download(name) as (path, etag), _AckTable() as table:
            header = self._header(path) if path else {}
            folded = list(header.get("folded", []))
            done, base_ok = set(), True
            for entry in entries:
                if entry["entry"] in folded:
                    done.add(entry["entry"])  # folded before a crash that kept it pending
                    continue
                acks = acks_of(entry["run"])
                if acks is None:
                    break  # still sending: it and every later run wait for the next fold
                if rebuild(entry["run"]):
                    base_ok = False
                    table.clear()
                table.add(acks)
                folded.append(entry["entry"])
                done.add(entry["entry"])
            if done <= set(header.get("folded", [])):
                return done
            old = self._snapshot(name, path if base_ok else None, destination).entries()
            self.write(destination, _merge(old, table.sorted()), folded, etag)
            return done

    # --- state kept before snapshots (one Table entity per contact) -------------------------------
    def import_legacy(self, destination: Destination) -> int:
        """Carry an older app's per-contact entities over into the destination's snapshot, once per export:
        only while the export has no head yet (the older app never wrote one). Returns how many."""
        if self.head()[1] is not None:
            return 0
        rows = self.table.query_entities("PartitionKey eq @p", parameters={"p": self.export},
                                         select=["email", "fp", "member"])
        with _AckTable() as table:
            count = table.add(Acked(e["email"], e["fp"], bool(e["member"])) for e in rows)
            if count:
                try:
                    self.write(destination, table.sorted(), [], None, imported=STATE_TABLE)
                except ResourceExistsError:
                    pass  # a snapshot exists already: it is newer than the old entities
        # The head marks the export as carried over (a later destination must not inherit these entities).
        self._change_head(lambda h: {**h, "destination": h["destination"] or destination.id,
                                     "destination_name": h["destination_name"] or destination.name})
        return count

    # --- acknowledgements settled while planning (planner.Plan.settled) -----------------------------
    def save_planned(self, run_id: str, acks: Iterable[Acked]) -> None:
        """Keep them in a blob of the run, in encode_acks's form, streamed (an upgraded state may give them all)."""
        with tempfile.TemporaryFile() as out:
            packer, count = zlib.compressobj(6), 0
            for ack in acks:
                out.write(packer.compress((("\n" if count else "") + text(ack)).encode()))
                count += 1
            if count:
                out.write(packer.flush())
                out.seek(0)
                self._planned_blob(run_id).upload_blob(out, overwrite=True)

    def planned(self, run_id: str) -> Iterator[Acked]:
        with _Download(self._planned_blob(run_id)) as (path, _etag):
            if path is None:
                return
            with open(path, "rb") as data:
                unpacker, tail = zlib.decompressobj(), b""
                while chunk := data.read(1 << 20):
                    unpacked = tail + unpacker.decompress(chunk)
                    cut = unpacked.rfind(b"\n") + 1
                    yield from _acks(unpacked[:cut - 1] if cut else b"")
                    tail = unpacked[cut:]
                yield from _acks(tail + unpacker.flush())

    def drop_planned(self, run_id: str) -> None:
        """Delete them once the run has no entry left pending: they are in the snapshot. A later replay of the run
        folds its batches' acknowledgements without them, which changes nothing: they were folded before the
        batches' (which win on a shared key), no newer run can have folded since (a replay is refused once one
        exists), and a run that rebuilds the snapshot planned against none, so it has no such blob."""
        try:
            self._planned_blob(run_id).delete_blob()
        except ResourceNotFoundError:
            pass

    def _planned_blob(self, run_id: str):
        return self.container.get_blob_client(f"{self.export}/runs/{run_id}.acks")


def _acks(data: bytes) -> list[Acked]:
    """Acknowledgement lines joined by line breaks (an encode_acks text, in settling order), checked."""
    if not data:
        return []
    try:
        return parse_block(data + b"\n").entries()
    except BadLine as bad:
        raise ValueError(f"bad acknowledgement: {bad}") from None


def _version(header) -> str:
    return repr(header.get("version")) if isinstance(header, dict) else "(no header)"


def _merge(old: Iterator[Acked], new: Iterator[Acked]) -> Iterator[Acked]:
    """Two key-sorted streams into one; on equal keys the newer entry wins."""
    a, b = next(old, None), next(new, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a.key < b.key):
            yield a
            a = next(old, None)
        else:
            if a is not None and a.key == b.key:
                a = next(old, None)
            yield b
            b = next(new, None)


class _Download:
    """The blob in a temporary file for the `with` block: (path, etag), or (None, None) if it does not exist."""

    def __init__(self, blob):
        self.blob = blob
        self.path = None

    def __enter__(self):
        try:
            downloader = self.blob.download_blob()
        except ResourceNotFoundError:
            return None, None
        fd, self.path = tempfile.mkstemp(prefix="state-", suffix=".gz")
        with os.fdopen(fd, "wb") as out:
            downloader.readinto(out)
        return self.path, downloader.properties.etag

    def __exit__(self, *exc):
        if self.path:
            os.unlink(self.path)


class _AckTable:
    """Acknowledgements keyed by contact in a temporary SQLite file (later ones replace earlier ones)."""

    def __enter__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="fold-")
        self.db = sqlite3.connect(f"{self._dir.name}/acks.sqlite")
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; CREATE TABLE acks(key TEXT PRIMARY "
                              "KEY, fp TEXT, member INT, source TEXT) WITHOUT ROWID;")
        return self

    def add(self, acks: Iterable[Acked]) -> int:
        before = self.db.total_changes
        self.db.executemany("INSERT OR REPLACE INTO acks VALUES (?,?,?,?)", acks)
        return self.db.total_changes - before

    def clear(self) -> None:
        self.db.execute("DELETE FROM acks")

    def sorted(self) -> Iterator[Acked]:
        for key, fp, member, source in self.db.execute("SELECT * FROM acks ORDER BY key"):
            yield Acked(key, fp, bool(member), source)

    def __exit__(self, *exc):
        self.db.close()
        self._dir.cleanup()
