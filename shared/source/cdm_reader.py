"""Find the newest complete snapshot of a segment in a Customer Insights export container, and stream its rows.

Customer Insights writes `<...>/<ExportName>/model.json` (CDM folder metadata) and one folder per refresh,
`<Segment>/<YYYY>/<MM>/<DD>/<HHMM>/<Segment>_<N>.csv`. A refresh is complete once model.json names its
partitions, so model.json decides; folders it does not name are runs still being written, or old ones.

Reading never holds a whole partition in memory: blob chunks are decoded incrementally, split into lines and
fed to the stdlib csv reader, which keeps line breaks inside quoted values.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import ipaddress
import json
import logging
import posixpath
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import BlobProperties, ContainerClient

log = logging.getLogger("autopilot.cdm")

READ_CHUNK = 4 * 1024 * 1024  # bytes per ranged read: bounds memory whatever the partition's size
RECORDS_AT_ONCE = 5000  # records handed to planning together
FIELD_LIMIT = 16 * 1024 * 1024  # characters in one CSV value (csv's default, 128 KiB, is too small for JSON columns)
_ESCAPED = re.compile("[\udc80-\udcff]")  # undecodable bytes, kept by the surrogateescape error handler


class ExportDataError(Exception):
    """The export in Blob Storage cannot be read as a snapshot; the message names the blob and the problem."""


class NotThere(ExportDataError):
    """What was asked for is not in the export storage: the container, any model.json, or the segment."""


@dataclass(frozen=True)
class CsvSettings:
    """A partition's fileFormatSettings, with the CDM defaults for anything missing."""

    headers: bool = False
    delimiter: str = ","
    encoding: str = "utf-8"  # a Python codec name
    quoting: int = csv.QUOTE_MINIMAL  # csv.QUOTE_NONE for QuoteStyle.None: every line break ends a row


@dataclass(frozen=True)
class Partition:
    name: str  # blob name in the export container
    settings: CsvSettings = field(default_factory=CsvSettings)
    snapshot: str | None = None  # blob snapshot named by the location's ?snapshot=
    etag: str | None = field(default=None, compare=False)  # the version the snapshot id stands for; reads check it
    size: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Snapshot:
    id: str
    refresh_time: str | None
    columns: tuple[str, ...]
    partitions: tuple[Partition, ...]
    folder: str  # the run folder, e.g. `.../HighValueSegment/2026/03/02/0415`
    model: str = ""  # the model.json it came from
    types: tuple[str | None, ...] = field(default=(), compare=False)  # each column's CDM dataType, as model.json says


@dataclass(frozen=True, slots=True)
class Row:
    """One data row. `number` is the row's position in the partition file counting every CSV record, the header
    row too (as a spreadsheet numbers rows), so the first data row after a header is 2. It equals the line number
    unless an earlier value holds a line break."""

    partition: str
    number: int
    values: list[str]


@dataclass(frozen=True, slots=True)
class BadRow:
    partition: str
    number: int
    reason: str


# --- snapshot discovery ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Model:
    blob: str
    data: dict
    modified: datetime  # modifiedTime, or the blob's last-modified time when that is missing or unreadable
    last_modified: datetime

    @property
    def folder(self) -> str:
        return posixpath.dirname(self.blob)

    def entities(self) -> list[dict]:
        entities = self.data.get("entities")
        return [e for e in entities if isinstance(e, dict)] if isinstance(entities, list) else []

    def entity(self, name: str) -> dict | None:
        return next((e for e in self.entities() if e.get("name") == name), None)


@dataclass(frozen=True)
class SegmentModel:
    """A segment some model.json describes: the newest such model.json, and when it was modified."""

    name: str
    model: str
    modified: datetime


