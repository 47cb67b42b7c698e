// Run-time dispatch and threading for the CPU kernels, plus their portable build (the generic
// kernels in kernels_simd.h over an 8-lane array type the compiler vectorizes for the baseline).
#include "kernels/cpu/kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/tensor.h"

namespace arbiter::cpu {
namespace isa {

void deinterleave(const float* x, int64_t n, int block, float* out) {
  const int half = block / 2;
  int64_t g = 0;
  for (; g + block <= n; g += block)
    for (int j = 0; j < half; ++j) {
      out[g + j] = x[g + 2 * j];
      out[g + half + j] = x[g + 2 * j + 1];
    }
  for (; g < n; ++g) out[g] = x[g];
}

void deinterleave32(const float* x, int64_t n, float* out) { deinterleave(x, n, 32, out); }

void layout_nibbles(const float* x, int64_t n, int lanes, float* out) {
  const int64_t group = 8 * static_cast<int64_t>(lanes), whole = n / group * group;
  for (int64_t g = 0; g < whole; g += group)
    for (int v = 0; v < 8; ++v)
      for (int i = 0; i < lanes; ++i) out[g + v * lanes + i] = x[g + (i / 4) * 32 + 8 * (i % 4) + v];
  deinterleave32(x + whole, n - whole, out + whole);
}

void quantize_q8(const float* x, int64_t n, int group_blocks, int8_t* q, float* half_scales) {
  quantize_q8_blocks(
      x, n, group_blocks, q, half_scales,
      [](const float* xb) {
        float amax = 0.0f;
        for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
        return amax;
      },
      [](const float* xb, float inv, int8_t* even, int8_t* odd) {
        for (int i = 0; i < 16; ++i) {
          even[i] = static_cast<int8_t>(std::clamp(std::nearbyint(xb[2 * i] * inv), -127.0f, 127.0f));
          odd[i] = static_cast<int8_t>(std::clamp(std::nearbyint(xb[2 * i + 1] * inv), -127.0f, 127.0f));
        }
      });
}

void pack_xt_blocks(const float* x, int64_t rows, int64_t in, int chunk, int64_t k_begin, int64_t k_end, float* xt) {
  const int64_t chunks = (rows + chunk - 1) / chunk;
  for (int64_t c = 0; c < chunks; ++c) {
    float* dst = xt + c * in * chunk;
    const int64_t m0 = c * chunk, mr = std::min<int64_t>(chunk, rows - m0);
    for (int64_t g = k_begin; g < k_end; g += 32) {
      // Token-major reads, one 32-block at a time, scattered into the block's 32 rows of x^T.
      for (int64_t t = 0; t < mr; ++t) {
        const float* src = x + (m0 + t) * in + g;
        for (int j = 0; j < 16; ++j) {
          dst[(g + j) * chunk + t] = src[2 * j];
          dst[(g + 16 + j) * chunk + t] = src[2 * j + 1];
        }
      }
      for (int64_t k = g; k < g + 32; ++k)
        for (int64_t t = mr; t < chunk; ++t) dst[k * chunk + t] = 0.0f;
    }
  }
}

namespace portable_impl {

struct S {
  static constexpr int W = 8;
  static constexpr int kGemmNV = 2;
  static constexpr int kGemmMR = 4;
  static constexpr int kGemmKC = 256;
  static constexpr int kGemmTN = 4;
  static constexpr int kGemmTV = 2;
  static constexpr int kScoreQ = 4;
  static constexpr int kScoreC = 2;
  static constexpr int kPvQ = 2;
  static constexpr bool kNibbleRows = false;  // one-row MXFP4: block at a time
  struct V {
    float v[8];
  };

