// CUDA backend entry points: how many GPUs are visible, and a Backend that runs the gpt-oss forward
// pass on one of them (bf16 activations and KV cache, fp32 accumulation, cuBLASLt for the dense
// products, MXFP4 experts read directly by the MoE kernels). Everything else about the backend is
// private to kernels/cuda; callers go through the Backend interface (kernels/backend.h).
#pragma once

#include <memory>

#include "kernels/backend.h"

namespace arbiter {

// Number of CUDA devices visible to this process; 0 when there is no GPU or no driver.
int cuda_device_count();
// A device-to-device copy enqueued on `stream` (a backend's native stream), and a wait for
// everything enqueued on a stream: thread ranks sharing one GPU exchange with these
// (parallel/thread_comm.h). Throw std::runtime_error on a CUDA error.
void cuda_copy_on_stream(void* dst, const void* src, size_t bytes, void* stream);
void cuda_wait_stream(void* stream);

// A CudaBackend on device `device` (0-based). Throws std::runtime_error if it cannot be created.
std::unique_ptr<Backend> make_cuda_backend(int device);

}  // namespace arbiter
