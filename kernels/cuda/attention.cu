// Attention over the paged KV cache with per-head sinks (gpt-oss.md §4.4), one thread block per
// (row, q head): each warp (4 or 8 per block) streams 32-key chunks (one key per lane for q·k, then
// the chunk's values accumulated with the key weights broadcast by shuffles) with an online softmax,
// and the warps' partial results are merged at the end. Keys below the sequence's num_cached come
// from the cache (full layers: block table; sliding layers: ring slot p mod ring size), the step's
// own keys from k/v. The sink joins the denominator only: warp 0 starts from max = sink, sum = 1.
#include <algorithm>
#include <type_traits>

#include "kernels/cuda/common.cuh"

namespace arbiter::cuda {
namespace {

// Warps per block: 4 for large steps; 8 when the step has few (row, head) pairs (decode), so that
// one block's keys are spread over more warps and fewer chunks run one after another.
template <int D, int kWarps>
__global__ __launch_bounds__(kWarps * 32) void attention_kernel(AttentionArgs a, StepArgs step) {
  pdl_begin();
  constexpr int kPerLane = D / 32;
  const int row = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kvh = h / (a.q_heads / a.kv_heads);
  const int pos = step.row_pos[row];
  const int32_t* info = step.seq_info + step.row_seq[row] * kSeqFields;
  if (info[kNumNew] >= a.row_max_new) return;  // the prefill kernel takes this sequence (whole block)
  const int num_cached = info[kNumCached], first_row = info[kFirstRow];
  const bool sliding = a.window > 0;
  const int first = sliding ? max(0, pos - a.window + 1) : 0;
  const int nkeys = pos - first + 1;
  const int64_t kv_row = static_cast<int64_t>(a.kv_heads) * D;
  const int bs = step.block_size;
  const int ring = info[kRingCount] * bs;
  const int32_t* full_table = step.tables + info[kFullOffset];
  const int32_t* ring_table = step.tables + info[kRingOffset];

  __shared__ float wm[kWarps], wl[kWarps];
  __shared__ float wacc[kWarps][D];

  float qr[D];
  {
    const uint4* qp = reinterpret_cast<const uint4*>(static_cast<const bf16*>(a.q) +
                                                     (static_cast<int64_t>(row) * a.q_heads + h) * D);
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const uint4 u = qp[i];
      qr[8 * i + 0] = bits_lo(u.x), qr[8 * i + 1] = bits_hi(u.x);
      qr[8 * i + 2] = bits_lo(u.y), qr[8 * i + 3] = bits_hi(u.y);
      qr[8 * i + 4] = bits_lo(u.z), qr[8 * i + 5] = bits_hi(u.z);
      qr[8 * i + 6] = bits_lo(u.w), qr[8 * i + 7] = bits_hi(u.w);
    }
  }
  const bf16* k_fresh = static_cast<const bf16*>(a.k);
  const bf16* v_fresh = static_cast<const bf16*>(a.v);
  const bf16* k_cache = static_cast<const bf16*>(a.cache_k);
  const bf16* v_cache = static_cast<const bf16*>(a.cache_v);

  float m = warp == 0 ? load_weight(a.sinks, a.sinks_bf16, h) : -INFINITY;
  float l = warp == 0 ? 1.0f : 0.0f;
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;

