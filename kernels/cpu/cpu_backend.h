// CpuBackend: the Backend on host memory. fp32 activations and KV cache, the weights copied from the
// memory-mapped checkpoint into huge pages at load, MXFP4 experts dequantized per 32-value block on
// the fly, every kernel spread over a ThreadPool.
#pragma once

#include <map>
#include <memory>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/huge_page_arena.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/thread_pool.h"

namespace arbiter {

class CpuBackend final : public Backend {
 public:
  // The experts' one-row products use exact fp32 activations unless ARBITER_CPU_MXFP4=int8 (the
  // quantized mode, cpu::Mxfp4Activations); ARBITER_CPU_MXFP4=exact or unset: exact; anything else
  // throws std::invalid_argument.
  explicit CpuBackend(int threads = 0);
  std::string name() const override;
  DType activation_dtype() const override { return DType::kF32; }
  DType kv_dtype() const override { return DType::kF32; }

  DeviceBuffer allocate(size_t bytes) override;
  // A copy of the view in memory the backend owns (HugePageArena: 2 MiB pages, 64-byte-aligned
  // tensors), made once: a second import of the same bytes returns the same copy. A decode step
  // streams every weight, and from the checkpoint's mapping it pays for 4 KiB pages and for tensors
  // that start off a cache line (a checkpoint aligns its tensors to 8 bytes; the one-row MXFP4
  // kernels stream such codes 12-20% slower): docs/performance.md. The copies take the model's size
  // in anonymous memory (the loader releases the checkpoint's pages as it goes);
  // ARBITER_CPU_COPY_WEIGHTS=0 returns the views instead, for machines whose memory cannot hold the
  // whole model (a mapping's pages can be dropped and read from the file again).
  Tensor import_weight(const Tensor& host) override;
  void upload(const void* host, const Tensor& dst) override;
  void download(const Tensor& src, void* host) override;
  void fill_zero(const Tensor& dst) override;
  void synchronize() override {}

  std::unique_ptr<StepContext> prepare_step(const StepLayout& layout) override;

  void embedding(const Tensor& table, const StepContext& step, const Tensor& out) override;
  void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) override;
  void add_rms_norm(const Tensor& residual, const Tensor& delta, const Tensor& weight, float eps,
                    const Tensor& out) override;
  void linear(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& out) override;
  void linear_group(const Tensor& x, std::span<const LinearTerm> terms) override;
  void rope(const Tensor& q, const Tensor& k, int head_dim, const RopeParams& rope, const StepContext& step) override;
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& cache, const Tensor& sinks,
                 const AttentionParams& params, const StepContext& step, const Tensor& out) override;
  void kv_store(const Tensor& k, const Tensor& v, const KvLayer& cache, const AttentionParams& params,
                const StepContext& step) override;
  void router_topk(const Tensor& logits, int k, const Tensor& expert_ids, const Tensor& expert_weights) override;
  void moe_experts(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                   const ExpertWeights& experts, float swiglu_limit, const Tensor& out) override;
  // Host memory: communicators exchange these buffers directly; dispatch and combine work on them
  // in place (no staging copies), rows spread over the pool.
  bool host_memory() const override { return true; }
  void moe_dispatch_pack(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                         const Tensor& expert_owner, const Tensor& expert_local, const MoeSendBuffers& send,
                         std::span<int64_t> rows_per_rank, const Tensor& expert_load) override;
  void moe_combine(const Tensor& back, const Tensor& slots, const Tensor& out) override;
  void count_expert_load(const Tensor& expert_ids, const Tensor& load) override;
  void add(const Tensor& x, const Tensor& y) override;
  void gather_logit_rows(const Tensor& x, const StepContext& step, const Tensor& out) override;
  void argmax(const Tensor& logits, const Tensor& out) override;

  cpu::ThreadPool& pool() { return *pool_; }
  cpu::Mxfp4Activations expert_activations() const { return expert_activations_; }
  void set_expert_activations(cpu::Mxfp4Activations a) { expert_activations_ = a; }
  // Whether import_weight copies weights (affects weights imported afterwards).
  void set_copy_weights(bool on) { copy_weights_ = on; }

 private:
  std::unique_ptr<cpu::ThreadPool> pool_;
  cpu::Mxfp4Activations expert_activations_ = cpu::Mxfp4Activations::kExact;
  bool copy_weights_ = true;
  // The copies made by import_weight, by the address and size of the view they copy; kept until
  // the backend goes (models hold pointers into them), several per key when the bytes there changed
  // between imports.
  cpu::HugePageArena weight_arena_;
  std::multimap<std::pair<const void*, size_t>, void*> weight_copies_;
  // moe_experts' work buffers, kept between calls (they only grow) so a step neither allocates
  // nor zero-fills tens of MB per layer.
  std::vector<float> moe_xs_, moe_u_, moe_act_, moe_y_;
};

}  // namespace arbiter
