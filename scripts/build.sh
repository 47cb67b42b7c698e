#!/usr/bin/env bash
# Installs system dependencies (idempotent) and builds Arbiter into build/ (binary: build/arbiter).
# CUDA is compiled in automatically when nvcc is found. Extra arguments go to cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
jobs=${ARBITER_JOBS:-$(nproc)}
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
ninja -C build -j"$jobs"