  for (int c = warp * 32; c < nkeys; c += kWarps * 32) {
    const int j = first + c + lane;
    const bool valid = c + lane < nkeys;
    int fresh = 0;
    int64_t off = 0;
    float s = -INFINITY;
    if (valid) {
      if (j >= num_cached) {
        fresh = 1;
        off = static_cast<int64_t>(first_row + j - num_cached) * kv_row + kvh * D;
      } else {
        int64_t block, slot;
        if (sliding) {
          const int r = j % ring;
          block = ring_table[r / bs];
          slot = r % bs;
        } else {
          block = full_table[j / bs];
          slot = j % bs;
        }
        off = (block * bs + slot) * kv_row + kvh * D;
      }
    }
    // The chunk's values: every lane loads its dims of all (up to) 32 keys, issued here, before the
    // keys are scored, so that both loads are in flight together; accumulated below with each key's
    // weight broadcast from the lane that scored it.
    const int count = min(32, nkeys - c);
    using VWord = typename std::conditional<kPerLane == 2, uint32_t, uint2>::type;
    VWord vv[32];
#pragma unroll
    for (int jj = 0; jj < 32; ++jj) {
      const int64_t oj = __shfl_sync(0xffffffffu, off, jj);
      const int fj = __shfl_sync(0xffffffffu, fresh, jj);
      if (jj < count) vv[jj] = *reinterpret_cast<const VWord*>((fj ? v_fresh : v_cache) + oj + lane * kPerLane);
    }
    if (valid) {
      const uint4* kp = reinterpret_cast<const uint4*>((fresh ? k_fresh : k_cache) + off);
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        const uint4 u = kp[i];
        dot += qr[8 * i + 0] * bits_lo(u.x) + qr[8 * i + 1] * bits_hi(u.x) + qr[8 * i + 2] * bits_lo(u.y) +
               qr[8 * i + 3] * bits_hi(u.y) + qr[8 * i + 4] * bits_lo(u.z) + qr[8 * i + 5] * bits_hi(u.z) +
               qr[8 * i + 6] * bits_lo(u.w) + qr[8 * i + 7] * bits_hi(u.w);
      }
      s = dot * a.scale;
    }
    const float m_new = fmaxf(m, warp_max(s));
    const float corr = expf(m - m_new);
    const float p = valid ? expf(s - m_new) : 0.0f;
    l = l * corr + warp_sum(p);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] *= corr;
#pragma unroll
    for (int jj = 0; jj < 32; ++jj) {
      const float pj = __shfl_sync(0xffffffffu, p, jj);
      if (jj < count) {
        if constexpr (kPerLane == 2) {
          acc[0] += pj * bits_lo(vv[jj]);
          acc[1] += pj * bits_hi(vv[jj]);
        } else {
          static_assert(kPerLane == 4, "head_dim 64 or 128");
          acc[0] += pj * bits_lo(vv[jj].x);
          acc[1] += pj * bits_hi(vv[jj].x);
          acc[2] += pj * bits_lo(vv[jj].y);
          acc[3] += pj * bits_hi(vv[jj].y);
        }
      }
    }
    m = m_new;
  }
  if (lane == 0) {
    wm[warp] = m;
    wl[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) wacc[warp][lane * kPerLane + i] = acc[i];
  __syncthreads();
  bf16* out = static_cast<bf16*>(a.out) + (static_cast<int64_t>(row) * a.q_heads + h) * D;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    float mx = wm[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, wm[w]);
    float den = 0.0f, num = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = expf(wm[w] - mx);
      den += wl[w] * f;
      num += wacc[w][i] * f;
    }
    out[i] = f2bf(num / den);
  }
}

// Steps with at most this many (row, q head) blocks use 8 warps per block.
constexpr int64_t kWideBlocks = 1024;

// ---------------------------------------------------------------------------------------------
// Split attention (flash-decoding): one block per (key split, kv head, row) computes all the q heads
// of that kv head's GQA group (at most 8), so each key and value is read once per group instead of
// once per q head, and a row's keys are spread over `splits` blocks so that a decode step with few
// rows still fills the GPU. The host picks `splits` from rows x kv heads only (never from the context
// length, so a recorded step stays valid as the context grows); each row divides its own keys into
// `splits` spans (multiples of 32 keys; trailing spans may be empty).
//
// A block walks its span in tiles of 128 keys: (1) thread t scores key t of the tile against the
// group's queries (q in shared memory, the key row in registers) while its value row arrives in
// shared memory by cp.async; (2) one warp per head takes the tile's max, rescales the running sum and
// turns the scores into probabilities in place; (3) warp w accumulates the values of keys w, w+4, ...
// (lane = dims), rescaled by the head's correction. At the end the 4 warps' sums are added in a fixed
// order. With one split the block normalizes (sink included) and writes the output; otherwise it
// writes (max, sum, unnormalized output) per head to the workspace and the last block of the
// (row, kv head) to finish merges the splits in split order (deterministic, so recorded steps replay
// to the bit) and resets the counter.
constexpr int kSplitThreads = 128;
constexpr int kSplitWarps = kSplitThreads / 32;
constexpr int kSplitTile = 128;
constexpr int kSplitMaxGroup = 8;
constexpr int kSplitMaxSplits = 32;
// Blocks of a launch with more than one split: at most this many (AttentionArgs::split_target_blocks,
// default 512, is clamped to it). Workspace: u32 counters [kSplitMaxBlocks], then per block float
// [kSplitMaxGroup][D + 2].
constexpr int kSplitMaxBlocks = 512;
constexpr size_t kSplitCounterBytes = 4 * kSplitMaxBlocks;
constexpr size_t kSplitPartialFloats = size_t{kSplitMaxGroup} * (128 + 2);

template <int D>
struct SplitShared {
  float q[kSplitMaxGroup][D];
  union {
    uint4 v[kSplitTile][D / 8];                   // the tile's value rows (bf16)
    float wacc[kSplitWarps][kSplitMaxGroup][D];  // the warps' sums at the end
  } u;
  float p[kSplitMaxGroup][kSplitTile];  // scores, then probabilities
  float m[kSplitMaxGroup], l[kSplitMaxGroup], corr[kSplitMaxGroup];
  bool last;
};

__device__ __forceinline__ void split_cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src));
}
__device__ __forceinline__ void split_cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

