// GPU benchmarks of the CUDA backend (Google Benchmark, manual timing with CUDA events). Weights are
// random and generated on the device, in the 20b and 120b shapes. Every result is reported as a
// ratio to a ceiling measured in the same run: batch-1 decode's weight bytes per second over the
// device-to-device copy bandwidth, large-batch FLOP/s over cuBLASLt's bf16 GEMM rate; plus tokens/s.
// Without a GPU it prints a note and exits 0.
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/cuda_testing.h"
#include "runtime/config.h"
#include "runtime/model.h"

namespace arbiter {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

struct Ceilings {
  double copy_bytes_per_s = 0;  // bytes read + written per second, device to device
  double gemm_flops = 0;        // cuBLASLt bf16 GEMM, 8192^3
};
Ceilings g_ceil;

Backend& backend() {
  static std::unique_ptr<Backend> b = make_backend("cuda");
  return *b;
}

// A second backend whose dense products of few rows go through cuBLASLt (the baseline of the
// matrix-vector kernel).
Backend& cublaslt_backend() {
  static std::unique_ptr<Backend> b = [] {
    setenv("ARBITER_CUDA_GEMV", "0", 1);
    auto p = make_backend("cuda");
    unsetenv("ARBITER_CUDA_GEMV");
    return p;
  }();
  return *b;
}

// Times `fn` (device work on the backend's stream) with events on the legacy stream after a full sync.
class EventTimer {
 public:
  EventTimer() {
    check(cudaEventCreate(&start_), "event");
    check(cudaEventCreate(&stop_), "event");
  }
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  // `on`: the backend whose stream fn's work goes to.
  template <typename F>
  double seconds(F&& fn, Backend& on = backend()) {
    on.synchronize();
    check(cudaDeviceSynchronize(), "sync");
    check(cudaEventRecord(start_, nullptr), "record");
    // The backend's stream is non-blocking: order it after the start event by a device sync instead.
    fn();
    on.synchronize();
    check(cudaEventRecord(stop_, nullptr), "record");
    check(cudaEventSynchronize(stop_), "sync");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start_, stop_), "elapsed");
    return ms / 1e3;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// A gpt-oss-shaped model with random device-resident weights, and the forward step of runtime/model.cc.
class SynthModel {
 public:
  SynthModel(const ModelConfig& c, int layers, int max_rows, int max_seqs, int max_context)
      : c_(c), max_seqs_(max_seqs) {
    Backend& b = backend();
    const int64_t H = c.hidden_size, D = c.head_dim, Q = c.num_attention_heads * D, KV = c.num_key_value_heads * D;
    const int64_t E = c.num_local_experts, I = c.intermediate_size, V = c.vocab_size;
    uint64_t seed = 1;
    auto bf16 = [&](Shape s, float scale, float offset = 0.0f, bool dense = true) {
      buffers_.push_back(b.allocate(static_cast<size_t>(s.elements()) * 2));
      Tensor t = buffers_.back().view(DType::kBF16, s);
      cuda_fill_random_bf16(t, seed++, scale, offset);
      if (dense) dense_bytes_per_layer_ += static_cast<double>(t.bytes());
      return t;
    };
    auto u8 = [&](Shape s, int lo, int hi) {
      buffers_.push_back(b.allocate(static_cast<size_t>(s.elements())));
      Tensor t = buffers_.back().view(DType::kU8, s);
      cuda_fill_random_u8(t, seed++, lo, hi);
      return t;
    };
    embed_ = bf16({V, H}, 1.0f, 0.0f, false);
    lm_head_ = bf16({V, H}, 0.02f, 0.0f, false);
    final_norm_ = bf16({H}, 0.0f, 1.0f, false);
    for (int l = 0; l < layers; ++l) {
      dense_bytes_per_layer_ = 0;
      Layer L;
      L.in_norm = bf16({H}, 0.0f, 1.0f);
      L.post_norm = bf16({H}, 0.0f, 1.0f);
      L.qw = bf16({Q, H}, 0.02f);
      L.qb = bf16({Q}, 0.02f);
      L.kw = bf16({KV, H}, 0.02f);
      L.kb = bf16({KV}, 0.02f);
      L.vw = bf16({KV, H}, 0.02f);
      L.vb = bf16({KV}, 0.02f);
      L.ow = bf16({H, Q}, 0.02f);
      L.ob = bf16({H}, 0.02f);
      L.sinks = bf16({c.num_attention_heads}, 0.5f);
      L.rw = bf16({E, H}, 0.05f);
      L.rb = bf16({E}, 0.05f);
      L.ex.gate_up_blocks = u8({E, 2 * I, H / 32, 16}, 0, 255);
      L.ex.gate_up_scales = u8({E, 2 * I, H / 32}, 118, 120);
      L.ex.gate_up_bias = bf16({E, 2 * I}, 0.02f, 0.0f, false);
      L.ex.down_blocks = u8({E, H, I / 32, 16}, 0, 255);
      L.ex.down_scales = u8({E, H, I / 32}, 118, 120);
      L.ex.down_bias = bf16({E, H}, 0.02f, 0.0f, false);
      L.sliding = c.layer_is_sliding[static_cast<size_t>(l)];
      const int64_t blocks_per_seq = L.sliding ? (c.sliding_window + kBlock - 1) / kBlock
                                               : (max_context + kBlock - 1) / kBlock;
      const Shape kv{blocks_per_seq * max_seqs, kBlock, c.num_key_value_heads, D};
      buffers_.push_back(b.allocate(static_cast<size_t>(kv.elements()) * 2));
      L.kv.k = buffers_.back().view(DType::kBF16, kv);
      b.fill_zero(L.kv.k);
      buffers_.push_back(b.allocate(static_cast<size_t>(kv.elements()) * 2));
      L.kv.v = buffers_.back().view(DType::kBF16, kv);
      b.fill_zero(L.kv.v);
      layers_.push_back(L);
    }
    expert_bytes_ = static_cast<double>(2 * I * (H / 32) * 17 + H * (I / 32) * 17 + (2 * I + H) * 2);
    auto act = [&](Shape s, DType dt = DType::kBF16) {
      buffers_.push_back(b.allocate(static_cast<size_t>(s.elements()) * dtype_size(dt)));
      return buffers_.back().view(dt, s);
    };
    const int64_t R = max_rows, K = c.num_experts_per_tok;
    x_ = act({R, H});
    normed_ = act({R, H});
    q_ = act({R, Q});
    k_ = act({R, KV});
    v_ = act({R, KV});
    attn_ = act({R, Q});
    delta_ = act({R, H});
    router_ = act({R, E}, DType::kF32);
    ids_ = act({R, K}, DType::kI32);
    weights_ = act({R, K}, DType::kF32);
    final_ = act({max_seqs, H});
    logits_ = act({max_seqs, V}, DType::kF32);
    argmax_ = act({max_seqs}, DType::kI32);
    rope_ = yarn_rope_params(c);
    // The model's RoPE table (runtime/model.cc): every position the KV cache can hold.
    const std::vector<float> table = rope_table(rope_, max_context);
    rope_.table = act({max_context, D}, DType::kF32);
    b.upload(table.data(), rope_.table);
    b.synchronize();
  }

