"""Reading Customer Insights exports: real CDM folders in Azurite, written as Customer Insights writes them."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.source import cdm_reader
from shared.source.cdm_reader import (
    BadRow,
    CsvSettings,
    ExportDataError,
    Partition,
    Row,
    blob_name,
    count_records,
    csv_settings,
    find_snapshot,
    parse_partition,
    read_rows,
    records_fit,
)
from tools.generate_export import ENVIRONMENT, STANDARD_COLUMNS, CsvFormat, csv_bytes, sample_profiles, write_export

SAMPLE = Path(__file__).resolve().parent / "fixtures" / "ci-export"
SEGMENT = "HighValueSegment"
CSV_DEFAULTS = CsvSettings()
BASE = f"CustomerInsights_{ENVIRONMENT}/BlobExport"
COLUMNS = ("CustomerId", "Email", "Name", "Note")
TRICKY = [
    ("1", "a@example.com", "María López", 'She said "hi", then left'),
    ("2", "b@example.com", "", "line one\nline two"),
    ("3", "c@example.com", "Zoë, Ødegaard", "windows\r\nbreak"),
    ("4", "", "O'Brien", ""),
    ("5", "e@example.com", "王", "tab\tand semicolon;"),
]


def values(container, snapshot) -> list[tuple[str, ...]]:
    rows = list(read_rows(container, snapshot))
    assert all(isinstance(r, Row) for r in rows), [r for r in rows if isinstance(r, BadRow)]
    return [tuple(r.values) for r in rows]


def parse(data: bytes, settings: CsvSettings = CSV_DEFAULTS, columns=COLUMNS, chunk: int = 1 << 20) -> list:
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    return list(parse_partition("p.csv", chunks, settings, columns))


def message(excinfo) -> str:
    return str(excinfo.value)


# --- the sample export (tests/fixtures/ci-export) ------------------------------------------------
def test_the_sample_export_reads_as_its_six_rows(container):
    for path in SAMPLE.rglob("*"):
        if path.is_file():
            container.upload_blob(path.relative_to(SAMPLE).as_posix(), path.read_bytes())
    snapshot = find_snapshot(container, "", "LapsedBuyers")
    assert snapshot.columns == ("CustomerId", "EmailAddress", "FirstName", "LastName", "City", "LastPurchase",
                                "LifetimeValue")
    assert snapshot.refresh_time == "2026-03-02T04:19:27Z"
    folder = "CustomerInsights_0b7d3c52-1e44-4a8f-9c21-5f6a7e8d9012/BlobExport/LapsedBuyers/2026/03/02/0415"
    assert snapshot.folder == folder
    assert snapshot.partitions == (Partition(f"{folder}/LapsedBuyers_1.csv", CsvSettings()),)
    rows = list(read_rows(container, snapshot))
    assert [r.number for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0].values[:4] == ["3f2a9c1e-0d4b-4c7a-9e51-1a2b3c4d5e6f", "maria.lopez@fabrikam.example", "María",
                                  "López"]
    assert rows[2].values[1] == "" and rows[3].values[3] == "" and rows[3].values[6] == ""
    assert rows[5].values[4] == "Hong Kong, Kowloon"


# --- formats ------------------------------------------------------------------------------------
def test_partitions_with_header_rows_read_back_in_order(container):
    profiles = sample_profiles(250, seed=3)
    written = write_export(container, profiles, partitions=3, time="2026-03-02T04:15:00Z",
                           fmt=CsvFormat(header=True))
    snapshot = find_snapshot(container, "", SEGMENT)
    assert [p.name for p in snapshot.partitions] == list(written.partitions)
    assert snapshot.columns == tuple(STANDARD_COLUMNS)
    rows = list(read_rows(container, snapshot))
    assert [tuple(r.values) for r in rows] == list(profiles)
    assert [(r.partition, r.number) for r in rows][:2] == [(written.partitions[0], 2), (written.partitions[0], 3)]
    assert rows[84].partition == written.partitions[1] and rows[84].number == 2  # 84 rows per partition, header first


FORMATS = {
    "customer insights default": CsvFormat(),
    "header row": CsvFormat(header=True),
    "header row, columnHeaders as a string": CsvFormat(header=True, settings={"columnHeaders": "true"}),
    "header row that columnHeaders does not announce": CsvFormat(header=True, settings={"columnHeaders": None}),
    "minimal quoting, LF": CsvFormat(quote_all=False, crlf=False),
    "minimal quoting, CRLF, BOM": CsvFormat(quote_all=False, bom=True),
    "BOM and header row": CsvFormat(bom=True, header=True),
    "no fileFormatSettings": CsvFormat(format_settings=False),
    "semicolons": CsvFormat(delimiter=";", quote_all=False),
    "UTF-16": CsvFormat(encoding="UTF-16", header=True),
}


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_every_format_reads_back_identically(container, fmt):
    write_export(container, TRICKY, columns=COLUMNS, partitions=2, time="2026-03-02T04:15:00Z", fmt=fmt)
    assert values(container, find_snapshot(container, "", SEGMENT)) == TRICKY


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_the_record_count_bounds_the_rows_from_above_whatever_the_format(container, fmt):
    """A streamed first sync trusts it to say maxProfiles cannot be exceeded (an unannounced header counts)."""
    write_export(container, TRICKY, columns=COLUMNS, partitions=2, time="2026-03-02T04:15:00Z", fmt=fmt)
    counted = count_records(container, find_snapshot(container, "", SEGMENT))
    assert counted == len(TRICKY) + 2 * (fmt.header and not fmt.file_format_settings().get("columnHeaders"))


def test_the_record_count_is_the_row_count_with_line_breaks_inside_values(container):
    profiles = list(sample_profiles(250, seed=4))
    write_export(container, profiles, partitions=3, time="2026-03-02T04:15:00Z", fmt=CsvFormat(header=True))
    assert any("\n" in value for row in profiles for value in row)
    assert count_records(container, find_snapshot(container, "", SEGMENT)) == 250


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_records_fit_a_limit_exactly_when_the_record_count_does(container, fmt):
    write_export(container, TRICKY, columns=COLUMNS, partitions=2, time="2026-03-02T04:15:00Z", fmt=fmt)
    snapshot = find_snapshot(container, "", SEGMENT)
    counted = count_records(container, snapshot)
    assert records_fit(container, snapshot, counted) and not records_fit(container, snapshot, counted - 1)


def test_records_fit_far_under_the_limit_without_telling_records_apart(container, monkeypatch):
    """The line breaks are counted, not the records (about 15 times cheaper): only a snapshot near the limit is
    counted record by record, and line breaks inside values then do not make it look bigger than it is."""
    profiles = list(sample_profiles(250, seed=4))
    write_export(container, profiles, partitions=3, time="2026-03-02T04:15:00Z", fmt=CsvFormat(header=True))
    snapshot = find_snapshot(container, "", SEGMENT)
    assert records_fit(container, snapshot, 250)  # more line breaks than 250: told apart, and 250 records fit
    monkeypatch.setattr(cdm_reader, "count_records", lambda *args: pytest.fail("records told apart"))
    assert records_fit(container, snapshot, 1000)


def test_quote_style_none_ends_a_row_at_every_line_break_and_keeps_quotes(container):
    rows = [("1", "a@example.com", 'say "hi"', "x"), ("2", "b@example.com", '"', "")]
    write_export(container, rows, columns=COLUMNS, time="2026-03-02T04:15:00Z", fmt=CsvFormat(quote_none=True))
    assert values(container, find_snapshot(container, "", SEGMENT)) == rows


def test_small_ranged_reads_split_characters_and_rows_without_loss(container, monkeypatch):
    monkeypatch.setattr(cdm_reader, "READ_CHUNK", 1001)
    profiles = sample_profiles(600, seed=9)
    write_export(container, profiles, time="2026-03-02T04:15:00Z", fmt=CsvFormat(bom=True))
    assert values(container, find_snapshot(container, "", SEGMENT)) == list(profiles)


def test_a_partition_rewritten_after_discovery_is_not_read_as_the_old_snapshot(container):
    written = write_export(container, sample_profiles(5), time="2026-03-02T04:15:00Z")
    snapshot = find_snapshot(container, "", SEGMENT)
    container.upload_blob(written.partitions[0], b'"x","y@example.com"\r\n', overwrite=True)
    with pytest.raises(ExportDataError) as caught:
        list(read_rows(container, snapshot))
    assert message(caught) == (f"partition {written.partitions[0]} changed or vanished while it was read "
                               "(ResourceModifiedError); the next run reads the export again")
    assert find_snapshot(container, "", SEGMENT).id != snapshot.id


def test_a_header_row_is_skipped_only_when_it_repeats_the_attribute_names():
    data = b"CustomerId,Email,Name,Note\n1,a@x.com,A,\n"
    assert [r.values for r in parse(data)] == [["1", "a@x.com", "A", ""]]
    assert [r.number for r in parse(data)] == [2]
    other = b"customerid,Email,Name,Note\n"
    assert [r.values for r in parse(other)] == [["customerid", "Email", "Name", "Note"]]


def test_blank_lines_are_not_rows_but_keep_the_numbering():
    assert [(r.number, r.values[0]) for r in parse(b"1,a,b,c\n\n3,a,b,c\n\n")] == [(1, "1"), (3, "3")]


@settings(max_examples=50, deadline=None)
@given(
    table=st.lists(st.lists(st.text(alphabet=st.sampled_from(list('ab ,;"\'\n\r\té€😀\u2028\x1c\x00')), max_size=6),
                            min_size=3, max_size=3), max_size=6),
    fmt=st.builds(CsvFormat, header=st.booleans(), quote_all=st.booleans(), crlf=st.booleans(), bom=st.booleans(),
                  delimiter=st.sampled_from([",", ";", "\t"])),
    chunk=st.integers(1, 9),
)
def test_any_table_written_as_cdm_csv_reads_back_identically(table, fmt, chunk):
    columns = ("A", "B", "C")
    if not fmt.crlf and not fmt.quote_all:  # Python's writer leaves a lone CR unquoted then: not valid RFC 4180
        table = [[v.replace("\r", "") for v in row] for row in table]
    table = [row for row in table if row != ["", "", ""]]  # an all-empty row of minimal quoting is a blank line
    if table and table[0] == list(columns) and not fmt.header:
        table = table[1:]
    data = csv_bytes(table, columns, fmt)
    rows = parse(data, csv_settings(fmt.file_format_settings()), columns, chunk)
    assert [r.values for r in rows] == table
    assert all(isinstance(r, Row) for r in rows)


# --- snapshot discovery -------------------------------------------------------------------------
def test_newest_refresh_named_by_model_json_wins_and_gets_a_new_id(container):
    write_export(container, sample_profiles(10), time="2026-03-02T04:15:00Z")
    first = find_snapshot(container, "", SEGMENT)
    assert find_snapshot(container, "", SEGMENT).id == first.id  # same snapshot, same id
    write_export(container, sample_profiles(10, start=5), time="2026-03-03T04:15:27Z")
    second = find_snapshot(container, "", SEGMENT)
    assert second.id != first.id
    assert second.folder == f"{BASE}/{SEGMENT}/2026/03/03/0415"
    assert second.refresh_time == "2026-03-03T04:15:27Z"
    assert values(container, second) == list(sample_profiles(10, start=5))


def test_a_run_folder_newer_than_model_json_is_still_being_written_and_ignored(container):
    write_export(container, sample_profiles(10), time="2026-03-02T04:15:00Z")
    before = find_snapshot(container, "", SEGMENT)
    write_export(container, sample_profiles(3, start=100), time="2026-03-03T04:15:00Z", update_model=False)
    after = find_snapshot(container, "", SEGMENT)
    assert after == before
    assert values(container, after) == list(sample_profiles(10))


def test_without_named_partitions_the_newest_folder_not_newer_than_model_json_is_read(container):
    write_export(container, sample_profiles(5), time="2026-03-01T04:15:00Z", name_partitions=False)
    write_export(container, sample_profiles(7, start=10), partitions=2, time="2026-03-02T04:15:00Z",
                 name_partitions=False)
    write_export(container, sample_profiles(3, start=100), time="2026-03-03T04:15:00Z", update_model=False)
    snapshot = find_snapshot(container, "", SEGMENT)
    assert snapshot.folder == f"{BASE}/{SEGMENT}/2026/03/02/0415"
    assert [p.name.rsplit("/", 1)[1] for p in snapshot.partitions] == [f"{SEGMENT}_1.csv", f"{SEGMENT}_2.csv"]
    assert snapshot.refresh_time == "2026-03-02T04:15:00Z"
    assert values(container, snapshot) == list(sample_profiles(7, start=10))
    assert find_snapshot(container, "", SEGMENT).id == snapshot.id


def test_the_model_json_holding_the_segment_is_chosen_and_the_newest_of_several(container):
    write_export(container, sample_profiles(2), segment="Other", export_name="First", time="2026-03-05T00:00:00Z")
    write_export(container, sample_profiles(4), export_name="Older", time="2026-03-01T00:00:00Z")
    write_export(container, sample_profiles(6), export_name="Newer", time="2026-03-02T00:00:00Z")
    snapshot = find_snapshot(container, "", SEGMENT)
    assert snapshot.model == f"CustomerInsights_{ENVIRONMENT}/Newer/model.json"
    assert len(values(container, snapshot)) == 6
    assert len(values(container, find_snapshot(container, "", "Other"))) == 2


def test_model_json_is_found_under_the_configured_prefix(container):
    write_export(container, sample_profiles(4), prefix="exports/marketing/", time="2026-03-02T04:15:00Z")
    write_export(container, sample_profiles(9), time="2026-03-02T04:15:00Z")
    snapshot = find_snapshot(container, "exports/marketing/", SEGMENT)
    assert snapshot.model.startswith("exports/marketing/")
    assert len(values(container, snapshot)) == 4


def test_a_location_with_percent_encoding_and_a_blob_snapshot_reads_that_snapshot(container):
    name = "Customer Insights/BlobExport/Seg/2026/03/02/0415/Seg_1.csv"
    blob = container.upload_blob(name, b"1,a@example.com,A,x\r\n")
    taken = blob.create_snapshot()["snapshot"]
    blob.upload_blob(b"2,overwritten@example.com,B,y\r\n", overwrite=True)
    location = f"https://acct.blob.core.windows.net/{container.container_name}/{quote(name)}?snapshot={quote(taken)}"
    model = {"name": "BlobExport", "version": "1.0", "modifiedTime": "2026-03-02T04:19:00Z", "entities": [{
        "$type": "LocalEntity", "name": "Seg", "attributes": [{"name": c, "dataType": "string"} for c in COLUMNS],
        "partitions": [{"name": "Seg_1", "location": location}]}]}
    container.upload_blob("Customer Insights/BlobExport/model.json", json.dumps(model).encode())
    snapshot = find_snapshot(container, "", "Seg")
    assert snapshot.partitions == (Partition(name, CsvSettings(), taken),)
    assert values(container, snapshot) == [("1", "a@example.com", "A", "x")]


@pytest.mark.parametrize("location, expected", [
    ("https://acct.blob.core.windows.net/ciexports/a/b%20c/d.csv", ("a/b c/d.csv", None)),
    ("https://acct.blob.core.windows.net/ciexports/a/d.csv?snapshot=2026-01-01T00%3A00%3A00Z",
     ("a/d.csv", "2026-01-01T00:00:00Z")),
    ("http://127.0.0.1:10000/devstoreaccount1/ciexports/a/d.csv", ("a/d.csv", None)),
    ("https://acct.dfs.core.windows.net/ciexports/a/d.csv", ("a/d.csv", None)),
    ("https://acct.blob.core.windows.net/copied-from/a/d.csv", ("a/d.csv", None)),  # another container: same path
    ("Seg/2026/03/02/0415/Seg_1.csv", ("Exp/Seg/2026/03/02/0415/Seg_1.csv", None)),  # relative to model.json
])
def test_partition_locations_map_to_blobs_in_the_configured_container(location, expected):
    assert blob_name(location, "ciexports", "Exp") == expected


# --- bad inputs: each with the exact message or rejection ----------------------------------------
def test_no_model_json(container):
    container.upload_blob("elsewhere/readme.txt", b"hi")
    with pytest.raises(ExportDataError) as caught:
        find_snapshot(container, "exports/", SEGMENT)
    assert message(caught) == (
        f"no model.json found in container '{container.container_name}' under prefix 'exports/': check the export's "
        "container and prefix, and that Customer Insights has run the export at least once")


def test_model_json_that_is_not_json(container):
    container.upload_blob("CustomerInsights_x/E/model.json", b"{entities: []}")
    with pytest.raises(ExportDataError) as caught:
        find_snapshot(container, "", SEGMENT)
    assert message(caught) == (
        "CustomerInsights_x/E/model.json is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
        "column 2 (char 1)); Customer Insights writes it as CDM metadata: re-run the export, or remove the file if it "
        "does not belong there")


def test_segment_missing_lists_the_entities_that_exist(container):
    write_export(container, sample_profiles(1), segment="LapsedBuyers", time="2026-03-02T04:15:00Z")
    write_export(container, sample_profiles(1), segment="NewCustomers", time="2026-03-02T04:16:00Z")
    with pytest.raises(ExportDataError) as caught:
        find_snapshot(container, "", "highvaluesegment")
    assert message(caught) == (
        f"segment 'highvaluesegment' is not in any model.json in container '{container.container_name}'; found "
        f"{BASE}/model.json: 'LapsedBuyers', 'NewCustomers' (segment names are case-sensitive)")


def test_a_partition_named_but_absent(container):
    written = write_export(container, sample_profiles(4), partitions=2, time="2026-03-02T04:15:00Z")
    container.delete_blob(written.partitions[1])
    with pytest.raises(ExportDataError) as caught:
        find_snapshot(container, "", SEGMENT)
    assert message(caught) == (
        f"{BASE}/model.json: partition '{SEGMENT}_2' of '{SEGMENT}' names blob '{written.partitions[1]}', which does "
        f"not exist in container '{container.container_name}': the export may have been cleaned up mid-run")


def test_no_named_partitions_and_no_complete_folder(container):
    write_export(container, [], time="2026-03-02T04:15:00Z", name_partitions=False, update_model=True)
    for blob in container.list_blobs(name_starts_with=f"{BASE}/{SEGMENT}/"):
        container.delete_blob(blob.name)
    with pytest.raises(ExportDataError) as caught:
        find_snapshot(container, "", SEGMENT)
    assert message(caught) == (
        f"{BASE}/model.json: entity '{SEGMENT}' names no partitions, and no complete run folder "
        f"{BASE}/{SEGMENT}/YYYY/MM/DD/HHMM/{SEGMENT}_N.csv exists (none older than model.json)")


def test_rows_with_too_few_or_too_many_columns_are_bad_rows_and_reading_goes_on():
    rows = parse(b'1,a@x.com,A,n\r\n2,b@x.com\r\n3,c@x.com,C,n,extra\r\n4,"d@x.com",D,""\r\n')
    assert rows == [
        Row("p.csv", 1, ["1", "a@x.com", "A", "n"]),
        BadRow("p.csv", 2, "expected 4 columns, got 2"),
        BadRow("p.csv", 3, "expected 4 columns, got 5"),
        Row("p.csv", 4, ["4", "d@x.com", "D", ""]),
    ]


def test_invalid_utf8_rejects_only_the_rows_that_hold_it(container):
    data = b'"1","a@x.com","Mar\xeda","n"\r\n"2","b@x.com","B","\xff\xfe"\r\n"3","c@x.com","Ren\xc3\xa9","n"\r\n'
    assert parse(data, chunk=5) == [
        BadRow("p.csv", 1, "invalid utf-8 in column Name: byte 0xed"),
        BadRow("p.csv", 2, "invalid utf-8 in column Note: byte 0xff 0xfe"),
        Row("p.csv", 3, ["3", "c@x.com", "René", "n"]),
    ]


def test_empty_and_header_only_files_yield_nothing_without_error(container):
    written = write_export(container, [], columns=COLUMNS, partitions=2, time="2026-03-02T04:15:00Z",
                           fmt=CsvFormat(header=True))
    container.upload_blob(written.partitions[0], b"", overwrite=True)
    assert container.download_blob(written.partitions[1]).readall() == b'"CustomerId","Email","Name","Note"\r\n'
    assert list(read_rows(container, find_snapshot(container, "", SEGMENT))) == []
    assert parse(b"\xef\xbb\xbf") == [] and parse(b"\r\n") == []


@pytest.mark.parametrize("data, problem", [
    (b"1,a@x.com,A,n\n2,b@x.com,B\r,n\n", "row 2 (from line 2) is not valid CSV: new-line character seen in "
                                          "unquoted field"),
    (b'1,a@x.com,A,n\n\n3,c@x.com,C,"n\n4,d@x.com,D,n\n',
     "row 3 (from line 3) is not valid CSV: unexpected end of data"),
    (b'1,a@x.com,"A"B,n\n2,b@x.com,B,n\n', "row 1 (from line 1) is not valid CSV: ',' expected after '\"'"),
])
def test_broken_csv_stops_the_run_instead_of_misreading_later_rows(data, problem):
    with pytest.raises(ExportDataError) as caught:
        parse(data)
    assert message(caught) == (f"partition p.csv: {problem}; the file looks damaged (a stray quote or line break?): "
                               "re-run the export")


@pytest.mark.parametrize("raw, problem", [
    ({"columnHeaders": "maybe"}, "p: columnHeaders must be true or false, got 'maybe'"),
    ({"delimiter": "||"}, "p: delimiter must be one character other than a quote or line break, got '||'"),
    ({"encoding": "EBCDIC-42"}, "p: unknown encoding 'EBCDIC-42'"),
    ({"quoteStyle": "QuoteStyle.Sometimes"},
     "p: quoteStyle must be QuoteStyle.Csv or QuoteStyle.None, got 'QuoteStyle.Sometimes'"),
])
def test_unusable_file_format_settings_are_named(raw, problem):
    with pytest.raises(ExportDataError) as caught:
        csv_settings(raw, "p")
    assert message(caught) == problem


def test_file_format_settings_defaults_and_lenient_values():
    assert csv_settings(None) == csv_settings({}) == CsvSettings(False, ",", "utf-8")
    assert csv_settings({"columnHeaders": "True", "encoding": "utf8", "delimiter": None}).headers is True
    assert csv_settings({"quoteStyle": "QuoteStyle.None"}).quoting == 3  # csv.QUOTE_NONE


def test_the_generator_command_line_writes_a_cdm_folder(tmp_path, capsys):
    from tools.generate_export import main

    main(["--out", str(tmp_path), "--profiles", "25", "--partitions", "2", "--seed", "4", "--segment", "Lapsed",
          "--time", "2026-03-02T04:15:00Z"])
    model = json.loads((tmp_path / BASE / "model.json").read_text())
    (entity,) = model["entities"]
    assert (entity["name"], model["modifiedTime"]) == ("Lapsed", "2026-03-02T04:15:00Z")
    columns, rows = [a["name"] for a in entity["attributes"]], []
    for partition in entity["partitions"]:
        name, _ = blob_name(partition["location"], "ciexports")
        rows += parse_partition(name, [(tmp_path / name).read_bytes()], csv_settings(partition["fileFormatSettings"]),
                                columns)
    assert [tuple(r.values) for r in rows] == list(sample_profiles(25, seed=4))
    assert "wrote 25 profiles in 2 partition(s)" in capsys.readouterr().out
