#!/usr/bin/env bash
# Regenerates the reference pages of docs/ (api.md, cli.md, metrics.md, the sizing table of
# deploying.md) from the sources they describe: see scripts/gen-docs.py. Needs a built
# build/arbiter (or ARBITER_BIN) and the tokenizer (scripts/fetch-tokenizer.sh).
#   bash scripts/gen-docs.sh            write the pages
#   bash scripts/gen-docs.sh --check    only compare; exit 1 naming the stale pages (what ctest runs)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/gen-docs.py --bin "${ARBITER_BIN:-build/arbiter}" "$@"
