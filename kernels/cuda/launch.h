// Host-callable launchers of the CUDA kernels (implemented in the .cu files of this folder) and the
// plain-data structs they take. Included by the host-side backend (compiled by the C++ compiler)
// and by the .cu files, so it holds no device code and no CUDA-only syntax.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace arbiter::cuda {

// Step metadata in device memory (see CudaBackend::prepare_step). Per row: token, position and
// sequence. Per sequence, kSeqFields ints: first_row, num_new, num_cached, offset of its
// full-attention block table in `tables`, its length, offset of its sliding ring table, its length.
inline constexpr int kSeqFields = 8;
enum SeqField : int { kFirstRow = 0, kNumNew, kNumCached, kFullOffset, kFullCount, kRingOffset, kRingCount };

struct StepArgs {
  const int32_t* tokens = nullptr;
  const int32_t* row_pos = nullptr;
  const int32_t* row_seq = nullptr;
  const int32_t* seq_info = nullptr;
  const int32_t* tables = nullptr;
  const int32_t* logit_rows = nullptr;
  int rows = 0;
  int seqs = 0;
  int logit_count = 0;
  int block_size = 0;
};

inline constexpr int kMaxRopeHalf = 128;
struct RopeArgs {
  float inv_freq[kMaxRopeHalf];
  float concentration;
  int half;
  const float* table;  // RopeParams::table: [table_rows, 2 * half] cos, sin (nullptr: none)
  int table_rows;
};

// Which attention kernel runs. kAuto chooses per sequence: tensor-core prefill for sequences with
// >= 16 new tokens (GQA groups of 1, 2, 4 or a multiple of 8), split over keys (groups of at most 8)
// or else one block per q head for the others; a step that mixes both launches two kernels, each
// skipping the other's sequences, so a sequence gets the same kernel (and bits) alone as in any batch.
// The forced paths take every sequence and fall back the same way when a shape is not supported.
enum class AttentionPath : int { kAuto = 0, kSplit, kPerHead, kMma };

struct AttentionArgs {
  const void* q;  // bf16 [rows, q_heads*d]
  const void* k;  // bf16 [rows, kv_heads*d] (this step's keys)
  const void* v;
  void* cache_k;  // bf16 [blocks, block_size, kv_heads, d]; written only with store_kv
  void* cache_v;
  const void* sinks;  // [q_heads], bf16 or f32
  bool sinks_bf16;
  void* out;  // bf16 [rows, q_heads*d]
  int rows, q_heads, kv_heads, head_dim, window;
  float scale;
  AttentionPath path;
  int seqs;     // sequences in the step
  int max_new;  // most new tokens of one sequence (host-side, from the step's layout)
  int min_new;  // fewest new tokens of a sequence that has any (host-side; 0 when none has any)
  // Set by attention() for the kernels: the prefill kernel skips sequences with fewer than
  // `mma_min_new` new tokens (0: none skipped); the split / per-head kernels skip rows of sequences
  // with at least `row_max_new` new tokens (INT32_MAX: none skipped).
  int mma_min_new;
  int row_max_new;
  // The split kernel's target block count: splits = this / (rows x kv heads), clamped to [1, 32]
  // (default 512; ARBITER_CUDA_ATTN_BLOCKS, to measure fewer splits at batch 1).
  int split_target_blocks = 512;
  // Asks attention() to store each row's k and v into the cache too (what kv_store() does), which it
  // does (and returns true) when the split kernel runs every row of a step of one new token per
  // sequence: no row then reads the slot another row writes.
  bool store_kv = false;
  // The split kernel's fewest keys per non-empty split (a multiple of 32; default 32: an equal share
  // of the row's keys). Read at run time, so a recorded step stays valid as the context grows.
  int split_min_span = 32;
};

enum class MoePath : int { kAuto = 0, kGemv, kMma };

