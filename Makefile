# minimoe: `make lab` to open the course, `make test` to check it.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Jupyter refuses to run as root unless told (containers, some cloud machines)
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab test test-lib test-notebooks notebooks lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) index.md

test: lint
	$(PY) -m pytest -q tests/
	$(PY) -m pytest -q --nbval-lax --nbval-current-env --nbval-cell-timeout=600 --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider notebooks/

test-lib: setup
	$(PY) -m pytest -q tests/

test-notebooks: setup
	$(PY) -m pytest -q --nbval-lax --nbval-current-env --nbval-cell-timeout=600 --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider notebooks/

# Re-execute every notebook in place, top to bottom in a fresh kernel (outputs are committed).
notebooks: setup
	for nb in notebooks/[0-9]*.ipynb; do \
	  $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=600 --ExecutePreprocessor.kernel_name=python3 $$nb || exit 1; \
	done

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) .pytest_cache