  static constexpr int kBlock = 16;

  // `seqs` sequences, each with `cached` tokens in the cache and `fresh` new ones.
  StepLayout layout(int seqs, int cached, int fresh) const {
    StepLayout s;
    s.block_size = kBlock;
    const int full_per_seq = (cached + fresh + kBlock - 1) / kBlock;
    const int full_stride = static_cast<int>(layers_[1 % layers_.size()].kv.k.shape[0]) / max_seqs_;
    const int ring = (c_.sliding_window + kBlock - 1) / kBlock;
    for (int i = 0; i < seqs; ++i) {
      SequenceStep q;
      q.first_row = static_cast<int32_t>(s.tokens.size());
      q.num_new = fresh;
      q.num_cached = cached;
      for (int b = 0; b < full_per_seq; ++b) q.full_blocks.push_back(i * full_stride + b);
      for (int b = 0; b < ring; ++b) q.sliding_blocks.push_back(i * ring + b);
      for (int t = 0; t < fresh; ++t) s.tokens.push_back((i * 7919 + t * 104729) % c_.vocab_size);
      s.logit_rows.push_back(q.first_row + fresh - 1);
      s.sequences.push_back(q);
    }
    return s;
  }


  // One forward step as runtime/model.cc runs it (through Backend::run_step, which records decode
  // steps as CUDA graphs, unless `direct`), ending with the argmax of the logit rows.
  void step(const StepContext& st, int rows, int logit_rows, bool direct = false) {
    if (direct) return step_ops(st, rows, logit_rows);
    backend().run_step(this, st, [&] { step_ops(st, rows, logit_rows); });
  }
  void step_ops(const StepContext& st, int rows, int logit_rows) {
    Backend& b = backend();
    const ModelConfig& c = c_;
    Tensor x = x_.slice_rows(0, rows), normed = normed_.slice_rows(0, rows), q = q_.slice_rows(0, rows),
           k = k_.slice_rows(0, rows), v = v_.slice_rows(0, rows), attn = attn_.slice_rows(0, rows),
           delta = delta_.slice_rows(0, rows), router = router_.slice_rows(0, rows), ids = ids_.slice_rows(0, rows),
           weights = weights_.slice_rows(0, rows);
    b.embedding(embed_, st, x);
    AttentionParams ap;
    ap.num_q_heads = c.num_attention_heads;
    ap.num_kv_heads = c.num_key_value_heads;
    ap.head_dim = c.head_dim;
    ap.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      if (i == 0) b.rms_norm(x, l.in_norm, 1e-5f, normed);
      else b.add_rms_norm(x, delta, l.in_norm, 1e-5f, normed);
      const LinearTerm qkv[] = {{l.qw, l.qb, q}, {l.kw, l.kb, k}, {l.vw, l.vb, v}};
      b.linear_group_rope(normed, qkv, c.head_dim, rope_, st);
      ap.window = l.sliding ? c.sliding_window : 0;
      b.attention_store(q, k, v, l.kv, l.sinks, ap, st, attn);
      b.linear_add_rms_norm(attn, l.ow, l.ob, delta, x, l.post_norm, 1e-5f, normed);
      b.route(normed, l.rw, l.rb, c.num_experts_per_tok, router, ids, weights);
      b.moe_experts(normed, ids, weights, l.ex, c.swiglu_limit, delta);
    }
    b.add(x, delta);
    if (logit_rows == 0) return;
    const Tensor gathered = final_.slice_rows(0, logit_rows);
    b.gather_logit_rows(x, st, gathered);
    b.rms_norm(gathered, final_norm_, 1e-5f, gathered);
    b.linear(gathered, lm_head_, Tensor{}, logits_.slice_rows(0, logit_rows));
    b.argmax(logits_.slice_rows(0, logit_rows), argmax_.slice_rows(0, logit_rows));
  }