template <int D>
__global__ __launch_bounds__(kSplitThreads) void attention_split_kernel(AttentionArgs a, StepArgs step, int splits,
                                                                        float* partials, uint32_t* counters) {
  pdl_begin();
  constexpr int kPerLane = D / 32;
  __shared__ SplitShared<D> sh;
  const int split = blockIdx.x, kvh = blockIdx.y, row = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = a.q_heads / a.kv_heads;
  const int pos = step.row_pos[row];
  const int32_t* info = step.seq_info + step.row_seq[row] * kSeqFields;
  // The prefill kernel takes this sequence: every split of the row leaves (its counter untouched).
  if (info[kNumNew] >= a.row_max_new) return;
  const int num_cached = info[kNumCached], first_row = info[kFirstRow];
  if (a.store_kv && split == 0) {  // kv_store's copy of this row's kv head (see AttentionArgs::store_kv)
    const int64_t dst = kv_cache_row(step, info, pos, a.window) * a.kv_heads * D + static_cast<int64_t>(kvh) * D;
    const int64_t src = (static_cast<int64_t>(row) * a.kv_heads + kvh) * D;
    for (int i = tid; i < D; i += kSplitThreads) {
      static_cast<bf16*>(a.cache_k)[dst + i] = static_cast<const bf16*>(a.k)[src + i];
      static_cast<bf16*>(a.cache_v)[dst + i] = static_cast<const bf16*>(a.v)[src + i];
    }
  }
  const bool sliding = a.window > 0;
  const int first = sliding ? max(0, pos - a.window + 1) : 0;
  const int nkeys = pos - first + 1;
  // Keys per split: an equal share in multiples of 32, at least split_min_span (a short context then
  // uses the first few splits and leaves the others empty instead of giving each a sliver).
  const int span = max(a.split_min_span, ((nkeys + splits - 1) / splits + 31) & ~31);
  const int k_begin = first + split * span;
  const int k_end = min(pos + 1, k_begin + span);
  const int64_t kv_row = static_cast<int64_t>(a.kv_heads) * D;
  const int bs = step.block_size;
  const int ring = info[kRingCount] * bs;
  const int32_t* full_table = step.tables + info[kFullOffset];
  const int32_t* ring_table = step.tables + info[kRingOffset];
  const bf16* k_fresh = static_cast<const bf16*>(a.k);
  const bf16* v_fresh = static_cast<const bf16*>(a.v);
  const bf16* k_cache = static_cast<const bf16*>(a.cache_k);
  const bf16* v_cache = static_cast<const bf16*>(a.cache_v);
  const int64_t q_base = (static_cast<int64_t>(row) * a.q_heads + static_cast<int64_t>(kvh) * group) * D;

  for (int i = tid; i < group * D; i += kSplitThreads)
    sh.q[i / D][i % D] = bf2f(static_cast<const bf16*>(a.q)[q_base + i]);
  if (tid < kSplitMaxGroup) {
    sh.m[tid] = -INFINITY;
    sh.l[tid] = 0.0f;
  }
  float acc[kSplitMaxGroup][kPerLane];
#pragma unroll
  for (int g = 0; g < kSplitMaxGroup; ++g)
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[g][e] = 0.0f;
  __syncthreads();

  for (int t0 = k_begin; t0 < k_end; t0 += kSplitTile) {
    const int tile_n = min(kSplitTile, k_end - t0);
    // (1) Scores of key t0 + tid; its value row goes to shared memory meanwhile.
    if (tid < tile_n) {
      const int j = t0 + tid;
      int64_t off;
      bool fresh = j >= num_cached;
      if (fresh) {
        off = static_cast<int64_t>(first_row + j - num_cached) * kv_row + static_cast<int64_t>(kvh) * D;
      } else {
        int64_t block, slot;
        if (sliding) {
          const int r = j % ring;
          block = ring_table[r / bs];
          slot = r % bs;
        } else {
          block = full_table[j / bs];
          slot = j % bs;
        }
        off = (block * bs + slot) * kv_row + static_cast<int64_t>(kvh) * D;
      }
      const uint4* kp = reinterpret_cast<const uint4*>((fresh ? k_fresh : k_cache) + off);
      const uint4* vp = reinterpret_cast<const uint4*>((fresh ? v_fresh : v_cache) + off);
#pragma unroll
      for (int i = 0; i < D / 8; ++i) split_cp_async16(&sh.u.v[tid][i], vp + i);
      uint4 kr[D / 8];
#pragma unroll
      for (int i = 0; i < D / 8; ++i) kr[i] = kp[i];
      float dot[kSplitMaxGroup];
#pragma unroll
      for (int g = 0; g < kSplitMaxGroup; ++g) dot[g] = 0.0f;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        const float k0 = bits_lo(kr[i].x), k1 = bits_hi(kr[i].x), k2 = bits_lo(kr[i].y), k3 = bits_hi(kr[i].y);
        const float k4 = bits_lo(kr[i].z), k5 = bits_hi(kr[i].z), k6 = bits_lo(kr[i].w), k7 = bits_hi(kr[i].w);
#pragma unroll
        for (int g = 0; g < kSplitMaxGroup; ++g) {
          if (g < group) {
            const float4 qa = *reinterpret_cast<const float4*>(&sh.q[g][8 * i]);
            const float4 qb = *reinterpret_cast<const float4*>(&sh.q[g][8 * i + 4]);
            dot[g] += qa.x * k0 + qa.y * k1 + qa.z * k2 + qa.w * k3 + qb.x * k4 + qb.y * k5 + qb.z * k6 + qb.w * k7;
          }
        }
      }
#pragma unroll
      for (int g = 0; g < kSplitMaxGroup; ++g)
        if (g < group) sh.p[g][tid] = dot[g] * a.scale;
    }
    split_cp_async_wait_all();
    __syncthreads();
    // (2) Per head: the tile's max, the running max and sum, probabilities in place.
    for (int g = warp; g < group; g += kSplitWarps) {
      float sv[kSplitTile / 32];
      float tile_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < kSplitTile / 32; ++i) {
        const int j = lane + 32 * i;
        sv[i] = j < tile_n ? sh.p[g][j] : -INFINITY;
        tile_max = fmaxf(tile_max, sv[i]);
      }
      tile_max = warp_max(tile_max);
      const float m_old = sh.m[g];
      const float m_new = fmaxf(m_old, tile_max);
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kSplitTile / 32; ++i) {
        const int j = lane + 32 * i;
        const float pj = j < tile_n ? expf(sv[i] - m_new) : 0.0f;
        sh.p[g][j] = pj;
        sum += pj;
      }
      sum = warp_sum(sum);
      // Every lane read sh.m[g] above; lane 0 rewrites it below. A shuffle does not order shared
      // memory accesses (racecheck: read/write hazard on m within the warp), __syncwarp does.
      __syncwarp();
      if (lane == 0) {
        const float corr = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
        sh.corr[g] = corr;
        sh.l[g] = sh.l[g] * corr + sum;
        sh.m[g] = m_new;
      }
    }
    __syncthreads();
    // (3) Values: warp w takes keys w, w + 4, ... of the tile; lane owns dims [lane * kPerLane, +kPerLane).
