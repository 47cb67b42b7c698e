#!/usr/bin/env bash
# GPU check: the one command a GPU machine runs. Uses the binaries packed by scripts/gpu-pack.sh
# (carried as .gpu-pack/; GPU machines have nvcc but no gtest / Google Benchmark / nlohmann-json),
# runs the GPU tests, memcheck and racecheck passes over part of them and the GPU benchmarks, and writes a short
# report: OUTDIR/report.md, OUTDIR/report.json, OUTDIR/logs.txt (log tails), OUTDIR/bench.json.
# Usage: scripts/gpu-check.sh OUTDIR   (ends within GPU_CHECK_BUDGET seconds, default 420; output stays small)
# Without a pack it tries to build one in place first (works where the build dependencies exist).
set -uo pipefail
out=${1:?usage: scripts/gpu-check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
pack=$root/.gpu-pack
work=$(mktemp -d /tmp/arbiter-gpu-check.XXXXXX)
t0=$(date +%s)

if [ ! -x "$pack/bin/gpu_ops_test" ] && [ ! -f "$pack/binlib.tar.gz" ]; then
  echo "gpu-check: no $pack; trying to build one here"
  (cd "$root" && bash scripts/gpu-pack.sh) >"$work/build.log" 2>&1 || echo "gpu-check: build failed (see logs.txt)"
fi

# gpu-pack.sh carries the binaries and libraries as one gzip archive: unpacked in place, or where the
# carried tree is read-only, into the work directory with a copy of the rest of the pack.
if [ -f "$pack/binlib.tar.gz" ] && [ ! -x "$pack/bin/gpu_ops_test" ]; then
  if ! tar -C "$pack" -xzf "$pack/binlib.tar.gz" 2>"$work/unpack.log"; then
    mkdir -p "$work/pack"
    cp -r "$pack/golden" "$pack/tokenizer" "$work/pack/" 2>>"$work/unpack.log"
    tar -C "$work/pack" -xzf "$pack/binlib.tar.gz" 2>>"$work/unpack.log" && pack=$work/pack
  fi
fi

# Libraries: the pack's own, then the GPU machine's CUDA libraries wherever they are.
libdirs=$pack/lib
for name in libcublasLt.so.13 libcudart.so.13 libnccl.so.2; do
  dir=""
  for c in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    if [ -e "$c/$name" ]; then dir=$c; break; fi
  done
  if [ -z "$dir" ]; then
    f=$(find /usr/local /opt /usr/lib -name "$name" 2>/dev/null | head -1)
    [ -n "$f" ] && dir=$(dirname "$f")
  fi
  echo "lib $name: ${dir:-NOT FOUND}" >>"$work/env.txt"
  [ -n "$dir" ] && libdirs=$libdirs:$dir
done
export LD_LIBRARY_PATH=$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export ARBITER_GOLDEN_DIR=$pack/golden
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_plm_rsh_agent=
(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || echo "no nvidia-smi") >"$work/gpu.txt"
for b in "$pack"/bin/*; do
  ldd "$b" 2>&1 | grep "not found" | sed "s|^|$(basename "$b"): |" >>"$work/env.txt"
done

# The tokenizer travels compressed (scripts/gpu-pack.sh); the serving checks read it from here.
tok=$work/tokenizer
mkdir -p "$tok"
cp "$pack/tokenizer/policy.txt" "$tok/" 2>/dev/null
if [ -f "$pack/tokenizer/tokenizer.json.gz" ]; then gunzip -c "$pack/tokenizer/tokenizer.json.gz" >"$tok/tokenizer.json"
elif [ -f "$pack/tokenizer/tokenizer.json" ]; then cp "$pack/tokenizer/tokenizer.json" "$tok/"; fi
deadline=$((t0 + ${GPU_CHECK_BUDGET:-420}))  # every step ends by then, so the report always gets written
run() {  # name timeout command...
  local name=$1 limit=$2
  shift 2
  local s=$(date +%s)
  local left=$((deadline - s))
  if [ "$left" -lt 10 ]; then
    echo "$name skipped: out of time" >>"$work/steps.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(($(date +%s) - s))" >>"$work/steps.txt"
}

# Most important first: tests, the benchmarks, the opt-in variants' benchmarks (which switch to make the
# default), Nsight Compute, then the reruns that attribute failures and the sanitizers.
run ops 75 "$pack/bin/gpu_ops_test" --gtest_output=json:"$work/ops.json"
run model 75 "$pack/bin/gpu_model_test" --gtest_output=json:"$work/model.json"
# The device arena (Backend::reserve): a model allocates only from its reservation.
run arena 30 "$pack/bin/gpu_arena_test" --gtest_output=json:"$work/arena.json"
# Expert parallelism on the device: dispatch and combine as backend operations against the CPU, the
# capacity exchange recorded under global capture, thread ranks sharing this GPU.
run dispatch 45 "$pack/bin/gpu_dispatch_test" --gtest_output=json:"$work/dispatch.json"
run bench 100 "$pack/bin/gpu_bench" --benchmark_format=console --benchmark_out="$work/bench.json" --benchmark_out_format=json
# The CLI end to end on a golden case.
tokens=$(python3 -c "import json,sys; print(','.join(map(str, json.load(open(sys.argv[1]))['tokens'])))" "$pack/golden/tiny-a/case.json" 2>/dev/null)
run cli 20 "$pack/bin/arbiter" logits --model "$pack/golden/tiny-a" --tokens "$tokens" --out "$work/cli.npy" --device cuda
# Expert parallelism on the GPU: 2 thread ranks sharing the one GPU, each with its own CUDA
# backend and half the experts; and NcclComm with one rank (MPI singleton bootstrap).
run cli_ep_threads 30 "$pack/bin/arbiter" logits --model "$pack/golden/tiny-a" --tokens "$tokens" --out "$work/cli_ep_threads.npy" --device cuda --transport threads --ranks 2
run cli_nccl 30 "$pack/bin/arbiter" logits --model "$pack/golden/tiny-a" --tokens "$tokens" --out "$work/cli_nccl.npy" --device cuda --transport nccl
# Serving on the GPU: the load generator (prefix caching on vs off, step-loop overhead) on a
# small random model, and one classification on the CPU and on the GPU of the same tiny model.
run serve_bench 60 "$pack/bin/arbiter" bench --device cuda --tokenizer "$tok" --requests 64 --policies 4 \
  --json "$work/serve_bench.json"
run make_tiny 20 "$pack/bin/arbiter" make-model --preset tiny --out "$work/tiny" --tokenizer-dir "$tok"
for dev in cpu cuda; do
  run "classify_$dev" 30 "$pack/bin/arbiter" classify --model "$work/tiny" --device "$dev" --policy "$tok/policy.txt" \
    --content "hello there" --max-tokens 24
done
# The MoE layer on each product path (the default picks one by tokens per expert).
for path in gemv mma; do
  ARBITER_CUDA_MOE=$path run "bench_$path" 25 "$pack/bin/gpu_bench" --benchmark_filter='Copy|Gemm|Moe' \
    --benchmark_format=console --benchmark_out="$work/bench_$path.json" --benchmark_out_format=json
done
# The vector-path MoE variants (same bits, opt-in until measured; GpuMoe's "pipe", "pipe16" and
# "warps4" paths check their bits in the ops step): the weights through a per-warp shared-memory
# cp.async ring (ARBITER_CUDA_MOE_PIPE=1, [pipe] rows) and gate_up blocks of 4 warps
# (ARBITER_CUDA_MOE_WARPS=4, [warps4] rows; [pipe4] both), against the default rows above.
ARBITER_CUDA_MOE_PIPE=1 ARBITER_CUDA_MOE_WARPS=4 run model_pipe 60 "$pack/bin/gpu_model_test" --gtest_output=json:"$work/model_pipe.json"
ARBITER_CUDA_MOE_PIPE=1 run bench_pipe 30 "$pack/bin/gpu_bench" --benchmark_filter='Copy|Moe20bLayer|Moe120bLayer|Model20bDecode' \
  --benchmark_format=console --benchmark_out="$work/bench_pipe.json" --benchmark_out_format=json
ARBITER_CUDA_MOE_WARPS=4 run bench_warps4 30 "$pack/bin/gpu_bench" --benchmark_filter='Copy|Moe20bLayer|Moe120bLayer|Model20bDecode' \
  --benchmark_format=console --benchmark_out="$work/bench_warps4.json" --benchmark_out_format=json
ARBITER_CUDA_MOE_PIPE=1 ARBITER_CUDA_MOE_WARPS=4 run bench_pipe4 30 "$pack/bin/gpu_bench" \
  --benchmark_filter='Copy|Moe20bLayer|Moe120bLayer|Model20bDecode' \
  --benchmark_format=console --benchmark_out="$work/bench_pipe4.json" --benchmark_out_format=json
# Tensor-core MoE tiles of 64 and 32 tokens instead of 128 (same bits, GpuMoe's "mma64" / "mma32"
# paths): batch-256 decode averages 32 tokens per expert, so a 128-token tile is 3/4 padding
# ([tile64] / [tile32] rows against the default rows).
# The tile kernel's deeper pipeline (3 activation stages, raw weight codes 3 slices ahead; same bits,
# GpuMoe's "deep" / "deep32" paths): [deep] with 128-token tiles, [deep32] with 32.
for v in tile64:64:0 tile32:32:0 deep:128:1 deep32:32:1; do
  IFS=: read -r tag tile deep <<<"$v"
  ARBITER_CUDA_MOE_TILE=$tile ARBITER_CUDA_MOE_DEEP=$deep run "bench_$tag" 40 "$pack/bin/gpu_bench" \
    --benchmark_filter='Copy|Gemm|Moe20bLayer/256|Moe120bLayer/256|Model20bDecode/256|Model20bPrefill' \
    --benchmark_format=console --benchmark_out="$work/bench_$tag.json" --benchmark_out_format=json
done
# Fewer key splits in the split attention kernel (it aims at 512 blocks: 32 splits of a 512-key
# context at batch 1, each a short tile plus a merge): [attn128] / [attn64] rows aim at 128 / 64 blocks.
# [span128]: the default 32 splits, but at least 128 keys in each non-empty one (a 512-key row uses 4).
# The attention tests with both knobs first (they read the knobs when the backend is made).
ARBITER_CUDA_ATTN_BLOCKS=64 ARBITER_CUDA_ATTN_MIN_SPAN=128 run ops_attn 60 "$pack/bin/gpu_ops_test" \
  --gtest_filter='Cases/GpuAttention.*' --gtest_output=json:"$work/ops_attn.json"
for v in attn128:128:32 attn64:64:32 span128:512:128; do
  IFS=: read -r tag n span <<<"$v"
  ARBITER_CUDA_ATTN_BLOCKS=$n ARBITER_CUDA_ATTN_MIN_SPAN=$span run "bench_$tag" 30 "$pack/bin/gpu_bench" \
    --benchmark_filter='Copy|AttentionPath20b/0/|AttentionDecode20b|StepOp20b/(5|6)/0|Model20bDecode/1|Model20bDecode4096/1' \
    --benchmark_format=console --benchmark_out="$work/bench_$tag.json" --benchmark_out_format=json
done
# q/k/v and the router as separate launches ([nofuse] rows): what the fused launches save.
ARBITER_CUDA_FUSE=0 run bench_nofuse 40 "$pack/bin/gpu_bench" --benchmark_filter='Copy|Layer20bDecode|Model20bDecode' \
  --benchmark_format=console --benchmark_out="$work/bench_nofuse.json" --benchmark_out_format=json
# Nsight Compute on the decode kernels whose speed is still unexplained (kernels/cuda/NOTES.md): the
# batch-1 and batch-64 MoE layers and the batch-1 step operations; a few launches each, summarized
# in the report (duration, memory / DRAM / SM throughput, occupancy, registers, issue activity).
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
if [ -x "$ncu" ]; then
  ncu_args=(--clock-control none --csv --page details --section SpeedOfLight --section Occupancy --section LaunchStats
            --section SchedulerStats --section WarpStateStats)
  run ncu_moe1 40 "$ncu" "${ncu_args[@]}" -k 'regex:moe' -c 4 "$pack/bin/gpu_bench" --benchmark_filter='Moe20bLayer/1/'
  run ncu_moe64 40 "$ncu" "${ncu_args[@]}" -k 'regex:moe|route|combine' -c 8 "$pack/bin/gpu_bench" --benchmark_filter='Moe20bLayer/64/'
  run ncu_ops1 60 "$ncu" "${ncu_args[@]}" -k 'regex:gemv|attention|rms|rope|kv_store|router|argmax' -c 24 "$pack/bin/gpu_bench" \
    --benchmark_filter='StepOp20b/.*/0'
  ARBITER_CUDA_MOE_PIPE=1 run ncu_moe1_pipe 40 "$ncu" "${ncu_args[@]}" -k 'regex:moe' -c 4 "$pack/bin/gpu_bench" \
    --benchmark_filter='Moe20bLayer/1/'
else
  echo "ncu skipped: no ncu" >>"$work/steps.txt"
fi
# The model tests again on the previous attention kernel (one block per q head, fp32 throughout, for
# every sequence): a failure in both runs is not the split / tensor-core kernels'.
ARBITER_CUDA_ATTENTION=head run model_head 60 "$pack/bin/gpu_model_test" --gtest_output=json:"$work/model_head.json"
# Programmatic dependent launch is on by default (sm_90+); the model tests, the kernels with
# block-counting merges and the decode benchmarks once more with it off ([nopdl] rows in the report).
ARBITER_CUDA_PDL=0 run model_nopdl 60 "$pack/bin/gpu_model_test" --gtest_output=json:"$work/model_nopdl.json"
ARBITER_CUDA_PDL=0 run ops_nopdl 60 "$pack/bin/gpu_ops_test" \
  --gtest_filter='Cases/GpuAttention.*:GpuOps.TopLogprobs*:GpuOps.Argmax*:GpuOps.Linear:GpuOps.LinearGroup*:GpuOps.LinearAddRmsNorm:GpuOps.Rope*:GpuOps.Route*:Cases/GpuMoe.*/tiny_rows5:Cases/GpuMoe.*/hidden2880_decode' \
  --gtest_output=json:"$work/ops_nopdl.json"
ARBITER_CUDA_PDL=0 run bench_nopdl 60 "$pack/bin/gpu_bench" --benchmark_filter='Copy|Gemm|Layer20bDecode|Model20bDecode|StepOp20b/.*/0' \
  --benchmark_format=console --benchmark_out="$work/bench_nopdl.json" --benchmark_out_format=json
# Routed vector-path MoE tasks of 16 tokens (opt-in until measured; GpuMoe's "gemv16" path checks
# their bits in the ops step): the model tests and the MoE / decode benchmarks with them ([groups2]
# rows against the default rows above).
ARBITER_CUDA_MOE_GROUPS=2 run model_groups2 60 "$pack/bin/gpu_model_test" --gtest_output=json:"$work/model_groups2.json"
ARBITER_CUDA_MOE_GROUPS=2 run bench_groups2 40 "$pack/bin/gpu_bench" --benchmark_filter='Copy|Gemm|Moe20bLayer|Moe120bLayer|Model20bDecode' \
  --benchmark_format=console --benchmark_out="$work/bench_groups2.json" --benchmark_out_format=json
# memcheck over a subset (slow under the sanitizer).
san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$san" ]; then
  run memcheck 60 "$san" --tool memcheck --error-exitcode 3 "$pack/bin/gpu_ops_test" \
    --gtest_filter='GpuOps.Linear:GpuOps.LinearGroup*:GpuOps.LinearAddRmsNorm:GpuOps.Rope*:GpuOps.Route*:GpuOps.TopLogprobsSmall:GpuOps.ArgmaxManyRows:Cases/GpuAttention.*/full_gqa2_ragged:Cases/GpuAttention.*/window3_ring_larger:Cases/GpuAttention.*/mqa_d128_window5:Cases/GpuAttention.*/decode_batch_ragged:Cases/GpuAttention.*/prefill_20b_sliding:Cases/GpuAttention.*/prefill_d128_gqa4:Cases/GpuAttention.*/mixed_model_shape_3_17_9_1:Cases/GpuAttention.*/mixed_cached_sliding:Cases/GpuAttention.*/mixed_20b_full:Cases/GpuAttention.*/mixed_d128_gqa4:Cases/GpuMoe.*/tiny_rows5:Cases/GpuMoe.*/many_tokens_per_expert:Cases/GpuMoe.*/top1:Cases/GpuMoe.*/many_slots_per_row'
  # Shared-memory races in the kernels with block-wide phases (selection, split and prefill attention).
  run racecheck 60 "$san" --tool racecheck --error-exitcode 4 "$pack/bin/gpu_ops_test" \
    --gtest_filter='GpuOps.TopLogprobsSmall:GpuOps.Route*:GpuOps.LinearAddRmsNorm:Cases/GpuMoe.*/tiny_rows5:Cases/GpuAttention.*/full_gqa2_ragged:Cases/GpuAttention.*/window3_ring_larger:Cases/GpuAttention.*/prefill_d128_gqa4:Cases/GpuAttention.*/mixed_model_shape_3_17_9_1:Cases/GpuAttention.*/mixed_cached_full:Cases/GpuAttention.*/mixed_lengths_sliding'
else
  echo "memcheck skipped: no compute-sanitizer" >>"$work/steps.txt"
fi
# Last, when there is time left: serving on the whole 20b shape (24 layers, random weights written here).
if [ "${GPU_CHECK_SERVE_20B:-0}" = 1 ]; then
  run make_20b 150 "$pack/bin/arbiter" make-model --preset 20b-shape --out "$work/m20" --tokenizer-dir "$tok"
  run serve_bench_20b 150 "$pack/bin/arbiter" bench --device cuda --model "$work/m20" --requests 512 --policies 8 \
    --step-tokens 2048 --reasoning-tokens 16 --json "$work/serve_bench_20b.json"
  rm -rf "$work/m20"
fi
echo "total seconds=$(($(date +%s) - t0))" >>"$work/steps.txt"

python3 - "$work" "$out" "$pack" <<'PY'
import json, os, re, sys
work, out, pack = sys.argv[1:4]

def read(name, limit=None):
    p = os.path.join(work, name)
    if not os.path.exists(p):
        return ""
    s = open(p, errors="replace").read()
    return s[-limit:] if limit else s

def gtest(name):
    p = os.path.join(work, name + ".json")
    res = {"passed": 0, "failed": 0, "skipped": 0, "tests": {}, "failures": {}, "properties": {}}
    if not os.path.exists(p):
        res["crashed"] = True
        return res
    try:
        data = json.load(open(p))
    except Exception as e:
        res["crashed"] = True
        res["error"] = str(e)
        return res
    for suite in data.get("testsuites", []):
        for t in suite.get("testsuite", []):
            full = suite["name"] + "." + t["name"]
            if t.get("failures"):
                status = "fail"
                res["failures"][full] = " | ".join(f.get("failure", "")[:600] for f in t["failures"])[:1500]
            elif t.get("result") == "SKIPPED":
                status = "skip"
            else:
                status = "pass"
            res[{"pass": "passed", "fail": "failed", "skip": "skipped"}[status]] += 1
            res["tests"][full] = status
            for k, v in t.items():
                if k not in ("name", "file", "line", "status", "result", "timestamp", "time", "classname", "failures", "value_param", "type_param"):
                    res["properties"][k] = v
    return res

report = {"gpu": read("gpu.txt").strip(), "env": read("env.txt").strip().splitlines(),
          "steps": read("steps.txt").strip().splitlines()}
report["ops_test"] = gtest("ops")
report["model_test"] = gtest("model")
report["arena_test"] = gtest("arena")
report["dispatch_test"] = gtest("dispatch")
report["model_test_head"] = gtest("model_head")
report["model_test_nopdl"] = gtest("model_nopdl")
report["ops_test_nopdl"] = gtest("ops_nopdl")
report["model_test_groups2"] = gtest("model_groups2")
report["model_test_pipe"] = gtest("model_pipe")
report["ops_test_attn_knobs"] = gtest("ops_attn")

bench = {}
for suffix in ("", "_gemv", "_mma", "_nopdl", "_nofuse", "_groups2", "_pipe", "_warps4", "_pipe4", "_tile64", "_tile32", "_deep", "_deep32", "_attn128", "_attn64", "_span128"):
    bp = os.path.join(work, f"bench{suffix}.json")
    if not os.path.exists(bp):
        continue
    try:
        for b in json.load(open(bp)).get("benchmarks", []):
            if suffix in ("_gemv", "_mma") and not b["name"].startswith("Moe"):
                continue
            if suffix in ("_nopdl", "_nofuse", "_groups2", "_pipe", "_warps4", "_pipe4", "_tile64", "_tile32", "_deep", "_deep32", "_attn128", "_attn64", "_span128") and not b["name"].startswith(("Model", "Layer", "StepOp", "Moe", "Attention")):
                continue
            keep = {k: v for k, v in b.items() if isinstance(v, (int, float)) and k not in ("family_index", "per_family_instance_index", "repetitions", "repetition_index", "threads", "iterations", "cpu_time")}
            bench[b["name"] + (f" [{suffix[1:]}]" if suffix else "")] = keep
    except Exception as e:
        bench["error" + suffix] = str(e)
    os.system(f"cp {bp} {out}/bench{suffix}.json")
report["bench"] = bench

def cli_result(name):
    cli = {"ran": os.path.exists(os.path.join(work, name + ".npy"))}
    if not cli["ran"]:
        cli["log"] = read(name + ".log", 400)
        return cli
    try:
        import numpy as np
        got = np.load(os.path.join(work, name + ".npy")).astype(np.float64)
        ref = np.load(os.path.join(pack, "golden/tiny-a/logits.npy")).astype(np.float64)
        cos = (got * ref).sum(1) / np.sqrt((got * got).sum(1) * (ref * ref).sum(1))
        cli["min_cosine"] = float(cos.min())
        cli["argmax_equal"] = int((got.argmax(1) == ref.argmax(1)).sum())
        cli["positions"] = int(ref.shape[0])
    except Exception as e:
        cli["error"] = str(e)
    return cli
cli = cli_result("cli")
report["cli_tiny_a"] = cli
report["cli_ep_threads_tiny_a"] = cli_result("cli_ep_threads")
report["cli_nccl_tiny_a"] = cli_result("cli_nccl")
try:
    report["serve_bench"] = json.load(open(os.path.join(work, "serve_bench.json")))
except Exception as e:
    report["serve_bench"] = {"error": str(e), "log": read("serve_bench.log", 600)}
try:
    report["serve_bench_20b"] = json.load(open(os.path.join(work, "serve_bench_20b.json")))
except Exception as e:
    report["serve_bench_20b"] = {"error": str(e), "log": read("serve_bench_20b.log", 600)}
def classify_out(name):
    s = read(name + ".log")
    try:
        return json.loads(s.strip().splitlines()[-1])
    except Exception:
        return {"error": s[-400:]}
cc, cg = classify_out("classify_cpu"), classify_out("classify_cuda")
report["classify_cpu_vs_cuda"] = {"cpu": cc, "cuda": cg}
m = re.search(r"ERROR SUMMARY: (\d+) error", read("memcheck.log"))
report["memcheck_errors"] = int(m.group(1)) if m else None
m = re.search(r"RACECHECK SUMMARY: (\d+) hazard", read("racecheck.log"))
report["racecheck_hazards"] = int(m.group(1)) if m else None
# Nsight Compute: one line per profiled launch with the metrics that say what bounds it.
def ncu_summary(name):
    import csv, io
    text = read(name + ".log")
    lines = [l for l in text.splitlines() if l.startswith('"')]
    if not lines:
        return {"error": text[-300:]}
    keep = ("Duration", "Memory Throughput", "DRAM Throughput", "Compute (SM) Throughput", "Achieved Occupancy",
            "Theoretical Occupancy", "Registers Per Thread", "Issued Warp Per Scheduler", "No Eligible",
            "Warp Cycles Per Issued Instruction", "Block Size", "Grid Size")
    rows = {}
    for r in csv.DictReader(io.StringIO("\n".join(lines))):
        key = r.get("ID", "?")
        row = rows.setdefault(key, {"kernel": (r.get("Kernel Name") or "?")[:60], "grid": r.get("Grid Size"),
                                    "block": r.get("Block Size")})
        if r.get("Metric Name") in keep:
            row[r["Metric Name"]] = (r.get("Metric Value") or "") + " " + (r.get("Metric Unit") or "")
    return list(rows.values())
report["ncu"] = {n: ncu_summary(n) for n in ("ncu_moe1", "ncu_moe64", "ncu_ops1", "ncu_moe1_pipe")}
os.system(f"cp {work}/ncu_*.log {out}/ 2>/dev/null")
json.dump(report, open(os.path.join(out, "report.json"), "w"), indent=1)

L = ["# Arbiter GPU check", "", f"GPU: {report['gpu']}", ""]
for key in ("ops_test", "model_test", "dispatch_test", "model_test_head", "ops_test_nopdl", "model_test_nopdl", "model_test_groups2",
            "model_test_pipe", "ops_test_attn_knobs"):
    r = report[key]
    L.append(f"- {key}: {'CRASHED/NO OUTPUT ' if r.get('crashed') else ''}{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped")
    for name, msg in r["failures"].items():
        L.append(f"  - FAIL {name}: {msg[:700]}")
if report["model_test"]["properties"]:
    L.append("- golden: " + ", ".join(f"{k}={v}" for k, v in sorted(report["model_test"]["properties"].items())))
if report["model_test_head"]["properties"]:
    L.append("- golden, ARBITER_CUDA_ATTENTION=head: " + ", ".join(
        f"{k}={v}" for k, v in sorted(report["model_test_head"]["properties"].items())
        if k.endswith(("greedy_matched", "argmax_near_tie_mismatches", "router_flips", "min_cosine_clean_rows"))))
# The opt-in variants against the default in one table (time ÷ default time; < 1 is faster), early in
# the report so that a short look shows which switch to make the default (kernels/cuda/NOTES.md).
def base_name(n):
    return re.sub(r"/(iterations:\d+|manual_time|real_time)", "", n)
variant_keys = ["Moe20bLayer/1", "Moe20bLayer/64", "Moe20bLayer/256", "Moe120bLayer/256", "Model20bDecode/1",
                "Model20bDecode/64", "Model20bDecode/256", "Model20bDecode4096/1", "Model20bPrefill4x512", "StepOp20b/5/0",
                "StepOp20b/6/0"]
variant_tags = ["pipe", "warps4", "pipe4", "groups2", "tile64", "tile32", "deep", "deep32", "attn128", "attn64", "span128", "nofuse",
                "nopdl"]
times = {}
for name, b in bench.items():
    if isinstance(b, dict) and "real_time" in b:
        m = re.match(r"(.*?)(?: \[(\w+)\])?$", name)
        times[(base_name(m.group(1)), m.group(2) or "")] = b["real_time"]
present = [t for t in variant_tags if any((k, t) in times for k in variant_keys)]
if present:
    L += ["", "Opt-in variants: default time, then each variant's time ÷ default (< 1: faster; kernels/cuda/NOTES.md).",
          "", "| benchmark | default | " + " | ".join(present) + " |", "|---" * (len(present) + 2) + "|"]
    for k in variant_keys:
        d = times.get((k, ""))
        if d is None:
            continue
        cells = [f"{times[(k, t)] / d:.3f}" if (k, t) in times and d > 0 else "" for t in present]
        L.append(f"| {k} | {d:.4g} | " + " | ".join(cells) + " |")
    L.append("")
L.append(f"- cli logits tiny-a: {cli}")
L.append(f"- cli logits tiny-a, EP 2 thread ranks on one GPU: {report['cli_ep_threads_tiny_a']}")
L.append(f"- cli logits tiny-a, NcclComm 1 rank: {report['cli_nccl_tiny_a']}")
L.append(f"- serve bench (cuda): {json.dumps(report['serve_bench'])[:1500]}")
def brief(r):
    if not isinstance(r, dict) or "results" not in r:
        return json.dumps(r)[:300]
    return json.dumps([{k: x.get(k) for k in ("verdict", "final", "usage")} for x in r["results"]])[:300]
L.append(f"- serve bench 20b shape (cuda): {json.dumps(report['serve_bench_20b'])[:1500]}")
L.append(f"- classify tiny cpu: {brief(cc)}")
L.append(f"- classify tiny cuda: {brief(cg)}")
L.append(f"- memcheck errors: {report['memcheck_errors']}")
L.append(f"- racecheck hazards: {report['racecheck_hazards']}")
for n, rows in report["ncu"].items():
    if isinstance(rows, dict):
        L.append(f"- {n}: {json.dumps(rows)[:300]}")
        continue
    L.append(f"- {n}:")
    for r in rows:
        L.append("  - " + "; ".join(f"{k}={str(v).strip()}" for k, v in r.items()))
L += ["", "| benchmark | time | counters |", "|---|---|---|"]
for name, b in bench.items():
    if not isinstance(b, dict):
        continue
    unit = b.get("time_unit", "")
    cs = ", ".join(f"{k}={v:.4g}" for k, v in b.items() if k not in ("real_time", "time_unit"))
    L.append(f"| {name} | {b.get('real_time', 0):.4g} | {cs} |")
L += ["", "steps: " + "; ".join(report["steps"]), "env: " + "; ".join(report["env"])]
open(os.path.join(out, "report.md"), "w").write("\n".join(L) + "\n")

with open(os.path.join(out, "logs.txt"), "w") as f:
    for name in ("build", "ops", "model", "dispatch", "model_head", "bench", "bench_gemv", "bench_mma", "cli", "cli_ep_threads", "cli_nccl",
                 "model_nopdl", "ops_nopdl", "bench_nopdl", "bench_nofuse", "model_groups2", "bench_groups2", "model_pipe", "ops_attn", "bench_pipe", "bench_warps4", "bench_pipe4", "bench_tile64", "bench_tile32", "bench_deep", "bench_deep32", "bench_attn128", "bench_attn64", "bench_span128", "serve_bench", "make_20b", "serve_bench_20b", "make_tiny", "classify_cpu", "classify_cuda", "memcheck", "racecheck"):
        s = read(name + ".log")
        if not s:
            continue
        if name in ("ops", "model", "model_head", "ops_nopdl", "model_nopdl", "model_groups2", "model_pipe", "ops_attn"):  # failures and the summary only
            keep = [l for l in s.splitlines() if re.search(r"FAILED|Failure|error|Error|Expected|Which is|actual|SKIPPED \]|PASSED|tests ran|\.cc:\d+", l)]
            s = "\n".join(keep)
        f.write(f"===== {name} =====\n{s[-20000:]}\n")
PY
cat "$out/report.md"
rm -rf "$work"
