// Row-wise selection over the vocabulary: argmax and top-k log-probabilities, both split over many
// blocks per row (a 201088-entry row is 800 KB; one block per row left most of the GPU idle).
//
// Both order values by a 64-bit composite, (order key of the value) << 32 | ~id, so that "larger value,
// then lower id" is one unsigned comparison; -0 is folded onto +0 (they tie, as on the CPU) and NaN
// sorts below every number. The blocks of a row write partial results to a workspace the backend
// allocates once (selection_workspace_bytes); the last block of the row to finish (counted with an
// atomic, the counter reset by that block) merges them, so each operation is one launch per 128 rows.
#include <algorithm>
#include <cfloat>

#include "kernels/cuda/common.cuh"

namespace arbiter::cuda {
namespace {

constexpr int kRowsPerLaunch = 128;  // rows one launch covers (the workspace holds their partials)

constexpr int kArgmaxThreads = 256;
constexpr int kArgmaxPerThread = 8;
constexpr int kArgmaxChunk = kArgmaxThreads * kArgmaxPerThread;  // logits per block

constexpr int kTopThreads = 256;
constexpr int kTopChunk = 4096;                                  // logits per block (held in shared memory)
constexpr int kTopMaxChunks = 64;                                // blocks per row at most
constexpr int kTopMaxCandidates = kTopMaxChunks * kTopLogprobsMaxK;  // what the merging block selects from

// Workspace layout (bytes from the start; every part 8-byte aligned).
constexpr size_t kWsArgmaxCounters = 0;                                          // u32 [rows]
constexpr size_t kWsTopCounters = kWsArgmaxCounters + 4 * kRowsPerLaunch;        // u32 [rows]
constexpr size_t kWsArgmaxBest = kWsTopCounters + 4 * kRowsPerLaunch;            // u64 [rows]
constexpr size_t kWsTopStats = kWsArgmaxBest + 8 * kRowsPerLaunch;               // float2 [rows, chunks]
constexpr size_t kWsTopCands = kWsTopStats + 8 * size_t{kRowsPerLaunch} * kTopMaxChunks;  // u64 [rows, chunks, 64]
constexpr size_t kWsBytes = kWsTopCands + 8 * size_t{kRowsPerLaunch} * kTopMaxChunks * kTopLogprobsMaxK;

// Order-preserving map of a float to u32 (larger float, larger key); -0 -> +0, NaN -> 0.
__device__ __forceinline__ uint32_t order_key(float v) {
  if (v != v) return 0u;
  const uint32_t u = v == 0.0f ? 0u : __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}
// Larger composite: larger value, then lower id.
__device__ __forceinline__ uint64_t composite(uint32_t key, int32_t id) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(id));
}
__device__ __forceinline__ int32_t composite_id(uint64_t c) {
  return static_cast<int32_t>(~static_cast<uint32_t>(c & 0xffffffffu));
}
__device__ __forceinline__ uint32_t composite_key(uint64_t c) { return static_cast<uint32_t>(c >> 32); }

__device__ __forceinline__ uint64_t warp_max_u64(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Max over a block (multiple of 32 threads); every thread gets the result.
__device__ __forceinline__ float block_max(float v, float* scratch /* 32 */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_max(lane < warps ? scratch[lane] : -INFINITY);
}

// Exclusive prefix sum over the block in thread order; `scratch` (32 entries) is free again after
// the caller's next __syncthreads.
__device__ __forceinline__ uint64_t block_exclusive_scan(uint64_t v, uint64_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  uint64_t inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    uint64_t w = lane < warps ? scratch[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint64_t t = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += t;
    }
    if (lane < warps) scratch[lane] = w;
  }
  __syncthreads();
  return (warp > 0 ? scratch[warp - 1] : 0) + inc - v;
}

// ---------------------------------------------------------------------------------------------
// argmax: each block reduces its chunk to one composite, folds it into the row's slot with
// atomicMax; the last block writes the id and clears the slot and the counter.

