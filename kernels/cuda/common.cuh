// Device-side helpers shared by the .cu files of the CUDA backend: bf16 conversions that match the
// host's (round to nearest even), warp reductions, launch-error checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "kernels/cuda/launch.h"

namespace arbiter::cuda {

using bf16 = __nv_bfloat16;

inline void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA kernel ") + what + ": " + cudaGetErrorString(e));
}

// Programmatic dependent launch (PDL; sm_90+, opt-in with ARBITER_CUDA_PDL=1, read once per
// process). Kernels go through launch_kernel(); with PDL on, a kernel may be scheduled while the
// previous one on the stream is still running, so every kernel calls pdl_begin() before it touches
// global memory that another kernel writes (before it: only reads of weights, which nothing writes).
// pdl_begin waits until the previous grid has finished and its writes are visible, then lets the
// next grid be scheduled (it waits in turn). Without PDL both instructions are no-ops.
bool pdl_enabled();  // elementwise.cu

__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Hint: bring a line of read-only data (weights) into L2.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  if (!pdl_enabled()) {
    kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
    return;
  }
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  const cudaError_t e = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA kernel launch (PDL): ") + cudaGetErrorString(e));
}

__device__ __forceinline__ float bf2f(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ bf16 f2bf(float v) { return __float2bfloat16_rn(v); }
__device__ __forceinline__ float bits_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bits_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

__device__ __forceinline__ float load_weight(const void* p, bool is_bf16, int64_t i) {
  return is_bf16 ? bf2f(static_cast<const bf16*>(p)[i]) : static_cast<const float*>(p)[i];
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over a block whose size is a multiple of 32 (at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch /* 32 floats */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(t);
}

// The KV-cache row (block * block_size + slot) that holds position `pos` of the sequence described by
// `info` (StepArgs::seq_info): its full-attention block table, or (window > 0) its sliding ring.
__device__ __forceinline__ int64_t kv_cache_row(const StepArgs& step, const int32_t* info, int pos, int window) {
  const int bs = step.block_size;
  if (window > 0) {
    const int s = pos % (info[kRingCount] * bs);
    return static_cast<int64_t>(step.tables[info[kRingOffset] + s / bs]) * bs + s % bs;
  }
  return static_cast<int64_t>(step.tables[info[kFullOffset] + pos / bs]) * bs + pos % bs;
}

}  // namespace arbiter::cuda
