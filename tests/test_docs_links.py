"""Every relative link of README.md and docs/ names a file that exists, and an anchor a heading of it."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(text):
    """The lines of a Markdown page outside fenced code blocks."""
    lines, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            inside = not inside
        elif not inside:
            lines.append(line)
    return lines


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page):
    """Every anchor the headings of ``page`` define (repeated headings get -1, -2, ... as on GitHub)."""
    seen, result = {}, set()
    for line in prose(page.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(page):
    """The relative link targets of ``page`` (web addresses and mail links left out)."""
    found = []
    for line in prose(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z]+:", target):
                found.append(target)
    return found


def test_slug_follows_github():
    assert slug("Stage 3: fine-tune the SNN block by block") == "stage-3-fine-tune-the-snn-block-by-block"
    assert slug("A spike-driven UNet (`--spike_driven`)") == "a-spike-driven-unet---spike_driven"
    assert slug("Reliability: what you can count on") == "reliability-what-you-can-count-on"


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [gone](missing.md) [bad](#nothing)\n```\n[code](x.md)\n```\n")
    assert links(page) == ["#title", "missing.md", "#nothing"]
    assert anchors(page) == {"title"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if ROOT in file.parents else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading for #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
