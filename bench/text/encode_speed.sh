#!/usr/bin/env bash
# Tokenizer speed vs OpenAI's tiktoken core, measured in one run on the same text:
# encode MB/s on one thread for npm `tiktoken` (Rust compiled to WASM, under node) and for
# Arbiter's tokenizer, on a generated mixed corpus of MB megabytes cut into the same 64 KiB
# chunks; prints both, the ratio, and the safeguard prompt render time.
#   bench/text/encode_speed.sh [BUILD_DIR (default build)] [MB (default 4)]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${1:-$repo/build}
mb=${2:-4}
cd "$repo"
bash scripts/fetch-tokenizer.sh >/dev/null
tok_dir=${ARBITER_TOKENIZER_DIR:-$repo/.cache/tokenizer}
node_dir=${ARBITER_NODE_DIR:-$repo/.cache/node}

ninja -C "$build" -j"${ARBITER_JOBS:-2}" text_bench >/dev/null

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
node "$repo/bench/text/tiktoken_speed.mjs" "$node_dir" "$tmp/corpus.txt" "$mb" > "$tmp/tiktoken.json"
"$build/bench/text/text_bench" --tokenizer "$tok_dir" --corpus "$tmp/corpus.txt" > "$tmp/arbiter.json"
node -e '
const fs = require("fs");
const t = JSON.parse(fs.readFileSync(process.argv[1])), a = JSON.parse(fs.readFileSync(process.argv[2]));
const f = (x) => x.toFixed(2);
console.log(`corpus: ${(a.bytes / 1e6).toFixed(2)} MB in ${a.chunks} chunks, one thread`);
console.log(`tiktoken (npm ${t.version}, wasm): ${f(t.mb_per_s)} MB/s, ${t.tokens} tokens`);
console.log(`arbiter:                   ${f(a.mb_per_s)} MB/s, ${a.tokens} tokens`);
console.log(`ratio arbiter/tiktoken:    ${f(a.mb_per_s / t.mb_per_s)}x`);
console.log(`same tokens:               ${a.tokens === t.tokens ? "yes" : "NO"}`);
console.log(`render+tokenize safeguard prompt (${a.render_policy_tokens}-token policy, ${a.render_content_tokens}-token content, ${a.render_prompt_tokens} tokens): ${a.render_us.toFixed(1)} us`);
if (a.tokens !== t.tokens) process.exit(1);
' "$tmp/tiktoken.json" "$tmp/arbiter.json"
