// RoPE on the device, shared by the rope kernel (elementwise.cu) and the q/k GEMV epilogue
// (gemv.cu), so that the fused and the separate paths give the same bits.
#pragma once

#include "kernels/cuda/common.cuh"

namespace arbiter::cuda {

// cos and sin (times the concentration) of frequency i at position `pos`: the table's row when the
// position is inside it (the host's exact values), else computed.
__device__ __forceinline__ void rope_cos_sin(const RopeArgs& rope, int pos, int i, float& c, float& s) {
  if (pos >= 0 && pos < rope.table_rows) {
    c = __ldg(rope.table + static_cast<int64_t>(pos) * 2 * rope.half + i);
    s = __ldg(rope.table + static_cast<int64_t>(pos) * 2 * rope.half + rope.half + i);
  } else {
    sincosf(static_cast<float>(pos) * rope.inv_freq[i], &s, &c);
    c *= rope.concentration;
    s *= rope.concentration;
  }
}

// The pair (a, b) = (x[i], x[i + half]) rotated, each product and sum rounded once (no contraction
// into fused multiply-adds, so every caller gets the same bits).
__device__ __forceinline__ void rope_rotate(float a, float b, float c, float s, bf16& out_a, bf16& out_b) {
  out_a = f2bf(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
  out_b = f2bf(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
}

}  // namespace arbiter::cuda
