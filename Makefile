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

# The main job: train the default addition model from scratch, then show its
# held-out exact match, a few predictions and a heatmap of its attention.
RUN_DIR ?= workdirs/addition
run: $(STAMP)
	rm -rf $(RUN_DIR)
	$(PY) train.py --config=configs/addition.py --workdir=$(RUN_DIR)
	$(VENV)/bin/attnjax evaluate --workdir $(RUN_DIR) --show 8
	$(VENV)/bin/attnjax decode --workdir $(RUN_DIR) --input '123+456' \
	  --input '999+999' --input '7+8'
	$(VENV)/bin/attnjax plot --workdir $(RUN_DIR) --input '123+456' \
	  --out $(RUN_DIR)/attention.png

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/attention.py

clean:
	rm -rf $(VENV) build *.egg-info
