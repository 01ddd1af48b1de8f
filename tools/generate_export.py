"""Write segment exports the way Customer Insights does, into a blob container (Azurite) or a local folder.

    <prefix>CustomerInsights_<environment>/<ExportName>/model.json
    <prefix>CustomerInsights_<environment>/<ExportName>/<Segment>/<YYYY>/<MM>/<DD>/<HHMM>/<Segment>_<N>.csv

Each refresh adds a run folder and rewrites model.json to name its partitions (other entities in model.json are
kept), as Customer Insights does. Partitions are spooled to temporary files and uploaded as streams, so a
million rows never sit in memory.

    python -m tools.generate_export --out DIR --profiles N [--segment S] [--partitions P] [--seed S] [--time ISO]
"""

from __future__ import annotations

import argparse
import codecs
import csv
import io
import json
import math
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

ENVIRONMENT = "5e1f7a9c-2b3d-4c6e-8f01-a2b3c4d5e6f7"
ACCOUNT = "fabrikamci"
LOCAL_CONTAINER = "ciexports"  # the container name a local folder stands for, in partition URLs


class _Columns(tuple):
    """A tuple of column names that may also be called: `STANDARD_COLUMNS` and `STANDARD_COLUMNS()` both work."""

    def __call__(self) -> tuple[str, ...]:
        return tuple(self)


STANDARD_COLUMNS = _Columns((
    "CustomerId", "PrimaryEmail", "FirstName", "LastName", "CompanyName", "StreetAddress", "City", "Country",
    "Phone", "LoyaltyPoints", "LifetimeValue", "LastPurchase", "IsVip",
))
DATA_TYPES = {"CustomerId": "GUID", "LoyaltyPoints": "int64", "LifetimeValue": "decimal",
              "LastPurchase": "dateTime", "IsVip": "boolean"}  # anything else is "string"

_FIRST = ("María", "Ken", "Ana", "Peter", "Lea", "Jo", "Zoë", "Søren", "Łukasz", "Ngọc", "Aiko", "Олег", "José",
          "Chloé", "Siobhán", "Mohammed", "Émilie", "王", "Priya", "Björn", "Amélie", "Dmitri", "")
_LAST = ("López", "Obi", "Silva", "Schmidt", "Weber", "Ng", "Müller", "Ødegaard", "Kowalski", "Nguyễn", "Tanaka",
         "Petrov", "O'Brien", "García", "Dubois", "Kim", "Smith", "Åberg", "")
_COMPANIES = ("Contoso", "Fabrikam, Inc.", 'The "Best" Bikes', "Northwind Traders", "Tailspin Toys",
              "Adventure Works", "Woodgrove Bank", "Litware; Ltd", "")
_CITIES = ("Sevilla", "Lagos", "Porto", "Köln", "Wien", "Hong Kong, Kowloon", "São Paulo", "Zürich", "Kraków",
           "東京", "")
_COUNTRIES = ("ES", "NG", "PT", "DE", "AT", "HK", "BR", "CH", "PL", "JP", "")
_DOMAINS = ("example.com", "Example.COM", "example.org", "fabrikam.example", "contoso.example", "mail.example.net")
_MASK = (1 << 64) - 1
_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


