// HugePageArena: memory for the CPU backend's copies of the model's weights. Chunks of anonymous
// memory aligned to 2 MiB and advised for transparent huge pages (madvise MADV_HUGEPAGE), handed
// out in 64-byte-aligned pieces that live as long as the arena. A batch-1 decode step streams every
// weight once, and over 4 KiB pages a 13 GB model has 24 MB of page tables to walk; in 2 MiB pages
// a 24-layer batch-1 decode step ran at 10.1-11.2 tokens/s against 8.4-9.1 from the checkpoint's
// mapping on the 2-core Zen 5 VM (docs/performance.md). Where the kernel gives no huge pages the
// memory is ordinary.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

namespace arbiter::cpu {

class HugePageArena {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kChunk = size_t{256} << 20;  // chunks hold many tensors; larger ones get their own

  HugePageArena() = default;
  HugePageArena(const HugePageArena&) = delete;
  HugePageArena& operator=(const HugePageArena&) = delete;

  // `bytes` (at least 1) of uninitialised memory, 64-byte aligned, valid until the arena goes.
  // Throws std::bad_alloc when the system has no memory for it.
  void* allocate(size_t bytes);
  // Bytes of address space the chunks span (untouched parts are never given physical memory).
  size_t reserved_bytes() const { return reserved_; }

 private:
  struct Free {
    void operator()(void* p) const;
  };
  std::vector<std::unique_ptr<void, Free>> chunks_;
  char* next_ = nullptr;  // in the newest chunk
  size_t left_ = 0;
  size_t reserved_ = 0;
};

}  // namespace arbiter::cpu