  template <typename F>
  static V map(F f) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = f(i);
    return r;
  }
  static V zero() { return map([](int) { return 0.0f; }); }
  static V set1(float a) { return map([a](int) { return a; }); }
  static V load(const float* p) { return map([p](int i) { return p[i]; }); }
  static void store(float* p, V v) { std::memcpy(p, v.v, sizeof v.v); }
  static V load_n(const float* p, int n) { return map([p, n](int i) { return i < n ? p[i] : 0.0f; }); }
  static void store_n(float* p, V v, int n) {
    for (int i = 0; i < n && i < W; ++i) p[i] = v.v[i];
  }
  static V fma(V a, V b, V c) { return map([&](int i) { return a.v[i] * b.v[i] + c.v[i]; }); }
  static V mul(V a, V b) { return map([&](int i) { return a.v[i] * b.v[i]; }); }
  static V add(V a, V b) { return map([&](int i) { return a.v[i] + b.v[i]; }); }
  static V sub(V a, V b) { return map([&](int i) { return a.v[i] - b.v[i]; }); }
  static V div(V a, V b) { return map([&](int i) { return a.v[i] / b.v[i]; }); }
  static V min(V a, V b) { return map([&](int i) { return std::min(a.v[i], b.v[i]); }); }
  static V max(V a, V b) { return map([&](int i) { return std::max(a.v[i], b.v[i]); }); }
  static float hsum(V v) {
    float s = 0;
    for (float f : v.v) s += f;
    return s;
  }
  static float hmax(V v) { return *std::max_element(v.v, v.v + W); }
  static void prefetch(const void*) {}
  static V bf16(const uint16_t* p) { return map([p](int i) { return arbiter::bf16_to_f32(p[i]); }); }
  static V bf16_n(const uint16_t* p, int n) { return map([p, n](int i) { return i < n ? arbiter::bf16_to_f32(p[i]) : 0.0f; }); }
  // Codes travel as exact small floats.
  static V load_codes(const uint8_t* b) { return map([b](int i) { return static_cast<float>(b[i]); }); }
  static V fp4_lo(V c) { return map([&](int i) { return kFp4Values[static_cast<int>(c.v[i]) & 0xF]; }); }
  static V fp4_hi(V c) { return map([&](int i) { return kFp4Values[static_cast<int>(c.v[i]) >> 4]; }); }
  static void bf16_pair(const uint16_t* p, V& even, V& odd) {
    even = map([p](int i) { return arbiter::bf16_to_f32(p[2 * i]); });
    odd = map([p](int i) { return arbiter::bf16_to_f32(p[2 * i + 1]); });
  }
  static void transpose(V* r) {
    for (int i = 0; i < W; ++i)
      for (int j = i + 1; j < W; ++j) std::swap(r[i].v[j], r[j].v[i]);
  }
  static void deinterleave(V a, V b, V& even, V& odd) {
    even = map([&](int i) { return i < 4 ? a.v[2 * i] : b.v[2 * i - 8]; });
    odd = map([&](int i) { return i < 4 ? a.v[2 * i + 1] : b.v[2 * i - 7]; });
  }
  static V select_range(V s, float lo, float hi) {
    return map([&](int i) {
      const float f = static_cast<float>(i);
      return f >= lo && f <= hi ? s.v[i] : -std::numeric_limits<float>::infinity();
    });
  }
  static V exp(V x) { return map([&](int i) { return std::exp(x.v[i]); }); }
  static float exp1(float x) { return std::exp(x); }
  static float sqrt1(float x) { return std::sqrt(x); }
};

#include "kernels/cpu/kernels_simd.h"

// One-row MXFP4 matvec with int8 activations, one block at a time in plain integers (the code's
// value doubled, exact, times the quantized activation), converted to fp32 once per block.
void mxfp4_q8_rows(const LinearArgs& a, int64_t o_begin, int64_t o_end) {
  static constexpr int8_t kTwiceFp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  const int64_t groups = a.in / 32;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* b = a.blocks + o * groups * 16;
    const uint8_t* sc = a.scales + o * groups;
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* xq = a.xq + g * 32;
      int32_t dot = 0;
      for (int i = 0; i < 16; ++i)
        dot += kTwiceFp4[b[g * 16 + i] & 0xF] * xq[i] + kTwiceFp4[b[g * 16 + i] >> 4] * xq[16 + i];
      acc += static_cast<float>(dot) * (kE8m0.v[sc[g]] * a.xq_half_scales[g]);
    }
    a.y[o] = acc + (a.bias ? bf16f(a.bias[o]) : 0.0f);
  }
}

