// CudaBackend: the Backend on one NVIDIA GPU. Host side only (compiled by the C++ compiler): memory,
// streams, step metadata, cuBLASLt plans, argument checks; the kernels live in the .cu files behind
// kernels/cuda/launch.h.
#include "kernels/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cuda/cuda_testing.h"
#include "kernels/cuda/launch.h"
#include "kernels/device_arena.h"

namespace arbiter {
namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}

void lt_check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("cuBLASLt: ") + what + " failed with status " + std::to_string(static_cast<int>(s)));
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("CudaBackend: " + what);
}

// RAII owners of CUDA and cuBLASLt objects.
struct StreamDeleter {
  void operator()(CUstream_st* s) const { cudaStreamDestroy(s); }
};
struct EventDeleter {
  void operator()(CUevent_st* e) const { cudaEventDestroy(e); }
};
struct PinnedDeleter {
  void operator()(void* p) const { cudaFreeHost(p); }
};
struct LtHandleDeleter {
  void operator()(cublasLtContext* h) const { cublasLtDestroy(h); }
};
struct LtDescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* d) const { cublasLtMatmulDescDestroy(d); }
};
struct LtLayoutDeleter {
  void operator()(cublasLtMatrixLayoutOpaque_t* l) const { cublasLtMatrixLayoutDestroy(l); }
};
struct LtPrefDeleter {
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const { cublasLtMatmulPreferenceDestroy(p); }
};
struct GraphExecDeleter {
  void operator()(CUgraphExec_st* g) const { cudaGraphExecDestroy(g); }
};
using StreamPtr = std::unique_ptr<CUstream_st, StreamDeleter>;
using EventPtr = std::unique_ptr<CUevent_st, EventDeleter>;
using PinnedPtr = std::unique_ptr<void, PinnedDeleter>;
using LtHandlePtr = std::unique_ptr<cublasLtContext, LtHandleDeleter>;
using LtDescPtr = std::unique_ptr<cublasLtMatmulDescOpaque_t, LtDescDeleter>;
using LtLayoutPtr = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LtLayoutDeleter>;
using LtPrefPtr = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, LtPrefDeleter>;
using GraphExecPtr = std::unique_ptr<CUgraphExec_st, GraphExecDeleter>;

DeviceBuffer device_alloc(size_t bytes) {
  void* p = nullptr;
  cuda_check(cudaMalloc(&p, std::max<size_t>(bytes, 1)), ("cudaMalloc of " + std::to_string(bytes) + " bytes").c_str());
  return DeviceBuffer(p, bytes, [](void* q) { cudaFree(q); });
}

EventPtr make_event() {
  cudaEvent_t e = nullptr;
  cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
  return EventPtr(e);
}

int pointer_alignment(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  int a = 256;
  while (a > 1 && v % static_cast<uintptr_t>(a) != 0) a /= 2;
  return a;
}

// Elements per row (Tensor::row_elements without its division, so that zero-row tensors are fine).
int64_t row_len(const Tensor& t) {
  if (t.shape.rank <= 1) return t.elements();
  int64_t n = 1;
  for (int i = 1; i < t.shape.rank; ++i) n *= t.shape[i];
  return n;
}

bool is_bf16_or_f32(const Tensor& t) { return t.dtype == DType::kBF16 || t.dtype == DType::kF32; }

// One reserved region: a single cudaMalloc and the arena that hands out its ranges. Held by
// shared_ptr by the backend and by every buffer carved from it, so it outlives them all.
struct ArenaRegion {
  explicit ArenaRegion(size_t bytes) : memory(device_alloc(bytes)), arena(memory.data(), bytes) {}
  DeviceBuffer memory;  // declared first: freed after the arena (which checks nothing is live)
  DeviceArena arena;
};

// Device memory that grows on demand (outside steps where possible) and never shrinks. Growing
// moves it: `moved` counts the moves (recorded steps that point at it are then stale). `exact`:
// exactly `bytes` (sized up front) rather than 1.5x the old size.
class Scratch {
 public:
  void* ensure(size_t bytes, cudaStream_t stream, uint64_t& moved, const std::function<DeviceBuffer(size_t)>& alloc,
               bool exact = false) {
    if (bytes > buffer_.bytes() || !buffer_.data()) {
      // Queued kernels may still read the old buffer.
      cuda_check(cudaStreamSynchronize(stream), "scratch grow");
      const size_t old = buffer_.bytes();
      buffer_ = DeviceBuffer();
      buffer_ = alloc(exact ? bytes : std::max(bytes, old + old / 2));
      ++moved;
    }
    return buffer_.data();
  }
  size_t bytes() const { return buffer_.bytes(); }

 private:
  DeviceBuffer buffer_;
};

// One reusable host+device pair for a step's metadata.
struct MetaSlot {
  DeviceBuffer device;
  PinnedPtr host;
  size_t capacity = 0;  // int32 elements
  EventPtr uploaded;
  bool in_use = false;
};

class CudaStepContext final : public StepContext {
 public:
  CudaStepContext(const StepLayout& layout, MetaSlot* slot, bool graph_slot)
      : graph_slot(graph_slot), layout_(layout), slot_(slot) {}
  ~CudaStepContext() override { slot_->in_use = false; }
  const StepLayout& layout() const override { return layout_; }
  cuda::StepArgs args;
  int32_t max_full_block = -1, max_ring_block = -1;
  // The metadata sits in the backend's one fixed graph slot, at addresses that depend only on the
  // step's shape (rows, sequences, logit rows): a recorded step of that shape can read it.
  const bool graph_slot;

 private:
  StepLayout layout_;
  MetaSlot* slot_;
};

// What a recorded step's argument checks required of the step it was recorded on, so that a replay
// (which runs no operation's host code) can check a new step against the same caches.
struct StepChecks {
  bool full = false;                      // has full-attention layers
  int64_t full_pool = INT64_MAX;          // smallest full-attention block pool
  int window = 0;                         // largest sliding window
  int64_t ring_pool = INT64_MAX;          // smallest sliding-window block pool
};

// A recorded decode step: one CUDA graph per (owner, rows, sequences, logit rows, block size, and
// under expert parallelism the step's exchange capacity, StepLayout::exchange_capacity).
struct StepGraph {
  GraphExecPtr exec;
  uint64_t generation = 0;  // the backend's memory generation it was recorded against
  StepChecks checks;
  int eager_runs = 0, failures = 0;
};
using StepGraphKey = std::tuple<const void*, int, int, int, int, int>;

const CudaStepContext& cuda_step(const StepContext& step) {
  const auto* s = dynamic_cast<const CudaStepContext*>(&step);
  require(s != nullptr, "step context was not prepared by a CUDA backend");
  return *s;
}

