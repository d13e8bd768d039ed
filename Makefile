# `make test` and `make run` set up .venv themselves on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test run lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

run: $(STAMP)
	@echo 'make run: the training job arrives with the training system (train.py,'
	@echo 'configs/). Until then `make test` is the way to see attnjax work.'

lint: $(STAMP)
	$(VENV)/bin/ruff check attnjax tests bench
	$(VENV)/bin/ruff format --check attnjax tests bench

bench: $(STAMP)
	$(PY) bench/attention.py

clean:
	rm -rf $(VENV) build *.egg-info
