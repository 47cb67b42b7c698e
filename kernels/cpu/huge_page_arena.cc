#include "kernels/cpu/huge_page_arena.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <new>

namespace arbiter::cpu {

void HugePageArena::Free::operator()(void* p) const { std::free(p); }

void* HugePageArena::allocate(size_t bytes) {
  const size_t need = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  if (need > left_) {
    // A new chunk: the rest of the old one stays unused address space (never touched, so never
    // backed by memory).
    const size_t size = std::max(kChunk, (need + kHugePage - 1) / kHugePage * kHugePage);
    void* p = std::aligned_alloc(kHugePage, size);
    if (!p) throw std::bad_alloc();
    // Advice only: without transparent huge pages (or with them off) this fails and the memory
    // stays in ordinary pages.
    (void)::madvise(p, size, MADV_HUGEPAGE);
    chunks_.emplace_back(p);
    next_ = static_cast<char*>(p);
    left_ = size;
    reserved_ += size;
  }
  void* out = next_;
  next_ += need;
  left_ -= need;
  return out;
}

}  // namespace arbiter::cpu
