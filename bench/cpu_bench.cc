// arbiter_bench_cpu: the CPU backend on a model of the real gpt-oss-20b layer shape (hidden 2880,
// 64/8 heads x 64, 32 MXFP4 experts of 2880, window 128, vocabulary 201088) cut to 4 layers
// (ARBITER_BENCH_LAYERS=N for another depth; 24 is the 20b's).
// Measures, in one run: the machine's STREAM-like copy and read bandwidth and its fp32 FMA peak,
// then one decode step at batch 1 and 16 and a 512-token prefill, reported as tokens/s and as
// ratios to those measurements (weight bytes read per second / copy bandwidth; FLOP/s / peak).
//
// ARBITER_BENCH_MODEL=DIR keeps the random checkpoint in DIR (made on first use) instead of a
// temporary folder, so later runs skip the ~4 GB write; a checkpoint with more layers than asked
// for serves (its first layers are used), so one 24-layer checkpoint covers every depth.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/huge_page_arena.h"
#include "kernels/cpu/kernels.h"
#include "kernels/forwarding_backend.h"
#include "runtime/config.h"
#include "runtime/generate.h"
#include "runtime/make_model.h"
#include "runtime/model.h"
#include "runtime/safetensors.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace arbiter {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// CPU seconds used by the whole process (all threads). Other load on the machine shows up as
// cpu_util < 1 (our threads were waiting for a core), so the counters below say how much of the
// wall time the benchmark actually had the machine.
double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

int hw_threads() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

// Runs body(thread index) on every hardware thread at once and returns the wall time.
template <typename F>
double on_all_threads(F body) {
  const int n = hw_threads();
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  Clock::time_point start;
  std::atomic<bool> go{false};
  for (int t = 0; t < n; ++t)
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load()) {
      }
      body(t);
    });
  while (ready.load() != n) {
  }
  start = Clock::now();
  go.store(true);
  for (auto& th : threads) th.join();
  return seconds_since(start);
}

// ---------------------------------------------------------------------------------------------
// Machine measurements.

// The STREAM arrays, in memory of the kind the CPU backend keeps its weights in (2 MiB pages where
// the kernel gives them), so that the machine's read and copy figures compare with the decode's.
struct AlignedFloats {
  explicit AlignedFloats(size_t n) : size(n), data(static_cast<float*>(arena.allocate(n * 4))) {}
  cpu::HugePageArena arena;
  size_t size;
  float* data;
};

constexpr size_t kStreamFloats = size_t{64} << 20;  // 256 MiB per array: far beyond any cache

// STREAM "copy" (c = a), counted as STREAM counts it: 2 x array bytes per pass. Best of `reps`.
double copy_bandwidth(int reps) {
  AlignedFloats a(kStreamFloats), c(kStreamFloats);
  const int n = hw_threads();
  on_all_threads([&](int t) {  // first touch by the thread that will stream each part
    const size_t part = kStreamFloats / static_cast<size_t>(n), b = part * static_cast<size_t>(t);
    for (size_t i = b; i < b + part; ++i) a.data[i] = static_cast<float>(i & 1023), c.data[i] = 0.0f;
  });
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const double s = on_all_threads([&](int t) {
      const size_t part = kStreamFloats / static_cast<size_t>(n), b = part * static_cast<size_t>(t);
      std::memcpy(c.data + b, a.data + b, part * 4);
    });
    best = std::max(best, 2.0 * kStreamFloats * 4 / s);
  }
  benchmark::DoNotOptimize(c.data[12345]);
  return best;
}

// Sum of n floats (n a multiple of 64) with independent vector accumulators, so the loop is
// bound by loads, not by the latency of one chain; AVX-512 with the same 4 KiB software prefetch
// the matvec kernels use (the best plain read we know how to do on this machine).
#if defined(__x86_64__)
__attribute__((target("avx512f"))) float sum_floats_avx512(const float* p, size_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = 0; i < n; i += 64) {
    for (int j = 0; j < 64; j += 16) _mm_prefetch(reinterpret_cast<const char*>(p + i + j) + 4096, _MM_HINT_T0);
    s0 = _mm512_add_ps(s0, _mm512_load_ps(p + i));
    s1 = _mm512_add_ps(s1, _mm512_load_ps(p + i + 16));
    s2 = _mm512_add_ps(s2, _mm512_load_ps(p + i + 32));
    s3 = _mm512_add_ps(s3, _mm512_load_ps(p + i + 48));
  }
  alignas(64) float v[16];
  _mm512_store_ps(v, _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  float total = 0;
  for (float f : v) total += f;
  return total;
}
__attribute__((target("avx2"))) float sum_floats_avx2(const float* p, size_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = 0; i < n; i += 32) {
    s0 = _mm256_add_ps(s0, _mm256_load_ps(p + i));
    s1 = _mm256_add_ps(s1, _mm256_load_ps(p + i + 8));
    s2 = _mm256_add_ps(s2, _mm256_load_ps(p + i + 16));
    s3 = _mm256_add_ps(s3, _mm256_load_ps(p + i + 24));
  }
  alignas(32) float v[8];
  _mm256_store_ps(v, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  return v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
}
#endif
float sum_floats(const float* p, size_t n) {
#if defined(__x86_64__)
  if (cpu::active_isa() == cpu::Isa::kAvx512) return sum_floats_avx512(p, n);
  if (cpu::active_isa() == cpu::Isa::kAvx2) return sum_floats_avx2(p, n);
#endif
  float acc[16] = {};
  for (size_t i = 0; i < n; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] += p[i + static_cast<size_t>(l)];
  float total = 0;
  for (float v : acc) total += v;
  return total;
}

