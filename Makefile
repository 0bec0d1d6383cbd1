# Every target sets up the environment first (a .venv, installed once per version of the requirements).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KERNEL := llm-from-scratch
# The stamp's name changes whenever requirements.txt or pyproject.toml changes, forcing a reinstall.
REQ_HASH := $(shell cat requirements.txt pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
NOTEBOOKS := $(sort $(wildcard notebooks/part*.ipynb))

.PHONY: setup run test test-helpers test-notebooks lab lint clean

setup: $(STAMP)

$(STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10 or newer is needed: run make PYTHON=python3.11 ...")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (llm-from-scratch)" > /dev/null
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "environment ready: $(VENV) (kernel '$(KERNEL)')"

# The main job: execute every notebook in series order at full size, save each one's outputs in place
# (what gets committed) and summarise what each reports.
run: setup
	$(BIN)/python scripts/run_series.py --write-back $(NOTEBOOKS)

# pytest over tests/, then every notebook through nbval, in quick mode. Fails if either fails.
test: setup
	@status=0; \
	$(MAKE) --no-print-directory test-helpers || status=1; \
	$(MAKE) --no-print-directory test-notebooks || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: FAILED (see the pytest summaries above)"; fi; \
	exit $$status

test-helpers: setup
	LLM_QUICK=1 $(BIN)/python -m pytest tests -p no:cacheprovider

test-notebooks: setup
	LLM_QUICK=1 LLM_RESULTS_DIR=$(CURDIR)/runs/test-results $(BIN)/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 \
		-p no:cacheprovider $(NOTEBOOKS)

lab: setup
	$(BIN)/jupyter lab notebooks/

lint: setup
	$(BIN)/ruff check helpers tests benchmarks scripts notebooks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
