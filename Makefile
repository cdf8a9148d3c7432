# `make demo` and `make test` work on a fresh clone: they create .venv when it is
# missing and install what they need. torch is pinned: 2.13.0 is the CPU wheel on
# these machines; an unpinned torch would pull several GB of CUDA packages.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
# The suite runs in one pytest-xdist worker per core, at most 8 (each imports torch and
# Triton; CI has 2 cores, where one process took 17 of its 20 minutes).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 8 ] && n=8; echo $$n)

.PHONY: demo test bench info clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/spanfill demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

info: $(STAMP)
	$(BIN)/spanfill info

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
