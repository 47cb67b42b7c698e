// Helpers for the GPU test suites: skipping without a GPU, the golden folder (overridable at run time
// with the ARBITER_GOLDEN_DIR environment variable, since a GPU machine may get only a packed copy),
// paired CPU/GPU tensors holding the same (bf16-rounded) values, and error measures.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"

#define ARBITER_SKIP_WITHOUT_GPU()                                                            \
  do {                                                                                        \
    if (!::arbiter::cuda_available()) GTEST_SKIP() << "no CUDA GPU visible: GPU test skipped"; \
  } while (0)

namespace arbiter::gpu_testing {

inline std::string golden_dir() {
  if (const char* env = std::getenv("ARBITER_GOLDEN_DIR"); env && *env) return env;
  return ARBITER_GOLDEN_DIR;
}

struct GoldenCase {
  std::string name, dir;
  std::vector<int32_t> tokens, greedy;
  double min_top2_margin = 0;
};

inline std::vector<GoldenCase> golden_cases() {
  std::vector<GoldenCase> cases;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(golden_dir(), ec)) {
    const auto file = e.path() / "case.json";
    if (!std::filesystem::exists(file)) continue;
    std::ifstream in(file);
    const auto j = nlohmann::json::parse(in);
    GoldenCase g;
    g.name = e.path().filename().string();
    g.dir = e.path().string();
    g.tokens = j.at("tokens").get<std::vector<int32_t>>();
    g.greedy = j.at("greedy_continuation").get<std::vector<int32_t>>();
    g.min_top2_margin = j.value("min_top2_margin", 0.0);
    cases.push_back(std::move(g));
  }
  std::sort(cases.begin(), cases.end(), [](const GoldenCase& a, const GoldenCase& b) { return a.name < b.name; });
  return cases;
}

inline float bf16_round(float v) { return bf16_to_f32(f32_to_bf16(v)); }

inline std::vector<float> random_values(size_t n, std::mt19937& rng, float scale = 1.0f, float offset = 0.0f) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = bf16_round(offset + scale * d(rng));
  return v;
}

inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = f32_to_bf16(v[i]);
  return out;
}

// The same values on both backends: f32 on the CPU, `gpu_dtype` on the GPU (bf16 rounding applied to
// the CPU copy first, so both start from identical numbers).
struct Pair {
  DeviceBuffer cpu_buf, gpu_buf;
  Tensor cpu, gpu;
};

inline Pair paired(Backend& cpu, Backend& gpu, Shape shape, const std::vector<float>& values,
                      DType gpu_dtype = DType::kBF16) {
  Pair p;
  const size_t n = static_cast<size_t>(shape.elements());
  std::vector<float> rounded(values.begin(), values.begin() + static_cast<long>(n));
  if (gpu_dtype == DType::kBF16)
    for (auto& x : rounded) x = bf16_round(x);
  p.cpu_buf = cpu.allocate(n * 4);
  p.cpu = p.cpu_buf.view(DType::kF32, shape);
  cpu.upload(rounded.data(), p.cpu);
  p.gpu_buf = gpu.allocate(n * dtype_size(gpu_dtype));
  p.gpu = p.gpu_buf.view(gpu_dtype, shape);
  if (gpu_dtype == DType::kBF16) {
    const auto h = to_bf16(rounded);
    gpu.upload(h.data(), p.gpu);
  } else {
    gpu.upload(rounded.data(), p.gpu);
  }
  return p;
}

// Raw bytes (ids, u8) identical on both.
template <typename T>
inline Pair raw_paired(Backend& cpu, Backend& gpu, DType dtype, Shape shape, const std::vector<T>& values) {
  Pair p;
  const size_t bytes = static_cast<size_t>(shape.elements()) * dtype_size(dtype);
  p.cpu_buf = cpu.allocate(bytes);
  p.cpu = p.cpu_buf.view(dtype, shape);
  cpu.upload(values.data(), p.cpu);
  p.gpu_buf = gpu.allocate(bytes);
  p.gpu = p.gpu_buf.view(dtype, shape);
  gpu.upload(values.data(), p.gpu);
  return p;
}

inline std::vector<float> read_f32(Backend& b, const Tensor& t) {
  std::vector<float> out(static_cast<size_t>(t.elements()));
  if (t.dtype == DType::kF32) {
    b.download(t, out.data());
  } else {
    std::vector<uint16_t> h(out.size());
    b.download(t, h.data());
    for (size_t i = 0; i < h.size(); ++i) out[i] = bf16_to_f32(h[i]);
  }
  return out;
}

template <typename T>
inline std::vector<T> read_raw(Backend& b, const Tensor& t) {
  std::vector<T> out(t.bytes() / sizeof(T));
  b.download(t, out.data());
  return out;
}

// max |a - b| / max |b| (b is the reference); NaN anywhere gives infinity.
inline double rel_max_error(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double err = 0, ref = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    err = std::max(err, static_cast<double>(std::fabs(a[i] - b[i])));
    ref = std::max(ref, static_cast<double>(std::fabs(b[i])));
  }
  return ref > 0 ? err / ref : err;
}

inline double cosine(const float* a, const float* b, size_t n) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < n; ++i) {
    ab += static_cast<double>(a[i]) * b[i];
    aa += static_cast<double>(a[i]) * a[i];
    bb += static_cast<double>(b[i]) * b[i];
  }
  return aa > 0 && bb > 0 ? ab / std::sqrt(aa * bb) : (aa == bb ? 1.0 : 0.0);
}

inline size_t argmax_of(const float* v, size_t n) { return static_cast<size_t>(std::max_element(v, v + n) - v); }

}  // namespace arbiter::gpu_testing
