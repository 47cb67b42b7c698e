// Helpers for tests and benchmarks of the CUDA backend: deterministic pseudo-random fills of device
// tensors (so that large random models need no host memory or files), and the state of a backend's
// device arena. Not used by the runtime.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/backend.h"
#include "kernels/tensor.h"

namespace arbiter {

// A CUDA backend's reserved device memory (Backend::reserve), summed over its regions.
struct CudaArenaStats {
  size_t regions = 0;            // reserve() calls that took memory
  size_t capacity = 0;           // bytes in all regions
  size_t bytes_in_use = 0;       // bytes handed out and not yet freed
  size_t peak_bytes_in_use = 0;  // sum of each region's peak
  size_t live_allocations = 0;
  // Allocations (allocate, import_weight, MoE workspace) made after a reserve() that did not fit
  // the reserved regions and got their own cudaMalloc: 0 when reserve() covered everything.
  size_t arena_overflow_allocations = 0;
};
// Throws std::invalid_argument when `backend` is not a CUDA backend (e.g. a wrapper around one).
CudaArenaStats cuda_arena_stats(const Backend& backend);

// What a CUDA backend's recorded steps (Backend::run_step) did so far: steps recorded as CUDA graphs,
// replays of a recording, and recordings that failed (the step then ran directly).
struct CudaGraphStats {
  size_t recorded = 0;
  size_t replayed = 0;
  size_t failed = 0;
};
// Throws std::invalid_argument when `backend` is not a CUDA backend.
CudaGraphStats cuda_graph_stats(const Backend& backend);

// bf16 tensor: roughly normal values, mean `offset`, standard deviation `scale`. Synchronizes.
void cuda_fill_random_bf16(const Tensor& t, uint64_t seed, float scale, float offset = 0.0f);
// u8 tensor: uniform bytes in [lo, hi]. Synchronizes.
void cuda_fill_random_u8(const Tensor& t, uint64_t seed, int lo, int hi);

}  // namespace arbiter
