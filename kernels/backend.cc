#include "kernels/backend.h"

#include <stdexcept>

#include "kernels/cpu/cpu_backend.h"
#if ARBITER_WITH_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace arbiter {

bool cuda_available() {
#if ARBITER_WITH_CUDA
  return cuda_device_count() > 0;
#else
  return false;
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return std::make_unique<CpuBackend>();
  if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
#if ARBITER_WITH_CUDA
    int index = 0;
    if (device.size() > 5) {
      try {
        index = std::stoi(device.substr(5));
      } catch (const std::exception&) {
        throw std::runtime_error("bad device '" + device + "': expected cuda:N");
      }
    }
    if (cuda_device_count() <= index)
      throw std::runtime_error("device '" + device + "': no such GPU (" + std::to_string(cuda_device_count()) +
                               " visible)");
    return make_cuda_backend(index);
#else
    throw std::runtime_error("device '" + device + "': this build has no CUDA support (configure with nvcc present)");
#endif
  }
  if (device == "auto") return make_backend(cuda_available() ? "cuda" : "cpu");
  throw std::runtime_error("unknown device '" + device + "' (expected auto, cpu, cuda or cuda:N)");
}

}  // namespace arbiter
