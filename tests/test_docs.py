"""The documentation: every relative link resolves, and the README stays a front page."""
from __future__ import annotations

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
PAGES = [os.path.join(REPO, "README.md")] + sorted(
    os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md"))
README_MAX_LINES = 250

# [text](target): a markdown link; the target ends at the first space or closing parenthesis
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(path: str) -> str:
    """The page without its fenced code blocks (a link-like text in code is not a link)."""
    lines, inside = [], False
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if FENCE.match(line.strip()):
                inside = not inside
            elif not inside:
                lines.append(line)
    return "".join(lines)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    text = _prose(path)
    found = {_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}
    return found | set(re.findall(r'<a id="([^"]+)"', text))


def _links(path: str) -> list[tuple[str, str]]:
    """(file, anchor) of every relative link of a page, the file resolved against the page's folder."""
    out = []
    for target in LINK.findall(INLINE_CODE.sub("", _prose(path))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        out.append((resolved, anchor))
    return out


def test_the_anchor_rule_matches_github():
    assert _anchor("The servable model: `saved_model/`") == "the-servable-model-saved_model"
    assert _anchor("End to end: `make bench-demo`") == "end-to-end-make-bench-demo"
    assert _anchor("Tried against the scanner shortcut (judged on val)") == \
        "tried-against-the-scanner-shortcut-judged-on-val"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_relative_link_resolves(page):
    broken = []
    for file, anchor in _links(page):
        if not os.path.exists(file):
            broken.append(f"{os.path.relpath(file, REPO)} does not exist")
        elif anchor and file.endswith(".md") and anchor not in _anchors(file):
            broken.append(f"{os.path.relpath(file, REPO)} has no heading #{anchor}")
    assert not broken, f"{os.path.relpath(page, REPO)}: " + "; ".join(broken)


def test_readme_is_a_front_page_linking_every_doc():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    assert len(readme.splitlines()) <= README_MAX_LINES
    linked = {file for file, _ in _links(os.path.join(REPO, "README.md"))}
    assert set(PAGES[1:]) <= linked, "docs not linked from the README: " + ", ".join(
        os.path.relpath(p, REPO) for p in sorted(set(PAGES[1:]) - linked))
