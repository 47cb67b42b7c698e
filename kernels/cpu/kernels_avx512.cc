// AVX-512 (F, BW, VL, DQ) build of the CPU kernels: 16 fp32 lanes, 64-wide GEMM panels, MXFP4
// decoded with one vpermps per 16 codes. This file alone is compiled with AVX-512 flags and is
// only entered after the dispatcher has checked the CPU supports it.
#if defined(__x86_64__)

// GCC 12's AVX-512 intrinsics initialise their "undefined" pass-through operands from themselves,
// which -Wmaybe-uninitialized reports at every inlined use; the values are never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstdint>

#include "kernels/cpu/kernels_isa.h"

namespace arbiter::cpu::isa {
namespace avx512_impl {

struct S {
  static constexpr int W = 16;
  static constexpr int kGemmNV = 4;    // NR = 64 output features per panel
  static constexpr int kGemmMR = 6;    // 6 x 4 accumulators
  static constexpr int kGemmKC = 128;  // 128 x 64 fp32 panel = 32 KiB (L1)
  static constexpr int kGemmTN = 6;     // MXFP4 GEMM: weight rows x token vectors per chunk
  static constexpr int kGemmTV = 4;
  static constexpr int kScoreQ = 8;
  static constexpr int kScoreC = 2;
  static constexpr int kPvQ = 4;
  // One-row MXFP4 block at a time: nibble groups run 1.6x faster from L2 here but 0.73x streaming
  // from memory (kernels_simd.h, mxfp4_matvec_row).
  static constexpr bool kNibbleRows = false;
  using V = __m512;

  static __mmask16 mask(int n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store_n(float* p, V v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

  static V bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V bf16_n(const uint16_t* p, int n) {
    const __m256i h = _mm256_maskz_loadu_epi16(mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }

  // 32 bf16 -> the 16 even and the 16 odd elements as fp32, without widening shuffles.
  static void bf16_pair(const uint16_t* p, V& even, V& odd) {
    const __m512i v = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  // 16 code bytes, one per 32-bit lane (carried in a float vector), and their two FP4 values.
  static V load_codes(const uint8_t* b) {
    return _mm512_castsi512_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))));
  }
  static V fp4_lo(V c) { return _mm512_permutexvar_ps(_mm512_castps_si512(c), _mm512_loadu_ps(kFp4Values)); }
  static V fp4_hi(V c) {
    return _mm512_permutexvar_ps(_mm512_srli_epi32(_mm512_castps_si512(c), 4), _mm512_loadu_ps(kFp4Values));
  }

  static void transpose(V* r) {
    V t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    V u[16];
    for (int i = 0; i < 4; ++i) {
      const __m512d a0 = _mm512_castps_pd(t[4 * i]), a1 = _mm512_castps_pd(t[4 * i + 1]);
      const __m512d b0 = _mm512_castps_pd(t[4 * i + 2]), b1 = _mm512_castps_pd(t[4 * i + 3]);
      u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, b0));
      u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, b0));
      u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, b1));
      u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, b1));
    }
    // u[4i + j], 128-bit lane L: rows 4i..4i+3 of column j + 4L.
    for (int j = 0; j < 4; ++j) {
      const V v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
      const V v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88), v3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
      r[j] = _mm512_shuffle_f32x4(v0, v2, 0x88);
      r[j + 8] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
      r[j + 4] = _mm512_shuffle_f32x4(v1, v3, 0x88);
      r[j + 12] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
  }

  // even/odd lanes of the 32 floats a:b.
  static void deinterleave(V a, V b, V& even, V& odd) {
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    even = _mm512_permutex2var_ps(a, ie, b);
    odd = _mm512_permutex2var_ps(a, io, b);
  }

  // Lanes whose index i satisfies lo <= i <= hi keep s; the others become -inf.
  static V select_range(V s, float lo, float hi) {
    const V iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __mmask16 m = _mm512_cmp_ps_mask(iota, set1(lo), _CMP_GE_OQ) & _mm512_cmp_ps_mask(iota, set1(hi), _CMP_LE_OQ);
    return _mm512_mask_blend_ps(m, set1(-__builtin_huge_valf()), s);
  }

  // e^x to about 1 ulp (Cephes-style reduction and polynomial); 0 below -87.3, inf above 88.7.
  static V exp(V x) {
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, set1(-87.33654f), _CMP_LT_OQ);
    x = _mm512_min_ps(x, set1(88.72283f));
    const V fx = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(fx, set1(0.693359375f), x);
    r = _mm512_fnmadd_ps(fx, set1(-2.12194440e-4f), r);
    V p = set1(1.9875691500e-4f);
    p = fma(p, r, set1(1.3981999507e-3f));
    p = fma(p, r, set1(8.3334519073e-3f));
    p = fma(p, r, set1(4.1665795894e-2f));
    p = fma(p, r, set1(1.6666665459e-1f));
    p = fma(p, r, set1(5.0000001201e-1f));
    V y = fma(p, mul(r, r), r);
    y = add(y, set1(1.0f));
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(y, fx));
  }
  static float exp1(float x) { return __builtin_expf(x); }
  static float sqrt1(float x) { return __builtin_sqrtf(x); }
};

#include "kernels/cpu/kernels_simd.h"

}  // namespace avx512_impl

const KernelTable& avx512_kernels() {
  static constexpr KernelTable table = avx512_impl::make_table("avx512");
  return table;
}

}  // namespace arbiter::cpu::isa

#else  // not x86-64: never selected (detected_isa() says portable); keep the symbol.

#include "kernels/cpu/kernels_isa.h"

namespace arbiter::cpu::isa {
const KernelTable& avx512_kernels() { return portable_kernels(); }
}  // namespace arbiter::cpu::isa

#endif
