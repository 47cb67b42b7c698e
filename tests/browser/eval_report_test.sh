#!/usr/bin/env bash
# ctest browser_eval_report: writes an `arbiter eval` report (a tiny random model, the spam golden
# set, --effort auto: every cascade stage, the sweep) and checks report.html in headless Chromium against report.json
# (tests/browser/eval_report.cjs). Exits 77 (skipped) when node, Chromium or puppeteer-core is missing.
#   usage: eval_report_test.sh ARBITER_BINARY NODE NODE_MODULES_DIR SPAM_DIR TOKENIZER_DIR
set -euo pipefail
bin=$1 node=$2 modules=$3 spam=$4 tokenizer=$5
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -x "$node" ]] || { echo "SKIP: no node"; exit 77; }
[[ -f "$modules/puppeteer-core/package.json" ]] || { echo "SKIP: no puppeteer-core in $modules (scripts/fetch-tokenizer.sh)"; exit 77; }
[[ -x "${ARBITER_CHROMIUM:-/usr/bin/chromium}" ]] || { echo "SKIP: no Chromium (scripts/install-deps.sh)"; exit 77; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" make-model --preset tiny --seed 7 --out "$work/model" --tokenizer-dir "$tokenizer" 2>/dev/null
"$bin" eval --model "$work/model" --device cpu --dataset "$spam/golden.jsonl" --policy "$spam/policy.txt" \
  --effort auto --max-context 2048 --reasoning-budget 4,4,8 --answer-tokens 8 --bootstrap 200 --out "$work/report" >/dev/null
NODE_PATH="$modules" "$node" "$here/eval_report.cjs" "$work/report"
