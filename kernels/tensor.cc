#include "kernels/tensor.h"

#include <stdexcept>

namespace arbiter {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kU8: return 1;
    case DType::kI32: return 4;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "F32";
    case DType::kBF16: return "BF16";
    case DType::kU8: return "U8";
    case DType::kI32: return "I32";
  }
  return "?";
}

Shape::Shape(std::initializer_list<int64_t> list) {
  if (list.size() > dims.size()) throw std::invalid_argument("Shape: more than 4 dimensions");
  for (int64_t d : list) dims[static_cast<size_t>(rank++)] = d;
}

int64_t Shape::elements() const {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= dims[static_cast<size_t>(i)];
  return n;
}

bool Shape::operator==(const Shape& other) const {
  if (rank != other.rank) return false;
  for (int i = 0; i < rank; ++i)
    if (dims[static_cast<size_t>(i)] != other.dims[static_cast<size_t>(i)]) return false;
  return true;
}

std::string Shape::str() const {
  std::string s = "[";
  for (int i = 0; i < rank; ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[static_cast<size_t>(i)]);
  }
  return s + "]";
}

Tensor Tensor::slice_rows(int64_t first, int64_t count) const {
  if (first < 0 || count < 0 || first + count > rows()) throw std::out_of_range("Tensor::slice_rows out of range");
  Tensor t = *this;
  t.data = static_cast<char*>(data) + static_cast<size_t>(first * row_elements()) * dtype_size(dtype);
  t.shape.dims[0] = count;
  return t;
}

Tensor Tensor::reshaped(Shape new_shape) const {
  if (new_shape.elements() != elements()) throw std::invalid_argument("Tensor::reshaped: element count differs");
  Tensor t = *this;
  t.shape = new_shape;
  return t;
}

Tensor DeviceBuffer::view(DType dtype, Shape shape) const {
  if (static_cast<size_t>(shape.elements()) * dtype_size(dtype) > bytes_)
    throw std::out_of_range("DeviceBuffer::view larger than the buffer");
  return Tensor{data_, dtype, shape};
}

}  // namespace arbiter
