"""The planner as plain Python: rows and acknowledged state in, counts and batches out."""

from __future__ import annotations

import csv
import io

import pytest

from shared.pipeline.planner import Planner, TooManyProfiles, encoded, expected_requests, fingerprint
from shared.source.cdm_reader import CsvSettings, Records
from shared.source.contacts import ContactMapper
from shared.source.export_config import parse_exports
from shared.state.state_store import Acked, Snapshot

COLUMNS = ["CustomerId", "Email", "First"]


def export(membership: str = "field", **extra):
    destination = {"membership": membership, "onLeave": extra.pop("onLeave", "remove")}
    destination.update({"field": "In Segment"} if membership == "field" else {"list": "Segment"})
    document = {"name": "t", "dataTransferAcknowledged": True, "destination": destination,
                "source": {"container": "ciexports", "segment": "Seg"},
                "fields": {"Email": "Email", "FirstName": "First"}, **extra}
    return parse_exports({"exports": [document]})[0]


def rows(*people: tuple[str, str]) -> list[list[str]]:
    return [[str(n), email, first] for n, (email, first) in enumerate(people, start=1)]


def partition(segment: list) -> Records:
    """The segment as one CSV partition: a list of values is a row, a string a raw line."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    for line in segment:
        writer.writerow(line) if isinstance(line, list) else text.write(line + "\n")
    return Records("p1", [text.getvalue().encode()], CsvSettings())


def acked(email: str, first: str, member: bool = True) -> Acked:
    return Acked(email.lower(), fingerprint({"Email": email, "FirstName": first}), member)


def plan(definition, segment, state=(), force=False):
    planner = Planner(definition, COLUMNS, list_ops_per_message=3)
    try:
        result = planner.plan([partition(segment)], Snapshot.of(sorted(state)), force=force)
        settled = list(result.settled())  # read before the planner's working set is removed
        result.kept = [a for a in settled if not a.member]
        result.resourced = [a for a in settled if a.member]
        return result, list(result.batches())
    finally:
        planner.close()


def test_diff_finds_joiners_changed_leavers_and_unchanged():
    segment = rows(("a@x.com", "Ann"), ("B@x.com", "Bob"), ("c@x.com", "Cy"))
    state = [acked("b@x.com", "Bob"), acked("c@x.com", "Old"), acked("d@x.com", "Dee"), acked("e@x.com", "E", False)]
    result, batches = plan(export(), segment, state)
    counts = result.counts
    assert (counts["joiners"], counts["changed"], counts["leavers"], counts["unchanged"]) == (1, 1, 1, 1)
    sent = {item.key: item for batch in batches for item in batch.items}
    assert set(sent) == {"a@x.com", "c@x.com", "d@x.com"}
    assert sent["d@x.com"].document == {"Email": "d@x.com", "custom": {"boolean--In--Segment": False}}
    assert sent["a@x.com"].document["custom"] == {"boolean--In--Segment": True}


def test_first_row_wins_when_an_email_repeats_in_any_case():
    result, batches = plan(export(), rows(("a@x.com", "First"), ("A@X.COM", "Second")))
    assert result.counts["duplicates"] == 1 and result.counts["profiles"] == 1
    assert [i.document["FirstName"] for b in batches for i in b.items] == ["First"]


def test_bad_rows_are_rejected_and_counted_without_stopping_the_plan():
    segment = [*rows(("a@x.com", "Ann"), ("nope", "No")), "9,too few"]
    result, _ = plan(export(), segment)
    assert (result.counts["read"], result.counts["valid"], result.counts["rejected"]) == (3, 1, 2)
    assert [(r["row"], r["reason"][:19]) for r in result.rejected_sample] == [(2, "invalid email in co"),
                                                                              (3, "expected 3 columns,")]


def test_list_mode_merges_joiners_per_message_then_joins_and_leaves_one_by_one():
    segment = rows(*[(f"j{i}@x.com", "J") for i in range(4)], ("c@x.com", "New"))
    state = [acked("c@x.com", "Old"), acked("l@x.com", "L")]
    result, batches = plan(export("list"), segment, state)
    assert [(b.kind, len(b.items)) for b in batches] == [("join", 3), ("join", 1), ("upsert", 1), ("leave", 1)]
    # 4 list joins + a bulk merge per join message (2) + 1 merge of the changed + 1 leave
    assert [b.requests for b in batches] == [4, 2, 1, 1]
    assert result.requests == sum(b.requests for b in batches) == expected_requests(False, 4, 1, 1, list_ops=3) == 8


def test_field_mode_packs_every_change_into_bulk_batches_of_100():
    segment = rows(*[(f"p{i}@x.com", "P") for i in range(250)])
    result, batches = plan(export(), segment, [acked("gone@x.com", "G")])
    assert [len(b.items) for b in batches] == [100, 100, 51]
    assert result.requests == expected_requests(True, 250, 0, 1) == 3


def test_unchanged_segment_plans_nothing_and_force_plans_everything():
    segment = rows(("a@x.com", "Ann"), ("b@x.com", "Bob"))
    state = [acked("a@x.com", "Ann"), acked("b@x.com", "Bob")]
    quiet, none = plan(export("list"), segment, state)
    assert none == [] and quiet.requests == 0 and quiet.counts["unchanged"] == 2
    forced, all_of_them = plan(export("list"), segment, state, force=True)
    assert forced.counts["joiners"] == 2 and sum(len(b.items) for b in all_of_them) == 2


def test_kept_leavers_are_not_sent_but_forgotten_as_members():
    result, batches = plan(export("list", onLeave="keep"), rows(("a@x.com", "Ann")), [acked("l@x.com", "L")])
    assert result.counts["kept_leavers"] == 1 and all(b.kind != "leave" for b in batches)
    assert [(a.key, a.member) for a in result.kept] == [("l@x.com", False)]


# --- rows unchanged since they were acknowledged are not mapped again ------------------------------
def acknowledged(definition, segment) -> list[Acked]:
    """The state a first sync of `segment` leaves: what its batches sent, with each row's source digest."""
    _, batches = plan(definition, segment)
    return sorted(Acked(i.key, i.fingerprint, True, i.source) for b in batches for i in b.items)