def list_segments(container: ContainerClient, prefix: str) -> list[SegmentModel]:
    """Every segment the model.json files under `prefix` (any depth) describe, each with the newest model.json that
    does (the one find_snapshot reads), sorted by name. NotThere when the container does not exist."""
    blobs, _ = _listing(container, prefix)
    newest: dict[str, _Model] = {}
    for model in _models(container, blobs):
        for name in {e.get("name") for e in model.entities() if isinstance(e.get("name"), str) and e.get("name")}:
            if name not in newest or _age(model) > _age(newest[name]):
                newest[name] = model
    return [SegmentModel(name, newest[name].blob, newest[name].modified) for name in sorted(newest)]


def _listing(container: ContainerClient, prefix: str) -> tuple[dict[str, BlobProperties], str]:
    """The blobs under `prefix` by name, and where that is in words."""
    try:
        blobs = {b.name: b for b in container.list_blobs(name_starts_with=prefix or None)}
    except ResourceNotFoundError:
        raise NotThere(f"export container {container.container_name!r} does not exist in the export storage "
                       "account: check source.container and source.connection") from None
    return blobs, f"container {container.container_name!r}" + (f" under prefix {prefix!r}" if prefix else "")


def _models(container: ContainerClient, blobs: dict[str, BlobProperties]) -> list[_Model]:
    return [_load_model(container, blobs[n]) for n in sorted(n for n in blobs if posixpath.basename(n) == "model.json")]


def _age(model: _Model) -> tuple[datetime, datetime]:
    """What makes one model.json newer than another."""
    return model.modified, model.last_modified


def find_snapshot(container: ContainerClient, prefix: str, segment: str) -> Snapshot:
    """The newest complete snapshot of `segment` among the model.json files under `prefix` (any depth)."""
    blobs, where = _listing(container, prefix)
    models = _models(container, blobs)
    if not models:
        raise NotThere(f"no model.json found in {where}: check the export's container and prefix, and that "
                       "Customer Insights has run the export at least once")
    candidates = [m for m in models if m.entity(segment) is not None]
    if not candidates:
        raise NotThere(f"segment {segment!r} is not in any model.json in {where}; {_inventory(models)} "
                       "(segment names are case-sensitive)")
    model = max(candidates, key=_age)
    entity = model.entity(segment)
    columns = _columns(model, entity, segment)
    named = entity.get("partitions")
    if named:
        partitions = _named_partitions(container, blobs, model, segment, named)
        refresh = _refresh_time(model, named)
    else:
        partitions, refresh = _newest_folder(blobs, model, segment)
    return Snapshot(
        id=_snapshot_id(model.blob, partitions), refresh_time=refresh, columns=columns,
        partitions=partitions, folder=posixpath.commonpath([posixpath.dirname(p.name) for p in partitions]),
        model=model.blob, types=_types(entity),
    )


def _refresh_time(model: _Model, named: list[dict]) -> str | None:
    times = [p["refreshTime"] for p in named if isinstance(p.get("refreshTime"), str)]
    modified = model.data.get("modifiedTime")
    return max(times, default=modified if isinstance(modified, str) else None)


def _load_model(container: ContainerClient, blob: BlobProperties) -> _Model:
    raw = container.get_blob_client(blob.name).download_blob().readall()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportDataError(f"{blob.name} is not valid JSON ({exc}); Customer Insights writes it as CDM metadata: "
                              "re-run the export, or remove the file if it does not belong there") from None
    if not isinstance(data, dict):
        raise ExportDataError(f"{blob.name} is not a CDM model (expected a JSON object with \"entities\")")
    last = blob.last_modified or datetime.min.replace(tzinfo=UTC)
    return _Model(blob.name, data, _parse_time(data.get("modifiedTime")) or last, last)


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)  # the docs give no zone: assume UTC


def _inventory(models: list[_Model]) -> str:
    found = [f"{m.blob}: {', '.join(repr(e.get('name')) for e in m.entities()) or 'no entities'}" for m in models]
    return "found " + "; ".join(found)


def _columns(model: _Model, entity: dict, segment: str) -> tuple[str, ...]:
    attributes = entity.get("attributes")
    names = [a.get("name") for a in attributes if isinstance(a, dict)] if isinstance(attributes, list) else []
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ExportDataError(f"{model.blob}: entity {segment!r} must list its columns as attributes with names")
    return tuple(names)


