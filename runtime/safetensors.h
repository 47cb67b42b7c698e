// Safetensors checkpoints, memory-mapped. MappedFile owns one read-only mapping; SafetensorsFile
// parses and checks one file's header; Checkpoint resolves tensor names across a single
// model.safetensors or the shards listed by model.safetensors.index.json.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/tensor.h"

namespace arbiter {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws std::runtime_error naming the path
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Whether [p, p + n) lies inside the mapping.
  bool contains(const void* p, size_t n) const;
  // Unmaps the pages wholly inside [p, p + n) (which must lie inside the mapping) and marks them
  // the first to reclaim (MADV_COLD, then MADV_DONTNEED): they stay in the page cache while memory
  // allows, and under pressure they go before any other page. Clean file pages, so nothing is lost;
  // a later read faults them back in. Errors (a kernel without the advice) are ignored.
  void release_pages(const void* p, size_t n) const;

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

struct TensorInfo {
  std::string name;
  DType dtype = DType::kU8;
  Shape shape;
  uint64_t begin = 0;  // byte offsets into the data section
  uint64_t end = 0;
};

// Parses a safetensors header (the JSON after the 8-byte length) and checks every entry against a
// data section of `data_size` bytes. Throws std::runtime_error starting with `source`.
std::vector<TensorInfo> parse_safetensors_header(const std::string& header_json, uint64_t data_size,
                                                 const std::string& source);

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  const std::string& path() const { return file_->path(); }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // A host view of the tensor's bytes inside the mapping.
  Tensor view(const std::string& name) const;
  void release_pages(const void* p, size_t n) const { file_->release_pages(p, n); }

 private:
  std::unique_ptr<MappedFile> file_;
  const uint8_t* data_section_ = nullptr;
  std::map<std::string, TensorInfo> tensors_;
};

class Checkpoint {
 public:
  // `dir` holds model.safetensors or model.safetensors.index.json (+ shards).
  explicit Checkpoint(const std::string& dir);
  bool contains(const std::string& name) const { return location_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  // Checks dtype and shape and returns a host view; errors name the file and the tensor.
  Tensor get(const std::string& name, DType dtype, const Shape& shape) const;
  // dtype may be any of `dtypes`.
  Tensor get_any(const std::string& name, std::initializer_list<DType> dtypes, const Shape& shape) const;
  const std::string& file_of(const std::string& name) const;
  std::vector<std::string> names() const;
  // After a backend has copied a view's bytes into host memory of its own: releases the pages under
  // the view (MappedFile::release_pages), so that loading a model into copies does not need room for
  // it twice (a 13 GB checkpoint copied on a 24 GB machine otherwise evicts pages still to be
  // copied, and the load reads them from disk again). A no-op for views outside the checkpoint.
  void release_pages(const Tensor& view) const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> location_;
};

// Writes tensors to a safetensors file (used by make-model and tests). Data pointers are host memory.
struct TensorToWrite {
  std::string name;
  DType dtype;
  Shape shape;
  const void* data;
};
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors);

}  // namespace arbiter
