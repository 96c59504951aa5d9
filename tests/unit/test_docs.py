"""The documentation in its place: a short README whose links resolve, a manual in docs/ that
the site lists whole (``make docs`` builds it with every link checked), benchmarks that hold
current numbers only."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 120, "the README is the 5-minute read: the manual is docs/"
    assert "make serve" in text and "make test" in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to a missing {target}"


def test_the_site_lists_every_page_of_the_manual():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = {next(iter(item.values())) for item in config["nav"]}
    assert listed == {p.name for p in DOCS.glob("*.md")}
    assert config["strict"] is True


def test_benchmarks_hold_current_numbers_not_a_log_of_rounds():
    text = (DOCS / "benchmarks.md").read_text().lower()
    for phrase in ("this round", "last round", "the round before", "previous round"):
        assert phrase not in text, phrase
