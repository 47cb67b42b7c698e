#!/usr/bin/env bash
# Every test on a fresh machine: install dependencies, build (with CUDA when nvcc exists: its tests
# skip visibly without a GPU), run the whole ctest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
cd build
ctest --output-on-failure -j"${ARBITER_JOBS:-$(nproc)}" --timeout 900
