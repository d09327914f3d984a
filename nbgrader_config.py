"""nbgrader's settings here: the course that `make student` builds in build/nbgrader/
(docs/teaching.md). The nbgrader commands run from this folder, and JupyterLab's Nbgrader menu
(formgrader), use it."""

c = get_config()  # noqa: F821 (nbgrader defines it when it reads this file)
c.CourseDirectory.root = "build/nbgrader"
c.CourseDirectory.course_id = "minimoe"
