#!/usr/bin/env bash
# Every test on a fresh machine: install dependencies, fetch the real tokenizer and the npm test
# oracles, build (with CUDA when nvcc exists: its tests skip visibly without a GPU), run all of ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
bash scripts/fetch-tokenizer.sh
cd build
ctest --output-on-failure -j"${ARBITER_JOBS:-$(nproc)}" --timeout 900