// The kernels' RoPE arguments (head_dim / 2 frequencies, the optional table).
cuda::RopeArgs rope_args(const RopeParams& rope, int head_dim) {
  require(head_dim > 0 && head_dim % 2 == 0 && static_cast<int>(rope.inv_freq.size()) == head_dim / 2 &&
              head_dim / 2 <= cuda::kMaxRopeHalf,
          "rope: inv_freq must have head_dim/2 (<= 128) entries");
  cuda::RopeArgs args{};
  std::copy(rope.inv_freq.begin(), rope.inv_freq.end(), args.inv_freq);
  args.concentration = rope.concentration;
  args.half = head_dim / 2;
  if (rope.table.data) {
    require(rope.table.dtype == DType::kF32 && rope.table.row_elements() == head_dim &&
                rope.table.rows() <= std::numeric_limits<int>::max(),
            "rope: table must be F32 [positions, head_dim]");
    args.table = rope.table.as<const float>();
    args.table_rows = static_cast<int>(rope.table.rows());
  }
  return args;
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    cudaDeviceProp prop{};
    cuda_check(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
    name_ = "cuda:" + std::to_string(device_) + " (" + prop.name + ", sm_" + std::to_string(prop.major) +
            std::to_string(prop.minor) + ")";
    cudaStream_t s = nullptr;
    cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    stream_.reset(s);
    cublasLtHandle_t h = nullptr;
    lt_check(cublasLtCreate(&h), "cublasLtCreate");
    lt_.reset(h);
    lt_workspace_ = device_alloc(kLtWorkspace);
    // ARBITER_CUDA_MOE=gemv|mma forces one MoE product path (tests, benchmarks); default: by batch.
    if (const char* env = std::getenv("ARBITER_CUDA_MOE")) {
      if (std::strcmp(env, "gemv") == 0) moe_path_ = cuda::MoePath::kGemv;
      if (std::strcmp(env, "mma") == 0) moe_path_ = cuda::MoePath::kMma;
    }
    // ARBITER_CUDA_GEMV=0: dense products of few rows through cuBLASLt too (tests, benchmarks).
    if (const char* env = std::getenv("ARBITER_CUDA_GEMV")) gemv_enabled_ = std::strcmp(env, "0") != 0;
    // ARBITER_CUDA_FUSE=0: q/k/v and the router as separate launches (A/B of the fused ones).
    if (const char* env = std::getenv("ARBITER_CUDA_FUSE")) fuse_enabled_ = std::strcmp(env, "0") != 0;
    // ARBITER_CUDA_MOE_GROUPS=2: routed vector-path MoE tasks of 16 tokens instead of 8.
    if (const char* env = std::getenv("ARBITER_CUDA_MOE_GROUPS")) moe_vec_groups_ = std::strcmp(env, "2") == 0 ? 2 : 1;
    // ARBITER_CUDA_MOE_PIPE=1: vector-path weights through a shared-memory cp.async ring;
    // ARBITER_CUDA_MOE_WARPS=4: gate_up blocks of 4 warps. Same bits; opt-in until measured.
    if (const char* env = std::getenv("ARBITER_CUDA_MOE_PIPE")) moe_vec_pipe_ = std::strcmp(env, "1") == 0;
    if (const char* env = std::getenv("ARBITER_CUDA_MOE_WARPS")) moe_gate_up_warps_ = std::strcmp(env, "4") == 0 ? 4 : 8;
    // ARBITER_CUDA_MOE_TILE=32|64: tensor-core MoE tiles of that many tokens instead of 128 (same bits).
    if (const char* env = std::getenv("ARBITER_CUDA_MOE_TILE")) moe_mma_tile_ = std::atoi(env);
    // ARBITER_CUDA_MOE_DEEP=1: the tensor-core MoE kernel's deeper cp.async pipeline (same bits).
    if (const char* env = std::getenv("ARBITER_CUDA_MOE_DEEP")) moe_mma_deep_ = std::strcmp(env, "1") == 0;
    // ARBITER_CUDA_ARENA=0: reserve() does nothing, every allocation is its own cudaMalloc (so that
    // compute-sanitizer memcheck sees overruns between tensors, which one region would hide).
    if (const char* env = std::getenv("ARBITER_CUDA_ARENA")) arena_enabled_ = std::strcmp(env, "0") != 0;
    // ARBITER_CUDA_GRAPHS=0: never record steps.
    if (const char* env = std::getenv("ARBITER_CUDA_GRAPHS")) graphs_enabled_ = std::strcmp(env, "0") != 0;
    // ARBITER_CUDA_CAPTURE=global: record under cudaStreamCaptureModeGlobal, where a host
    // synchronization by any thread during the recording fails it (tests assert there is none).
    if (const char* env = std::getenv("ARBITER_CUDA_CAPTURE"))
      if (std::strcmp(env, "global") == 0) capture_mode_ = cudaStreamCaptureModeGlobal;
    graph_meta_ = std::make_unique<MetaSlot>();
    graph_meta_->uploaded = make_event();
    // Row-selection workspace (argmax, top_logprobs): allocated once, zeroed; the kernels leave it zeroed.
    // Zeroed on the backend's own stream (non-blocking: a legacy-stream memset would not be ordered
    // before its kernels), and finished before the constructor returns.
    select_ws_ = device_alloc(cuda::selection_workspace_bytes());
    cuda_check(cudaMemsetAsync(select_ws_.data(), 0, select_ws_.bytes(), stream()), "selection workspace");
    attn_ws_ = device_alloc(cuda::attention_workspace_bytes());
    cuda_check(cudaMemsetAsync(attn_ws_.data(), 0, attn_ws_.bytes(), stream()), "attention workspace");
    route_ws_ = device_alloc(cuda::route_workspace_bytes());
    cuda_check(cudaMemsetAsync(route_ws_.data(), 0, route_ws_.bytes(), stream()), "router workspace");
    cuda_check(cudaStreamSynchronize(stream()), "workspace zeroing");
    // ARBITER_CUDA_ATTENTION=split|head|mma forces an attention kernel (tests, benchmarks).
    if (const char* env = std::getenv("ARBITER_CUDA_ATTENTION")) {
      if (std::strcmp(env, "split") == 0) attention_path_ = cuda::AttentionPath::kSplit;
      if (std::strcmp(env, "head") == 0) attention_path_ = cuda::AttentionPath::kPerHead;
      if (std::strcmp(env, "mma") == 0) attention_path_ = cuda::AttentionPath::kMma;
    }
    // ARBITER_CUDA_ATTN_BLOCKS=N: the split kernel aims at N blocks instead of 512 (fewer key splits
    // for few rows; benchmarks).
    if (const char* env = std::getenv("ARBITER_CUDA_ATTN_BLOCKS")) attention_split_blocks_ = std::max(1, std::atoi(env));
    // ARBITER_CUDA_FUSE=0 also keeps the KV store a launch of its own.
    store_in_attention_ = fuse_enabled_;
    // ARBITER_CUDA_ATTN_MIN_SPAN=N: at least N keys (rounded up to 32) per non-empty split.
    if (const char* env = std::getenv("ARBITER_CUDA_ATTN_MIN_SPAN"))
      attention_min_span_ = std::clamp((std::atoi(env) + 31) / 32 * 32, 32, 1 << 20);
  }
  ~CudaBackend() override { cudaStreamSynchronize(stream_.get()); }

  // One cudaMalloc for `bytes` of allocate() / import_weight() calls to come plus the MoE workspace
  // for the largest call announced (when larger than the current one); a second call adds a second
  // region (live buffers stay where they are).
  void reserve(size_t bytes, const MoeLimits& moe) override {
    if (!arena_enabled_) return;
    select();
    size_t moe_bytes = 0;
    if (moe.max_rows > 0 && moe.k > 0 && moe.experts > 0 && moe.max_rows * moe.k <= INT_MAX) {
      const size_t need = cuda::moe_workspace_bytes(static_cast<int>(moe.max_rows), moe.k, moe.experts, moe.hidden,
                                                    moe.intermediate);
      if (need > moe_scratch_.bytes()) moe_bytes = need;
    }
    const size_t total = bytes + (moe_bytes ? device_arena_bytes(moe_bytes) : 0);
    if (total == 0) return;
    arena_regions_.push_back(std::make_shared<ArenaRegion>(total));
    if (moe_bytes) {
      moe_scratch_.ensure(moe_bytes, stream(), generation_, [this](size_t n) { return device_memory(n); }, true);
      moe_dims_ = {moe.k, moe.experts, moe.hidden, moe.intermediate};
    }
  }

  CudaGraphStats graph_stats() const { return graph_stats_; }
  CudaArenaStats arena_stats() const {
    CudaArenaStats st;
    st.regions = arena_regions_.size();
    for (const auto& r : arena_regions_) {
      st.capacity += r->arena.capacity();
      st.bytes_in_use += r->arena.bytes_in_use();
      st.peak_bytes_in_use += r->arena.peak_bytes_in_use();
      st.live_allocations += r->arena.live_allocations();
    }
    st.arena_overflow_allocations = arena_overflow_allocations_;
    return st;
  }

  std::string name() const override { return name_; }
  DType activation_dtype() const override { return DType::kBF16; }
  DType kv_dtype() const override { return DType::kBF16; }

  DeviceBuffer allocate(size_t bytes) override {
    select();
    return device_memory(bytes);
  }

  Tensor import_weight(const Tensor& host) override {
    select();
    weights_.push_back(device_memory(host.bytes()));
    Tensor t = host;
    t.data = weights_.back().data();
    if (host.bytes() > 0)
      cuda_check(cudaMemcpy(t.data, host.data, host.bytes(), cudaMemcpyHostToDevice), "import_weight copy");
    return t;
  }

  void upload(const void* host, const Tensor& dst) override {
    select();
    if (dst.bytes() == 0) return;
    cuda_check(cudaMemcpyAsync(dst.data, host, dst.bytes(), cudaMemcpyHostToDevice, stream()), "upload");
    cuda_check(cudaStreamSynchronize(stream()), "upload sync");
  }

  void download(const Tensor& src, void* host) override {
    select();
    if (src.bytes() == 0) return;
    cuda_check(cudaMemcpyAsync(host, src.data, src.bytes(), cudaMemcpyDeviceToHost, stream()), "download");
    cuda_check(cudaStreamSynchronize(stream()), "download sync");
  }

  void fill_zero(const Tensor& dst) override {
    select();
    if (dst.bytes() == 0) return;
    cuda_check(cudaMemsetAsync(dst.data, 0, dst.bytes(), stream()), "fill_zero");
  }

  void synchronize() override {
    select();
    cuda_check(cudaStreamSynchronize(stream()), "synchronize");
  }

  std::unique_ptr<StepContext> prepare_step(const StepLayout& layout) override;

  void embedding(const Tensor& table, const StepContext& step, const Tensor& out) override {
    const auto& s = cuda_step(step);
    require(table.shape.rank == 2 && is_bf16_or_f32(table), "embedding: table must be bf16/f32 [vocab, dim]");
    require(out.dtype == DType::kBF16 && row_len(out) == table.shape[1] && out.rows() >= s.args.rows,
            "embedding: out must be bf16 [rows, dim]");
    select();
    cuda::embedding(table.data, table.dtype == DType::kBF16, table.shape[0], table.shape[1], s.args, out.data,
                    s.args.rows, stream());
  }

  void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) override {
    check_norm(x, weight, out);
    select();
    cuda::rms_norm(x.data, weight.data, weight.dtype == DType::kBF16, eps, out.data, static_cast<int>(x.rows()),
                   static_cast<int>(row_len(x)), stream());
  }

  void add_rms_norm(const Tensor& residual, const Tensor& delta, const Tensor& weight, float eps,
                    const Tensor& out) override {
    check_norm(residual, weight, out);
    require(delta.dtype == DType::kBF16 && delta.elements() == residual.elements(), "add_rms_norm: delta");
    select();
    cuda::add_rms_norm(residual.data, delta.data, weight.data, weight.dtype == DType::kBF16, eps, out.data,
                       static_cast<int>(residual.rows()), static_cast<int>(row_len(residual)), stream());
  }

  void linear(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& out) override;
  void linear_add_rms_norm(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& delta,
                           const Tensor& residual, const Tensor& norm_weight, float eps, const Tensor& out) override;
  void linear_group(const Tensor& x, std::span<const LinearTerm> terms) override;
  void linear_group_rope(const Tensor& x, std::span<const LinearTerm> terms, int head_dim, const RopeParams& rope,
                         const StepContext& step) override;
  void route(const Tensor& x, const Tensor& weight, const Tensor& bias, int k, const Tensor& logits,
             const Tensor& expert_ids, const Tensor& expert_weights) override;

  void rope(const Tensor& q, const Tensor& k, int head_dim, const RopeParams& rope, const StepContext& step) override {
    const auto& s = cuda_step(step);
    require(q.dtype == DType::kBF16 && k.dtype == DType::kBF16, "rope: q and k must be bf16");
    require(head_dim > 0 && head_dim % 2 == 0 && row_len(q) % head_dim == 0 && row_len(k) % head_dim == 0,
            "rope: head_dim");
    require(q.rows() == k.rows() && q.rows() <= s.args.rows, "rope: rows");
    const cuda::RopeArgs args = rope_args(rope, head_dim);  // checks inv_freq and the table
    select();
    cuda::rope(q.data, k.data, static_cast<int>(q.rows()), static_cast<int>(row_len(q) / head_dim),
               static_cast<int>(row_len(k) / head_dim), head_dim, args, s.args, stream());
  }

  void attention(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& cache, const Tensor& sinks,
                 const AttentionParams& p, const StepContext& step, const Tensor& out) override {
    run_attention(q, k, v, cache, sinks, p, step, out, false);
  }

  // Decode steps store k and v inside the split attention kernel (one launch fewer per layer).
  void attention_store(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& cache, const Tensor& sinks,
                       const AttentionParams& p, const StepContext& step, const Tensor& out) override {
    if (!run_attention(q, k, v, cache, sinks, p, step, out, store_in_attention_)) kv_store(k, v, cache, p, step);
  }

  // Returns whether the kernel also stored k and v (asked by `store`; see cuda::AttentionArgs::store_kv).
  bool run_attention(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& cache, const Tensor& sinks,
                     const AttentionParams& p, const StepContext& step, const Tensor& out, bool store) {
    const auto& s = cuda_step(step);
    check_attention_shapes(q, k, v, cache, p, s);
    require(is_bf16_or_f32(sinks) && sinks.elements() == p.num_q_heads, "attention: sinks");
    require(out.dtype == DType::kBF16 && out.elements() == q.elements(), "attention: out");
    cuda::AttentionArgs a{};
    a.q = q.data;
    a.k = k.data;
    a.v = v.data;
    a.cache_k = cache.k.data;
    a.cache_v = cache.v.data;
    a.sinks = sinks.data;
    a.sinks_bf16 = sinks.dtype == DType::kBF16;
    a.out = out.data;
    a.rows = static_cast<int>(q.rows());
    a.q_heads = p.num_q_heads;
    a.kv_heads = p.num_kv_heads;
    a.head_dim = p.head_dim;
    a.window = p.window;
    a.scale = p.scale;
    a.path = attention_path_;
    a.split_target_blocks = attention_split_blocks_;
    a.split_min_span = attention_min_span_;
    a.seqs = s.args.seqs;
    a.max_new = 0;
    a.min_new = 0;
    for (const SequenceStep& seq : s.layout().sequences) {
      a.max_new = std::max(a.max_new, seq.num_new);
      if (seq.num_new > 0) a.min_new = a.min_new == 0 ? seq.num_new : std::min(a.min_new, seq.num_new);
    }
    a.store_kv = store;
    select();
    return cuda::attention(a, s.args, attn_ws_.data(), stream());
  }

  void kv_store(const Tensor& k, const Tensor& v, const KvLayer& cache, const AttentionParams& p,
                const StepContext& step) override {
    const auto& s = cuda_step(step);
    check_attention_shapes(Tensor{}, k, v, cache, p, s);
    select();
    cuda::kv_store(k.data, v.data, cache.k.data, cache.v.data, static_cast<int>(k.rows()),
                   p.num_kv_heads * p.head_dim, p.window, s.args, stream());
  }

  void router_topk(const Tensor& logits, int k, const Tensor& expert_ids, const Tensor& expert_weights) override {
    require(logits.dtype == DType::kF32, "router_topk: logits must be f32");
    const int64_t n = row_len(logits);
    require(k > 0 && k <= n, "router_topk: k out of range");
    require(expert_ids.dtype == DType::kI32 && expert_ids.elements() == logits.rows() * k, "router_topk: ids");
    require(expert_weights.dtype == DType::kF32 && expert_weights.elements() == logits.rows() * k,
            "router_topk: weights");
    select();
    cuda::router_topk(logits.as<const float>(), static_cast<int>(logits.rows()), static_cast<int>(n), k,
                      expert_ids.as<int32_t>(), expert_weights.as<float>(), stream());
  }

  void moe_experts(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights, const ExpertWeights& ex,
                   float swiglu_limit, const Tensor& out) override {
    const int rows = static_cast<int>(x.rows());
    const int k = static_cast<int>(row_len(expert_ids));
    const int hidden = ex.hidden(), inter = ex.intermediate(), experts = ex.num_experts();
    require(x.dtype == DType::kBF16 && out.dtype == DType::kBF16, "moe_experts: x and out must be bf16");
    require(row_len(x) == hidden && row_len(out) == hidden && out.rows() == rows,
            "moe_experts: hidden size");
    require(expert_ids.dtype == DType::kI32 && expert_ids.rows() == rows, "moe_experts: ids");
    require(expert_weights.dtype == DType::kF32 && expert_weights.elements() == expert_ids.elements(),
            "moe_experts: weights");
    require(ex.gate_up_blocks.shape.rank == 4 && ex.gate_up_blocks.shape[1] == 2 * inter &&
                ex.gate_up_blocks.shape[2] * 32 == hidden && ex.gate_up_blocks.shape[3] == 16,
            "moe_experts: gate_up blocks shape");
    require(ex.gate_up_bias.dtype == DType::kBF16 && ex.down_bias.dtype == DType::kBF16, "moe_experts: biases bf16");
    require(hidden % 32 == 0 && inter % 32 == 0, "moe_experts: sizes must be multiples of 32");
    moe_dims_ = {k, experts, hidden, inter};
    if (rows == 0) return;
    select();
    cuda::MoeArgs a{};
    a.x = x.data;
    a.ids = expert_ids.as<const int32_t>();
    a.weights = expert_weights.as<const float>();
    a.gu_blocks = ex.gate_up_blocks.as<const uint8_t>();
    a.gu_scales = ex.gate_up_scales.as<const uint8_t>();
    a.gu_bias = ex.gate_up_bias.data;
    a.dn_blocks = ex.down_blocks.as<const uint8_t>();
    a.dn_scales = ex.down_scales.as<const uint8_t>();
    a.dn_bias = ex.down_bias.data;
    a.out = out.data;
    a.rows = rows;
    a.k = k;
    a.experts = experts;
    a.hidden = hidden;
    a.inter = inter;
    a.limit = swiglu_limit;
    a.path = moe_path_;
    a.vec_groups = moe_vec_groups_;
    a.vec_pipe = moe_vec_pipe_;
    a.vec_gate_up_warps = moe_gate_up_warps_;
    a.mma_tile = moe_mma_tile_;
    a.mma_deep = moe_mma_deep_;
    a.workspace = moe_scratch_.ensure(cuda::moe_workspace_bytes(rows, k, experts, hidden, inter), stream(), generation_,
                                      [this](size_t n) { return device_memory(n); });
    cuda::moe(a, stream());
  }

  // Expert-parallel dispatch and combine on the device; the host reads back only the rows per rank,
  // and nothing under a capacity (the fixed-capacity exchange: no synchronization, so a recorded
  // step may contain it).
  void* native_stream() override { return stream(); }
  void moe_dispatch_pack(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                         const Tensor& expert_owner, const Tensor& expert_local, const MoeSendBuffers& send,
                         std::span<int64_t> rows_per_rank, const Tensor& expert_load) override {
    const int64_t rows = x.shape.rank == 0 ? 0 : x.rows(), capacity = send.capacity;
    const int ranks = static_cast<int>(rows_per_rank.size());
    std::fill(rows_per_rank.begin(), rows_per_rank.end(), int64_t{0});
    if (rows == 0 && capacity == 0) return;
    const int k = static_cast<int>(row_len(send.ids)), experts = static_cast<int>(expert_owner.elements());
    require(ranks >= 1 && ranks <= cuda::kMaxDispatchRanks, "moe_dispatch_pack: 1..64 ranks");
    require(rows <= capacity || capacity == 0, "moe_dispatch_pack: more rows than the capacity");
    require(rows == 0 || (x.dtype == DType::kBF16 && send.x.dtype == DType::kBF16 && row_len(send.x) == row_len(x)),
            "moe_dispatch_pack: bf16 rows of one width");
    require(rows == 0 || (expert_ids.dtype == DType::kI32 && expert_weights.dtype == DType::kF32 &&
                          expert_ids.rows() == rows && row_len(expert_ids) == k &&
                          expert_weights.elements() == expert_ids.elements()),
            "moe_dispatch_pack: ids I32, weights F32 [rows, k]");
    require(expert_owner.dtype == DType::kI32 && expert_local.dtype == DType::kI32 &&
                expert_local.elements() == experts,
            "moe_dispatch_pack: owner and local maps I32 [experts]");
    const int64_t most = capacity > 0 ? ranks * capacity : rows * std::min(ranks, k);
    require(send.slots.dtype == DType::kI32 && send.slots.rows() >= rows && row_len(send.slots) == ranks &&
                send.x.rows() >= most && send.ids.dtype == DType::kI32 && send.weights.dtype == DType::kF32 &&
                send.ids.rows() >= most && send.weights.rows() >= most && row_len(send.weights) == k,
            "moe_dispatch_pack: send buffers need rows * min(ranks, k) rows (ranks * capacity under a capacity), "
            "slots [rows, ranks]");
    require(!expert_load.data || (expert_load.dtype == DType::kI32 && expert_load.elements() == experts),
            "moe_dispatch_pack: expert_load I32 [experts]");
    select();
    if (dispatch_counts_.bytes() < static_cast<size_t>(ranks + 1) * sizeof(int64_t))
      dispatch_counts_ = device_memory(static_cast<size_t>(cuda::kMaxDispatchRanks + 1) * sizeof(int64_t));
    auto* counts = static_cast<int64_t*>(dispatch_counts_.data());
    cuda::moe_dispatch_plan(expert_ids.as<const int32_t>(), expert_weights.as<const float>(), static_cast<int>(rows), k,
                            expert_owner.as<const int32_t>(), expert_local.as<const int32_t>(), experts, ranks,
                            static_cast<int>(capacity), send.slots.as<int32_t>(), send.ids.as<int32_t>(),
                            send.weights.as<float>(), counts, expert_load.as<int32_t>(), stream());
    if (rows > 0)
      cuda::moe_dispatch_copy(x.data, static_cast<int64_t>(row_len(x)) * 2, send.slots.as<const int32_t>(),
                              static_cast<int>(rows), ranks, send.x.data, stream());
    if (capacity > 0) return;  // (an id outside the placement is skipped: the plan leaves it out)
    std::vector<int64_t> host(static_cast<size_t>(ranks) + 1);
    cuda_check(cudaMemcpyAsync(host.data(), counts, host.size() * sizeof(int64_t), cudaMemcpyDeviceToHost, stream()),
               "dispatch counts");
    cuda_check(cudaStreamSynchronize(stream()), "dispatch counts sync");
    if (host[static_cast<size_t>(ranks)]) throw std::out_of_range("moe_dispatch_pack: an expert id outside the placement");
    std::copy(host.begin(), host.begin() + ranks, rows_per_rank.begin());
  }
  void count_expert_load(const Tensor& expert_ids, const Tensor& load) override {
    require(expert_ids.dtype == DType::kI32 && load.dtype == DType::kI32, "count_expert_load: ids and load must be I32");
    if (expert_ids.shape.rank == 0 || expert_ids.elements() == 0) return;
    select();
    cuda::count_expert_load(expert_ids.as<const int32_t>(), expert_ids.elements(), static_cast<int>(load.elements()),
                            load.as<int32_t>(), stream());
  }
  void moe_combine(const Tensor& back, const Tensor& slots, const Tensor& out) override {
    const int64_t rows = out.shape.rank == 0 ? 0 : out.rows();
    if (rows == 0) return;
    require(back.dtype == DType::kBF16 && out.dtype == DType::kBF16 && slots.dtype == DType::kI32 &&
                slots.rows() >= rows && (back.rows() == 0 || row_len(back) == row_len(out)),
            "moe_combine: bf16 back and out of one width, slots I32 [rows, ranks]");
    select();
    cuda::moe_combine(back.data, slots.as<const int32_t>(), static_cast<int>(rows), static_cast<int>(row_len(slots)),
                      static_cast<int>(row_len(out)), out.data, stream());
  }

  void add(const Tensor& x, const Tensor& y) override {
    require(x.dtype == DType::kBF16 && y.dtype == DType::kBF16 && x.elements() == y.elements(), "add: bf16, same size");
    select();
    cuda::add_bf16(x.data, y.data, x.elements(), stream());
  }

  void gather_logit_rows(const Tensor& x, const StepContext& step, const Tensor& out) override {
    const auto& s = cuda_step(step);
    require(x.dtype == out.dtype && row_len(x) == row_len(out) && out.rows() >= s.args.logit_count,
            "gather_logit_rows: shapes");
    select();
    cuda::gather_rows(x.data, out.data, static_cast<int64_t>(row_len(x) * dtype_size(x.dtype)), s.args,
                      stream());
  }

  void argmax(const Tensor& logits, const Tensor& out) override {
    require(logits.dtype == DType::kF32 && out.dtype == DType::kI32 && out.elements() >= logits.rows(),
            "argmax: f32 logits, i32 out");
    select();
    cuda::argmax(logits.as<const float>(), static_cast<int>(logits.rows()), row_len(logits),
                 out.as<int32_t>(), select_ws_.data(), stream());
  }

  void top_logprobs(const Tensor& logits, int k, const Tensor& ids, const Tensor& logprobs) override {
    const int64_t rows = logits.rows(), vocab = row_len(logits);
    require(logits.dtype == DType::kF32 && ids.dtype == DType::kI32 && logprobs.dtype == DType::kF32,
            "top_logprobs: logits and log-probabilities must be f32, ids i32");
    require(k >= 1 && k <= 64 && k <= vocab && ids.rows() == rows && logprobs.rows() == rows &&
                row_len(ids) == k && row_len(logprobs) == k,
            "top_logprobs: k = " + std::to_string(k) + " does not fit the tensors");
    if (rows == 0) return;
    // Vocabularies beyond what the kernel's merge holds (64 x 4096 entries): the host default.
    if (!cuda::top_logprobs_supported(vocab, k)) return Backend::top_logprobs(logits, k, ids, logprobs);
    select();
    cuda::top_logprobs(logits.as<const float>(), static_cast<int>(rows), vocab, k, ids.as<int32_t>(),
                       logprobs.as<float>(), select_ws_.data(), stream());
  }

  void run_step(const void* owner, const StepContext& step, const std::function<void()>& body) override;

  void forget_steps(const void* owner) override {
    // Called from destructors: no throwing. Let any replay of them still running finish first.
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream());
    for (auto it = graphs_.begin(); it != graphs_.end();) {
      if (std::get<0>(it->first) == owner) it = graphs_.erase(it);
      else ++it;
    }
  }

 private:
  static constexpr size_t kLtWorkspace = 32u << 20;

  struct LtPlan {
    LtDescPtr desc;
    LtLayoutPtr a, b, c;
    cublasLtMatmulAlgo_t algo{};
  };
  using LtKey = std::tuple<int64_t, int64_t, int64_t, int, bool, int, int, int>;

  cudaStream_t stream() const { return stream_.get(); }

  // Device memory for allocate(), import_weight() and the MoE workspace: from the reserved regions
  // (first fit, oldest region first) when one has room, else its own cudaMalloc, counted as an arena
  // overflow once anything was reserved. Freeing an arena range synchronizes the device first, as
  // cudaFree does, so that no queued kernel still uses a range that is handed out again.
  DeviceBuffer device_memory(size_t bytes) {
    for (const auto& region : arena_regions_) {
      DeviceBuffer range = region->arena.allocate(bytes, kDeviceArenaAlignment, region);
      if (!range.data()) continue;
      void* data = range.data();
      auto held = std::make_shared<DeviceBuffer>(std::move(range));
      return DeviceBuffer(data, bytes, [device = device_, held](void*) {
        int previous = -1;
        const bool restore = cudaGetDevice(&previous) == cudaSuccess && previous != device;
        cudaSetDevice(device);
        cudaDeviceSynchronize();
        if (restore) cudaSetDevice(previous);
        *held = DeviceBuffer();  // returns the range (the region stays alive while `held` needs it)
      });
    }
    if (!arena_regions_.empty()) {
      if (arena_overflow_allocations_++ == 0)
        std::fprintf(stderr,
                     "arbiter: CUDA: an allocation of %zu bytes did not fit the reserved device memory; using its own "
                     "cudaMalloc (counted as an arena overflow; reported once)\n",
                     bytes);
    }
    return device_alloc(bytes);
  }
  void select() const { cuda_check(cudaSetDevice(device_), "cudaSetDevice"); }

  void check_norm(const Tensor& x, const Tensor& weight, const Tensor& out) const {
    require(x.dtype == DType::kBF16 && out.dtype == DType::kBF16, "rms_norm: x and out must be bf16");
    require(out.elements() == x.elements(), "rms_norm: out size");
    require(is_bf16_or_f32(weight) && weight.elements() == row_len(x), "rms_norm: weight");
  }

  void check_attention_shapes(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& cache,
                              const AttentionParams& p, const CudaStepContext& s) const {
    require(p.num_q_heads > 0 && p.num_kv_heads > 0 && p.num_q_heads % p.num_kv_heads == 0, "attention: heads");
    require(p.head_dim == 64 || p.head_dim == 128, "attention: head_dim must be 64 or 128");
    const int64_t kv_row = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
    if (q.data) require(q.dtype == DType::kBF16 && row_len(q) == p.num_q_heads * p.head_dim, "attention: q");
    require(k.dtype == DType::kBF16 && v.dtype == DType::kBF16 && row_len(k) == kv_row &&
                row_len(v) == kv_row && k.rows() == v.rows() && k.rows() == s.args.rows,
            "attention: k/v must be bf16 [step rows, kv_heads*head_dim]");
    require(cache.k.dtype == DType::kBF16 && cache.v.dtype == DType::kBF16 && cache.k.shape.rank == 4 &&
                cache.k.shape[1] == s.args.block_size && cache.k.shape[2] * cache.k.shape[3] == kv_row &&
                cache.v.shape == cache.k.shape,
            "attention: cache must be bf16 [blocks, block_size, kv_heads, head_dim]");
    const int64_t pool = cache.k.shape[0];
    const int bs = s.args.block_size;
    if (recording_) {
      if (p.window > 0) {
        recording_->window = std::max(recording_->window, p.window);
        recording_->ring_pool = std::min(recording_->ring_pool, pool);
      } else {
        recording_->full = true;
        recording_->full_pool = std::min(recording_->full_pool, pool);
      }
    }
    for (const SequenceStep& seq : s.layout().sequences) {
      if (p.window > 0) {
        const int64_t ring = static_cast<int64_t>(seq.sliding_blocks.size()) * bs;
        require(ring >= std::min<int64_t>(p.window, seq.num_cached + seq.num_new), "sliding ring smaller than the window");
      } else {
        require(static_cast<int64_t>(seq.full_blocks.size()) * bs >= seq.num_cached + seq.num_new,
                "full-attention block table too short");
      }
    }
    require((p.window > 0 ? s.max_ring_block : s.max_full_block) < pool, "block id outside the cache pool");
  }

  // A replayed step runs no operation's host checks: check the step against what the recorded one needed.
  static void check_replay(const StepChecks& c, const CudaStepContext& s) {
    const int bs = s.args.block_size;
    for (const SequenceStep& seq : s.layout().sequences) {
      if (c.window > 0)
        require(static_cast<int64_t>(seq.sliding_blocks.size()) * bs >= std::min<int64_t>(c.window, seq.num_cached + seq.num_new),
                "sliding ring smaller than the window");
      if (c.full)
        require(static_cast<int64_t>(seq.full_blocks.size()) * bs >= seq.num_cached + seq.num_new,
                "full-attention block table too short");
    }
    if (c.window > 0) require(s.max_ring_block < c.ring_pool, "block id outside the cache pool");
    if (c.full) require(s.max_full_block < c.full_pool, "block id outside the cache pool");
  }

  MetaSlot& free_meta_slot() {
    for (auto& slot : meta_slots_)
      if (!slot->in_use) return *slot;
    meta_slots_.push_back(std::make_unique<MetaSlot>());
    meta_slots_.back()->uploaded = make_event();
    return *meta_slots_.back();
  }

  int device_;
  std::string name_;
  StreamPtr stream_;
  LtHandlePtr lt_;
  DeviceBuffer lt_workspace_;
  std::map<LtKey, LtPlan> lt_plans_;
  // Regions taken by reserve(), declared before every member holding memory carved from them (the
  // buffers keep their region alive anyway, see device_memory).
  std::vector<std::shared_ptr<ArenaRegion>> arena_regions_;
  size_t arena_overflow_allocations_ = 0;
  bool arena_enabled_ = true;
  std::vector<DeviceBuffer> weights_;
  std::vector<std::unique_ptr<MetaSlot>> meta_slots_;
  Scratch moe_scratch_;
  DeviceBuffer dispatch_counts_;  // moe_dispatch_pack: rows per rank and the error flag (int64 [65])
  DeviceBuffer select_ws_;  // argmax / top_logprobs partial results (fixed size, see launch.h)
  DeviceBuffer attn_ws_;    // split attention's partial results (fixed size)
  DeviceBuffer route_ws_;   // the fused router's block counter (zeroed)
  cuda::AttentionPath attention_path_ = cuda::AttentionPath::kAuto;
  int attention_split_blocks_ = 512;  // ARBITER_CUDA_ATTN_BLOCKS
  int attention_min_span_ = 32;       // ARBITER_CUDA_ATTN_MIN_SPAN
  bool store_in_attention_ = true;    // attention_store: the split kernel stores decode rows' k / v
  std::array<int, 4> moe_dims_{};  // k, experts, hidden, inter of the last moe_experts call
  cuda::MoePath moe_path_ = cuda::MoePath::kAuto;
  int moe_vec_groups_ = 1;  // ARBITER_CUDA_MOE_GROUPS=2: 16-token vector tasks (opt-in until measured)
  bool moe_vec_pipe_ = false;  // ARBITER_CUDA_MOE_PIPE=1 (opt-in until measured)
  int moe_gate_up_warps_ = 8;  // ARBITER_CUDA_MOE_WARPS=4 (opt-in until measured)
  int moe_mma_tile_ = 128;     // ARBITER_CUDA_MOE_TILE=32|64 (opt-in until measured)
  bool moe_mma_deep_ = false;  // ARBITER_CUDA_MOE_DEEP=1 (opt-in until measured)
  bool gemv_enabled_ = true;
  bool fuse_enabled_ = true;
  // Recorded decode steps. Their metadata lives in graph_meta_ (one slot, fixed addresses);
  // generation_ counts moves of memory they point at (that slot, the MoE workspace).
  bool graphs_enabled_ = true;
  std::unique_ptr<MetaSlot> graph_meta_;
  uint64_t generation_ = 1;
  std::map<StepGraphKey, StepGraph> graphs_;
  StepChecks* recording_ = nullptr;  // set while a step is being recorded
  cudaStreamCaptureMode capture_mode_ = cudaStreamCaptureModeThreadLocal;
  CudaGraphStats graph_stats_;
};