// Read-only bandwidth (sum of an array), for context: decode only reads weights.
double read_bandwidth(int reps) {
  AlignedFloats a(kStreamFloats);
  const int n = hw_threads();
  on_all_threads([&](int t) {
    const size_t part = kStreamFloats / static_cast<size_t>(n), b = part * static_cast<size_t>(t);
    for (size_t i = b; i < b + part; ++i) a.data[i] = 1.0f;
  });
  double best = 0;
  std::vector<float> sums(static_cast<size_t>(n));
  for (int r = 0; r < reps; ++r) {
    const double s = on_all_threads([&](int t) {
      const size_t part = kStreamFloats / static_cast<size_t>(n), b = part * static_cast<size_t>(t);
      sums[static_cast<size_t>(t)] = sum_floats(a.data + b, part);
    });
    best = std::max(best, 1.0 * kStreamFloats * 4 / s);
  }
  benchmark::DoNotOptimize(sums.data());
  return best;
}

// fp32 FMA throughput of one thread: 16 independent accumulator chains (more than FMA units x
// latency on current cores). Returns FLOP done.
#if defined(__x86_64__)
__attribute__((target("avx512f"))) double fma_loop_avx512(int64_t iters) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  const __m512 m = _mm512_set1_ps(0.99999f), a = _mm512_set1_ps(1e-6f);
  for (int64_t k = 0; k < iters; ++k) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], m, a);
  }
  __m512 s = acc[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, acc[i]);
  benchmark::DoNotOptimize(s);
  return static_cast<double>(iters) * 16 * 16 * 2;
}
__attribute__((target("avx2,fma"))) double fma_loop_avx2(int64_t iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(0.001f * static_cast<float>(i));
  const __m256 m = _mm256_set1_ps(0.99999f), a = _mm256_set1_ps(1e-6f);
  for (int64_t k = 0; k < iters; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], m, a);
  }
  __m256 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
  benchmark::DoNotOptimize(s);
  return static_cast<double>(iters) * 12 * 8 * 2;
}
#endif
double fma_loop_portable(int64_t iters) {
  float acc[64];
  for (int i = 0; i < 64; ++i) acc[i] = 0.001f * static_cast<float>(i);
  for (int64_t k = 0; k < iters; ++k)
    for (float& v : acc) v = v * 0.99999f + 1e-6f;
  benchmark::DoNotOptimize(acc);
  return static_cast<double>(iters) * 64 * 2;
}

// All threads at once, with the instruction set the kernels use. Best of `reps`.
double fma_peak(int reps, double* seconds, double* cpu_util) {
  const cpu::Isa isa = cpu::active_isa();
  auto loop = [isa](int64_t iters) {
#if defined(__x86_64__)
    if (isa == cpu::Isa::kAvx512) return fma_loop_avx512(iters);
    if (isa == cpu::Isa::kAvx2) return fma_loop_avx2(iters);
#endif
    return fma_loop_portable(iters);
  };
  const int64_t iters = 50'000'000;
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    std::vector<double> flops(static_cast<size_t>(hw_threads()));
    const double c = process_cpu_seconds();
    const double s = on_all_threads([&](int t) { flops[static_cast<size_t>(t)] = loop(iters); });
    const double util = (process_cpu_seconds() - c) / (s * hw_threads());
    double total = 0;
    for (double f : flops) total += f;
    if (total / s > best) {
      best = total / s;
      *seconds = s;
      *cpu_util = util;
    }
  }
  return best;
}

struct Machine {
  double copy_bytes_per_s = 0, read_bytes_per_s = 0, fma_flops_per_s = 0, fma_seconds = 0;
  double fma_cpu_util = 0;  // CPU time / (wall x threads) of the best FMA pass
};
const Machine& machine() {
  static const Machine m = [] {
    Machine r;
    r.copy_bytes_per_s = copy_bandwidth(5);
    r.read_bytes_per_s = read_bandwidth(5);
    r.fma_flops_per_s = fma_peak(3, &r.fma_seconds, &r.fma_cpu_util);
    return r;
  }();
  return m;
}

// ---------------------------------------------------------------------------------------------
// The model, and a backend wrapper that records which experts each MoE layer ran.

