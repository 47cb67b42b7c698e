// AVX2 + FMA build of the CPU kernels: 8 fp32 lanes, 16-wide GEMM panels, MXFP4 decoded with
// vpermps over the 8 magnitudes plus the sign bit. This file alone is compiled with AVX2/FMA
// flags and is only entered after the dispatcher has checked the CPU supports them.
#if defined(__x86_64__)

#include <immintrin.h>

#include <cstdint>

#include "kernels/cpu/kernels_isa.h"

namespace arbiter::cpu::isa {
namespace avx2_impl {

struct S {
  static constexpr int W = 8;
  static constexpr int kGemmNV = 2;    // NR = 16
  static constexpr int kGemmMR = 6;    // 6 x 2 accumulators
  static constexpr int kGemmKC = 256;  // 256 x 16 fp32 panel = 16 KiB
  static constexpr int kGemmTN = 6;     // MXFP4 GEMM: weight rows x token vectors per chunk
  static constexpr int kGemmTV = 2;
  static constexpr int kScoreQ = 4;
  static constexpr int kScoreC = 2;
  static constexpr int kPvQ = 2;
  static constexpr bool kNibbleRows = true;  // one-row MXFP4 in nibble groups (kernels_simd.h)
  using V = __m256;

  static __m256i lane_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V load_n(const float* p, int n) { return _mm256_maskload_ps(p, lane_mask(n)); }
  static void store_n(float* p, V v, int n) { _mm256_maskstore_ps(p, lane_mask(n), v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

  static V bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V bf16_n(const uint16_t* p, int n) {
    uint16_t tmp[8] = {};
    for (int i = 0; i < n && i < 8; ++i) tmp[i] = p[i];
    return bf16(tmp);
  }

  // 16 codes: even[h] = low nibbles of bytes 8h..8h+7, odd[h] = their high nibbles.
  static V decode(__m256i idx) {
    const V mag = _mm256_permutevar8x32_ps(_mm256_loadu_ps(kFp4Values), idx);  // low 3 bits
    const __m256i sign = _mm256_and_si256(_mm256_slli_epi32(idx, 28), _mm256_set1_epi32(static_cast<int>(0x80000000u)));
    return _mm256_xor_ps(mag, _mm256_castsi256_ps(sign));
  }
  static V load_codes(const uint8_t* b) {
    return _mm256_castsi256_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b))));
  }
  static V fp4_lo(V c) { return decode(_mm256_castps_si256(c)); }
  static V fp4_hi(V c) { return decode(_mm256_srli_epi32(_mm256_castps_si256(c), 4)); }
  // A vector load kept in a register when several instructions use it (else GCC folds it into each).
  static V load_pinned(const float* p) {
    V v = _mm256_loadu_ps(p);
    __asm__("" : "+x"(v));
    return v;
  }
  // The one-row MXFP4 kernel's codes: 8 words (2 blocks), every byte looked up once with vpshufb
  // into twice its low and twice its high nibble's value as int8 (0, 1, 2, 3, 4, 6, 8, 12 and their
  // negatives: exact); nibble n of each word is then at most two shifts and a conversion from fp32
  // (the vpermps decode above takes five operations per 8 values). group_scales halves the scale.
  struct NibbleWords {
    __m256i lo, hi;
  };
  static NibbleWords nibble_words(const uint8_t* b) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    const __m256i twice = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,  //
                                           0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    return {_mm256_shuffle_epi8(twice, _mm256_and_si256(c, low4)),
            _mm256_shuffle_epi8(twice, _mm256_and_si256(_mm256_srli_epi16(c, 4), low4))};
  }
  template <int Shift>
  static V fp4_nibble(const NibbleWords& w) {
    constexpr int n = Shift / 4, byte = n / 2;  // nibble n of a word is in byte n / 2
    __m256i v = n % 2 ? w.hi : w.lo;
    if constexpr (byte < 3) v = _mm256_slli_epi32(v, 24 - 8 * byte);
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24));
  }
  // Lanes 0-3: half the scale of the first block, lanes 4-7: of the second (exact: powers of two).
  static V group_scales(const uint8_t* sc) {
    return _mm256_setr_m128(_mm_set1_ps(0.5f * kE8m0.v[sc[0]]), _mm_set1_ps(0.5f * kE8m0.v[sc[1]]));
  }
  static void bf16_pair(const uint16_t* p, V& even, V& odd) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }

  static void transpose(V* r) {
    V t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
      r[j + 4] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
    }
  }

  static void deinterleave(V a, V b, V& even, V& odd) {
    // a = a0..a7, b = b0..b7 -> even = a0 a2 a4 a6 b0 b2 b4 b6 after a cross-lane fix-up.
    const V e = _mm256_shuffle_ps(a, b, 0x88);  // a0 a2 b0 b2 | a4 a6 b4 b6
    const V o = _mm256_shuffle_ps(a, b, 0xDD);  // a1 a3 b1 b3 | a5 a7 b5 b7
    even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8));
    odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8));
  }

  static V select_range(V s, float lo, float hi) {
    const V iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const V keep = _mm256_and_ps(_mm256_cmp_ps(iota, set1(lo), _CMP_GE_OQ), _mm256_cmp_ps(iota, set1(hi), _CMP_LE_OQ));
    return _mm256_blendv_ps(set1(-__builtin_huge_valf()), s, keep);
  }

  static V exp(V x) {
    const V tiny = _mm256_cmp_ps(x, set1(-87.33654f), _CMP_LT_OQ);
    x = _mm256_min_ps(x, set1(88.72283f));
    const V fx = _mm256_round_ps(_mm256_mul_ps(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(fx, set1(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, set1(-2.12194440e-4f), r);
    V p = set1(1.9875691500e-4f);
    p = fma(p, r, set1(1.3981999507e-3f));
    p = fma(p, r, set1(8.3334519073e-3f));
    p = fma(p, r, set1(4.1665795894e-2f));
    p = fma(p, r, set1(1.6666665459e-1f));
    p = fma(p, r, set1(5.0000001201e-1f));
    V y = fma(p, mul(r, r), r);
    y = add(y, set1(1.0f));
    // 2^n built in the exponent field; n = 128 (x near the top) gives the infinity bit pattern.
    const __m256i n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
    y = mul(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
    return _mm256_andnot_ps(tiny, y);
  }
  static float exp1(float x) { return __builtin_expf(x); }
  static float sqrt1(float x) { return __builtin_sqrtf(x); }
};

#include "kernels/cpu/kernels_simd.h"

// ---------------------------------------------------------------------------------------------
// One-row MXFP4 matvec with int8 activations (the opt-in quantized mode), 2 blocks (64 values)
// per step, as llama.cpp's AVX2 path: codes split into nibbles, each looked up with vpshufb into
// twice its E2M1 magnitude (0..12), the activations' signs flipped by the code's sign bit with
// vpsignb, then vpmaddubsw (unsigned x signed byte pairs) and vpmaddwd into int32, converted to
// fp32 once per block and multiplied by the weight scale times half the activation scale.
inline constexpr int kQ8GroupBlocks = 2;

// Adds the dot products of `n` (1 or 2) blocks of one weight row to acc (lanes 0-3: the first
// block, 4-7: the second).
inline __m256 q8_group(const uint8_t* codes, const uint8_t* scales, const int8_t* xq, const float* xs, int n, __m256 acc) {
  __m256i c, xe, xo;
  if (n == kQ8GroupBlocks) {
    c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
    xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
    xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
  } else {
    c = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
    xe = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq)));
    xo = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + 16)));
  }
  const __m256i low4 = _mm256_set1_epi8(0x0F), one8 = _mm256_set1_epi8(1);
  const __m256i twice_magnitude = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, 1, 2, 3, 4, 6, 8, 12,  //
                                                   0, 1, 2, 3, 4, 6, 8, 12, 0, 1, 2, 3, 4, 6, 8, 12);
  const __m256i mlo = _mm256_shuffle_epi8(twice_magnitude, _mm256_and_si256(c, low4));
  const __m256i mhi = _mm256_shuffle_epi8(twice_magnitude, _mm256_and_si256(_mm256_srli_epi16(c, 4), low4));
  // vpsignb by (byte | 1): negate where the byte's top bit is set, keep otherwise (never zero).
  // The low nibble's sign (bit 3) is moved to the top bit by a 4-bit shift.
  xe = _mm256_sign_epi8(xe, _mm256_or_si256(_mm256_slli_epi16(c, 4), one8));
  xo = _mm256_sign_epi8(xo, _mm256_or_si256(c, one8));
  // |products| <= 12 * 127: the int16 pair sums cannot saturate.
  const __m256i dot = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(mlo, xe), _mm256_maddubs_epi16(mhi, xo)),
                                        _mm256_set1_epi16(1));
  const __m256 factor = _mm256_setr_m128(_mm_set1_ps(kE8m0.v[scales[0]] * xs[0]),
                                         _mm_set1_ps(n == kQ8GroupBlocks ? kE8m0.v[scales[1]] * xs[1] : 0.0f));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), factor, acc);
}