std::unique_ptr<StepContext> CudaBackend::prepare_step(const StepLayout& layout) {
  select();
  const int rows = static_cast<int>(layout.tokens.size());
  const int seqs = static_cast<int>(layout.sequences.size());
  const int logits = static_cast<int>(layout.logit_rows.size());
  require(layout.block_size > 0, "prepare_step: block size must be positive");
  std::vector<int32_t> pos(static_cast<size_t>(rows), -1), seq_of(static_cast<size_t>(rows), -1);
  size_t table_ints = 0;
  for (int si = 0; si < seqs; ++si) {
    const SequenceStep& s = layout.sequences[static_cast<size_t>(si)];
    require(s.num_new >= 0 && s.num_cached >= 0 && s.first_row >= 0 && s.first_row + s.num_new <= rows,
            "prepare_step: sequence rows outside the step");
    for (int i = 0; i < s.num_new; ++i) {
      const size_t r = static_cast<size_t>(s.first_row + i);
      require(seq_of[r] < 0, "prepare_step: a row belongs to two sequences");
      seq_of[r] = si;
      pos[r] = s.num_cached + i;
    }
    table_ints += s.full_blocks.size() + s.sliding_blocks.size();
  }
  for (int r = 0; r < rows; ++r) require(seq_of[static_cast<size_t>(r)] >= 0, "prepare_step: a row belongs to no sequence");
  for (int32_t r : layout.logit_rows) require(r >= 0 && r < rows, "prepare_step: logit row outside the step");

  // Layout of the metadata block (int32): tokens, row_pos, row_seq, seq_info, logit_rows, tables.
  const size_t o_tokens = 0, o_pos = o_tokens + static_cast<size_t>(rows), o_seq = o_pos + static_cast<size_t>(rows);
  const size_t o_info = o_seq + static_cast<size_t>(rows);
  const size_t o_logits = o_info + static_cast<size_t>(seqs) * cuda::kSeqFields;
  const size_t o_tables = o_logits + static_cast<size_t>(logits);
  const size_t total = std::max<size_t>(o_tables + table_ints, 1);

  // Decode-shaped steps (one new token per sequence) use the fixed graph slot when it is free, so
  // that run_step can record or replay them.
  const bool graph_slot = graphs_enabled_ && rows == seqs && !graph_meta_->in_use;
  MetaSlot& slot = graph_slot ? *graph_meta_ : free_meta_slot();
  if (slot.capacity < total) {
    const size_t cap = std::max<size_t>(total + total / 2, graph_slot ? size_t{1} << 18 : 4096);
    cuda_check(cudaStreamSynchronize(stream()), "step metadata grow");
    slot.device = device_alloc(cap * 4);
    void* host = nullptr;
    slot.host.reset();
    cuda_check(cudaMallocHost(&host, cap * 4), "cudaMallocHost");
    slot.host.reset(host);
    slot.capacity = cap;
    if (graph_slot) ++generation_;
  }
  // The previous upload from this pinned buffer must be done before it is rewritten.
  cuda_check(cudaEventSynchronize(slot.uploaded.get()), "step metadata event");
  auto* h = static_cast<int32_t*>(slot.host.get());
  std::copy(layout.tokens.begin(), layout.tokens.end(), h + o_tokens);
  std::copy(pos.begin(), pos.end(), h + o_pos);
  std::copy(seq_of.begin(), seq_of.end(), h + o_seq);
  std::copy(layout.logit_rows.begin(), layout.logit_rows.end(), h + o_logits);
  auto ctx = std::make_unique<CudaStepContext>(layout, &slot, graph_slot);
  size_t t = o_tables;
  for (int si = 0; si < seqs; ++si) {
    const SequenceStep& s = layout.sequences[static_cast<size_t>(si)];
    int32_t* info = h + o_info + static_cast<size_t>(si) * cuda::kSeqFields;
    info[cuda::kFirstRow] = s.first_row;
    info[cuda::kNumNew] = s.num_new;
    info[cuda::kNumCached] = s.num_cached;
    info[cuda::kFullOffset] = static_cast<int32_t>(t - o_tables);
    info[cuda::kFullCount] = static_cast<int32_t>(s.full_blocks.size());
    for (int32_t b : s.full_blocks) {
      require(b >= 0, "prepare_step: negative block id");
      ctx->max_full_block = std::max(ctx->max_full_block, b);
      h[t++] = b;
    }
    info[cuda::kRingOffset] = static_cast<int32_t>(t - o_tables);
    info[cuda::kRingCount] = static_cast<int32_t>(s.sliding_blocks.size());
    for (int32_t b : s.sliding_blocks) {
      require(b >= 0, "prepare_step: negative block id");
      ctx->max_ring_block = std::max(ctx->max_ring_block, b);
      h[t++] = b;
    }
    info[7] = 0;
  }
  cuda_check(cudaMemcpyAsync(slot.device.data(), h, total * 4, cudaMemcpyHostToDevice, stream()), "step upload");
  cuda_check(cudaEventRecord(slot.uploaded.get(), stream()), "step event");
  slot.in_use = true;

  const auto* d = static_cast<const int32_t*>(slot.device.data());
  cuda::StepArgs& a = ctx->args;
  a.tokens = d + o_tokens;
  a.row_pos = d + o_pos;
  a.row_seq = d + o_seq;
  a.seq_info = d + o_info;
  a.logit_rows = d + o_logits;
  a.tables = d + o_tables;
  a.rows = rows;
  a.seqs = seqs;
  a.logit_count = logits;
  a.block_size = layout.block_size;

  // Grow the MoE workspace for this step's rows now rather than inside the step.
  if (moe_dims_[1] > 0)
    moe_scratch_.ensure(cuda::moe_workspace_bytes(rows, moe_dims_[0], moe_dims_[1], moe_dims_[2], moe_dims_[3]),
                        stream(), generation_, [this](size_t n) { return device_memory(n); });
  return ctx;
}

