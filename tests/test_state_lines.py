"""The state's line format read a block at a time: every kind of bad line is named by its entry number, the
members' source digests come out as numbers, and a Block finds a key among its lines."""

from __future__ import annotations

import io

import pytest

from shared.state.state_lines import Acked, parse_block, text
from shared.state.state_store import Snapshot, StateUnreadable

SOURCE = "00ff00ff00ff00ff"


def lines(*entries: str) -> bytes:
    return "".join(f"{entry}\n" for entry in entries).encode()


def snapshot(data: bytes, count: int) -> Snapshot:
    return Snapshot("export/x.gz", lambda: io.BytesIO(data + f"#end\t{count}\n".encode()))


def test_members_digests_are_parsed_and_others_have_none():
    block = parse_block(lines(f"a@x.io\tf1\t1\t{SOURCE}", "b@x.io\tf2\t0\t", "c@x.io\tf3\t1", "d@x.io\tf4\t1\t"), b"")
    assert block.member.tolist() == [True, False, True, True]
    assert block.digest.tolist() == [int(SOURCE, 16), 0, 0, 0]
    assert block.entries() == [Acked("a@x.io", "f1", True, SOURCE), Acked("b@x.io", "f2", False),
                               Acked("c@x.io", "f3", True), Acked("d@x.io", "f4", True)]


@pytest.mark.parametrize("bad, why", [
    ("b@x.io\tf\t1\tx\ty", "entry 2 has 5 fields, not 3 or 4"),
    ("b@x.io\tf", "entry 2 has 2 fields"),
    ("\tf\t1\t", "entry 2 has no key"),
    ("b@x.io\tf\t2\t", "entry 2 has a member flag that is not 0 or 1"),
    ("b@x.io\tf\t11\t", "entry 2 has a member flag that is not 0 or 1"),
    ("b@x.io\tf\t\t", "entry 2 has a member flag that is not 0 or 1"),
    ("b@x.io\tf\t1\t00ff", "entry 2 has a source that is not 16 hex digits"),
    ("b@x.io\tf\t1\t00ff00ff00ff00fg", "entry 2 has a source that is not 16 hex digits"),
    ("a@x.io\tg\t1\t", "entry 2 repeats the key before it"),  # its line sorts after the first one's
    ("a@x.io\te\t1\t", "entry 2 is out of order"),
    ("a\tf\t1\t", "entry 2 is out of order"),
])
def test_a_bad_line_is_named_by_its_entry_number(bad, why):
    data = lines("a@x.io\tf\t1\t", bad, "c@x.io\tf\t1\t")
    with pytest.raises(StateUnreadable) as error:
        list(snapshot(data, 3).blocks())
    assert why in str(error.value) and "export/x.gz" in str(error.value)


def test_order_holds_across_blocks(monkeypatch):
    monkeypatch.setattr("shared.state.state_store.READ_BLOCK", 16)  # a block of a line or two
    good = [Acked(f"{c}@x.io", "f", True, SOURCE) for c in "abcdefgh"]
    assert list(Snapshot.of(good).entries()) == good
    data = "".join(text(a) + "\n" for a in good[:4] + good[3:4] + good[4:]).encode()
    with pytest.raises(StateUnreadable, match="entry 5 "):
        list(snapshot(data, 9).blocks())


def test_acknowledgements_in_any_order_are_accepted_without_an_order_check():
    block = parse_block(lines("b@x.io\tf\t1\t", "a@x.io\tf\t1\t"))
    assert [a.key for a in block.entries()] == ["b@x.io", "a@x.io"]


def test_a_block_finds_a_key_and_not_its_prefix_or_extension():
    block = parse_block(lines("a@x.io\tf\t1\t", "ab@x.io\tf\t1\t", "b@x.io\tf\t1\t"), b"")
    assert [block.find(k) for k in ("a@x.io", "ab@x.io", "b@x.io", "a@x.i", "a@x.io2", "c@x.io")] == \
        [0, 1, 2, -1, -1, -1]
    assert block.key(1) == "ab@x.io"