@pytest.fixture
def mapped(monkeypatch) -> list[str]:
    """The emails ContactMapper.map is called for (a spy: the real mapping runs)."""
    calls, real = [], ContactMapper.map
    monkeypatch.setattr(ContactMapper, "map", lambda self, row: calls.append(row.values[1]) or real(self, row))
    return calls


def test_rows_acknowledged_from_the_same_source_are_neither_mapped_nor_sent_again(mapped):
    before = rows(("a@x.com", "Ann"), ("b@x.com", "Bob"), ("c@x.com", "Cy"))
    state = acknowledged(export(), before)
    assert all(a.source for a in state)
    mapped.clear()
    result, batches = plan(export(), rows(("a@x.com", "Ann"), ("b@x.com", "Robert"), ("d@x.com", "Dee")), state)
    assert sorted(mapped) == ["b@x.com", "d@x.com"]  # a@ is taken as acknowledged, unmapped
    assert (result.counts["unchanged"], result.counts["changed"], result.counts["joiners"]) == (1, 1, 1)
    assert {i.key for b in batches for i in b.items} == {"b@x.com", "c@x.com", "d@x.com"}
    assert result.resourced == []


def test_the_skip_never_hides_a_change_or_a_duplicate_or_a_rejection(mapped):
    state = acknowledged(export(), rows(("a@x.com", "Ann"), ("b@x.com", "Bob")))
    segment = [["9", "not an email", "X"], ["1", "a@x.com", "Ann"], ["3", "A@x.com", "Other"], ["2", " b@x.com", "Bob"]]
    result, batches = plan(export(), segment, state)
    counts = result.counts
    assert (counts["rejected"], counts["duplicates"], counts["unchanged"], counts["changed"]) == (1, 1, 2, 0)
    assert batches == []  # the first a@ row wins; b@'s stray space maps to the same document
    assert [(a.key, a.source != dict((s.key, s.source) for s in state)["b@x.com"]) for a in result.resourced] == \
        [("b@x.com", True)]  # b@ is acknowledged again with the digest of its new row: nothing sent


@pytest.mark.parametrize("changed_first", [True, False])
def test_the_first_row_of_a_key_wins_whether_it_was_taken_as_unchanged_or_parsed(mapped, changed_first):
    state = acknowledged(export(), [["1", "a@x.com", "Ann"]])
    same, other = ["1", "a@x.com", "Ann"], ["7", "A@x.com", "Changed"]
    result, batches = plan(export(), [other, same] if changed_first else [same, other], state)
    assert result.counts["duplicates"] == 1 and result.counts["profiles"] == 1
    assert result.counts["changed"] == (1 if changed_first else 0)
    assert [i.document["FirstName"] for b in batches for i in b.items] == (["Changed"] if changed_first else [])


def test_a_record_with_line_breaks_in_a_quoted_value_is_taken_as_unchanged_whole(mapped):
    segment = [["1", "a@x.com", "Ann\nof Cleves"], ["2", "b@x.com", "Bob"]]
    state = acknowledged(export(), segment)
    mapped.clear()
    result, _ = plan(export(), [segment[0], ["2", "b@x.com", "Bob\nthe Builder"]], state)
    assert mapped == ["b@x.com"] and result.counts["changed"] == 1 and result.counts["unchanged"] == 1


