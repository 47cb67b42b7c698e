// Backend: the one interface every compute backend (CPU, CUDA) implements. The model code in
// runtime/ calls only these operations, on Tensors the backend allocated or imported, so it never
// knows where the memory lives or how a kernel is written.
//
// Conventions: activations are [rows, features] row-major in activation_dtype(); linear weights
// are bf16 [out, in] (y = W x + b); KV cache layers are [blocks, block_size, kv_heads, head_dim] in
// kv_dtype(); integer tensors are I32. All operations are asynchronous with respect to the host
// except download() and synchronize().
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kernels/tensor.h"

namespace arbiter {

// One sequence's share of a forward step. Its new tokens occupy activation rows
// [first_row, first_row + num_new) and positions [num_cached, num_cached + num_new).
struct SequenceStep {
  int32_t first_row = 0;
  int32_t num_new = 0;
  int32_t num_cached = 0;
  // Full-attention layers: block b of the table holds positions [b * block_size, (b+1) * block_size).
  std::vector<int32_t> full_blocks;
  // Sliding-window layers: a ring; position p lives in slot p mod (sliding_blocks.size() * block_size).
  std::vector<int32_t> sliding_blocks;
};

// Everything a backend needs to know about one forward step, described on the host.
struct StepLayout {
  std::vector<int32_t> tokens;      // one per activation row
  std::vector<SequenceStep> sequences;
  std::vector<int32_t> logit_rows;  // rows whose logits the step must produce, in output order
  int32_t block_size = 16;
  // Expert parallelism: the rows per peer of the step's fixed-capacity exchanges (0: none). A
  // recorded step's exchanges have these sizes, so it is part of the step's shape (run_step).
  int32_t exchange_capacity = 0;
};

// The backend's own copy of a StepLayout (uploaded once per step, shared by every layer).
class StepContext {
 public:
  virtual ~StepContext() = default;
  virtual const StepLayout& layout() const = 0;
};

struct RopeParams {
  std::vector<float> inv_freq;  // head_dim / 2 entries
  float concentration = 1.0f;   // multiplies both cos and sin
  // Optional table on the backend, F32 [positions, head_dim]: row p is rope_cos_sin(p) (cos, then
  // sin). Rows at positions inside it are read instead of computed; positions past it are computed.
  Tensor table;
};

// The cos and sin (times the concentration) of position `position` for each of the half =
// inv_freq.size() frequencies, in float exactly as every backend computes them: cos_sin[i] = cos,
// cos_sin[half + i] = sin.
void rope_cos_sin(const RopeParams& rope, int64_t position, float* cos_sin);
// The host contents of RopeParams::table for positions [0, positions).
std::vector<float> rope_table(const RopeParams& rope, int64_t positions);

struct AttentionParams {
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int window = 0;  // 0: causal over the whole context; w > 0: key k visible to query q iff q - w < k <= q
  float scale = 0.0f;
};

// One layer's KV cache pool.
struct KvLayer {
  Tensor k;  // [blocks, block_size, kv_heads, head_dim]
  Tensor v;
};

// One layer's MXFP4 experts (the ones this rank holds). Blocks [E, out, in/32, 16] u8, scales
// [E, out, in/32] u8 (E8M0), biases bf16 [E, out]. gate_up rows are interleaved gate/up pairs.
struct ExpertWeights {
  Tensor gate_up_blocks, gate_up_scales, gate_up_bias;
  Tensor down_blocks, down_scales, down_bias;
  int num_experts() const { return static_cast<int>(gate_up_blocks.shape[0]); }
  int hidden() const { return static_cast<int>(down_blocks.shape[1]); }
  int intermediate() const { return static_cast<int>(down_blocks.shape[2] * 32); }
};

// One product of Backend::linear_group: out = x W^T + bias.
struct LinearTerm {
  Tensor weight;  // bf16 [out, in]
  Tensor bias;    // may be empty (data == nullptr)
  Tensor out;
};

// The largest moe_experts call a model will make (rows of x, top-k, experts held, hidden and
// intermediate sizes), for Backend::reserve. max_rows == 0: not known.
struct MoeLimits {
  int64_t max_rows = 0;
  int k = 0, experts = 0, hidden = 0, intermediate = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual DType activation_dtype() const = 0;
  virtual DType kv_dtype() const = 0;