class CountingBackend final : public ForwardingBackend {
 public:
  explicit CountingBackend(Backend& inner) : ForwardingBackend(inner) {}
  void embedding(const Tensor& t, const StepContext& s, const Tensor& o) override { { const Timer tm(*this, 0); inner().embedding(t, s, o); } }
  void rms_norm(const Tensor& x, const Tensor& w, float eps, const Tensor& o) override { { const Timer tm(*this, 1); inner().rms_norm(x, w, eps, o); } }
  void add_rms_norm(const Tensor& r, const Tensor& d, const Tensor& w, float eps, const Tensor& o) override {
    { const Timer tm(*this, 2); inner().add_rms_norm(r, d, w, eps, o); }
  }
  void linear(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& o) override {
    const Timer tm(*this, w.shape[0] >= 100000 ? 12 : 3);  // the vocabulary projection on its own
    inner().linear(x, w, bias, o);
  }
  void linear_group(const Tensor& x, std::span<const LinearTerm> terms) override {
    const Timer tm(*this, 3);
    static const bool separate = std::getenv("ARBITER_BENCH_SEPARATE_QKV") != nullptr;  // A/B of the fused pass
    if (separate) {
      for (const LinearTerm& t : terms) inner().linear(x, t.weight, t.bias, t.out);
    } else {
      inner().linear_group(x, terms);
    }
  }
  void rope(const Tensor& q, const Tensor& k, int d, const RopeParams& r, const StepContext& s) override {
    { const Timer tm(*this, 4); inner().rope(q, k, d, r, s); }
  }
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& c, const Tensor& sinks,
                 const AttentionParams& p, const StepContext& s, const Tensor& o) override {
    { const Timer tm(*this, 5); inner().attention(q, k, v, c, sinks, p, s, o); }
  }
  void kv_store(const Tensor& k, const Tensor& v, const KvLayer& c, const AttentionParams& p, const StepContext& s) override {
    { const Timer tm(*this, 6); inner().kv_store(k, v, c, p, s); }
  }
  // Through this wrapper's own linear_group and rope (their timers); the CPU backend does the same.
  void linear_group_rope(const Tensor& x, std::span<const LinearTerm> terms, int head_dim, const RopeParams& rope,
                         const StepContext& step) override {
    Backend::linear_group_rope(x, terms, head_dim, rope, step);
  }
  // Through this wrapper's own linear and add_rms_norm (their timers).
  void linear_add_rms_norm(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& d, const Tensor& r,
                           const Tensor& nw, float e, const Tensor& o) override {
    Backend::linear_add_rms_norm(x, w, b, d, r, nw, e, o);
  }
  // Through this wrapper's own attention and kv_store (their timers).
  void attention_store(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& c, const Tensor& sinks,
                       const AttentionParams& p, const StepContext& s, const Tensor& o) override {
    Backend::attention_store(q, k, v, c, sinks, p, s, o);
  }
  // Through this wrapper's own linear and router_topk, so the router stays in their timers.
  void route(const Tensor& x, const Tensor& w, const Tensor& bias, int k, const Tensor& logits, const Tensor& ids,
             const Tensor& weights) override {
    Backend::route(x, w, bias, k, logits, ids, weights);
  }
  void router_topk(const Tensor& l, int k, const Tensor& ids, const Tensor& w) override { { const Timer tm(*this, 7); inner().router_topk(l, k, ids, w); } }
  void moe_experts(const Tensor& x, const Tensor& ids, const Tensor& w, const ExpertWeights& ex, float limit,
                   const Tensor& o) override {
    std::set<int32_t> distinct;
    for (int64_t i = 0; i < ids.elements(); ++i) {
      const int32_t e = ids.as<const int32_t>()[i];
      if (e >= 0) {
        distinct.insert(e);
        ++pairs_;
      }
    }
    distinct_experts_ += static_cast<int64_t>(distinct.size());
    { const Timer tm(*this, 8); inner().moe_experts(x, ids, w, ex, limit, o); }
  }
  void add(const Tensor& x, const Tensor& y) override { { const Timer tm(*this, 9); inner().add(x, y); } }
  void gather_logit_rows(const Tensor& x, const StepContext& s, const Tensor& o) override { { const Timer tm(*this, 10); inner().gather_logit_rows(x, s, o); } }
  void argmax(const Tensor& l, const Tensor& o) override { { const Timer tm(*this, 11); inner().argmax(l, o); } }

  void reset() {
    distinct_experts_ = pairs_ = 0;
    std::fill(std::begin(seconds_), std::end(seconds_), 0.0);
  }
  // Seconds spent in each operation since reset(), printed when ARBITER_BENCH_PROFILE is set.
  void print_profile(const char* what, int64_t steps) const {
    static const char* names[] = {"embedding", "rms_norm", "add_rms_norm", "linear", "rope", "attention",
                                  "kv_store", "router_topk", "moe_experts", "add", "gather", "argmax", "lm_head"};
    std::fprintf(stderr, "profile %s (ms per step):", what);
    for (int i = 0; i < kOps; ++i) std::fprintf(stderr, " %s=%.2f", names[i], 1e3 * seconds_[i] / static_cast<double>(steps));
    std::fprintf(stderr, "\n");
  }
  double seconds(int op) const { return seconds_[op]; }  // since reset(); op as in print_profile
  int64_t distinct_experts() const { return distinct_experts_; }  // summed over MoE layers
  int64_t pairs() const { return pairs_; }                        // (token, expert) pairs run

 private:
  static constexpr int kOps = 13;
  struct Timer {
    Timer(CountingBackend& b, int op) : b_(b), op_(op), start_(Clock::now()) {}
    ~Timer() { b_.seconds_[op_] += seconds_since(start_); }
    CountingBackend& b_;
    int op_;
    Clock::time_point start_;
  };
  int64_t distinct_experts_ = 0, pairs_ = 0;
  double seconds_[kOps] = {};
};

