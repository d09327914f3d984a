"""The graded exercises, both ways round: their autograded tests pass on the instructor notebooks
(the committed ones) and fail on the student versions that ``make student`` writes.

A test cell scores full points when it ran without an error and wrote nothing to stderr, and 0
otherwise (nbgrader's own rule, ``nbgrader.utils.determine_grade``).

- Instructor side: the committed outputs of every test cell are scored here; ``make test`` also
  re-executes every notebook under nbval, which fails on any error.
- Student side: the student versions are built from the committed notebooks with nbgrader and
  executed, each in a fresh kernel, but only their set-up cells (the code before section 1) and
  their graded exercises (the cell for the learner's code, then its test): a whole chapter costs
  as much as its experiments, and the exercises need nothing else. Every test must fail, and
  with the ``NotImplementedError`` of the empty cell it tests: a test that failed for another
  reason (a name that only the chapter defines) would prove nothing, and fails here.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbgrader.utils import determine_grade

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((REPO / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
NAMES = [p.name for p in CHAPTERS]


def nbgrader(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def exercises(nb) -> list[tuple]:
    """(cell for the learner's code, its test) for every graded exercise, in order."""
    pairs, answer = [], None
    for cell in nb.cells:
        if cell.cell_type == "code" and nbgrader(cell).get("solution"):
            answer = cell
        if cell.cell_type == "code" and nbgrader(cell).get("grade"):
            assert answer is not None, (
                f"test {nbgrader(cell)['grade_id']} has no cell for code before it"
            )
            pairs.append((answer, cell))
    return pairs


def setup_cells(nb) -> list:
    """The code cells before the first section (the Colab set-up and the imports)."""
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            return cells
        if cell.cell_type == "code":
            cells.append(cell)
    raise AssertionError("no section heading")


def read(path: Path):
    return nbformat.read(path, as_version=4)


def student_name(path: Path) -> str:
    """The student copy's file name: never the instructor's (JupyterLab would show two tabs)."""
    return f"{path.stem}_student.ipynb"


def load_tool():
    """tools/student.py as a module (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location("student_tool", REPO / "tools" / "student.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(out: Path, course: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "student.py"), "--out", str(out)]
    return subprocess.run(cmd + ["--course", str(course)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """The student versions, built by tools/student.py (nbgrader generate_assignment)."""
    root = tmp_path_factory.mktemp("student")
    cmd = [sys.executable, str(REPO / "tools" / "student.py"), "--out", str(root / "student")]
    subprocess.run(cmd + ["--course", str(root / "course")], check=True, capture_output=True)
    return root / "student"


def syllabus_points() -> dict[str, int]:
    """Chapter ("4", or "4b" for its optional deeper part) -> the points index.md's syllabus gives
    its graded exercises."""
    text = (REPO / "index.md").read_text()
    found = re.findall(r"^### (\d+b?)\. .*?Graded exercises \((\d+) points\)", text, re.S | re.M)
    return {ch: int(points) for ch, points in found}


def chapter(path: Path) -> str:
    """The chapter a notebook is: "4" for 04_top_p_routing.ipynb, "4b" for 04b_top_p_deeper.ipynb."""
    return path.name.split("_")[0].lstrip("0")


@pytest.mark.parametrize("path", CHAPTERS, ids=NAMES)
def test_instructor_version_passes_its_tests(path):
    nb = read(path)
    pairs = exercises(nb)
    assert 2 <= len(pairs) <= 4, "every chapter has 2-4 graded exercises"
    for answer, test in pairs:
        assert "### BEGIN SOLUTION" in answer.source and "### END SOLUTION" in answer.source
        assert test.outputs, (
            f"{nbgrader(test)['grade_id']}: the committed notebook was not executed"
        )
        score, points = determine_grade(test)
        assert score == points > 0, f"{nbgrader(test)['grade_id']}: {score} of {points} points"
    total = sum(nbgrader(test)["points"] for _, test in pairs)
    assert syllabus_points().get(chapter(path)) == total, "index.md's syllabus gives these points"


@pytest.mark.parametrize("path", CHAPTERS, ids=NAMES)
def test_student_version_has_no_solution(student, path):
    nb, instructor = read(student / student_name(path)), read(path)
    assert "widgets" not in nb.metadata
    for cell in nb.cells:
        assert "BEGIN SOLUTION" not in cell.source and "END SOLUTION" not in cell.source
        assert not cell.get("outputs"), "no outputs: they would show the solutions' results"
        if nbgrader(cell).get("solution"):
            assert "raise NotImplementedError()" in cell.source
            assert not cell.source.startswith("# @title") and "cellView" not in cell.metadata
            assert not cell.metadata.get("jupyter", {}).get("source_hidden"), "open, to write in"
    tests = [t.source for _, t in exercises(instructor)]
    assert [t.source for _, t in exercises(nb)] == tests, "the same tests"
    assert all(nbgrader(t)["locked"] and not t.metadata["editable"] for _, t in exercises(nb))


@pytest.mark.parametrize("path", CHAPTERS, ids=NAMES)
def test_student_version_fails_its_tests(student, path):
    nb = read(student / student_name(path))
    pairs = exercises(nb)
    run = copy.deepcopy(nb)
    run.cells = copy.deepcopy(setup_cells(nb) + [cell for pair in pairs for cell in pair])
    NotebookClient(
        run,
        timeout=120,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(REPO / "notebooks")}},
    ).execute()
    graded = [c for c in run.cells if nbgrader(c).get("grade")]
    assert len(graded) == len(pairs)
    for test in graded:
        score, points = determine_grade(test)
        errors = [o for o in test.outputs if o.output_type == "error"]
        assert score == 0 and errors, f"{nbgrader(test)['grade_id']} passed with no answer"
        assert errors[0].ename == "NotImplementedError", (
            f"{nbgrader(test)['grade_id']} failed for another reason: {errors[0].ename}: {errors[0].evalue}"
        )


def test_student_copies_have_their_own_names_and_a_first_cell_on_running_them(student):
    assert sorted(p.name for p in student.glob("*.ipynb")) == sorted(map(student_name, CHAPTERS))
    for path in CHAPTERS:
        first = read(student / student_name(path)).cells[0]
        assert first.cell_type == "markdown" and "Run All Above Selected Cell" in first.source
        assert "Run All stops at the first exercise" in first.source.replace("\n", " ")


def test_out_holding_the_instructor_notebooks_is_refused_and_nothing_changes(tmp_path):
    """The bug this guards: `--out notebooks` wrote student versions over the chapters."""
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in CHAPTERS}
    result = run_tool(REPO / "notebooks", tmp_path / "course")
    assert result.returncode == 2 and "instructor" in result.stderr
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in CHAPTERS} == before
    assert not (REPO / "notebooks" / student_name(CHAPTERS[0])).exists()
    assert not (tmp_path / "course").exists(), "refused before nbgrader ran"
    copy_of = tmp_path / "copy"  # any folder holding an instructor notebook, not only notebooks/
    copy_of.mkdir()
    (copy_of / CHAPTERS[0].name).write_bytes(CHAPTERS[0].read_bytes())
    assert run_tool(copy_of, tmp_path / "course").returncode == 2
    old = tmp_path / "old"  # a student copy named like the chapter (before _student) is no reason
    old.mkdir()
    (old / CHAPTERS[0].name).write_text("a student's answers")
    load_tool().check_out(old, [student_name(p) for p in CHAPTERS])
    assert (old / CHAPTERS[0].name).read_text() == "a student's answers"


def test_a_file_the_tool_did_not_write_or_that_changed_is_never_overwritten(student, tmp_path):
    tool, names = load_tool(), [student_name(p) for p in CHAPTERS]
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in [*names, tool.MANIFEST]:
        (mine / name).write_bytes((student / name).read_bytes())
    tool.check_out(mine, names)  # its own files, unchanged: rebuilt freely (make student again)
    answered = mine / names[1]
    answered.write_text(answered.read_text().replace("NotImplementedError()", "ValueError()", 1))
    with pytest.raises(ValueError, match="changed since this tool wrote it"):
        tool.check_out(mine, names)  # a learner's answers
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / names[0]).write_text("someone else's notebook")
    result = run_tool(foreign, tmp_path / "course")
    assert result.returncode == 2 and "not written here" in result.stderr
    assert (foreign / names[0]).read_text() == "someone else's notebook"