  // --- memory ---
  // The bytes of the allocate() / import_weight() calls that will follow (each rounded up with
  // device_arena_bytes), so that a device backend can take them as one region up front instead of
  // one allocation each, and the largest moe_experts call that will follow, so that it can size its
  // own workspace with them. A hint: allocations beyond it still succeed. May be called more than
  // once (e.g. two models on one backend); each call covers the allocations after it. Default: no-op.
  virtual void reserve(size_t bytes, const MoeLimits& moe = {}) {
    (void)bytes;
    (void)moe;
  }
  virtual DeviceBuffer allocate(size_t bytes) = 0;
  // Makes a host tensor (e.g. a view into a memory-mapped checkpoint) usable by kernels. The CPU
  // backend returns the view itself; device backends copy it into memory they own until destroyed.
  virtual Tensor import_weight(const Tensor& host) = 0;
  virtual void upload(const void* host, const Tensor& dst) = 0;
  virtual void download(const Tensor& src, void* host) = 0;
  virtual void fill_zero(const Tensor& dst) = 0;
  virtual void synchronize() = 0;

  // --- per-step metadata ---
  virtual std::unique_ptr<StepContext> prepare_step(const StepLayout& layout) = 0;

  // --- operations ---
  // out[r] = table[tokens[r]] for every row of the step.
  virtual void embedding(const Tensor& table, const StepContext& step, const Tensor& out) = 0;
  // out = x / sqrt(mean(x^2) + eps) * weight (weight bf16 or f32), in fp32.
  virtual void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) = 0;
  // residual += delta; out = rms_norm(residual).
  virtual void add_rms_norm(const Tensor& residual, const Tensor& delta, const Tensor& weight, float eps,
                            const Tensor& out) = 0;
  // linear(x, w, bias, delta) then add_rms_norm(residual, delta, norm_weight, eps, out): the attention
  // block's output projection and the norm in front of the MoE. A device backend may run the norm in
  // the product's last block; the results must be the bits of the two calls.
  virtual void linear_add_rms_norm(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& delta,
                                   const Tensor& residual, const Tensor& norm_weight, float eps, const Tensor& out);
  // out = x W^T + bias; bias may be an empty Tensor (data == nullptr). out may be F32 even when
  // activations are not (logits).
  virtual void linear(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& out) = 0;
  // Several products of the same activations (a layer's q, k and v), each as linear() would
  // compute it. A backend may run them as one pass (one hand-off, one weight stream); the default
  // calls linear() for each.
  virtual void linear_group(const Tensor& x, std::span<const LinearTerm> terms);
  // YaRN rotate-half RoPE in place on q [rows, q_heads*d] and k [rows, kv_heads*d] at each row's position.
  virtual void rope(const Tensor& q, const Tensor& k, int head_dim, const RopeParams& rope,
                    const StepContext& step) = 0;
  // The attention block's projections and RoPE: every term's product (linear_group), then rope() on
  // the outputs of terms[0] (q) and terms[1] (k). A device backend may rotate in the products'
  // epilogue; the result must be the bits of the two calls.
  virtual void linear_group_rope(const Tensor& x, std::span<const LinearTerm> terms, int head_dim, const RopeParams& rope,
                                 const StepContext& step);
  // Attention with per-head sinks over the cached past (positions < num_cached, read from cache) and
  // the step's own keys (k, v of this step's rows). Does not write the cache.
  virtual void attention(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& cache,
                         const Tensor& sinks, const AttentionParams& params, const StepContext& step,
                         const Tensor& out) = 0;
  // Writes the step's keys and values into the cache (sliding layers: only the last `window`).
  virtual void kv_store(const Tensor& k, const Tensor& v, const KvLayer& cache, const AttentionParams& params,
                        const StepContext& step) = 0;
  // attention() then kv_store() of the same step and layer. A device backend may store inside the
  // attention kernel when no row can read a slot another row writes; the results must be the same.
  virtual void attention_store(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& cache, const Tensor& sinks,
                               const AttentionParams& params, const StepContext& step, const Tensor& out);
  // Top-k of router logits [rows, E]: expert ids [rows, k] (I32) and softmax-over-k weights [rows, k] (F32).
  virtual void router_topk(const Tensor& logits, int k, const Tensor& expert_ids, const Tensor& expert_weights) = 0;
  // The MoE router: logits = x W^T + bias (F32 [rows, E]), then router_topk(logits, k, ...). A
  // backend may fuse the two; the default calls linear() then router_topk().
  virtual void route(const Tensor& x, const Tensor& weight, const Tensor& bias, int k, const Tensor& logits,
                     const Tensor& expert_ids, const Tensor& expert_weights);
  // out[r] = sum_j weights[r, j] * expert_{ids[r, j]}(x[r]) over j with ids[r, j] >= 0 (ids index this
  // ExpertWeights' experts). Clamped SwiGLU with `swiglu_limit`.
  virtual void moe_experts(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                           const ExpertWeights& experts, float swiglu_limit, const Tensor& out) = 0;
  // Expert-load statistics: load[e] += the number of (row, j) with expert_ids[row, j] == e (expert_ids
  // I32 [rows, k] from router_topk, global ids; ids outside 0..experts-1 are skipped; load I32
  // [experts]). Enqueued like any other operation (a recorded step may contain it); read rarely, by a
  // download. The default downloads both, counts on the host and uploads load.
  virtual void count_expert_load(const Tensor& expert_ids, const Tensor& load);
  // x += y.
  virtual void add(const Tensor& x, const Tensor& y) = 0;
  // out[i] = x[step.logit_rows[i]].
  virtual void gather_logit_rows(const Tensor& x, const StepContext& step, const Tensor& out) = 0;
  // out[r] = argmax of logits[r] (lowest index on ties).
  virtual void argmax(const Tensor& logits, const Tensor& out) = 0;
  // Per row of logits [rows, vocab] (F32): the k largest entries' ids (I32 [rows, k], largest first,
  // lowest id first on ties, so ids[r, 0] == argmax) and their log-probabilities under the softmax of
  // the whole row (F32 [rows, k]). 1 <= k <= min(vocab, 64). The default downloads the logits and
  // computes on the host; backends override it to keep the logits on the device.
  virtual void top_logprobs(const Tensor& logits, int k, const Tensor& ids, const Tensor& logprobs);
  // Per row of logits [rows, vocab] (F32): the log-probabilities, under the softmax of the whole row,
  // of the tokens ids[r, j] (I32 [rows, m]) into logprobs[r, j] (F32 [rows, m]); an id outside the
  // vocabulary (-1 pads a row with fewer tokens) gets -inf. For answers that must be scored even when
  // they are not among the top k (verdict-only scoring). The normalizer is computed as top_logprobs
  // computes it, so a token in both lists has the same log-probability in both. The default
  // downloads the logits and computes on the host.
  virtual void token_logprobs(const Tensor& logits, const Tensor& ids, const Tensor& logprobs);
  // A product with only some rows of the weight: out[r, j] = x[r] . weight[ids[r, j]] (F32 [rows, m];
  // weight bf16 [vocab, in], no bias; x [rows, in] in activation_dtype() or F32; an id outside the
  // weight's rows, -1 padding, gives -inf). The lm_head restricted to a few candidate tokens: most of
  // a decode step's bytes are the unembedding's rows, of which verdict-only scoring needs a handful.
  // Equal to linear()'s entries within float rounding. The default downloads x and each needed row
  // and computes on the host.
  virtual void linear_rows(const Tensor& x, const Tensor& weight, const Tensor& ids, const Tensor& out);

