// The CPU backend's optimized kernels: multithreaded over a ThreadPool and vectorized for the
// instruction set found at run time (AVX-512, AVX2/FMA, or portable C++). Each has a scalar
// twin in reference.h that tests compare it with.
#pragma once

#include <cstdint>

#include "kernels/cpu/thread_pool.h"

namespace arbiter::cpu {

enum class Isa { kPortable, kAvx2, kAvx512 };
Isa detected_isa();   // best the running CPU supports
Isa active_isa();     // what the kernels use now (detected unless overridden)
void set_active_isa(Isa isa);  // tests and benchmarks; clamps to what the CPU supports
const char* isa_name(Isa isa);

// y[r, o] = sum_i x[r, i] * w[o, i] + bias[o] with w bf16 [out, in]; bias may be null.
void linear_bf16(ThreadPool& pool, const float* x, int64_t rows, int64_t in, const uint16_t* w,
                 int64_t out_features, const uint16_t* bias, float* y);
// The same with an MXFP4 matrix (blocks [out, in/32, 16], scales [out, in/32]) and a bf16 bias.
void linear_mxfp4(ThreadPool& pool, const float* x, int64_t rows, int64_t in, const uint8_t* blocks,
                  const uint8_t* scales, int64_t out_features, const uint16_t* bias, float* y);

}  // namespace arbiter::cpu
