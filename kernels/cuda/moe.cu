// MoE experts on MXFP4 weights (gpt-oss.md §3, §4.6). Two grouped products read the packed weights
// directly and decode each 32-value block in registers (exactly: FP4 bit patterns scaled by a bf16
// power of two): gate_up with the clamped SwiGLU fused into its epilogue (rows 2j/2j+1 are channel
// j's gate/up), then down with its bias. The expert weights are never expanded in device memory.
//
// Two product paths, both on tensor cores (bf16 in, fp32 accumulate):
// - vector path (at most 24 tokens per expert on average: decode): a warp runs 16 weight rows x up
//   to 8 tokens of one expert over all of K, weights streamed from global memory into MMA fragments;
// - tile path (more tokens per expert: prefill): 128 x 128 tiles, activations and decoded weights
//   staged through two shared-memory stages.
// Routing groups the slots by expert (route_kernel); each (row, slot) result lands in its own slot
// of a buffer and combine_kernel sums a row's slots with the router weights in slot order, so the
// result does not depend on how tokens were grouped. A single row (batch-1 decode) skips routing:
// its slots are the vector path's tasks and the down kernel sums them itself, with the same bits.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mxfp4.cuh"

namespace arbiter::cuda {
namespace {

constexpr int kMaxRouteExperts = 4096;
constexpr int kVecWarps = 8;
constexpr int kVecTokens = 8;   // the vector path's tokens per task (the MMA's n)
constexpr int kVecUnroll = 4;   // steps (4 groups each) of weights in flight per lane
constexpr int kDownSplit = 2;   // the down product's K halves (fixed: results do not depend on the batch)
constexpr int kMaxDirectK = 32;

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// Upper bound on the (expert, up to `tile` tokens) work items of a step.
int max_tiles(int slots, int experts, int tile) { return (slots + tile - 1) / tile + experts; }

struct MoeWorkspace {
  int32_t* tile_count;  // [1]
  int32_t* tiles;    // [max_tiles, 2]: expert, first token index within the expert
  int32_t* offsets;  // [E + 1]
  int32_t* sorted;   // [rows * k] slot ids grouped by expert
  bf16* act;         // [rows * k, inter]
  float* y;          // [rows * k, hidden]
};

MoeWorkspace carve(void* base, int rows, int k, int experts, int inter) {
  auto* p = static_cast<uint8_t*>(base);
  const size_t slots = static_cast<size_t>(rows) * static_cast<size_t>(k);
  MoeWorkspace w{};
  w.tile_count = reinterpret_cast<int32_t*>(p);
  p += 256;
  w.tiles = reinterpret_cast<int32_t*>(p);
  p += align256(static_cast<size_t>(max_tiles(static_cast<int>(slots), experts, kVecTokens)) * 8);
  w.offsets = reinterpret_cast<int32_t*>(p);
  p += align256(static_cast<size_t>(experts + 1) * 4);
  w.sorted = reinterpret_cast<int32_t*>(p);
  p += align256(slots * 4);
  w.act = reinterpret_cast<bf16*>(p);
  p += align256(slots * static_cast<size_t>(inter) * 2);
  w.y = reinterpret_cast<float*>(p);
  return w;
}

__global__ void route_kernel(const int32_t* ids, int n, int experts, int tile, MoeWorkspace ws) {
  pdl_begin();
  int32_t* offsets = ws.offsets;
  int32_t* sorted = ws.sorted;
  extern __shared__ int smem[];
  int* count = smem;
  int* cursor = smem + experts;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < n; s += blockDim.x) {
    const int e = ids[s];
    if (e >= 0 && e < experts) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int e = 0; e < experts; ++e) {
      cursor[e] = run;
      offsets[e] = run;
      run += count[e];
    }
    offsets[experts] = run;
    int tiles = 0;
    for (int e = 0; e < experts; ++e) {
      for (int t = 0; t < count[e]; t += tile) {
        ws.tiles[2 * tiles] = e;
        ws.tiles[2 * tiles + 1] = t;
        ++tiles;
      }
    }
    *ws.tile_count = tiles;
  }
  __syncthreads();
  for (int s = threadIdx.x; s < n; s += blockDim.x) {
    const int e = ids[s];
    if (e >= 0 && e < experts) sorted[atomicAdd(&cursor[e], 1)] = s;
  }
}


__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Waits until at most n of this thread's committed groups are still in flight.
template <int n>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory");
}
// ---- Matrix-vector path (few tokens per expert): tensor cores on 16 weight rows x 8 tokens ----
//
// A warp owns 16 weight rows of one expert and up to 8 tokens, and runs mma.m16n8k16 (bf16 in, fp32
// accumulate) over K. Lane (r = lane/4, j = lane%4) loads, for MMA rows r and r+8, the whole 16-byte
// block of group g0+j (a step covers 4 groups, one per j), decodes it to bf16 pairs in registers and
// scales them exactly; its B operand is token r's activations of the same group, permuted the same
// way, so each MMA's k index is a permutation of the same inputs on both sides. kVecUnroll steps of
// weights are loaded before any is used. A token's result does not depend on which other tokens share
// its MMA, so the single-row path (no routing) and the routed path give the same bits.

using mxfp4::word;

