// MoE experts on MXFP4 weights (gpt-oss.md §3, §4.6). Tokens are grouped by expert (route), then two
// grouped products read the packed weights directly and dequantize each 32-value block in
// registers: gate_up with the clamped SwiGLU fused into its epilogue (rows 2j/2j+1 are channel j's
// gate/up), then down with its bias. Each (row, slot) result lands in its own slot of a buffer, and
// a last kernel sums the slots of each row with the router weights, in slot order, so the result
// does not depend on how tokens were grouped. The expert weights are never expanded in memory.
// Two product kernels: a warp-per-row matrix-vector path for few tokens per expert (decode), and a
// tensor-core path (WMMA bf16, fp32 accumulation) over 64-token x 64-row tiles for many, where each
// 64-wide K slice of the weights is dequantized into shared memory just before use.
#include <mma.h>

#include <algorithm>

#include "kernels/cuda/common.cuh"

namespace arbiter::cuda {
namespace {

constexpr int kGemvWarps = 4;
constexpr int kTileM = 64, kTileN = 64, kTileK = 64, kMmaThreads = 128;
constexpr int kMaxRouteExperts = 4096;

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

int max_tiles(int slots, int experts) { return (slots + kTileM - 1) / kTileM + experts; }

struct MoeWorkspace {
  int32_t* tile_count;  // [1]
  int32_t* active_count;  // [1]
  int32_t* active;   // [E]: experts with tokens, ascending
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
  w.active_count = w.tile_count + 1;
  p += 256;
  w.active = reinterpret_cast<int32_t*>(p);
  p += align256(static_cast<size_t>(experts) * 4);
  w.tiles = reinterpret_cast<int32_t*>(p);
  p += align256(static_cast<size_t>(max_tiles(static_cast<int>(slots), experts)) * 8);
  w.offsets = reinterpret_cast<int32_t*>(p);
  p += align256(static_cast<size_t>(experts + 1) * 4);
  w.sorted = reinterpret_cast<int32_t*>(p);
  p += align256(slots * 4);
  w.act = reinterpret_cast<bf16*>(p);
  p += align256(slots * static_cast<size_t>(inter) * 2);
  w.y = reinterpret_cast<float*>(p);
  return w;
}

__global__ void route_kernel(const int32_t* ids, int n, int experts, MoeWorkspace ws) {
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
    int tiles = 0, active = 0;
    for (int e = 0; e < experts; ++e) {
      if (count[e] > 0) ws.active[active++] = e;
      for (int t = 0; t < count[e]; t += kTileM) {
        ws.tiles[2 * tiles] = e;
        ws.tiles[2 * tiles + 1] = t;
        ++tiles;
      }
    }
    *ws.tile_count = tiles;
    *ws.active_count = active;
  }
  __syncthreads();
  for (int s = threadIdx.x; s < n; s += blockDim.x) {
    const int e = ids[s];
    if (e >= 0 && e < experts) sorted[atomicAdd(&cursor[e], 1)] = s;
  }
}

// A block's E8M0 scale 2^(s-127), times the 2^126 that decode8's bit patterns need, split into
// two factors that cannot overflow: weight = pattern * pre * post (post is 1 unless s > 128).
struct BlockScale {
  float pre, post;
};
__device__ __forceinline__ BlockScale block_scale(uint32_t s) {
  if (s <= 128) return {__uint_as_float((s + 126) << 23), 1.0f};
  return {0x1p127f, __uint_as_float((s - 1) << 23)};
}

// Eight FP4 (E2M1) codes of a little-endian word, low nibble first, times `pre`. Sign and the three
// magnitude bits are placed in an fp32 pattern worth value * 2^-126 (denormal for codes +-1, which
// fp32 multiplies keep exactly: no flush-to-zero in this file); `pre` carries 2^126 and the scale.
__device__ __forceinline__ void decode8(uint32_t w, float pre, float (&f)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t sign = (4 * i + 3 <= 31 ? (w << (28 - 4 * i)) : 0u) & 0x80000000u;
    const uint32_t mag = (4 * i <= 22 ? (w << (22 - 4 * i)) : (w >> (4 * i - 22))) & 0x01C00000u;
    f[i] = __uint_as_float(sign | mag) * pre;
  }
}

