// NumPy .npy files (format 1.0, little-endian float32 or int32, C order): written by
// `arbiter logits`, read by the golden tests.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace arbiter {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

void write_npy_f32(const std::string& path, const std::vector<int64_t>& shape, const float* data);
// Reads a float32 array; throws std::runtime_error naming the file on anything else.
NpyArray read_npy_f32(const std::string& path);

}  // namespace arbiter
