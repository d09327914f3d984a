"""Sphinx configuration of the course website (`make site` -> build/site/index.html).

Sphinx + MyST-NB + sphinx-book-theme (Jupyter Book 1's engine), all from PyPI: it builds with
no network. Jupyter Book 2 / mystmd downloads its site template from its own server at build
time, which a machine that reaches only package registries cannot. The browser assets are
bundled: MathJax from npm (site/package.json), the theme's own from PyPI; widget cells become
their saved picture (course_site.py), so no page loads anything from a CDN.

Run from the repository root: sphinx-build -c site . build/site (the sources are the root's
index.md, README.md, notebooks/ and docs/; include_patterns keeps out everything else).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))  # course.quiz reads the self-checks

project = "minimoe"
author = "the minimoe authors"
html_title = "minimoe: Mixture-of-Experts routing, hands on"
root_doc = "index"
# where links to repository files that are no page (data/README.md) point
course_repository = "https://github.com/minimoe-course/minimoe"
extensions = ["myst_nb", "course_site"]

# The pages: the course map, the chapters in order, the README (set-up, library), docs/.
include_patterns = ["index.md", "README.md", "notebooks/[0-9]*.ipynb", "docs/*.md"]
exclude_patterns = ["build", ".venv", "site", "**/.ipynb_checkpoints"]

# Notebooks are committed executed: the site shows their saved outputs, never re-runs them.
nb_execution_mode = "off"
nb_merge_streams = True
nb_ipywidgets_js = {}  # no widget manager from a CDN: course_site.py shows the saved picture
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# MathJax 3 from site/node_modules (npm ci), copied into _static/mathjax by course_site.py.
mathjax_path = "mathjax/tex-chtml.js"

html_theme = "sphinx_book_theme"
html_theme_options = {
    "home_page_in_toc": True,
    "show_toc_level": 2,
    "use_download_button": True,
}
# the theme reads its colour mode from here; unset, it logs a console error on every page
html_context = {"default_mode": "light"}
