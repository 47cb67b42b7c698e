// MXFP4 decoding into bf16 tensor-core operands, and the lane layouts of the MoE kernels' operands
// (kernels/cuda/moe.cu). Host and device: tests/gpu/mxfp4_layout_test.cc runs the same functions on
// the host against an emulation of mma.m16n8k16 and ldmatrix, so the layouts are checked without a GPU.
//
// Decoding: a byte holds two FP4 (E2M1) codes, low nibble first; a 32-bit word holds values 0..7.
// fp4_pair places the codes at bits [15:12] and [31:28] of a word (values 3 and 7; shifting the word
// left by 4*i gives values 3-i and 7-i) into a bf16x2 whose halves are the codes' bit patterns worth
// value * 2^-126 (sign to bit 15, e1 e0 m to bits 8..6; code +-0.5 becomes a bf16 subnormal). An
// exact bf16 product with 2^(s-1) (two factors when s > 128) then gives value * 2^(s-127), the E8M0
// scale applied, with no rounding anywhere.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ARBITER_HD __host__ __device__ __forceinline__
#else
#define ARBITER_HD inline
#endif
#if defined(__CUDA_ARCH__)  // the device pass only: host compilers warn about the pragma
#define ARBITER_UNROLL _Pragma("unroll")
#else
#define ARBITER_UNROLL
#endif

namespace arbiter::cuda::mxfp4 {

ARBITER_HD uint32_t word(const uint4& u, int q) { return q == 0 ? u.x : q == 1 ? u.y : q == 2 ? u.z : u.w; }

// prmt (byte permute) without the sign-replicate mode: byte i of the result is byte (sel >> 4i) & 7
// of the pair {hi: b, lo: a}.
ARBITER_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t both = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((both >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
#endif
}

// The codes at bits [15:12] and [31:28] of q as bf16 bit patterns worth value * 2^-126.
ARBITER_HD uint32_t fp4_pair(uint32_t q) { return (q & 0x80008000u) | ((q & 0x70007000u) >> 6); }

#if !defined(__CUDA_ARCH__)
inline float bf16_bits_to_float(uint32_t h) {
  const uint32_t u = h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bf16_bits(float f) {  // round to nearest even (no NaN inputs here)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
#endif

// Two bf16 products, rounded once (exact for a power-of-two factor unless the result overflows).
ARBITER_HD uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));  // + (-0): no change
  return d;
#else
  const uint32_t lo = float_to_bf16_bits(bf16_bits_to_float(a & 0xffffu) * bf16_bits_to_float(b & 0xffffu));
  const uint32_t hi = float_to_bf16_bits(bf16_bits_to_float(a >> 16) * bf16_bits_to_float(b >> 16));
  return lo | (hi << 16);
#endif
}

// bf16x2 factors for an E8M0 scale s: pattern * factor(s) [* factor2(s) when big(s)] = value * 2^(s-127).
ARBITER_HD uint32_t factor(uint32_t s) {
  const uint32_t e = s <= 128 ? s + 126 : 254;
  return (e << 7) | (e << 23);
}
ARBITER_HD uint32_t factor2(uint32_t s) {
  const uint32_t e = s > 128 ? s - 1 : 127;
  return (e << 7) | (e << 23);
}
ARBITER_HD bool big(uint32_t s) { return s > 128; }

// The four scaled pairs of one word: p[i] = values (3-i, 7-i).
template <bool kBig>
ARBITER_HD void decode_word(uint32_t q, uint32_t f, uint32_t f2, uint32_t (&p)[4]) {
  ARBITER_UNROLL
  for (int i = 0; i < 4; ++i) {
    p[i] = bf16x2_mul(fp4_pair(q << (4 * i)), f);
    if (kBig) p[i] = bf16x2_mul(p[i], f2);
  }
}

// Eight bf16 activations (values 0..7 in natural order) as the pairs decode_word produces for the
// weights: (3,7), (2,6), (1,5), (0,4).
ARBITER_HD void activation_pairs(const uint4& x, uint32_t (&b)[4]) {
  b[0] = byte_perm(x.y, x.w, 0x7632);
  b[1] = byte_perm(x.y, x.w, 0x5410);
  b[2] = byte_perm(x.x, x.z, 0x7632);
  b[3] = byte_perm(x.x, x.z, 0x5410);
}

// decode_word's pairs back in natural order: (0,1) (2,3) (4,5) (6,7).
ARBITER_HD uint4 natural_order(const uint32_t (&p)[4]) {
  return make_uint4(byte_perm(p[3], p[2], 0x5410), byte_perm(p[1], p[0], 0x5410), byte_perm(p[3], p[2], 0x7632),
                    byte_perm(p[1], p[0], 0x7632));
}

// --- Vector path (moe.cu, vec_tile): a warp multiplies 16 weight rows by up to 8 tokens. Lane l has
// MMA rows vec_row(l) and vec_row(l) + 8, group g0 + vec_group(l) of each 4-group step, and token
// (B column) vec_row(l). For the word w of its group, MMA 2w+h takes A = {rows r, r+8} x pairs
// {2h, 2h+1} and B = activation pairs {2h, 2h+1}; its accumulators c0,c1 / c2,c3 are rows r / r+8,
// tokens 2*vec_group(l) and +1.
ARBITER_HD int vec_row(int lane) { return lane >> 2; }
ARBITER_HD int vec_group(int lane) { return lane & 3; }

// --- Tile path (moe.cu, moe_mma_kernel): shared rows of kLd bf16; ldmatrix.x4 addresses (row, column
// within the 16 x 16 A tile at (m0, k0) and the 16 (n) x 16 (k) B tile pair at (n0, k0)).
ARBITER_HD int ldsm_a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
ARBITER_HD int ldsm_a_col(int lane) { return (lane >> 4) * 8; }
ARBITER_HD int ldsm_b_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
ARBITER_HD int ldsm_b_col(int lane) { return ((lane >> 3) & 1) * 8; }

}  // namespace arbiter::cuda::mxfp4
