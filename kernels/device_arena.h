// DeviceArena: the bookkeeping of one memory region that someone else allocated (a device backend's
// single cudaMalloc, or host memory): hands out aligned sub-ranges first-fit from an address-ordered
// free list and takes them back, merging each freed range with its free neighbours. It never reads
// or writes the region itself, so the region may be device memory. Thread-safe.
//
// Allocations are DeviceBuffers whose deleter returns the range to the arena, so the arena must
// outlive every buffer it handed out (or be kept alive by them: see `keep_alive`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

#include "kernels/tensor.h"

namespace arbiter {

// Every range's start and size are multiples of this (and of any larger requested alignment).
inline constexpr size_t kDeviceArenaAlignment = 256;

// `bytes` rounded up to kDeviceArenaAlignment (at least one unit: zero-byte allocations get a
// distinct address too). What one allocation of `bytes` takes from an arena at default alignment.
size_t device_arena_bytes(size_t bytes);

class DeviceArena {
 public:
  // Manages [base, base + capacity), shrunk inwards to kDeviceArenaAlignment boundaries.
  DeviceArena(void* base, size_t capacity);
  // Every buffer must have been freed (aborts otherwise: they would return ranges to freed memory).
  ~DeviceArena();
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  // A range of at least `bytes` bytes starting at a multiple of `alignment` (a power of two; values
  // below kDeviceArenaAlignment are raised to it), or an empty DeviceBuffer (data() == nullptr) when
  // no free range fits; the caller decides what to do then. The buffer's deleter returns the range
  // and then releases `keep_alive` (e.g. the owner of the region and of this arena).
  DeviceBuffer allocate(size_t bytes, size_t alignment = kDeviceArenaAlignment,
                        std::shared_ptr<void> keep_alive = nullptr);

  const void* base() const { return reinterpret_cast<const void*>(base_); }
  size_t capacity() const { return capacity_; }
  bool contains(const void* p) const;
  size_t bytes_in_use() const;       // sum of the live ranges' sizes (rounded as allocated)
  size_t peak_bytes_in_use() const;  // largest bytes_in_use() so far
  size_t live_allocations() const;
  size_t free_ranges() const;        // 1 when nothing is allocated (0 if the capacity is 0)
  size_t largest_free_range() const;

 private:
  void release(void* data);

  uintptr_t base_ = 0;
  size_t capacity_ = 0;
  mutable std::mutex mutex_;
  std::map<uintptr_t, size_t> free_;  // start -> size, address order, never two adjacent
  std::map<uintptr_t, size_t> live_;  // start -> size
  size_t in_use_ = 0, peak_ = 0;
};

}  // namespace arbiter