struct Bench {
  ModelConfig config;
  std::string dir;
  bool remove_dir = false;
  std::unique_ptr<Checkpoint> checkpoint;
  std::unique_ptr<CpuBackend> cpu;
  std::unique_ptr<CountingBackend> backend;
  std::unique_ptr<Model> model;
  ~Bench() {
    model.reset();
    checkpoint.reset();
    if (remove_dir) {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  }
};

int bench_layers() {
  const char* env = std::getenv("ARBITER_BENCH_LAYERS");
  const int n = env && *env ? std::atoi(env) : 4;
  if (n <= 0) throw std::invalid_argument("ARBITER_BENCH_LAYERS must be a positive layer count");
  return n;
}

ModelConfig bench_config() {
  ModelConfig c = preset_config("20b-shape");
  c.num_hidden_layers = bench_layers();
  c.layer_is_sliding.clear();
  for (int i = 0; i < c.num_hidden_layers; ++i) c.layer_is_sliding.push_back(i % 2 == 0);
  return c;
}

Bench& bench() {
  static const std::unique_ptr<Bench> b = [] {
    auto p = std::make_unique<Bench>();
    Bench& r = *p;
    r.config = bench_config();
    const char* env = std::getenv("ARBITER_BENCH_MODEL");
    if (env && *env) {
      r.dir = env;
    } else {
      r.dir = (std::filesystem::temp_directory_path() / ("arbiter-bench-" + std::to_string(std::random_device{}()))).string();
      r.remove_dir = true;
    }
    if (!std::filesystem::exists(std::filesystem::path(r.dir) / "config.json")) {
      std::fprintf(stderr, "arbiter_bench_cpu: writing a random %d-layer 20b-shape model to %s ...\n",
                   r.config.num_hidden_layers, r.dir.c_str());
      const auto t = Clock::now();
      make_random_model(r.config, r.dir);
      std::fprintf(stderr, "arbiter_bench_cpu: model written in %.1f s\n", seconds_since(t));
    } else {
      r.config = load_model_config((std::filesystem::path(r.dir) / "config.json").string());
      const int layers = bench_layers();
      if (layers > r.config.num_hidden_layers)
        throw std::invalid_argument("ARBITER_BENCH_LAYERS=" + std::to_string(layers) + " but the checkpoint in " + r.dir +
                                    " has " + std::to_string(r.config.num_hidden_layers) + " layers");
      r.config.num_hidden_layers = layers;
      r.config.layer_is_sliding.resize(static_cast<size_t>(layers));
    }
    std::fprintf(stderr, "arbiter_bench_cpu: %d layers\n", r.config.num_hidden_layers);
    r.checkpoint = std::make_unique<Checkpoint>(r.dir);
    r.cpu = std::make_unique<CpuBackend>();
    r.backend = std::make_unique<CountingBackend>(*r.cpu);
    ModelOptions o;
    o.max_step_rows = 512;
    o.max_logit_rows = 16;
    o.kv.full_blocks = 512;
    o.kv.sliding_blocks = 512;
    r.model = std::make_unique<Model>(r.config, *r.checkpoint, *r.backend, o);
    return p;
  }();
  return *b;
}

std::vector<int32_t> random_tokens(int n, uint32_t seed, int vocab) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, std::min(vocab, 199998) - 1);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = d(rng);
  return t;
}

// ---------------------------------------------------------------------------------------------
// The read floor of a batch-1 decode step: the same weight bytes read in the same parallel passes
// (q+k+v, o, router, the 4 experts' gate_up, their down, per layer; then lm_head), each pass handed
// out in 256 KiB items to all threads as the matrix-vector kernels are, but with a plain read and no
// arithmetic. A forward pass cannot beat it with these threads and these hand-offs.

using ByteRange = std::pair<const uint8_t*, size_t>;

ByteRange bytes_of(const Tensor& t) { return {static_cast<const uint8_t*>(t.data), static_cast<size_t>(t.bytes())}; }

// Plain read of a byte range: its 64-byte-aligned whole 256-byte chunks (the rest is < 320 bytes).
float read_range(const uint8_t* p, size_t n) {
  const auto start = reinterpret_cast<uintptr_t>(p), aligned = (start + 63) / 64 * 64;
  if (aligned - start >= n) return 0.0f;
  const size_t usable = (n - (aligned - start)) / 256 * 256;
  return sum_floats(reinterpret_cast<const float*>(aligned), usable / 4);
}

void read_pass(cpu::ThreadPool& pool, const std::vector<ByteRange>& ranges) {
  constexpr size_t kItem = 256 << 10;
  std::vector<ByteRange> items;
  for (const auto& [p, n] : ranges)
    for (size_t b = 0; b < n; b += kItem) items.emplace_back(p + b, std::min(kItem, n - b));
  std::vector<float> sums(items.size());
  cpu::dynamic_for(pool, static_cast<int64_t>(items.size()), [&](int64_t i) {
    sums[static_cast<size_t>(i)] = read_range(items[static_cast<size_t>(i)].first, items[static_cast<size_t>(i)].second);
  });
  benchmark::DoNotOptimize(sums.data());
}

// The passes of one batch-1 decode step (experts 0-3 of each layer stand for the routed ones).
std::vector<std::vector<ByteRange>> decode_read_passes(const ModelWeights& w) {
  std::vector<std::vector<ByteRange>> passes;
  for (const LayerWeights& l : w.layers) {
    passes.push_back({bytes_of(l.q_weight), bytes_of(l.k_weight), bytes_of(l.v_weight)});
    passes.push_back({bytes_of(l.o_weight)});
    passes.push_back({bytes_of(l.router_weight)});
    std::vector<ByteRange> gate_up, down;
    for (int e = 0; e < 4 && e < l.experts.num_experts(); ++e) {
      gate_up.push_back(bytes_of(l.experts.gate_up_blocks.slice_rows(e, 1)));
      gate_up.push_back(bytes_of(l.experts.gate_up_scales.slice_rows(e, 1)));
      down.push_back(bytes_of(l.experts.down_blocks.slice_rows(e, 1)));
      down.push_back(bytes_of(l.experts.down_scales.slice_rows(e, 1)));
    }
    passes.push_back(gate_up);
    passes.push_back(down);
  }
  passes.push_back({bytes_of(w.lm_head)});
  return passes;
}

// ---------------------------------------------------------------------------------------------
// Accounting.

int64_t bf16_matrix_bytes(int64_t out, int64_t in, bool bias) { return 2 * out * in + (bias ? 2 * out : 0); }

