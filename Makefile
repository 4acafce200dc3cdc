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

# Every check CI runs: generated code up to date (Python and Go), lint, types, the layers (.importlinter),
# the Go SDK's tests
# (against a real server), the whole pytest suite.
test: setup
	PYTHON=$(BIN)/python scripts/gen_proto.sh --check
	PYTHON=$(BIN)/python scripts/gen_go.sh --check
	$(BIN)/ruff check .
	$(BIN)/mypy avatarforcing service tools clients/python/avatarforcing_client proto/python/avatarforcing_proto
	$(BIN)/lint-imports
	cd clients/go && go vet ./... && AVATARFORCING_PYTHON=$(abspath $(BIN))/python go test ./...
	@# livekit-server for the LiveKit adapter's real-room test; without it that one test skips, saying why.
	-scripts/install_livekit_server.sh
	LIVEKIT_SERVER_BIN=$$(test -x .tools/bin/livekit-server && echo $(abspath .tools/bin/livekit-server)) \
	  $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy avatarforcing service tools clients/python/avatarforcing_client proto/python/avatarforcing_proto
	$(BIN)/lint-imports

bench: setup
	$(BIN)/avatarforcing bench

proto: setup
	PYTHON=$(BIN)/python scripts/gen_proto.sh
	PYTHON=$(BIN)/python scripts/gen_go.sh
