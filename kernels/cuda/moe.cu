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
    int tiles = 0;
    for (int e = 0; e < experts; ++e)
      for (int t = 0; t < count[e]; t += kTileM) {
        ws.tiles[2 * tiles] = e;
        ws.tiles[2 * tiles + 1] = t;
        ++tiles;
      }
    *ws.tile_count = tiles;
  }
  __syncthreads();
  for (int s = threadIdx.x; s < n; s += blockDim.x) {
    const int e = ids[s];
    if (e >= 0 && e < experts) sorted[atomicAdd(&cursor[e], 1)] = s;
  }
}

__device__ __forceinline__ float e8m0(uint32_t s) { return s == 0 ? 0x1p-127f : __uint_as_float(s << 23); }

// Eight FP4 (E2M1) codes of a little-endian word, low nibble first, as floats. The three magnitude
// bits land in an fp32 denormal/normal pattern that is exact after scaling by 2^126.
__device__ __forceinline__ void decode8(uint32_t w, float (&f)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t nib = w >> (4 * i);
    const uint32_t bits = ((nib & 8u) << 28) | ((nib & 7u) << 22);
    f[i] = __uint_as_float(bits) * 0x1p126f;
  }
}

__device__ __forceinline__ uint32_t word(const uint4& u, int q) { return q == 0 ? u.x : q == 1 ? u.y : q == 2 ? u.z : u.w; }

// Warp-per-two-weight-rows product for the tokens routed to expert blockIdx.y, T tokens at a time.
template <int kStage, int T>
__global__ __launch_bounds__(kGemvWarps * 32) void moe_gemv_kernel(MoeArgs a, MoeWorkspace ws) {
  const int e = blockIdx.y;
  const int begin = ws.offsets[e];
  const int n = ws.offsets[e + 1] - begin;
  if (n == 0) return;
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
    for (int g = lane; g < groups; g += 32) {
      const uint4 c0 = *reinterpret_cast<const uint4*>(blocks + static_cast<int64_t>(g) * 16);
      const uint4 c1 = has2 ? *reinterpret_cast<const uint4*>(blocks + (static_cast<int64_t>(groups) + g) * 16)
                            : make_uint4(0, 0, 0, 0);
      const float s0 = e8m0(scales[g]);
      const float s1 = has2 ? e8m0(scales[groups + g]) : 0.0f;
      float p0[T], p1[T];
#pragma unroll
      for (int t = 0; t < T; ++t) p0[t] = p1[t] = 0.0f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float f0[8], f1[8];
        decode8(word(c0, q), f0);
        decode8(word(c1, q), f1);
#pragma unroll
        for (int t = 0; t < T; ++t) {
          if (t < nt) {
            const uint4 u = *reinterpret_cast<const uint4*>(xp[t] + g * 32 + q * 8);
            const float x[8] = {bits_lo(u.x), bits_hi(u.x), bits_lo(u.y), bits_hi(u.y),
                                bits_lo(u.z), bits_hi(u.z), bits_lo(u.w), bits_hi(u.w)};
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
        acc0[t] += p0[t] * s0;
        acc1[t] += p1[t] * s1;
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

  for (int kb = 0; kb < in; kb += kTileK) {
    // Activations: 64 rows x 64 values, 16 bytes per load.
    for (int i = tid; i < kTileM * (kTileK / 8); i += kMmaThreads) {
      const int r = i / (kTileK / 8), c = (i % (kTileK / 8)) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (rows_of[r] && kb + c < in) v = *reinterpret_cast<const uint4*>(rows_of[r] + kb + c);
      *reinterpret_cast<uint4*>(&sm.op.x[r][c]) = v;
    }
    // Weights: each thread dequantizes one 32-value block of one row into bf16.
    {
      const int r = tid >> 1, half = tid & 1;
      const int row = col0 + r, g = kb / 32 + half;
      uint32_t packed[16];
      if (row < out_rows && g < groups) {
        const uint4 c = *reinterpret_cast<const uint4*>(blocks + (static_cast<int64_t>(row) * groups + g) * 16);
        const float s = e8m0(scales[static_cast<int64_t>(row) * groups + g]);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float f[8];
          decode8(word(c, q), f);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const __nv_bfloat162 two = __floats2bfloat162_rn(f[2 * i] * s, f[2 * i + 1] * s);
            packed[4 * q + i] = *reinterpret_cast<const uint32_t*>(&two);
          }
        }
      } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) packed[i] = 0;
      }
      uint4* dst = reinterpret_cast<uint4*>(&sm.op.w[r][half * 32]);
#pragma unroll
      for (int i = 0; i < 4; ++i) dst[i] = make_uint4(packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]);
    }
    __syncthreads();
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
  const dim3 g1(static_cast<unsigned>((2 * a.inter + rows_per_block - 1) / rows_per_block),
                static_cast<unsigned>(a.experts));
  moe_gemv_kernel<1, T><<<g1, kGemvWarps * 32, 0, stream>>>(a, ws);
  check_launch("moe gate_up");
  const dim3 g2(static_cast<unsigned>((a.hidden + rows_per_block - 1) / rows_per_block),
                static_cast<unsigned>(a.experts));
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
  return 256 + align256(static_cast<size_t>(max_tiles(static_cast<int>(slots), experts)) * 8) +
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
  // Tensor cores once experts average 16+ tokens; the matrix-vector path below that.
  const bool mma = a.path == MoePath::kMma || (a.path == MoePath::kAuto && n >= 16 * a.experts);
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