__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One step's 8 MMAs: wa/wb are this lane's blocks of MMA rows r and r+8, xv its token's 32 activations
// of the same group (layout: kernels/cuda/mxfp4.cuh).
// With G token groups the decoded weights serve G MMAs (group q: tokens 8q ... 8q + 7).
template <bool kBig, int G>
__device__ __forceinline__ void vec_step(const uint4& wa, const uint4& wb, uint32_t sa, uint32_t sb,
                                         const uint4 (&xv)[G][4], float (&c)[G][4]) {
  const uint32_t fa = mxfp4::factor(sa), fb = mxfp4::factor(sb);
  const uint32_t fa2 = mxfp4::factor2(sa), fb2 = mxfp4::factor2(sb);
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t pa[4], pb[4];
    mxfp4::decode_word<kBig>(word(wa, w), fa, fa2, pa);
    mxfp4::decode_word<kBig>(word(wb, w), fb, fb2, pb);
#pragma unroll
    for (int q = 0; q < G; ++q) {
      uint32_t bx[4];
      mxfp4::activation_pairs(xv[q][w], bx);
      mma_bf16(c[q], pa[0], pb[0], pa[1], pb[1], bx[0], bx[1]);
      mma_bf16(c[q], pa[2], pb[2], pa[3], pb[3], bx[2], bx[3]);
    }
  }
}

// One step for this lane's group g (< ge, else its activations read as 0): its tokens' activations of
// the group, then vec_step on the weight blocks wa / wb (scales sa / sb) of its two rows.
template <int G>
__device__ __forceinline__ void vec_group_step(const uint4& wa, const uint4& wb, uint32_t sa, uint32_t sb,
                                               const bf16* const (&xrow)[G], int g, int ge, float (&c)[G][4]) {
  uint4 xv[G][4];
#pragma unroll
  for (int q = 0; q < G; ++q)
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      xv[q][w] = make_uint4(0, 0, 0, 0);
      if (xrow[q] && g < ge) xv[q][w] = __ldg(reinterpret_cast<const uint4*>(xrow[q] + g * 32 + w * 8));
    }
  if (__any_sync(0xffffffffu, mxfp4::big(sa) || mxfp4::big(sb))) {
    vec_step<true, G>(wa, wb, sa, sb, xv, c);
  } else {
    vec_step<false, G>(wa, wb, sa, sb, xv, c);
  }
}