#pragma unroll
    for (int g = 0; g < kSplitMaxGroup; ++g) {
      const float c = g < group ? sh.corr[g] : 0.0f;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[g][e] *= c;
    }
    for (int j = warp; j < tile_n; j += kSplitWarps) {
      float vf[kPerLane];
      if constexpr (kPerLane == 2) {
        const uint32_t w = reinterpret_cast<const uint32_t*>(&sh.u.v[j][0])[lane];
        vf[0] = bits_lo(w);
        vf[1] = bits_hi(w);
      } else {
        static_assert(kPerLane == 4, "head_dim 64 or 128");
        const uint2 w = reinterpret_cast<const uint2*>(&sh.u.v[j][0])[lane];
        vf[0] = bits_lo(w.x);
        vf[1] = bits_hi(w.x);
        vf[2] = bits_lo(w.y);
        vf[3] = bits_hi(w.y);
      }
#pragma unroll
      for (int g = 0; g < kSplitMaxGroup; ++g) {
        if (g < group) {
          const float pj = sh.p[g][j];
#pragma unroll
          for (int e = 0; e < kPerLane; ++e) acc[g][e] += pj * vf[e];
        }
      }
    }
    __syncthreads();  // the next tile overwrites p and the value rows
  }

  // The warps' sums, added in warp order.