__device__ __forceinline__ uint32_t word(const uint4& u, int q) { return q == 0 ? u.x : q == 1 ? u.y : q == 2 ? u.z : u.w; }

// Warp-per-two-weight-rows product for the tokens routed to one expert (blockIdx.y indexes the
// experts that have tokens), T tokens at a time. Each lane owns every 32nd 32-value block of the two
// rows; up to kUnroll blocks' codes are loaded before any is used, to keep loads in flight.
template <int kStage, int T>
__global__ __launch_bounds__(kGemvWarps * 32) void moe_gemv_kernel(MoeArgs a, MoeWorkspace ws) {
  constexpr int kUnroll = T == 1 ? 4 : 1;
  if (static_cast<int>(blockIdx.y) >= *ws.active_count) return;
  const int e = ws.active[blockIdx.y];
  const int begin = ws.offsets[e];
  const int n = ws.offsets[e + 1] - begin;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int in = kStage == 1 ? a.hidden : a.inter;
  const int out_rows = kStage == 1 ? 2 * a.inter : a.hidden;
  const int groups = in / 32;
  const int row0 = (blockIdx.x * kGemvWarps + warp) * 2;
  if (row0 >= out_rows) return;
  const bool has2 = row0 + 1 < out_rows;
  const int64_t first_row = static_cast<int64_t>(e) * out_rows + row0;
  const uint8_t* blocks = (kStage == 1 ? a.gu_blocks : a.dn_blocks) + first_row * groups * 16;
  const uint8_t* scales = (kStage == 1 ? a.gu_scales : a.dn_scales) + first_row * groups;
  const bf16* bias = static_cast<const bf16*>(kStage == 1 ? a.gu_bias : a.dn_bias) + first_row;
  const float b0 = bf2f(bias[0]), b1 = has2 ? bf2f(bias[1]) : 0.0f;
  // The second row of a pair that does not exist reads the first row again (and is never stored).
  const int64_t second = has2 ? groups : 0;

  for (int t0 = 0; t0 < n; t0 += T) {
    const int nt = min(T, n - t0);
    int slot[T];
    const bf16* xp[T];
#pragma unroll
    for (int t = 0; t < T; ++t) {
      slot[t] = ws.sorted[begin + t0 + (t < nt ? t : 0)];
      xp[t] = kStage == 1 ? static_cast<const bf16*>(a.x) + static_cast<int64_t>(slot[t] / a.k) * a.hidden
                          : ws.act + static_cast<int64_t>(slot[t]) * a.inter;
    }
    float acc0[T], acc1[T];
#pragma unroll
    for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = 0.0f;
    for (int g0 = lane; g0 < groups; g0 += 32 * kUnroll) {
      uint4 c0[kUnroll], c1[kUnroll];
      uint32_t s0[kUnroll], s1[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int g = g0 + 32 * u;
        if (g < groups) {
          c0[u] = *reinterpret_cast<const uint4*>(blocks + static_cast<int64_t>(g) * 16);
          c1[u] = *reinterpret_cast<const uint4*>(blocks + (second + g) * 16);
          s0[u] = scales[g];
          s1[u] = scales[second + g];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int g = g0 + 32 * u;
        if (g >= groups) break;
        const BlockScale sc0 = block_scale(s0[u]), sc1 = block_scale(s1[u]);
        float p0[T], p1[T];
#pragma unroll
        for (int t = 0; t < T; ++t) p0[t] = p1[t] = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float f0[8], f1[8];
          decode8(word(c0[u], q), sc0.pre, f0);
          decode8(word(c1[u], q), sc1.pre, f1);
#pragma unroll
          for (int t = 0; t < T; ++t) {
            if (t < nt) {
              const uint4 v = *reinterpret_cast<const uint4*>(xp[t] + g * 32 + q * 8);
              const float x[8] = {bits_lo(v.x), bits_hi(v.x), bits_lo(v.y), bits_hi(v.y),
                                  bits_lo(v.z), bits_hi(v.z), bits_lo(v.w), bits_hi(v.w)};
#pragma unroll
              for (int i = 0; i < 8; ++i) {
                p0[t] += f0[i] * x[i];
                p1[t] += f1[i] * x[i];
              }
            }
          }
        }
#pragma unroll
        for (int t = 0; t < T; ++t) {
          acc0[t] += p0[t] * sc0.post;
          acc1[t] += p1[t] * sc1.post;
        }
      }
    }
#pragma unroll
    for (int t = 0; t < T; ++t) {
      acc0[t] = warp_sum(acc0[t]);
      acc1[t] = warp_sum(acc1[t]);
    }
#pragma unroll
    for (int t = 0; t < T; ++t) {
      if (lane == t && t < nt) {
        if constexpr (kStage == 1) {
          const float gate = fminf(acc0[t] + b0, a.limit);
          const float up = fmaxf(-a.limit, fminf(acc1[t] + b1, a.limit));
          const float v = gate / (1.0f + expf(-1.702f * gate)) * (up + 1.0f);
          ws.act[static_cast<int64_t>(slot[t]) * a.inter + row0 / 2] = f2bf(v);
        } else {
          float* yr = ws.y + static_cast<int64_t>(slot[t]) * a.hidden + row0;
          yr[0] = acc0[t] + b0;
          if (has2) yr[1] = acc1[t] + b1;
        }
      }
    }
  }
}