struct MoeArgs {
  const void* x;  // bf16 [rows, hidden]
  const int32_t* ids;  // [rows, k]
  const float* weights;  // [rows, k]
  const uint8_t* gu_blocks;  // [E, 2I, H/32, 16]
  const uint8_t* gu_scales;  // [E, 2I, H/32]
  const void* gu_bias;  // bf16 [E, 2I]
  const uint8_t* dn_blocks;  // [E, H, I/32, 16]
  const uint8_t* dn_scales;
  const void* dn_bias;  // bf16 [E, H]
  void* out;  // bf16 [rows, hidden]
  int rows, k, experts, hidden, inter;
  float limit;
  MoePath path;  // kAuto: by tokens per expert
  // Token groups of 8 per routed vector-path task: 1 (tasks of 8 tokens) or 2 (16: an expert's
  // weights are read and decoded once for up to 16 tokens). Results are the same bits either way.
  int vec_groups = 1;
  // Vector path variants, same bits (A/B until measured): the weights streamed through a per-warp
  // cp.async ring in shared memory (vec_pipe), and gate_up blocks of 4 warps instead of 8 (more,
  // smaller blocks spread a batch-1 step's 180 blocks more evenly over the SMs).
  bool vec_pipe = false;
  int vec_gate_up_warps = 8;
  // Tokens per tensor-core tile: 128, 64 or 32 (fewer MMAs wasted on experts with few tokens; same bits).
  int mma_tile = 128;
  // The tensor-core path's deeper pipeline (3 activation stages, raw weight codes 3 slices ahead by
  // cp.async; same bits).
  bool mma_deep = false;
  // Workspace (see moe_workspace_bytes).
  void* workspace;
};

// Bytes of workspace moe() needs for these sizes.
size_t moe_workspace_bytes(int rows, int k, int experts, int hidden, int inter);

void embedding(const void* table, bool table_bf16, int64_t vocab, int64_t dim, const StepArgs& step, void* out,
               int rows, cudaStream_t stream);
void rms_norm(const void* x, const void* weight, bool weight_bf16, float eps, void* out, int rows, int dim,
              cudaStream_t stream);
void add_rms_norm(void* residual, const void* delta, const void* weight, bool weight_bf16, float eps, void* out,
                  int rows, int dim, cudaStream_t stream);
// out[r, c] += bias[c] for an f32 out and a bf16 bias.
void add_bias_f32(float* out, const void* bias, int rows, int cols, cudaStream_t stream);
void rope(void* q, void* k, int rows, int q_heads, int k_heads, int head_dim, const RopeArgs& rope,
          const StepArgs& step, cudaStream_t stream);
// `workspace`: attention_workspace_bytes(), allocated once and zeroed (left zeroed again).
size_t attention_workspace_bytes();
// Returns whether it also stored the step's k and v into the cache (args.store_kv, see there).
bool attention(const AttentionArgs& args, const StepArgs& step, void* workspace, cudaStream_t stream);
void kv_store(const void* k, const void* v, void* cache_k, void* cache_v, int rows, int kv_row, int window,
              const StepArgs& step, cudaStream_t stream);
void router_topk(const float* logits, int rows, int experts, int k, int32_t* ids, float* weights,
                 cudaStream_t stream);
void moe(const MoeArgs& args, cudaStream_t stream);
void add_bf16(void* x, const void* y, int64_t n, cudaStream_t stream);
// Dense bf16 matrix-vector product for at most kGemvMaxRows activation rows: out[m, n] = x[m] . w[n]
// (+ bias[n], bf16, may be null), out bf16 or f32. x rows and w rows contiguous, 16-byte aligned.
inline constexpr int kGemvMaxRows = 8;
bool gemv_supported(int m, int64_t n, int64_t k);
void gemv(const void* x, int m, const void* w, const void* bias, void* out, bool out_f32, int64_t n, int64_t k,
          cudaStream_t stream);
// Several such products of the same x (a layer's q, k and v) in one launch: each target's rows
// are computed exactly as gemv() would (same blocks, same summation order), so the results are the
// same bits. Targets share m, k and the out dtype; at most kGemvMaxTargets.
inline constexpr int kGemvMaxTargets = 4;
struct GemvTarget {
  const void* w = nullptr;     // bf16 [n, k]
  const void* bias = nullptr;  // bf16 [n] or null
  void* out = nullptr;         // [m, n]
  int64_t n = 0;
};
// RoPE in gemv_group's epilogue: targets [0, targets) (q, then k) come out rotated, the bits of
// gemv_group followed by rope() (head_dim a multiple of 8; bf16 outputs).
struct GemvRope {
  RopeArgs args{};
  const int32_t* row_pos = nullptr;  // StepArgs::row_pos
  int head_dim = 0;
  int targets = 0;
};
void gemv_group(const void* x, int m, const GemvTarget* targets, int count, bool out_f32, int64_t k,
                cudaStream_t stream, const GemvRope* rope = nullptr);
