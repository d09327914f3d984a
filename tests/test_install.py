"""The install and the chapters' Colab set-up: what a learner meets before the first chapter."""

import re
from pathlib import Path

import nbformat
import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((REPO / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def setup_cell(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return next(c for c in nb.cells if c.cell_type == "code").source


def test_every_chapter_has_the_same_set_up_cell():
    assert len({setup_cell(p) for p in CHAPTERS}) == 1


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_colab_clone_is_not_named_like_a_package(path):
    """A clone in /content/minimoe is a namespace package `minimoe` from /content (the cwd):
    after a restart `from minimoe.data import ...` failed (unknown location)."""
    source = setup_cell(path)
    folder = re.search(r'COURSE = "([^"]+)"', source).group(1)
    assert Path(folder).name not in {"minimoe", "course"}
    assert "COURSE not in sys.path" in source and "run this\n# cell again" in source
    assert re.search(r"^DEVICE = ", source, re.M) and "print(" in source


def test_editable_install_puts_the_root_on_sys_path():
    """package-dir "" = ".": setuptools' editable install is then a .pth of the root, under which
    minimoe/ is a regular package that beats any folder named minimoe in the cwd."""
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"": "."}


def test_a_learners_install_has_no_developers_tools():
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = [
        re.split(r"[<>=\[ ]", d)[0] for d in extras["lab"] + PYPROJECT["project"]["dependencies"]
    ]
    assert "jupyterlab" in names and "ipykernel" in names
    for tool in ("nbgrader", "pytest", "ruff", "hypothesis", "transformers", "nbval"):
        assert tool not in names
        assert any(d.startswith(tool) for d in extras["dev"]), f"make test needs {tool}"
    makefile = (REPO / "Makefile").read_text()
    assert (
        'pip install -e ".[lab]"' in makefile and "https://download.pytorch.org/whl/cpu" in makefile
    )