  // Just the MoE block of layer 0 (router included) on the first `rows` rows.
  void moe_only(int rows) {
    Backend& b = backend();
    const Layer& l = layers_[0];
    b.linear(normed_.slice_rows(0, rows), l.rw, l.rb, router_.slice_rows(0, rows));
    b.router_topk(router_.slice_rows(0, rows), c_.num_experts_per_tok, ids_.slice_rows(0, rows),
                  weights_.slice_rows(0, rows));
    b.moe_experts(normed_.slice_rows(0, rows), ids_.slice_rows(0, rows), weights_.slice_rows(0, rows), l.ex,
                  c_.swiglu_limit, delta_.slice_rows(0, rows));
  }
  // Just attention (+ cache store) of layer 1 (full) or 0 (sliding).
  void attention_only(const StepContext& st, int rows, bool sliding, Backend& b = backend()) {
    const Layer& l = layers_[sliding ? 0 : 1 % layers_.size()];
    AttentionParams ap;
    ap.num_q_heads = c_.num_attention_heads;
    ap.num_kv_heads = c_.num_key_value_heads;
    ap.head_dim = c_.head_dim;
    ap.scale = 0.125f;
    ap.window = sliding ? c_.sliding_window : 0;
    b.attention(q_.slice_rows(0, rows), k_.slice_rows(0, rows), v_.slice_rows(0, rows), l.kv, l.sinks, ap, st,
                attn_.slice_rows(0, rows));
  }
  // One operation of a step of `rows` rows (`seqs` logit rows) on layer 1 (full attention) or 0
  // (sliding), for the per-op profile (StepOp). The operations' inputs are whatever the buffers hold.
  static constexpr const char* kOpNames[] = {"add_rms_norm", "q_proj",       "k_proj",    "v_proj",
                                             "rope",         "attention",    "attention_sliding",
                                             "kv_store",     "o_proj",       "router",    "router_topk",
                                             "moe_experts",  "final_norm+lm_head", "argmax",
                                             "qkv+rope",     "route",        "o_proj+norm"};
  static constexpr int kOps = 17;
  void op_only(const StepContext& st, int op, int rows = 1, int seqs = 1) {
    Backend& b = backend();
    const bool sliding = op == 6;
    const Layer& l = layers_[sliding ? 0 : 1 % layers_.size()];
    const ModelConfig& c = c_;
    AttentionParams ap;
    ap.num_q_heads = c.num_attention_heads;
    ap.num_kv_heads = c.num_key_value_heads;
    ap.head_dim = c.head_dim;
    ap.scale = 0.125f;
    ap.window = l.sliding ? c.sliding_window : 0;
    const Tensor x = x_.slice_rows(0, rows), normed = normed_.slice_rows(0, rows), q = q_.slice_rows(0, rows),
                 k = k_.slice_rows(0, rows), v = v_.slice_rows(0, rows), attn = attn_.slice_rows(0, rows),
                 delta = delta_.slice_rows(0, rows), router = router_.slice_rows(0, rows),
                 ids = ids_.slice_rows(0, rows), weights = weights_.slice_rows(0, rows);
    switch (op) {
      case 0: b.add_rms_norm(x, delta, l.post_norm, 1e-5f, normed); break;
      case 1: b.linear(normed, l.qw, l.qb, q); break;
      case 2: b.linear(normed, l.kw, l.kb, k); break;
      case 3: b.linear(normed, l.vw, l.vb, v); break;
      case 4: b.rope(q, k, c.head_dim, rope_, st); break;
      case 5:
      case 6: b.attention(q, k, v, l.kv, l.sinks, ap, st, attn); break;
      case 7: b.kv_store(k, v, l.kv, ap, st); break;
      case 8: b.linear(attn, l.ow, l.ob, delta); break;
      case 9: b.linear(normed, l.rw, l.rb, router); break;
      case 10: b.router_topk(router, c.num_experts_per_tok, ids, weights); break;
      case 11: b.moe_experts(normed, ids, weights, l.ex, c.swiglu_limit, delta); break;
      case 12: {
        const Tensor gathered = final_.slice_rows(0, seqs);
        b.gather_logit_rows(x, st, gathered);
        b.rms_norm(gathered, final_norm_, 1e-5f, gathered);
        b.linear(gathered, lm_head_, Tensor{}, logits_.slice_rows(0, seqs));
        break;
      }
      case 13: b.argmax(logits_.slice_rows(0, seqs), argmax_.slice_rows(0, seqs)); break;
      case 14: {  // what the step runs (fused on the GPU at <= 8 rows) in place of ops 1-4
        const LinearTerm qkv[] = {{l.qw, l.qb, q}, {l.kw, l.kb, k}, {l.vw, l.vb, v}};
        b.linear_group_rope(normed, qkv, c.head_dim, rope_, st);
        break;
      }
      case 15: b.route(normed, l.rw, l.rb, c.num_experts_per_tok, router, ids, weights); break;  // ops 9-10
      default: b.linear_add_rms_norm(attn, l.ow, l.ob, delta, x, l.post_norm, 1e-5f, normed); break;  // ops 8 + 0
    }
  }
  double op_weight_bytes(int op) const {
    const Layer& l = layers_[1 % layers_.size()];
    switch (op) {
      case 1: return static_cast<double>(l.qw.bytes());
      case 2: return static_cast<double>(l.kw.bytes());
      case 3: return static_cast<double>(l.vw.bytes());
      case 8: return static_cast<double>(l.ow.bytes());
      case 9: return static_cast<double>(l.rw.bytes());
      case 11: return c_.num_experts_per_tok * expert_bytes_;
      case 12: return static_cast<double>(lm_head_.bytes());
      default: return 0;
    }
  }

