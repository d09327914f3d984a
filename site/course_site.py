"""Sphinx extension for the course website: the chapter list, alt text, saved widget pictures,
no remote images, MathJax copied from npm. Notebooks are read as committed, never changed."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

from docutils import nodes
from docutils.transforms import Transform
from sphinx import addnodes

from course import quiz

QUIZ_CALL = "quiz.show("  # a self-check cell (course/quiz.py)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
MATHJAX = Path(__file__).parent / "node_modules" / "mathjax" / "es5"
# MathJax's own combined builds other than the one the site loads (mathjax_path) are not copied
SOLUTION_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION")
TITLE = "# @title "  # Colab's form title, the solution cells' first line
MATHJAX_SKIP = ("tex-mml-chtml.js", "tex-svg*.js", "tex-mml-svg.js", "mml-*.js", "tex-chtml-*.js")


def chapters(srcdir: str) -> list[str]:
    """The chapters' docnames in course order: notebooks/01_....ipynb, notebooks/02_..., ..."""
    return [f"notebooks/{p.stem}" for p in sorted(Path(srcdir, "notebooks").glob("[0-9]*.ipynb"))]


def add_toctree(app, docname: str, source: list[str]) -> None:
    """The course map (index.md) stays as readers see it on GitHub; the site's navigation is a
    hidden toctree added here: the chapters, the README, then the guides in docs/."""
    if docname != app.config.root_doc:
        return
    docs = [f"docs/{p.stem}" for p in sorted(Path(app.srcdir, "docs").glob("*.md"))]
    entries = "\n".join([*chapters(app.srcdir), "Set-up and the library <README>", *docs])
    source[0] += f"\n\n```{{toctree}}\n:hidden:\n:maxdepth: 1\n\n{entries}\n```\n"


def solutions_behind_a_toggle(app, docname: str, source: list[str]) -> None:
    """A chapter's solution cells (nbgrader's) shown folded, as "Show the solution", without
    nbgrader's ### BEGIN/END SOLUTION lines or the Colab title: the page gets the notebook so
    changed (the source-read event), the committed notebook stays as it is."""
    if not docname.startswith("notebooks/"):
        return
    nb = json.loads(source[0])
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or not cell["metadata"].get("nbgrader", {}).get("solution"):
            continue
        text = "".join(cell["source"])
        lines = [
            line
            for line in text.split("\n")
            if line.strip() not in SOLUTION_MARKERS and not line.startswith(TITLE)
        ]
        cell["source"] = "\n".join(lines)
        meta = cell["metadata"]
        meta["tags"] = [*meta.get("tags", []), "hide-input"]
        meta["mystnb"] = {"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide it"}
    source[0] = json.dumps(nb)


def section_title(node: nodes.Node) -> str:
    """The title of the innermost section around ``node``."""
    while node is not None:
        if isinstance(node, nodes.section) and node.children:
            return node[0].astext()
        node = node.parent
    return ""


def widget_tree(state: dict, model_id: str) -> list[dict]:
    """The saved states of a widget and everything it contains, depth first."""
    found, stack, seen = [], [model_id], set()
    while stack:
        mid = stack.pop(0)
        if mid in seen or mid not in state:
            continue
        seen.add(mid)
        model = state[mid]
        found.append(model)
        refs = json.dumps(model["state"]).split('"IPY_MODEL_')[1:]
        stack[:0] = [r.split('"', 1)[0] for r in refs]
    return found


def saved_picture(state: dict, model_id: str) -> tuple[bytes | None, str]:
    """The first PNG a widget's Output holds, and its controls as saved ("k = 2, ...")."""
    png, settings = None, []
    for model in widget_tree(state, model_id):
        s = model["state"]
        if model["model_name"] == "OutputModel":
            for out in s.get("outputs", []):
                if png is None and "image/png" in out.get("data", {}):
                    png = base64.b64decode(out["data"]["image/png"])
        elif "value" in s and s.get("description"):
            value = s["value"]
            if "_options_labels" in s and isinstance(value, int):
                value = s["_options_labels"][value]
            settings.append(f"{s['description']} = {value}")
    return png, ", ".join(settings)


