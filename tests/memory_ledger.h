// MemoryLedger: a Backend that forwards everything to another one and keeps the books on memory:
// what reserve() announced, and what allocate() / import_weight() then took (each rounded as a
// device arena allocation), so that CPU tests can check that a Model reserves exactly what it
// allocates (the CUDA backend takes the reservation as one region; tests/gpu/gpu_arena_test).
#pragma once

#include <mutex>
#include <string>

#include "kernels/backend.h"
#include "kernels/device_arena.h"

namespace arbiter::testing {

class MemoryLedger final : public Backend {
 public:
  explicit MemoryLedger(Backend& inner) : b_(inner) {}

  int reserve_calls = 0;
  size_t reserved_bytes = 0;   // sum over reserve() calls
  MoeLimits last_moe;
  size_t allocated_bytes = 0;  // device_arena_bytes of every allocate / import_weight
  int allocations_before_reserve = 0;

  std::string name() const override { return "ledger(" + b_.name() + ")"; }
  DType activation_dtype() const override { return b_.activation_dtype(); }
  DType kv_dtype() const override { return b_.kv_dtype(); }
  void reserve(size_t bytes, const MoeLimits& moe) override {
    ++reserve_calls;
    reserved_bytes += bytes;
    last_moe = moe;
    b_.reserve(bytes, moe);
  }
  DeviceBuffer allocate(size_t bytes) override {
    count(bytes);
    return b_.allocate(bytes);
  }
  Tensor import_weight(const Tensor& host) override {
    count(host.bytes());
    return b_.import_weight(host);
  }
  void upload(const void* host, const Tensor& dst) override { b_.upload(host, dst); }
  void download(const Tensor& src, void* host) override { b_.download(src, host); }
  void fill_zero(const Tensor& dst) override { b_.fill_zero(dst); }
  void synchronize() override { b_.synchronize(); }
  std::unique_ptr<StepContext> prepare_step(const StepLayout& layout) override { return b_.prepare_step(layout); }
  void embedding(const Tensor& t, const StepContext& s, const Tensor& o) override { b_.embedding(t, s, o); }
  void rms_norm(const Tensor& x, const Tensor& w, float e, const Tensor& o) override { b_.rms_norm(x, w, e, o); }
  void add_rms_norm(const Tensor& r, const Tensor& d, const Tensor& w, float e, const Tensor& o) override {
    b_.add_rms_norm(r, d, w, e, o);
  }
  void linear(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& o) override { b_.linear(x, w, bias, o); }
  void linear_group(const Tensor& x, std::span<const LinearTerm> terms) override { b_.linear_group(x, terms); }
  void rope(const Tensor& q, const Tensor& k, int d, const RopeParams& r, const StepContext& s) override {
    b_.rope(q, k, d, r, s);
  }
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& c, const Tensor& sinks,
                 const AttentionParams& p, const StepContext& s, const Tensor& o) override {
    b_.attention(q, k, v, c, sinks, p, s, o);
  }
  void kv_store(const Tensor& k, const Tensor& v, const KvLayer& c, const AttentionParams& p,
                const StepContext& s) override {
    b_.kv_store(k, v, c, p, s);
  }
  void route(const Tensor& x, const Tensor& w, const Tensor& bias, int k, const Tensor& logits, const Tensor& ids,
             const Tensor& weights) override {
    b_.route(x, w, bias, k, logits, ids, weights);
  }
  void router_topk(const Tensor& logits, int k, const Tensor& ids, const Tensor& weights) override {
    b_.router_topk(logits, k, ids, weights);
  }
  void moe_experts(const Tensor& x, const Tensor& ids, const Tensor& w, const ExpertWeights& ex, float limit,
                   const Tensor& o) override {
    b_.moe_experts(x, ids, w, ex, limit, o);
  }
  void add(const Tensor& x, const Tensor& y) override { b_.add(x, y); }
  void gather_logit_rows(const Tensor& x, const StepContext& s, const Tensor& o) override { b_.gather_logit_rows(x, s, o); }
  void argmax(const Tensor& l, const Tensor& o) override { b_.argmax(l, o); }
  void top_logprobs(const Tensor& l, int k, const Tensor& ids, const Tensor& lp) override { b_.top_logprobs(l, k, ids, lp); }

 private:
  void count(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (reserve_calls == 0) ++allocations_before_reserve;
    allocated_bytes += device_arena_bytes(bytes);
  }
  Backend& b_;
  std::mutex mutex_;
};

}  // namespace arbiter::testing