constexpr KernelTable make_portable_table() {
  KernelTable t = make_table("portable");
  t.q8_group_blocks = 1;
  t.quantize_q8 = [](const float* x, int64_t n, int8_t* q, float* half_scales) { quantize_q8(x, n, 1, q, half_scales); };
  t.mxfp4_q8_row = mxfp4_q8_rows;
  return t;
}

}  // namespace portable_impl

const KernelTable& portable_kernels() {
  static constexpr KernelTable table = portable_impl::make_portable_table();
  return table;
}

}  // namespace isa

namespace {

std::atomic<Isa> g_active{detected_isa()};
std::atomic<bool> g_vnni{vnni_available()};

// MXFP4 GEMM items: whole tiles of weight rows, about 4 MFLOP each.
int64_t mxfp4_gemm_rows_per_item(const isa::KernelTable& t, int64_t rows, int64_t in) {
  const int64_t tiles = std::max<int64_t>(1, (4 << 20) / std::max<int64_t>(1, 2 * rows * in * t.mxfp4_gemm_rows));
  return std::min<int64_t>(tiles, 16) * t.mxfp4_gemm_rows;
}

const isa::KernelTable& table() {
  switch (active_isa()) {
    case Isa::kAvx512: return isa::avx512_kernels();
    case Isa::kAvx2: return isa::avx2_kernels();
    case Isa::kPortable: break;
  }
  return isa::portable_kernels();
}

// The int8-activation one-row kernel of a table: with VNNI where the build has it and it is active.
void (*q8_row_kernel(const isa::KernelTable& t))(const isa::LinearArgs&, int64_t, int64_t) {
  return g_vnni.load() && t.mxfp4_q8_row_vnni ? t.mxfp4_q8_row_vnni : t.mxfp4_q8_row;
}

// Floats that hold one row of `in` int8 activations and their block scales (quantize_q8), rounded
// up to whole 64-byte lines.
int64_t q8_row_floats(int64_t in) { return (in / 4 + in / 32 + 15) / 16 * 16; }

// Quantizes one row into `buf` (q8_row_floats(in) floats) for table t and points a at it.
void quantize_row(const isa::KernelTable& t, const float* x, int64_t in, float* buf, isa::LinearArgs& a) {
  auto* q = reinterpret_cast<int8_t*>(buf);
  t.quantize_q8(x, in, q, buf + in / 4);
  a.xq = q;
  a.xq_half_scales = buf + in / 4;
}

// Per-thread scratch that only grows (attention blocks, re-laid-out activations), 64-byte aligned:
// vector loads of activations that straddle cache lines cost the streaming kernels about a
// quarter of their memory bandwidth (measured), so every buffer they read starts on a line.
struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
float* scratch(size_t floats) {
  thread_local std::unique_ptr<float, FreeDeleter> buffer;
  thread_local size_t capacity = 0;
  if (capacity < floats) {
    const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
    buffer.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    if (!buffer) throw std::bad_alloc();
    std::memset(buffer.get(), 0, bytes);
    capacity = bytes / sizeof(float);
  }
  return buffer.get();
}

// Output features per matvec work item: about 256 KiB of weights (or fewer rows when that would
// leave fewer than 16 items), so the hand-off is amortized and the tail stays short.
int64_t matvec_rows_per_item(int64_t in, int64_t out, double bytes_per_weight) {
  const int64_t row_bytes = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(in) * bytes_per_weight));
  return std::max<int64_t>(4, std::min((256 << 10) / row_bytes, (out + 15) / 16));
}

// The job whose work items contain `item`, in jobs ordered by their `first_item` (the first at 0).
template <typename Job>
const Job& job_of(const std::vector<Job>& jobs, int64_t item) {
  size_t lo = 0, hi = jobs.size();
  while (hi - lo > 1) {
    const size_t mid = (lo + hi) / 2;
    if (jobs[mid].first_item <= item) lo = mid;
    else hi = mid;
  }
  return jobs[lo];
}