// Weight rows one after another (one sequential stream), two groups per step into two accumulators.
void mxfp4_q8_rows(const LinearArgs& a, int64_t o_begin, int64_t o_end) {
  const int64_t groups = a.in / 32, whole = groups / kQ8GroupBlocks;
  const int rest = static_cast<int>(groups - whole * kQ8GroupBlocks);
  constexpr int64_t kGroupBytes = 16 * kQ8GroupBlocks;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* b = a.blocks + o * groups * 16;
    const uint8_t* sc = a.scales + o * groups;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    auto group = [&](int64_t k, int n, __m256 acc) {
      return q8_group(b + k * kGroupBytes, sc + k * kQ8GroupBlocks, a.xq + k * 2 * kGroupBytes,
                      a.xq_half_scales + k * kQ8GroupBlocks, n, acc);
    };
    int64_t g = 0;
    for (; g + 2 <= whole; g += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(b + g * kGroupBytes) + 2048, _MM_HINT_T0);
      acc0 = group(g, kQ8GroupBlocks, acc0);
      acc1 = group(g + 1, kQ8GroupBlocks, acc1);
    }
    if (g < whole) acc0 = group(g++, kQ8GroupBlocks, acc0);
    if (rest > 0) acc1 = group(g, rest, acc1);
    a.y[o] = S::hsum(_mm256_add_ps(acc0, acc1)) + (a.bias ? bf16f(a.bias[o]) : 0.0f);
  }
}