  void fill_activations() {
    cuda_fill_random_bf16(normed_, 99, 1.0f);
    cuda_fill_random_bf16(q_, 98, 1.0f);
    cuda_fill_random_bf16(k_, 97, 1.0f);
    cuda_fill_random_bf16(v_, 96, 1.0f);
  }

  // Weight bytes one step reads: dense per layer, lm_head rows, and each distinct expert once.
  double decode_weight_bytes(int distinct_experts_per_layer, bool with_lm_head) const {
    return static_cast<double>(layers_.size()) *
               (dense_bytes_per_layer_ + distinct_experts_per_layer * expert_bytes_) +
           (with_lm_head ? static_cast<double>(lm_head_.bytes()) : 0.0);
  }
  // FLOPs of one step: 2 per multiply-add of every matrix product, plus attention (q.k and p.v).
  double step_flops(int seqs, int cached, int fresh, bool with_lm_head = true) const {
    const ModelConfig& c = c_;
    const double H = c.hidden_size, D = c.head_dim, Q = c.num_attention_heads * D, KV = c.num_key_value_heads * D;
    const double I = c.intermediate_size, K = c.num_experts_per_tok, E = c.num_local_experts;
    const double tokens = static_cast<double>(seqs) * fresh;
    const double per_token = 2 * (H * Q + 2 * H * KV + Q * H + H * E + K * (H * 2 * I + I * H));
    double attn = 0;
    for (const Layer& l : layers_)
      for (int t = 0; t < fresh; ++t) {
        const double keys = l.sliding ? std::min<double>(cached + t + 1, c.sliding_window) : cached + t + 1;
        attn += 4.0 * c.num_attention_heads * D * keys * seqs;
      }
    return tokens * per_token * static_cast<double>(layers_.size()) + attn +
           (with_lm_head ? 2.0 * seqs * H * c.vocab_size : 0.0);
  }
  size_t layers() const { return layers_.size(); }

 private:
  struct Layer {
    Tensor in_norm, post_norm, qw, qb, kw, kb, vw, vb, ow, ob, sinks, rw, rb;
    ExpertWeights ex;
    KvLayer kv;
    bool sliding = false;
  };
  ModelConfig c_;
  std::vector<DeviceBuffer> buffers_;
  Tensor embed_, lm_head_, final_norm_;
  std::vector<Layer> layers_;
  Tensor x_, normed_, q_, k_, v_, attn_, delta_, router_, ids_, weights_, final_, logits_, argmax_;
  RopeParams rope_;
  double dense_bytes_per_layer_ = 0, expert_bytes_ = 0;
  int max_seqs_ = 1;
};

constexpr int kMaxSeqs = 256;
constexpr int kContext = 512;      // cached tokens per sequence in decode benchmarks
constexpr int kPrefillSeqs = 4;    // prefill: 4 sequences x 512 new tokens = 2048 rows per step
constexpr int kPrefillTokens = 512;

SynthModel& model20b() {
  static std::unique_ptr<SynthModel> m = [] {
    const ModelConfig c = preset_config("20b-shape");
    auto p = std::make_unique<SynthModel>(c, c.num_hidden_layers, kPrefillSeqs * kPrefillTokens, kMaxSeqs,
                                          kContext + kPrefillTokens);
    p->fill_activations();
    return p;
  }();
  return *m;
}

SynthModel& layer_model(const std::string& preset) {
  static std::map<std::string, std::unique_ptr<SynthModel>> models;
  auto& m = models[preset];
  if (!m) {
    ModelConfig c = preset_config(preset);
    m = std::make_unique<SynthModel>(c, 2, 256, kMaxSeqs, kContext + 8);  // one sliding + one full layer
    m->fill_activations();
  }
  return *m;
}