#pragma unroll
  for (int g = 0; g < kSplitMaxGroup; ++g)
    if (g < group)
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) sh.u.wacc[warp][g][lane * kPerLane + e] = acc[g][e];
  __syncthreads();
  bf16* out = static_cast<bf16*>(a.out) + q_base;
  const int h0 = kvh * group;
  if (splits == 1) {
    for (int i = tid; i < group * D; i += kSplitThreads) {
      const int g = i / D, d = i % D;
      float num = 0.0f;
#pragma unroll
      for (int w = 0; w < kSplitWarps; ++w) num += sh.u.wacc[w][g][d];
      const float sink = load_weight(a.sinks, a.sinks_bf16, h0 + g);
      const float m = sh.m[g], mx = fmaxf(m, sink);
      const float f = expf(m - mx);
      // The merge's operations below with one non-empty split (explicit roundings, so the compiler's
      // contraction choices cannot differ): a row whose keys fit one span gets the same bits for any
      // split count, i.e. in any step.
      out[i] = f2bf(__fmul_rn(num, f) / __fmaf_rn(sh.l[g], f, expf(sink - mx)));
    }
    return;
  }
  const int64_t pair = static_cast<int64_t>(row) * a.kv_heads + kvh;
  constexpr int kStride = D + 2;  // floats per head in a partial: D sums, max, sum
  float* part = partials + (pair * splits + split) * kSplitMaxGroup * kStride;
  for (int i = tid; i < group * D; i += kSplitThreads) {
    const int g = i / D, d = i % D;
    float num = 0.0f;
#pragma unroll
    for (int w = 0; w < kSplitWarps; ++w) num += sh.u.wacc[w][g][d];
    part[g * kStride + d] = num;
  }
  if (tid < group) {
    part[tid * kStride + D] = sh.m[tid];
    part[tid * kStride + D + 1] = sh.l[tid];
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) sh.last = atomicAdd(counters + pair, 1u) == static_cast<uint32_t>(splits - 1);
  __syncthreads();
  if (!sh.last) return;
  __threadfence();
  // The merge. Every load is issued before its value is needed (the splits' maxima and sums into
  // shared memory by all threads at once, then each output's partial sums 8 splits at a time), while
  // the arithmetic keeps one fixed order: max over sink then splits 0, 1, ...; per split the factor
  // exp(m_s - max) (0 for an empty split); sums and numerators as fused multiply-adds in split order.
  const float* parts = partials + pair * splits * kSplitMaxGroup * kStride;
  static_assert(3 * kSplitMaxSplits * kSplitMaxGroup + 2 * kSplitMaxGroup <= kSplitMaxGroup * kSplitTile,
                "the merge's tables fit in the (no longer used) probabilities");
  float* split_max = &sh.p[0][0];                                     // [split][head]
  float* split_sum = split_max + kSplitMaxSplits * kSplitMaxGroup;    // [split][head]
  float* split_factor = split_sum + kSplitMaxSplits * kSplitMaxGroup; // [split][head]
  float* head_den = split_factor + kSplitMaxSplits * kSplitMaxGroup;  // [head]
  for (int i = tid; i < splits * group; i += kSplitThreads) {
    const int s = i / group, g = i % group;
    const float* ps = parts + (s * kSplitMaxGroup + g) * kStride;
    split_max[s * kSplitMaxGroup + g] = __ldcg(ps + D);
    split_sum[s * kSplitMaxGroup + g] = __ldcg(ps + D + 1);
  }
  __syncthreads();
  if (tid < group) {
    const int g = tid;
    const float sink = load_weight(a.sinks, a.sinks_bf16, h0 + g);
    float mx = sink;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, split_max[s * kSplitMaxGroup + g]);
    float den = expf(sink - mx);
    for (int s = 0; s < splits; ++s) {
      const float f = expf(split_max[s * kSplitMaxGroup + g] - mx);  // 0 for an empty split (max -inf)
      split_factor[s * kSplitMaxGroup + g] = f;
      den = __fmaf_rn(f, split_sum[s * kSplitMaxGroup + g], den);
    }
    head_den[g] = den;
  }
  __syncthreads();
  constexpr int kMergeBatch = 8;
  for (int i = tid; i < group * D; i += kSplitThreads) {
    const int g = i / D, d = i % D;
    float num = 0.0f;
    for (int s0 = 0; s0 < splits; s0 += kMergeBatch) {
      float v[kMergeBatch];
#pragma unroll
      for (int j = 0; j < kMergeBatch; ++j)
        v[j] = s0 + j < splits ? __ldcg(parts + ((s0 + j) * kSplitMaxGroup + g) * kStride + d) : 0.0f;
#pragma unroll
      for (int j = 0; j < kMergeBatch; ++j)
        if (s0 + j < splits) num = __fmaf_rn(split_factor[(s0 + j) * kSplitMaxGroup + g], v[j], num);
    }
    out[i] = f2bf(num / head_den[g]);
  }
  if (tid == 0) counters[pair] = 0;
}

// ---------------------------------------------------------------------------------------------
// Prefill attention on tensor cores (mma.m16n8k16, bf16 in, fp32 accumulate), FlashAttention-2 style.
// A block takes 16 x (8 / heads) consecutive new tokens of one sequence and `heads` q heads of one
// GQA group (heads = the group size, at most 8): warp w owns 16 tokens of one head as the MMA rows.
// The block walks the keys its tokens can see (causal, window) in tiles of 64: keys arrive in shared
// memory row-major by cp.async, values transposed through registers (so both MMA B operands are one
// 32-bit shared load, the rows padded by 8 bf16 so the loads hit distinct banks). Per tile a warp
// computes S = Q K^T (Q fragments held in registers for the whole walk), masks, runs the online
// softmax in the log2 domain seeded with the sink (max = sink, sum = 1, so a fully masked tile is
// harmless), and accumulates P V with P taken straight from the S accumulators as bf16 A fragments.
constexpr int kPrefillWarps = 8;
constexpr int kPrefillKeys = 64;

template <int D>
struct PrefillShared {
  bf16 k[kPrefillKeys][D + 8];   // keys, row-major
  bf16 vt[D][kPrefillKeys + 8];  // values, transposed (dim-major)
};

__device__ __forceinline__ void prefill_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
// (x, y) as bf16x2 `hi` (rounded) plus bf16x2 `lo` (the exact remainders x - hi.x, y - hi.y, rounded).
__device__ __forceinline__ void split_bf16x2(float x, float y, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  const float2 hf = __bfloat1622float2(h);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = pack_bf16x2(x - hf.x, y - hf.y);
}

