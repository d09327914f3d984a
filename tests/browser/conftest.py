"""Browser tests: Debian's chromium (/usr/bin/chromium) driven by Playwright for Python.

Skipped with the reason when chromium or Playwright is missing, except under CI (CI=true), which
installs both (.ci/run) and must not pass by skipping. Screenshots go to build/screenshots/."""

from __future__ import annotations

from pathlib import Path

import pytest
from browsing import CHROMIUM, CHROMIUM_ARGS, ROOT, missing


@pytest.fixture(scope="session")
def browser():
    """One headless chromium for the session."""
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is missing: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is missing: pip install -e '.[browser]' (make site installs it)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    path = ROOT / "build" / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path