// Runs kernel(a, o_begin, o_end) over [0, a.out) in dynamically scheduled items of `per` outputs.
void run_outputs(ThreadPool& pool, const isa::LinearArgs& a, int64_t per,
                 void (*kernel)(const isa::LinearArgs&, int64_t, int64_t)) {
  const int64_t items = (a.out + per - 1) / per;
  dynamic_for(pool, items, [&](int64_t i) { kernel(a, i * per, std::min(a.out, (i + 1) * per)); });
}

// GEMM items: whole panels, several per item when there are plenty (the activations' K blocks are
// then reused across the item's panels).
int64_t panels_per_item(int64_t panels, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>(4, panels / (8 * threads)));
}

}  // namespace

Isa detected_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

Isa active_isa() { return g_active.load(); }

bool vnni_available() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

bool vnni_active() { return g_vnni.load(); }

void set_vnni_active(bool on) { g_vnni.store(on && vnni_available()); }

void set_active_isa(Isa isa) {
  g_active.store(static_cast<int>(isa) <= static_cast<int>(detected_isa()) ? isa : detected_isa());
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kPortable: return "portable";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

void linear_bf16(ThreadPool& pool, const float* x, int64_t rows, int64_t in, const uint16_t* w,
                 int64_t out_features, const uint16_t* bias, float* y, LinearPath path) {
  if (rows <= 0 || out_features <= 0) return;
  const isa::KernelTable& t = table();
  isa::LinearArgs a;
  a.x = x;
  a.rows = rows;
  a.in = in;
  a.out = out_features;
  a.w = w;
  a.bias = bias;
  a.y = y;
  if (path == LinearPath::kAuto) path = rows >= kBf16GemmMinRows ? LinearPath::kGemm : LinearPath::kMatvec;
  if (path == LinearPath::kGemm) {
    const int64_t panels = (out_features + t.gemm_nr - 1) / t.gemm_nr;
    run_outputs(pool, a, panels_per_item(panels, pool.size()) * t.gemm_nr, t.bf16_gemm);
    return;
  }
  float* xd = scratch(static_cast<size_t>(rows * in));
  for (int64_t r = 0; r < rows; ++r) isa::deinterleave(x + r * in, in, 2 * t.lanes, xd + r * in);
  a.x = xd;
  run_outputs(pool, a, matvec_rows_per_item(in, out_features, 2.0), t.bf16_matvec);
}

void linear_bf16_multi(ThreadPool& pool, const float* x, int64_t rows, int64_t in, const Bf16Problem* problems,
                       int64_t count, LinearPath path) {
  if (rows <= 0 || count <= 0) return;
  if (path == LinearPath::kAuto) path = rows >= kBf16GemmMinRows ? LinearPath::kGemm : LinearPath::kMatvec;
  if (path == LinearPath::kGemm || count == 1) {
    for (int64_t i = 0; i < count; ++i)
      linear_bf16(pool, x, rows, in, problems[i].w, problems[i].out_features, problems[i].bias, problems[i].y, path);
    return;
  }
  const isa::KernelTable& t = table();
  float* xd = scratch(static_cast<size_t>(rows * in));
  for (int64_t r = 0; r < rows; ++r) isa::deinterleave(x + r * in, in, 2 * t.lanes, xd + r * in);
  struct Job {
    isa::LinearArgs a;
    int64_t per = 0;
    int64_t first_item = 0;
  };
  std::vector<Job> jobs;
  int64_t items = 0;
  for (int64_t i = 0; i < count; ++i) {
    const Bf16Problem& p = problems[i];
    if (p.out_features <= 0) continue;
    Job j;
    j.a.x = xd;
    j.a.rows = rows;
    j.a.in = in;
    j.a.out = p.out_features;
    j.a.w = p.w;
    j.a.bias = p.bias;
    j.a.y = p.y;
    j.per = matvec_rows_per_item(in, p.out_features, 2.0);
    j.first_item = items;
    items += (p.out_features + j.per - 1) / j.per;
    jobs.push_back(j);
  }
  dynamic_for(pool, items, [&](int64_t item) {
    const Job& j = job_of(jobs, item);
    const int64_t o0 = (item - j.first_item) * j.per;
    t.bf16_matvec(j.a, o0, std::min(j.a.out, o0 + j.per));
  });
}

void linear_mxfp4(ThreadPool& pool, const float* x, int64_t rows, int64_t in, const uint8_t* blocks,
                  const uint8_t* scales, int64_t out_features, const uint16_t* bias, float* y, LinearPath path,
                  Mxfp4Activations activations) {
  if (in % 32 != 0) throw std::invalid_argument("linear_mxfp4: in (" + std::to_string(in) + ") is not a multiple of 32");
  if (rows <= 0 || out_features <= 0) return;
  const isa::KernelTable& t = table();
  isa::LinearArgs a;
  a.rows = rows;
  a.in = in;
  a.out = out_features;
  a.blocks = blocks;
  a.scales = scales;
  a.bias = bias;
  a.y = y;
  if (path == LinearPath::kAuto) path = rows >= kMxfp4GemmMinRows ? LinearPath::kGemm : LinearPath::kMatvec;
  if (path == LinearPath::kGemm) {
    // Token chunks of equal whole vectors: 70 rows in two chunks of 48 rather than 64 + 6.
    const int64_t vecs = (rows + t.lanes - 1) / t.lanes, per_chunk = t.xt_chunk / t.lanes;
    const int64_t chunks = (vecs + per_chunk - 1) / per_chunk;
    const int64_t chunk = (vecs + chunks - 1) / chunks * t.lanes;
    a.xt_chunk = chunk;
    float* xt = scratch(static_cast<size_t>((rows + chunk - 1) / chunk * chunk * in));
    // Packed in parallel, 32 inputs (one block) per item.
    pool.parallel_for(in / 32, 4, [&](int64_t b, int64_t e) {
      isa::pack_xt_blocks(x, rows, in, static_cast<int>(chunk), b * 32, e * 32, xt);
    });
    a.x = xt;
    run_outputs(pool, a, mxfp4_gemm_rows_per_item(t, rows, in), t.mxfp4_gemm);
    return;
  }
  if (rows == 1 && activations == Mxfp4Activations::kInt8) {
    quantize_row(t, x, in, scratch(static_cast<size_t>(q8_row_floats(in))), a);
    run_outputs(pool, a, matvec_rows_per_item(in, out_features, 17.0 / 32), q8_row_kernel(t));
    return;
  }
  float* xd = scratch(static_cast<size_t>(rows * in));
  if (rows == 1 && t.mxfp4_nibble_rows) isa::layout_nibbles(x, in, t.lanes, xd);
  else
    for (int64_t r = 0; r < rows; ++r) isa::deinterleave32(x + r * in, in, xd + r * in);
  a.x = xd;
  run_outputs(pool, a, matvec_rows_per_item(in, out_features, 17.0 / 32), t.mxfp4_matvec);
}

void linear_mxfp4_multi(ThreadPool& pool, int64_t in, int64_t out_features, const Mxfp4Problem* problems, int64_t count,
                        Mxfp4Activations activations) {
  if (in % 32 != 0) throw std::invalid_argument("linear_mxfp4: in (" + std::to_string(in) + ") is not a multiple of 32");
  const isa::KernelTable& t = table();
  // Every problem's activations in the layout its path reads (x^T chunks for the GEMM, even/odd
  // blocks for the matvec), packed in one parallel pass; then all the work in one dynamic pass.
  struct Job {
    const float* src = nullptr;  // the problem's activations
    isa::LinearArgs a;
    bool gemm = false;
    bool q8 = false;     // one row with int8 activations
    int64_t offset = 0;  // into the packed activations (floats)
    int64_t per = 0;     // outputs per item
    int64_t first_item = 0;
  };
  std::vector<Job> jobs;
  int64_t floats = 0, items = 0;
  for (int64_t i = 0; i < count; ++i) {
    const Mxfp4Problem& p = problems[i];
    if (p.rows <= 0) continue;
    Job j;
    j.src = p.x;
    j.a.rows = p.rows;
    j.a.in = in;
    j.a.out = out_features;
    j.a.blocks = p.blocks;
    j.a.scales = p.scales;
    j.a.bias = p.bias;
    j.a.y = p.y;
    j.gemm = p.rows >= kMxfp4GemmMinRows;
    j.q8 = p.rows == 1 && activations == Mxfp4Activations::kInt8;
    j.offset = floats;
    if (j.q8) {
      floats += q8_row_floats(in);
      j.per = matvec_rows_per_item(in, out_features, 17.0 / 32);
    } else if (j.gemm) {
      const int64_t vecs = (p.rows + t.lanes - 1) / t.lanes, per_chunk = t.xt_chunk / t.lanes;
      const int64_t chunks = (vecs + per_chunk - 1) / per_chunk;
      j.a.xt_chunk = (vecs + chunks - 1) / chunks * t.lanes;
      floats += (p.rows + j.a.xt_chunk - 1) / j.a.xt_chunk * j.a.xt_chunk * in;
      j.per = mxfp4_gemm_rows_per_item(t, p.rows, in);
    } else {
      floats += p.rows * in;
      j.per = matvec_rows_per_item(in, out_features, 17.0 / 32) / std::max<int64_t>(1, p.rows);
      j.per = std::max<int64_t>(4, j.per);
    }
    j.first_item = items;
    items += (out_features + j.per - 1) / j.per;
    jobs.push_back(j);
  }
  if (jobs.empty()) return;
  float* packed = scratch(static_cast<size_t>(floats));
  const int64_t blocks = in / 32;
  // 8 blocks (256 inputs) per packing item: a whole number of nibble groups (lanes / 4 <= 4 blocks)
  // for the one-row layout.
  constexpr int64_t kPieceBlocks = 8;
  const int64_t pieces = (blocks + kPieceBlocks - 1) / kPieceBlocks;
  auto pack = [&](int64_t item) {
    const Job& j = jobs[static_cast<size_t>(item / pieces)];
    const int64_t b0 = (item % pieces) * kPieceBlocks, b1 = std::min(blocks, b0 + kPieceBlocks);
    const float* x = j.src;
    float* dst = packed + j.offset;
    if (j.q8) {
      // Whole quantization groups (8 blocks hold a whole number of groups of 1, 2 or 4).
      t.quantize_q8(x + b0 * 32, (b1 - b0) * 32, reinterpret_cast<int8_t*>(dst) + b0 * 32, dst + in / 4 + b0);
    } else if (j.gemm) {
      isa::pack_xt_blocks(x, j.a.rows, in, static_cast<int>(j.a.xt_chunk), b0 * 32, b1 * 32, dst);
    } else if (j.a.rows == 1 && t.mxfp4_nibble_rows) {
      isa::layout_nibbles(x + b0 * 32, (b1 - b0) * 32, t.lanes, dst + b0 * 32);
    } else {
      for (int64_t r = 0; r < j.a.rows; ++r)
        isa::deinterleave32(x + r * in + b0 * 32, (b1 - b0) * 32, dst + r * in + b0 * 32);
    }
  };
  const int64_t pack_items = static_cast<int64_t>(jobs.size()) * pieces;
  if (floats < (1 << 16)) {  // a few decode rows: not worth waking the pool
    for (int64_t i = 0; i < pack_items; ++i) pack(i);
  } else {
    dynamic_for(pool, pack_items, pack);
  }
  for (Job& j : jobs) {
    j.a.x = packed + j.offset;
    if (j.q8) {
      j.a.xq = reinterpret_cast<const int8_t*>(packed + j.offset);
      j.a.xq_half_scales = packed + j.offset + in / 4;
    }
  }
  const auto q8_row = q8_row_kernel(t);
  dynamic_for(pool, items, [&](int64_t item) {
    const Job& j = job_of(jobs, item);
    const int64_t o0 = (item - j.first_item) * j.per, o1 = std::min(out_features, o0 + j.per);
    if (j.gemm) t.mxfp4_gemm(j.a, o0, o1);
    else if (j.q8) q8_row(j.a, o0, o1);
    else t.mxfp4_matvec(j.a, o0, o1);
  });
}

namespace {

// The scalar attention of one task, for head sizes the vector kernels do not cover.
void attention_scalar(const AttentionTask& t) {
  const int d = t.head_dim;
  std::vector<float> scores, acc(static_cast<size_t>(d));
  for (int q = 0; q < t.num_queries; ++q) {
    const int64_t pos = t.q_pos[q];
    const int64_t first = t.window > 0 ? std::max<int64_t>(0, pos - t.window + 1) : 0;
    const float* qh = t.q[q];
    scores.resize(static_cast<size_t>(pos - first + 1));
    float max = t.sinks[q];
    for (int64_t j = first; j <= pos; ++j) {
      const float* kj = t.keys[j - t.key_base] + t.head_offset;
      float dot = 0;
      for (int i = 0; i < d; ++i) dot += qh[i] * kj[i];
      scores[static_cast<size_t>(j - first)] = dot * t.scale;
      max = std::max(max, scores[static_cast<size_t>(j - first)]);
    }
    float denom = std::exp(t.sinks[q] - max);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = first; j <= pos; ++j) {
      const float w = std::exp(scores[static_cast<size_t>(j - first)] - max);
      denom += w;
      const float* vj = t.values[j - t.key_base] + t.head_offset;
      for (int i = 0; i < d; ++i) acc[static_cast<size_t>(i)] += w * vj[i];
    }
    for (int i = 0; i < d; ++i) t.out[q][i] = acc[static_cast<size_t>(i)] / denom;
  }
}

}  // namespace

