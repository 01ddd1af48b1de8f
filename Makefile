# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
# checkov pins libraries the app also uses, so it lives in a venv of its own.
INFRA_VENV := .venv-infra
INFRA_STAMP := $(INFRA_VENV)/.installed

.PHONY: demo demo-ortto console test lint bench bench-quick setup clean browser
# Debian's packages for the console's browser tests; root installs them, anyone else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

setup: $(STAMP) $(NODE_STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(INFRA_STAMP): requirements-infra.txt
	$(PYTHON) -m venv $(INFRA_VENV)
	$(INFRA_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(INFRA_VENV)/bin/python -m pip install --quiet -r requirements-infra.txt
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Tests that measure time run alone first; the rest (each on a stack of its own) in parallel workers.
TEST_WORKERS ?= 4
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

test: setup lint $(INFRA_STAMP) browser
	$(PY) -m pytest -q -m serial
	$(PY) -m pytest -q -m "not serial" -n $(TEST_WORKERS) --maxschedchunk 1

demo: setup
	$(PY) -m tools.demo

demo-ortto: setup
	$(PY) -m tools.demo --ortto

console: setup
	$(PY) -m tools.console

bench: setup
	$(PY) -m bench.run

bench-quick: setup
	$(PY) -m bench.run --quick

clean:
	rm -rf $(VENV) $(INFRA_VENV) node_modules .pytest_cache bench/out
