#!/usr/bin/env bash
# The main job on a fresh machine: build, make a random checkpoint of the real gpt-oss layout
# (tiny preset, real 201088-token vocabulary), and generate from it through the KV cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ARBITER_SKIP_ORACLES=1 bash scripts/fetch-tokenizer.sh
model=${ARBITER_DEMO_MODEL:-models/tiny}
./build/arbiter make-model --preset tiny --seed 1 --out "$model"
echo "greedy continuation of <|start|>user<|message|>:"
./build/arbiter generate --model "$model" --tokens 200006,1428,200008 --max-new-tokens 16