template <int D>
__global__ __launch_bounds__(kPrefillWarps * 32) void attention_prefill_kernel(AttentionArgs a, StepArgs step,
                                                                               int heads) {
  pdl_begin();
  constexpr int kKSteps = D / 16, kDimTiles = D / 8;
  __shared__ __align__(16) PrefillShared<D> sh;
  const int seq = blockIdx.z;
  const int group = a.q_heads / a.kv_heads;
  const int chunks = group / heads;
  const int kvh = blockIdx.y / chunks, chunk = blockIdx.y % chunks;
  const int tokens = 16 * (kPrefillWarps / heads);
  const int32_t* info = step.seq_info + seq * kSeqFields;
  const int num_new = info[kNumNew], num_cached = info[kNumCached], first_row = info[kFirstRow];
  const int t0 = blockIdx.x * tokens;
  // The whole block: past the sequence's tokens, or a short sequence the split kernel takes.
  if (t0 >= num_new || num_new < a.mma_min_new) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int h = kvh * group + chunk * heads + warp % heads;
  const int wt0 = t0 + 16 * (warp / heads);  // this warp's first token
  const int ta = wt0 + gid, tb = ta + 8;     // this lane's two rows
  const bool va = ta < num_new, vb = tb < num_new;
  const int qpos_a = num_cached + ta, qpos_b = num_cached + tb;
  const bool sliding = a.window > 0;
  const int bs = step.block_size;
  const int ring = info[kRingCount] * bs;
  const int32_t* full_table = step.tables + info[kFullOffset];
  const int32_t* ring_table = step.tables + info[kRingOffset];
  const int64_t kv_row = static_cast<int64_t>(a.kv_heads) * D;
  const bf16* k_fresh = static_cast<const bf16*>(a.k);
  const bf16* v_fresh = static_cast<const bf16*>(a.v);
  const bf16* k_cache = static_cast<const bf16*>(a.cache_k);
  const bf16* v_cache = static_cast<const bf16*>(a.cache_v);

  // Q fragments (A operand, rows = this warp's 16 tokens, k = dims).
  uint32_t qf[kKSteps][4];
  {
    const auto* qa = reinterpret_cast<const uint32_t*>(static_cast<const bf16*>(a.q) +
                                                       (static_cast<int64_t>(first_row + (va ? ta : 0)) * a.q_heads + h) * D);
    const auto* qb = reinterpret_cast<const uint32_t*>(static_cast<const bf16*>(a.q) +
                                                       (static_cast<int64_t>(first_row + (vb ? tb : 0)) * a.q_heads + h) * D);
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      qf[kk][0] = va ? qa[8 * kk + tig] : 0u;
      qf[kk][1] = vb ? qb[8 * kk + tig] : 0u;
      qf[kk][2] = va ? qa[8 * kk + 4 + tig] : 0u;
      qf[kk][3] = vb ? qb[8 * kk + 4 + tig] : 0u;
    }
  }
  constexpr float kLog2e = 1.4426950408889634f;
  const float scale2 = a.scale * kLog2e;
  const float sink2 = load_weight(a.sinks, a.sinks_bf16, h) * kLog2e;
  float m_a = sink2, m_b = sink2;                        // running maxes (log2 domain), seeded with the sink
  float l_a = tig == 0 ? 1.0f : 0.0f, l_b = l_a;         // this lane's share of the sums (the sink's 1 once)
  float o[kDimTiles][4];
