#include "kernels/cpu/kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>

#include "kernels/cpu/reference.h"
#include "kernels/tensor.h"

namespace arbiter::cpu {
namespace {

std::atomic<Isa> g_active{detected_isa()};

// Portable kernels: plain loops the compiler can vectorize for the baseline target.
void linear_bf16_rows(const float* x, int64_t rows, int64_t in, const uint16_t* w, int64_t o_begin, int64_t o_end,
                      int64_t out_features, const uint16_t* bias, float* y) {
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint16_t* wo = w + o * in;
    const float b = bias ? bf16_to_f32(bias[o]) : 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * in;
      float acc[8] = {};
      int64_t i = 0;
      for (; i + 8 <= in; i += 8)
        for (int l = 0; l < 8; ++l) acc[l] += xr[i + l] * bf16_to_f32(wo[i + l]);
      float sum = 0;
      for (; i < in; ++i) sum += xr[i] * bf16_to_f32(wo[i]);
      for (float a : acc) sum += a;
      y[r * out_features + o] = sum + b;
    }
  }
}

void linear_mxfp4_rows(const float* x, int64_t rows, int64_t in, const uint8_t* blocks, const uint8_t* scales,
                       int64_t o_begin, int64_t o_end, int64_t out_features, const uint16_t* bias, float* y) {
  const int64_t groups = in / 32;
  float wrow[32];
  for (int64_t o = o_begin; o < o_end; ++o) {
    float acc_rows[64];
    for (int64_t r0 = 0; r0 < rows; r0 += 64) {
      const int64_t nr = std::min<int64_t>(64, rows - r0);
      std::fill(acc_rows, acc_rows + nr, 0.0f);
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* b = blocks + (o * groups + g) * 16;
        const float s = ref::e8m0_value(scales[o * groups + g]);
        for (int j = 0; j < 16; ++j) {
          wrow[2 * j] = ref::fp4_value(b[j] & 0xF) * s;
          wrow[2 * j + 1] = ref::fp4_value(b[j] >> 4) * s;
        }
        for (int64_t r = 0; r < nr; ++r) {
          const float* xr = x + (r0 + r) * in + g * 32;
          float acc = 0;
          for (int l = 0; l < 32; ++l) acc += xr[l] * wrow[l];
          acc_rows[r] += acc;
        }
      }
      const float bv = bias ? bf16_to_f32(bias[o]) : 0.0f;
      for (int64_t r = 0; r < nr; ++r) y[(r0 + r) * out_features + o] = acc_rows[r] + bv;
    }
  }
}

}  // namespace

Isa detected_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

Isa active_isa() { return g_active.load(); }

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
                 int64_t out_features, const uint16_t* bias, float* y) {
  pool.parallel_for(out_features, 16, [&](int64_t b, int64_t e) {
    linear_bf16_rows(x, rows, in, w, b, e, out_features, bias, y);
  });
}

void linear_mxfp4(ThreadPool& pool, const float* x, int64_t rows, int64_t in, const uint8_t* blocks,
                  const uint8_t* scales, int64_t out_features, const uint16_t* bias, float* y) {
  pool.parallel_for(out_features, 16, [&](int64_t b, int64_t e) {
    linear_mxfp4_rows(x, rows, in, blocks, scales, b, e, out_features, bias, y);
  });
}

}  // namespace arbiter::cpu
