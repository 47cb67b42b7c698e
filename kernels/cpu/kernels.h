// The CPU backend's optimized kernels: multithreaded over a ThreadPool and vectorized for the
// instruction set found at run time (AVX-512, AVX2/FMA, or portable C++). Each has a scalar
// twin in reference.h (or, for attention, the model math in DESIGN.md §1) that tests compare it with.
#pragma once

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "kernels/cpu/kernels_isa.h"
#include "kernels/cpu/thread_pool.h"

namespace arbiter::cpu {

enum class Isa { kPortable, kAvx2, kAvx512 };
Isa detected_isa();   // best the running CPU supports
Isa active_isa();     // what the kernels use now (detected unless overridden)
void set_active_isa(Isa isa);  // tests and benchmarks; clamps to what the CPU supports
const char* isa_name(Isa isa);

// AVX512-VNNI (vpdpbusd) for the int8 dot products of Mxfp4Activations::kInt8: whether the CPU has
// it, and whether the kernels use it (on where available; tests and benchmarks switch it off to
// run the vpmaddubsw path; clamps to what the CPU supports).
bool vnni_available();
bool vnni_active();
void set_vnni_active(bool on);

namespace detail {
// [lo, hi) of one thread's share, packed in one word so that the owner's "take the next item" and a
// thief's "take the back half" are single compare-and-swaps.
struct alignas(64) ItemShare {
  std::atomic<uint64_t> range{0};
  static uint64_t pack(uint32_t lo, uint32_t hi) { return static_cast<uint64_t>(hi) << 32 | lo; }
  static uint32_t lo(uint64_t r) { return static_cast<uint32_t>(r); }
  static uint32_t hi(uint64_t r) { return static_cast<uint32_t>(r >> 32); }
  // The next item from the front, or -1 when the share is empty.
  int64_t take_front() {
    uint64_t r = range.load(std::memory_order_relaxed);
    while (lo(r) < hi(r))
      if (range.compare_exchange_weak(r, pack(lo(r) + 1, hi(r)), std::memory_order_relaxed)) return lo(r);
    return -1;
  }
  // Takes the back half (at least one item) of the share: false when it is empty.
  bool take_back_half(uint32_t& begin, uint32_t& end) {
    uint64_t r = range.load(std::memory_order_relaxed);
    while (lo(r) < hi(r)) {
      const uint32_t mid = lo(r) + (hi(r) - lo(r)) / 2;
      if (range.compare_exchange_weak(r, pack(lo(r), mid), std::memory_order_relaxed)) {
        begin = mid;
        end = hi(r);
        return true;
      }
    }
    return false;
  }
  uint32_t left() const {
    const uint64_t r = range.load(std::memory_order_relaxed);
    return hi(r) - lo(r);
  }
};
}  // namespace detail

// Runs body(i) for every i in [0, items) on all pool threads (the caller included). Each thread
// starts on its own contiguous share of the items and walks it in order, so a thread streaming
// weights keeps one sequential stream (the hardware prefetcher and the kernels' software prefetch
// run on into its next item); a thread that runs out takes the back half of the largest share left
// and walks that in order. Items may differ in cost: the splitting balances them, and a worker
// that wakes late finds its share taken half by half by the others.
template <typename F>
void dynamic_for(ThreadPool& pool, int64_t items, const F& body) {
  if (items <= 0) return;
  if (items == 1 || pool.size() == 1) {
    for (int64_t i = 0; i < items; ++i) body(i);
    return;
  }
  if (items >= (int64_t{1} << 32)) throw std::length_error("dynamic_for: too many items");
  const int threads = pool.size();
  std::vector<detail::ItemShare> shares(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t)
    shares[static_cast<size_t>(t)].range.store(
        detail::ItemShare::pack(static_cast<uint32_t>(items * t / threads), static_cast<uint32_t>(items * (t + 1) / threads)),
        std::memory_order_relaxed);
  pool.parallel_for(threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      detail::ItemShare& mine = shares[static_cast<size_t>(t)];
      for (;;) {
        for (int64_t i = mine.take_front(); i >= 0; i = mine.take_front()) body(i);
        // Out of work: move the back half of the largest share left into this one.
        size_t victim = shares.size();
        uint32_t most = 0;
        for (size_t v = 0; v < shares.size(); ++v)
          if (shares[v].left() > most) {
            most = shares[v].left();
            victim = v;
          }
        if (victim == shares.size()) break;
        uint32_t begin = 0, end = 0;
        if (shares[victim].take_back_half(begin, end)) mine.range.store(detail::ItemShare::pack(begin, end), std::memory_order_relaxed);
      }
    }
  });
}