// c += W[rows] . x over groups [gb, ge) of one expert's matrix (`blocks`/`scales` at its row 0).
// row_a/row_b: the weight rows of MMA rows r and r+8 (-1: none); xrow[q]: the activations of this
// lane's token in token group q (B column lane/4, i.e. token 8q + lane/4), or nullptr. Warp-uniform
// control flow (every lane runs every MMA).
template <int G>
__device__ __forceinline__ void vec_tile(const uint8_t* blocks, const uint8_t* scales, int groups, int row_a,
                                         int row_b, const bf16* const (&xrow)[G], int gb, int ge, float (&c)[G][4]) {
  const int j = mxfp4::vec_group(static_cast<int>(threadIdx.x & 31));
  const uint8_t* ba = blocks + static_cast<int64_t>(row_a < 0 ? 0 : row_a) * groups * 16;
  const uint8_t* bb = blocks + static_cast<int64_t>(row_b < 0 ? 0 : row_b) * groups * 16;
  const uint8_t* sca = scales + static_cast<int64_t>(row_a < 0 ? 0 : row_a) * groups;
  const uint8_t* scb = scales + static_cast<int64_t>(row_b < 0 ? 0 : row_b) * groups;
  for (int g0 = gb; g0 < ge; g0 += 4 * kVecUnroll) {
    uint4 wa[kVecUnroll], wb[kVecUnroll];
    uint32_t sa[kVecUnroll], sb[kVecUnroll];
#pragma unroll
    for (int u = 0; u < kVecUnroll; ++u) {
      const int g = g0 + 4 * u + j;
      wa[u] = wb[u] = make_uint4(0, 0, 0, 0);
      sa[u] = sb[u] = 127;
      if (g < ge) {
        if (row_a >= 0) {
          wa[u] = __ldg(reinterpret_cast<const uint4*>(ba + static_cast<int64_t>(g) * 16));
          sa[u] = __ldg(sca + g);
        }
        if (row_b >= 0) {
          wb[u] = __ldg(reinterpret_cast<const uint4*>(bb + static_cast<int64_t>(g) * 16));
          sb[u] = __ldg(scb + g);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kVecUnroll; ++u) {
      if (g0 + 4 * u >= ge) break;  // warp-uniform
      vec_group_step<G>(wa[u], wb[u], sa[u], sb[u], xrow, g0 + 4 * u + j, ge, c);
    }
  }
}

// vec_tile with the weights streamed through a per-warp ring in shared memory: each lane copies its
// own 16-byte blocks by cp.async (kPipeStages stages of kPipeSteps steps; a stage is issued
// kPipeStages - 1 stages before it is used, so that much stays in flight while the lane decodes and
// multiplies) and takes their scales into registers at the same time. A lane reads back only what it
// copied itself, so the ring needs no barrier. The operations on each step are vec_tile's, in the same
// order: the same bits (ARBITER_CUDA_MOE_PIPE=1 selects it; GpuMoe checks the bits).
constexpr int kPipeStages = 4, kPipeSteps = 2;
constexpr int kPipeRing = kPipeStages * kPipeSteps * 32 * 2;  // uint4 per warp (8 KB)

__device__ __forceinline__ uint4* pipe_ring() {
  extern __shared__ __align__(16) uint4 vec_pipe_smem[];
  return vec_pipe_smem + (threadIdx.x >> 5) * kPipeRing;
}

template <int G>
__device__ __forceinline__ void vec_tile_pipe(const uint8_t* blocks, const uint8_t* scales, int groups, int row_a,
                                              int row_b, const bf16* const (&xrow)[G], int gb, int ge, float (&c)[G][4]) {
  constexpr int kStageGroups = 4 * kPipeSteps;
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int j = mxfp4::vec_group(lane);
  const uint8_t* ba = blocks + static_cast<int64_t>(row_a < 0 ? 0 : row_a) * groups * 16;
  const uint8_t* bb = blocks + static_cast<int64_t>(row_b < 0 ? 0 : row_b) * groups * 16;
  const uint8_t* sca = scales + static_cast<int64_t>(row_a < 0 ? 0 : row_a) * groups;
  const uint8_t* scb = scales + static_cast<int64_t>(row_b < 0 ? 0 : row_b) * groups;
  uint4* ring = pipe_ring();
  uint32_t sa[kPipeStages][kPipeSteps], sb[kPipeStages][kPipeSteps];
  // Stage `st` of the ring <- the steps starting at group g0 (nothing past ge: an empty group).
  auto issue = [&](int st, int g0) {
    asm volatile("" ::: "memory");  // the slot's earlier shared loads stay before its refill
#pragma unroll
    for (int u = 0; u < kPipeSteps; ++u) {
      const int g = g0 + 4 * u + j;
      const bool in = g < ge;
      uint4* dst = ring + ((st * kPipeSteps + u) * 32 + lane) * 2;
      if (g0 + 4 * u < ge) {  // warp-uniform
        cp_async16(dst, in && row_a >= 0 ? ba + static_cast<int64_t>(g) * 16 : ba, in && row_a >= 0 ? 16 : 0);
        cp_async16(dst + 1, in && row_b >= 0 ? bb + static_cast<int64_t>(g) * 16 : bb, in && row_b >= 0 ? 16 : 0);
      }
      sa[st][u] = in && row_a >= 0 ? __ldg(sca + g) : 127u;
      sb[st][u] = in && row_b >= 0 ? __ldg(scb + g) : 127u;
    }
    cp_async_commit();
  };
  auto compute = [&](int st, int g0) {
#pragma unroll
    for (int u = 0; u < kPipeSteps; ++u) {
      if (g0 + 4 * u >= ge) break;  // warp-uniform
      const uint4* src = ring + ((st * kPipeSteps + u) * 32 + lane) * 2;
      vec_group_step<G>(src[0], src[1], sa[st][u], sb[st][u], xrow, g0 + 4 * u + j, ge, c);
    }
  };
  const int stages = (ge - gb + kStageGroups - 1) / kStageGroups;
#pragma unroll
  for (int st = 0; st < kPipeStages - 1; ++st) issue(st, gb + st * kStageGroups);
  for (int t0 = 0; t0 < stages; t0 += kPipeStages) {
#pragma unroll
    for (int st = 0; st < kPipeStages; ++st) {
      // The slot used one stage ago gets the stage kPipeStages - 1 ahead; then stage t0 + st is complete.
      issue((st + kPipeStages - 1) % kPipeStages, gb + (t0 + st + kPipeStages - 1) * kStageGroups);
      cp_async_wait<kPipeStages - 1>();
      if (t0 + st >= stages) break;  // warp-uniform
      compute(st, gb + (t0 + st) * kStageGroups);
    }
  }
  cp_async_wait_all();
}

// The vector path's product over groups [gb, ge): the ring in shared memory, or loads into registers.
template <bool kPipe, int G>
__device__ __forceinline__ void vec_product(const uint8_t* blocks, const uint8_t* scales, int groups, int row_a,
                                            int row_b, const bf16* const (&xrow)[G], int gb, int ge, float (&c)[G][4]) {
  if constexpr (kPipe) vec_tile_pipe<G>(blocks, scales, groups, row_a, row_b, xrow, gb, ge, c);
  else vec_tile<G>(blocks, scales, groups, row_a, row_b, xrow, gb, ge, c);
}

__device__ __forceinline__ float swiglu(float gate, float up, float limit) {
  gate = fminf(gate, limit);
  up = fmaxf(-limit, fminf(up, limit));
  return gate / (1.0f + expf(-1.702f * gate)) * (up + 1.0f);
}

// The work item of a routed block: up to G x kVecTokens tokens of one expert (route's tile list).
struct VecTask {
  int expert = -1, begin = 0, count = 0;
};
template <int G>
__device__ __forceinline__ VecTask routed_task(const MoeWorkspace& ws) {
  VecTask t;
  if (static_cast<int>(blockIdx.y) >= *ws.tile_count) return t;
  t.expert = ws.tiles[2 * blockIdx.y];
  t.begin = ws.offsets[t.expert] + ws.tiles[2 * blockIdx.y + 1];
  t.count = min(G * kVecTokens, ws.offsets[t.expert + 1] - t.begin);
  return t;
}

// gate_up with the clamped SwiGLU fused: a warp owns 8 channels (MMA rows 0-7 their gate rows, 8-15 their
// up rows), so each lane ends with the gate and up of one channel for tokens 2j and 2j+1.
// kDirect (a single row): block y is the row's slot y, no routing. Else block y is a routed task.
template <bool kDirect, int G, bool kPipe>
__global__ __launch_bounds__(kVecWarps * 32, 2) void moe_vec_gate_up_kernel(MoeArgs a, MoeWorkspace ws) {
  pdl_begin();
  VecTask t;
  if constexpr (kDirect) {
    t.expert = a.ids[blockIdx.y];
    t.begin = static_cast<int>(blockIdx.y);
    t.count = 1;
  } else {
    t = routed_task<G>(ws);
  }
  if (t.expert < 0 || t.expert >= a.experts) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int first_ch = (static_cast<int>(blockIdx.x * (blockDim.x >> 5)) + warp) * 8;  // 4 or 8 warps per block
  if (first_ch >= a.inter) return;  // whole warp; this kernel has no block barrier
  const int ch = first_ch + (lane >> 2);
  const bool ch_ok = ch < a.inter;
  const int groups = a.hidden / 32, out_rows = 2 * a.inter;
  auto slot_of = [&](int n) { return kDirect ? t.begin : ws.sorted[t.begin + n]; };
  const bf16* xrow[G];
  float c[G][4];
#pragma unroll
  for (int q = 0; q < G; ++q) {
    const int n = q * kVecTokens + (lane >> 2);
    xrow[q] = n < t.count ? static_cast<const bf16*>(a.x) + static_cast<int64_t>(slot_of(n) / a.k) * a.hidden : nullptr;
#pragma unroll
    for (int i = 0; i < 4; ++i) c[q][i] = 0.0f;
  }
  vec_product<kPipe, G>(a.gu_blocks + static_cast<int64_t>(t.expert) * out_rows * groups * 16,
              a.gu_scales + static_cast<int64_t>(t.expert) * out_rows * groups, groups, ch_ok ? 2 * ch : -1,
              ch_ok ? 2 * ch + 1 : -1, xrow, 0, groups, c);
  if (!ch_ok) return;
  const bf16* bias = static_cast<const bf16*>(a.gu_bias) + static_cast<int64_t>(t.expert) * out_rows;
  const float bg = bf2f(bias[2 * ch]), bu = bf2f(bias[2 * ch + 1]);
#pragma unroll
  for (int q = 0; q < G; ++q)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int tok = q * kVecTokens + 2 * (lane & 3) + i;
      if (tok < t.count)
        ws.act[static_cast<int64_t>(slot_of(tok)) * a.inter + ch] =
            f2bf(swiglu(c[q][i] + bg, c[q][2 + i] + bu, a.limit));
    }
}

// down, routed: a block is 4 row tiles x kDownSplit K halves of one task; y[slot, row] = (half0 + half1) + bias.
template <int G, bool kPipe>
__global__ __launch_bounds__(kVecWarps * 32, 2) void moe_vec_down_kernel(MoeArgs a, MoeWorkspace ws) {
  pdl_begin();
  static_assert(kDownSplit == 2 && kVecWarps % 2 == 0, "two K halves per tile");
  __shared__ float other[kVecWarps / 2][32][G][4];
  const VecTask t = routed_task<G>(ws);
  if (t.expert < 0 || t.expert >= a.experts) return;  // whole block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile = static_cast<int>(blockIdx.x) * (kVecWarps / 2) + warp / 2, h = warp % 2;
  const int groups = a.inter / 32, half = (groups + 1) / 2;
  const int r = lane >> 2, row_a = tile * 16 + r, row_b = row_a + 8;
  const bool tile_ok = tile * 16 < a.hidden;
  float c[G][4];
#pragma unroll
  for (int q = 0; q < G; ++q)
#pragma unroll
    for (int i = 0; i < 4; ++i) c[q][i] = 0.0f;
  if (tile_ok) {
    const bf16* xrow[G];
#pragma unroll
    for (int q = 0; q < G; ++q) {
      const int n = q * kVecTokens + (lane >> 2);
      xrow[q] = n < t.count ? ws.act + static_cast<int64_t>(ws.sorted[t.begin + n]) * a.inter : nullptr;
    }
    vec_product<kPipe, G>(a.dn_blocks + static_cast<int64_t>(t.expert) * a.hidden * groups * 16,
                a.dn_scales + static_cast<int64_t>(t.expert) * a.hidden * groups, groups, row_a < a.hidden ? row_a : -1,
                row_b < a.hidden ? row_b : -1, xrow, h == 0 ? 0 : half, h == 0 ? half : groups, c);
  }
  if (h == 1) {
#pragma unroll
    for (int q = 0; q < G; ++q)
#pragma unroll
      for (int i = 0; i < 4; ++i) other[warp / 2][lane][q][i] = c[q][i];
  }
  __syncthreads();
  if (h != 0 || !tile_ok) return;
  const bf16* bias = static_cast<const bf16*>(a.dn_bias) + static_cast<int64_t>(t.expert) * a.hidden;
#pragma unroll
  for (int q = 0; q < G; ++q)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? row_a : row_b, tok = q * kVecTokens + 2 * (lane & 3) + (i & 1);
      if (row < a.hidden && tok < t.count) {
        const float y = (c[q][i] + other[warp / 2][lane][q][i]) + bf2f(bias[row]);
        ws.y[static_cast<int64_t>(ws.sorted[t.begin + tok]) * a.hidden + row] = y;
      }
    }
}

