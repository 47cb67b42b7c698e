// Small fused kernels of the CUDA backend: embedding gather, RMSNorm (+ residual add), RoPE, KV-cache
// store, router top-k, row gathers and test fills. All math in fp32; bf16 in memory.
#include <cfloat>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/norm.cuh"
#include "kernels/cuda/rope.cuh"
#include "kernels/cuda/router.cuh"

namespace arbiter::cuda {
namespace {

constexpr int kNormThreads = 256;

__global__ void embedding_kernel(const void* table, bool table_bf16, int64_t vocab, int64_t dim,
                                 const int32_t* tokens, bf16* out) {
  pdl_begin();
  const int row = blockIdx.x;
  const int64_t id = tokens[row];
  bf16* o = out + row * dim;
  const bool ok = id >= 0 && id < vocab;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    if (!ok) {
      o[i] = f2bf(0.0f);
    } else if (table_bf16) {
      o[i] = static_cast<const bf16*>(table)[id * dim + i];
    } else {
      o[i] = f2bf(static_cast<const float*>(table)[id * dim + i]);
    }
  }
}

__global__ void rms_norm_kernel(const bf16* x, const void* weight, bool weight_bf16, float eps, bf16* out, int dim) {
  pdl_begin();
  __shared__ float scratch[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * dim;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = bf2f(x[base + i]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x)
    out[base + i] = f2bf(bf2f(x[base + i]) * inv * load_weight(weight, weight_bf16, i));
}

__global__ void add_rms_norm_kernel(bf16* residual, const bf16* delta, const void* weight, bool weight_bf16,
                                    float eps, bf16* out, int dim) {
  pdl_begin();
  __shared__ float scratch[32];
  add_rms_norm_row<false>(residual, delta, weight, weight_bf16, eps, out, dim, static_cast<int64_t>(blockIdx.x) * dim,
                          scratch);
}

__global__ void add_bias_f32_kernel(float* out, const bf16* bias, int64_t total, int cols) {
  pdl_begin();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] += bf2f(bias[i % cols]);
}

__global__ void rope_kernel(bf16* q, bf16* k, int q_heads, int k_heads, int head_dim, RopeArgs rope,
                            const int32_t* row_pos) {
  pdl_begin();
  const int row = blockIdx.x;
  const int pos = row_pos[row];
  const int half = rope.half;
  const int total = (q_heads + k_heads) * half;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int head = idx / half, i = idx - head * half;
    bf16* v = head < q_heads ? q + (static_cast<int64_t>(row) * q_heads + head) * head_dim
                             : k + (static_cast<int64_t>(row) * k_heads + (head - q_heads)) * head_dim;
    float c, s;
    rope_cos_sin(rope, pos, i, c, s);
    rope_rotate(bf2f(v[i]), bf2f(v[i + half]), c, s, v[i], v[i + half]);
  }
}

__global__ void kv_store_kernel(const uint16_t* k, const uint16_t* v, uint16_t* cache_k, uint16_t* cache_v,
                                int kv_row, int window, StepArgs step) {
  pdl_begin();
  const int row = blockIdx.x;
  const int pos = step.row_pos[row];
  const int32_t* info = step.seq_info + step.row_seq[row] * kSeqFields;
  if (window > 0 && pos - info[kNumCached] < info[kNumNew] - info[kRingCount] * step.block_size)
    return;  // its ring slot is overwritten later in this same step
  const int64_t dst = kv_cache_row(step, info, pos, window) * kv_row;
  const int64_t src = static_cast<int64_t>(row) * kv_row;
  for (int i = threadIdx.x; i < kv_row; i += blockDim.x) {
    cache_k[dst + i] = k[src + i];
    cache_v[dst + i] = v[src + i];
  }
}

// One warp per row (router.cuh).
__global__ void router_topk_kernel(const float* logits, int rows, int experts, int k, int32_t* ids, float* weights) {
  pdl_begin();
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  router_topk_row(logits + static_cast<int64_t>(row) * experts, experts, k, ids + static_cast<int64_t>(row) * k,
                  weights + static_cast<int64_t>(row) * k);
}

__global__ void add_bf16_kernel(bf16* x, const bf16* y, int64_t n) {
  pdl_begin();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = f2bf(bf2f(x[i]) + bf2f(y[i]));
}

__global__ void gather_rows_kernel(const uint8_t* x, uint8_t* out, int64_t row_bytes, const int32_t* rows) {
  pdl_begin();
  const int64_t src = static_cast<int64_t>(rows[blockIdx.x]) * row_bytes;
  const int64_t dst = static_cast<int64_t>(blockIdx.x) * row_bytes;
  if (row_bytes % 4 == 0) {
    const auto* s = reinterpret_cast<const uint32_t*>(x + src);
    auto* d = reinterpret_cast<uint32_t*>(out + dst);
    for (int64_t i = threadIdx.x; i < row_bytes / 4; i += blockDim.x) d[i] = s[i];
  } else {
    for (int64_t i = threadIdx.x; i < row_bytes; i += blockDim.x) out[dst + i] = x[src + i];
  }
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void fill_bf16_kernel(bf16* data, int64_t n, uint64_t seed, float scale, float offset) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = mix64(seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(i));
    // Sum of four 16-bit uniforms: mean 2, variance 1/3.
    float s = 0.0f;
    for (int j = 0; j < 4; ++j) s += static_cast<float>((h >> (16 * j)) & 0xffff) * (1.0f / 65536.0f);
    data[i] = f2bf(offset + scale * (s - 2.0f) * 1.7320508f);
  }
}