class CoursePages(Transform):
    """Per notebook: alt text on every figure, each widget replaced by its saved picture and a
    note, remote images (the Colab badge) replaced by their text, so no page loads the web."""

    default_priority = 500

    def apply(self) -> None:
        env = self.document.settings.env
        docname = env.docname
        for img in list(self.document.findall(nodes.image)):
            if img["uri"].startswith(("http://", "https://")):
                img.replace_self(nodes.Text(img.get("alt") or "link"))
        self.link_repository_files(env)
        if not docname.startswith("notebooks/"):
            return
        chapter = Path(docname).name.split("_")[0].lstrip("0")  # "4", or "4b": its deeper part
        nb = json.loads(Path(env.doc2path(docname)).read_text(encoding="utf-8"))
        state = nb["metadata"].get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
        figure = 0
        for cell in list(self.document.findall(nodes.container)):
            if cell.get("nb_element") != "cell_code":
                continue
            where = section_title(cell)
            for bundle in list(cell.findall(nodes.container)):
                if bundle.get("nb_element") != "mime_bundle":
                    continue
                views = [c for c in bundle.children if c.get("mime_type") == WIDGET_VIEW]
                source = "".join(nb["cells"][cell["cell_index"]]["source"])
                if views and QUIZ_CALL in source:
                    bundle.replace_self(quiz_nodes(source))
                    continue
                if views:
                    model_id = _model_id(views[0])
                    bundle.replace_self(self.widget_nodes(state, model_id, chapter, where))
                    continue
                images = list(bundle.findall(nodes.image))
                if images:
                    figure += 1
                for img in images:
                    if not img.get("alt"):
                        img["alt"] = f"Figure {figure} of chapter {chapter}: {where}"

    def link_repository_files(self, env) -> None:
        """A link to a repository file that is no page of the site (data/README.md) points at
        the file in the repository instead of turning into plain text."""
        for xref in list(self.document.findall(addnodes.pending_xref)):
            target = xref.get("reftarget", "")
            if xref.get("refdomain") != "doc" or target in env.found_docs:
                continue
            for path in (f"{target}.md", f"{target}.ipynb", target):
                if Path(env.srcdir, path).is_file():
                    url = f"{env.config.course_repository}/blob/main/{path}"
                    xref.replace_self(nodes.reference("", "", *xref.children, refuri=url))
                    break

    def widget_nodes(self, state: dict, model_id: str, chapter: str, where: str) -> list:
        """The saved picture of an explorer, and a note that moving it needs a kernel."""
        png, settings = saved_picture(state, model_id)
        saved = f" ({settings})" if settings else ""
        text = (
            f"Interactive explorer, shown as saved{saved}. Moving its controls needs a "
            "running kernel: open this chapter in JupyterLab (make lab) or on Colab."
        )
        note = nodes.note("", nodes.paragraph(text=text), classes=["widget-note"])
        if png is None:
            return [note]
        app = self.document.settings.env.app
        path = Path(app.outdir).parent / "site-widgets" / f"{model_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        alt = f"Chapter {chapter}, interactive explorer as saved ({settings}): {where}"
        uri = "/" + os.path.relpath(path, app.srcdir)  # Sphinx reads "/x" from the source root
        return [nodes.image(uri=uri, alt=alt, classes=["widget-picture"]), note]


def quiz_nodes(source: str) -> list[nodes.Node]:
    """A self-check as text: its questions, each hint and answer behind a reveal (the widget
    needs a kernel; ``course.quiz`` reads the questions from the cell without running it)."""
    questions = quiz.questions_in(source)
    note = nodes.note(
        "",
        nodes.paragraph(
            text="Self-check, shown as text: open a hint or an answer to see it. In the "
            "chapter (JupyterLab or Colab) you type an answer and press Check."
        ),
        classes=["quiz-note"],
    )
    return [note, nodes.raw("", quiz.as_html(questions), format="html")]


def _model_id(raw: nodes.Node) -> str:
    """The model id inside MyST-NB's <script type=widget-view> node."""
    text = raw.astext()
    return json.loads(text[text.index(">") + 1 : text.rindex("</script>")])["model_id"]


def copy_mathjax(app, exception) -> None:
    """MathJax 3 from site/node_modules into _static/mathjax: the site needs no CDN."""
    if exception is not None or app.builder.format != "html":
        return
    if not MATHJAX.is_dir():
        raise RuntimeError(f"{MATHJAX} is missing: run `npm ci` in site/ (make site does)")
    target = Path(app.outdir) / "_static" / "mathjax"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(MATHJAX, target, ignore=shutil.ignore_patterns(*MATHJAX_SKIP))


def setup(app):
    app.add_config_value("course_repository", "", "html")
    app.connect("source-read", add_toctree)
    app.connect("source-read", solutions_behind_a_toggle)
    app.add_transform(CoursePages)
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