# --- profiles -------------------------------------------------------------------------------------
def _mix(i: int, seed: int) -> int:
    """splitmix64: a cheap, deterministic pseudo-random number per (profile, seed)."""
    x = ((i + 1) * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def profile_email(i: int, seed: int = 0) -> str:
    """Profile i's email: unique per i (even ignoring case), in varied case and shape."""
    h = _mix(i, seed)
    local = (f"user{i}", f"User.{i}", f"USER{i}+ci", f"u{i}.test")[h % 4]
    return f"{local}@{_DOMAINS[(h >> 4) % len(_DOMAINS)]}"


def profile(i: int, seed: int = 0) -> tuple[str, ...]:
    """Profile i as a row of STANDARD_COLUMNS; the same i and seed always give the same row."""
    h = _mix(i, seed)
    street = f"{h % 300 + 1} High St" + (f"\nApt {h % 40 + 1}" if (h >> 50) % 8 == 0 else "")
    purchase = _EPOCH + timedelta(seconds=(h >> 8) % (800 * 86400))
    return (
        str(uuid.UUID(int=(h << 64) | _mix(i, seed + 1))),
        profile_email(i, seed),
        _FIRST[(h >> 8) % len(_FIRST)],
        _LAST[(h >> 16) % len(_LAST)],
        _COMPANIES[(h >> 24) % len(_COMPANIES)],
        street,
        _CITIES[(h >> 32) % len(_CITIES)],
        _COUNTRIES[(h >> 36) % len(_COUNTRIES)],
        # valid numbers (Ortto exports send phones in international form and leave out any they cannot read), from
        # the 555-0100..0199 range set aside for fiction, so none is anyone's real number
        f"+1 201 555 01{h % 100:02d}" if (h >> 40) % 3 else "",
        str((h >> 12) % 5000) if (h >> 44) % 10 else "",
        f"{(h >> 20) % 1_000_000 / 100:.2f}",
        purchase.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "true" if (h >> 48) % 5 == 0 else "false",
    )


class Profiles(Sequence):
    """Profiles start..start+n-1, computed on demand (sized, so partitions split contiguously)."""

    def __init__(self, n: int, seed: int = 0, start: int = 0):
        self.n, self.seed, self.start = n, seed, start

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if not -self.n <= index < self.n:
            raise IndexError(index)
        return profile(self.start + index % self.n, self.seed)

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        seed = self.seed
        return (profile(i, seed) for i in range(self.start, self.start + self.n))


def sample_profiles(n: int, seed: int = 0, start: int = 0) -> Profiles:
    """n deterministic profiles (rows of STANDARD_COLUMNS) with unique emails, from profile number `start`."""
    return Profiles(n, seed, start)


# --- writing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CsvFormat:
    """How the partitions are written. The defaults are what Customer Insights writes: no header row,
    every value quoted, CRLF, UTF-8 without BOM, fileFormatSettings present."""

    header: bool = False
    quote_all: bool = True
    quote_none: bool = False  # QuoteStyle.None: values are never quoted (and must not need it)
    crlf: bool = True
    bom: bool = False  # a UTF-8 byte-order mark
    delimiter: str = ","
    encoding: str = "UTF-8"
    format_settings: bool = True  # False: omit fileFormatSettings entirely, as real producers do
    settings: dict = field(default_factory=dict)  # overrides of fileFormatSettings keys; None removes a key

    def file_format_settings(self) -> dict | None:
        if not self.format_settings:
            return None
        base = {
            "$type": "CsvFormatSettings", "columnHeaders": self.header, "delimiter": self.delimiter,
            "quoteStyle": "QuoteStyle.None" if self.quote_none else "QuoteStyle.Csv",
            "csvStyle": "CsvStyle.QuoteAlways" if self.quote_all else "CsvStyle.QuoteAfterDelimiter",
            "encoding": self.encoding,
        }
        merged = {**base, **self.settings}
        return {k: v for k, v in merged.items() if v is not None}

    def writer(self, text: IO[str]):
        quoting = csv.QUOTE_NONE if self.quote_none else csv.QUOTE_ALL if self.quote_all else csv.QUOTE_MINIMAL
        extra = {"quotechar": None} if self.quote_none else {}
        return csv.writer(text, delimiter=self.delimiter, quoting=quoting, lineterminator="\r\n" if self.crlf else "\n",
                          **extra)


@dataclass(frozen=True)
class Written:
    model: str  # model.json's blob name (or path under the folder)
    folder: str  # the run folder
    partitions: tuple[str, ...]
    rows: int
    refresh_time: str


def write_export(target: Any, rows: Iterable[Sequence[str]], *, columns: Sequence[str] = STANDARD_COLUMNS,
                 data_types: dict[str, str] | None = None, segment: str = "HighValueSegment",
                 export_name: str = "BlobExport", prefix: str = "", environment: str = ENVIRONMENT,
                 time: datetime | str | None = None, partitions: int = 1, fmt: CsvFormat | None = None,
                 name_partitions: bool = True, update_model: bool = True, account: str = ACCOUNT,
                 container_name: str | None = None) -> Written:
    """Write one refresh of `segment`. `target` is a ContainerClient or a local directory.

    Rows go to `partitions` files: contiguously when `rows` has a length, else round-robin. `update_model=False`
    leaves model.json alone (a run still being written); `name_partitions=False` writes the entity without
    partitions.
    """
    sink = _sink(target)
    fmt = fmt or CsvFormat()
    when = _time(time)
    base = f"{prefix}CustomerInsights_{environment}/{export_name}"
    folder = f"{base}/{segment}/{when:%Y/%m/%d/%H%M}"
    names = tuple(f"{folder}/{segment}_{n}.csv" for n in range(1, max(1, partitions) + 1))
    count = _write_partitions(sink, names, rows, columns, fmt)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    model = f"{base}/model.json"
    if update_model:
        url_container = container_name or sink.container
        located = [(name, f"https://{account}.blob.core.windows.net/{url_container}/{quote(name)}") for name in names]
        entity = _entity(segment, columns, data_types or DATA_TYPES, located if name_partitions else [], stamp, fmt)
        sink.write(model, json.dumps(_model(sink.read(model), export_name, entity, stamp), indent=2).encode())
    return Written(model, folder, names, count, stamp)


def _time(value: datetime | str | None) -> datetime:
    if value is None:
        return datetime.now(UTC).replace(microsecond=0)
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _write_partitions(sink: _Sink, names: Sequence[str], rows: Iterable[Sequence[str]], columns: Sequence[str],
                      fmt: CsvFormat) -> int:
    per = math.ceil(len(rows) / len(names)) if isinstance(rows, Sequence) and len(rows) else 0
    count = 0
    with ExitStack() as stack:
        writers = [stack.enter_context(_csv_writer(stack.enter_context(sink.open(name)), columns, fmt))
                   for name in names]
        last = len(writers) - 1
        for count, row in enumerate(rows, start=1):
            index = count - 1
            writers[min(index // per, last) if per else index % len(writers)].writerow(row)
    return count


@contextmanager
def _csv_writer(binary: IO[bytes], columns: Sequence[str], fmt: CsvFormat):
    if fmt.bom and codecs.lookup(fmt.encoding).name == "utf-8":  # UTF-16 and -32 always write their own
        binary.write(codecs.BOM_UTF8)
    with io.TextIOWrapper(binary, encoding=fmt.encoding, newline="") as text:
        writer = fmt.writer(text)
        if fmt.header:
            writer.writerow(columns)
        yield writer


def csv_bytes(rows: Iterable[Sequence[str]], columns: Sequence[str], fmt: CsvFormat | None = None) -> bytes:
    """One partition's bytes, written exactly as write_export writes them (for small in-memory tests)."""
    out = io.BytesIO()
    with _csv_writer(_Unclosable(out), columns, fmt or CsvFormat()) as writer:
        writer.writerows(rows)
    return out.getvalue()


def _entity(segment: str, columns: Sequence[str], types: dict[str, str], located: list[tuple[str, str]],
            stamp: str, fmt: CsvFormat) -> dict:
    settings = fmt.file_format_settings()
    parts = []
    for name, url in located:
        part = {"name": Path(name).stem, "refreshTime": stamp, "location": url}
        if settings is not None:
            part["fileFormatSettings"] = settings
        parts.append(part)
    return {
        "$type": "LocalEntity", "name": segment, "description": "",
        "annotations": [{"name": "ci:segmentName", "value": segment}],  # producers add keys readers must ignore
        "attributes": [{"name": c, "dataType": types.get(c, "string")} for c in columns],
        "partitions": parts,
    }


def _model(existing: bytes | None, export_name: str, entity: dict, stamp: str) -> dict:
    model = json.loads(existing) if existing else {}
    entities = [e for e in model.get("entities", []) if e.get("name") != entity["name"]]
    return {
        **model, "name": export_name, "description": model.get("description", ""), "version": "1.0",
        "culture": "en-US", "modifiedTime": stamp, "entities": [*entities, entity],
    }


# --- where files go -------------------------------------------------------------------------------
class _Sink:
    container: str

    def open(self, name: str):  # a context manager giving a binary file to write `name` through
        raise NotImplementedError

    def write(self, name: str, data: bytes) -> None:
        with self.open(name) as out:
            out.write(data)

    def read(self, name: str) -> bytes | None:
        raise NotImplementedError


class _DirSink(_Sink):
    def __init__(self, root: Path, container: str):
        self.root, self.container = root, container

    @contextmanager
    def open(self, name: str):
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            yield _Unclosable(out)

    def read(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.exists() else None


class _BlobSink(_Sink):
    def __init__(self, client):
        self.client, self.container = client, client.container_name

    @contextmanager
    def open(self, name: str):
        with tempfile.TemporaryFile() as spool:
            yield _Unclosable(spool)
            size = spool.tell()
            spool.seek(0)
            self.client.get_blob_client(name).upload_blob(spool, length=size, overwrite=True, max_concurrency=4)

    def read(self, name: str) -> bytes | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self.client.get_blob_client(name).download_blob().readall()
        except ResourceNotFoundError:
            return None


class _Unclosable(io.RawIOBase):
    """Lets a TextIOWrapper flush into a file on exit without closing it (the sink uploads it afterwards)."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:  # lets TextIOWrapper see the start of the stream (UTF-16 writes its BOM there)
        return self.raw.seekable()

    def tell(self) -> int:
        return self.raw.tell()

    def write(self, data) -> int:
        return self.raw.write(data)


def _sink(target: Any) -> _Sink:
    if isinstance(target, str | Path):
        return _DirSink(Path(target), LOCAL_CONTAINER)
    return _BlobSink(target)


# --- command line ---------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder that mirrors the export container")
    parser.add_argument("--profiles", type=int, required=True)
    parser.add_argument("--segment", default="HighValueSegment")
    parser.add_argument("--export-name", default="BlobExport")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="number of the first profile")
    parser.add_argument("--time", help="refresh time, ISO 8601 (default: now, UTC)")
    parser.add_argument("--header", action="store_true", help="write a header row (columnHeaders true)")
    args = parser.parse_args(argv)
    written = write_export(args.out, sample_profiles(args.profiles, args.seed, args.start), segment=args.segment,
                           export_name=args.export_name, partitions=args.partitions, time=args.time,
                           fmt=CsvFormat(header=args.header))
    print(f"wrote {written.rows} profiles in {len(written.partitions)} partition(s) under {args.out}/{written.folder}")
    print(f"model: {args.out}/{written.model}")


if __name__ == "__main__":
    main()
