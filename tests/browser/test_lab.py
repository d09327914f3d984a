"""A chapter's explorer live in JupyterLab: run the cells it needs in a real kernel, move its
first slider with the keyboard, and check that the plot changes and that no widget error
reaches the console. Runs on temporary copies of the notebooks (nothing is saved back); the
chapters' cells run side by side, one kernel per core."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browsing import ROOT

pytestmark = pytest.mark.browser

# Per chapter: the cells the explorer needs (the first code cell containing each text, in
# order: the set-up cell that picks DEVICE, imports, then what builds its inputs) and the
# explorer's own cell. Only these run, so the test trains two tiny models per chapter instead
# of re-running the chapter.
EXPLORERS = {
    "01_top_k_routing": (
        ["DEVICE = torch.device(", "from minimoe import", "def train_lm", "logits_collapsed ="],
        "capacity_explorer(",
    ),
    "04_top_p_routing": (
        ["DEVICE = torch.device(", "from minimoe import", "tt_exp.trained(", "layer_logits ="],
        "top_p_explorer(",
    ),
}
# JupyterLab settings: every cell in the page (no windowing), no autosave, no news from the web
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}
# Started in the page, awaited by the test: runs the cells, returns the errors they raised.
START_CELLS = """(indices) => {
  const app = window.jupyterapp;
  const panel = app.shell.currentWidget;
  window.cellsRun = (async () => {
    await panel.sessionContext.ready;
    const errors = [];
    for (const i of indices) {
      panel.content.activeCellIndex = i;
      await app.commands.execute('notebook:run-cell');
      for (const o of panel.content.widgets[i].model.outputs.toJSON())
        if (o.output_type === 'error') errors.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
    }
    return errors;
  })();
}"""


def cell_indices(notebook: Path, needs: list[str], explorer: str) -> list[int]:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    sources = ["".join(c["source"]) if c["cell_type"] == "code" else "" for c in cells]
    indices = []
    for text in [*needs, explorer]:
        found = [i for i, s in enumerate(sources) if text in s]
        assert found, f"{notebook.name}: no code cell contains {text!r} (update EXPLORERS)"
        indices.append(found[0])
    return indices


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a free local port over copies of the chapters; yields (url, token, root)."""
    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    for name in EXPLORERS:
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", root / "notebooks")
    for plugin, values in SETTINGS.items():
        path = root / "settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # as a learner's lab runs
    env |= {"JUPYTER_CONFIG_DIR": str(root / "config"), "IPYTHONDIR": str(root / "ipython")}
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--ServerApp.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={root / 'settings'}",
        f"--LabApp.workspaces_dir={root / 'workspaces'}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp, as JupyterLab's own UI tests
        *(["--allow-root"] if os.geteuid() == 0 else []),
    ]
    log = (root / "lab.log").open("w")
    server = subprocess.Popen(
        command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start:\n{(root / 'lab.log').read_text()}")
                time.sleep(0.5)
        yield url, token, root
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def pixel_difference(before: bytes, after: bytes) -> float:
    """Share of pixels that differ between two screenshots (sizes may differ a little)."""
    from PIL import Image, ImageChops

    a, b = (Image.open(io.BytesIO(png)).convert("RGB") for png in (before, after))
    size = (min(a.width, b.width), min(a.height, b.height))
    diff = ImageChops.difference(a.crop((0, 0, *size)), b.crop((0, 0, *size))).convert("L")
    changed = sum(diff.point(lambda v: 255 if v > 32 else 0).histogram()[255:])
    return changed / (size[0] * size[1])


@pytest.fixture(scope="module")
def started(browser, lab, screenshots):
    """Each chapter open in its own page and workspace, its cells started; yields
    {chapter: (page, console messages, cell indices)}."""
    url, token, root = lab
    pages = {}
    try:
        for chapter, (needs, explorer) in EXPLORERS.items():
            indices = cell_indices(root / "notebooks" / f"{chapter}.ipynb", needs, explorer)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            console: list[str] = []
            page.on("console", lambda m, c=console: c.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e, c=console: c.append(f"pageerror: {e}"))
            pages[chapter] = page, console, indices
            page.goto(
                f"{url}/lab/workspaces/{chapter}/tree/notebooks/{chapter}.ipynb?token={token}"
            )
        for page, _, indices in pages.values():
            page.wait_for_function(
                "window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=90_000
            )
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
            page.evaluate(START_CELLS, indices)
        yield pages
    finally:
        for page, _, _ in pages.values():
            page.close()


@pytest.mark.parametrize("chapter", list(EXPLORERS))
def test_explorer_slider_redraws_the_plot(started, screenshots, chapter):
    page, console, indices = started[chapter]
    try:
        errors = page.evaluate("() => window.cellsRun")
        assert not errors, errors

        cell = page.locator(".jp-Notebook .jp-Cell").nth(indices[-1])
        plot = cell.locator(".widget-output").first  # the Output widget: stays as it redraws
        plot.locator("img").wait_for(timeout=30_000)
        cell.scroll_into_view_if_needed()
        page.screenshot(path=screenshots / f"lab-{chapter}-before.png")
        before, src = plot.screenshot(), plot.locator("img").get_attribute("src")

        slider = cell.locator(".widget-slider").first
        readout = slider.locator(".widget-readout").inner_text()
        slider.locator(".noUi-handle").first.focus()
        page.keyboard.press("ArrowRight")  # one step: one redraw
        page.wait_for_function(
            "([el, readout, src]) => {"
            "  const img = el.querySelector('.widget-output img');"
            "  return el.querySelector('.widget-readout').textContent !== readout"
            "    && img && img.complete && img.getAttribute('src') !== src; }",
            arg=[cell.element_handle(), readout, src],
            timeout=30_000,
        )
        after = plot.screenshot()
        page.screenshot(path=screenshots / f"lab-{chapter}-after.png")
        assert pixel_difference(before, after) > 0.005, "the plot did not change"
        widget_errors = [
            m for m in console if m.startswith(("error", "pageerror")) and "idget" in m
        ]
        assert not widget_errors, widget_errors
        assert not cell.get_by_text("Error displaying widget").count()
    except Exception:
        page.screenshot(path=screenshots / f"lab-{chapter}-failure.png", full_page=True)
        raise
    finally:
        (screenshots / f"lab-{chapter}-console.txt").write_text("\n".join(console))
