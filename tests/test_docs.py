"""The documentation holds together: every relative link in README.md, docs/*.md and bench/*.md resolves to a file
(and heading) in this repository, nothing links outside it, the configuration reference names every key and setting
the code reads, and the export definitions shown in the docs are ones the app accepts. Pure file reading."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from shared.source import export_config as config
from shared.source.export_config import parse_exports

ROOT = Path(__file__).resolve().parents[1]


def documents(root: Path = ROOT) -> list[Path]:
    """The pages a user reads: the README, docs/ and bench/."""
    return sorted([root / "README.md", *root.glob("docs/*.md"), *root.glob("bench/*.md")])


# --- reading Markdown --------------------------------------------------------------------------------------------
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^\s)>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
AUTOLINK = re.compile(r"<([A-Za-z][A-Za-z0-9+.-]{1,31}:[^\s<>]*)>")
BARE_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>()]+", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose_lines(text: str) -> Iterable[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code removed."""
    for number, line in prose_lines_keeping_code(text):
        yield number, INLINE_CODE.sub(" ", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (no Markdown) in lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, numbered as GitHub numbers repeated ones (-1, -2, ...)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    previous = ""
    for _, line in prose_lines_keeping_code(text):
        heading = ATX.match(line)
        title = heading[2] if heading else None
        if title is None and previous.strip() and re.fullmatch(r" {0,3}(=+|-+)\s*", line) and "|" not in previous:
            title = previous.strip()  # a setext heading
        previous = line
        if title is None:
            continue
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def prose_lines_keeping_code(text: str) -> Iterable[tuple[int, str]]:
    """Lines outside fenced code blocks, inline code kept (headings keep their code spans)."""
    fence = None
    for number, line in enumerate(text.splitlines(), start=1):
        opened = FENCE.match(line)
        if fence is not None:
            if opened and opened[1][0] == fence[0] and len(opened[1]) >= len(fence):
                fence = None
            continue
        if opened:
            fence = opened[1]
            continue
        yield number, line


@dataclass(frozen=True)
class Link:
    page: Path
    line: int
    target: str


def links(page: Path) -> list[Link]:
    """Every link target of a page: inline links and images, reference definitions, autolinks, bare URLs."""
    found = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        targets = [m[1] for m in INLINE_LINK.finditer(line)]
        reference = REFERENCE.match(line)
        if reference:
            targets.append(reference[1])
        rest = "" if reference else INLINE_LINK.sub(" ", line)
        targets += [m[1] for m in AUTOLINK.finditer(rest)]
        targets += [m[0] for m in BARE_URL.finditer(AUTOLINK.sub(" ", rest))]
        found += [Link(page, number, target) for target in targets]
    return found


def link_problems(pages: Iterable[Path], root: Path = ROOT) -> list[str]:
    """What is wrong with the links of `pages`: each link must name a file (or folder) inside `root`, and an anchor
    a heading of the Markdown page it names."""
    root = root.resolve()
    problems = []
    for page in pages:
        for link in links(page):
            where = f"{page.relative_to(root)}:{link.line}: {link.target!r}"
            target = link.target
            if not target:
                problems.append(f"{where} is an empty link")
                continue
            if SCHEME.match(target) or target.startswith("//") or target.lower().startswith("www."):
                problems.append(f"{where} links outside the repository")
                continue
            path_part, _, anchor = target.partition("#")
            path_part = unquote(path_part)
            if path_part.startswith("/"):
                problems.append(f"{where} is an absolute path: link relative to the page")
                continue
            resolved = (page.parent / path_part).resolve() if path_part else page.resolve()
            if not resolved.is_relative_to(root):
                problems.append(f"{where} points outside the repository")
                continue
            if not resolved.exists():
                problems.append(f"{where} names {resolved.relative_to(root)}, which does not exist")
                continue
            if anchor:
                if resolved.suffix != ".md" or not resolved.is_file():
                    problems.append(f"{where} has an anchor on a file that is not a Markdown page")
                elif unquote(anchor).lower() not in anchors(resolved.read_text(encoding="utf-8")):
                    problems.append(f"{where}: {resolved.relative_to(root)} has no heading #{anchor}")
    return problems


# --- the repository's pages ------------------------------------------------------------------------------------
def test_the_pages_exist_and_the_readme_is_a_short_guide():
    names = {p.relative_to(ROOT).as_posix() for p in documents()}
    for page in ("configuration", "ortto", "deploy-azure", "operations", "troubleshooting", "http-api",
                 "local-development", "architecture", "api-contracts"):
        assert f"docs/{page}.md" in names
        assert f"](docs/{page}.md)" in (ROOT / "README.md").read_text(), f"the README does not link docs/{page}.md"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    assert "`make test`" in (ROOT / "README.md").read_text(), "the README names the test command (.ci/run runs it)"


def test_every_link_resolves_inside_the_repository():
    assert link_problems(documents()) == []


def test_no_test_reads_a_file_outside_the_repository():
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text(encoding="utf-8")
        assert "../" + "shared" not in text, path.name
        deep = [int(n) for n in re.findall(r"parents\[(\d+)\]", text)]
        assert all(n < 2 for n in deep), f"{path.name} reads above the repository root (parents[{max(deep)}])"


# --- the checker itself fails on bad links ---------------------------------------------------------------------
def test_the_link_checker_finds_every_kind_of_bad_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Set the `API` key: now\n\nText.\n\nSetext\n---\n")
    readme = tmp_path / "README.md"
    readme.write_text("\n".join([
        "# Title",
        "[ok](docs/guide.md) [ok anchor](docs/guide.md#set-the-api-key-now) [here](#title)",
        "[setext](docs/guide.md#setext)",
        "[missing file](docs/nothing.md)",
        "[bad anchor](docs/guide.md#no-such-heading)",
        "[outside](../shared/design.md)",
        "[web](https://learn.microsoft.com/azure/)",
        "Plain https://example.com/page in text.",
        "[absolute](/etc/passwd)",
        "[anchor on a folder](docs#x)",
        "`[in code](https://example.com)` and [self bad](#nope)",
        "```",
        "[in a fence](https://example.com) ../shared",
        "```",
        "[ref]: https://example.com/ref",
    ]))
    problems = link_problems([readme], root=tmp_path)
    text = "\n".join(problems)
    assert len(problems) == 9, text
    for expected in ("docs/nothing.md", "no heading #no-such-heading", "'../shared/design.md' points outside",
                     "'https://learn.microsoft.com/azure/' links outside", "'https://example.com/page' links outside",
                     "absolute path", "not a Markdown page", "no heading #nope",
                     "'https://example.com/ref' links outside"):
        assert expected in text, expected
    assert "in a fence" not in text and "guide.md#set-the-api-key-now" not in text


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Recover after `azd down`", "recover-after-azd-down"),
    ("What `force` costs", "what-force-costs"),
    ("Changing an export's destination", "changing-an-exports-destination"),
    ("Provision and deploy: `azd up`", "provision-and-deploy-azd-up"),
    ("Customer Insights → Autopilot and Ortto segment sync", "customer-insights--autopilot-and-ortto-segment-sync"),
    ("Day-2 cheat sheet", "day-2-cheat-sheet"),
    ("[Linked](x.md) title", "linked-title"),
])
def test_anchors_are_githubs(heading, anchor):
    assert slug(heading) == anchor