// The MoE router in one launch: logits[m, experts] = x . W + bias (f32) by the GEMV, then the last
// block runs the router top-k + softmax on every row (the bits of router_topk). `workspace`:
// route_workspace_bytes(), zeroed once (left zeroed again); one stream at a time.
bool route_supported(int m, int64_t experts, int64_t k, int top_k);
size_t route_workspace_bytes();
// The o projection and the residual add + RMSNorm after it in one launch: delta[m, n] = x . W + bias
// (bf16) by the GEMV, then its last block runs add_rms_norm on every row (the bits of gemv +
// add_rms_norm). `workspace`: the route workspace (its counter at byte 128; one stream at a time).
void gemv_add_rms_norm(const void* x, int m, const void* w, const void* bias, void* delta, int64_t n, int64_t k,
                       void* residual, const void* norm_weight, bool norm_weight_bf16, float eps, void* out,
                       void* workspace, cudaStream_t stream);
void route(const void* x, int m, const void* w, const void* bias, float* logits, int64_t experts, int64_t k, int top_k,
           int32_t* ids, float* weights, void* workspace, cudaStream_t stream);
void gather_rows(const void* x, void* out, int64_t row_bytes, const StepArgs& step, cudaStream_t stream);
// Row selection (sampling.cu). Both need the workspace of selection_workspace_bytes(), allocated
// once and zeroed before first use (the kernels leave it zeroed again); one stream at a time.
size_t selection_workspace_bytes();
// out[r] = argmax of logits[r] (lowest index on ties).
void argmax(const float* logits, int rows, int64_t n, int32_t* out, void* workspace, cudaStream_t stream);
// Per row: the k largest logits' ids (largest first, lowest id first on ties) and log-softmax values.
inline constexpr int kTopLogprobsMaxK = 64;
bool top_logprobs_supported(int64_t vocab, int k);  // k <= 64, vocab <= 64 * 4096
void top_logprobs(const float* logits, int rows, int64_t vocab, int k, int32_t* ids, float* logprobs,
                  void* workspace, cudaStream_t stream);

// Expert-parallel dispatch and combine (moe_dispatch.cu), the device form of kernels/moe_pack.h.
// plan: slots [rows, ranks], send_ids / send_weights [sent rows, k], counts [ranks + 1] (rows per
// destination, then 1 if an id was outside the placement), load [experts] += tokens (may be null).
// capacity > 0 (rows <= capacity): destination d's rows start at d * capacity, and the rows of the
// ranks * capacity that no token takes get ids -1 and weights 0.
inline constexpr int kMaxDispatchRanks = 64;
void moe_dispatch_plan(const int32_t* ids, const float* weights, int rows, int k, const int32_t* owner,
                       const int32_t* local, int experts, int ranks, int capacity, int32_t* slots, int32_t* send_ids,
                       float* send_weights, int64_t* counts, int32_t* load, cudaStream_t stream);
// Copies each token's row to its slots in send_x.
void moe_dispatch_copy(const void* x, int64_t row_bytes, const int32_t* slots, int rows, int ranks, void* send_x,
                       cudaStream_t stream);
// Expert-load statistics: load[ids[i]] += 1 for each of the n ids inside 0..experts-1.
void count_expert_load(const int32_t* ids, int64_t n, int experts, int32_t* load, cudaStream_t stream);
// out[t] (bf16) = the fp32 sum, in rank order, of back's (bf16) rows at token t's slots.
void moe_combine(const void* back, const int32_t* slots, int rows, int ranks, int hidden, void* out,
                 cudaStream_t stream);

// Test/benchmark helpers: deterministic pseudo-random fills on the device.
// bf16: normal-ish values with standard deviation `scale`; u8: uniform bytes in [lo, hi].
void fill_random_bf16(void* data, int64_t n, uint64_t seed, float scale, float offset, cudaStream_t stream);
void fill_random_u8(void* data, int64_t n, uint64_t seed, int lo, int hi, cudaStream_t stream);

}  // namespace arbiter::cuda
