"""The README stays a page a newcomer reads in minutes, and every page it links to exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 160


def test_the_readme_is_at_most_160_lines_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert {"docs/api.md", "docs/configuration.md", "docs/trainer.md", "docs/operations.md", "docs/design.md",
            "BENCHMARKS.md"} <= set(links)
    missing = [link for link in links if not (REPO / link).exists()]
    assert missing == []
