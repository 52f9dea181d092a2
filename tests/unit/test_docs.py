"""The README is the front door: short, linking every page of docs/, and no link in either leads nowhere."""

from __future__ import annotations

import pathlib
import re

from devcluster.build import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def test_the_readme_is_a_front_door() -> None:
    """At most about 200 lines, and its first screen says what this is, why, and how to install it."""
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[:4] == ["## Why", "## Install on an existing cluster", "## Try it locally", "## Compatibility"]


def test_the_readme_links_every_page_of_docs() -> None:
    linked = set(LINK.findall(README.read_text()))
    for page in sorted(DOCS.glob("*.md")):
        assert any(link.split("#")[0] == f"docs/{page.name}" for link in linked), f"README does not link {page.name}"


def test_every_relative_link_resolves() -> None:
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for link in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", link):
                continue
            target, _, anchor = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            assert path.exists(), f"{page.relative_to(ROOT)}: {link} leads nowhere"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path), f"{page.relative_to(ROOT)}: no heading #{anchor} in {path.name}"