// Which algorithm a linear layer uses. kAuto picks by the number of rows: matrix-vector
// (streams each weight row once for all rows; decode) below a threshold, the packed GEMM above.
enum class LinearPath { kAuto, kMatvec, kGemm };
// Row counts from which kAuto switches to the GEMM.
inline constexpr int64_t kBf16GemmMinRows = 32;
inline constexpr int64_t kMxfp4GemmMinRows = 24;

// What the one-row MXFP4 products (the experts of a batch-1 decode step) do with their fp32
// activations. kExact (the default): multiply them in fp32 against the decoded weights, within the
// golden tolerance. kInt8 (opt-in, ARBITER_CPU_MXFP4=int8 for CpuBackend): quantize them per
// 32-value block to int8 (isa::quantize_q8, as llama.cpp's q8_0) and take integer dot products
// against the E2M1 codes (exact as int8), one fp32 scale multiply per block; the activations'
// rounding is the only error (measured against the golden logits in docs/performance.md). Products
// of several rows and the GEMM path stay exact in both modes.
enum class Mxfp4Activations { kExact, kInt8 };

// y[r, o] = sum_i x[r, i] * w[o, i] + bias[o] with w bf16 [out, in]; bias may be null.
void linear_bf16(ThreadPool& pool, const float* x, int64_t rows, int64_t in, const uint16_t* w,
                 int64_t out_features, const uint16_t* bias, float* y, LinearPath path = LinearPath::kAuto);
// Several bf16 products of the same activations (q, k and v of one layer). On the matrix-vector
// path they run in one parallel pass over all their outputs: one hand-off to the pool and one long
// weight stream instead of three; on the GEMM path one after another.
struct Bf16Problem {
  const uint16_t* w = nullptr;     // bf16 [out_features, in]
  int64_t out_features = 0;
  const uint16_t* bias = nullptr;  // may be null
  float* y = nullptr;              // [rows, out_features]
};
void linear_bf16_multi(ThreadPool& pool, const float* x, int64_t rows, int64_t in, const Bf16Problem* problems,
                       int64_t count, LinearPath path = LinearPath::kAuto);
// The same with an MXFP4 matrix (blocks [out, in/32, 16], scales [out, in/32]) and a bf16 bias;
// `in` must be a multiple of 32. Weights are dequantized per 32-value block as they are used.
void linear_mxfp4(ThreadPool& pool, const float* x, int64_t rows, int64_t in, const uint8_t* blocks,
                  const uint8_t* scales, int64_t out_features, const uint16_t* bias, float* y,
                  LinearPath path = LinearPath::kAuto, Mxfp4Activations activations = Mxfp4Activations::kExact);

// Several MXFP4 products of the same shape (the experts of one MoE layer): problems that take the
// matrix-vector path run together in one parallel pass (one hand-off to the pool instead of one
// per expert), the others one after another on the GEMM path.
struct Mxfp4Problem {
  const float* x = nullptr;  // [rows, in]
  int64_t rows = 0;
  const uint8_t* blocks = nullptr;
  const uint8_t* scales = nullptr;
  const uint16_t* bias = nullptr;  // may be null
  float* y = nullptr;              // [rows, out]
};
void linear_mxfp4_multi(ThreadPool& pool, int64_t in, int64_t out_features, const Mxfp4Problem* problems, int64_t count,
                        Mxfp4Activations activations = Mxfp4Activations::kExact);

// Attention with sinks over explicit key/value row pointers (see isa::AttentionTask); runs every
// task, spread over the pool. Tasks must write disjoint outputs.
using AttentionTask = isa::AttentionTask;
void attention(ThreadPool& pool, const AttentionTask* tasks, int64_t count);

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, rows of `dim`; out may alias x.
void rms_norm(ThreadPool& pool, const float* x, int64_t rows, int64_t dim, const float* weight, float eps, float* out);
// Clamped SwiGLU of rows of interleaved gate/up pairs: u [rows, 2 * n] -> act [rows, n].
void swiglu(ThreadPool& pool, const float* u, int64_t rows, int64_t n, float limit, float* act);
// Rotate-half RoPE of one row of `heads` heads with per-pair cos/sin (times the concentration).
void rope_row(float* row, int heads, int head_dim, const float* cos, const float* sin);
// x += y over n floats (spread over the pool when large).
void add(ThreadPool& pool, float* x, const float* y, int64_t n);
// out += w * y over n floats (single-threaded).
void axpy(float* out, float w, const float* y, int64_t n);
// out[r] = index of the largest of row r of x [rows, n] (lowest on ties); long rows are split
// over the pool.
void argmax_rows(ThreadPool& pool, const float* x, int64_t rows, int64_t n, int32_t* out);
// bf16 -> f32 over n values (single-threaded).
void bf16_to_f32(const uint16_t* in, int64_t n, float* out);

}  // namespace arbiter::cpu