// Weight bytes one step reads, by operation: the dense products of every layer (q/k/v/o with
// biases, router), the distinct experts it ran (MXFP4 blocks, scales, biases), lm_head (with the
// final norm) when logits are produced, and the rest (embedding rows, norms, sinks).
struct StepBytes {
  double dense = 0, experts = 0, lm_head = 0, other = 0;
  double total() const { return dense + experts + lm_head + other; }
};
StepBytes step_bytes(const ModelConfig& c, int64_t rows, int64_t distinct_experts, bool logits) {
  const int64_t H = c.hidden_size, Q = c.num_attention_heads * c.head_dim, KV = c.num_key_value_heads * c.head_dim;
  const int64_t E = c.num_local_experts, I = c.intermediate_size;
  const int64_t attn = bf16_matrix_bytes(Q, H, true) + 2 * bf16_matrix_bytes(KV, H, true) + bf16_matrix_bytes(H, Q, true);
  const int64_t norms_sinks = 2 * 2 * H + 2 * c.num_attention_heads;
  const int64_t router = bf16_matrix_bytes(E, H, true);
  const int64_t expert = (2 * I * (H / 32) * 17 + 2 * 2 * I) + (H * (I / 32) * 17 + 2 * H);
  const double layers = static_cast<double>(c.num_hidden_layers);
  StepBytes b;
  b.dense = layers * static_cast<double>(attn + router);
  b.experts = static_cast<double>(distinct_experts) * static_cast<double>(expert);
  if (logits) b.lm_head = static_cast<double>(2 * H + bf16_matrix_bytes(c.vocab_size, H, false));
  b.other = static_cast<double>(rows * H * 2) + layers * static_cast<double>(norms_sinks);
  return b;
}

// Weight bytes one step reads in all.
double step_weight_bytes(const ModelConfig& c, int64_t rows, int64_t distinct_experts, bool logits) {
  return step_bytes(c, rows, distinct_experts, logits).total();
}

// FLOP of a step (multiply-adds count 2): projections, router and the expert pairs it ran,
// attention scores and P V over each row's visible keys, and lm_head for the logit rows.
double step_flops(const ModelConfig& c, const StepLayout& layout, int64_t expert_pairs) {
  const double H = c.hidden_size, Q = c.num_attention_heads * c.head_dim, KV = c.num_key_value_heads * c.head_dim;
  const double I = c.intermediate_size, rows = static_cast<double>(layout.tokens.size());
  double f = static_cast<double>(c.num_hidden_layers) * rows * 2 * (Q * H + 2 * KV * H + H * Q + c.num_local_experts * H);
  f += static_cast<double>(expert_pairs) * 2 * (2 * I * H + I * H);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const int64_t w = c.layer_is_sliding[static_cast<size_t>(l)] ? c.sliding_window : 0;
    for (const SequenceStep& s : layout.sequences)
      for (int32_t i = 0; i < s.num_new; ++i) {
        const int64_t pos = s.num_cached + i;
        const int64_t keys = w > 0 ? std::min<int64_t>(pos + 1, w) : pos + 1;
        f += 4.0 * static_cast<double>(keys) * c.head_dim * c.num_attention_heads;
      }
  }
  f += static_cast<double>(layout.logit_rows.size()) * 2 * H * c.vocab_size;
  return f;
}

// ---------------------------------------------------------------------------------------------
// Benchmarks.

// The machine figures are measured once (best of several passes) and shared with the model
// benchmarks; these report them, with the time of one best pass.
void BM_CopyBandwidth(benchmark::State& state) {
  for (auto _ : state) state.SetIterationTime(2.0 * kStreamFloats * 4 / machine().copy_bytes_per_s);
  state.counters["GB/s"] = machine().copy_bytes_per_s / 1e9;
  state.counters["threads"] = hw_threads();
}

void BM_ReadBandwidth(benchmark::State& state) {
  for (auto _ : state) state.SetIterationTime(1.0 * kStreamFloats * 4 / machine().read_bytes_per_s);
  state.counters["GB/s"] = machine().read_bytes_per_s / 1e9;
  state.counters["threads"] = hw_threads();
}

void BM_FmaPeak(benchmark::State& state) {
  for (auto _ : state) state.SetIterationTime(machine().fma_seconds);
  state.counters["GFLOP/s"] = machine().fma_flops_per_s / 1e9;
  state.counters["cpu_util"] = machine().fma_cpu_util;
  state.counters["threads"] = hw_threads();
  state.SetLabel(cpu::isa_name(cpu::active_isa()));
}

constexpr int kContext = 128;  // tokens already cached for each decoding sequence