// down, single row: a block is one 16-row tile; its warps take the (slot, K half) units in turn, and the
// block sums the slots in slot order with the router weights, as combine_kernel does (same bits).
template <bool kPipe>
__global__ __launch_bounds__(kVecWarps * 32, 2) void moe_vec_down_direct_kernel(MoeArgs a, MoeWorkspace ws) {
  pdl_begin();
  __shared__ float part[kMaxDirectK][kDownSplit][16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int groups = a.inter / 32, half = (groups + 1) / 2;
  const int base = static_cast<int>(blockIdx.x) * 16, r = lane >> 2;
  for (int u = warp; u < a.k * kDownSplit; u += kVecWarps) {
    const int j = u / kDownSplit, h = u % kDownSplit;
    const int e = a.ids[j];
    if (e < 0 || e >= a.experts) continue;  // warp-uniform
    const bf16* const xrow[1] = {r == 0 ? ws.act + static_cast<int64_t>(j) * a.inter : nullptr};
    float c[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
    vec_product<kPipe, 1>(a.dn_blocks + static_cast<int64_t>(e) * a.hidden * groups * 16,
                a.dn_scales + static_cast<int64_t>(e) * a.hidden * groups, groups, base + r < a.hidden ? base + r : -1,
                base + r + 8 < a.hidden ? base + r + 8 : -1, xrow, h == 0 ? 0 : half, h == 0 ? half : groups, c);
    if ((lane & 3) == 0) {  // token column 0
      part[j][h][r] = c[0][0];
      part[j][h][r + 8] = c[0][2];
    }
  }
  __syncthreads();
  const int row = base + static_cast<int>(threadIdx.x);
  if (threadIdx.x >= 16 || row >= a.hidden) return;
  float sum = 0.0f;
  for (int j = 0; j < a.k; ++j) {
    const int e = a.ids[j];
    if (e < 0 || e >= a.experts) continue;
    const float y = (part[j][0][threadIdx.x] + part[j][1][threadIdx.x]) +
                    bf2f(static_cast<const bf16*>(a.dn_bias)[static_cast<int64_t>(e) * a.hidden + row]);
    sum += a.weights[j] * y;
  }
  static_cast<bf16*>(a.out)[row] = f2bf(sum);
}

// ---- Tensor-core path (many tokens per expert): kM tokens x 128 weight rows per block ----
//
// 8 warps (2 x 4), each kM / 2 tokens x 32 weight rows, mma.m16n8k16 with fragments from ldmatrix. K
// runs in 64-wide slices through two shared-memory stages: the next slice's activations arrive by
// cp.async and its weight codes are held in registers while the tensor cores work on the current
// slice, then decoded (exactly, as in the vector path) into the other stage. kM = 128 (default), 64
// or 32 tokens (ARBITER_CUDA_MOE_TILE): a smaller tile wastes fewer MMAs on experts with few tokens
// (batch-256 decode of the 20b averages 32 per expert, a quarter of a 128-token tile). Each output is
// the same sum in the same order for every kM, so the bits do not depend on it.
constexpr int kMmaM = 128, kMmaN = 128, kMmaK = 64, kMmaWarps = 8;
constexpr int kMmaLd = kMmaK + 8;  // bf16 per shared row: 144 bytes, so ldmatrix rows hit distinct banks
template <int kM>
constexpr int kMmaStageElems = (kM + kMmaN) * kMmaLd;  // bf16 per stage (activations, then weights)
template <int kM>
constexpr size_t kMmaSmemBytes = 2u * kMmaStageElems<kM> * sizeof(bf16);
// The deep pipeline (ARBITER_CUDA_MOE_DEEP=1, same bits): activations through 3 stages, the weights' raw
// codes through 4 (cp.async, issued 3 slices ahead), decoded weights through 2.
constexpr int kDeepXStages = 3, kDeepRawStages = 4;
template <int kM>
constexpr size_t kMmaDeepSmemBytes = (static_cast<size_t>(kDeepXStages) * kM + 2u * kMmaN) * kMmaLd * sizeof(bf16) +
                                     static_cast<size_t>(kDeepRawStages) * kMmaWarps * 32 * sizeof(uint4);

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <int kStage, int kM, bool kDeep>
__global__ __launch_bounds__(kMmaWarps * 32, 2) void moe_mma_kernel(MoeArgs a, MoeWorkspace ws) {
  static_assert(kM == 32 || kM == 64 || kM == 128, "token tiles of 32, 64 or 128");
  constexpr int kMt = kM / 32;  // 16-token fragments per warp
  pdl_begin();
  extern __shared__ __align__(16) uint8_t mma_smem[];
  __shared__ const bf16* rows_of[kM];
  __shared__ int slot_of[kM];
  const int tile = blockIdx.y;
  if (tile >= *ws.tile_count) return;
  const int e = ws.tiles[2 * tile];
  const int begin = ws.offsets[e] + ws.tiles[2 * tile + 1];
  const int nt = min(kM, ws.offsets[e + 1] - begin);
  const int in = kStage == 1 ? a.hidden : a.inter;
  const int out_rows = kStage == 1 ? 2 * a.inter : a.hidden;
  const int groups = in / 32;
  const int col0 = blockIdx.x * kMmaN;
  if (col0 >= out_rows) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid < kM) {
    const int slot = tid < nt ? ws.sorted[begin + tid] : -1;
    slot_of[tid] = slot;
    rows_of[tid] = slot < 0 ? nullptr
                            : (kStage == 1 ? static_cast<const bf16*>(a.x) + static_cast<int64_t>(slot / a.k) * a.hidden
                                           : ws.act + static_cast<int64_t>(slot) * a.inter);
  }
  const uint8_t* blocks = (kStage == 1 ? a.gu_blocks : a.dn_blocks) + static_cast<int64_t>(e) * out_rows * groups * 16;
  const uint8_t* scales = (kStage == 1 ? a.gu_scales : a.dn_scales) + static_cast<int64_t>(e) * out_rows * groups;
  bf16* smem = reinterpret_cast<bf16*>(mma_smem);
  // Plain: stage i = activations then weights. Deep: kDeepXStages activation stages, 2 weight stages,
  // then the raw code ring.
  auto xs = [&](int stage) {
    return kDeep ? smem + stage * kM * kMmaLd : smem + stage * kMmaStageElems<kM>;
  };
  auto wsm = [&](int stage) {
    return kDeep ? smem + kDeepXStages * kM * kMmaLd + stage * kMmaN * kMmaLd : smem + stage * kMmaStageElems<kM> + kM * kMmaLd;
  };
  __syncthreads();

  // Activations: kM rows x 8 chunks of 16 bytes per slice, kM / 32 per thread; missing rows/columns read as 0.
  auto load_x = [&](int stage, int kb) {
#pragma unroll
    for (int i = 0; i < kM * (kMmaK / 8) / (kMmaWarps * 32); ++i) {
      const int c = tid + i * kMmaWarps * 32;
      const int row = c >> 3, col = (c & 7) * 8;
      const bf16* src = rows_of[row];
      const bool ok = src != nullptr && kb + col < in;
      cp_async16(xs(stage) + row * kMmaLd + col, ok ? src + kb + col : static_cast<const bf16*>(a.x), ok ? 16 : 0);
    }
    if (!kDeep) cp_async_commit();  // the deep loop commits its groups itself
  };
  // Weights: thread -> (row tid/2, group tid%2) of the slice: one 16-byte block and its scale.
  const int wn = tid >> 1, wg = tid & 1, wrow = col0 + wn;
  uint4 wcodes = make_uint4(0, 0, 0, 0);
  uint32_t wscale = 127;
  bool wvalid = false;
  auto load_w = [&](int kb) {
    const int g = kb / 32 + wg;
    wvalid = wrow < out_rows && g < groups;
    if (wvalid) {
      wcodes = __ldg(reinterpret_cast<const uint4*>(blocks + (static_cast<int64_t>(wrow) * groups + g) * 16));
      wscale = __ldg(scales + static_cast<int64_t>(wrow) * groups + g);
    }
  };
  auto store_w = [&](int stage) {
    static_assert(!kDeep || kMmaK == 64, "two 32-value groups per slice");
    uint4 o[4];
    const uint32_t f = mxfp4::factor(wscale), f2 = mxfp4::factor2(wscale);
    const bool big = mxfp4::big(wscale);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t q = wvalid ? word(wcodes, w) : 0u;
      uint32_t p[4];
      if (big) mxfp4::decode_word<true>(q, f, f2, p);
      else mxfp4::decode_word<false>(q, f, f2, p);
      o[w] = mxfp4::natural_order(p);
    }
    uint4* dst = reinterpret_cast<uint4*>(wsm(stage) + wn * kMmaLd + wg * 32);
#pragma unroll
    for (int w = 0; w < 4; ++w) dst[w] = o[w];
  };

  float acc[kMt][4][4];
#pragma unroll
  for (int i = 0; i < kMt; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
  const int wm0 = (warp >> 2) * (kM / 2), wn0 = (warp & 3) * 32;

  const int slices = (in + kMmaK - 1) / kMmaK;
  // One slice's tensor-core work on activation stage xst and weight stage wst.
  auto multiply = [&](int xst, int wst) {
    const bf16* xcur = xs(xst);
    const bf16* wcur = wsm(wst);
#pragma unroll
    for (int ks = 0; ks < kMmaK / 16; ++ks) {
      uint32_t af[kMt][4], bfr[2][4];
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt)
        ldmatrix_x4(af[mt], xcur + (wm0 + mt * 16 + mxfp4::ldsm_a_row(lane)) * kMmaLd + ks * 16 + mxfp4::ldsm_a_col(lane));
#pragma unroll
      for (int np = 0; np < 2; ++np)
        ldmatrix_x4(bfr[np], wcur + (wn0 + np * 16 + mxfp4::ldsm_b_row(lane)) * kMmaLd + ks * 16 + mxfp4::ldsm_b_col(lane));
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
        for (int n8 = 0; n8 < 4; ++n8)
          mma_bf16(acc[mt][n8], af[mt][0], af[mt][1], af[mt][2], af[mt][3], bfr[n8 >> 1][(n8 & 1) * 2],
                   bfr[n8 >> 1][(n8 & 1) * 2 + 1]);
    }
  };
  if constexpr (kDeep) {
    // Slice t's raw codes (this thread's block of it) into ring slot t % kDeepRawStages by cp.async; its
    // scale is returned (127 past the end: zero codes decode to +0 with any scale, as in store_w).
    uint4* raw = reinterpret_cast<uint4*>(smem + kDeepXStages * kM * kMmaLd + 2 * kMmaN * kMmaLd);
    auto issue_raw = [&](int t) {
      const int g = t * (kMmaK / 32) + wg;
      const bool ok = t < slices && wrow < out_rows && g < groups;
      const uint8_t* src = ok ? blocks + (static_cast<int64_t>(wrow) * groups + g) * 16 : blocks;
      cp_async16(raw + (t % kDeepRawStages) * (kMmaWarps * 32) + tid, src, ok ? 16 : 0);
      return ok ? static_cast<uint32_t>(__ldg(scales + static_cast<int64_t>(wrow) * groups + g)) : 127u;
    };
    auto decode_raw = [&](int t, uint32_t scale, int wst) {
      wcodes = raw[(t % kDeepRawStages) * (kMmaWarps * 32) + tid];
      wscale = scale;
      wvalid = true;
      store_w(wst);
    };
    // Groups: before the loop {x0, raw0, raw1} and {x1, raw2}; iteration s commits {x(s+2), raw(s+3)}.
    load_x(0, 0);
    const uint32_t sc0 = issue_raw(0);
    uint32_t sc1 = issue_raw(1);
    cp_async_commit();
    if (slices > 1) load_x(1, kMmaK);
    uint32_t sc2 = issue_raw(2);
    cp_async_commit();
    cp_async_wait<1>();
    decode_raw(0, sc0, 0);
    for (int s = 0; s < slices; ++s) {
      cp_async_wait<1>();  // the group of iteration s - 2: x(s) and raw(s + 1)
      __syncthreads();     // every thread's copies and decoded weights visible; slots of slice s - 1 free
      if (s + 1 < slices) decode_raw(s + 1, sc1, (s + 1) & 1);
      if (s + 2 < slices) load_x((s + 2) % kDeepXStages, (s + 2) * kMmaK);
      const uint32_t sc3 = issue_raw(s + 3);
      cp_async_commit();
      multiply(s % kDeepXStages, s & 1);
      sc1 = sc2;
      sc2 = sc3;
    }
    cp_async_wait_all();
  } else {
  load_x(0, 0);
  load_w(0);
  store_w(0);
  cp_async_wait_all();
  __syncthreads();
  for (int s = 0; s < slices; ++s) {
    const int cur = s & 1;
    const bool more = s + 1 < slices;
    if (more) {
      load_x(cur ^ 1, (s + 1) * kMmaK);
      load_w((s + 1) * kMmaK);
    }
    multiply(cur, cur);
    if (more) {
      store_w(cur ^ 1);
      cp_async_wait_all();
    }
    __syncthreads();
  }
  }

  // Epilogue: lane holds tokens (lane/4, +8) x weight rows (2*(lane%4), +1) of each 16 x 8 tile; in
  // gate_up those two rows are one channel's gate and up.
  const bf16* bias = static_cast<const bf16*>(kStage == 1 ? a.gu_bias : a.dn_bias) + static_cast<int64_t>(e) * out_rows;
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = wm0 + mt * 16 + (lane >> 2) + half * 8;
      if (m >= nt) continue;
      const int slot = slot_of[m];
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8) {
        const int col = col0 + wn0 + n8 * 8 + 2 * (lane & 3);
        if (col >= out_rows) continue;
        const float v0 = acc[mt][n8][2 * half] + bf2f(bias[col]);
        const float v1 = acc[mt][n8][2 * half + 1] + bf2f(bias[col + 1]);
        if constexpr (kStage == 1) {
          ws.act[static_cast<int64_t>(slot) * a.inter + col / 2] = f2bf(swiglu(v0, v1, a.limit));
        } else {
          *reinterpret_cast<float2*>(ws.y + static_cast<int64_t>(slot) * a.hidden + col) = make_float2(v0, v1);
        }
      }
    }
  }
}