// Decode steps as CUDA graphs: the first step of a shape (per owner) runs directly (it creates the
// cuBLASLt plans and grows the workspaces), the second is recorded by stream capture and replayed,
// and later ones replay the recording after checking the step against what the recorded one needed.
// A recording that fails (an operation that cannot be captured) falls back to running directly.
void CudaBackend::run_step(const void* owner, const StepContext& step, const std::function<void()>& body) {
  const auto& s = cuda_step(step);
  if (!graphs_enabled_ || !s.graph_slot || recording_) return body();
  select();
  StepGraph& g = graphs_[StepGraphKey{owner, s.args.rows, s.args.seqs, s.args.logit_count, s.args.block_size,
                                      s.layout().exchange_capacity}];
  if (g.exec && g.generation == generation_) {
    check_replay(g.checks, s);
    cuda_check(cudaGraphLaunch(g.exec.get(), stream()), "cudaGraphLaunch");
    ++graph_stats_.replayed;
    return;
  }
  g.exec.reset();
  if (g.eager_runs < 1 || g.failures >= 2) {
    ++g.eager_runs;
    return body();
  }
  g.checks = StepChecks{};
  const uint64_t generation = generation_;
  cuda_check(cudaStreamBeginCapture(stream(), capture_mode_), "cudaStreamBeginCapture");
  recording_ = &g.checks;
  bool ok = true;
  try {
    body();
  } catch (...) {
    ok = false;  // an argument error is thrown again below, when the step runs directly
  }
  recording_ = nullptr;
  cudaGraph_t graph = nullptr;
  ok = cudaStreamEndCapture(stream(), &graph) == cudaSuccess && ok && graph && generation == generation_;
  cudaGraphExec_t exec = nullptr;
  if (ok) ok = cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
  if (graph) cudaGraphDestroy(graph);
  if (ok) {
    g.exec.reset(exec);
    g.generation = generation_;
    cuda_check(cudaGraphLaunch(exec, stream()), "cudaGraphLaunch");
    ++graph_stats_.recorded;
    return;
  }
  ++graph_stats_.failed;
  cudaGetLastError();  // clear the capture's error
  if (g.failures++ == 0) std::fprintf(stderr, "arbiter: CUDA graph recording of a decode step failed; running it directly\n");
  body();
}

