# The two commands of the README:
#   make demo   set everything up, then read the sample forms and checks into demo-out/
#   make test   set everything up, then run the test suite (what CI runs)
# Set-up is done once and redone only when pyproject.toml changes. It byte-compiles formreader,
# as pip does a package it installs (not an editable one): where Python may not write bytecode
# itself (PYTHONDONTWRITEBYTECODE), every command compiled its modules again in each of its
# processes (0.05 s each; a 200-page run's first page 0.1 s later).

VENV   ?= .venv
PY     := $(VENV)/bin/python
# Two levels: reading (no TensorFlow, no browser) for the demo; everything for tests,
# training, evaluation and benchmarks.
READ   := $(VENV)/.formreader-read
STAMP  := $(VENV)/.formreader-dev
PYTHON ?= $(shell command -v python3.11 || command -v python3)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint samples evaluate benchmark accelerator

setup: $(STAMP)

define apt_need
	@missing=""; for pair in $(1); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing$$missing with apt-get"; \
	    $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi
endef

$(READ): pyproject.toml
	$(call apt_need,pdftoppm:poppler-utils)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e .
	$(PY) -m compileall -q formreader
	@touch $@

# The tests also drive Debian's chromium (the review station and the drawing pad in a real
# browser) and read printed labels with tesseract (template detect's field names).
$(STAMP): pyproject.toml
	$(call apt_need,pdftoppm:poppler-utils chromium:chromium tesseract:tesseract-ocr)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(PY) -m compileall -q formreader
	@touch $@ $(READ)

demo: $(READ)
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
	$(PY) benchmarks/bench_review.py

# What a session lent an accelerator carries to it (models/MODEL_CARD.md, "On a lent accelerator"):
# the digit model's training splits, prepared here as ACCEL_RECIPE makes them (the machine has
# no data sets), ORAND's training and validation check amounts (the string model trains on them;
# its test checks stay here), and the wheels its Python 3.12 lacks (Keras; it holds JAX), in
# .accel/ (ignored).
ACCEL_RECIPE ?= --scanned 0.5 --written 1.0
accelerator: $(STAMP)
	mkdir -p .accel
	$(VENV)/bin/formreader train --prepare-only --force --prepared .accel/splits.npz $(ACCEL_RECIPE)
	rm -rf .accel/data && $(PY) -c 'from formreader.training.datasets import copy_orand; copy_orand(".accel/data/orand_car_a")'
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .accel \
	  keras==3.15.1 namex optree
