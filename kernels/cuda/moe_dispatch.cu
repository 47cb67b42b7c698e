// Expert-parallel dispatch and combine on the device (Backend::moe_dispatch_pack / moe_combine):
// the plan (one block: counts per destination rank, then per-destination exclusive scans in token
// order, so the slots are the host implementation's, kernels/moe_pack.cc), the row copies (one block
// per token) and the per-token sums in rank order (one block per token, fp32 from zero, then bf16);
// and the expert-load counter of the single-rank path (one atomicAdd per routed id). With a capacity
// (the fixed-capacity exchange) destination d's rows start at d * capacity and the plan first marks
// every row of the ranks * capacity as padding (ids -1, weights 0).
#include <algorithm>
#include <cub/block/block_scan.cuh>

#include "kernels/cuda/common.cuh"

namespace arbiter::cuda {
namespace {

constexpr int kPlanThreads = 1024;

// The ranks token t goes to, as a bit mask; sets *bad for an id outside the placement.
__device__ uint64_t destinations(const int32_t* ids, int t, int k, const int32_t* owner, int experts, int ranks,
                                 int64_t* bad) {
  uint64_t mask = 0;
  for (int j = 0; j < k; ++j) {
    const int32_t e = ids[static_cast<int64_t>(t) * k + j];
    if (e < 0) continue;
    const int32_t d = e < experts ? owner[e] : -1;
    if (d < 0 || d >= ranks) {
      *bad = 1;
      continue;
    }
    mask |= uint64_t{1} << d;
  }
  return mask;
}

__global__ void __launch_bounds__(kPlanThreads)
    plan_kernel(const int32_t* ids, const float* weights, int rows, int k, const int32_t* owner, const int32_t* local,
                int experts, int ranks, int capacity, int32_t* slots, int32_t* send_ids, float* send_weights,
                int64_t* counts, int32_t* load) {
  pdl_begin();
  using Scan = cub::BlockScan<int, kPlanThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int count[64], running[64], total[64];
  const int tid = threadIdx.x;
  if (tid < ranks) count[tid] = 0;
  if (tid == 0) counts[ranks] = 0;  // the error flag
  if (capacity > 0)  // padding until a token takes the row (pass 2, after the barriers below)
    for (int64_t i = tid; i < static_cast<int64_t>(ranks) * capacity * k; i += kPlanThreads) {
      send_ids[i] = -1;
      send_weights[i] = 0.0f;
    }
  __syncthreads();
  // Pass 1: rows per destination, and the expert load.
  for (int t = tid; t < rows; t += kPlanThreads) {
    const uint64_t mask = destinations(ids, t, k, owner, experts, ranks, &counts[ranks]);
    for (int d = 0; d < ranks; ++d)
      if (mask >> d & 1) atomicAdd(&count[d], 1);
    if (load)
      for (int j = 0; j < k; ++j) {
        const int32_t e = ids[static_cast<int64_t>(t) * k + j];
        if (e >= 0 && e < experts) atomicAdd(&load[e], 1);
      }
  }
  __syncthreads();
  if (tid == 0) {
    int at = 0;
    for (int d = 0; d < ranks; ++d) {
      running[d] = capacity > 0 ? d * capacity : at;
      counts[d] = count[d];
      at += count[d];
    }
  }
  __syncthreads();
  // Pass 2: tokens in chunks of the block, in order; per destination an exclusive scan of "goes
  // there" gives each token its row among that destination's rows.
  for (int base = 0; base < rows; base += kPlanThreads) {
    const int t = base + tid;
    const uint64_t mask = t < rows ? destinations(ids, t, k, owner, experts, ranks, &counts[ranks]) : 0;
    for (int d = 0; d < ranks; ++d) {
      const int flag = static_cast<int>(mask >> d & 1);
      int prefix = 0, sum = 0;
      Scan(scan).ExclusiveSum(flag, prefix, sum);
      if (t < rows) {
        int32_t slot = -1;
        if (flag) {
          const int64_t row = running[d] + prefix;
          slot = static_cast<int32_t>(row);
          for (int j = 0; j < k; ++j) {
            const int32_t e = ids[static_cast<int64_t>(t) * k + j];
            send_ids[row * k + j] = (e >= 0 && e < experts && owner[e] == d) ? local[e] : -1;
            send_weights[row * k + j] = weights[static_cast<int64_t>(t) * k + j];
          }
        }
        slots[static_cast<int64_t>(t) * ranks + d] = slot;
      }
      if (tid == 0) total[d] = sum;
      __syncthreads();  // the scan storage is reused, and running[d] read, before it moves on
    }
    if (tid < ranks) running[tid] += total[tid];
    __syncthreads();
  }
}

__global__ void copy_rows_kernel(const uint8_t* x, int64_t row_bytes, const int32_t* slots, int ranks, uint8_t* send) {
  pdl_begin();
  const int64_t t = blockIdx.x;
  for (int d = 0; d < ranks; ++d) {
    const int32_t s = slots[t * ranks + d];
    if (s < 0) continue;
    const uint8_t* src = x + t * row_bytes;
    uint8_t* dst = send + static_cast<int64_t>(s) * row_bytes;
    if (row_bytes % 16 == 0) {
      for (int64_t i = threadIdx.x; i < row_bytes / 16; i += blockDim.x)
        reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    } else {
      for (int64_t i = threadIdx.x; i < row_bytes; i += blockDim.x) dst[i] = src[i];
    }
  }
}

__global__ void combine_kernel(const bf16* back, const int32_t* slots, int ranks, int hidden, bf16* out) {
  pdl_begin();
  const int64_t t = blockIdx.x;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    float acc = 0.0f;
    for (int d = 0; d < ranks; ++d) {
      const int32_t s = slots[t * ranks + d];
      if (s >= 0) acc += bf2f(back[static_cast<int64_t>(s) * hidden + c]);
    }
    out[t * hidden + c] = f2bf(acc);
  }
}

__global__ void count_load_kernel(const int32_t* ids, int64_t n, int experts, int32_t* load) {
  pdl_begin();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t e = ids[i];
    if (e >= 0 && e < experts) atomicAdd(&load[e], 1);
  }
}

}  // namespace

