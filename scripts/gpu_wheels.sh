#!/usr/bin/env bash
# Downloads, here (where the package index is reachable), the wheels that scripts/gpu_bench.sh installs on a GPU
# machine that reaches no index: FlashAttention-3's forward kernels (fa3-fwd: `--attention fa3`, `--fp8-attention`),
# and PyAV, grpcio and protobuf for the bench's encoder rows, for that machine's Python version.
#   scripts/gpu_wheels.sh [PYTHON_VERSION] [DIR]     # default: 3.11 into .whl (git-ignored)
#   PKGS="fa3-fwd==0.0.3 grpcio==1.85.1"             # only these (the lent machines carry at most 64 MiB in all:
#                                                    # fa3-fwd is 28 MB, PyAV 35, grpcio 7, protobuf 0.3)
# Then carry DIR to the GPU machine and run `WHEELS=DIR scripts/gpu_bench.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
ver=${1:-3.11}
dir=${2:-.whl}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$dir"
# fa3-fwd is one abi3 wheel for every CPython >= 3.9; the others are built per Python version.
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$ver" --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$dir" ${PKGS:-"fa3-fwd==0.0.3" "av>=14" "grpcio==1.85.1" "protobuf>=7.35.1"}
ls -la "$dir"
du -sh "$dir"