void attention(ThreadPool& pool, const AttentionTask* tasks, int64_t count) {
  const isa::KernelTable& t = table();
  dynamic_for(pool, count, [&](int64_t i) {
    const AttentionTask& task = tasks[i];
    if (task.num_queries <= 0) return;
    if (task.head_dim % t.attention_lanes != 0 || task.num_queries > isa::kAttnMaxQueries) {
      attention_scalar(task);
      return;
    }
    t.attention(task, scratch(static_cast<size_t>(isa::attention_scratch_floats(task.head_dim, task.num_queries))));
  });
}

void rms_norm(ThreadPool& pool, const float* x, int64_t rows, int64_t dim, const float* weight, float eps, float* out) {
  const isa::KernelTable& t = table();
  pool.parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, dim)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) t.rms_norm(x + r * dim, dim, weight, eps, out + r * dim);
  });
}

void swiglu(ThreadPool& pool, const float* u, int64_t rows, int64_t n, float limit, float* act) {
  const isa::KernelTable& t = table();
  pool.parallel_for(rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) t.swiglu(u + r * 2 * n, n, limit, act + r * n);
  });
}

void rope_row(float* row, int heads, int head_dim, const float* cos, const float* sin) {
  table().rope(row, heads, head_dim, cos, sin);
}

