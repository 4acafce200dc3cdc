#!/usr/bin/env bash
# The GPU measurements of `avatarforcing bench --gpu`, as one script for a machine whose Python already
# has torch (a lent GPU box, or a CUDA node): installs nothing unless wheels are given, writes the JSON
# and the log under OUT (default bench/results).
#   WHEELS=.whl   optional folder of wheels for what the box lacks (PyAV, protobuf, grpcio: the encoder;
#                 fa3-fwd: FlashAttention-3's rows); scripts/gpu_wheels.sh downloads them
#   OUT=dir       where gpu-*.json and gpu-bench.log go
#   PYTHON=python3  the interpreter with torch
#   ARGS="..."    extra arguments for the bench (e.g. --sections denoise --steps 4)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [[ -n "${WHEELS:-}" ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The packages under their import names, from this checkout (no install on the device machine).
pp=$(mktemp -d)
ln -s "$PWD/avatarforcing" "$pp/avatarforcing"
ln -s "$PWD/service" "$pp/avatarforcing_service"
ln -s "$PWD/tools" "$pp/avatarforcing_tools"
ln -s "$PWD/clients/python/avatarforcing_client" "$pp/avatarforcing_client"
ln -s "$PWD/proto/python/avatarforcing_proto" "$pp/avatarforcing_proto"
export PYTHONPATH=$pp${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv 2>&1 | tee "$OUT/gpu-bench.log" || true
# shellcheck disable=SC2086
"$PY" -m avatarforcing_tools.gpubench --out "$OUT/gpu-bench.json" ${ARGS:-} 2>&1 | tee -a "$OUT/gpu-bench.log"
