// The CPU backend's optimized kernels: multithreaded over a ThreadPool and vectorized for the
// instruction set found at run time (AVX-512, AVX2/FMA, or portable C++). Each has a scalar
// twin in reference.h (or, for attention, the model math in DESIGN.md §1) that tests compare it with.
#pragma once

#include <atomic>
#include <cstdint>

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

// Runs body(i) for every i in [0, items) on all pool threads (the caller included), handing the
// items out one at a time from a shared counter: fine-grained dynamic balancing whatever the
// pool's own chunking, and no harm when a worker wakes late (the others take its items).
template <typename F>
void dynamic_for(ThreadPool& pool, int64_t items, const F& body) {
  if (items <= 0) return;
  if (items == 1 || pool.size() == 1) {
    for (int64_t i = 0; i < items; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  pool.parallel_for(pool.size(), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < items; i = next.fetch_add(1, std::memory_order_relaxed))
      body(i);
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