void add(ThreadPool& pool, float* x, const float* y, int64_t n) {
  const isa::KernelTable& t = table();
  pool.parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) { t.add(x + b, y + b, e - b); });
}

void axpy(float* out, float w, const float* y, int64_t n) { table().axpy(out, w, y, n); }

void bf16_to_f32(const uint16_t* in, int64_t n, float* out) { table().bf16_to_f32(in, n, out); }

void argmax_rows(ThreadPool& pool, const float* x, int64_t rows, int64_t n, int32_t* out) {
  const isa::KernelTable& t = table();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.size(), n / 4096));
  std::vector<int64_t> best(static_cast<size_t>(rows * parts));
  const int64_t per = (n + parts - 1) / parts;
  pool.parallel_for(rows * parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t r = item / parts, p0 = (item % parts) * per, len = std::min(n, p0 + per) - p0;
      best[static_cast<size_t>(item)] = len > 0 ? p0 + t.argmax(x + r * n + p0, len) : -1;
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    int64_t arg = best[static_cast<size_t>(r * parts)];
    for (int64_t p = 1; p < parts; ++p) {
      const int64_t c = best[static_cast<size_t>(r * parts + p)];
      if (c >= 0 && x[r * n + c] > x[r * n + arg]) arg = c;  // earlier parts win ties
    }
    out[r] = static_cast<int32_t>(arg);
  }
}

}  // namespace arbiter::cpu
