// The MoE router's top-k + softmax of one row, run by one warp; shared by the router kernel
// (elementwise.cu) and the router GEMV's last block (gemv.cu), so both give the same bits.
#pragma once

#include <cfloat>
#include <cstdint>

#include "kernels/cuda/common.cuh"

namespace arbiter::cuda {

constexpr int kMaxExpertWords = 8;  // up to 32 * 32 * 8 = 8192 experts

// The k largest of logits[0, experts) (ties to the lowest expert index, like the CPU reference) and
// their softmax over the k: ids[j], weights[j] for j < k (k <= 32). Every lane of the warp calls it.
// The logits are read through L2 (they may have been written by other blocks of the same grid).
__device__ inline void router_topk_row(const float* logits, int experts, int k, int32_t* ids, float* weights) {
  const int lane = threadIdx.x & 31;
  uint32_t taken[kMaxExpertWords] = {};
  float my_value = -FLT_MAX;
  int my_id = 0;
  for (int j = 0; j < k; ++j) {
    float best = -INFINITY;
    int best_id = INT32_MAX;
    for (int w = 0; w < kMaxExpertWords; ++w) {
#pragma unroll 4
      for (int b = 0; b < 32; ++b) {
        const int e = (w * 32 + b) * 32 + lane;
        if (e >= experts) break;
        if (taken[w] & (1u << b)) continue;
        const float v = __ldcg(logits + e);
        if (best_id == INT32_MAX || v > best) {
          best = v;
          best_id = e;
        }
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_id, o);
      if (oi != INT32_MAX && (best_id == INT32_MAX || ov > best || (ov == best && oi < best_id))) {
        best = ov;
        best_id = oi;
      }
    }
    if (best_id % 32 == lane) {
      const int slot = best_id / 32;
      taken[slot / 32] |= 1u << (slot % 32);
    }
    if (lane == j) {
      my_value = best;
      my_id = best_id;
    }
  }
  const float max = __shfl_sync(0xffffffffu, my_value, 0);
  const float e = lane < k ? expf(my_value - max) : 0.0f;
  const float sum = warp_sum(e);
  if (lane < k) {
    ids[lane] = my_id;
    weights[lane] = e / sum;
  }
}

}  // namespace arbiter::cuda
