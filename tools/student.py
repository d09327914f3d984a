"""Student versions of the chapters, made by nbgrader's own ``generate_assignment``.

    python tools/student.py   # build/student/*_student.ipynb, and the nbgrader course build/nbgrader/

The student copies in ``--out`` are named ``<chapter>_student.ipynb``, so that JupyterLab never
shows two tabs of one name. ``--out`` is refused where it holds an instructor notebook, and a
file there is only ever replaced if this tool wrote it and nobody changed it since (its hash is
in ``.student-files.json``): a learner's answers are never overwritten.

Each chapter is one nbgrader assignment, named after its notebook. The course directory is a
working nbgrader course (docs/teaching.md): ``source/<chapter>/`` holds the instructor notebook,
``release/<chapter>/`` the student version, ``gradebook.db`` the graded cells; a teacher puts
submissions in ``submitted/<student>/<chapter>/`` and runs ``nbgrader autograde <chapter>`` there.
Running this again regenerates source/ and release/ and keeps the gradebook and submissions.

nbgrader clears the solutions (``raise NotImplementedError()`` in their place) and the outputs,
and locks the tests. Before that, the copy in source/ is made fit for a student: the solution
cells are no longer collapsed (a student writes in them) and lose the Colab title that names
them a solution, and the committed widget state is dropped (the student version has no outputs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import nbformat
from nbgrader.apps import NbGraderAPI
from traitlets.config import Config

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
TITLE = "# @title "  # Colab's form title: the solution cells' first line


def chapters() -> list[Path]:
    """The chapters' notebooks, in course order."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb"))


SUFFIX = "_student"
MANIFEST = ".student-files.json"  # in --out: name -> sha256 of each file this tool wrote
NOTE = """**Your copy of this chapter (student version).** Run the cells in order: an exercise needs
the cells above it (JupyterLab: select its cell, then Run > Run All Above Selected Cell). Each
exercise cell raises `NotImplementedError` until you write your answer there, so Run All stops
at the first exercise you have not solved: solve it, then go on with Run > Run Selected Cell
and All Below. The test cell under each exercise checks your answer."""


def for_students(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The instructor notebook with its solution cells open and untitled, no widget state, and
    a first cell that says how to run a notebook whose exercises are empty."""
    nb.metadata.pop("widgets", None)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(NOTE))
    for cell in nb.cells:
        if not cell.metadata.get("nbgrader", {}).get("solution"):
            continue
        cell.metadata.pop("cellView", None)
        cell.metadata.get("jupyter", {}).pop("source_hidden", None)
        if not cell.metadata.get("jupyter", True):
            del cell.metadata["jupyter"]
        if cell.source.startswith(TITLE):
            cell.source = cell.source.split("\n", 1)[1] if "\n" in cell.source else ""
    return nb


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_out(out: Path, names: list[str]) -> dict[str, str]:
    """The manifest of ``out``, after refusing an ``out`` this tool must not write: one holding
    an instructor notebook, or a file to write that it did not write (or that changed since)."""
    if out.is_dir() and NOTEBOOKS.is_dir() and out.resolve() == NOTEBOOKS.resolve():
        raise ValueError(f"--out {out} is the instructor notebooks' folder: choose another")
    # an instructor notebook: a chapter's name, with solutions (a student copy has none)
    held = [
        p.name
        for p in chapters()
        if (out / p.name).is_file() and "### BEGIN SOLUTION" in (out / p.name).read_text()
    ]
    if held:
        raise ValueError(f"--out {out} holds instructor notebooks ({', '.join(held)})")
    manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
    for name in names:
        target = out / name
        if target.exists() and manifest.get(name) != _sha256(target):
            why = "changed since this tool wrote it" if name in manifest else "not written here"
            raise ValueError(
                f"{target} exists and is {why}: move it away (it may hold your answers), "
                "or choose another --out"
            )
    return manifest


def build(out: Path, course: Path) -> list[Path]:
    """Write every chapter's student version to ``out``; return their paths."""
    names = [f"{p.stem}{SUFFIX}.ipynb" for p in chapters()]
    manifest = check_out(out, names)  # before anything is written
    # nbgrader starts `alembic` (the gradebook's migrations) from PATH: this Python's, venv or not
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    config = Config()
    config.CourseDirectory.root = str(course.resolve())
    config.CourseDirectory.course_id = "minimoe"
    api = NbGraderAPI(config=config)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in chapters():
        chapter = path.stem
        source = course / "source" / chapter
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir(parents=True)
        nbformat.write(for_students(nbformat.read(path, as_version=4)), source / path.name)
        result = api.generate_assignment(chapter, force=True, create=True)
        if not result["success"]:
            raise RuntimeError(
                f"nbgrader generate_assignment {chapter} failed:\n{result.get('log', '')}"
            )
        target = out / f"{chapter}{SUFFIX}.ipynb"
        shutil.copyfile(course / "release" / chapter / path.name, target)
        manifest[target.name] = _sha256(target)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "build" / "student", help="student notebooks"
    )
    parser.add_argument(
        "--course", type=Path, default=REPO / "build" / "nbgrader", help="nbgrader course"
    )
    args = parser.parse_args()
    try:
        written = build(args.out, args.course)
    except ValueError as err:
        parser.exit(2, f"tools/student.py: refused: {err}\n")
    for path in written:
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
