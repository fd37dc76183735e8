# fxcompress developer entry points. Each target creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev,export]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fxcompress.demo

test: $(STAMP)
	$(PY) -m ruff check fxcompress tests benchmarks
	$(PY) -m pytest -m "not slow" -n 2 -q

lint: $(STAMP)
	$(PY) -m ruff check fxcompress tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