__global__ void combine_kernel(const int32_t* ids, const float* weights, int k, int experts, const float* y,
                               int hidden, bf16* out) {
  pdl_begin();
  const int64_t row = blockIdx.x;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int64_t s = row * k + j;
      const int e = ids[s];
      if (e >= 0 && e < experts) sum += weights[s] * y[s * hidden + c];
    }
    out[row * hidden + c] = f2bf(sum);
  }
}

// Dynamic shared memory of a vector-path launch of `warps` warps (the ring of the pipelined tiles).
template <typename Kernel>
size_t vec_smem(Kernel kernel, bool pipe, int warps) {
  if (!pipe) return 0;
  const size_t bytes = static_cast<size_t>(warps) * kPipeRing * sizeof(uint4);
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  return bytes;
}

template <int G, bool kPipe>
void launch_vec_routed(const MoeArgs& a, const MoeWorkspace& ws, const dim3& g1, int gu_warps, const dim3& g2,
                       cudaStream_t stream) {
  auto* gate_up = moe_vec_gate_up_kernel<false, G, kPipe>;
  launch_kernel(gate_up, g1, dim3(gu_warps * 32), vec_smem(gate_up, kPipe, gu_warps), stream, a, ws);
  check_launch("moe gate_up (vec)");
  auto* down = moe_vec_down_kernel<G, kPipe>;
  launch_kernel(down, g2, dim3(kVecWarps * 32), vec_smem(down, kPipe, kVecWarps), stream, a, ws);
  check_launch("moe down (vec)");
}

