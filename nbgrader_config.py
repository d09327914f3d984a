"""nbgrader's settings here: the course that `make student` builds in build/nbgrader/
(docs/teaching.md). The nbgrader commands run from this folder, and JupyterLab's Nbgrader menu
(formgrader), use it."""

from pathlib import Path

c = get_config()  # noqa: F821 (nbgrader defines it when it reads this file)
# absolute: the server's nbgrader extensions refuse a relative root (and log it on every request)
c.CourseDirectory.root = str(Path(__file__).resolve().parent / "build" / "nbgrader")
c.CourseDirectory.course_id = "minimoe"