  // --- expert-parallel dispatch and combine (parallel/moe_dispatch.h runs them around its exchanges) ---
  // Whether tensors of this backend are host memory that a communicator may read and write directly
  // (the CPU backend). Device backends return false; their buffers go to a transport that takes device
  // buffers (NCCL) or are staged through the host. Default: false.
  virtual bool host_memory() const { return false; }
  // The backend's native stream (cudaStream_t for CUDA), on which a device transport enqueues its
  // exchanges so they are ordered with the operations around them; nullptr when there is none.
  virtual void* native_stream() { return nullptr; }
  // Dispatch, sender side. x [rows, hidden] (activation dtype), expert_ids / expert_weights
  // [rows, k] from router_topk (global ids; negative ids are skipped). expert_owner / expert_local
  // (I32 [experts]): the rank holding each global expert and its index among that rank's experts.
  // Every token's row goes once to each rank that owns at least one of its experts. Writes, grouped
  // by destination rank (rank 0's rows first) and in token order within a destination:
  //   send.x [>= sent rows, hidden]: the rows; send.ids [.., k]: the destination's local ids of the
  //   token's experts (-1 for experts held elsewhere); send.weights [.., k]: the token's router weights;
  //   send.slots (I32 [rows, ranks]): per token and rank, its row in send.x (-1: not sent there);
  //   rows_per_rank[d] (host, one per rank): rows sent to rank d, the only thing the host sees.
  // expert_load (I32 [experts], optional: data may be null): += the tokens routed to each expert.
  // send.x needs room for rows * min(ranks, k) rows at most. The default downloads the inputs, packs on
  // the host and uploads the result; backends override it to pack where the data lives.
  // send.capacity > 0 (the fixed-capacity exchange, rows <= capacity): destination d's rows start at
  // row d * capacity instead, every other row of the ranks * capacity gets ids -1 and weights 0 (a
  // padding row, which moe_experts skips), send.x/ids/weights need ranks * capacity rows, and the
  // host is neither synchronized nor told the counts: rows_per_rank (its size still gives the ranks)
  // may be left unwritten, and a device backend may skip expert ids outside the maps rather than report them.
  struct MoeSendBuffers {
    Tensor x, ids, weights, slots;
    int64_t capacity = 0;
  };
  virtual void moe_dispatch_pack(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                                 const Tensor& expert_owner, const Tensor& expert_local, const MoeSendBuffers& send,
                                 std::span<int64_t> rows_per_rank, const Tensor& expert_load);
  // Combine, sender side: out[t] = the sum over ranks d in rank order of back[slots[t, d]] for
  // slots[t, d] >= 0 (zeros when the token went nowhere), accumulated in fp32 from zero. back
  // [sent rows, hidden] holds, in the order of send.x, the owners' results (already weighted by the
  // router weights in their moe_experts). The order of additions is the host path's (MoeExchange),
  // so the results are its bits. The default runs on the host between a download and an upload.
  virtual void moe_combine(const Tensor& back, const Tensor& slots, const Tensor& out);

