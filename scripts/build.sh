#!/usr/bin/env bash
# Installs system dependencies (idempotent) and builds Arbiter into build/ (binary: build/arbiter).
# CUDA is compiled in automatically when nvcc is found. Extra arguments go to cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
jobs=${ARBITER_JOBS:-$(nproc)}
# ccache (installed by install-deps) makes a rebuild of unchanged files, in this clone or another
# one of the same tree, a cache lookup; paths are taken relative to the clone so clones share it.
launcher=()
if command -v ccache >/dev/null; then
  export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=true
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" "$@" >/dev/null
ninja -C build -j"$jobs"
