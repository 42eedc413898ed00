"""README stays a short entry page: the two set-up commands on top, at most 250 lines, working links into docs/."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move reference material into docs/"
    top = "\n".join(lines[:8])
    assert top.count("# install and run the default job") == 1 and top.count("# install and run the tests") == 1


def test_readme_and_docs_links_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", (REPO / "README.md").read_text()))
    assert linked == {p.name for p in (REPO / "docs").glob("*.md")}, "every docs page is reachable from the README"
