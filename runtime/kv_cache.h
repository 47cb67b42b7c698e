// The paged KV cache: per layer a pool of fixed-size blocks, addressed through block tables that
// the caller (a scheduler, or LocalSequence for single-process use) owns. Full-attention layers
// grow a block per block_size tokens; sliding-window layers use a fixed ring of
// ceil(window / block_size) blocks per sequence, so they keep no more than the window.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "runtime/config.h"

namespace arbiter {

struct KvCacheOptions {
  int block_size = 16;
  int full_blocks = 256;     // pool size shared by all sequences, per full-attention layer
  int sliding_blocks = 256;  // pool size per sliding-window layer
};

class KvCache {
 public:
  KvCache(Backend& backend, const ModelConfig& config, const KvCacheOptions& options);
  // The bytes the constructor allocates (each pool rounded up as an arena allocation, see
  // kernels/device_arena.h), for Backend::reserve.
  static size_t reserve_bytes(DType kv_dtype, const ModelConfig& config, const KvCacheOptions& options);
  const KvLayer& layer(int index) const { return layers_[static_cast<size_t>(index)]; }
  const KvCacheOptions& options() const { return options_; }
  int ring_blocks_per_sequence() const { return ring_blocks_; }

 private:
  KvCacheOptions options_;
  int ring_blocks_ = 0;
  std::vector<DeviceBuffer> buffers_;
  std::vector<KvLayer> layers_;
};

// A free list of block ids [0, count).
class BlockAllocator {
 public:
  explicit BlockAllocator(int count);
  // Throws std::runtime_error when no block is free.
  int32_t allocate();
  void release(int32_t block);
  int free_blocks() const { return static_cast<int>(free_.size()); }

 private:
  std::vector<int32_t> free_;
  std::vector<bool> in_use_;
};

}  // namespace arbiter
