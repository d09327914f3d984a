"""The course website (build/site, from `make site`) in chromium: every page passes
site_checks, search finds a chapter, and the checks fail on a deliberately broken page."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from browsing import ROOT, missing, serve
from site_checks import broken_links, check_page

pytestmark = pytest.mark.browser

SITE = ROOT / "build" / "site"
CHAPTER_1 = "notebooks/01_top_k_routing.html"


@pytest.fixture(scope="module")
def site() -> Path:
    if not (SITE / "index.html").is_file():
        missing(f"{SITE}/index.html is missing: run `make site`")
    return SITE


def pages(site: Path) -> list[str]:
    """Every page: the site's HTML files outside its asset folders (_static, _sources, ...)."""
    return sorted(
        str(p.relative_to(site))
        for p in site.rglob("*.html")
        if not p.relative_to(site).parts[0].startswith("_")
    )


def shot(screenshots: Path, name: str) -> Path:
    return screenshots / f"site-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"


def test_a_page_per_chapter(site):
    chapters = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
    assert chapters and [f"notebooks/{c}.html" for c in chapters] == [
        p for p in pages(site) if p.startswith("notebooks/")
    ]
    front = (site / "index.html").read_text(encoding="utf-8")
    assert all(f'href="notebooks/{c}.html"' in front for c in chapters), "course map links"


def test_solutions_are_folded_without_markers_and_self_checks_are_text(site):
    for path in sorted((site / "notebooks").glob("[0-9]*.html")):
        page = path.read_text(encoding="utf-8")
        assert "BEGIN SOLUTION" not in page and "END SOLUTION" not in page, path.name
        assert "@title" not in page, path.name
        folded = page.count('<p class="collapsed admonition-title">Show the solution</p>')
        assert folded >= 2, f"{path.name}: the solutions are behind a toggle"
        assert "shown as saved ()" not in page, path.name
        quiz = page.split('<ol class="quiz">', 1)[1].split("</ol>\n", 1)[0]
        assert quiz.count("<summary>Answer</summary>") == 5, f"{path.name}: five answers"


def test_every_page_in_the_browser(browser, site, screenshots):
    problems, links = [], {}
    with serve(site) as base:
        for rel in pages(site):
            found, links[rel] = check_page(browser, base + rel, shot(screenshots, rel))
            problems += [f"{rel}: {p}" for p in found]
        problems += broken_links(links, base, site)
    assert len(links) >= 10, sorted(links)
    assert not problems, "\n".join(problems)


def test_search_finds_a_chapter(browser, site, screenshots):
    with serve(site) as base:
        page = browser.new_page()
        page.goto(base + "search.html?q=capacity")
        hit = page.locator(f'#search-results a[href*="{CHAPTER_1}"]').first
        hit.wait_for(timeout=20_000)
        page.screenshot(path=shot(screenshots, "search"))
        page.close()


def damage(site: Path, how: str) -> None:
    """Break chapter 1's page of a copy of the site the way a bad build would."""
    page = site / CHAPTER_1
    html = page.read_text(encoding="utf-8")
    if how == "image":
        src = re.search(r'<img [^>]*src="\.\./(_images/[^"]+)"', html).group(1)
        (site / src).unlink()
    elif how == "raw TeX":
        page.write_text(html.replace("<h1>", "<p>left raw: $x^2$</p><h1>", 1), encoding="utf-8")
    elif how == "equation":
        (site / "_static" / "mathjax" / "tex-chtml.js").unlink()


@pytest.mark.parametrize(
    "how, expected",
    [
        ("image", "image not loaded"),
        ("raw TeX", "raw math left in the text: '$x^2$'"),
        ("equation", "equation not typeset"),
    ],
)
def test_the_checks_catch_a_broken_page(browser, site, screenshots, tmp_path, how, expected):
    broken = tmp_path / "site"
    shutil.copytree(site, broken)
    damage(broken, how)
    with serve(broken) as base:
        problems, _ = check_page(
            browser, base + CHAPTER_1, shot(screenshots, f"broken-{how}"), False
        )
    assert any(expected in p for p in problems), problems
