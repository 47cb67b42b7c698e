// ForwardingBackend: a Backend that passes every operation to another one. Wrappers that observe a
// backend (benchmark timers, test probes and ledgers) derive from it and override only what they
// watch, so a new Backend operation is forwarded once, here. Recorded steps (run_step) are not
// forwarded: a wrapper that watches operations needs them run, not replayed.
#pragma once

#include <memory>
#include <span>
#include <string>

#include "kernels/backend.h"

namespace arbiter {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(Backend& inner) : inner_(inner) {}

  std::string name() const override { return inner_.name(); }
  DType activation_dtype() const override { return inner_.activation_dtype(); }
  DType kv_dtype() const override { return inner_.kv_dtype(); }
  void reserve(size_t bytes, const MoeLimits& moe) override { inner_.reserve(bytes, moe); }
  DeviceBuffer allocate(size_t bytes) override { return inner_.allocate(bytes); }
  Tensor import_weight(const Tensor& host) override { return inner_.import_weight(host); }
  void upload(const void* host, const Tensor& dst) override { inner_.upload(host, dst); }
  void download(const Tensor& src, void* host) override { inner_.download(src, host); }
  void fill_zero(const Tensor& dst) override { inner_.fill_zero(dst); }
  void synchronize() override { inner_.synchronize(); }
  std::unique_ptr<StepContext> prepare_step(const StepLayout& layout) override { return inner_.prepare_step(layout); }
  void embedding(const Tensor& t, const StepContext& s, const Tensor& o) override { inner_.embedding(t, s, o); }
  void rms_norm(const Tensor& x, const Tensor& w, float e, const Tensor& o) override { inner_.rms_norm(x, w, e, o); }
  void add_rms_norm(const Tensor& r, const Tensor& d, const Tensor& w, float e, const Tensor& o) override {
    inner_.add_rms_norm(r, d, w, e, o);
  }
  void linear_add_rms_norm(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& d, const Tensor& r,
                           const Tensor& nw, float e, const Tensor& o) override {
    inner_.linear_add_rms_norm(x, w, b, d, r, nw, e, o);
  }
  void linear(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& o) override { inner_.linear(x, w, bias, o); }
  void linear_group(const Tensor& x, std::span<const LinearTerm> terms) override { inner_.linear_group(x, terms); }
  void linear_group_rope(const Tensor& x, std::span<const LinearTerm> terms, int head_dim, const RopeParams& rope,
                         const StepContext& step) override {
    inner_.linear_group_rope(x, terms, head_dim, rope, step);
  }
  void rope(const Tensor& q, const Tensor& k, int d, const RopeParams& r, const StepContext& s) override {
    inner_.rope(q, k, d, r, s);
  }
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& c, const Tensor& sinks,
                 const AttentionParams& p, const StepContext& s, const Tensor& o) override {
    inner_.attention(q, k, v, c, sinks, p, s, o);
  }
  void attention_store(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& c, const Tensor& sinks,
                       const AttentionParams& p, const StepContext& s, const Tensor& out) override {
    inner_.attention_store(q, k, v, c, sinks, p, s, out);
  }
  void kv_store(const Tensor& k, const Tensor& v, const KvLayer& c, const AttentionParams& p,
                const StepContext& s) override {
    inner_.kv_store(k, v, c, p, s);
  }
  void route(const Tensor& x, const Tensor& w, const Tensor& bias, int k, const Tensor& logits, const Tensor& ids,
             const Tensor& weights) override {
    inner_.route(x, w, bias, k, logits, ids, weights);
  }
  void router_topk(const Tensor& logits, int k, const Tensor& ids, const Tensor& weights) override {
    inner_.router_topk(logits, k, ids, weights);
  }
  void moe_experts(const Tensor& x, const Tensor& ids, const Tensor& w, const ExpertWeights& ex, float limit,
                   const Tensor& o) override {
    inner_.moe_experts(x, ids, w, ex, limit, o);
  }
  bool host_memory() const override { return inner_.host_memory(); }
  void* native_stream() override { return inner_.native_stream(); }
  void moe_dispatch_pack(const Tensor& x, const Tensor& ids, const Tensor& w, const Tensor& owner, const Tensor& local,
                         const MoeSendBuffers& send, std::span<int64_t> rows_per_rank, const Tensor& load) override {
    inner_.moe_dispatch_pack(x, ids, w, owner, local, send, rows_per_rank, load);
  }
  void count_expert_load(const Tensor& ids, const Tensor& load) override { inner_.count_expert_load(ids, load); }
  void moe_combine(const Tensor& back, const Tensor& slots, const Tensor& out) override {
    inner_.moe_combine(back, slots, out);
  }
  void add(const Tensor& x, const Tensor& y) override { inner_.add(x, y); }
  void gather_logit_rows(const Tensor& x, const StepContext& s, const Tensor& o) override {
    inner_.gather_logit_rows(x, s, o);
  }
  void argmax(const Tensor& l, const Tensor& o) override { inner_.argmax(l, o); }
  void top_logprobs(const Tensor& l, int k, const Tensor& ids, const Tensor& lp) override {
    inner_.top_logprobs(l, k, ids, lp);
  }
  void token_logprobs(const Tensor& l, const Tensor& ids, const Tensor& lp) override { inner_.token_logprobs(l, ids, lp); }
  void linear_rows(const Tensor& x, const Tensor& w, const Tensor& ids, const Tensor& out) override {
    inner_.linear_rows(x, w, ids, out);
  }

 protected:
  Backend& inner() const { return inner_; }

 private:
  Backend& inner_;
};

}  // namespace arbiter