template <bool kPipe>
void launch_vec_direct(const MoeArgs& a, const MoeWorkspace& ws, const dim3& g1, int gu_warps, int down_tiles,
                       cudaStream_t stream) {
  auto* gate_up = moe_vec_gate_up_kernel<true, 1, kPipe>;
  launch_kernel(gate_up, g1, dim3(gu_warps * 32), vec_smem(gate_up, kPipe, gu_warps), stream, a, ws);
  check_launch("moe gate_up (vec, one row)");
  auto* down = moe_vec_down_direct_kernel<kPipe>;
  launch_kernel(down, dim3(static_cast<unsigned>(down_tiles)), dim3(kVecWarps * 32), vec_smem(down, kPipe, kVecWarps),
                stream, a, ws);
  check_launch("moe down (vec, one row)");
}

void launch_vec(const MoeArgs& a, const MoeWorkspace& ws, bool direct, cudaStream_t stream) {
  // Routed tasks of G x 8 tokens are fewer than those of 8: the 8-token bound covers both.
  const unsigned tasks = direct ? static_cast<unsigned>(a.k) : static_cast<unsigned>(max_tiles(a.rows * a.k, a.experts, kVecTokens));
  const int gu_warps = a.vec_gate_up_warps == 4 ? 4 : kVecWarps;
  const dim3 g1(static_cast<unsigned>((a.inter + gu_warps * 8 - 1) / (gu_warps * 8)), tasks);
  const int down_tiles = (a.hidden + 15) / 16;
  if (direct) {
    if (a.vec_pipe) launch_vec_direct<true>(a, ws, g1, gu_warps, down_tiles, stream);
    else launch_vec_direct<false>(a, ws, g1, gu_warps, down_tiles, stream);
    return;
  }
  const dim3 g2(static_cast<unsigned>((down_tiles + kVecWarps / 2 - 1) / (kVecWarps / 2)), tasks);
  if (a.vec_groups == 2) {
    if (a.vec_pipe) launch_vec_routed<2, true>(a, ws, g1, gu_warps, g2, stream);
    else launch_vec_routed<2, false>(a, ws, g1, gu_warps, g2, stream);
  } else {
    if (a.vec_pipe) launch_vec_routed<1, true>(a, ws, g1, gu_warps, g2, stream);
    else launch_vec_routed<1, false>(a, ws, g1, gu_warps, g2, stream);
  }
}

