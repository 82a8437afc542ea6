"""README.md and docs/ stand alone: they name no file outside the repository, and every relative
link in them points to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# DESIGN.md (upper case) is a file outside the repository; docs/design.md is the repo's own.
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared|/work/|\b[Ss]hared folder\b")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_names_no_file_outside_the_repository(page: Path) -> None:
    hits = [
        f"{page.name}:{n}: {line.strip()}"
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert hits == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s):, mailto:
        path = (page.parent / target).resolve()
        assert path.is_relative_to(ROOT), f"{page.name} links outside the repo: {target}"
        assert path.exists(), f"{page.name} links to a missing file: {target}"


def test_the_check_can_fail() -> None:
    assert OUTSIDE.search("the full contract is DESIGN.md")
    assert OUTSIDE.search("see ../shared/notes.md")
    assert not OUTSIDE.search("[design.md](design.md)")