__global__ __launch_bounds__(kArgmaxThreads) void argmax_split_kernel(const float* logits, int64_t n, int chunks,
                                                                       int32_t* out, uint64_t* best_slots,
                                                                       uint32_t* counters) {
  pdl_begin();
  __shared__ uint64_t warp_best[kArgmaxThreads / 32];
  __shared__ bool last;
  const int row = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kArgmaxChunk;
  const float* l = logits + static_cast<int64_t>(row) * n;
  float v[kArgmaxPerThread];
#pragma unroll
  for (int i = 0; i < kArgmaxPerThread; ++i) {
    const int64_t idx = begin + i * kArgmaxThreads + threadIdx.x;
    v[i] = idx < n ? l[idx] : 0.0f;
  }
  uint64_t best = 0;  // below every real entry (id < 2^31 makes ~id nonzero)
#pragma unroll
  for (int i = 0; i < kArgmaxPerThread; ++i) {
    const int64_t idx = begin + i * kArgmaxThreads + threadIdx.x;
    if (idx < n) {
      const uint64_t c = composite(order_key(v[i]), static_cast<int32_t>(idx));
      best = c > best ? c : best;
    }
  }
  best = warp_max_u64(best);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kArgmaxThreads / 32; ++w) best = warp_best[w] > best ? warp_best[w] : best;
    atomicMax(reinterpret_cast<unsigned long long*>(best_slots + row), static_cast<unsigned long long>(best));
    __threadfence();
    last = atomicAdd(counters + row, 1u) == static_cast<uint32_t>(chunks - 1);
  }
  __syncthreads();
  if (!last || threadIdx.x != 0) return;
  __threadfence();
  const uint64_t result = atomicMax(reinterpret_cast<unsigned long long*>(best_slots + row), 0ull);
  out[row] = composite_id(result);
  best_slots[row] = 0;
  counters[row] = 0;
}

// ---------------------------------------------------------------------------------------------
// top_logprobs: each block holds its chunk of the row in shared memory, computes the chunk's max and
// sum of exp(x - max), and selects the chunk's top k (radix select on the order keys, then the ties
// at the k-th value by lowest id, then a bitonic sort); the last block of the row selects the row's
// top k from the chunks' candidates and turns values into log-probabilities.

struct SelectShared {
  uint32_t hist[256];
  uint64_t scan[32];
  uint64_t top[kTopLogprobsMaxK];
  float reduce[32];
  uint32_t digit, need;
  bool last;
};

// The k largest of vals[0, n) (1 <= k <= min(n, 64)) into sh.top[0, k), sorted by value descending
// then id ascending; sh.top[k, 64) are zero. Ties at the k-th value go to the lowest ids, which
// requires that equal values appear in increasing id order along vals. id_of(i) is the id of vals[i].
// Called by every thread of the block (at least 64 threads); ends with a __syncthreads.
template <class IdOf>
__device__ void block_select(const float* vals, int n, int k, IdOf id_of, SelectShared& sh) {
  const int tid = threadIdx.x, threads = blockDim.x;
  // Radix select, 8 bits at a time from the top: the k-th largest key is `prefix` at the end, and
  // `need` of the entries equal to it belong to the top k.
  uint32_t prefix = 0, mask = 0;
  uint32_t need = static_cast<uint32_t>(k);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += threads) sh.hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += threads) {
      const uint32_t key = order_key(vals[i]);
      if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l owns digits [8l, 8l + 8); `above` counts the entries in higher lanes' digits.
      uint32_t c[8], mine = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        c[j] = sh.hist[tid * 8 + j];
        mine += c[j];
      }
      uint32_t suffix = mine;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t t = __shfl_down_sync(0xffffffffu, suffix, o);
        if (tid + o < 32) suffix += t;
      }
      uint32_t above = suffix - mine;