template <int kM, bool kDeep>
void launch_mmas_with(const MoeArgs& a, const MoeWorkspace& ws, size_t smem, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>(max_tiles(a.rows * a.k, a.experts, kM));
  cudaFuncSetAttribute(moe_mma_kernel<1, kM, kDeep>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  cudaFuncSetAttribute(moe_mma_kernel<2, kM, kDeep>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  const dim3 g1(static_cast<unsigned>((2 * a.inter + kMmaN - 1) / kMmaN), tiles);
  launch_kernel(moe_mma_kernel<1, kM, kDeep>, g1, dim3(kMmaWarps * 32), smem, stream, a, ws);
  check_launch("moe gate_up (mma)");
  const dim3 g2(static_cast<unsigned>((a.hidden + kMmaN - 1) / kMmaN), tiles);
  launch_kernel(moe_mma_kernel<2, kM, kDeep>, g2, dim3(kMmaWarps * 32), smem, stream, a, ws);
  check_launch("moe down (mma)");
}

// The deep pipeline when asked for and the device lets a block have its shared memory (sm_89 parts
// allow 99 KB per block: 128-token tiles then take the plain kernel).
template <int kM>
void launch_mmas(const MoeArgs& a, const MoeWorkspace& ws, cudaStream_t stream) {
  if (a.mma_deep) {
    int device = 0, optin = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (kMmaDeepSmemBytes<kM> <= static_cast<size_t>(optin))
      return launch_mmas_with<kM, true>(a, ws, kMmaDeepSmemBytes<kM>, stream);
  }
  launch_mmas_with<kM, false>(a, ws, kMmaSmemBytes<kM>, stream);
}

// The tensor-core path's tokens per tile: MoeArgs::mma_tile when it is 32 or 64, else 128.
int mma_tile_tokens(const MoeArgs& a) { return a.mma_tile == 32 || a.mma_tile == 64 ? a.mma_tile : kMmaM; }

}  // namespace

size_t moe_workspace_bytes(int rows, int k, int experts, int hidden, int inter) {
  const size_t slots = static_cast<size_t>(rows) * static_cast<size_t>(k);
  return 256 + align256(static_cast<size_t>(max_tiles(static_cast<int>(slots), experts, kVecTokens)) * 8) +
         align256(static_cast<size_t>(experts + 1) * 4) + align256(slots * 4) +
         align256(slots * static_cast<size_t>(inter) * 2) + align256(slots * static_cast<size_t>(hidden) * 4);
}

void moe(const MoeArgs& a, cudaStream_t stream) {
  if (a.rows <= 0) return;
  if (a.experts > kMaxRouteExperts) throw std::invalid_argument("CUDA moe: too many experts");
  if (a.hidden % 32 != 0 || a.inter % 32 != 0) throw std::invalid_argument("CUDA moe: sizes must be multiples of 32");
  const MoeWorkspace ws = carve(a.workspace, a.rows, a.k, a.experts, a.inter);
  const int n = a.rows * a.k;
  // Tensor-core tiles once experts average more than 24 tokens; below that the vector path, which
  // reads each expert's weights once per 8 tokens. Measured on an H200 (20b layer): 8 tokens per
  // expert vector 384 us / tiles 770 us, 32 tokens per expert vector 981 us / tiles 794 us.
  const bool mma = a.path == MoePath::kMma || (a.path == MoePath::kAuto && n > 24 * a.experts);
  // A single row needs no routing: its k slots are the vector path's tasks, and the down product
  // sums them itself (no combine pass).
  if (!mma && a.rows == 1 && a.k <= kMaxDirectK) {
    launch_vec(a, ws, true, stream);
    return;
  }
  const int tile = mma ? mma_tile_tokens(a) : (a.vec_groups == 2 ? 2 : 1) * kVecTokens;
  launch_kernel(route_kernel, dim3(1), dim3(1024), static_cast<size_t>(2 * a.experts) * sizeof(int), stream, a.ids, n,
                a.experts, tile, ws);
  check_launch("moe route");
  if (mma) {
    if (tile == 32) launch_mmas<32>(a, ws, stream);
    else if (tile == 64) launch_mmas<64>(a, ws, stream);
    else launch_mmas<kMmaM>(a, ws, stream);
  } else {
    launch_vec(a, ws, false, stream);
  }
  launch_kernel(combine_kernel, dim3(a.rows), dim3(256), 0, stream, a.ids, a.weights, a.k, a.experts, ws.y, a.hidden,
                static_cast<bf16*>(a.out));
  check_launch("moe combine");
}

}  // namespace arbiter::cuda