def test_repeated_headings_are_numbered():
    assert anchors("# A\n## Notes\n## Notes\n```\n# not a heading\n```\n") == {"a", "notes", "notes-1"}


# --- the configuration reference is complete -------------------------------------------------------------------
def section(page: str, title: str) -> str:
    text = (ROOT / page).read_text(encoding="utf-8")
    start = text.index(f"\n{title}\n")
    level = title.split(" ")[0]
    following = [text.find(f"\n{'#' * n} ", start + 1) for n in range(1, len(level) + 1)]
    ends = [i for i in following if i != -1]
    return text[start: min(ends) if ends else len(text)]


def table_keys(text: str) -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE))


def test_the_configuration_reference_names_every_key_and_setting():
    exports = table_keys(section("docs/configuration.md", "### Export fields"))
    wanted = {k for k in config.EXPORT_KEYS if k not in ("source", "destination")}
    wanted |= {f"source.{k}" for k in config.SOURCE_KEYS}
    wanted |= {f"destination.{k}" for k in config.DESTINATION_KEYS if k != "newPeople"}
    wanted |= {f"destination.newPeople.{k}" for k in config.NEW_PEOPLE_KEYS}
    assert wanted <= exports, f"export fields missing from docs/configuration.md: {sorted(wanted - exports)}"
    connections = table_keys(section("docs/configuration.md", "### Connection fields"))
    assert set(config.CONNECTION_KEYS) <= connections, sorted(set(config.CONNECTION_KEYS) - connections)
    settings = table_keys(section("docs/configuration.md", "## App settings"))
    sample = set(json.loads((ROOT / "local.settings.sample.json").read_text())["Values"])
    assert sample <= settings, f"app settings missing from docs/configuration.md: {sorted(sample - settings)}"
    variables = section("docs/configuration.md", "## azd variables")
    given = json.loads((ROOT / "infra" / "main.parameters.json").read_text())["parameters"]
    for entry in given.values():
        assert entry["value"][2:-1] in variables, f"azd variable {entry['value']} is not in docs/configuration.md"


def json_blocks(text: str) -> list[str]:
    return re.findall(r"^ *```json\n(.*?)^ *```", text, re.MULTILINE | re.DOTALL)


def test_the_export_definitions_shown_are_valid():
    shown = 0
    for page in documents():
        for block in json_blocks(page.read_text(encoding="utf-8")):
            try:
                document = json.loads(block)
            except ValueError:
                continue
            if not isinstance(document, dict) or "exports" not in document or "..." in block or "lastRun" in block:
                continue  # (an excerpt, or an API answer)
            parse_exports(document, source=page.name)  # raises, listing every problem
            shown += 1
    assert shown >= 3