// Tensor-core grouped product over one (64-token tile of one expert) x (64 weight rows) block.
template <int kStage>
__global__ __launch_bounds__(kMmaThreads) void moe_mma_kernel(MoeArgs a, MoeWorkspace ws) {
  using namespace nvcuda;
  const int tile = blockIdx.y;
  if (tile >= *ws.tile_count) return;
  const int e = ws.tiles[2 * tile], t0 = ws.tiles[2 * tile + 1];
  const int begin = ws.offsets[e];
  const int nt = min(kTileM, ws.offsets[e + 1] - begin - t0);
  const int in = kStage == 1 ? a.hidden : a.inter;
  const int out_rows = kStage == 1 ? 2 * a.inter : a.hidden;
  const int groups = in / 32;
  const int col0 = blockIdx.x * kTileN;
  if (col0 >= out_rows) return;
  constexpr int kLd = kTileK + 8;  // bf16 elements per shared row (pads banks, keeps 32-byte alignment)
  constexpr int kLdc = kTileN + 4;
  struct Operands {
    bf16 x[kTileM][kLd];
    bf16 w[kTileN][kLd];
  };
  union Smem {
    Operands op;
    float c[kTileM][kLdc];
  };
  __shared__ __align__(128) Smem sm;
  __shared__ const bf16* rows_of[kTileM];
  __shared__ int slot_of[kTileM];
  const int tid = threadIdx.x, warp = tid >> 5;
  if (tid < kTileM) {
    const int slot = tid < nt ? ws.sorted[begin + t0 + tid] : -1;
    slot_of[tid] = slot;
    rows_of[tid] = slot < 0 ? nullptr
                            : (kStage == 1 ? static_cast<const bf16*>(a.x) + static_cast<int64_t>(slot / a.k) * a.hidden
                                           : ws.act + static_cast<int64_t>(slot) * a.inter);
  }
  const uint8_t* blocks = (kStage == 1 ? a.gu_blocks : a.dn_blocks) + static_cast<int64_t>(e) * out_rows * groups * 16;
  const uint8_t* scales = (kStage == 1 ? a.gu_scales : a.dn_scales) + static_cast<int64_t>(e) * out_rows * groups;
  __syncthreads();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;

  // Register staging of the next K slice: the global loads of slice kb+64 are in flight while the
  // tensor cores work on slice kb. Activations: 4 x 16 bytes per thread; weights: one 32-value block.
  constexpr int kXLoads = kTileM * (kTileK / 8) / kMmaThreads;
  uint4 xr[kXLoads];
  uint4 wcodes = make_uint4(0, 0, 0, 0);
  uint32_t wscale = 0;
  bool wvalid = false;
  const int wrow = tid >> 1, whalf = tid & 1;
  auto load_slice = [&](int kb) {
#pragma unroll
    for (int i = 0; i < kXLoads; ++i) {
      const int idx = tid + i * kMmaThreads;
      const int r = idx / (kTileK / 8), c = (idx % (kTileK / 8)) * 8;
      xr[i] = make_uint4(0, 0, 0, 0);
      if (rows_of[r] && kb + c < in) xr[i] = *reinterpret_cast<const uint4*>(rows_of[r] + kb + c);
    }
    const int row = col0 + wrow, g = kb / 32 + whalf;
    wvalid = row < out_rows && g < groups;
    if (wvalid) {
      wcodes = *reinterpret_cast<const uint4*>(blocks + (static_cast<int64_t>(row) * groups + g) * 16);
      wscale = scales[static_cast<int64_t>(row) * groups + g];
    }
  };
  auto store_slice = [&]() {
#pragma unroll
    for (int i = 0; i < kXLoads; ++i) {
      const int idx = tid + i * kMmaThreads;
      const int r = idx / (kTileK / 8), c = (idx % (kTileK / 8)) * 8;
      *reinterpret_cast<uint4*>(&sm.op.x[r][c]) = xr[i];
    }
    uint32_t packed[16];
    if (wvalid) {
      const BlockScale sc = block_scale(wscale);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float f[8];
        decode8(word(wcodes, q), sc.pre, f);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const __nv_bfloat162 two = __floats2bfloat162_rn(f[2 * i] * sc.post, f[2 * i + 1] * sc.post);
          packed[4 * q + i] = *reinterpret_cast<const uint32_t*>(&two);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) packed[i] = 0;
    }
    uint4* dst = reinterpret_cast<uint4*>(&sm.op.w[wrow][whalf * 32]);
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[i] = make_uint4(packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]);
  };

  load_slice(0);
  for (int kb = 0; kb < in; kb += kTileK) {
    store_slice();
    __syncthreads();
    if (kb + kTileK < in) load_slice(kb + kTileK);
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sm.op.x[wm + 16 * i][kk], kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sm.op.w[wn + 16 * j][kk], kLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&sm.c[wm + 16 * i][wn + 16 * j], acc[i][j], kLdc, wmma::mem_row_major);
  __syncthreads();
  const bf16* bias = static_cast<const bf16*>(kStage == 1 ? a.gu_bias : a.dn_bias) + static_cast<int64_t>(e) * out_rows;
  if constexpr (kStage == 1) {
    for (int i = tid; i < kTileM * (kTileN / 2); i += kMmaThreads) {
      const int r = i / (kTileN / 2), j = i % (kTileN / 2);
      const int col = col0 + 2 * j;
      if (r >= nt || col >= out_rows) continue;
      const float gate = fminf(sm.c[r][2 * j] + bf2f(bias[col]), a.limit);
      const float up = fmaxf(-a.limit, fminf(sm.c[r][2 * j + 1] + bf2f(bias[col + 1]), a.limit));
      const float v = gate / (1.0f + expf(-1.702f * gate)) * (up + 1.0f);
      ws.act[static_cast<int64_t>(slot_of[r]) * a.inter + col / 2] = f2bf(v);
    }
  } else {
    for (int i = tid; i < kTileM * kTileN; i += kMmaThreads) {
      const int r = i / kTileN, c = i % kTileN;
      const int col = col0 + c;
      if (r >= nt || col >= out_rows) continue;
      ws.y[static_cast<int64_t>(slot_of[r]) * a.hidden + col] = sm.c[r][c] + bf2f(bias[col]);
    }
  }
}

