# The two commands a newcomer needs:  make demo  |  make test
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo serve test lint bench proto

setup:
	@AVATARFORCING_VENV=$(abspath $(VENV)) scripts/bootstrap.sh

# Starts the service on its embedded defaults, streams the bundled speech sample and
# reference image through it with the Python SDK, and writes out/demo.mp4.
demo: setup
	$(BIN)/avatarforcing demo --out out/demo.mp4

serve: setup
	$(BIN)/avatarforcing serve

# Every check CI runs: generated code up to date, lint, types, the whole test suite.
test: setup
	PYTHON=$(BIN)/python scripts/gen_proto.sh --check
	$(BIN)/ruff check .
	$(BIN)/mypy avatarforcing service clients/python/avatarforcing_client
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy avatarforcing service clients/python/avatarforcing_client

bench: setup
	$(BIN)/avatarforcing bench

proto: setup
	PYTHON=$(BIN)/python scripts/gen_proto.sh