__global__ void fill_u8_kernel(uint8_t* data, int64_t n, uint64_t seed, int lo, int hi) {
  const uint32_t span = static_cast<uint32_t>(hi - lo + 1);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = mix64(seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(i));
    data[i] = static_cast<uint8_t>(lo + static_cast<int>(static_cast<uint32_t>(h >> 32) % span));
  }
}

int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65536 ? (blocks < 1 ? 1 : blocks) : 65536);
}

}  // namespace

bool pdl_enabled() {
  static const bool enabled = [] {
    // On by default on sm_90+ (H200: every GPU test passes with it, batch-1 decode 3.20 vs 3.33 ms);
    // ARBITER_CUDA_PDL=0 turns it off.
    const char* env = std::getenv("ARBITER_CUDA_PDL");
    if (env && std::strcmp(env, "0") == 0) return false;
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return major >= 9;
  }();
  return enabled;
}

void embedding(const void* table, bool table_bf16, int64_t vocab, int64_t dim, const StepArgs& step, void* out,
               int rows, cudaStream_t stream) {
  if (rows <= 0) return;
  launch_kernel(embedding_kernel, dim3(rows), dim3(256), 0, stream, table, table_bf16, vocab, dim, step.tokens,
                static_cast<bf16*>(out));
  check_launch("embedding");
}

void rms_norm(const void* x, const void* weight, bool weight_bf16, float eps, void* out, int rows, int dim,
              cudaStream_t stream) {
  if (rows <= 0) return;
  launch_kernel(rms_norm_kernel, dim3(rows), dim3(kNormThreads), 0, stream, static_cast<const bf16*>(x), weight,
                weight_bf16, eps, static_cast<bf16*>(out), dim);
  check_launch("rms_norm");
}

void add_rms_norm(void* residual, const void* delta, const void* weight, bool weight_bf16, float eps, void* out,
                  int rows, int dim, cudaStream_t stream) {
  if (rows <= 0) return;
  launch_kernel(add_rms_norm_kernel, dim3(rows), dim3(kNormThreads), 0, stream, static_cast<bf16*>(residual),
                static_cast<const bf16*>(delta), weight, weight_bf16, eps, static_cast<bf16*>(out), dim);
  check_launch("add_rms_norm");
}

void add_bias_f32(float* out, const void* bias, int rows, int cols, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(rows) * cols;
  if (total <= 0) return;
  launch_kernel(add_bias_f32_kernel, dim3(grid_for(total, 256)), dim3(256), 0, stream, out, static_cast<const bf16*>(bias),
                total, cols);
  check_launch("add_bias_f32");
}

void rope(void* q, void* k, int rows, int q_heads, int k_heads, int head_dim, const RopeArgs& rope,
          const StepArgs& step, cudaStream_t stream) {
  if (rows <= 0) return;
  const int total = (q_heads + k_heads) * rope.half;
  const int threads = total >= 512 ? 512 : ((total + 31) / 32) * 32;
  launch_kernel(rope_kernel, dim3(rows), dim3(threads), 0, stream, static_cast<bf16*>(q), static_cast<bf16*>(k), q_heads,
                k_heads, head_dim, rope, step.row_pos);
  check_launch("rope");
}

void kv_store(const void* k, const void* v, void* cache_k, void* cache_v, int rows, int kv_row, int window,
              const StepArgs& step, cudaStream_t stream) {
  if (rows <= 0) return;
  launch_kernel(kv_store_kernel, dim3(rows), dim3(128), 0, stream, static_cast<const uint16_t*>(k),
                static_cast<const uint16_t*>(v), static_cast<uint16_t*>(cache_k), static_cast<uint16_t*>(cache_v), kv_row,
                window, step);
  check_launch("kv_store");
}

void router_topk(const float* logits, int rows, int experts, int k, int32_t* ids, float* weights,
                 cudaStream_t stream) {
  if (rows <= 0) return;
  if (k > 32 || experts > 32 * 32 * kMaxExpertWords) throw std::invalid_argument("router_topk: k or experts too large");
  const int warps = 4;
  launch_kernel(router_topk_kernel, dim3((rows + warps - 1) / warps), dim3(warps * 32), 0, stream, logits, rows, experts, k,
                ids, weights);
  check_launch("router_topk");
}

void add_bf16(void* x, const void* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  launch_kernel(add_bf16_kernel, dim3(grid_for(n, 256)), dim3(256), 0, stream, static_cast<bf16*>(x),
                static_cast<const bf16*>(y), n);
  check_launch("add");
}

void gather_rows(const void* x, void* out, int64_t row_bytes, const StepArgs& step, cudaStream_t stream) {
  if (step.logit_count <= 0) return;
  launch_kernel(gather_rows_kernel, dim3(step.logit_count), dim3(256), 0, stream, static_cast<const uint8_t*>(x),
                static_cast<uint8_t*>(out), row_bytes, step.logit_rows);
  check_launch("gather_rows");
}

void fill_random_bf16(void* data, int64_t n, uint64_t seed, float scale, float offset, cudaStream_t stream) {
  if (n <= 0) return;
  fill_bf16_kernel<<<grid_for(n, 256), 256, 0, stream>>>(static_cast<bf16*>(data), n, seed, scale, offset);
  check_launch("fill_random_bf16");
}

void fill_random_u8(void* data, int64_t n, uint64_t seed, int lo, int hi, cudaStream_t stream) {
  if (n <= 0) return;
  fill_u8_kernel<<<grid_for(n, 256), 256, 0, stream>>>(static_cast<uint8_t*>(data), n, seed, lo, hi);
  check_launch("fill_random_u8");
}

}  // namespace arbiter::cuda
