#include "runtime/kv_cache.h"

#include <stdexcept>

#include "kernels/device_arena.h"

namespace arbiter {

namespace {

void check_options(const KvCacheOptions& o) {
  if (o.block_size <= 0 || o.full_blocks <= 0 || o.sliding_blocks <= 0)
    throw std::invalid_argument("KvCache: block size and pool sizes must be positive");
}

// Layer i's pool shape: [blocks, block_size, kv_heads, head_dim] (both k and v).
Shape pool_shape(const ModelConfig& c, const KvCacheOptions& o, int i) {
  const int64_t blocks = c.layer_is_sliding[static_cast<size_t>(i)] ? o.sliding_blocks : o.full_blocks;
  return Shape{blocks, o.block_size, c.num_key_value_heads, c.head_dim};
}

}  // namespace

KvCache::KvCache(Backend& backend, const ModelConfig& c, const KvCacheOptions& o) : options_(o) {
  check_options(o);
  ring_blocks_ = (c.sliding_window + o.block_size - 1) / o.block_size;
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const Shape shape = pool_shape(c, o, i);
    const size_t bytes = static_cast<size_t>(shape.elements()) * dtype_size(backend.kv_dtype());
    KvLayer layer;
    buffers_.push_back(backend.allocate(bytes));
    layer.k = buffers_.back().view(backend.kv_dtype(), shape);
    buffers_.push_back(backend.allocate(bytes));
    layer.v = buffers_.back().view(backend.kv_dtype(), shape);
    layers_.push_back(layer);
  }
}

size_t KvCache::reserve_bytes(DType kv_dtype, const ModelConfig& c, const KvCacheOptions& o) {
  check_options(o);
  size_t total = 0;
  for (int i = 0; i < c.num_hidden_layers; ++i)
    total += 2 * device_arena_bytes(static_cast<size_t>(pool_shape(c, o, i).elements()) * dtype_size(kv_dtype));
  return total;
}

BlockAllocator::BlockAllocator(int count) : in_use_(static_cast<size_t>(count), false) {
  for (int i = count - 1; i >= 0; --i) free_.push_back(i);
}

int32_t BlockAllocator::allocate() {
  if (free_.empty()) throw std::runtime_error("KV cache out of blocks");
  const int32_t b = free_.back();
  free_.pop_back();
  in_use_[static_cast<size_t>(b)] = true;
  return b;
}

void BlockAllocator::release(int32_t block) {
  if (block < 0 || static_cast<size_t>(block) >= in_use_.size() || !in_use_[static_cast<size_t>(block)])
    throw std::logic_error("BlockAllocator: releasing a block that is not in use");
  in_use_[static_cast<size_t>(block)] = false;
  free_.push_back(block);
}

}  // namespace arbiter