void BM_Decode(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  Bench& b = bench();
  const auto& opt = b.model->options();
  KvBlockPools pools(opt.kv);
  std::vector<std::unique_ptr<LocalSequence>> seqs;
  // Prefill every sequence's context (not timed), packing sequences into steps of <= 512 rows.
  for (int s = 0; s < batch;) {
    StepLayout layout;
    layout.block_size = opt.kv.block_size;
    const int first = s;
    for (; s < batch && static_cast<int>(layout.tokens.size()) + kContext <= opt.max_step_rows; ++s) {
      seqs.push_back(std::make_unique<LocalSequence>(pools, b.model->kv_cache().ring_blocks_per_sequence()));
      const auto t = random_tokens(kContext, static_cast<uint32_t>(100 + s), b.config.vocab_size);
      seqs.back()->append_to_step(layout, t.data(), kContext, true);
    }
    b.model->forward_argmax(layout);
    for (int i = first; i < s; ++i) seqs[static_cast<size_t>(i)]->commit(kContext);
  }
  // One decode step for all sequences at position kContext; re-run without committing, so every
  // iteration is the same step (it rewrites the same cache slot).
  StepLayout layout;
  layout.block_size = opt.kv.block_size;
  for (int s = 0; s < batch; ++s) {
    const int32_t tok = random_tokens(1, static_cast<uint32_t>(900 + s), b.config.vocab_size)[0];
    seqs[static_cast<size_t>(s)]->append_to_step(layout, &tok, 1, true);
  }
  b.model->forward_argmax(layout);  // warm-up
  // The machine's bandwidth drifts with other load: measure copy and read again right around the
  // timed loop and compare with their mean.
  const double copy_before = copy_bandwidth(3), read_before = read_bandwidth(3);
  b.backend->reset();
  int64_t steps = 0;
  double total = 0, cpu = 0;
  for (auto _ : state) {
    const auto t = Clock::now();
    const double c = process_cpu_seconds();
    benchmark::DoNotOptimize(b.model->forward_argmax(layout));
    const double dt = seconds_since(t);
    cpu += process_cpu_seconds() - c;
    state.SetIterationTime(dt);
    total += dt;
    ++steps;
  }
  state.counters["cpu_util"] = cpu / (total * b.cpu->pool().size());
  if (std::getenv("ARBITER_BENCH_PROFILE")) b.backend->print_profile(batch == 1 ? "decode/1" : "decode/N", steps);
  const double distinct_per_step = static_cast<double>(b.backend->distinct_experts()) / static_cast<double>(steps);
  const double bytes = step_weight_bytes(b.config, batch, static_cast<int64_t>(distinct_per_step + 0.5), true);
  const double bytes_per_s = bytes * static_cast<double>(steps) / total;
  state.counters["tok/s"] = batch * static_cast<double>(steps) / total;
  state.counters["weight_MB/step"] = bytes / 1e6;
  state.counters["experts/layer"] = distinct_per_step / b.config.num_hidden_layers;
  state.counters["weight_GB/s"] = bytes_per_s / 1e9;
  const double copy_bw = (copy_before + copy_bandwidth(3)) / 2, read_bw = (read_before + read_bandwidth(3)) / 2;
  state.counters["copy_GB/s"] = copy_bw / 1e9;
  state.counters["bw_vs_copy"] = bytes_per_s / copy_bw;
  state.counters["bw_vs_read"] = bytes_per_s / read_bw;
  // What batch-1's target (0.85 of copy) asks of a plain read in this run.
  state.counters["target_vs_read"] = 0.85 * copy_bw / read_bw;
  if (batch == 1) {
    // Per operation: its weight bytes per second over the read bandwidth of this run (the dense
    // products q/k/v/o/router, the experts, lm_head), and their share of the step's time.
    const StepBytes sb = step_bytes(b.config, batch, static_cast<int64_t>(distinct_per_step + 0.5), true);
    const double n = static_cast<double>(steps);
    const double dense_s = b.backend->seconds(3), experts_s = b.backend->seconds(8), head_s = b.backend->seconds(12);
    state.counters["dense_vs_read"] = sb.dense * n / dense_s / read_bw;
    state.counters["experts_vs_read"] = sb.experts * n / experts_s / read_bw;
    state.counters["lm_head_vs_read"] = sb.lm_head * n / head_s / read_bw;
    state.counters["rest_ms"] = 1e3 * (total - dense_s - experts_s - head_s) / n;
    state.counters["read_GB/s"] = read_bw / 1e9;
    // The read floor (above), timed as often as the step was, right after it.
    const auto passes = decode_read_passes(b.model->weights());
    double floor_bytes = 0;
    for (const auto& pass : passes)
      for (const auto& r : pass) floor_bytes += static_cast<double>(r.second);
    // And the same bytes as one pass (no hand-off between operations): what any implementation that
    // reads them with these threads is bounded by.
    std::vector<ByteRange> all;
    for (const auto& pass : passes) all.insert(all.end(), pass.begin(), pass.end());
    double floor_total = 0, one_pass_total = 0;
    const int64_t reps = std::max<int64_t>(steps, 5);
    for (int64_t i = 0; i < reps; ++i) {
      auto t = Clock::now();
      for (const auto& pass : passes) read_pass(b.cpu->pool(), pass);
      floor_total += seconds_since(t);
      t = Clock::now();
      read_pass(b.cpu->pool(), all);
      one_pass_total += seconds_since(t);
    }
    const double floor_bytes_per_s = floor_bytes * static_cast<double>(reps) / floor_total;
    state.counters["floor_vs_copy"] = floor_bytes_per_s / copy_bw;
    state.counters["bw_vs_floor"] = bytes_per_s / floor_bytes_per_s;
    state.counters["one_pass_vs_copy"] = floor_bytes * static_cast<double>(reps) / one_pass_total / copy_bw;
  }
}

