// Dense bf16 products for steps of few rows (decode): out[m, n] = x[m] . W[n] + bias[n], fp32
// accumulation, bf16 or f32 out. Memory-bound: a block owns R weight rows and its 256 threads split K,
// each streaming 16-byte chunks of all R rows (kUnroll chunks per row in flight per thread, so one or
// two rounds cover a 2880- or 4096-wide row) against the (at most 8) activation rows, which stay in
// L1; warp sums, then the 8 warps' partials added in warp order. One launch may cover several
// products of the same activations (q, k, v), each block working for one of them. Replaces cuBLASLt where it would read
// the weights with a general GEMM kernel and a separate bias pass.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/gemv_rows.cuh"
#include "kernels/cuda/norm.cuh"
#include "kernels/cuda/rope.cuh"
#include "kernels/cuda/router.cuh"

namespace arbiter::cuda {
namespace {

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kUnroll = 2;

__device__ __forceinline__ float dot8(const uint4& w, const uint4& x) {
  float s = bits_lo(w.x) * bits_lo(x.x);
  s = fmaf(bits_hi(w.x), bits_hi(x.x), s);
  s = fmaf(bits_lo(w.y), bits_lo(x.y), s);
  s = fmaf(bits_hi(w.y), bits_hi(x.y), s);
  s = fmaf(bits_lo(w.z), bits_lo(x.z), s);
  s = fmaf(bits_hi(w.z), bits_hi(x.z), s);
  s = fmaf(bits_lo(w.w), bits_lo(x.w), s);
  s = fmaf(bits_hi(w.w), bits_hi(x.w), s);
  return s;
}

// The products of one launch: target j owns blocks [first_block[j], first_block[j + 1]).
struct GemvLaunch {
  const bf16* w[kGemvMaxTargets];
  const bf16* bias[kGemvMaxTargets];
  void* out[kGemvMaxTargets];
  int n[kGemvMaxTargets];
  int first_block[kGemvMaxTargets];
  int count;
  int rope_targets;  // targets [0, rope_targets) are rotated by `rope` (q, k); 0: none
};

// The router's top-k after its logits (a single f32 target): the last block to finish (counter,
// reset by that block) runs router_topk_row on each row, one warp per row.
struct RouteEpilogue {
  int k = 0;
  int32_t* ids = nullptr;
  float* weights = nullptr;
  uint32_t* counter = nullptr;
};

// The residual add + RMSNorm after the o projection (a single bf16 target of `dim` outputs): the last
// block to finish (counter, reset by that block) runs add_rms_norm_row on each row.
struct NormEpilogue {
  bf16* residual = nullptr;
  const void* weight = nullptr;
  bool weight_bf16 = false;
  float eps = 0.0f;
  bf16* out = nullptr;
  uint32_t* counter = nullptr;
};

enum GemvEpilogue : int { kPlain = 0, kRouteTopk = 1, kAddNorm = 2 };

// Whether this block is the last of the launch to get here (every thread of every block calls it after
// writing its outputs); that block then sees every block's writes. The caller's last block resets the
// counter for the next launch.
__device__ __forceinline__ bool last_block_to_finish(uint32_t* counter) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

template <int M, int R, int kEpi>
__global__ __launch_bounds__(kGemvThreads) void gemv_kernel(const bf16* x, int m_count, GemvLaunch targets,
                                                             bool out_f32, int k, RouteEpilogue route, GemvRope rope,
                                                             NormEpilogue norm) {
  constexpr bool kRoute = kEpi == kRouteTopk;
  static_assert(R % 2 == 0, "rotated blocks hold whole RoPE pairs");
  __shared__ float part[kGemvWarps][R * M];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // This block's target (selected without indexing the parameter arrays dynamically).
  const bf16* w = targets.w[0];
  const bf16* bias = targets.bias[0];
  void* out = targets.out[0];
  int n = targets.n[0], first = 0;
  bool rotated = targets.rope_targets > 0;
#pragma unroll
  for (int j = 1; j < kGemvMaxTargets; ++j)
    if (j < targets.count && static_cast<int>(blockIdx.x) >= targets.first_block[j]) {
      w = targets.w[j];
      bias = targets.bias[j];
      out = targets.out[j];
      n = targets.n[j];
      first = targets.first_block[j];
      rotated = j < targets.rope_targets;
    }
  const int local_block = static_cast<int>(blockIdx.x) - first;
  const int chunks = k / 8;
  const uint4* wr[R];
#pragma unroll
  for (int r = 0; r < R; ++r)
    wr[r] = reinterpret_cast<const uint4*>(
        w + static_cast<int64_t>(min(gemv_row<R>(local_block, r, rotated, rope.head_dim), n - 1)) * k);
  // Weights are never written: fetch this thread's first chunks into L2 while (with PDL) the
  // previous kernel finishes, then wait for the activations.
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int c = static_cast<int>(threadIdx.x) + kGemvThreads * u;
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (c < chunks) prefetch_l2(wr[r] + c);
  }
  pdl_begin();
  const uint4* xr = reinterpret_cast<const uint4*>(x);
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
  for (int c0 = static_cast<int>(threadIdx.x); c0 < chunks; c0 += kGemvThreads * kUnroll) {
    uint4 wv[kUnroll][R];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + kGemvThreads * u;
#pragma unroll
      for (int r = 0; r < R; ++r) wv[u][r] = c < chunks ? __ldcs(wr[r] + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + kGemvThreads * u;
      if (c >= chunks) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (m < m_count) {
          const uint4 xv = __ldg(xr + static_cast<int64_t>(m) * chunks + c);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r][m] += dot8(wv[u][r], xv);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float s = warp_sum(acc[r][m]);
      if (lane == 0) part[warp][r * M + m] = s;
    }
  __syncthreads();
  const int t = static_cast<int>(threadIdx.x);
  if (t < R * M) {
    const int r = t / M, m = t % M, row = gemv_row<R>(local_block, r, rotated, rope.head_dim);
    if (row < n && m < m_count) {
      float v = part[0][t];
#pragma unroll
      for (int q = 1; q < kGemvWarps; ++q) v += part[q][t];
      if (bias) v += bf2f(bias[row]);
      const int64_t o = static_cast<int64_t>(m) * n + row;
      if (rotated) part[0][t] = bf2f(f2bf(v));  // what the rope kernel would read back from out
      else if (out_f32) static_cast<float*>(out)[o] = v;
      else static_cast<bf16*>(out)[o] = f2bf(v);
    }
  }
  if (rotated) {  // block-uniform; this block's rows are whole pairs (i, i + half) of one head
    __syncthreads();
    if (t < (R / 2) * M) {
      const int r = t / M, m = t % M;
      if (m < m_count) {
        const int row_a = gemv_row<R>(local_block, r, true, rope.head_dim);
        const int row_b = gemv_row<R>(local_block, r + R / 2, true, rope.head_dim);
        float c, s;
        rope_cos_sin(rope.args, rope.row_pos[m], row_a % rope.head_dim, c, s);
        bf16* o = static_cast<bf16*>(out) + static_cast<int64_t>(m) * n;
        rope_rotate(part[0][r * M + m], part[0][(r + R / 2) * M + m], c, s, o[row_a], o[row_b]);
      }
    }
  }
  if constexpr (kEpi == kAddNorm) {
    __shared__ float scratch[32];
    if (!last_block_to_finish(norm.counter)) return;
    for (int m = 0; m < m_count; ++m)
      add_rms_norm_row<true>(norm.residual, static_cast<const bf16*>(out), norm.weight, norm.weight_bf16, norm.eps, norm.out,
                             n, static_cast<int64_t>(m) * n, scratch);
    if (t == 0) *norm.counter = 0;
  }
  if constexpr (kRoute) {
    if (!last_block_to_finish(route.counter)) return;
    if (warp < m_count)
      router_topk_row(static_cast<const float*>(out) + static_cast<int64_t>(warp) * n, n, route.k,
                      route.ids + static_cast<int64_t>(warp) * route.k, route.weights + static_cast<int64_t>(warp) * route.k);
    if (t == 0) *route.counter = 0;
  }
}

template <int M, int R, int kEpi = kPlain>
void launch(const void* x, int m, const GemvTarget* targets, int count, bool out_f32, int k, cudaStream_t stream,
            const RouteEpilogue& route = {}, const GemvRope& rope = {}, const NormEpilogue& norm = {}) {
  GemvLaunch l{};
  l.rope_targets = rope.targets;
  int blocks = 0;
  for (int j = 0; j < count; ++j) {
    l.w[j] = static_cast<const bf16*>(targets[j].w);
    l.bias[j] = static_cast<const bf16*>(targets[j].bias);
    l.out[j] = targets[j].out;
    l.n[j] = static_cast<int>(targets[j].n);
    l.first_block[j] = blocks;
    blocks += (l.n[j] + R - 1) / R;
  }
  l.count = count;
  launch_kernel(gemv_kernel<M, R, kEpi>, dim3(blocks), dim3(kGemvThreads), 0, stream, static_cast<const bf16*>(x), m,
                l, out_f32, k, route, rope, norm);
  check_launch("gemv");
}

void launch_for_rows(const void* x, int m, const GemvTarget* targets, int count, bool out_f32, int k,
                     cudaStream_t stream, const GemvRope& rope = {}) {
  if (m == 1) launch<1, 4>(x, m, targets, count, out_f32, k, stream, {}, rope);
  else if (m == 2) launch<2, 4>(x, m, targets, count, out_f32, k, stream, {}, rope);
  else if (m <= 4) launch<4, 2>(x, m, targets, count, out_f32, k, stream, {}, rope);
  else launch<8, 2>(x, m, targets, count, out_f32, k, stream, {}, rope);
}

}  // namespace

bool gemv_supported(int m, int64_t n, int64_t k) {
  return m >= 1 && m <= kGemvMaxRows && k % 8 == 0 && k > 0 && n > 0 && n < (int64_t{1} << 30) &&
         k < (int64_t{1} << 30);
}

void gemv(const void* x, int m, const void* w, const void* bias, void* out, bool out_f32, int64_t n, int64_t k,
          cudaStream_t stream) {
  if (!gemv_supported(m, n, k)) throw std::invalid_argument("CUDA gemv: unsupported shape");
  const GemvTarget target{w, bias, out, n};
  launch_for_rows(x, m, &target, 1, out_f32, static_cast<int>(k), stream);
}

bool route_supported(int m, int64_t experts, int64_t k, int top_k) {
  return gemv_supported(m, experts, k) && top_k >= 1 && top_k <= 32 && top_k <= experts &&
         experts <= 32 * 32 * kMaxExpertWords;
}

size_t route_workspace_bytes() { return 256; }  // the router's counter at 0, the norm epilogue's at 128

void gemv_add_rms_norm(const void* x, int m, const void* w, const void* bias, void* delta, int64_t n, int64_t k,
                       void* residual, const void* norm_weight, bool norm_weight_bf16, float eps, void* out,
                       void* workspace, cudaStream_t stream) {
  if (!gemv_supported(m, n, k)) throw std::invalid_argument("CUDA gemv_add_rms_norm: unsupported shape");
  const GemvTarget target{w, bias, delta, n};
  NormEpilogue e;
  e.residual = static_cast<bf16*>(residual);
  e.weight = norm_weight;
  e.weight_bf16 = norm_weight_bf16;
  e.eps = eps;
  e.out = static_cast<bf16*>(out);
  e.counter = reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(workspace) + 128);
  const int ki = static_cast<int>(k);
  if (m == 1) launch<1, 4, kAddNorm>(x, m, &target, 1, false, ki, stream, {}, {}, e);
  else if (m == 2) launch<2, 4, kAddNorm>(x, m, &target, 1, false, ki, stream, {}, {}, e);
  else if (m <= 4) launch<4, 2, kAddNorm>(x, m, &target, 1, false, ki, stream, {}, {}, e);
  else launch<8, 2, kAddNorm>(x, m, &target, 1, false, ki, stream, {}, {}, e);
}

