#!/usr/bin/env bash
# Batch-1 decode, Arbiter against llama.cpp, on the same random checkpoint of the real layer shape,
# on this machine, in alternating rounds (the machine's speed drifts; alternation spreads the drift
# over both). Prints a table and writes it as JSON.
#
# llama.cpp comes from npm: node-llama-cpp's package carries llama.cpp's source as a git bundle. It
# is built here with -march=native (GGML_NATIVE), and the checkpoint is written as GGUF by
# to_gguf.py (llama.cpp's own converter needs PyTorch and transformers, which Debian 12 lacks).
# Before timing, each depth checks that both run the same model: the greedy continuations of a
# prompt, and llama.cpp's logits at its end against Arbiter's exact ones, next to the distance of
# Arbiter's own int8 expert mode (the kind of rounding llama.cpp applies) from them.
#
# Each side decodes --tokens tokens after a short prompt, 2 threads:
# - Arbiter: `arbiter generate --timings` (decode_tokens_per_s: the decode steps alone);
# - llama.cpp: `llama-bench -p 0 -n N -t 2` (tg N), in each round the better of its two load modes:
#   mmap (the weights read in place from the page cache) and none (read into its own buffers, where
#   it repacks MXFP4 experts for its SIMD loops).
#
# usage: bench/llamacpp/compare.sh [--model DIR] [--layers "4 8 24"] [--rounds 3] [--tokens 64]
#                                  [--work DIR] [--out FILE.json]
#   --model DIR  a gpt-oss checkpoint (default: `arbiter make-model --preset 20b-shape` with as many
#                layers as the deepest of --layers, written under --work)
# ARBITER_BIN: the arbiter binary (build/arbiter).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
arbiter=${ARBITER_BIN:-$root/build/arbiter}
model="" layers="4 8 24" rounds=3 tokens=64 work=/tmp/arbiter-llamacpp out=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --model) model=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
out=${out:-$work/compare.json}
[[ -x $arbiter ]] || { echo "no arbiter binary at $arbiter (set ARBITER_BIN)" >&2; exit 1; }
mkdir -p "$work"
python=/usr/bin/python3  # Debian's, which sees the apt-installed numpy