void count_expert_load(const int32_t* ids, int64_t n, int experts, int32_t* load, cudaStream_t stream) {
  if (n <= 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 64));
  launch_kernel(count_load_kernel, dim3(blocks), dim3(256), 0, stream, ids, n, experts, load);
  check_launch("count_expert_load");
}

void moe_dispatch_plan(const int32_t* ids, const float* weights, int rows, int k, const int32_t* owner,
                       const int32_t* local, int experts, int ranks, int capacity, int32_t* slots, int32_t* send_ids,
                       float* send_weights, int64_t* counts, int32_t* load, cudaStream_t stream) {
  if (ranks < 1 || ranks > kMaxDispatchRanks) throw std::invalid_argument("moe_dispatch_plan: 1..64 ranks");
  launch_kernel(plan_kernel, dim3(1), dim3(kPlanThreads), 0, stream, ids, weights, rows, k, owner, local, experts,
                ranks, capacity, slots, send_ids, send_weights, counts, load);
  check_launch("moe_dispatch_plan");
}

void moe_dispatch_copy(const void* x, int64_t row_bytes, const int32_t* slots, int rows, int ranks, void* send_x,
                       cudaStream_t stream) {
  if (rows <= 0) return;
  launch_kernel(copy_rows_kernel, dim3(rows), dim3(256), 0, stream, static_cast<const uint8_t*>(x), row_bytes, slots,
                ranks, static_cast<uint8_t*>(send_x));
  check_launch("moe_dispatch_copy");
}

void moe_combine(const void* back, const int32_t* slots, int rows, int ranks, int hidden, void* out,
                 cudaStream_t stream) {
  if (rows <= 0) return;
  launch_kernel(combine_kernel, dim3(rows), dim3(256), 0, stream, static_cast<const bf16*>(back), slots, ranks, hidden,
                static_cast<bf16*>(out));
  check_launch("moe_combine");
}

}  // namespace arbiter::cuda
