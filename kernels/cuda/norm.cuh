// One row of residual add + RMSNorm on the device, shared by the add_rms_norm kernel
// (elementwise.cu) and the o-projection GEMV's last block (gemv.cu), so both give the same bits.
#pragma once

#include "kernels/cuda/common.cuh"

namespace arbiter::cuda {

// residual[base..] += delta[base..] (rounded to bf16); out[base..] = residual * rsqrt(mean square + eps)
// * weight. Every thread of the block takes part (block_sum); blockDim.x a multiple of 32.
// kDeltaFromL2: delta was written by other blocks of the running kernel (read past L1).
template <bool kDeltaFromL2>
__device__ __forceinline__ void add_rms_norm_row(bf16* residual, const bf16* delta, const void* weight, bool weight_bf16,
                                                 float eps, bf16* out, int dim, int64_t base, float* scratch /* 32 */) {
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float d = kDeltaFromL2 ? bf2f(__ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(delta) + base + i)))
                                 : bf2f(delta[base + i]);
    const bf16 r = f2bf(bf2f(residual[base + i]) + d);
    residual[base + i] = r;
    const float v = bf2f(r);
    ss = __fmaf_rn(v, v, ss);
  }
  ss = block_sum(ss, scratch);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
  // Each thread reads back only the elements it wrote above.
  for (int i = threadIdx.x; i < dim; i += blockDim.x)
    out[base + i] = f2bf(bf2f(residual[base + i]) * inv * load_weight(weight, weight_bf16, i));
}

}  // namespace arbiter::cuda