// Decode's q, k and v as one GEMV launch (k and v alone fill only a few SMs); anything the GEMV
// does not take runs as separate products.
void CudaBackend::linear_group(const Tensor& x, std::span<const LinearTerm> terms) {
  const int64_t m = x.rows(), k = row_len(x);
  bool grouped = gemv_enabled_ && fuse_enabled_ && !terms.empty() && terms.size() <= static_cast<size_t>(cuda::kGemvMaxTargets) &&
                 x.dtype == DType::kBF16 && m >= 1 && m <= cuda::kGemvMaxRows && pointer_alignment(x.data) >= 16;
  for (const LinearTerm& t : terms) {
    if (!grouped) break;
    grouped = t.weight.dtype == DType::kBF16 && t.weight.shape.rank == 2 && t.weight.shape[1] == k &&
              cuda::gemv_supported(static_cast<int>(m), t.weight.shape[0], k) &&
              pointer_alignment(t.weight.data) >= 16 && t.out.dtype == terms[0].out.dtype &&
              (t.out.dtype == DType::kBF16 || t.out.dtype == DType::kF32) && t.out.rows() == m &&
              row_len(t.out) == t.weight.shape[0] &&
              (!t.bias.data || (t.bias.dtype == DType::kBF16 && t.bias.elements() == t.weight.shape[0]));
  }
  if (!grouped) {
    Backend::linear_group(x, terms);
    return;
  }
  select();
  cuda::GemvTarget targets[cuda::kGemvMaxTargets];
  for (size_t j = 0; j < terms.size(); ++j)
    targets[j] = {terms[j].weight.data, terms[j].bias.data, terms[j].out.data, terms[j].weight.shape[0]};
  cuda::gemv_group(x.data, static_cast<int>(m), targets, static_cast<int>(terms.size()),
                   terms[0].out.dtype == DType::kF32, k, stream());
}