void BM_CopyBandwidth(benchmark::State& state) {
  const size_t bytes = size_t{1} << 30;
  DeviceBuffer a = backend().allocate(bytes), b = backend().allocate(bytes);
  EventTimer timer;
  double best = 0;
  for (auto _ : state) {
    const double s = timer.seconds([&] { check(cudaMemcpy(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice), "copy"); });
    state.SetIterationTime(s);
    best = std::max(best, 2.0 * bytes / s);
  }
  g_ceil.copy_bytes_per_s = best;
  state.counters["GB_per_s"] = best / 1e9;
}

void BM_GemmBf16(benchmark::State& state) {
  const int n = 8192;
  Backend& b = backend();
  DeviceBuffer xb = b.allocate(size_t{2} * n * n), wb = b.allocate(size_t{2} * n * n), ob = b.allocate(size_t{2} * n * n);
  const Tensor x = xb.view(DType::kBF16, {n, n}), w = wb.view(DType::kBF16, {n, n}), o = ob.view(DType::kBF16, {n, n});
  cuda_fill_random_bf16(x, 5, 1.0f);
  cuda_fill_random_bf16(w, 6, 0.02f);
  b.linear(x, w, Tensor{}, o);  // plan + warm-up
  EventTimer timer;
  double best = 0;
  for (auto _ : state) {
    const double s = timer.seconds([&] { b.linear(x, w, Tensor{}, o); });
    state.SetIterationTime(s);
    best = std::max(best, 2.0 * n * static_cast<double>(n) * n / s);
  }
  g_ceil.gemm_flops = best;
  state.counters["TFLOP_per_s"] = best / 1e12;
}

// A whole forward step of `m` for seqs x fresh new tokens after `cached` cached ones.
// Without the head (layer benchmarks), the step stops before the final norm and lm_head.
void run_steps(benchmark::State& state, SynthModel& m, int seqs, int cached, int fresh, bool with_head = true,
               bool direct = false) {
  Backend& b = backend();
  const StepLayout layout = m.layout(seqs, cached, fresh);
  const int rows = seqs * fresh;
  const int logit_rows = with_head ? seqs : 0;
  for (int i = 0; i < 2; ++i) {  // warm-up: plans, workspaces, the step's recording
    const auto st = b.prepare_step(layout);
    m.step(*st, rows, logit_rows, direct);
  }
  EventTimer timer;
  double total = 0;
  int64_t n = 0;
  for (auto _ : state) {
    const auto st = b.prepare_step(layout);
    const double s = timer.seconds([&] { m.step(*st, rows, logit_rows, direct); });
    state.SetIterationTime(s);
    total += s;
    ++n;
  }
  const double per_step = total / static_cast<double>(n);
  state.counters["tokens_per_s"] = rows / per_step;
  state.counters["ms_per_step"] = per_step * 1e3;
  const double flops = m.step_flops(seqs, cached, fresh, with_head);
  state.counters["TFLOP_per_s"] = flops / per_step / 1e12;
  if (g_ceil.gemm_flops > 0) state.counters["flops_vs_gemm"] = flops / per_step / g_ceil.gemm_flops;
  if (rows == 1 && g_ceil.copy_bytes_per_s > 0) {
    const double bytes = m.decode_weight_bytes(4, with_head);
    state.counters["weight_GB_per_s"] = bytes / per_step / 1e9;
    state.counters["weight_bw_vs_copy"] = bytes / per_step / g_ceil.copy_bytes_per_s;
  }
}

void BM_Model20bDecode(benchmark::State& state) {
  run_steps(state, model20b(), static_cast<int>(state.range(0)), kContext, 1);
}
// The same without step recording (every operation launched from the host).
void BM_Model20bDecodeDirect(benchmark::State& state) {
  run_steps(state, model20b(), static_cast<int>(state.range(0)), kContext, 1, true, true);
}
// Decode after 4096 cached tokens (the split attention's case; the recorded step of the 512-token
// benchmark is replayed, as in serving when the context grows).
void BM_Model20bDecodeLong(benchmark::State& state) {
  run_steps(state, model20b(), static_cast<int>(state.range(0)), 4096, 1);
}
void BM_Model20bPrefill(benchmark::State& state) { run_steps(state, model20b(), kPrefillSeqs, 0, kPrefillTokens); }

