"""What every page of the course website must satisfy in a real browser: no console error, no
request that fails or leaves the machine, every image loaded and described, every equation
typeset and no raw TeX left, every internal link resolving to a file and anchor of the site."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

LOCAL_HOSTS = {"127.0.0.1", "localhost"}

# After MathJax has typeset the page: images, equations and the visible text outside code.
PAGE_STATE = r"""async () => {
  const typeset = window.MathJax && MathJax.startup ? MathJax.startup.promise : null;
  if (typeset) await Promise.race([typeset, new Promise(r => setTimeout(r, 20000))]);
  const images = [...document.images];
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  const body = document.body.cloneNode(true);
  body.querySelectorAll('pre, code, script, style, textarea, mjx-container').forEach(e => e.remove());
  return {
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    noAlt: images.filter(i => !(i.getAttribute('alt') || '').trim()).map(i => i.getAttribute('src')),
    rawMath: body.textContent.match(/\$[^$\s][^$]*?\$|\\\(|\\\[/g) || [],
    untypeset: [...document.querySelectorAll('.math')]
      .filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 60)),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  };
}"""


def check_page(
    browser, url: str, screenshot: Path, whole_page_on_failure: bool = True
) -> tuple[list[str], list[str]]:
    """Visit ``url``; return its problems (empty when fine) and the links it holds. A
    screenshot is saved, of the whole page when something is wrong (a few seconds more)."""
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})

    def route(r) -> None:
        if urlsplit(r.request.url).hostname in LOCAL_HOSTS | {None}:
            r.continue_()
        else:
            problems.append(f"request leaves the machine: {r.request.url}")
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    try:
        page.goto(url, wait_until="load")
        state = page.evaluate(PAGE_STATE)
        problems += [f"image not loaded: {src}" for src in state["broken"]]
        problems += [f"image without alt text: {src}" for src in state["noAlt"]]
        problems += [f"raw math left in the text: {m!r}" for m in state["rawMath"]]
        problems += [f"equation not typeset: {m!r}" for m in state["untypeset"]]
        page.screenshot(path=screenshot, full_page=whole_page_on_failure and bool(problems))
        return problems, state["links"]
    finally:
        page.close()


def broken_links(links: dict[str, list[str]], base: str, site: Path) -> list[str]:
    """Links into the site (``base``) whose file or anchor does not exist under ``site``."""
    ids: dict[Path, set[str]] = {}
    problems = []
    for source, hrefs in links.items():
        for href in sorted(set(hrefs)):
            if not href.startswith(base):
                continue
            parts = urlsplit(href)
            target = site / unquote(parts.path).lstrip("/")
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                problems.append(f"{source}: link to a missing file: {href}")
            elif parts.fragment and target.suffix == ".html":
                if target not in ids:
                    html = target.read_text(encoding="utf-8")
                    ids[target] = set(re.findall(r'\b(?:id|name)="([^"]+)"', html))
                if unquote(parts.fragment) not in ids[target]:
                    problems.append(f"{source}: link to a missing anchor: {href}")
    return problems
