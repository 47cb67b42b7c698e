// Internal interface between the CPU kernel dispatcher (kernels.cc) and the per-instruction-set
// kernel files (kernels_avx512.cc, kernels_avx2.cc, and the portable build inside kernels.cc).
// Each of those compiles kernels_simd.h for its own vector type and exports one KernelTable; the
// dispatcher picks a table at run time and does the threading. Nothing here allocates: scratch
// memory is handed in by the dispatcher, so the ISA files hold only straight-line compute code.
#pragma once

#include <bit>
#include <cstdint>

namespace arbiter::cpu::isa {

// One y = x W^T + b problem. The kernels compute output features [o_begin, o_end) of every row.
struct LinearArgs {
  // [rows, in]; MXFP4 matvec: de-interleaved per 32-block, or for one row possibly in nibble order
  // (see below)
  const float* x = nullptr;
  int64_t rows = 0;
  int64_t in = 0;
  int64_t out = 0;
  const uint16_t* w = nullptr;       // bf16 [out, in]
  const uint8_t* blocks = nullptr;   // MXFP4 [out, in/32, 16], low nibble = even element
  const uint8_t* scales = nullptr;   // E8M0 [out, in/32]
  const uint16_t* bias = nullptr;    // bf16 [out] or null
  float* y = nullptr;                // [rows, out]
  int64_t xt_chunk = 0;              // MXFP4 GEMM: tokens per x^T chunk (see pack_xt)
  // The int8-activation one-row MXFP4 matvec (the opt-in quantized mode): x quantized by
  // quantize_q8 in the table's q8_group_blocks layout, and half of each 32-block's scale.
  const int8_t* xq = nullptr;
  const float* xq_half_scales = nullptr;
};
// The MXFP4 matvec reads x de-interleaved: within each block of 32, the 16 even elements first,
// then the 16 odd ones (so the low and high nibbles of a byte meet their inputs without shuffles).
void deinterleave32(const float* x, int64_t n, float* out);
// The same with blocks of `block` floats (even); a partial last block is copied unchanged.
void deinterleave(const float* x, int64_t n, int block, float* out);

// The one-row MXFP4 matvec of a build with mxfp4_nibble_rows reads the codes as 32-bit words, `lanes` words (lanes / 4 blocks, 8 x
// lanes values) per group, and nibble n of word i of a group meets out[n * lanes + i]: element
// 8 * (i % 4) + n of the group's block i / 4. Blocks past the last whole group are de-interleaved
// as above. n must be a multiple of 32.
void layout_nibbles(const float* x, int64_t n, int lanes, float* out);

// Int8 activations for the quantized one-row MXFP4 matvec (as llama.cpp's q8_0): per 32-block,
// d = max|x| / 127 and q = round(x / d) in [-127, 127]; half_scales[block] = d / 2 (the kernels
// multiply by the E2M1 codes doubled, which are exact int8: 0, 1, 2, 3, 4, 6, 8, 12 and negatives).
// Blocks go in groups of `group_blocks` (the last group may be shorter): a group of n blocks holds
// the n blocks' 16 even elements (16 n bytes), then their 16 odd ones, so that one load of the
// n blocks' codes meets its activations without shuffles. n must be a multiple of 32. Scalar and
// shared by every instruction set, so all of them see the same quantized values.
void quantize_q8(const float* x, int64_t n, int group_blocks, int8_t* q, float* half_scales);
// The walk over the blocks that quantize_q8 and its vector versions share: per 32-block, d = amax(xb)
// / 127 (amax: the block's largest magnitude), half_scales = d / 2, and quantize(xb, 1 / d or 0,
// even, odd) writes its 16 even and 16 odd elements, rounded, where the layout puts them.
template <typename Amax, typename Quantize>
inline void quantize_q8_blocks(const float* x, int64_t n, int group_blocks, int8_t* q, float* half_scales, Amax amax,
                               Quantize quantize) {
  const int64_t blocks = n / 32;
  for (int64_t g0 = 0; g0 < blocks; g0 += group_blocks) {
    const int64_t nb = blocks - g0 < group_blocks ? blocks - g0 : group_blocks;
    int8_t* even = q + g0 * 32;
    int8_t* odd = even + nb * 16;
    for (int64_t j = 0; j < nb; ++j) {
      const float* xb = x + (g0 + j) * 32;
      const float d = amax(xb) / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
      half_scales[g0 + j] = 0.5f * d;
      quantize(xb, inv, even + j * 16, odd + j * 16);
    }
  }
}

// The MXFP4 GEMM reads x transposed in chunks of `chunk` tokens: chunk c is [in][chunk] with
// xt[c][k'][t] = x[c * chunk + t][k], k' the de-interleaved position of k (as above) and tokens
// past the last row zero.
// pack_xt_blocks writes the rows k' in [k_begin, k_end) (multiples of 32) of every chunk, so the
// packing can be split over threads.
void pack_xt_blocks(const float* x, int64_t rows, int64_t in, int chunk, int64_t k_begin, int64_t k_end, float* xt);

// One attention problem: query vectors that share one kv head and one sequence's keys.
struct AttentionTask {
  int head_dim = 0;
  int num_queries = 0;
  const float* const* q = nullptr;   // [num_queries] -> head_dim floats
  float* const* out = nullptr;       // [num_queries] -> head_dim floats
  const int64_t* q_pos = nullptr;    // [num_queries] position of each query
  const float* sinks = nullptr;      // [num_queries] sink logit of each query's head
  int64_t window = 0;                // 0: causal; w > 0: key k visible to q iff q - w < k <= q
  float scale = 0.0f;
  // keys[j] / values[j] point at the row of the key at position key_base + j; head_offset floats
  // into that row is this task's kv head.
  const float* const* keys = nullptr;
  const float* const* values = nullptr;
  int64_t key_base = 0;
  int64_t head_offset = 0;
};
// Keys per attention block and the scratch (floats) one task needs.
inline constexpr int kAttnKeyBlock = 128;
inline constexpr int kAttnMaxQueries = 64;
inline int64_t attention_scratch_floats(int head_dim, int num_queries) {
  const int64_t padded = (num_queries + 15) / 16 * 16;
  return static_cast<int64_t>(kAttnKeyBlock) * head_dim + padded * kAttnKeyBlock + padded * head_dim +
         2 * padded + 64;
}

struct KernelTable {
  const char* name;
  int gemm_nr;  // output features per GEMM panel; gemm ranges start at multiples of it
  int lanes;    // floats per vector
  int mxfp4_gemm_rows;  // weight rows per MXFP4 GEMM tile
  int xt_chunk;         // most tokens per MXFP4 GEMM tile; x^T chunks are a multiple of lanes up to it
  // The one-row MXFP4 matvec reads x laid out by layout_nibbles(x, in, lanes) (true) or by
  // deinterleave32 (false), whichever kernel the build measured faster.
  bool mxfp4_nibble_rows;
  // x de-interleaved by deinterleave(x, in, 2 * lanes) (its first in / (2 lanes) blocks).
  void (*bf16_matvec)(const LinearArgs&, int64_t o_begin, int64_t o_end);
  void (*bf16_gemm)(const LinearArgs&, int64_t o_begin, int64_t o_end);
  // One row (a.rows == 1): x laid out as mxfp4_nibble_rows says; more rows: by deinterleave32.
  void (*mxfp4_matvec)(const LinearArgs&, int64_t o_begin, int64_t o_end);
  // One row, int8 activations (a.xq, a.xq_half_scales laid out by quantize_q8 with
  // q8_group_blocks); the integer dot product without VNNI, and with it (null where the build has
  // no VNNI variant; the dispatcher uses it only on CPUs that have the instructions).
  int q8_group_blocks;
  // quantize_q8(x, n, q8_group_blocks, q, half_scales), vectorized: the same bytes and scales
  // (the same IEEE operations: a product rounded to fp32, then rounded to the nearest integer).
  void (*quantize_q8)(const float* x, int64_t n, int8_t* q, float* half_scales);
  void (*mxfp4_q8_row)(const LinearArgs&, int64_t o_begin, int64_t o_end);
  void (*mxfp4_q8_row_vnni)(const LinearArgs&, int64_t o_begin, int64_t o_end);
  // x: the activations packed by pack_xt_blocks with chunk a.xt_chunk; o_begin a multiple of
  // mxfp4_gemm_rows.
  void (*mxfp4_gemm)(const LinearArgs&, int64_t o_begin, int64_t o_end);
  // Needs head_dim % lanes == 0; scratch of attention_scratch_floats().
  void (*attention)(const AttentionTask&, float* scratch);
  int attention_lanes;
  // act[j] from interleaved gate/up u[2j], u[2j+1], for n outputs.
  void (*swiglu)(const float* u, int64_t n, float limit, float* act);
  // One row: out = x / sqrt(mean(x^2) + eps) * w.
  void (*rms_norm)(const float* x, int64_t dim, const float* w, float eps, float* out);
  // Rotate-half RoPE of `heads` heads of one row with per-pair cos/sin (already times concentration).
  void (*rope)(float* row, int heads, int head_dim, const float* cos, const float* sin);
  // x[i] += y[i].
  void (*add)(float* x, const float* y, int64_t n);
  // out[i] += w * y[i].
  void (*axpy)(float* out, float w, const float* y, int64_t n);
  // out[i] = bf16 in[i].
  void (*bf16_to_f32)(const uint16_t* in, int64_t n, float* out);
  // Index of the largest of n values, lowest on ties.
  int64_t (*argmax)(const float* x, int64_t n);
};

const KernelTable& portable_kernels();
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();

// FP4 E2M1 code values and E8M0 scales (2^(s-127), exact, s = 0 denormal, s = 255 infinity as in
// the scalar reference), both constant-initialized so no ISA file runs code at start-up.
inline constexpr float kFp4Values[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                         -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
struct E8m0Table {
  float v[256];
};
constexpr E8m0Table make_e8m0_table() {
  E8m0Table t{};
  for (int s = 0; s < 256; ++s) {
    uint32_t bits = s == 0 ? 0x00400000u : s == 255 ? 0x7f800000u : static_cast<uint32_t>(s) << 23;
    t.v[s] = std::bit_cast<float>(bits);
  }
  return t;
}
inline constexpr E8m0Table kE8m0 = make_e8m0_table();

}  // namespace arbiter::cpu::isa