// MoE block alone (router + experts) of one 20b/120b layer.
void moe_bench(benchmark::State& state, const std::string& preset) {
  SynthModel& m = layer_model(preset);
  const int rows = static_cast<int>(state.range(0));
  m.moe_only(rows);
  EventTimer timer;
  double total = 0;
  int64_t n = 0;
  for (auto _ : state) {
    const double s = timer.seconds([&] { m.moe_only(rows); });
    state.SetIterationTime(s);
    total += s;
    ++n;
  }
  const double per = total / static_cast<double>(n);
  const ModelConfig c = preset_config(preset);
  const double I = c.intermediate_size, H = c.hidden_size;
  const double expert_bytes = 2 * I * (H / 32) * 17 + H * (I / 32) * 17;
  const double active = std::min<double>(c.num_local_experts, static_cast<double>(rows) * c.num_experts_per_tok);
  state.counters["us"] = per * 1e6;
  if (g_ceil.copy_bytes_per_s > 0)
    state.counters["expert_bw_vs_copy"] = active * expert_bytes / per / g_ceil.copy_bytes_per_s;
  if (g_ceil.gemm_flops > 0)
    state.counters["flops_vs_gemm"] = rows * c.num_experts_per_tok * 2.0 * (H * 2 * I + I * H) / per / g_ceil.gemm_flops;
}
void BM_Moe20bLayer(benchmark::State& state) { moe_bench(state, "20b-shape"); }
void BM_Moe120bLayer(benchmark::State& state) { moe_bench(state, "120b-shape"); }

// One decode layer (attention and MoE, batch 1) of the 20b and 120b shapes: weight bandwidth ratio.
void layer_decode_bench(benchmark::State& state, const std::string& preset) {
  SynthModel& m = layer_model(preset);
  run_steps(state, m, static_cast<int>(state.range(0)), kContext, 1, false);
}
void BM_Layer20bDecode(benchmark::State& state) { layer_decode_bench(state, "20b-shape"); }
void BM_Layer120bDecode(benchmark::State& state) { layer_decode_bench(state, "120b-shape"); }

// One dense product at one row (decode): weight bytes per second over the copy bandwidth, for the
// matrix-vector kernel (arg 1 = 0) and cuBLASLt (arg 1 = 1). Arg 0: 0 = q_proj (4096 x 2880),
// 1 = lm_head (201088 x 2880), 2 = router (32 x 2880, f32 out).
void BM_LinearRow(benchmark::State& state) {
  static const int64_t shapes[3][2] = {{4096, 2880}, {201088, 2880}, {32, 2880}};
  const int64_t n = shapes[state.range(0)][0], k = shapes[state.range(0)][1];
  const bool f32 = state.range(0) == 2;
  Backend& b = state.range(1) == 0 ? backend() : cublaslt_backend();
  DeviceBuffer xb = b.allocate(static_cast<size_t>(k) * 2), wb = b.allocate(static_cast<size_t>(n * k) * 2),
               bb = b.allocate(static_cast<size_t>(n) * 2), ob = b.allocate(static_cast<size_t>(n) * 4);
  const Tensor x = xb.view(DType::kBF16, {1, k}), w = wb.view(DType::kBF16, {n, k}), bias = bb.view(DType::kBF16, {n}),
               o = ob.view(f32 ? DType::kF32 : DType::kBF16, {1, n});
  cuda_fill_random_bf16(x, 11, 1.0f);
  cuda_fill_random_bf16(w, 12, 0.02f);
  cuda_fill_random_bf16(bias, 13, 0.02f);
  const Tensor bias_or_none = state.range(0) == 1 ? Tensor{} : bias;
  b.linear(x, w, bias_or_none, o);
  EventTimer timer;
  double total = 0;
  int64_t iters = 0;
  for (auto _ : state) {
    const double s = timer.seconds(
                         [&] {
                           for (int i = 0; i < 10; ++i) b.linear(x, w, bias_or_none, o);
                         },
                         b) /
                     10;
    state.SetIterationTime(s);
    total += s;
    ++iters;
  }
  const double per = total / static_cast<double>(iters);
  state.counters["us"] = per * 1e6;
  if (g_ceil.copy_bytes_per_s > 0) state.counters["weight_bw_vs_copy"] = 2.0 * n * k / per / g_ceil.copy_bytes_per_s;
}

