// Tensor: a non-owning, typed view of memory that belongs to one backend (host memory for the CPU
// backend, device memory for CUDA). DeviceBuffer: owned backend memory, freed by RAII.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>

namespace arbiter {

enum class DType : uint8_t { kF32, kBF16, kU8, kI32 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);

// Up to four dimensions, row-major, contiguous.
struct Shape {
  std::array<int64_t, 4> dims{};
  int rank = 0;

  Shape() = default;
  Shape(std::initializer_list<int64_t> list);
  int64_t operator[](int i) const { return dims[static_cast<size_t>(i)]; }
  int64_t elements() const;
  bool operator==(const Shape& other) const;
  std::string str() const;  // "[a, b, c]"
};

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Shape shape;

  int64_t elements() const { return shape.elements(); }
  size_t bytes() const { return static_cast<size_t>(elements()) * dtype_size(dtype); }
  int64_t rows() const { return shape.rank == 0 ? 1 : shape[0]; }
  int64_t row_elements() const { return shape.rank <= 1 ? elements() : elements() / shape[0]; }
  template <typename T> T* as() const { return static_cast<T*>(data); }
  // Rows [first, first + count) of a tensor whose first dimension is rows.
  Tensor slice_rows(int64_t first, int64_t count) const;
  Tensor reshaped(Shape new_shape) const;
};

// Memory owned by a backend. Move-only; the deleter returns it to its backend.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(void* data, size_t bytes, std::function<void(void*)> deleter)
      : data_(data), bytes_(bytes), deleter_(std::move(deleter)) {}
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { swap(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    DeviceBuffer tmp(std::move(other));
    swap(tmp);
    return *this;
  }
  ~DeviceBuffer() {
    if (data_ && deleter_) deleter_(data_);
  }
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Tensor view(DType dtype, Shape shape) const;

 private:
  void swap(DeviceBuffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(bytes_, other.bytes_);
    std::swap(deleter_, other.deleter_);
  }
  void* data_ = nullptr;
  size_t bytes_ = 0;
  std::function<void(void*)> deleter_;
};

// bf16 <-> f32 conversions (round to nearest even), shared by every host-side path.
inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace arbiter
