PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check voice_trio tests $(wildcard scripts)
	$(BIN)/ruff format --check voice_trio tests $(wildcard scripts)

# One file per worker (--dist loadfile): a file's tests share fixtures and run in order.
test: lint
	$(BIN)/pytest -n 3 --dist loadfile

demo: install
	$(BIN)/voice-trio demo

serve: install
	$(BIN)/voice-trio serve

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
