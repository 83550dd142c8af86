# `make run` trains the small configuration; `make test` runs the suite (with the optional packages the tests
# use, requirements-extras.txt); both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bench lint format

$(VENV)/installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

run: $(VENV)/installed
	$(PY) dlrm_s_pytorch.py --config hb_configs/small.yaml

$(VENV)/extras: requirements-extras.txt $(VENV)/installed
	$(PY) -m pip install --quiet -r requirements-extras.txt
	touch $@

test: $(VENV)/extras
	$(PY) -m pytest -q --durations=15 tests

$(VENV)/peers: bench/requirements-peers.txt $(VENV)/installed
	$(PY) -m pip install --quiet -r bench/requirements-peers.txt
	$(PY) -m pip install --quiet --no-deps torchrec==1.8.0
	touch $@

bench: $(VENV)/peers
	$(PY) bench/bench.py

lint: $(VENV)/installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/installed
	$(VENV)/bin/ruff format .
