#!/usr/bin/env bash
# Installs everything the project needs on a fresh machine: Debian packages (when run as root
# and missing), a virtual environment in .venv, the package and its SDK in editable mode.
# Idempotent: a second run only checks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${AVATARFORCING_VENV:-$root/.venv}

# espeak-ng: scripts/make_demo_assets.py (the bundled speech sample); redis-server: the routing tests and
# `avatarforcing bench --failover` start a real one; openssl: the TLS tests make their certificates;
# chromium: tests/test_view.py plays the live page (`avatarforcing view`) in a real headless browser.
apt_pkgs=(espeak-ng redis-server openssl chromium)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "[bootstrap] installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "[bootstrap] warning: missing Debian packages ${missing[*]} (run as root to install them)" >&2
  fi
fi

stamp=$venv/.avatarforcing-installed
want=$(cat pyproject.toml clients/python/pyproject.toml proto/python/pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
if [[ ! -x $venv/bin/python ]]; then
  echo "[bootstrap] creating virtual environment $venv"
  python3 -m venv "$venv"
fi
echo "[bootstrap] installing Python packages (torch is large: the first run takes a few minutes)"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e "$root/proto/python" -e "$root/clients/python[mp4,pipecat]" -e "$root[dev]"
# tests/test_pipecat.py: pipecat-ai without its protobuf<7 pin (its other dependencies come with the SDK's
# `pipecat` extra above; see clients/python/pyproject.toml).
"$venv/bin/python" -m pip install -q --no-deps "pipecat-ai==1.14.0"
echo "$want" > "$stamp"
echo "[bootstrap] ready: $venv"