// Decode's q/k/v with RoPE in the GEMV's epilogue (one launch, the bits of linear_group + rope); other
// shapes as the two operations.
void CudaBackend::linear_group_rope(const Tensor& x, std::span<const LinearTerm> terms, int head_dim,
                                    const RopeParams& rope, const StepContext& step) {
  const auto& s = cuda_step(step);
  const int64_t m = x.rows(), k = row_len(x);
  bool fused = gemv_enabled_ && fuse_enabled_ && terms.size() >= 2 &&
               terms.size() <= static_cast<size_t>(cuda::kGemvMaxTargets) && x.dtype == DType::kBF16 && m >= 1 &&
               m <= cuda::kGemvMaxRows && m <= s.args.rows && pointer_alignment(x.data) >= 16 && head_dim > 0 &&
               head_dim % 8 == 0 && head_dim / 2 <= cuda::kMaxRopeHalf &&
               static_cast<int>(rope.inv_freq.size()) == head_dim / 2;
  for (size_t j = 0; j < terms.size() && fused; ++j) {
    const LinearTerm& t = terms[j];
    fused = t.weight.dtype == DType::kBF16 && t.weight.shape.rank == 2 && t.weight.shape[1] == k &&
            cuda::gemv_supported(static_cast<int>(m), t.weight.shape[0], k) && pointer_alignment(t.weight.data) >= 16 &&
            t.out.dtype == DType::kBF16 && t.out.rows() == m && row_len(t.out) == t.weight.shape[0] &&
            (!t.bias.data || (t.bias.dtype == DType::kBF16 && t.bias.elements() == t.weight.shape[0])) &&
            (j >= 2 || t.weight.shape[0] % head_dim == 0);
  }
  if (!fused) {
    Backend::linear_group_rope(x, terms, head_dim, rope, step);
    return;
  }
  cuda::GemvRope r;
  r.args = rope_args(rope, head_dim);
  r.row_pos = s.args.row_pos;
  r.head_dim = head_dim;
  r.targets = 2;
  select();
  cuda::GemvTarget targets[cuda::kGemvMaxTargets];
  for (size_t j = 0; j < terms.size(); ++j)
    targets[j] = {terms[j].weight.data, terms[j].bias.data, terms[j].out.data, terms[j].weight.shape[0]};
  cuda::gemv_group(x.data, static_cast<int>(m), targets, static_cast<int>(terms.size()), false, k, stream(), &r);
}