__global__ void combine_kernel(const int32_t* ids, const float* weights, int k, int experts, const float* y,
                               int hidden, bf16* out) {
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

template <int T>
void launch_gemvs(const MoeArgs& a, const MoeWorkspace& ws, cudaStream_t stream) {
  const int rows_per_block = kGemvWarps * 2;
  const unsigned active = static_cast<unsigned>(std::min(a.experts, a.rows * a.k));
  const dim3 g1(static_cast<unsigned>((2 * a.inter + rows_per_block - 1) / rows_per_block), active);
  moe_gemv_kernel<1, T><<<g1, kGemvWarps * 32, 0, stream>>>(a, ws);
  check_launch("moe gate_up");
  const dim3 g2(static_cast<unsigned>((a.hidden + rows_per_block - 1) / rows_per_block), active);
  moe_gemv_kernel<2, T><<<g2, kGemvWarps * 32, 0, stream>>>(a, ws);
  check_launch("moe down");
}

void launch_mmas(const MoeArgs& a, const MoeWorkspace& ws, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>(max_tiles(a.rows * a.k, a.experts));
  const dim3 g1(static_cast<unsigned>((2 * a.inter + kTileN - 1) / kTileN), tiles);
  moe_mma_kernel<1><<<g1, kMmaThreads, 0, stream>>>(a, ws);
  check_launch("moe gate_up (mma)");
  const dim3 g2(static_cast<unsigned>((a.hidden + kTileN - 1) / kTileN), tiles);
  moe_mma_kernel<2><<<g2, kMmaThreads, 0, stream>>>(a, ws);
  check_launch("moe down (mma)");
}

}  // namespace