#pragma unroll
  for (int n = 0; n < kDimTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

  // Keys the block's tokens see, and the ones this warp's tokens see.
  const int last_token = min(num_new, t0 + tokens) - 1;
  const int hi = num_cached + last_token;
  const int lo = sliding ? max(0, num_cached + t0 - a.window + 1) : 0;
  const bool warp_rows = wt0 < num_new;
  const int warp_qmin = num_cached + wt0, warp_qmax = num_cached + min(wt0 + 15, num_new - 1);

  for (int kt = lo; kt <= hi; kt += kPrefillKeys) {
    const int n_keys = min(kPrefillKeys, hi + 1 - kt);
    __syncthreads();  // the previous tile's reads are done
    for (int c = threadIdx.x; c < kPrefillKeys * (D / 8); c += kPrefillWarps * 32) {
      // A warp takes 32 keys' same 8 dims: the transposed value stores then hit distinct banks.
      const int kr = c % kPrefillKeys, part = c / kPrefillKeys;
      if (kr < n_keys) {
        const int j = kt + kr;
        const bool fresh = j >= num_cached;
        int64_t off;
        if (fresh) {
          off = static_cast<int64_t>(first_row + j - num_cached) * kv_row;
        } else {
          int64_t block, slot;
          if (sliding) {
            const int r = j % ring;
            block = ring_table[r / bs];
            slot = r % bs;
          } else {
            block = full_table[j / bs];
            slot = j % bs;
          }
          off = (block * bs + slot) * kv_row;
        }
        off += static_cast<int64_t>(kvh) * D + part * 8;
        split_cp_async16(&sh.k[kr][part * 8], (fresh ? k_fresh : k_cache) + off);
        const uint4 vv = *reinterpret_cast<const uint4*>((fresh ? v_fresh : v_cache) + off);
        const bf16* ve = reinterpret_cast<const bf16*>(&vv);
#pragma unroll
        for (int e = 0; e < 8; ++e) sh.vt[part * 8 + e][kr] = ve[e];
      } else {
        *reinterpret_cast<uint4*>(&sh.k[kr][part * 8]) = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int e = 0; e < 8; ++e) sh.vt[part * 8 + e][kr] = f2bf(0.0f);
      }
    }
    split_cp_async_wait_all();
    __syncthreads();
    const bool relevant = warp_rows && kt <= warp_qmax && (!sliding || kt + n_keys - 1 > warp_qmin - a.window);
    if (!relevant) continue;
    // S = Q K^T for 64 keys: 8 tiles of 8 keys.
    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const bf16* kr = &sh.k[nt * 8 + gid][16 * kk + 2 * tig];
        prefill_mma(s[nt], qf[kk], *reinterpret_cast<const uint32_t*>(kr), *reinterpret_cast<const uint32_t*>(kr + 8));
      }
    }
    // Mask, scale, row maxes (the 4 lanes of a row hold its 64 scores).
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = kt + nt * 8 + 2 * tig + (e & 1);
        const int qp = e < 2 ? qpos_a : qpos_b;
        const bool visible = j <= qp && (!sliding || j > qp - a.window);
        s[nt][e] = visible ? s[nt][e] * scale2 : -INFINITY;
      }
      mx_a = fmaxf(mx_a, fmaxf(s[nt][0], s[nt][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int o2 = 1; o2 <= 2; o2 <<= 1) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, o2));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, o2));
    }
    const float new_a = fmaxf(m_a, mx_a), new_b = fmaxf(m_b, mx_b);
    const float corr_a = exp2f(m_a - new_a), corr_b = exp2f(m_b - new_b);
    m_a = new_a;
    m_b = new_b;
    float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - new_a);
      s[nt][1] = exp2f(s[nt][1] - new_a);
      s[nt][2] = exp2f(s[nt][2] - new_b);
      s[nt][3] = exp2f(s[nt][3] - new_b);
      sum_a += s[nt][0] + s[nt][1];
      sum_b += s[nt][2] + s[nt][3];
    }
    l_a = l_a * corr_a + sum_a;
    l_b = l_b * corr_b + sum_b;
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) {
      o[n][0] *= corr_a;
      o[n][1] *= corr_a;
      o[n][2] *= corr_b;
      o[n][3] *= corr_b;
    }
    // O += P V: P's A fragments are the S accumulators of key tiles 2kk and 2kk + 1. P goes in as two
    // bf16 parts (hi = P rounded, lo = the rest rounded: ~16 bits of P, exact bf16 V), so the weights
    // keep about fp32 softmax precision like the other kernels; P in bf16 alone added ~2^-9 relative
    // noise per weight (enough to tip near-tie router decisions of the golden models).
#pragma unroll
    for (int kk = 0; kk < kPrefillKeys / 16; ++kk) {
      uint32_t pa[4], pl[4];
      split_bf16x2(s[2 * kk][0], s[2 * kk][1], pa[0], pl[0]);
      split_bf16x2(s[2 * kk][2], s[2 * kk][3], pa[1], pl[1]);
      split_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1], pa[2], pl[2]);
      split_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3], pa[3], pl[3]);
#pragma unroll
      for (int n = 0; n < kDimTiles; ++n) {
        const bf16* vr = &sh.vt[n * 8 + gid][16 * kk + 2 * tig];
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(vr), b1 = *reinterpret_cast<const uint32_t*>(vr + 8);
        prefill_mma(o[n], pl, b0, b1);
        prefill_mma(o[n], pa, b0, b1);
      }
    }
  }
  // Normalize: a row's sum is spread over its 4 lanes.
#pragma unroll
  for (int o2 = 1; o2 <= 2; o2 <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, o2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, o2);
  }
  const float inv_a = 1.0f / l_a, inv_b = 1.0f / l_b;
  bf16* out = static_cast<bf16*>(a.out);
#pragma unroll
  for (int n = 0; n < kDimTiles; ++n) {
    const int d = n * 8 + 2 * tig;
    if (va)
      *reinterpret_cast<__nv_bfloat162*>(out + (static_cast<int64_t>(first_row + ta) * a.q_heads + h) * D + d) =
          __floats2bfloat162_rn(o[n][0] * inv_a, o[n][1] * inv_a);
    if (vb)
      *reinterpret_cast<__nv_bfloat162*>(out + (static_cast<int64_t>(first_row + tb) * a.q_heads + h) * D + d) =
          __floats2bfloat162_rn(o[n][2] * inv_b, o[n][3] * inv_b);
  }
}

// q heads per prefill block for a GQA group, or 0 when the prefill kernel does not take the group.
int prefill_heads(int group) {
  if (group == 1 || group == 2 || group == 4) return group;
  return group % kPrefillWarps == 0 ? kPrefillWarps : 0;
}

}  // namespace