// Decode's o projection with the residual add + RMSNorm in its last block (one launch, the bits of
// linear + add_rms_norm); other shapes as the two operations.
void CudaBackend::linear_add_rms_norm(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& delta,
                                      const Tensor& residual, const Tensor& norm_weight, float eps, const Tensor& out) {
  const int64_t m = x.rows(), n = w.shape.rank == 2 ? w.shape[0] : 0;
  const bool fused = gemv_enabled_ && fuse_enabled_ && x.dtype == DType::kBF16 && w.dtype == DType::kBF16 &&
                     w.shape.rank == 2 && w.shape[1] == row_len(x) && m >= 1 && m <= cuda::kGemvMaxRows &&
                     cuda::gemv_supported(static_cast<int>(m), n, w.shape[1]) && pointer_alignment(x.data) >= 16 &&
                     pointer_alignment(w.data) >= 16 &&
                     (!bias.data || (bias.dtype == DType::kBF16 && bias.elements() == n)) &&
                     delta.dtype == DType::kBF16 && delta.rows() == m && row_len(delta) == n &&
                     residual.dtype == DType::kBF16 && residual.rows() == m && row_len(residual) == n &&
                     out.dtype == DType::kBF16 && out.rows() == m && row_len(out) == n &&
                     (norm_weight.dtype == DType::kBF16 || norm_weight.dtype == DType::kF32) && norm_weight.elements() == n &&
                     n <= std::numeric_limits<int>::max();
  if (!fused) {
    Backend::linear_add_rms_norm(x, w, bias, delta, residual, norm_weight, eps, out);
    return;
  }
  select();
  cuda::gemv_add_rms_norm(x.data, static_cast<int>(m), w.data, bias.data, delta.data, n, w.shape[1], residual.data,
                          norm_weight.data, norm_weight.dtype == DType::kBF16, eps, out.data, route_ws_.data(), stream());
}