// 16 fp32 (two vectors) times inv, rounded to the nearest integer, as 16 saturated int8 in order.
inline __m128i q8_bytes(__m256 lo, __m256 hi, __m256 inv) {
  const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(lo, inv)), b = _mm256_cvtps_epi32(_mm256_mul_ps(hi, inv));
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // a0..7 b0..7 as int16
  return _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
}

// quantize_q8 with groups of 2 blocks, one block (four vectors) at a time.
void quantize_q8_groups(const float* x, int64_t n, int8_t* q, float* half_scales) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  quantize_q8_blocks(
      x, n, kQ8GroupBlocks, q, half_scales,
      [&](const float* xb) {
        auto mag = [&](int i) { return _mm256_and_ps(_mm256_loadu_ps(xb + i), abs_mask); };
        return S::hmax(_mm256_max_ps(_mm256_max_ps(mag(0), mag(8)), _mm256_max_ps(mag(16), mag(24))));
      },
      [](const float* xb, float inv, int8_t* even, int8_t* odd) {
        __m256 e0, o0, e1, o1;
        S::deinterleave(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8), e0, o0);
        S::deinterleave(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24), e1, o1);
        const __m256 vinv = _mm256_set1_ps(inv);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(even), q8_bytes(e0, e1, vinv));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(odd), q8_bytes(o0, o1, vinv));
      });
}

constexpr KernelTable make_avx2_table() {
  KernelTable t = make_table("avx2");
  t.q8_group_blocks = kQ8GroupBlocks;
  t.quantize_q8 = quantize_q8_groups;
  t.mxfp4_q8_row = mxfp4_q8_rows;
  return t;
}

}  // namespace avx2_impl

const KernelTable& avx2_kernels() {
  static constexpr KernelTable table = avx2_impl::make_avx2_table();
  return table;
}

}  // namespace arbiter::cpu::isa

#else  // not x86-64: never selected (detected_isa() says portable); keep the symbol.

#include "kernels/cpu/kernels_isa.h"

namespace arbiter::cpu::isa {
const KernelTable& avx2_kernels() { return portable_kernels(); }
}  // namespace arbiter::cpu::isa

#endif