// Batch-1 decode A/B in one process: the same checkpoint in two models (weights copied into huge
// pages at load, the default, and the checkpoint's own mapping), run as three variants (exact fp32
// expert activations on either, int8 expert activations on the copies), and the read floor
// of the step (the same bytes in the same passes, plain reads). Rounds run every variant for a few
// steps in shuffled order, so the machine's drifting load hits all alike; reported are the medians
// over rounds of ms per step and, per operation, weight bytes/s over the floor's read rate of the
// same round (dense q/k/v/o/router, experts, lm_head, whole step), and the median over rounds of
// each variant's speed-up over the first in the same round (whole step, experts).
// ARBITER_BENCH_AB_ROUNDS sets the rounds (15).
void BM_DecodeAB(benchmark::State& state) {
  Bench& b = bench();
  // Two models: the bench's own (weights copied at load) and one on the checkpoint's mapping; the
  // activation mode is a backend setting, switched per run.
  const ModelOptions o = b.model->options();
  CpuBackend mapped_cpu;
  mapped_cpu.set_copy_weights(false);
  CountingBackend mapped_counting(mapped_cpu);
  Model mapped_model(b.config, *b.checkpoint, mapped_counting, o);
  struct Target {
    CpuBackend* cpu;
    CountingBackend* counting;
    Model* model;
  };
  const Target targets[2] = {{b.cpu.get(), b.backend.get(), b.model.get()}, {&mapped_cpu, &mapped_counting, &mapped_model}};
  struct Variant {
    const char* name;
    int target;
    cpu::Mxfp4Activations activations;
    std::vector<double> step_ms, dense, experts, head, whole;
    std::vector<double> step_speedup, experts_speedup;  // per round, over the first variant
    std::vector<double> dense_ms, experts_ms, head_ms, rest_ms;  // per step
  };
  std::vector<Variant> variants;
  variants.push_back({"exact, copied weights", 0, cpu::Mxfp4Activations::kExact, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}});
  variants.push_back({"exact, mapped weights", 1, cpu::Mxfp4Activations::kExact, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}});
  variants.push_back({"int8, copied weights", 0, cpu::Mxfp4Activations::kInt8, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}});
  // One prefilled sequence per model, then the same decode step re-run (as BM_Decode).
  std::vector<std::unique_ptr<KvBlockPools>> pools;
  std::vector<std::unique_ptr<LocalSequence>> seqs;
  std::vector<StepLayout> layouts;
  for (const Target& t : targets) {
    pools.push_back(std::make_unique<KvBlockPools>(o.kv));
    seqs.push_back(std::make_unique<LocalSequence>(*pools.back(), t.model->kv_cache().ring_blocks_per_sequence()));
    StepLayout prefill;
    prefill.block_size = o.kv.block_size;
    const auto toks = random_tokens(kContext, 100, b.config.vocab_size);
    seqs.back()->append_to_step(prefill, toks.data(), kContext, true);
    t.model->forward_argmax(prefill);
    seqs.back()->commit(kContext);
    StepLayout step;
    step.block_size = o.kv.block_size;
    const int32_t tok = random_tokens(1, 900, b.config.vocab_size)[0];
    seqs.back()->append_to_step(step, &tok, 1, true);
    t.model->forward_argmax(step);
    layouts.push_back(step);
  }
  const auto passes = decode_read_passes(b.model->weights());
  double floor_bytes = 0;
  for (const auto& pass : passes)
    for (const auto& r : pass) floor_bytes += static_cast<double>(r.second);
  const int rounds = std::getenv("ARBITER_BENCH_AB_ROUNDS") ? std::atoi(std::getenv("ARBITER_BENCH_AB_ROUNDS")) : 15;
  constexpr int kSteps = 3;
  std::mt19937 rng(3);
  std::vector<size_t> order(variants.size() + 1);
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::vector<double> floor_rate;
  for (auto _ : state) {
    for (int r = 0; r < rounds; ++r) {
      std::shuffle(order.begin(), order.end(), rng);
      double round_floor = 0;
      std::vector<std::array<double, 5>> got(variants.size());
      std::vector<std::array<double, 3>> op_seconds(variants.size());  // dense, experts, lm_head per step
      for (size_t i : order) {
        if (i == variants.size()) {  // the read floor
          const auto t = Clock::now();
          for (int k = 0; k < kSteps; ++k)
            for (const auto& pass : passes) read_pass(b.cpu->pool(), pass);
          round_floor = floor_bytes * kSteps / seconds_since(t);
          continue;
        }
        Variant& v = variants[i];
        const Target& tg = targets[v.target];
        tg.cpu->set_expert_activations(v.activations);
        tg.counting->reset();
        const auto t = Clock::now();
        for (int k = 0; k < kSteps; ++k)
          benchmark::DoNotOptimize(tg.model->forward_argmax(layouts[static_cast<size_t>(v.target)]));
        const double dt = seconds_since(t) / kSteps;
        const double distinct = static_cast<double>(tg.counting->distinct_experts()) / kSteps;
        const StepBytes sb = step_bytes(b.config, 1, static_cast<int64_t>(distinct + 0.5), true);
        op_seconds[i] = {tg.counting->seconds(3) / kSteps, tg.counting->seconds(8) / kSteps, tg.counting->seconds(12) / kSteps};
        got[i] = {dt, sb.dense * kSteps / tg.counting->seconds(3), sb.experts * kSteps / tg.counting->seconds(8),
                  sb.lm_head * kSteps / tg.counting->seconds(12), sb.total() / dt};
      }
      floor_rate.push_back(round_floor);
      for (size_t i = 0; i < variants.size(); ++i) {
        variants[i].step_ms.push_back(1e3 * got[i][0]);
        variants[i].dense.push_back(got[i][1] / round_floor);
        variants[i].experts.push_back(got[i][2] / round_floor);
        variants[i].head.push_back(got[i][3] / round_floor);
        variants[i].whole.push_back(got[i][4] / round_floor);
        variants[i].dense_ms.push_back(1e3 * op_seconds[i][0]);
        variants[i].experts_ms.push_back(1e3 * op_seconds[i][1]);
        variants[i].head_ms.push_back(1e3 * op_seconds[i][2]);
        variants[i].rest_ms.push_back(1e3 * (got[i][0] - op_seconds[i][0] - op_seconds[i][1] - op_seconds[i][2]));
        variants[i].step_speedup.push_back(got[0][0] / got[i][0]);
        variants[i].experts_speedup.push_back(got[i][2] / got[0][2]);
      }
    }
    state.SetIterationTime(1.0);
  }
  b.cpu->set_expert_activations(cpu::Mxfp4Activations::kExact);
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
  };
  std::fprintf(stderr, "decode A/B, %d layers, %d rounds x %d steps; floor (plain reads of the step's bytes in its passes) %.1f GB/s median\n",
               b.config.num_hidden_layers, rounds, kSteps, median(floor_rate) / 1e9);
  std::fprintf(stderr, "%-22s %8s %6s %10s %11s %13s %13s %12s %14s\n", "variant", "ms/step", "tok/s", "step/floor",
               "dense/floor", "experts/floor", "lm_head/floor", "step speedup", "experts speedup");
  for (const Variant& v : variants)
    std::fprintf(stderr, "%-22s %8.2f %6.2f %10.3f %11.3f %13.3f %13.3f %12.3f %14.3f\n", v.name, median(v.step_ms),
                 1e3 / median(v.step_ms), median(v.whole), median(v.dense), median(v.experts), median(v.head),
                 median(v.step_speedup), median(v.experts_speedup));
  std::fprintf(stderr, "per-op profile, ms per step (medians): %-22s %8s %8s %8s %8s\n", "", "dense", "experts", "lm_head", "rest");
  for (const Variant& v : variants)
    std::fprintf(stderr, "per-op profile, ms per step (medians): %-22s %8.2f %8.2f %8.2f %8.2f\n", v.name, median(v.dense_ms),
                 median(v.experts_ms), median(v.head_ms), median(v.rest_ms));
  state.counters["floor_GB/s"] = median(floor_rate) / 1e9;
}

