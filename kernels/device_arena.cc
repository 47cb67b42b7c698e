#include "kernels/device_arena.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <utility>

namespace arbiter {
namespace {

constexpr size_t kMaxBytes = std::numeric_limits<size_t>::max() / 2;

// x rounded up to a multiple of `a` (a power of two); false on overflow.
bool round_up(uintptr_t x, size_t a, uintptr_t& out) {
  if (x > std::numeric_limits<uintptr_t>::max() - (a - 1)) return false;
  out = (x + (a - 1)) & ~static_cast<uintptr_t>(a - 1);
  return true;
}

}  // namespace

size_t device_arena_bytes(size_t bytes) {
  if (bytes == 0) return kDeviceArenaAlignment;
  return (bytes + kDeviceArenaAlignment - 1) / kDeviceArenaAlignment * kDeviceArenaAlignment;
}

DeviceArena::DeviceArena(void* base, size_t capacity) {
  const auto begin = reinterpret_cast<uintptr_t>(base);
  uintptr_t first = 0;
  if (!base || !round_up(begin, kDeviceArenaAlignment, first) || capacity < first - begin) return;
  const size_t usable = (capacity - (first - begin)) / kDeviceArenaAlignment * kDeviceArenaAlignment;
  if (usable == 0 || first > std::numeric_limits<uintptr_t>::max() - usable) return;
  base_ = first;
  capacity_ = usable;
  free_.emplace(base_, capacity_);
}

DeviceArena::~DeviceArena() {
  if (!live_.empty()) {
    std::fprintf(stderr, "arbiter: DeviceArena destroyed with %zu live allocations (%zu bytes)\n", live_.size(),
                 in_use_);
    std::abort();
  }
}

DeviceBuffer DeviceArena::allocate(size_t bytes, size_t alignment, std::shared_ptr<void> keep_alive) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0 || bytes > kMaxBytes) return {};
  if (alignment < kDeviceArenaAlignment) alignment = kDeviceArenaAlignment;
  const size_t size = device_arena_bytes(bytes);
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    const uintptr_t range_start = it->first;
    const size_t range_size = it->second;
    uintptr_t start = 0;
    if (!round_up(range_start, alignment, start)) break;  // later ranges are higher still
    const size_t pad = start - range_start;
    if (pad > range_size || range_size - pad < size) continue;
    // Carve [start, start + size): what is left before and after stays free.
    const size_t after = range_size - pad - size;
    if (pad > 0) it->second = pad;
    else free_.erase(it);
    if (after > 0) free_.emplace(start + size, after);
    live_.emplace(start, size);
    in_use_ += size;
    if (in_use_ > peak_) peak_ = in_use_;
    return DeviceBuffer(reinterpret_cast<void*>(start), bytes,
                        [this, keep_alive = std::move(keep_alive)](void* data) { release(data); });
  }
  return {};
}

void DeviceArena::release(void* data) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto start = reinterpret_cast<uintptr_t>(data);
  const auto live = live_.find(start);
  if (live == live_.end()) {
    // Only reachable through a bug in this file: buffers are move-only and free once.
    std::fprintf(stderr, "arbiter: DeviceArena: freeing a range it did not hand out\n");
    std::abort();
  }
  size_t size = live->second;
  live_.erase(live);
  in_use_ -= size;
  uintptr_t begin = start;
  // Merge with the free neighbours (never across a live range: they are not adjacent then).
  auto next = free_.lower_bound(start);
  if (next != free_.end() && next->first == start + size) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    const auto prev = std::prev(next);
    if (prev->first + prev->second == begin) {
      prev->second += size;
      return;
    }
  }
  free_.emplace_hint(next, begin, size);
}

bool DeviceArena::contains(const void* p) const {
  const auto v = reinterpret_cast<uintptr_t>(p);
  return capacity_ > 0 && v >= base_ && v - base_ < capacity_;
}

size_t DeviceArena::bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return in_use_;
}

size_t DeviceArena::peak_bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return peak_;
}

size_t DeviceArena::live_allocations() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return live_.size();
}

size_t DeviceArena::free_ranges() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return free_.size();
}

size_t DeviceArena::largest_free_range() const {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t largest = 0;
  for (const auto& [start, size] : free_) largest = std::max(largest, size);
  return largest;
}

}  // namespace arbiter