size_t attention_workspace_bytes() {
  return kSplitCounterBytes + size_t{kSplitMaxBlocks} * kSplitPartialFloats * sizeof(float);
}

// Sequences with at least this many new tokens take the tensor-core prefill kernel (auto path).
constexpr int kPrefillMinNew = 16;

bool attention(const AttentionArgs& args, const StepArgs& step, void* workspace, cudaStream_t stream) {
  if (args.rows <= 0) return args.store_kv;
  AttentionArgs a = args;
  a.store_kv = false;
  const int group = a.q_heads / a.kv_heads;
  const int heads = prefill_heads(group);
  const bool prefill_ok =
      heads > 0 && a.seqs > 0 && a.seqs <= 65535 && (a.head_dim == 64 || a.head_dim == 128);
  // Auto chooses per sequence: >= 16 new tokens on tensor cores, the others (decode rows, short
  // chunks) on the split / per-head kernels, so that a sequence's result does not depend on what
  // else is in the step. A step with both kinds launches both kernels, each skipping the other's.
  bool run_prefill = false, run_rows = true;
  a.mma_min_new = 0;
  a.row_max_new = INT32_MAX;
  if (prefill_ok && a.path == AttentionPath::kMma) {
    run_prefill = true;
    run_rows = false;
  } else if (prefill_ok && a.path == AttentionPath::kAuto && a.max_new >= kPrefillMinNew) {
    run_prefill = true;
    run_rows = a.min_new > 0 && a.min_new < kPrefillMinNew;
    if (run_rows) {
      a.mma_min_new = kPrefillMinNew;
      a.row_max_new = kPrefillMinNew;
    }
  }
  if (run_prefill) {
    const int tokens = 16 * (kPrefillWarps / heads);
    const dim3 grid(static_cast<unsigned>((a.max_new + tokens - 1) / tokens),
                    static_cast<unsigned>(a.kv_heads * (group / heads)), static_cast<unsigned>(a.seqs));
    const dim3 block(kPrefillWarps * 32);
    if (a.head_dim == 64) launch_kernel(attention_prefill_kernel<64>, grid, block, 0, stream, a, step, heads);
    else launch_kernel(attention_prefill_kernel<128>, grid, block, 0, stream, a, step, heads);
    check_launch("attention (prefill)");
  }
  if (!run_rows) return false;
  if (a.path != AttentionPath::kPerHead && group <= kSplitMaxGroup && a.rows <= 65535 &&
      (a.head_dim == 64 || a.head_dim == 128)) {
    const int64_t pairs = static_cast<int64_t>(a.rows) * a.kv_heads;
    int64_t fit = std::clamp(a.split_target_blocks, 1, kSplitMaxBlocks) / pairs;
    // A sliding window bounds the keys a row reads: beyond one split per 64 of them the extra blocks
    // are empty or nearly so and only add merge work (H200: a 128-key window at batch 1 took 23 us with
    // 32 splits, against 10.7 us for the per-head kernel).
    if (a.window > 0) fit = std::min<int64_t>(fit, (a.window + 63) / 64);
    const int splits = static_cast<int>(fit < 1 ? 1 : (fit > kSplitMaxSplits ? kSplitMaxSplits : fit));
    auto* counters = static_cast<uint32_t*>(workspace);
    auto* partials = reinterpret_cast<float*>(static_cast<uint8_t*>(workspace) + kSplitCounterBytes);
    const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(a.kv_heads), static_cast<unsigned>(a.rows));
    const dim3 block(kSplitThreads);
    // One new token per sequence, all on this kernel: the store can ride along (AttentionArgs::store_kv).
    a.store_kv = args.store_kv && !run_prefill && a.max_new == 1 && a.min_new == 1;
    if (a.head_dim == 64)
      launch_kernel(attention_split_kernel<64>, grid, block, 0, stream, a, step, splits, partials, counters);
    else
      launch_kernel(attention_split_kernel<128>, grid, block, 0, stream, a, step, splits, partials, counters);
    check_launch("attention (split)");
    return a.store_kv;
  }
  const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>(a.q_heads));
  const bool wide = static_cast<int64_t>(a.rows) * a.q_heads <= kWideBlocks;
  if (a.head_dim == 64) {
    if (wide) launch_kernel(attention_kernel<64, 8>, grid, dim3(8 * 32), 0, stream, a, step);
    else launch_kernel(attention_kernel<64, 4>, grid, dim3(4 * 32), 0, stream, a, step);
  } else if (a.head_dim == 128) {
    if (wide) launch_kernel(attention_kernel<128, 8>, grid, dim3(8 * 32), 0, stream, a, step);
    else launch_kernel(attention_kernel<128, 4>, grid, dim3(4 * 32), 0, stream, a, step);
  } else {
    throw std::invalid_argument("CUDA attention: head_dim must be 64 or 128");
  }
  check_launch("attention");
  return false;
}

}  // namespace arbiter::cuda