#pragma unroll
      for (int j = 7; j >= 0; --j) {
        if (above < need && above + c[j] >= need) {
          sh.digit = static_cast<uint32_t>(tid * 8 + j);
          sh.need = need - above;
        }
        above += c[j];
      }
    }
    __syncthreads();
    prefix |= sh.digit << shift;
    mask |= 255u << shift;
    need = sh.need;
  }
  const uint32_t kth = prefix;
  const uint32_t greater_total = static_cast<uint32_t>(k) - need;
  // Collect in id order: each thread takes a contiguous range, a block scan gives its write offsets.
  const int per = (n + threads - 1) / threads;
  const int lo = min(n, tid * per), hi = min(n, lo + per);
  uint32_t gt = 0, eq = 0;
  for (int i = lo; i < hi; ++i) {
    const uint32_t key = order_key(vals[i]);
    gt += key > kth;
    eq += key == kth;
  }
  const uint64_t offsets = block_exclusive_scan((static_cast<uint64_t>(eq) << 32) | gt, sh.scan);
  uint32_t gt_pos = static_cast<uint32_t>(offsets & 0xffffffffu), eq_rank = static_cast<uint32_t>(offsets >> 32);
  for (int i = tid; i < kTopLogprobsMaxK; i += threads) sh.top[i] = 0;
  __syncthreads();
  for (int i = lo; i < hi; ++i) {
    const uint32_t key = order_key(vals[i]);
    if (key > kth) {
      sh.top[gt_pos++] = composite(key, id_of(i));
    } else if (key == kth) {
      if (eq_rank < need) sh.top[greater_total + eq_rank] = composite(key, id_of(i));
      ++eq_rank;
    }
  }
  // Bitonic sort of the 64 entries, descending (zeros last).
  for (int size = 2; size <= kTopLogprobsMaxK; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      if (tid < kTopLogprobsMaxK) {
        const int j = tid ^ stride;
        if (j > tid) {
          const uint64_t a = sh.top[tid], b = sh.top[j];
          const bool descending = (tid & size) == 0;
          if ((a < b) == descending) {
            sh.top[tid] = b;
            sh.top[j] = a;
          }
        }
      }
    }
  }
  __syncthreads();
}

struct TopShared {
  union {
    float chunk[kTopChunk];
    struct {
      float vals[kTopMaxCandidates];
      int32_t ids[kTopMaxCandidates];
    } merge;
  } u;
  SelectShared select;
};

__global__ __launch_bounds__(kTopThreads) void top_logprobs_kernel(const float* logits, int64_t vocab, int chunks,
                                                                    int k, int32_t* ids_out, float* lp_out,
                                                                    float2* stats, uint64_t* cands,
                                                                    uint32_t* counters) {
  pdl_begin();
  __shared__ TopShared sh;
  const int row = blockIdx.y, c = blockIdx.x, tid = threadIdx.x;
  const int64_t begin = static_cast<int64_t>(c) * kTopChunk;
  const int n = vocab - begin < kTopChunk ? static_cast<int>(vocab - begin) : kTopChunk;
  const float* l = logits + static_cast<int64_t>(row) * vocab + begin;
  float mx = -INFINITY;
#pragma unroll 4
  for (int i = tid; i < n; i += kTopThreads) {
    const float v = l[i];
    sh.u.chunk[i] = v;
    mx = fmaxf(mx, v);
  }
  mx = block_max(mx, sh.select.reduce);  // its __syncthreads also publish the chunk
  float sum = 0.0f;
  if (mx != -INFINITY)
    for (int i = tid; i < n; i += kTopThreads) sum += expf(sh.u.chunk[i] - mx);
  sum = block_sum(sum, sh.select.reduce);
  const int kk = min(k, n);
  block_select(sh.u.chunk, n, kk, [begin](int i) { return static_cast<int32_t>(begin + i); }, sh.select);
  float2* row_stats = stats + static_cast<int64_t>(row) * kTopMaxChunks;
  uint64_t* row_cands = cands + static_cast<int64_t>(row) * kTopMaxChunks * kTopLogprobsMaxK;
  if (tid < kk) row_cands[c * kTopLogprobsMaxK + tid] = sh.select.top[tid];
  if (tid == 0) row_stats[c] = make_float2(mx, sum);
  __threadfence();
  __syncthreads();
  if (tid == 0) sh.select.last = atomicAdd(counters + row, 1u) == static_cast<uint32_t>(chunks - 1);
  __syncthreads();
  if (!sh.select.last) return;
  __threadfence();

  // The last block of the row: candidates in chunk order (each chunk's sorted by value, then id, so
  // equal values appear in increasing id order), read past L1 (other blocks wrote them).
  const int per_chunk = min(k, kTopChunk);
  const int last_n = static_cast<int>(vocab - static_cast<int64_t>(chunks - 1) * kTopChunk);
  const int total = (chunks - 1) * per_chunk + min(k, last_n);
  for (int i = tid; i < total; i += kTopThreads) {
    const int chunk = i / per_chunk, j = i - chunk * per_chunk;
    const uint64_t cand = __ldcg(reinterpret_cast<const unsigned long long*>(row_cands) +
                                 chunk * kTopLogprobsMaxK + j);
    sh.u.merge.vals[i] = key_value(composite_key(cand));
    sh.u.merge.ids[i] = composite_id(cand);
  }
  // log of the softmax denominator from the chunks' (max, sum).
  float row_max = -INFINITY;
  for (int i = tid; i < chunks; i += kTopThreads) row_max = fmaxf(row_max, __ldcg(&row_stats[i].x));
  row_max = block_max(row_max, sh.select.reduce);
  float z = 0.0f;
  if (row_max != -INFINITY)
    for (int i = tid; i < chunks; i += kTopThreads) {
      const float2 s = __ldcg(&row_stats[i]);
      if (s.x != -INFINITY) z += s.y * expf(s.x - row_max);
    }
  z = block_sum(z, sh.select.reduce);
  const float log_z = row_max + logf(z);
  const int32_t* merge_ids = sh.u.merge.ids;
  block_select(sh.u.merge.vals, total, k, [merge_ids](int i) { return merge_ids[i]; }, sh.select);
  if (tid < k) {
    const uint64_t top = sh.select.top[tid];
    ids_out[static_cast<int64_t>(row) * k + tid] = composite_id(top);
    lp_out[static_cast<int64_t>(row) * k + tid] = key_value(composite_key(top)) - log_z;
  }
  if (tid == 0) counters[row] = 0;
}