# --- tools -------------------------------------------------------------------------------------
need=()
$python -c "import numpy, yaml" 2>/dev/null || need+=(python3-numpy python3-yaml)
command -v ninja >/dev/null || need+=(ninja-build)
if [[ ${#need[@]} -gt 0 ]]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# --- llama.cpp ---------------------------------------------------------------------------------
node_llama_cpp=3.22.1
src=$work/llama.cpp
if [[ ! -d $src/.git ]]; then
  (cd "$work" && npm pack --silent "node-llama-cpp@$node_llama_cpp" >/dev/null &&
    tar xzf "node-llama-cpp-$node_llama_cpp.tgz" package/llama/gitRelease.bundle &&
    git clone -q package/llama/gitRelease.bundle "$src" && rm -rf package "node-llama-cpp-$node_llama_cpp.tgz")
fi
if [[ ! -x $src/build/bin/llama-bench ]]; then
  cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$src/build" -j2 --target llama-bench >/dev/null
fi
greedy=$work/greedy
if [[ ! -x $greedy || $here/greedy.cc -nt $greedy ]]; then
  g++ -O2 -std=c++17 "$here/greedy.cc" -I "$src/include" -I "$src/ggml/include" -L "$src/build/bin" \
    -lllama -lggml -lggml-base -Wl,-rpath,"$src/build/bin" -o "$greedy"
fi
llama_version=$(cd "$src" && git log -1 --format=%h)

# --- checkpoint --------------------------------------------------------------------------------
deepest=0
for l in $layers; do ((l > deepest)) && deepest=$l; done
if [[ -z $model ]]; then
  model=$work/model-$deepest
  [[ -f $model/config.json ]] || "$arbiter" make-model --preset 20b-shape --layers "$deepest" --out "$model" >/dev/null
fi

# The first L layers of the checkpoint, for both sides: Arbiter reads a folder whose config says L
# layers (the shards linked, not copied), llama.cpp a GGUF file of those layers.
prepare() {
  local l=$1 dir=$work/arbiter-$1
  mkdir -p "$dir"
  for f in "$model"/*; do [[ $(basename "$f") == config.json ]] || ln -sf "$f" "$dir/"; done
  $python - "$model/config.json" "$dir/config.json" "$l" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
n = int(sys.argv[3])
if n > c["num_hidden_layers"]:
    sys.exit(f"the checkpoint has {c['num_hidden_layers']} layers, fewer than {n}")
c["num_hidden_layers"] = n
c["layer_types"] = c["layer_types"][:n]
json.dump(c, open(sys.argv[2], "w"), indent=2)
EOF
  [[ -f $work/$l.gguf ]] || PYTHONPATH=$src/gguf-py $python "$here/to_gguf.py" "$model" "$work/$l.gguf" --layers "$l" 2>/dev/null
}

# A harmony-formatted prompt (system, user, assistant's start), as token ids.
prompt=200006,17360,200008,3575,553,261,10297,200007,200006,1428,200008,12194,200007,200006,173781

token_list() {  # the "tokens" of a generate-style JSON object on stdin, comma-separated
  $python -c "import json, sys; print(','.join(map(str, json.load(sys.stdin)['tokens'])))"
}
arbiter_tps() {
  "$arbiter" generate --model "$work/arbiter-$1" --tokens "$prompt" --max-new-tokens $((tokens + 1)) --timings |
    $python -c "import json, sys; print(json.load(sys.stdin)['timings']['decode_tokens_per_s'])"
}
llama_tps() {  # $1 layers, $2 load mode: mmap or none
  "$src/build/bin/llama-bench" -m "$work/$1.gguf" -p 0 -n "$tokens" -t 2 -r 1 -lm "$2" -o json 2>/dev/null |
    $python -c "import json, sys; print(json.load(sys.stdin)[0]['avg_ts'])"
}

results=()
for l in $layers; do
  prepare "$l"
  # Same model on both sides: the greedy continuations, and the logits at the prompt's last position
  # (Arbiter exact, llama.cpp, and Arbiter with int8 expert activations as llama.cpp quantizes them,
  # one token per step so that every expert product takes the one-row kernels the int8 mode replaces:
  # where the continuations part, the int8 mode's distance from exact says how far that alone goes).
  mine=$("$arbiter" generate --model "$work/arbiter-$l" --tokens "$prompt" --max-new-tokens 8 | token_list)
  theirs=$("$greedy" "$work/$l.gguf" "$prompt" 8 "$work/llama-$l.f32" 2>/dev/null | token_list)
  "$arbiter" logits --model "$work/arbiter-$l" --tokens "$prompt" --step-tokens 1 --out "$work/arbiter-$l.npy" >/dev/null
  ARBITER_CPU_MXFP4=int8 "$arbiter" logits --model "$work/arbiter-$l" --tokens "$prompt" --step-tokens 1 --out "$work/arbiter-int8-$l.npy" >/dev/null
  check=$($python - "$mine" "$theirs" "$work/arbiter-$l.npy" "$work/llama-$l.f32" "$work/arbiter-int8-$l.npy" <<'EOF'
import json, sys
import numpy as np
a, b = sys.argv[1].split(","), sys.argv[2].split(",")
same = 0
while same < len(a) and same < len(b) and a[same] == b[same]:
    same += 1
exact = np.load(sys.argv[3])[-1].astype(np.float64)
llama = np.fromfile(sys.argv[4], dtype=np.float32).astype(np.float64)
int8 = np.load(sys.argv[5])[-1].astype(np.float64)
def cos(x, y): return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
def err(x, y): return float(np.abs(x - y).max() / np.abs(y).max())
print(json.dumps({"greedy_agreement_of_8": same, "cosine_llamacpp": cos(llama, exact), "max_err_llamacpp": err(llama, exact),
                  "cosine_int8": cos(int8, exact), "max_err_int8": err(int8, exact)}))
EOF
)
  echo "$l layers: Arbiter's and llama.cpp's greedy continuations: $mine; $theirs" >&2
  echo "  agreement and logits at the prompt's end, against Arbiter's: $check" >&2
  a=() mm=() own=()
  for ((r = 0; r < rounds; r++)); do
    if ((r % 2 == 0)); then
      a+=("$(arbiter_tps "$l")")
      m1=$(llama_tps "$l" mmap) m0=$(llama_tps "$l" none)
    else
      m0=$(llama_tps "$l" none) m1=$(llama_tps "$l" mmap)
      a+=("$(arbiter_tps "$l")")
    fi
    mm+=("$m1") own+=("$m0")
    echo "  round $((r + 1)): Arbiter ${a[-1]} tok/s; llama.cpp ${m1} (mmap) / ${m0} (own buffers) tok/s" >&2
  done
  results+=("$($python - "$l" "$check" "${a[*]}" "${mm[*]}" "${own[*]}" <<'EOF'
import json, statistics, sys
l, check = int(sys.argv[1]), json.loads(sys.argv[2])
a, mm, own = ([float(v) for v in arg.split()] for arg in sys.argv[3:6])
b = [max(x, y) for x, y in zip(mm, own)]  # llama.cpp's better load mode in each round
ratios = [x / y for x, y in zip(a, b)]
print(json.dumps({"layers": l, **check, "arbiter_tok_s": a, "llamacpp_tok_s": b, "llamacpp_mmap_tok_s": mm,
                  "llamacpp_own_buffers_tok_s": own,
                  "ratio_vs_mmap_median": statistics.median(x / y for x, y in zip(a, mm)),
                  "ratio_vs_own_buffers_median": statistics.median(x / y for x, y in zip(a, own)),
                  "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}))
EOF
)")
done

$python - "$out" "$llama_version" "$tokens" "${results[@]}" <<'EOF'
import json, sys
out, version, tokens, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), [json.loads(r) for r in sys.argv[4:]]
json.dump({"llamacpp": version, "decode_tokens": tokens, "threads": 2, "depths": rows}, open(out, "w"), indent=2)
print(f"batch-1 decode, {tokens} tokens, 2 threads; llama.cpp {version} (better load mode per round)")
print("| layers | Arbiter tok/s | llama.cpp tok/s | Arbiter ÷ llama.cpp, median (range) | ÷ mmap / own buffers, medians "
      "| greedy agreement | llama.cpp's logits: cosine, max err | Arbiter int8's: cosine, max err |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    a = sorted(r["arbiter_tok_s"]); b = sorted(r["llamacpp_tok_s"])
    print(f"| {r['layers']} | {a[0]:.1f}–{a[-1]:.1f} | {b[0]:.1f}–{b[-1]:.1f} | "
          f"{r['ratio_median']:.2f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | "
          f"{r['ratio_vs_mmap_median']:.2f}× / {r['ratio_vs_own_buffers_median']:.2f}× | {r['greedy_agreement_of_8']}/8 | "
          f"{r['cosine_llamacpp']:.4f}, {r['max_err_llamacpp']:.3f} | {r['cosine_int8']:.4f}, {r['max_err_int8']:.3f} |")
print("(logits at the prompt's last position against Arbiter's exact ones; max err is over max |logit|)")
print(f"(written to {out})")
EOF
