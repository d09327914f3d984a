# minimoe: `make lab` to open the course, `make test` to check it.
PYTHON ?= python3
TORCH ?= torch==2.13.0
# CPU=1: torch from PyTorch's CPU-only wheel index (about 200 MB instead of about 3 GB on Linux)
TORCH_INDEX := $(if $(CPU),--index-url https://download.pytorch.org/whl/cpu,)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# Jupyter refuses to run as root unless told (containers, some cloud machines)
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup dev lab student test test-lib test-notebooks test-browser site notebooks lint bench clean

# A learner's install: torch, the course and JupyterLab, nothing else.
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, on its own: CPU=1 (or TORCH) picks the build, see the README
	$(PY) -m pip install $(TORCH) $(TORCH_INDEX)
	$(PY) -m pip install -e ".[lab]"
	touch $(STAMP)

# Developers' and teachers' tools on top: pytest, nbval, hypothesis, ruff, nbgrader, transformers.
dev: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[dev,bench]"
	touch $(DEV_STAMP)

# JupyterLab on the course map, rendered: Markdown opens in its preview and no news prompt shows
# (this venv's settings defaults: tools/lab-overrides.json); the chapters are trusted, so their
# committed widgets render.
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json
lab: setup $(LAB_SETTINGS)
	$(VENV)/bin/jupyter trust notebooks/[0-9]*.ipynb
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) --LabApp.default_url=/lab/tree/index.md

$(LAB_SETTINGS): tools/lab-overrides.json
	mkdir -p $(dir $@)
	cp $< $@

# The chapters without their solutions, for students: build/student/*_student.ipynb (nbgrader,
# one assignment per chapter; build/nbgrader/ is the nbgrader course, see docs/teaching.md).
# Never writes over a file it did not write, nor one a learner changed.
student: dev
	$(PY) tools/student.py

test: lint
	$(PY) -m pytest -q -m "not browser" tests/
	$(PY) -m pytest -q --nbval-lax --nbval-current-env --nbval-cell-timeout=600 --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider notebooks/
	$(MAKE) --no-print-directory test-browser

test-lib: dev
	$(PY) -m pytest -q -m "not browser" tests/

test-notebooks: dev
	$(PY) -m pytest -q --nbval-lax --nbval-current-env --nbval-cell-timeout=600 --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider notebooks/

# The site's pages, and two chapters' explorers live in JupyterLab, in Debian's chromium
# (apt-get install chromium; .ci/run does). Screenshots: build/screenshots/.
test-browser: site
	$(PY) -m pytest -q -p no:cacheprovider --confcutdir=tests/browser -m browser tests/browser/

# The course as a website, build/site/index.html: the committed notebooks as executed (never
# re-run), Sphinx + MyST-NB (site/conf.py says why), MathJax from npm: works with no internet.
SITE_STAMP := $(VENV)/.site-installed
site: $(SITE_STAMP) site/node_modules/.installed
	rm -rf build/site build/site-doctrees build/site-widgets build/jupyter_execute
	$(VENV)/bin/sphinx-build -E -W --keep-going -q -b html -c site -d build/site-doctrees . build/site

$(SITE_STAMP): pyproject.toml $(DEV_STAMP)
	$(PY) -m pip install --quiet -e ".[site,browser]"
	touch $@

site/node_modules/.installed: site/package.json site/package-lock.json
	cd site && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Re-execute every notebook in place, top to bottom in a fresh kernel (outputs are committed), with
# nbclient's own command (nbconvert's --execute hung on a busy 2-core machine, its kernel idle).
notebooks: dev
	for nb in notebooks/[0-9]*.ipynb; do \
	  $(VENV)/bin/jupyter execute --inplace --timeout=600 --kernel_name=python3 $$nb || exit 1; \
	done

lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: dev
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) .pytest_cache