int top_chunks(int64_t vocab) { return static_cast<int>((vocab + kTopChunk - 1) / kTopChunk); }

}  // namespace

size_t selection_workspace_bytes() { return kWsBytes; }

bool top_logprobs_supported(int64_t vocab, int k) {
  return k >= 1 && k <= kTopLogprobsMaxK && vocab >= k && top_chunks(vocab) <= kTopMaxChunks;
}

void argmax(const float* logits, int rows, int64_t n, int32_t* out, void* workspace, cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return;
  auto* ws = static_cast<uint8_t*>(workspace);
  const int64_t chunks = (n + kArgmaxChunk - 1) / kArgmaxChunk;
  if (chunks > 65535 || n > INT32_MAX) throw std::invalid_argument("argmax: row too long");
  for (int r0 = 0; r0 < rows; r0 += kRowsPerLaunch) {
    const int nr = std::min(kRowsPerLaunch, rows - r0);
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(nr));
    launch_kernel(argmax_split_kernel, grid, dim3(kArgmaxThreads), 0, stream, logits + static_cast<int64_t>(r0) * n, n,
                  static_cast<int>(chunks), out + r0, reinterpret_cast<uint64_t*>(ws + kWsArgmaxBest),
                  reinterpret_cast<uint32_t*>(ws + kWsArgmaxCounters));
    check_launch("argmax");
  }
}

void top_logprobs(const float* logits, int rows, int64_t vocab, int k, int32_t* ids, float* logprobs,
                  void* workspace, cudaStream_t stream) {
  if (rows <= 0) return;
  if (!top_logprobs_supported(vocab, k)) throw std::invalid_argument("top_logprobs: vocabulary or k out of range");
  auto* ws = static_cast<uint8_t*>(workspace);
  const int chunks = top_chunks(vocab);
  for (int r0 = 0; r0 < rows; r0 += kRowsPerLaunch) {
    const int nr = std::min(kRowsPerLaunch, rows - r0);
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(nr));
    launch_kernel(top_logprobs_kernel, grid, dim3(kTopThreads), 0, stream, logits + static_cast<int64_t>(r0) * vocab,
                  vocab, chunks, k, ids + static_cast<int64_t>(r0) * k, logprobs + static_cast<int64_t>(r0) * k,
                  reinterpret_cast<float2*>(ws + kWsTopStats), reinterpret_cast<uint64_t*>(ws + kWsTopCands),
                  reinterpret_cast<uint32_t*>(ws + kWsTopCounters));
    check_launch("top_logprobs");
  }
}

}  // namespace arbiter::cuda
