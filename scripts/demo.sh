#!/usr/bin/env bash
# The main job on a fresh machine: build, make a random checkpoint of the real gpt-oss layout
# (tiny preset, real 201088-token vocabulary and tokenizer), render a real safeguard prompt (the spam
# policy and one piece of content) and generate from it greedily through the KV cache. The weights are
# random, so the continuation is noise; the pipeline is the real one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ARBITER_SKIP_ORACLES=1 bash scripts/fetch-tokenizer.sh
model=${ARBITER_DEMO_MODEL:-models/tiny}
./build/arbiter make-model --preset tiny --seed 1 --out "$model"
content="Buy cheap followers now!!! Limited offer, click here"
ids=$(./build/arbiter render --model "$model" --policy tests/data/spam/policy.txt --content "$content" --reasoning low |
  sed -nE 's/.*"ids":\[([0-9,]*)\].*/\1/p')
echo "safeguard prompt: $(tr ',' '\n' <<<"$ids" | wc -l) tokens (spam policy + content)"
out=$(./build/arbiter generate --model "$model" --tokens "$ids" --max-new-tokens 16)
echo "generated: $out"
echo "as text:   $(./build/arbiter detokenize --model "$model" --tokens "$(sed -E 's/.*\[([0-9,]*)\].*/\1/' <<<"$out")")"
