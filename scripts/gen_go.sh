#!/usr/bin/env bash
# Regenerates the Go protocol code from proto/ into the Go SDK (clients/go/avatarforcingv1).
# Usage: scripts/gen_go.sh [--check]   (--check: fail when the committed code is stale)
#
# Inputs, all pinned so that the same inputs give byte-identical output:
#   protoc             the one bundled with grpcio-tools in the Python venv (PYTHON overrides the
#                      interpreter; pyproject.toml pins grpcio-tools), which also stamps its version
#                      into the generated headers;
#   protoc-gen-go      PROTOC_GEN_GO_VERSION, which must equal google.golang.org/protobuf in go.mod;
#   protoc-gen-go-grpc PROTOC_GEN_GO_GRPC_VERSION (its own module; its output needs
#                      google.golang.org/grpc >= v1.64 at run time, see go.mod).
# Both plugins are built with `go install pkg@version` into a temporary GOBIN.
set -euo pipefail
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2

root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
mod=$root/clients/go
module=github.com/avatarforcing/serve/clients/go
dest=$mod/avatarforcingv1
files=(avatarforcing.pb.go avatarforcing_grpc.pb.go)

check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) echo "usage: scripts/gen_go.sh [--check]" >&2; exit 2 ;;
esac

# protoc-gen-go must match the protobuf runtime the module builds against.
mod_protobuf=$(cd "$mod" && go list -m -f '{{.Version}}' google.golang.org/protobuf)
if [[ "$mod_protobuf" != "$PROTOC_GEN_GO_VERSION" ]]; then
  echo "scripts/gen_go.sh pins protoc-gen-go $PROTOC_GEN_GO_VERSION but clients/go/go.mod requires" \
    "google.golang.org/protobuf $mod_protobuf; make them equal (edit PROTOC_GEN_GO_VERSION or go.mod)" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export GOBIN=$tmp/bin
# Build outside the SDK module so that its go.mod does not interfere with @version installs.
(cd "$tmp" && go install "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION" \
  && go install "google.golang.org/grpc/cmd/protoc-gen-go-grpc@$PROTOC_GEN_GO_GRPC_VERSION")

mkdir -p "$tmp/out"
"$py" -m grpc_tools.protoc -I "$root/proto" \
  --plugin=protoc-gen-go="$GOBIN/protoc-gen-go" \
  --plugin=protoc-gen-go-grpc="$GOBIN/protoc-gen-go-grpc" \
  --go_out="$tmp/out" --go_opt=module=$module \
  --go-grpc_out="$tmp/out" --go-grpc_opt=module=$module \
  "$root/proto/avatarforcing/v1/avatarforcing.proto"
gen=$tmp/out/avatarforcingv1

if [[ $check == 1 ]]; then
  for f in "${files[@]}"; do
    if [[ ! -f "$dest/$f" ]]; then
      echo "missing generated Go code: $dest/$f; run scripts/gen_go.sh" >&2
      exit 1
    fi
    if ! cmp -s "$gen/$f" "$dest/$f"; then
      echo "stale generated Go code: $dest/$f differs from what proto/ and the pinned generators give;" \
        "run scripts/gen_go.sh" >&2
      # Point at the usual cause when only the header's protoc version differs.
      if diff -q <(grep -v '^//.*protoc  ' "$gen/$f") <(grep -v '^//.*protoc  ' "$dest/$f") >/dev/null; then
        have=$(grep -m1 '^//.*protoc  ' "$dest/$f" | awk '{print $NF}')
        got=$(grep -m1 '^//.*protoc  ' "$gen/$f" | awk '{print $NF}')
        echo "  only the protoc version in the header differs: committed $have, this protoc $got" \
          "($("$py" -m grpc_tools.protoc --version) from $py); use the grpcio-tools that pyproject.toml pins" >&2
      else
        diff -u "$dest/$f" "$gen/$f" | head -40 >&2 || true
      fi
      exit 1
    fi
  done
  echo "generated Go code is up to date"
else
  mkdir -p "$dest"
  for f in "${files[@]}"; do cp "$gen/$f" "$dest/$f"; done
  echo "wrote $dest"
fi
