"""Student versions of the chapters, made by nbgrader's own ``generate_assignment``.

    python tools/student.py            # build/student/*.ipynb, and the nbgrader course build/nbgrader/

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
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def for_students(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The instructor notebook with its solution cells open and untitled, no widget state."""
    nb.metadata.pop("widgets", None)
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


def build(out: Path, course: Path) -> list[Path]:
    """Write every chapter's student version to ``out``; return their paths."""
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
        shutil.copyfile(course / "release" / chapter / path.name, out / path.name)
        written.append(out / path.name)
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
    for path in build(args.out, args.course):
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