def _types(entity: dict) -> tuple[str | None, ...]:
    """Each attribute's dataType (None where it names none); _columns has checked the attributes."""
    return tuple(a["dataType"] if isinstance(a.get("dataType"), str) else None for a in entity["attributes"])


def _named_partitions(container: ContainerClient, blobs: dict[str, BlobProperties], model: _Model, segment: str,
                      named: Any) -> tuple[Partition, ...]:
    if not isinstance(named, list) or not all(isinstance(p, dict) for p in named):
        raise ExportDataError(f"{model.blob}: partitions of entity {segment!r} must be a list of objects")
    partitions = []
    for index, raw in enumerate(named):
        label = f"{model.blob}: partition {raw.get('name') or index!r} of {segment!r}"
        if not isinstance(raw.get("location"), str) or not raw["location"].strip():
            raise ExportDataError(f"{label} has no location")
        name, snap = blob_name(raw["location"], container.container_name, model.folder)
        partition = Partition(name, csv_settings(raw.get("fileFormatSettings"), label), snap)
        partitions.append(_with_version(container, blobs, partition, label))
    return tuple(partitions)


def _with_version(container: ContainerClient, blobs: dict[str, BlobProperties], partition: Partition,
                  label: str) -> Partition:
    """The partition with its blob's ETag and size; a partition whose blob is absent is an error."""
    try:
        found = blobs.get(partition.name) if partition.snapshot is None else None
        # outside the listed prefix, or a blob snapshot: ask for it
        found = found or container.get_blob_client(partition.name, snapshot=partition.snapshot).get_blob_properties()
        return replace(partition, etag=found.etag, size=found.size)
    except ResourceNotFoundError:
        snap = f" (snapshot {partition.snapshot})" if partition.snapshot else ""
        raise ExportDataError(f"{label} names blob {partition.name!r}{snap}, which does not exist in container "
                              f"{container.container_name!r}: the export may have been cleaned up mid-run") from None


def blob_name(location: str, container: str, model_folder: str = "") -> tuple[str, str | None]:
    """Map a partition location to (blob name, blob snapshot or None) in the configured container.

    The location is an account URL, `https://<account>.blob.core.windows.net/<container>/<path>[?snapshot=...]`
    (path-style `http://127.0.0.1:10000/<account>/<container>/...` for emulators), possibly percent-encoded.
    The account is ignored: the export's connection decides which account is read. When the URL names another
    container than the configured one, the path after that container is still taken, in the configured
    container (the export may have been copied), and a warning is logged. A location without a scheme is taken
    as a path relative to model.json's folder.
    """
    parts = urlsplit(location.strip())
    snapshot = parse_qs(parts.query).get("snapshot", [None])[0]
    path = unquote(parts.path).lstrip("/")
    if not parts.scheme:
        return posixpath.join(model_folder, path) if model_folder else path, snapshot
    segments = path.split("/")
    if len(segments) > 2 and segments[0] != container and (segments[1] == container or _path_style(parts.hostname)):
        segments = segments[1:]
    if len(segments) < 2 or not segments[-1]:
        raise ExportDataError(f"partition location {location!r} does not name a blob")
    if segments[0] != container:
        log.warning("partition location %s names container %r; reading %r from %r", location, segments[0],
                    "/".join(segments[1:]), container)
    return "/".join(segments[1:]), snapshot