  // --- optional: recorded steps (device backends; the defaults just run the step) ---
  // Runs `body`, which enqueues one forward step's operations on `step` and nothing else (no host
  // synchronization, no communication). A device backend may record those operations for a step
  // shape it has seen from the same `owner` before and replay the recording for later steps of that
  // shape (the CUDA backend does this for decode steps, as CUDA graphs), so everything the operations
  // touch (weights, caches, activation buffers) must stay where it is until forget_steps(owner).
  virtual void run_step(const void* owner, const StepContext& step, const std::function<void()>& body) {
    (void)owner;
    (void)step;
    body();
  }
  // Drops whatever run_step recorded for `owner`.
  virtual void forget_steps(const void* owner) { (void)owner; }
};

// Creates a backend by name: "cpu", "cuda" or "cuda:N". Throws std::runtime_error naming what is
// missing (e.g. CUDA not compiled in, no GPU present).
std::unique_ptr<Backend> make_backend(const std::string& device);
// True when a CUDA backend is compiled in and a GPU is visible.
bool cuda_available();
// GPUs a compiled-in CUDA backend can see (0 without CUDA).
int gpu_count();
// A copy between two buffers of one GPU enqueued on `stream` (a CUDA backend's native_stream()),
// and a wait for everything enqueued on a stream. Throw std::runtime_error without CUDA.
void device_copy_on_stream(void* dst, const void* src, size_t bytes, void* stream);
void device_wait_stream(void* stream);

}  // namespace arbiter
