#include "runtime/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

namespace arbiter {
namespace {

using nlohmann::json;

[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw std::runtime_error(source + ": " + what);
}

bool parse_dtype(const std::string& s, DType& out) {
  if (s == "F32") out = DType::kF32;
  else if (s == "BF16") out = DType::kBF16;
  else if (s == "U8") out = DType::kU8;
  else if (s == "I32") out = DType::kI32;
  else return false;
  return true;
}

}  // namespace

MappedFile::MappedFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail(path, std::string("cannot stat: ") + std::strerror(errno));
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      fail(path, std::string("cannot mmap: ") + std::strerror(errno));
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

bool MappedFile::contains(const void* p, size_t n) const {
  const auto* b = static_cast<const uint8_t*>(p);
  return data_ && b >= data_ && n <= size_ && static_cast<size_t>(b - data_) <= size_ - n;
}

void MappedFile::release_pages(const void* p, size_t n) const {
  if (!contains(p, n)) return;
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const auto end = (reinterpret_cast<uintptr_t>(p) + n) / page * page;
  if (end <= begin) return;
  void* first = reinterpret_cast<void*>(begin);
  (void)::madvise(first, end - begin, MADV_COLD);
  (void)::madvise(first, end - begin, MADV_DONTNEED);
}

std::vector<TensorInfo> parse_safetensors_header(const std::string& header_json, uint64_t data_size,
                                                 const std::string& source) {
  json j;
  try {
    j = json::parse(header_json);
  } catch (const json::exception& e) {
    fail(source, std::string("malformed safetensors header JSON: ") + e.what());
  }
  if (!j.is_object()) fail(source, "safetensors header must be a JSON object");
  std::vector<TensorInfo> out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object() && !it->is_null()) fail(source, "__metadata__ must be an object");
      continue;
    }
    const std::string where = "tensor '" + it.key() + "': ";
    const json& e = *it;
    if (!e.is_object()) fail(source, where + "entry must be an object");
    auto d = e.find("dtype"), s = e.find("shape"), o = e.find("data_offsets");
    if (d == e.end() || !d->is_string()) fail(source, where + "missing or non-string dtype");
    if (s == e.end() || !s->is_array()) fail(source, where + "missing or non-array shape");
    if (o == e.end() || !o->is_array() || o->size() != 2) fail(source, where + "data_offsets must be [begin, end]");
    TensorInfo info;
    info.name = it.key();
    if (!parse_dtype(d->get<std::string>(), info.dtype))
      fail(source, where + "unsupported dtype " + d->get<std::string>() + " (expected F32, BF16, U8 or I32)");
    if (s->size() > 4) fail(source, where + "more than 4 dimensions");
    uint64_t elements = 1;
    for (const auto& dim : *s) {
      if (!dim.is_number_unsigned()) fail(source, where + "shape entries must be non-negative integers");
      const uint64_t v = dim.get<uint64_t>();
      if (v > (1ull << 40) || (v && elements > (1ull << 48) / v)) fail(source, where + "shape too large");
      elements *= v;
      info.shape.dims[static_cast<size_t>(info.shape.rank++)] = static_cast<int64_t>(v);
    }
    for (const auto& off : *o)
      if (!off.is_number_unsigned()) fail(source, where + "data_offsets must be non-negative integers");
    info.begin = (*o)[0].get<uint64_t>();
    info.end = (*o)[1].get<uint64_t>();
    if (info.begin > info.end) fail(source, where + "data_offsets begin after end");
    if (info.end > data_size)
      fail(source, where + "data_offsets end " + std::to_string(info.end) + " past the end of the data (" +
                       std::to_string(data_size) + " bytes; file truncated?)");
    if (info.end - info.begin != elements * dtype_size(info.dtype))
      fail(source, where + "byte size " + std::to_string(info.end - info.begin) + " does not match shape " +
                       info.shape.str() + " of " + dtype_name(info.dtype));
    out.push_back(std::move(info));
  }
  return out;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(std::make_unique<MappedFile>(path)) {
  const size_t size = file_->size();
  if (size < 8) fail(path, "file too short for a safetensors header (" + std::to_string(size) + " bytes)");
  uint64_t header_len = 0;
  std::memcpy(&header_len, file_->data(), 8);  // little-endian on every supported host
  if (header_len > size - 8)
    fail(path, "header length " + std::to_string(header_len) + " runs past the end of the file (" +
                   std::to_string(size) + " bytes)");
  const std::string header(reinterpret_cast<const char*>(file_->data() + 8), header_len);
  data_section_ = file_->data() + 8 + header_len;
  for (auto& info : parse_safetensors_header(header, size - 8 - header_len, path)) {
    std::string name = info.name;
    tensors_.emplace(std::move(name), std::move(info));
  }
}

