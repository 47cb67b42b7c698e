// MemoryLedger: a Backend that forwards everything to another one and keeps the books on memory:
// what reserve() announced, and what allocate() / import_weight() then took (each rounded as a
// device arena allocation), so that CPU tests can check that a Model reserves exactly what it
// allocates (the CUDA backend takes the reservation as one region; tests/gpu/gpu_arena_test).
#pragma once

#include <mutex>
#include <string>

#include "kernels/backend.h"
#include "kernels/device_arena.h"
#include "kernels/forwarding_backend.h"

namespace arbiter::testing {

class MemoryLedger final : public ForwardingBackend {
 public:
  explicit MemoryLedger(Backend& inner) : ForwardingBackend(inner) {}

  int reserve_calls = 0;
  size_t reserved_bytes = 0;   // sum over reserve() calls
  MoeLimits last_moe;
  size_t allocated_bytes = 0;  // device_arena_bytes of every allocate / import_weight
  int allocations_before_reserve = 0;

  std::string name() const override { return "ledger(" + inner().name() + ")"; }
  void reserve(size_t bytes, const MoeLimits& moe) override {
    ++reserve_calls;
    reserved_bytes += bytes;
    last_moe = moe;
    inner().reserve(bytes, moe);
  }
  DeviceBuffer allocate(size_t bytes) override {
    count(bytes);
    return inner().allocate(bytes);
  }
  Tensor import_weight(const Tensor& host) override {
    count(host.bytes());
    return inner().import_weight(host);
  }

 private:
  void count(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (reserve_calls == 0) ++allocations_before_reserve;
    allocated_bytes += device_arena_bytes(bytes);
  }
  std::mutex mutex_;
};

}  // namespace arbiter::testing