// Each operation of a step of the 20b shape, repeated inside one Backend::run_step: arg 1 = 0, a
// batch-1 decode step after 512 tokens (20 repetitions, recorded as a CUDA graph, so the time per
// operation is its GPU time plus a graph's launch gap, as in a real decode step); arg 1 = 1, a prefill
// step of 4 x 512 new tokens (3 repetitions, launched directly). Weight bandwidth over copy for the
// products at batch 1, FLOP/s over the GEMM ceiling in prefill.
void BM_StepOp(benchmark::State& state) {
  static int owners[2][SynthModel::kOps];
  const int op = static_cast<int>(state.range(0));
  const bool prefill = state.range(1) == 1;
  state.SetLabel(SynthModel::kOpNames[op]);
  SynthModel& m = prefill ? model20b() : layer_model("20b-shape");
  Backend& b = backend();
  const StepLayout layout = prefill ? m.layout(kPrefillSeqs, 0, kPrefillTokens) : m.layout(1, kContext, 1);
  const int rows = static_cast<int>(layout.tokens.size()), seqs = static_cast<int>(layout.sequences.size());
  const int reps = prefill ? 3 : 20;
  m.op_only(*b.prepare_step(layout), 9, rows, seqs);  // router logits and experts for moe_experts
  m.op_only(*b.prepare_step(layout), 10, rows, seqs);
  auto run = [&](const StepContext& st) {
    b.run_step(&owners[prefill][op], st, [&] {
      for (int i = 0; i < reps; ++i) m.op_only(st, op, rows, seqs);
    });
  };
  for (int i = 0; i < 2; ++i) run(*b.prepare_step(layout));  // direct, then recorded (decode)
  EventTimer timer;
  double total = 0;
  int64_t n = 0;
  for (auto _ : state) {
    const auto st = b.prepare_step(layout);
    const double s = timer.seconds([&] { run(*st); }) / reps;
    state.SetIterationTime(s);
    total += s;
    ++n;
  }
  const double per = total / static_cast<double>(n);
  state.counters["us"] = per * 1e6;
  const double bytes = m.op_weight_bytes(op);
  if (!prefill && bytes > 0 && g_ceil.copy_bytes_per_s > 0)
    state.counters["weight_bw_vs_copy"] = bytes / per / g_ceil.copy_bytes_per_s;
  const ModelConfig c = preset_config("20b-shape");
  const double H = c.hidden_size, Q = c.num_attention_heads * c.head_dim, KV = c.num_key_value_heads * c.head_dim;
  const double I = c.intermediate_size;
  double flops = 0;
  switch (op) {
    case 1: case 8: flops = 2.0 * rows * H * Q; break;
    case 2: case 3: flops = 2.0 * rows * H * KV; break;
    case 11: flops = 2.0 * rows * c.num_experts_per_tok * (H * 2 * I + I * H); break;
    default: break;
  }
  if (prefill && flops > 0 && g_ceil.gemm_flops > 0) state.counters["flops_vs_gemm"] = flops / per / g_ceil.gemm_flops;
}

// Attention alone: decode (one query per sequence) over `cached` keys, full layer.
void BM_AttentionDecode(benchmark::State& state) {
  SynthModel& m = layer_model("20b-shape");
  const int seqs = static_cast<int>(state.range(0));
  const StepLayout layout = m.layout(seqs, kContext, 1);
  const auto st = backend().prepare_step(layout);
  m.attention_only(*st, seqs, false);
  EventTimer timer;
  double total = 0;
  int64_t n = 0;
  for (auto _ : state) {
    const double s = timer.seconds([&] { m.attention_only(*st, seqs, false); });
    state.SetIterationTime(s);
    total += s;
    ++n;
  }
  const double per = total / static_cast<double>(n);
  const double kv_bytes = static_cast<double>(seqs) * (kContext + 1) * 8 * 64 * 2 * 2;
  state.counters["us"] = per * 1e6;
  if (g_ceil.copy_bytes_per_s > 0) state.counters["kv_bw_vs_copy"] = kv_bytes / per / g_ceil.copy_bytes_per_s;
}

// A backend whose attention runs on one kernel: 0 = split over keys (the decode default), 1 = one
// block per q head (the previous kernel), 2 = tensor-core prefill kernel (the prefill default).
Backend& attention_backend(int path) {
  static std::unique_ptr<Backend> b[3];
  static const char* kNames[] = {"split", "head", "mma"};
  if (!b[path]) {
    setenv("ARBITER_CUDA_ATTENTION", kNames[path], 1);
    b[path] = make_backend("cuda");
    unsetenv("ARBITER_CUDA_ATTENTION");
  }
  return *b[path];
}

// Attention alone on each kernel (arg 0: 0 split, 1 per head, 2 tensor-core prefill). Arg 1: 0/1 decode of 1/64 sequences
// after 512 tokens, 2/3 the same after 4096 tokens (full layer), 4/5 prefill 4 x 512 (full / sliding layer).
void BM_AttentionPath(benchmark::State& state) {
  const int path = static_cast<int>(state.range(0)), which = static_cast<int>(state.range(1));
  static const char* kLabels[] = {"decode 1x512", "decode 64x512", "decode 1x4096", "decode 64x4096",
                                  "prefill 4x512 full", "prefill 4x512 sliding"};
  static const char* kPaths[] = {"split ", "head ", "mma "};
  state.SetLabel(std::string(kPaths[path]) + kLabels[which]);
  const bool prefill = which >= 4;
  SynthModel& m = prefill ? model20b() : layer_model("20b-shape");
  Backend& b = attention_backend(path);
  const int seqs = prefill ? kPrefillSeqs : (which % 2 == 0 ? 1 : 64);
  const int cached = prefill ? 0 : (which < 2 ? kContext : 4096);
  const StepLayout layout = m.layout(seqs, cached, prefill ? kPrefillTokens : 1);
  const int rows = static_cast<int>(layout.tokens.size());
  const bool sliding = which == 5;
  const auto st = b.prepare_step(layout);
  m.attention_only(*st, rows, sliding, b);
  EventTimer timer;
  double total = 0;
  int64_t n = 0;
  for (auto _ : state) {
    const double s = timer.seconds([&] { m.attention_only(*st, rows, sliding, b); }, b);
    state.SetIterationTime(s);
    total += s;
    ++n;
  }
  const double per = total / static_cast<double>(n);
  state.counters["us"] = per * 1e6;
  if (!prefill && g_ceil.copy_bytes_per_s > 0) {
    const double kv_bytes = static_cast<double>(seqs) * (cached + 1) * 8 * 64 * 2 * 2;
    state.counters["kv_bw_vs_copy"] = kv_bytes / per / g_ceil.copy_bytes_per_s;
  }
}

