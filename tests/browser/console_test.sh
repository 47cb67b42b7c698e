#!/usr/bin/env bash
# ctest browser_console: starts `arbiter serve` on a tiny random model (CPU, port 0, a decision log,
# an API key file) and (console.cjs waits for /ready) drives the web console at / in headless Chromium (tests/browser/console.cjs).
# Exits 77 (skipped) when node, Chromium or puppeteer-core is missing. With ARBITER_CONSOLE_SCREENSHOT
# set to a .png path, the playground is saved there (docs/console.png comes from this).
#   usage: console_test.sh ARBITER_BINARY NODE NODE_MODULES_DIR TOKENIZER_DIR
set -euo pipefail
bin=$1 node=$2 modules=$3 tokenizer=$4
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -x "$node" ]] || { echo "SKIP: no node"; exit 77; }
[[ -f "$modules/puppeteer-core/package.json" ]] || { echo "SKIP: no puppeteer-core in $modules (scripts/fetch-tokenizer.sh)"; exit 77; }
[[ -x "${ARBITER_CHROMIUM:-/usr/bin/chromium}" ]] || { echo "SKIP: no Chromium (scripts/install-deps.sh)"; exit 77; }
work=$(mktemp -d)
server=
cleanup() {
  if [[ -n "$server" ]]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
"$bin" make-model --preset tiny --seed 7 --out "$work/model" --tokenizer-dir "$tokenizer" 2>/dev/null
key=sk-console-$RANDOM$RANDOM
echo "$key" >"$work/keys"
"$bin" serve --model "$work/model" --device cpu --port 0 --warm-efforts none --reasoning-budget 4,4,8 --answer-tokens 16 \
  --db "$work/log.db" --api-key-file "$work/keys" >"$work/serve.log" 2>&1 &
server=$!
# The bound address, from the line `arbiter serve: listening on http://HOST:PORT (pid N)`.
url=
for _ in $(seq 1 600); do
  url=$(sed -n 's|.*listening on \(http://[0-9.]*:[0-9]*\) .*|\1|p' "$work/serve.log" | head -n 1)
  [[ -n "$url" ]] && break
  kill -0 "$server" 2>/dev/null || { echo "arbiter serve exited:"; cat "$work/serve.log"; exit 1; }
  sleep 0.1
done
[[ -n "$url" ]] || { echo "arbiter serve did not say where it listens:"; cat "$work/serve.log"; exit 1; }
status=0
NODE_PATH="$modules" "$node" "$here/console.cjs" "$url" "$key" ${ARBITER_CONSOLE_SCREENSHOT:+"$ARBITER_CONSOLE_SCREENSHOT"} || status=$?
[[ $status -eq 0 ]] || { echo "--- arbiter serve log:"; tail -n 40 "$work/serve.log"; }
exit $status
