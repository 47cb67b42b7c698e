// Attention over the paged KV cache with per-head sinks (gpt-oss.md §4.4), one thread block per
// (row, q head): each warp (4 or 8 per block) streams 32-key chunks (one key per lane for q·k, then
// the chunk's values accumulated with the key weights broadcast by shuffles) with an online softmax,
// and the warps' partial results are merged at the end. Keys below the sequence's num_cached come
// from the cache (full layers: block table; sliding layers: ring slot p mod ring size), the step's
// own keys from k/v. The sink joins the denominator only: warp 0 starts from max = sink, sum = 1.
#include <type_traits>

#include "kernels/cuda/common.cuh"

namespace arbiter::cuda {
namespace {

// Warps per block: 4 for large steps; 8 when the step has few (row, head) pairs (decode), so that
// one block's keys are spread over more warps and fewer chunks run one after another.
template <int D, int kWarps>
__global__ __launch_bounds__(kWarps * 32) void attention_kernel(AttentionArgs a, StepArgs step) {
  constexpr int kPerLane = D / 32;
  const int row = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kvh = h / (a.q_heads / a.kv_heads);
  const int pos = step.row_pos[row];
  const int32_t* info = step.seq_info + step.row_seq[row] * kSeqFields;
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

}  // namespace

void attention(const AttentionArgs& a, const StepArgs& step, cudaStream_t stream) {
  if (a.rows <= 0) return;
  const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>(a.q_heads));
  const bool wide = static_cast<int64_t>(a.rows) * a.q_heads <= kWideBlocks;
  if (a.head_dim == 64) {
    if (wide) attention_kernel<64, 8><<<grid, 8 * 32, 0, stream>>>(a, step);
    else attention_kernel<64, 4><<<grid, 4 * 32, 0, stream>>>(a, step);
  } else if (a.head_dim == 128) {
    if (wide) attention_kernel<128, 8><<<grid, 8 * 32, 0, stream>>>(a, step);
    else attention_kernel<128, 4><<<grid, 4 * 32, 0, stream>>>(a, step);
  } else {
    throw std::invalid_argument("CUDA attention: head_dim must be 64 or 128");
  }
  check_launch("attention");
}

}  // namespace arbiter::cuda