// Row selection over the 201088-entry vocabulary, per step: arg 0 = 0 argmax, 1 top_logprobs k = 20,
// 2 top_logprobs k = 64 (device kernels), 3 top_logprobs k = 20 through the host default
// (Backend::top_logprobs: download + CPU reference + upload, the baseline); arg 1 = rows.
// Logit bytes read per second over the copy bandwidth.
void BM_Select(benchmark::State& state) {
  const int op = static_cast<int>(state.range(0)), rows = static_cast<int>(state.range(1));
  const int64_t vocab = preset_config("20b-shape").vocab_size;
  const int k = op == 2 ? 64 : 20;
  Backend& b = backend();
  static const std::vector<float> host = [] {
    std::vector<float> v(static_cast<size_t>(64) * 201088);
    uint64_t s = 88172645463325252ull;
    for (auto& x : v) {  // xorshift: cheap, roughly uniform logits in [-10, 10)
      s ^= s << 13, s ^= s >> 7, s ^= s << 17;
      x = static_cast<float>(s >> 40) * (20.0f / 16777216.0f) - 10.0f;
    }
    return v;
  }();
  if (static_cast<size_t>(rows) * static_cast<size_t>(vocab) > host.size()) {
    state.SkipWithError("too many rows");
    return;
  }
  DeviceBuffer lb = b.allocate(static_cast<size_t>(rows * vocab) * 4), ib = b.allocate(static_cast<size_t>(rows) * 64 * 4),
               pb = b.allocate(static_cast<size_t>(rows) * 64 * 4);
  const Tensor logits = lb.view(DType::kF32, {rows, vocab}), ids = ib.view(DType::kI32, {rows, k}),
               lp = pb.view(DType::kF32, {rows, k}), am = ib.view(DType::kI32, {rows});
  b.upload(host.data(), logits);
  auto run = [&] {
    switch (op) {
      case 0: b.argmax(logits, am); break;
      case 3: b.Backend::top_logprobs(logits, k, ids, lp); break;
      default: b.top_logprobs(logits, k, ids, lp); break;
    }
  };
  run();
  EventTimer timer;
  double total = 0;
  int64_t n = 0;
  for (auto _ : state) {
    const double s = timer.seconds(run);
    state.SetIterationTime(s);
    total += s;
    ++n;
  }
  const double per = total / static_cast<double>(n);
  state.counters["us"] = per * 1e6;
  if (g_ceil.copy_bytes_per_s > 0)
    state.counters["logit_bw_vs_copy"] = 4.0 * rows * static_cast<double>(vocab) / per / g_ceil.copy_bytes_per_s;
}

}  // namespace
}  // namespace arbiter

int main(int argc, char** argv) {
  using namespace arbiter;
  benchmark::Initialize(&argc, argv);
  if (!cuda_available()) {
    std::printf("gpu_bench: no CUDA GPU visible, nothing measured\n");
    return 0;
  }
  std::printf("gpu_bench on %s\n", backend().name().c_str());
  // Ceilings first (registration order is run order).
  benchmark::RegisterBenchmark("CopyBandwidth", BM_CopyBandwidth)->UseManualTime()->Iterations(10)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("GemmBf16_8192", BM_GemmBf16)->UseManualTime()->Iterations(10)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("Moe20bLayer", BM_Moe20bLayer)->Arg(1)->Arg(64)->Arg(256)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("Moe120bLayer", BM_Moe120bLayer)->Arg(1)->Arg(256)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("LinearRow", BM_LinearRow)->ArgsProduct({{0, 1, 2}, {0, 1}})->UseManualTime()->Iterations(10)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("AttentionDecode20b", BM_AttentionDecode)->Arg(1)->Arg(64)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("AttentionPath20b", BM_AttentionPath)->ArgsProduct({{0, 1, 2}, {0, 1, 2, 3, 4, 5}})->UseManualTime()->Iterations(10)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("Select20b", BM_Select)->ArgsProduct({{0, 1, 2, 3}, {1, 64}})->UseManualTime()->Iterations(10)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("StepOp20b", BM_StepOp)->ArgsProduct({benchmark::CreateDenseRange(0, SynthModel::kOps - 1, 1), {0, 1}})->UseManualTime()->Iterations(3)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("Layer20bDecode", BM_Layer20bDecode)->Arg(1)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("Layer120bDecode", BM_Layer120bDecode)->Arg(1)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("Model20bDecode", BM_Model20bDecode)->Arg(1)->Arg(64)->Arg(256)->UseManualTime()->Iterations(5)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("Model20bDecodeDirect", BM_Model20bDecodeDirect)->Arg(1)->UseManualTime()->Iterations(5)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("Model20bDecode4096", BM_Model20bDecodeLong)->Arg(1)->Arg(64)->UseManualTime()->Iterations(5)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("Model20bPrefill4x512", BM_Model20bPrefill)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