Tensor SafetensorsFile::view(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail(path(), "no tensor '" + name + "'");
  const TensorInfo& info = it->second;
  return Tensor{const_cast<uint8_t*>(data_section_ + info.begin), info.dtype, info.shape};
}

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
  namespace fs = std::filesystem;
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  std::vector<std::string> shard_names;
  if (fs::exists(index)) {
    std::ifstream in(index);
    std::stringstream ss;
    ss << in.rdbuf();
    json j;
    try {
      j = json::parse(ss.str());
    } catch (const json::exception& e) {
      fail(index.string(), std::string("malformed JSON: ") + e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail(index.string(), "missing weight_map object");
    std::map<std::string, std::string> wanted;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it->is_string()) fail(index.string(), "weight_map entry '" + it.key() + "' is not a file name");
      const std::string file = it->get<std::string>();
      if (file.find('/') != std::string::npos || file == "..")
        fail(index.string(), "weight_map entry '" + it.key() + "' names a path outside the folder: " + file);
      wanted[it.key()] = file;
      if (std::find(shard_names.begin(), shard_names.end(), file) == shard_names.end()) shard_names.push_back(file);
    }
    std::map<std::string, size_t> file_index;
    for (const auto& name : shard_names) {
      file_index[name] = files_.size();
      files_.push_back(std::make_unique<SafetensorsFile>((fs::path(dir) / name).string()));
    }
    for (const auto& [tensor, file] : wanted) {
      const size_t fi = file_index[file];
      if (!files_[fi]->contains(tensor))
        fail(files_[fi]->path(), "tensor '" + tensor + "' listed in the index is not in this shard");
      location_[tensor] = fi;
    }
  } else if (fs::exists(single)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single.string()));
    for (const auto& [name, info] : files_[0]->tensors()) location_[name] = 0;
  } else {
    fail(dir, "no model.safetensors or model.safetensors.index.json");
  }
}

const std::string& Checkpoint::file_of(const std::string& name) const {
  auto it = location_.find(name);
  if (it == location_.end()) fail(dir_, "missing tensor '" + name + "'");
  return files_[it->second]->path();
}

const TensorInfo& Checkpoint::info(const std::string& name) const {
  auto it = location_.find(name);
  if (it == location_.end()) fail(dir_, "missing tensor '" + name + "'");
  return files_[it->second]->tensors().at(name);
}

Tensor Checkpoint::get_any(const std::string& name, std::initializer_list<DType> dtypes, const Shape& shape) const {
  const TensorInfo& i = info(name);
  bool dtype_ok = false;
  std::string expected;
  for (DType d : dtypes) {
    dtype_ok |= d == i.dtype;
    expected += (expected.empty() ? "" : " or ") + std::string(dtype_name(d));
  }
  const std::string& file = file_of(name);
  if (!dtype_ok)
    fail(file, "tensor '" + name + "' has dtype " + dtype_name(i.dtype) + ", expected " + expected);
  if (!(i.shape == shape))
    fail(file, "tensor '" + name + "' has shape " + i.shape.str() + ", expected " + shape.str());
  return files_[location_.at(name)]->view(name);
}

void Checkpoint::release_pages(const Tensor& view) const {
  for (const auto& f : files_) f->release_pages(view.data, view.bytes());
}

Tensor Checkpoint::get(const std::string& name, DType dtype, const Shape& shape) const {
  return get_any(name, {dtype}, shape);
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : location_) out.push_back(name);
  return out;
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors) {
  json header = json::object();
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    const uint64_t bytes = static_cast<uint64_t>(t.shape.elements()) * dtype_size(t.dtype);
    json shape = json::array();
    for (int i = 0; i < t.shape.rank; ++i) shape.push_back(t.shape[i]);
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  while ((text.size() + 8) % 8) text.push_back(' ');  // keep the data section 8-byte aligned
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail(path, "cannot create");
  const uint64_t len = text.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& t : tensors)
    out.write(static_cast<const char*>(t.data),
              static_cast<std::streamsize>(static_cast<uint64_t>(t.shape.elements()) * dtype_size(t.dtype)));
  if (!out) fail(path, "write failed (disk full?)");
}

}  // namespace arbiter
