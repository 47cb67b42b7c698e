// Which weight rows a GEMV block owns (kernels/cuda/gemv.cu), host and device, so that
// tests/gpu/gemv_rows_test.cc checks the mapping on the host (CI has no GPU).
#pragma once

#if defined(__CUDACC__)
#define ARBITER_GEMV_HD __host__ __device__ __forceinline__
#else
#define ARBITER_GEMV_HD inline
#endif

namespace arbiter::cuda {

// The weight row behind local row r (of R) of a target's block `local_block`. Plain targets: R
// consecutive rows. Rotated targets (RoPE in the epilogue): rows j0 .. j0 + R/2 - 1 of one head and
// their partners half = head_dim / 2 rows later, so that each block holds whole RoPE pairs (i, i + half);
// a head's head_dim rows span head_dim / R blocks (head_dim a multiple of R, R even).
template <int R>
ARBITER_GEMV_HD int gemv_row(int local_block, int r, bool rotated, int head_dim) {
  if (!rotated) return local_block * R + r;
  const int per_head = head_dim / R, half = head_dim / 2;
  const int head = local_block / per_head, j0 = (local_block % per_head) * (R / 2);
  return head * head_dim + (r < R / 2 ? 0 : half) + j0 + r % (R / 2);
}

}  // namespace arbiter::cuda