// Decode's router as one launch (GEMV + top-k in its last block); other shapes as two operations.
void CudaBackend::route(const Tensor& x, const Tensor& weight, const Tensor& bias, int k, const Tensor& logits,
                        const Tensor& expert_ids, const Tensor& expert_weights) {
  const int64_t m = x.rows();
  const bool fused = gemv_enabled_ && fuse_enabled_ && x.dtype == DType::kBF16 && weight.dtype == DType::kBF16 &&
                     weight.shape.rank == 2 && m >= 1 && m <= cuda::kGemvMaxRows &&
                     cuda::route_supported(static_cast<int>(m), weight.shape[0], weight.shape[1], k) &&
                     row_len(x) == weight.shape[1] && pointer_alignment(x.data) >= 16 &&
                     pointer_alignment(weight.data) >= 16 && logits.dtype == DType::kF32 && logits.rows() == m &&
                     row_len(logits) == weight.shape[0] &&
                     (!bias.data || (bias.dtype == DType::kBF16 && bias.elements() == weight.shape[0])) &&
                     expert_ids.dtype == DType::kI32 && expert_weights.dtype == DType::kF32 && expert_ids.rows() == m &&
                     expert_weights.rows() == m && row_len(expert_ids) == k && row_len(expert_weights) == k;
  if (!fused) {
    Backend::route(x, weight, bias, k, logits, expert_ids, expert_weights);
    return;
  }
  select();
  cuda::route(x.data, static_cast<int>(m), weight.data, bias.data, static_cast<float*>(logits.data), weight.shape[0],
              weight.shape[1], k, static_cast<int32_t*>(expert_ids.data), static_cast<float*>(expert_weights.data),
              route_ws_.data(), stream());
}

void CudaBackend::linear(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& out) {
  require(x.dtype == DType::kBF16, "linear: x must be bf16");
  require(weight.dtype == DType::kBF16 && weight.shape.rank == 2, "linear: weight must be bf16 [out, in]");
  require(out.dtype == DType::kBF16 || out.dtype == DType::kF32, "linear: out must be bf16 or f32");
  const int64_t m = x.rows(), n = weight.shape[0], k = weight.shape[1];
  require(row_len(x) == k && row_len(out) == n && out.rows() == m, "linear: shapes");
  require(!bias.data || (bias.dtype == DType::kBF16 && bias.elements() == n), "linear: bias must be bf16 [out]");
  if (m == 0) return;
  select();
  const bool out_bf16 = out.dtype == DType::kBF16;
  // Few rows (decode): the weights are streamed once by a matrix-vector kernel with the bias fused.
  if (gemv_enabled_ && cuda::gemv_supported(static_cast<int>(std::min<int64_t>(m, INT32_MAX)), n, k) &&
      pointer_alignment(x.data) >= 16 && pointer_alignment(weight.data) >= 16) {
    cuda::gemv(x.data, static_cast<int>(m), weight.data, bias.data, out.data, !out_bf16, n, k, stream());
    return;
  }
  const bool epilogue_bias = bias.data && out_bf16;
  const LtKey key{m, n, k, out_bf16 ? 1 : 0, epilogue_bias, pointer_alignment(weight.data), pointer_alignment(x.data),
                  pointer_alignment(out.data)};
  auto it = lt_plans_.find(key);
  if (it == lt_plans_.end()) {
    LtPlan plan;
    cublasLtMatmulDesc_t desc = nullptr;
    lt_check(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
    plan.desc.reset(desc);
    const cublasOperation_t transa = CUBLAS_OP_T, transb = CUBLAS_OP_N;
    lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &transa, sizeof(transa)), "TRANSA");
    lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &transb, sizeof(transb)), "TRANSB");
    if (epilogue_bias) {
      const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
      const cudaDataType_t bias_type = CUDA_R_16BF;
      lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)), "EPILOGUE");
      lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)),
               "BIAS_DATA_TYPE");
    }
    // Column-major view: out^T [n, m] = W [n, k] (stored as k x n, transposed) * x^T [k, m].
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
    lt_check(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, static_cast<uint64_t>(k), static_cast<uint64_t>(n), k), "layout A");
    plan.a.reset(la);
    lt_check(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, static_cast<uint64_t>(k), static_cast<uint64_t>(m), k), "layout B");
    plan.b.reset(lb);
    lt_check(cublasLtMatrixLayoutCreate(&lc, out_bf16 ? CUDA_R_16BF : CUDA_R_32F, static_cast<uint64_t>(n),
                                        static_cast<uint64_t>(m), n),
             "layout C");
    plan.c.reset(lc);
    cublasLtMatmulPreference_t pref_raw = nullptr;
    lt_check(cublasLtMatmulPreferenceCreate(&pref_raw), "PreferenceCreate");
    LtPrefPtr pref(pref_raw);
    const uint64_t ws = kLtWorkspace;
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref_raw, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
             "pref workspace");
    const uint32_t align_a = static_cast<uint32_t>(std::get<5>(key)), align_b = static_cast<uint32_t>(std::get<6>(key)),
                   align_c = static_cast<uint32_t>(std::get<7>(key));
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                                  sizeof(align_a)),
             "pref align A");
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                                  sizeof(align_b)),
             "pref align B");
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                                  sizeof(align_c)),
             "pref align C");
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c,
                                                  sizeof(align_c)),
             "pref align D");
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    lt_check(cublasLtMatmulAlgoGetHeuristic(lt_.get(), desc, la, lb, lc, lc, pref_raw, 1, &result, &found),
             "AlgoGetHeuristic");
    if (found < 1)
      throw std::runtime_error("cuBLASLt: no algorithm for " + std::to_string(m) + "x" + std::to_string(n) + "x" +
                               std::to_string(k));
    plan.algo = result.algo;
    it = lt_plans_.emplace(key, std::move(plan)).first;
  }
  LtPlan& plan = it->second;
  if (epilogue_bias) {
    const void* ptr = bias.data;
    lt_check(cublasLtMatmulDescSetAttribute(plan.desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr, sizeof(ptr)),
             "BIAS_POINTER");
  }
  const float alpha = 1.0f, beta = 0.0f;
  lt_check(cublasLtMatmul(lt_.get(), plan.desc.get(), &alpha, weight.data, plan.a.get(), x.data, plan.b.get(), &beta,
                          out.data, plan.c.get(), out.data, plan.c.get(), &plan.algo, lt_workspace_.data(),
                          kLtWorkspace, stream()),
           "Matmul");
  if (bias.data && !out_bf16)
    cuda::add_bias_f32(out.as<float>(), bias.data, static_cast<int>(m), static_cast<int>(n), stream());
}

}  // namespace

void cuda_copy_on_stream(void* dst, const void* src, size_t bytes, void* stream) {
  cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream)),
             "cudaMemcpyAsync (device to device)");
}

void cuda_wait_stream(void* stream) { cuda_check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize"); }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device / no driver" error
    return 0;
  }
  return n;
}

std::unique_ptr<Backend> make_cuda_backend(int device) {
  const int count = cuda_device_count();
  if (device < 0 || device >= count)
    throw std::runtime_error("CUDA device " + std::to_string(device) + " not available (" + std::to_string(count) +
                             " visible)");
  return std::make_unique<CudaBackend>(device);
}

CudaGraphStats cuda_graph_stats(const Backend& backend) {
  const auto* cuda = dynamic_cast<const CudaBackend*>(&backend);
  if (!cuda) throw std::invalid_argument("cuda_graph_stats: " + backend.name() + " is not a CUDA backend");
  return cuda->graph_stats();
}

CudaArenaStats cuda_arena_stats(const Backend& backend) {
  const auto* cuda = dynamic_cast<const CudaBackend*>(&backend);
  if (!cuda) throw std::invalid_argument("cuda_arena_stats: " + backend.name() + " is not a CUDA backend");
  return cuda->arena_stats();
}

void cuda_fill_random_bf16(const Tensor& t, uint64_t seed, float scale, float offset) {
  if (t.dtype != DType::kBF16) throw std::invalid_argument("cuda_fill_random_bf16: tensor must be bf16");
  cuda::fill_random_bf16(t.data, t.elements(), seed, scale, offset, nullptr);
  cuda_check(cudaDeviceSynchronize(), "fill_random_bf16");
}

void cuda_fill_random_u8(const Tensor& t, uint64_t seed, int lo, int hi) {
  if (t.dtype != DType::kU8) throw std::invalid_argument("cuda_fill_random_u8: tensor must be u8");
  cuda::fill_random_u8(t.data, t.elements(), seed, lo, hi, nullptr);
  cuda_check(cudaDeviceSynchronize(), "fill_random_u8");
}

}  // namespace arbiter
