"""Links between the documentation pages: every relative link names a file that exists, and every ``#anchor``
names a heading of its page (GitHub's rule: lower case, punctuation dropped, spaces to hyphens)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s#]*)(?:#([^)\s]+))?\)")


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown page's headings (a repeated heading gets ``-1``, ``-2``, …)."""
    anchors, seen, fenced = set(), {}, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_anchor_rule_on_headings_with_code_and_symbols():
    text = "# A b\n## The AP curve: RoIs kept × type (`x/y.py`)\n```\n# not a heading\n```\n# A b\n"
    assert heading_anchors(text) == {"a-b", "the-ap-curve-rois-kept--type-xypy", "a-b-1"}


def test_every_relative_link_and_anchor_of_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for m in LINK.finditer(text):
            path, anchor = m.group(1), m.group(2)
            target = (page.parent / path) if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {m.group(0)} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in heading_anchors(target.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(ROOT)}: {m.group(0)} (no such heading)")
    assert broken == []
