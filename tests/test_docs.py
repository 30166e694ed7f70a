"""The documentation cannot drift from the code.

Every fenced Python block in README.md and docs/*.md runs as written (each in a fresh namespace and an
empty working folder); every ``hetmm ...`` line in a bash block parses with the command's own parser;
every relative link resolves to a file, and to a heading when it names one; the front page stays short.
"""

import re
import shlex
from pathlib import Path

import pytest

from hetmm.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def blocks(language: str) -> list:
    """``(page, line, code)`` of every fenced block in ``language``."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                found.append((page, text.count("\n", 0, match.start()) + 1, match.group(2)))
    return found


def block_id(block) -> str:
    return f"{block[0].relative_to(ROOT)}:{block[1]}"


def without_fences(text: str) -> str:
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    return {slug(line.lstrip("#")) for line in without_fences(page.read_text(encoding="utf-8")).splitlines()
            if line.startswith("#")}


PYTHON = blocks("python")
BASH = blocks("bash")


@pytest.mark.parametrize("block", PYTHON, ids=[block_id(b) for b in PYTHON])
def test_python_block_runs(block, tmp_path, monkeypatch):
    page, line, code = block
    monkeypatch.chdir(tmp_path)
    # padded so that a traceback's line numbers are the page's
    exec(compile("\n" * line + code, str(page), "exec"), {"__name__": "__docs__"})


def hetmm_commands(code: str) -> list:
    """The argument lists of the ``hetmm`` invocations in a bash block (``...`` placeholders dropped)."""
    commands = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["hetmm"]:
            words = words[1:]
        elif "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["hetmm"]:
            words = words[words.index("-m") + 2:]
        else:
            continue
        commands.append([w for w in words if w != "..."])
    return commands


CLI_LINES = [(block_id(b), words) for b in BASH for words in hetmm_commands(b[2])]


@pytest.mark.parametrize("words", [w for _, w in CLI_LINES], ids=[f"{i}-{' '.join(w[:1])}" for i, w in CLI_LINES])
def test_documented_command_parses(words, capsys):
    try:
        args = build_parser().parse_args(words)
    except SystemExit as exit:
        pytest.fail(f"hetmm {' '.join(words)}: {capsys.readouterr().err.strip()} (exit {exit.code})")
    assert callable(args.run)


def test_commands_were_found():
    """The extraction itself: the front page's commands are among those parsed."""
    names = {words[0] for _, words in CLI_LINES}
    assert {"fit", "predict", "evaluate", "demo", "tune"} <= names
    assert len(PYTHON) >= 4, "the README, detector, anomalib and kernels pages each have a Python example"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(without_fences(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor in {resolved.name}")
    assert not broken, f"{page.name}: {broken}"


def test_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [bad](#nothing) [gone](missing.md)\n```\n[fenced](ignored.md)\n```\n")
    targets = LINK.findall(without_fences(page.read_text()))
    assert targets == ["#title", "#nothing", "missing.md"]
    assert "title" in anchors(page) and "nothing" not in anchors(page)


def test_front_page_is_short_and_starts_with_the_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 15_000, f"README.md is {len(text.encode())} bytes; topics go under docs/"
    first = [m.group(2) for m in FENCE.finditer(text)][:2]
    assert "pip install -e . && hetmm demo" in first[0] and 'pip install -e ".[test]" && pytest -q' in first[1]


def test_every_page_is_reachable_from_the_front_page():
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for target in LINK.findall(without_fences(README.read_text(encoding="utf-8")))
              if not re.match(r"[a-z]+:", target)}
    assert set(PAGES[1:]) <= linked, f"not linked from README.md: {sorted(p.name for p in set(PAGES[1:]) - linked)}"