void BM_Prefill(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  const Machine& m = machine();
  Bench& b = bench();
  const auto& opt = b.model->options();
  const auto tokens = random_tokens(n, 7, b.config.vocab_size);
  double flops = 0, total = 0, cpu = 0;
  int64_t steps = 0;
  auto run_once = [&](bool timed) {
    KvBlockPools pools(opt.kv);
    LocalSequence seq(pools, b.model->kv_cache().ring_blocks_per_sequence());
    StepLayout layout;
    layout.block_size = opt.kv.block_size;
    seq.append_to_step(layout, tokens.data(), n, true);
    b.backend->reset();
    const auto t = Clock::now();
    const double c = process_cpu_seconds();
    benchmark::DoNotOptimize(b.model->forward_argmax(layout));
    const double dt = seconds_since(t);
    if (timed) {
      flops += step_flops(b.config, layout, b.backend->pairs());
      total += dt;
      cpu += process_cpu_seconds() - c;
      ++steps;
    }
    return dt;
  };
  run_once(false);  // warm-up
  for (auto _ : state) state.SetIterationTime(run_once(true));
  if (std::getenv("ARBITER_BENCH_PROFILE")) b.backend->print_profile("prefill (last step)", 1);
  state.counters["tok/s"] = n * static_cast<double>(steps) / total;
  state.counters["GFLOP/step"] = flops / static_cast<double>(steps) / 1e9;
  state.counters["GFLOP/s"] = flops / total / 1e9;
  state.counters["vs_fma_peak"] = flops / total / m.fma_flops_per_s;
  state.counters["cpu_util"] = cpu / (total * b.cpu->pool().size());
}

// Kernel-level: one linear layer of the real shapes, to see each path on its own.
void BM_LinearBf16(benchmark::State& state) {
  const int64_t rows = state.range(0), in = 2880, out = 4096;
  cpu::ThreadPool pool;
  std::mt19937 rng(1);
  std::vector<uint16_t> w(static_cast<size_t>(in * out));
  for (auto& v : w) v = static_cast<uint16_t>(0x3c00 + (rng() & 0xff));
  std::vector<float> x(static_cast<size_t>(rows * in), 0.5f), y(static_cast<size_t>(rows * out));
  for (auto _ : state) {
    const auto t = Clock::now();
    cpu::linear_bf16(pool, x.data(), rows, in, w.data(), out, nullptr, y.data());
    state.SetIterationTime(seconds_since(t));
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(rows * in * out), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["weight_GB/s"] = benchmark::Counter(2.0 * static_cast<double>(in * out), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_LinearMxfp4(benchmark::State& state) {
  const int64_t rows = state.range(0), in = 2880, out = 5760;
  cpu::ThreadPool pool;
  std::mt19937 rng(2);
  std::vector<uint8_t> blocks(static_cast<size_t>(out * in / 2)), scales(static_cast<size_t>(out * in / 32));
  for (auto& v : blocks) v = static_cast<uint8_t>(rng());
  for (auto& v : scales) v = static_cast<uint8_t>(120 + rng() % 8);
  std::vector<float> x(static_cast<size_t>(rows * in), 0.5f), y(static_cast<size_t>(rows * out));
  for (auto _ : state) {
    const auto t = Clock::now();
    cpu::linear_mxfp4(pool, x.data(), rows, in, blocks.data(), scales.data(), out, nullptr, y.data());
    state.SetIterationTime(seconds_since(t));
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(rows * in * out), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["weight_GB/s"] = benchmark::Counter(static_cast<double>(blocks.size() + scales.size()), benchmark::Counter::kIsIterationInvariantRate);
}

// One hand-off to the pool and back (a dynamic_for of 8 trivial items) after the caller has been
// busy alone for `gap` microseconds, as between a decode step's parallel passes. Reports the round
// trip; it is what every parallel pass of a step pays on top of its work.
void BM_PoolHandOff(benchmark::State& state) {
  const auto gap = std::chrono::microseconds(state.range(0));
  cpu::ThreadPool& pool = bench().cpu->pool();
  std::atomic<int> sink{0};
  double total = 0;
  int64_t n = 0;
  for (auto _ : state) {
    const auto busy = Clock::now();
    while (Clock::now() - busy < gap) {
    }
    const auto t = Clock::now();
    cpu::dynamic_for(pool, 8, [&](int64_t) { sink.fetch_add(1, std::memory_order_relaxed); });
    const double dt = seconds_since(t);
    state.SetIterationTime(dt);
    total += dt;
    ++n;
  }
  state.counters["us_per_handoff"] = 1e6 * total / static_cast<double>(std::max<int64_t>(1, n));
}

BENCHMARK(BM_PoolHandOff)->Arg(0)->Arg(100)->Arg(300)->Arg(1000)->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(2000);
BENCHMARK(BM_LinearBf16)->Arg(1)->Arg(16)->Arg(64)->Arg(512)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LinearMxfp4)->Arg(1)->Arg(4)->Arg(64)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_CopyBandwidth)->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ReadBandwidth)->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FmaPeak)->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Decode)->Arg(1)->Arg(16)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_DecodeAB)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK(BM_Prefill)->Arg(512)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);

}  // namespace
}  // namespace arbiter

BENCHMARK_MAIN();
