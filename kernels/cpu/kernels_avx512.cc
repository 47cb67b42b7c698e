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

// ---------------------------------------------------------------------------------------------
// One-row MXFP4 matvec with int8 activations (the opt-in quantized mode), 4 blocks (128 values)
// per step: the 64 code bytes are split into low and high nibbles, each looked up with vpshufb
// into twice its E2M1 magnitude (0..12, exact as unsigned bytes), the activations negated where
// the code's sign bit is set (bit 3 of the byte for the low nibble, bit 7 for the high one), and
// the unsigned x signed byte products summed into one int32 per 4 values: vpdpbusd where the CPU
// has AVX512-VNNI, else vpmaddubsw + vpmaddwd. Each 128-bit lane then holds one block's partial
// sums; it is converted to fp32 once and multiplied by the weight scale times half the
// activation scale of its block. The integer part is exact, so the only error against the fp32
// kernels is the activations' rounding to int8.
inline constexpr int kQ8GroupBlocks = 4;

// vpdpbusd through the assembler, so this file needs no VNNI compiler flag (a flag would let the
// compiler emit VNNI anywhere in it); only reached on CPUs that have the instruction.
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// Adds the dot products of `n` (1..4) blocks of one weight row to acc (16 lanes: block j's four
// partial sums in lanes 4j..4j+3).
template <bool Vnni>
inline __m512 q8_group(const uint8_t* codes, const uint8_t* scales, const int8_t* xq, const float* xs, int n, __m512 acc) {
  __m512i c, xe, xo;
  __m128 xsv;
  uint32_t ws = 0;
  if (n == kQ8GroupBlocks) {
    c = _mm512_loadu_si512(codes);
    xe = _mm512_loadu_si512(xq);
    xo = _mm512_loadu_si512(xq + 64);
    __builtin_memcpy(&ws, scales, 4);
    xsv = _mm_loadu_ps(xs);
  } else {
    const __mmask64 m = (uint64_t{1} << (16 * n)) - 1;
    c = _mm512_maskz_loadu_epi8(m, codes);
    xe = _mm512_maskz_loadu_epi8(m, xq);
    xo = _mm512_maskz_loadu_epi8(m, xq + 16 * n);
    __builtin_memcpy(&ws, scales, static_cast<size_t>(n));
    xsv = _mm_maskz_loadu_ps(static_cast<__mmask8>((1u << n) - 1), xs);  // absent blocks: scale 0
  }
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i twice_magnitude =
      _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, 1, 2, 3, 4, 6, 8, 12));
  const __m512i mlo = _mm512_shuffle_epi8(twice_magnitude, _mm512_and_si512(c, low4));
  const __m512i mhi = _mm512_shuffle_epi8(twice_magnitude, _mm512_and_si512(_mm512_srli_epi16(c, 4), low4));
  const __m512i zero = _mm512_setzero_si512();
  xe = _mm512_mask_sub_epi8(xe, _mm512_test_epi8_mask(c, _mm512_set1_epi8(0x08)), zero, xe);
  xo = _mm512_mask_sub_epi8(xo, _mm512_movepi8_mask(c), zero, xo);
  __m512i dot;
  if constexpr (Vnni) {
    dot = dpbusd(dpbusd(zero, mlo, xe), mhi, xo);
  } else {  // |products| <= 12 * 127: the int16 pair sums cannot saturate
    dot = _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(mlo, xe), _mm512_maddubs_epi16(mhi, xo)),
                            _mm512_set1_epi16(1));
  }
  // Per block: 2^(s - 127) from the E8M0 byte (s = 255 gives infinity, as the reference; s = 0
  // gives 0 instead of 2^-127) times half the activation scale, spread over its four lanes.
  const __m128i s32 = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(static_cast<int>(ws)));
  const __m128 factor = _mm_mul_ps(_mm_castsi128_ps(_mm_slli_epi32(s32, 23)), xsv);
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(factor)), acc);
}

// Weight rows one after another (one sequential stream), two groups per step into two
// accumulators, software prefetch 2 KiB ahead as the fp32 block kernel.
template <bool Vnni>
void mxfp4_q8_rows(const LinearArgs& a, int64_t o_begin, int64_t o_end) {
  const int64_t groups = a.in / 32, whole = groups / kQ8GroupBlocks;
  const int rest = static_cast<int>(groups - whole * kQ8GroupBlocks);
  constexpr int64_t kGroupBytes = 16 * kQ8GroupBlocks;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* b = a.blocks + o * groups * 16;
    const uint8_t* sc = a.scales + o * groups;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t g = 0;
    auto group = [&](int64_t k, int n, __m512 acc) {
      return q8_group<Vnni>(b + k * kGroupBytes, sc + k * kQ8GroupBlocks, a.xq + k * 2 * kGroupBytes,
                            a.xq_half_scales + k * kQ8GroupBlocks, n, acc);
    };
    for (; g + 2 <= whole; g += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(b + g * kGroupBytes) + 2048, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b + g * kGroupBytes) + 2048 + 64, _MM_HINT_T0);
      acc0 = group(g, kQ8GroupBlocks, acc0);
      acc1 = group(g + 1, kQ8GroupBlocks, acc1);
    }
    if (g < whole) acc0 = group(g++, kQ8GroupBlocks, acc0);
    if (rest > 0) acc1 = group(g, rest, acc1);
    a.y[o] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (a.bias ? bf16f(a.bias[o]) : 0.0f);
  }
}

// quantize_q8 with groups of 4 blocks, one block (two vectors) at a time.
void quantize_q8_groups(const float* x, int64_t n, int8_t* q, float* half_scales) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  quantize_q8_blocks(
      x, n, kQ8GroupBlocks, q, half_scales,
      [&](const float* xb) {
        return S::hmax(_mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(xb), abs_mask), _mm512_and_ps(_mm512_loadu_ps(xb + 16), abs_mask)));
      },
      [](const float* xb, float inv, int8_t* even, int8_t* odd) {
        __m512 e, o;
        S::deinterleave(_mm512_loadu_ps(xb), _mm512_loadu_ps(xb + 16), e, o);
        const __m512 vinv = _mm512_set1_ps(inv);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(even), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(e, vinv))));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(odd), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(o, vinv))));
      });
}

constexpr KernelTable make_avx512_table() {
  KernelTable t = make_table("avx512");
  t.q8_group_blocks = kQ8GroupBlocks;
  t.quantize_q8 = quantize_q8_groups;
  t.mxfp4_q8_row = mxfp4_q8_rows<false>;
  t.mxfp4_q8_row_vnni = mxfp4_q8_rows<true>;
  return t;
}

}  // namespace avx512_impl

const KernelTable& avx512_kernels() {
  static constexpr KernelTable table = avx512_impl::make_avx512_table();
  return table;
}

}  // namespace arbiter::cpu::isa

#else  // not x86-64: never selected (detected_isa() says portable); keep the symbol.

#include "kernels/cpu/kernels_isa.h"

namespace arbiter::cpu::isa {
const KernelTable& avx512_kernels() { return portable_kernels(); }
}  // namespace arbiter::cpu::isa

#endif
