"""What the course promises about its notebooks, checked without running them (nbval runs them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def test_every_chapter_of_the_map_exists():
    linked = re.findall(r"\]\((notebooks/[^)]+\.ipynb)\)", (ROOT / "index.md").read_text())
    assert [ROOT / p for p in linked] == NOTEBOOKS, "index.md and notebooks/ disagree"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_promises(path: Path):
    cells = _cells(path)
    text = "".join("".join(c["source"]) for c in cells)
    badge = re.search(r"colab\.research\.google\.com/github/[^)]*/notebooks/([^)]+\.ipynb)", text)
    assert badge and badge.group(1) == path.name, "the Colab badge must point at this notebook"
    assert 'if "google.colab" in sys.modules:' in text, "no Colab set-up cell"
    code = [c for c in cells if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "not executed top to bottom in one kernel"
    assert not any(o["output_type"] == "error" for c in code for o in c["outputs"])
    assert sum("assert " in "".join(c["source"]) for c in code) >= 5, "claims must be asserts"
    solutions = [c for c in code if c["metadata"].get("jupyter", {}).get("source_hidden")]
    assert len(solutions) >= 2, "exercises need collapsed solution cells"
    assert not re.search(r"/(work|tmp|root|home)/", text), "machine path in the notebook"


# ---- the course package beside the library ------------------------------------------------


def test_the_library_knows_nothing_of_the_course():
    for path in (ROOT / "minimoe").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) course\b", text, re.M), (
            f"{path.name} imports the course"
        )
        assert "__file__" not in text, f"{path.name} reads a path of the repository"


def test_a_missing_cached_result_says_where_to_get_it(monkeypatch, tmp_path):
    from course import common, gw

    assert common.cached("gw_pretrained.pt") == ROOT / "data" / "gw_pretrained.pt"
    monkeypatch.setattr(common, "DATA", tmp_path)  # an installed course, without the repository
    with pytest.raises(
        FileNotFoundError, match="clone the repository.*regenerates gw_pretrained.pt"
    ):
        gw.load_pretrained()


def test_the_readme_carries_the_one_table_of_numbers():
    import math

    from course import numbers

    rows = numbers.headline_rows()
    assert {r["chapter"] for r in rows} == {"1", "3", "4", "5", "4-6", "4-5", "6", "8", "9"}
    for r in rows:
        assert math.isfinite(r["mean"]) and r["low"] <= r["mean"] <= r["high"], r
        assert r["seeds"] >= 3, f"{r['router']}, {r['quantity']}: fewer than 3 seeds"
    table = numbers.markdown(rows)
    assert table in (ROOT / "README.md").read_text(), (
        "README's table of numbers is stale: paste `python -m course numbers` into it"
    )