size_t moe_workspace_bytes(int rows, int k, int experts, int hidden, int inter) {
  const size_t slots = static_cast<size_t>(rows) * static_cast<size_t>(k);
  return 256 + align256(static_cast<size_t>(experts) * 4) +
         align256(static_cast<size_t>(max_tiles(static_cast<int>(slots), experts)) * 8) +
         align256(static_cast<size_t>(experts + 1) * 4) + align256(slots * 4) +
         align256(slots * static_cast<size_t>(inter) * 2) + align256(slots * static_cast<size_t>(hidden) * 4);
}

void moe(const MoeArgs& a, cudaStream_t stream) {
  if (a.rows <= 0) return;
  if (a.experts > kMaxRouteExperts) throw std::invalid_argument("CUDA moe: too many experts");
  if (a.hidden % 32 != 0 || a.inter % 32 != 0) throw std::invalid_argument("CUDA moe: sizes must be multiples of 32");
  const MoeWorkspace ws = carve(a.workspace, a.rows, a.k, a.experts, a.inter);
  const int n = a.rows * a.k;
  route_kernel<<<1, 1024, static_cast<size_t>(2 * a.experts) * sizeof(int), stream>>>(a.ids, n, a.experts, ws);
  check_launch("moe route");
  // Tensor cores once experts average 4+ tokens (measured on an H200: faster from about 8 tokens per
  // expert even with most of each 64-token tile empty); the matrix-vector path below that.
  const bool mma = a.path == MoePath::kMma || (a.path == MoePath::kAuto && n >= 4 * a.experts);
  if (mma) {
    launch_mmas(a, ws, stream);
  } else if (a.rows == 1) {
    launch_gemvs<1>(a, ws, stream);
  } else {
    launch_gemvs<8>(a, ws, stream);
  }
  combine_kernel<<<a.rows, 256, 0, stream>>>(a.ids, a.weights, a.k, a.experts, ws.y, a.hidden,
                                             static_cast<bf16*>(a.out));
  check_launch("moe combine");
}

}  // namespace arbiter::cuda
