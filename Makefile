# The two commands of the README:
#   make demo   set everything up, then read the sample forms and checks into demo-out/
#   make test   set everything up, then run the test suite (what CI runs)
# Set-up is done once and redone only when pyproject.toml changes.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.formreader-installed
PYTHON ?= $(shell command -v python3.11 || command -v python3)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint samples evaluate benchmark

setup: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; \
	  command -v pdftoppm >/dev/null 2>&1 || missing="$$missing poppler-utils"; \
	  command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing$$missing with apt-get (PDF rendering; the browser for the drawing pad's tests)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/formreader process samples/scans --template templates/demo_form.yaml --out demo-out/results.csv
	$(VENV)/bin/formreader process samples/checks --template templates/bank_check.yaml --out demo-out/checks.csv
	@echo; echo "First rows of demo-out/results.csv:"; head -n 8 demo-out/results.csv
	@echo; echo "First rows of demo-out/checks.csv:"; head -n 5 demo-out/checks.csv

test: $(STAMP)
	$(VENV)/bin/ruff check formreader tests benchmarks samples
	$(PY) -m pytest -q

samples: $(STAMP)
	$(PY) samples/make_samples.py

evaluate: $(STAMP)
	$(VENV)/bin/formreader evaluate
	$(PY) benchmarks/evaluate_forms.py
	$(PY) benchmarks/evaluate_checks.py

benchmark: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_model.py
