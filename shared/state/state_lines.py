"""The acknowledged state's line format: one contact per line, `key<TAB>fingerprint<TAB>1|0[<TAB>source]`
(the source digest, 16 hex digits, is missing in version 1 and empty when unknown).

Planning reads a million of these lines twice per run, so they are parsed and checked a block at a time with
numpy: a Block keeps the raw lines and, per line, the member flag and the source digest as a number; a line is
turned into an Acked only when planning needs that one contact (a member who left or changed).
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from itertools import islice
from typing import NamedTuple

import numpy as np


class Acked(NamedTuple):
    key: str  # normalised (lower-case) email
    fingerprint: str
    member: bool
    source: str = ""  # digest of the segment row it came from (planner.record_digest), "" when unknown


def text(a: Acked) -> str:
    return f"{a.key}\t{a.fingerprint}\t{int(a.member)}\t{a.source}"


def entry(line: bytes) -> Acked:
    key, fp, member, *source = line.decode().split("\t")
    return Acked(key, fp, member == "1", source[0] if source else "")


class BadLine(ValueError):
    def __init__(self, index: int, why: str):
        super().__init__(f"entry {index + 1} {why}")
        self.index, self.why = index, why


_NL, _TAB, _ZERO, _ONE = (ord(c) for c in "\n\t01")
SOURCE_DIGITS = 16
_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_NIBBLES = np.arange(4 * (SOURCE_DIGITS - 1), -4, -4, dtype=np.uint64)  # the shifts of 16 hex digits


class Block(NamedTuple):
    lines: list[bytes]  # without their line breaks
    member: np.ndarray  # bool per line
    digest: np.ndarray  # uint64 per line: a member's source digest, 0 when it has none

    def key(self, at: int) -> str:
        line = self.lines[at]
        return line[:line.index(b"\t")].decode()

    def find(self, key: str) -> int:
        """The line of `key`, or -1 (lines sort by key: a tab sorts before any character of an email)."""
        probe = key.encode() + b"\t"
        at = bisect_left(self.lines, probe)
        return at if at < len(self.lines) and self.lines[at].startswith(probe) else -1

    def entries(self) -> list[Acked]:
        return [entry(line) for line in self.lines]


def parse_block(data: bytes, previous: bytes | None = None) -> Block:
    """Whole lines (each ending in a line break), checked: 3 or 4 fields, a key, a member flag of 0 or 1, a source
    of 16 hex digits or none. `previous` (the line before the block; b"" for the first) asks for keys in strictly
    increasing order; None accepts any order. Raises BadLine naming the first bad line."""
    if not data:
        return Block([], np.zeros(0, bool), np.zeros(0, np.uint64))
    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == _NL)
    starts = np.concatenate(([0], ends[:-1] + 1))
    tabs = np.flatnonzero(buf == _TAB)
    before = np.searchsorted(tabs, starts)  # tabs in earlier lines
    fields = np.searchsorted(tabs, ends) - before + 1
    _require((fields == 3) | (fields == 4), lambda at: f"has {fields[at]} fields, not 3 or 4")
    first, second = tabs[before], tabs[before + 1]
    _require(first > starts, "has no key")
    flag, after = buf[second + 1], buf[np.minimum(second + 2, len(buf) - 1)]
    _require((second + 2 <= ends) & ((flag == _ZERO) | (flag == _ONE)) & ((after == _TAB) | (after == _NL)),
             "has a member flag that is not 0 or 1")
    member = flag == _ONE
    source_length = np.where(fields == 4, ends - tabs[np.minimum(before + 2, len(tabs) - 1)] - 1, 0)
    _require((source_length == 0) | (source_length == SOURCE_DIGITS), "has a source that is not 16 hex digits")
    digest = np.zeros(len(ends), np.uint64)
    sourced = np.flatnonzero(member & (source_length == SOURCE_DIGITS))
    if len(sourced):
        digits = _HEX[buf[ends[sourced, None] - SOURCE_DIGITS + np.arange(SOURCE_DIGITS)]]
        hexadecimal = np.ones(len(ends), bool)
        hexadecimal[sourced] = (digits != 255).all(axis=1)
        _require(hexadecimal, "has a source that is not 16 hex digits")
        digest[sourced] = np.bitwise_or.reduce(digits.astype(np.uint64) << _NIBBLES, axis=1)
    lines = data[:-1].split(b"\n")
    if previous is not None:
        _check_order(lines, first - starts, previous)
    return Block(lines, member, digest)


def _require(ok: np.ndarray, why) -> None:
    """Every line is ok, or BadLine names the first that is not (`why`: text, or a function of its index)."""
    if not ok.all():
        at = int(ok.argmin())
        raise BadLine(at, why(at) if callable(why) else why)


def _check_order(lines: list[bytes], key_lengths: np.ndarray, previous: bytes) -> None:
    """Keys strictly increasing. Lines in increasing order have keys in non-decreasing order (a key's tab sorts
    before any character of a longer key); two equal keys are then neighbours of equal length."""
    if previous and not previous < lines[0]:
        raise BadLine(0, "is out of order")
    if not all(map(operator.lt, lines, islice(lines, 1, None))):
        raise BadLine(next(n for n in range(1, len(lines)) if not lines[n - 1] < lines[n]), "is out of order")
    if previous and lines[0].startswith(previous[:previous.index(b"\t") + 1]):
        raise BadLine(0, "repeats the key before it")
    for at in np.flatnonzero(key_lengths[1:] == key_lengths[:-1]):
        width = int(key_lengths[at]) + 1
        if lines[at][:width] == lines[at + 1][:width]:
            raise BadLine(int(at) + 1, "repeats the key before it")