def _path_style(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _snapshot_id(model: str, partitions: Sequence[Partition]) -> str:
    """Same model.json and the same partition blobs (by name, snapshot and ETag) give the same id."""
    items = sorted(f"{p.name}|{p.snapshot or ''}|{p.etag}" for p in partitions)
    return hashlib.sha256("\n".join([model, *items]).encode()).hexdigest()[:32]


_FOLDER = r"(\d{4})/(\d{2})/(\d{2})/(\d{2})(\d{2})"


def _newest_folder(blobs: dict[str, BlobProperties], model: _Model,
                   segment: str) -> tuple[tuple[Partition, ...], str]:
    """model.json names no partitions: the newest run folder not newer than model.json, all its `<segment>_N.csv`."""
    base = posixpath.join(model.folder, segment) if model.folder else segment
    pattern = re.compile(f"{re.escape(base)}/{_FOLDER}/{re.escape(segment)}_(\\d+)\\.csv")
    runs: dict[datetime, list[tuple[int, str]]] = {}
    for name in blobs:
        match = pattern.fullmatch(name)
        if match:
            when = _folder_time(match.groups()[:5])
            if when is not None and when <= model.modified:
                runs.setdefault(when, []).append((int(match.group(6)), name))
    if not runs:
        raise ExportDataError(f"{model.blob}: entity {segment!r} names no partitions, and no complete run folder "
                              f"{base}/YYYY/MM/DD/HHMM/{segment}_N.csv exists (none older than model.json)")
    when = max(runs)
    names = [name for _, name in sorted(runs[when])]
    partitions = tuple(Partition(n, etag=blobs[n].etag, size=blobs[n].size) for n in names)
    return partitions, when.strftime("%Y-%m-%dT%H:%M:00Z")


def _folder_time(parts: Sequence[str]) -> datetime | None:
    try:
        return datetime(*(int(p) for p in parts), tzinfo=UTC)
    except ValueError:
        return None


def csv_settings(raw: Any, where: str = "partition") -> CsvSettings:
    """fileFormatSettings → CsvSettings; missing keys (or the whole object) take the CDM defaults."""
    if raw is None:
        return CsvSettings()
    if not isinstance(raw, dict):
        raise ExportDataError(f"{where}: fileFormatSettings must be an object")
    headers = raw.get("columnHeaders")
    if isinstance(headers, str) and headers.strip().lower() in ("true", "false"):
        headers = headers.strip().lower() == "true"
    if headers is not None and not isinstance(headers, bool):
        raise ExportDataError(f"{where}: columnHeaders must be true or false, got {headers!r}")
    delimiter = raw.get("delimiter") or ","
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in '"\r\n':
        raise ExportDataError(f"{where}: delimiter must be one character other than a quote or line break, "
                              f"got {delimiter!r}")
    try:
        encoding = codecs.lookup(str(raw.get("encoding") or "UTF-8")).name
    except LookupError:
        raise ExportDataError(f"{where}: unknown encoding {raw.get('encoding')!r}") from None
    style = str(raw.get("quoteStyle") or "QuoteStyle.Csv").strip().lower().removeprefix("quotestyle.")
    if style not in ("csv", "none"):
        raise ExportDataError(f"{where}: quoteStyle must be QuoteStyle.Csv or QuoteStyle.None, "
                              f"got {raw.get('quoteStyle')!r}")
    return CsvSettings(bool(headers), delimiter, encoding, csv.QUOTE_NONE if style == "none" else csv.QUOTE_MINIMAL)


# --- reading records and rows --------------------------------------------------------------------
@dataclass(frozen=True)
class Records:
    """One partition's CSV records as text, before parsing: planning parses only the records it has not
    acknowledged in that exact form (planner.Planner), so a refresh costs what changed, not its size.

    A record is its physical lines joined (a quoted value may hold line breaks: lines are joined while a quote is
    open) without its final line break. Records are numbered from 1, counting every CSV record, the header row
    too (as a spreadsheet numbers rows): `Row.number` and the rejection reports use the same numbers.
    """

    name: str
    chunks: Iterable[bytes]
    settings: CsvSettings

    def __iter__(self) -> Iterator[list[tuple[int, int, str]]]:
        """Lists of (number, first physical line, text), at most RECORDS_AT_ONCE at a time (a streamed first sync
        sends its first batch after the first list, not a whole blob chunk). Blank lines are left out (their
        numbers too); a quote still open at the end is handed over as it is, for the parser to name."""
        decoded = _Decoded(self.chunks, self.settings.encoding, self.name)
        quoted = self.settings.quoting != csv.QUOTE_NONE
        number = line = 0
        open_lines: list[str] = []
        for lines in decoded.line_lists():
            records = []
            for text in lines:
                line += 1
                if open_lines:
                    open_lines.append(text)
                    if text.count('"') & 1:  # the open quote closes on this line
                        number += 1
                        records.append((number, line - len(open_lines) + 1, "\n".join(open_lines)))
                        open_lines = []
                elif quoted and text.count('"') & 1:
                    open_lines = [text]
                elif text and text != "\r":
                    number += 1
                    records.append((number, line, text))
                else:
                    number += 1  # a blank line is a record of no values (a trailing one, typically)
                if len(records) == RECORDS_AT_ONCE:
                    yield records
                    records = []
            if records:
                yield records
        if open_lines:
            yield [(number + 1, line - len(open_lines) + 1, "\n".join(open_lines))]

    def parse(self, records: list[tuple[int, int, str]], columns: Sequence[str]) -> Iterator[Row | BadRow]:
        """The records as rows, in order. A record with the wrong number of values, or with bytes that are not
        valid in the encoding, becomes a BadRow naming the problem. Broken quoting (an unclosed quote, text
        after a closing quote) or a line break in an unquoted value raises ExportDataError: the records after it
        cannot be told apart, and treating them as absent would remove those contacts from the audience."""
        if csv.field_size_limit() < FIELD_LIMIT:
            csv.field_size_limit(FIELD_LIMIT)
        settings, width, header = self.settings, len(columns), list(columns)
        reader = csv.reader((text + "\n" for _, _, text in records), delimiter=settings.delimiter,
                            quoting=settings.quoting, strict=True)
        at = 0
        try:
            for at, values in enumerate(reader):
                number = records[at][0]
                if number == 1 and (settings.headers or values == header):
                    continue
                text = records[at][2]  # (ASCII text holds no escaped byte: isascii is a flag check)
                if not text.isascii() and _ESCAPED.search(text) and (reason := _undecodable(values, columns,
                                                                                            settings.encoding)):
                    yield BadRow(self.name, number, reason)
                elif len(values) != width:
                    yield BadRow(self.name, number, f"expected {width} columns, got {len(values)}")
                else:
                    yield Row(self.name, number, values)
        except csv.Error as exc:
            number, line, _ = records[max(1, min(reader.line_num, len(records))) - 1]  # one record per string
            problem = str(exc).split(" - ")[0]  # drop the csv module's hint about opening files: it misleads here
            raise ExportDataError(f"partition {self.name}: row {number} (from line {line}) is not valid CSV: "
                                  f"{problem}; the file looks damaged (a stray quote or line break?): re-run the "
                                  "export") from None


def read_records(container: ContainerClient, snapshot: Snapshot) -> Iterator[Records]:
    """Every partition's records, in partition order, streamed READ_CHUNK bytes at a time."""
    for partition in snapshot.partitions:
        yield Records(partition.name, _blob_chunks(container, partition), partition.settings)


def count_records(container: ContainerClient, snapshot: Snapshot) -> int:
    """The snapshot's data records, told apart as planning does but not parsed (announced header rows left out):
    at least as many as its valid profiles."""
    return sum(sum(map(len, records)) - records.settings.headers for records in read_records(container, snapshot))


def records_fit(container: ContainerClient, snapshot: Snapshot, most: int) -> bool:
    """Whether the snapshot holds at most `most` data records, so at most that many valid profiles: a streamed
    first sync checks maxProfiles with it before it sends. A partition has at most one record more than its line
    break bytes (a quoted value may hold more breaks), and counting those costs a fraction of telling the records
    apart: only a snapshot whose breaks exceed `most` (or in an encoding without the byte) is counted record by
    record."""
    breaks = 0
    for partition in snapshot.partitions:
        if b"\n" not in "\n".encode(partition.settings.encoding):
            return count_records(container, snapshot) <= most
        breaks += 1 + sum(chunk.count(b"\n") for chunk in _blob_chunks(container, partition))
        if breaks > most:
            return count_records(container, snapshot) <= most
    return True


def read_rows(container: ContainerClient, snapshot: Snapshot) -> Iterator[Row | BadRow]:
    """Every row of every partition, parsed (what planning does with the records it has not acknowledged)."""
    for records in read_records(container, snapshot):
        yield from _rows(records, snapshot.columns)


def parse_partition(name: str, chunks: Iterable[bytes], settings: CsvSettings,
                    columns: Sequence[str]) -> Iterator[Row | BadRow]:
    """Every row of one partition from its byte chunks: a pure function (no I/O)."""
    return _rows(Records(name, chunks, settings), columns)


def _rows(records: Records, columns: Sequence[str]) -> Iterator[Row | BadRow]:
    for chunk in records:
        yield from records.parse(chunk, columns)


def _blob_chunks(container: ContainerClient, partition: Partition) -> Iterator[bytes]:
    """The blob in ranged reads, each required to be the version the snapshot id names.

    Ranged reads rather than download_blob().chunks(): that buffers its first 32 MiB in one piece.
    """
    blob = container.get_blob_client(partition.name, snapshot=partition.snapshot)
    etag, size = partition.etag, partition.size
    if etag is None or size is None:
        properties = blob.get_blob_properties()
        etag, size = properties.etag, properties.size
    for offset in range(0, size, READ_CHUNK):
        try:
            data = blob.download_blob(offset=offset, length=min(READ_CHUNK, size - offset), etag=etag,
                                      match_condition=MatchConditions.IfNotModified).readall()
        except (ResourceModifiedError, ResourceNotFoundError) as exc:
            raise ExportDataError(f"partition {partition.name} changed or vanished while it was read "
                                  f"({type(exc).__name__}); the next run reads the export again") from None
        yield data


class _Decoded:
    """Text lines from byte chunks; undecodable bytes are kept as escapes (see _undecodable)."""

    def __init__(self, chunks: Iterable[bytes], encoding: str, name: str):
        self.chunks, self.encoding, self.name = chunks, encoding, name

    def line_lists(self) -> Iterator[list[str]]:
        """The lines of each chunk, without their line breaks (a line cut by a chunk's end goes with the next)."""
        # Split on \n only: str.splitlines would also split on \x1c, \u2028... which may be data.
        decoder = codecs.getincrementaldecoder(self.encoding)(errors="surrogateescape")
        tail, started, offset = "", False, 0
        for chunk in self.chunks:
            text = self._decode(decoder, chunk, offset)
            offset += len(chunk)
            if not text:
                continue
            if not started:  # a byte-order mark is not data
                text, started = text.removeprefix("\ufeff"), True
            lines = (tail + text).split("\n")
            tail = lines.pop()
            if lines:
                yield lines
        tail += self._decode(decoder, b"", offset, final=True)
        if tail:
            yield [tail.removeprefix("\ufeff") if not started else tail]

    def _decode(self, decoder: codecs.IncrementalDecoder, chunk: bytes, offset: int, final: bool = False) -> str:
        try:
            text = decoder.decode(chunk, final)
        except UnicodeDecodeError as exc:  # only for bytes below 0x80, which UTF-8 never rejects
            raise ExportDataError(f"partition {self.name}: not valid {self.encoding} near byte {offset + exc.start}"
                                  ) from None
        return text


def _undecodable(values: list[str], columns: Sequence[str], encoding: str) -> str | None:
    for index, value in enumerate(values):
        bad = _ESCAPED.findall(value)
        if bad:
            column = columns[index] if index < len(columns) else f"#{index + 1}"
            shown = " ".join(f"0x{ord(c) - 0xDC00:02x}" for c in bad[:4])
            return f"invalid {encoding} in column {column}: byte {shown}"
    return None
