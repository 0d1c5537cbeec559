# Each target bootstraps .venv on first use (Python 3.11 or newer).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# pytest-xdist workers for `make test`; each takes whole test files (--dist loadfile), so a
# module's servers and clusters start once. TEST_WORKERS=0: one process, as plain `pytest` runs.
TEST_WORKERS ?= 3

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/meshlib demo

test: $(STAMP)
	$(BIN)/ruff check meshlib tests examples bench
	$(BIN)/mypy meshlib
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check meshlib tests examples bench
	$(BIN)/ruff format --check meshlib tests examples bench

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/pick.py
	$(BIN)/python bench/convergence.py
	$(BIN)/python bench/load_balancing.py
	$(BIN)/python bench/retry_storm.py
	$(BIN)/python bench/tls.py
	$(BIN)/python bench/inbound.py
	$(BIN)/python bench/grpc_overhead.py
	$(BIN)/python bench/discovery.py
	$(BIN)/python bench/overload.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
