// Helpers for tests and benchmarks of the CUDA backend: deterministic pseudo-random fills of device
// tensors (so that large random models need no host memory or files). Not used by the runtime.
#pragma once

#include <cstdint>

#include "kernels/tensor.h"

namespace arbiter {

// bf16 tensor: roughly normal values, mean `offset`, standard deviation `scale`. Synchronizes.
void cuda_fill_random_bf16(const Tensor& t, uint64_t seed, float scale, float offset = 0.0f);
// u8 tensor: uniform bytes in [lo, hi]. Synchronizes.
void cuda_fill_random_u8(const Tensor& t, uint64_t seed, int lo, int hi);

}  // namespace arbiter
