PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# uv installs exactly what uv.lock names. It lives in a venv of its own, so that syncing
# .venv (which removes whatever the lock does not name) never removes uv itself.
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never

.PHONY: install lock upgrade lint typecheck check test demo serve clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): $(UV) pyproject.toml uv.lock
	@$(UV) lock --check --quiet --python $(PYTHON) || { \
	  echo "uv.lock does not match pyproject.toml: run 'make lock' and commit uv.lock." >&2; \
	  exit 1; }
	$(UV) sync --locked --extra dev --quiet --python $(PYTHON)
	touch $(STAMP)

install: $(STAMP)

# Re-resolve after editing pyproject.toml, keeping every pin the new ranges still allow.
lock: $(UV)
	$(UV) lock --python $(PYTHON)

# Move every dependency to the newest release its range allows: a deliberate commit.
upgrade: $(UV)
	$(UV) lock --upgrade --python $(PYTHON)

lint: install
	$(BIN)/ruff check voice_trio tests scripts
	$(BIN)/ruff format --check voice_trio tests scripts
	$(BIN)/mypy

typecheck: install
	$(BIN)/mypy

# The fast loop: lint, types and the tests that need no real-time call (marked `e2e`).
check: lint
	$(BIN)/pytest -n 2 --dist loadfile -m "not e2e"

# The whole suite; what CI runs. One file per worker (--dist loadfile): a file's tests
# share fixtures and run in order.
test: lint
	$(BIN)/pytest -n 3 --dist loadfile

demo: install
	$(BIN)/voice-trio demo

serve: install
	$(BIN)/voice-trio serve

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