void route(const void* x, int m, const void* w, const void* bias, float* logits, int64_t experts, int64_t k, int top_k,
           int32_t* ids, float* weights, void* workspace, cudaStream_t stream) {
  if (!route_supported(m, experts, k, top_k)) throw std::invalid_argument("CUDA route: unsupported shape");
  const GemvTarget target{w, bias, logits, experts};
  RouteEpilogue r;
  r.k = top_k;
  r.ids = ids;
  r.weights = weights;
  r.counter = static_cast<uint32_t*>(workspace);
  // One row per warp of the last block: every m <= kGemvMaxRows fits.
  const int ki = static_cast<int>(k);
  if (m == 1) launch<1, 4, kRouteTopk>(x, m, &target, 1, true, ki, stream, r);
  else if (m == 2) launch<2, 4, kRouteTopk>(x, m, &target, 1, true, ki, stream, r);
  else if (m <= 4) launch<4, 2, kRouteTopk>(x, m, &target, 1, true, ki, stream, r);
  else launch<8, 2, kRouteTopk>(x, m, &target, 1, true, ki, stream, r);
}

void gemv_group(const void* x, int m, const GemvTarget* targets, int count, bool out_f32, int64_t k,
                cudaStream_t stream, const GemvRope* rope) {
  if (count < 1 || count > kGemvMaxTargets) throw std::invalid_argument("CUDA gemv_group: 1 to 4 targets");
  if (rope && rope->targets > 0) {
    const int d = rope->head_dim;
    if (out_f32 || rope->targets > count || d <= 0 || d % 8 != 0 || d / 2 != rope->args.half || d / 2 > kMaxRopeHalf ||
        !rope->row_pos)
      throw std::invalid_argument("CUDA gemv_group: RoPE needs bf16 outputs and head_dim a multiple of 8 (<= 256)");
    for (int j = 0; j < rope->targets; ++j)
      if (targets[j].n % d != 0) throw std::invalid_argument("CUDA gemv_group: rotated rows are not whole heads");
  }
  int64_t blocks = 0;
  for (int j = 0; j < count; ++j) {
    if (!gemv_supported(m, targets[j].n, k)) throw std::invalid_argument("CUDA gemv_group: unsupported shape");
    blocks += targets[j].n;  // an upper bound on the blocks (R >= 1)
  }
  if (blocks >= (int64_t{1} << 30)) throw std::invalid_argument("CUDA gemv_group: too many rows");
  launch_for_rows(x, m, targets, count, out_f32, static_cast<int>(k), stream, rope ? *rope : GemvRope{});
}

}  // namespace arbiter::cuda
