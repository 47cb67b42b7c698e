#!/usr/bin/env bash
# The main job on a fresh machine: install dependencies, build, make a random checkpoint of the real
# gpt-oss layout (tiny preset, real 201088-token vocabulary and tokenizer), then classify content
# against a real policy (the spam policy) through the serving stack: harmony prompt, central
# scheduler with policy prefix caching, engine, verdict parsing. Then the same through the HTTP API:
# `arbiter serve` answers POST /v1/classify. The weights are random, so the reasoning is noise and the
# verdict is usually null (unparseable); the pipeline is the real one.
# ARBITER_DEMO_BIN=path: use that binary and skip the set-up (the test suite runs the demo this way);
# ARBITER_DEMO_MODEL, ARBITER_DEMO_PORT: where the model goes, which port the server takes.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${ARBITER_DEMO_BIN:-}
if [ -z "$bin" ]; then
  bash scripts/build.sh
  ARBITER_SKIP_ORACLES=1 bash scripts/fetch-tokenizer.sh
  bin=./build/arbiter
fi
model=${ARBITER_DEMO_MODEL:-models/tiny}
"$bin" make-model --preset tiny --seed 1 --out "$model"

echo "== offline: arbiter classify (spam policy, 3 contents) =="
input=$(mktemp)
trap 'rm -f "$input"' EXIT
printf '%s\n' '{"id":"a","content":"Buy cheap followers now!!! Limited offer, click here"}' \
  '{"id":"b","content":"Does anyone know a good bakery near the station?"}' \
  '{"id":"c","content":"WIN A FREE PHONE: reply with your card number"}' >"$input"
"$bin" classify --model "$model" --policy tests/data/spam/policy.txt --input "$input" --output - \
  --effort low --max-tokens 24

echo "== online: arbiter serve + POST /v1/classify =="
port=${ARBITER_DEMO_PORT:-18080}
"$bin" serve --model "$model" --port "$port" >/tmp/arbiter-demo-serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$input"' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
  sleep 0.2
done
body=$(python3 -c 'import json,sys; print(json.dumps({"content": "Buy cheap followers now!!!", "policies": [{"id": "spam", "text": open(sys.argv[1]).read()}], "reasoning_effort": "low", "max_tokens": 24}))' tests/data/spam/policy.txt)
curl -sf -X POST "http://127.0.0.1:$port/v1/classify" -H 'Content-Type: application/json' -d "$body"
echo
kill -TERM $server
wait $server || true
