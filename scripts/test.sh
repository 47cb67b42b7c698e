#!/usr/bin/env bash
# Every test on a fresh machine: install dependencies, fetch the real tokenizer and the npm test
# oracles, build (with CUDA when nvcc exists: its tests skip visibly without a GPU), start a
# throwaway PostgreSQL server for the postgres-labelled tests (stopped at exit), run all of ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
bash scripts/fetch-tokenizer.sh
eval "$(bash scripts/start-postgres.sh)"
# An absolute path: the trap runs after the cd below.
trap "bash '$PWD/scripts/start-postgres.sh' --stop \"\$ARBITER_PG_DIR\"" EXIT
cd build
ctest --output-on-failure -j"${ARBITER_JOBS:-$(nproc)}" --timeout 900