def test_a_state_without_source_digests_maps_every_row_once_and_learns_their_digests(mapped):
    segment = rows(("a@x.com", "Ann"), ("b@x.com", "Bob"))
    older = [acked("a@x.com", "Ann"), acked("b@x.com", "Bob")]  # an older app's state: no digests
    result, batches = plan(export(), segment, older)
    assert batches == [] and len(mapped) == 2
    assert sorted(a.source for a in result.resourced) == sorted(a.source for a in acknowledged(export(), segment))


def test_another_mapping_of_the_same_columns_maps_every_row_again(mapped):
    segment = rows(("a@x.com", "Ann"), ("b@x.com", "Bob"))
    state = acknowledged(export(), segment)
    mapped.clear()
    renamed = export(fields={"Email": "Email", "LastName": "First"})  # same columns, another document
    result, batches = plan(renamed, segment, state)
    assert len(mapped) == 2 and result.counts["changed"] == 2 and len(batches) == 1


def test_a_forced_run_maps_and_sends_every_row(mapped):
    segment = rows(("a@x.com", "Ann"), ("b@x.com", "Bob"))
    state = acknowledged(export(), segment)
    mapped.clear()
    result, batches = plan(export(), segment, state, force=True)
    assert len(mapped) == 2 and result.counts["joiners"] == 2
    assert all(i.document["FirstName"] for b in batches for i in b.items)


def test_more_valid_profiles_than_allowed_fails_before_anything_is_planned():
    with pytest.raises(TooManyProfiles, match="3 valid profiles, more than its maxProfiles of 2"):
        plan(export(maxProfiles=2), rows(("a@x.com", "A"), ("b@x.com", "B"), ("c@x.com", "C")))


def test_email_case_does_not_change_the_fingerprint():
    ann = {"Email": "a@x.com", "FirstName": "Ann"}
    assert fingerprint({**ann, "Email": "A@X.com"}) == fingerprint(ann)
    assert fingerprint({**ann, "FirstName": "An"}) != fingerprint(ann)


@pytest.mark.parametrize("document", [
    {"Email": "Ann@X.com", "Company": '"Email": "Ann@X.com"', "FirstName": "Ann"},  # the key's text in a value
    {"Email": "ÅSA@exämple.se", "LastName": "Öberg", "custom": {"string--Note": 'say "Email": "ÅSA@exämple.se"'}},
    {"Email": "plain@x.com", "custom": {"integer--Points": 3}},
    {"Email": "123@456.io"},  # no cased character at all
])
def test_the_one_pass_fingerprint_equals_the_digest_the_state_was_written_with(document):
    """State written by earlier versions holds blake2b(sorted JSON with the email lower-cased): planning's one
    encoding must give the same digest, or an upgrade would resend every contact."""
    import hashlib
    import json

    canonical = dict(document, Email=document["Email"].lower())
    reference = hashlib.blake2b(json.dumps(canonical, sort_keys=True).encode(), digest_size=10).hexdigest()
    text, fp = encoded(document)
    assert fp == reference and json.loads(text) == document


def chunked(segment: list, rows_per_chunk: int, read: list) -> Records:
    """The segment as one partition read in chunks of whole rows; `read` counts the chunks taken so far."""
    lines = partition(segment).chunks[0].splitlines(keepends=True)

    def chunks():
        for at in range(0, len(lines), rows_per_chunk):
            read.append(at)
            yield b"".join(lines[at:at + rows_per_chunk])
    return Records("p1", chunks(), CsvSettings())


@pytest.mark.parametrize("membership", ["field", "list"])
def test_a_streamed_first_sync_sends_what_a_planned_one_sends_and_starts_before_the_end(membership):
    people = [(f"p{i}@x.com", f"P{i}") for i in range(2500)]
    people[1800] = ("P7@X.COM", "Later")  # a duplicate of a row in an earlier chunk: the first one wins
    people[1801] = ("p1802@x.com", "Same chunk")  # and of a row later in its own chunk
    people[1802] = ("p1802@x.com", "Later still")
    segment = [*rows(*people), "9,too few"]
    definition = export(membership)
    planned, expected = plan(definition, segment)
    planner, read = Planner(definition, COLUMNS, list_ops_per_message=3), []
    try:
        streamed = planner.first_sync([chunked(segment, 500, read)])
        batches, chunks_at_first = [], None
        for batch in streamed.batches():
            chunks_at_first = chunks_at_first or len(read)
            batches.append(batch)
        assert chunks_at_first == 1 and len(read) == 6  # the first batch went before the second chunk was read
        assert streamed.counts == planned.counts and streamed.requests == planned.requests
        assert streamed.samples == planned.samples and streamed.rejected_sample == planned.rejected_sample
        assert planned.counts["duplicates"] == 2 and planned.counts["rejected"] == 1
        assert sorted((b.kind, len(b.items)) for b in batches) == sorted((b.kind, len(b.items)) for b in expected)
        def items(found):
            return sorted((i.key, i.fingerprint, i.member, i.source, repr(i.document)) for b in found for i in b.items)
        assert items(batches) == items(expected)
    finally:
        planner.close()
