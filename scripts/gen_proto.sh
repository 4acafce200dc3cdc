#!/usr/bin/env bash
# Regenerates the Python protocol code from proto/ into the protocol package (proto/python, avatarforcing_proto), which the server and the Python SDK both import.
# Usage: scripts/gen_proto.sh [--check]   (--check: fail when the committed code is stale)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
dest=$root/proto/python/avatarforcing_proto/v1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  "$root/proto/avatarforcing/v1/avatarforcing.proto"
gen=$tmp/avatarforcing/v1
# The generated service module imports its messages as `avatarforcing.v1`, which would
# resolve to the model package; make the import relative to the SDK's own folder.
sed -i 's/^from avatarforcing\.v1 import /from . import /' "$gen/avatarforcing_pb2_grpc.py"
if [[ "${1:-}" == "--check" ]]; then
  for f in avatarforcing_pb2.py avatarforcing_pb2.pyi avatarforcing_pb2_grpc.py; do
    if ! cmp -s "$gen/$f" "$dest/$f"; then
      echo "stale generated protocol code: $dest/$f differs from proto/; run scripts/gen_proto.sh" >&2
      exit 1
    fi
  done
  echo "generated protocol code is up to date"
else
  mkdir -p "$dest"
  cp "$gen"/avatarforcing_pb2.py "$gen"/avatarforcing_pb2.pyi "$gen"/avatarforcing_pb2_grpc.py "$dest/"
  echo "wrote $dest"
fi
