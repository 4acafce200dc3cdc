#!/usr/bin/env bash
# Builds a pinned livekit-server from the Go module proxy into .tools/bin (for the LiveKit adapter's
# real-room test). Idempotent: skips the build when the pinned version is already there.
# Newer releases (v1.13+) depend on forks the module proxy does not serve; v1.9.11 builds.
set -euo pipefail
VERSION=v1.9.11
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/.tools/bin
stamp=$bin/.livekit-server-$VERSION
if [[ -x $bin/livekit-server && -f $stamp ]]; then
  exit 0
fi
command -v go >/dev/null || { echo "[livekit-server] go is not installed" >&2; exit 1; }
mkdir -p "$bin"
echo "[livekit-server] building $VERSION from the Go module proxy (a few minutes on 2 cores)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
GOBIN=$tmp GOFLAGS=-mod=mod go install "github.com/livekit/livekit-server/cmd/server@$VERSION"
mv "$tmp/server" "$bin/livekit-server"
rm -f "$bin"/.livekit-server-*
touch "$stamp"
echo "[livekit-server] ready: $bin/livekit-server"
