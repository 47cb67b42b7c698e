#include "kernels/moe_pack.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace arbiter::moe_pack {

void plan(const int32_t* ids, const float* weights, int64_t rows, int k, const int32_t* owner, const int32_t* local,
          int experts, int ranks, int32_t* slots, int32_t* send_ids, float* send_weights, int64_t* rows_per_rank,
          int32_t* load, int64_t capacity) {
  const size_t n = static_cast<size_t>(ranks);
  if (capacity > 0 && rows > capacity)
    throw std::invalid_argument("moe_dispatch_pack: " + std::to_string(rows) + " rows exceed the capacity of " +
                                std::to_string(capacity));
  std::fill(rows_per_rank, rows_per_rank + n, int64_t{0});
  std::fill(slots, slots + static_cast<size_t>(rows) * n, -1);
  // Pass 1: mark each token's destinations (a token reaches a rank once) and count them.
  for (int64_t t = 0; t < rows; ++t) {
    int32_t* s = slots + static_cast<size_t>(t) * n;
    for (int j = 0; j < k; ++j) {
      const int32_t e = ids[t * k + j];
      if (e < 0) continue;
      if (e >= experts) throw std::out_of_range("moe_dispatch_pack: expert id " + std::to_string(e) + " outside the " +
                                                std::to_string(experts) + " experts of the placement");
      const int32_t d = owner[e];
      if (d < 0 || d >= ranks) throw std::out_of_range("moe_dispatch_pack: expert " + std::to_string(e) +
                                                       " has owner rank " + std::to_string(d));
      if (load) ++load[e];
      if (s[d] < 0) {
        s[d] = 0;
        ++rows_per_rank[d];
      }
    }
  }
  // Pass 2: slots in destination order, token order within one; the receivers' ids and weights.
  std::vector<int64_t> cursor(n);
  int64_t at = 0;
  for (size_t d = 0; d < n; ++d) {
    cursor[d] = capacity > 0 ? static_cast<int64_t>(d) * capacity : at;
    at += rows_per_rank[d];
  }
  if (capacity > 0) {  // padding rows: no expert, so the receivers' experts skip them
    const size_t entries = n * static_cast<size_t>(capacity) * static_cast<size_t>(k);
    std::fill(send_ids, send_ids + entries, -1);
    std::fill(send_weights, send_weights + entries, 0.0f);
  }
  for (int64_t t = 0; t < rows; ++t) {
    int32_t* s = slots + static_cast<size_t>(t) * n;
    for (size_t d = 0; d < n; ++d) {
      if (s[d] < 0) continue;
      const int64_t row = cursor[d]++;
      s[d] = static_cast<int32_t>(row);
      for (int j = 0; j < k; ++j) {
        const int32_t e = ids[t * k + j];
        send_ids[row * k + j] = (e >= 0 && owner[e] == static_cast<int32_t>(d)) ? local[e] : -1;
        send_weights[row * k + j] = weights[t * k + j];
      }
    }
  }
}

void copy_rows(const void* x, size_t row_bytes, const int32_t* slots, int ranks, int64_t first, int64_t last,
               void* send_x) {
  const auto* src = static_cast<const uint8_t*>(x);
  auto* dst = static_cast<uint8_t*>(send_x);
  for (int64_t t = first; t < last; ++t)
    for (int d = 0; d < ranks; ++d) {
      const int32_t s = slots[t * ranks + d];
      if (s >= 0) std::memcpy(dst + static_cast<size_t>(s) * row_bytes, src + static_cast<size_t>(t) * row_bytes, row_bytes);
    }
}

void sum_rows(const void* back, DType dtype, int64_t hidden, const int32_t* slots, int ranks, int64_t first,
              int64_t last, void* out, float* scratch) {
  const size_t H = static_cast<size_t>(hidden);
  for (int64_t t = first; t < last; ++t) {
    float* acc = dtype == DType::kF32 ? static_cast<float*>(out) + static_cast<size_t>(t) * H : scratch;
    // The first row is added to zero (0 + y, not a copy: the bits of the host path's zero-filled
    // accumulator, where -0 becomes +0) in the same pass.
    bool first_row = true;
    for (int d = 0; d < ranks; ++d) {
      const int32_t s = slots[t * ranks + d];
      if (s < 0) continue;
      if (dtype == DType::kF32) {
        const float* y = static_cast<const float*>(back) + static_cast<size_t>(s) * H;
        if (first_row) for (size_t c = 0; c < H; ++c) acc[c] = 0.0f + y[c];
        else for (size_t c = 0; c < H; ++c) acc[c] += y[c];
      } else {
        const uint16_t* y = static_cast<const uint16_t*>(back) + static_cast<size_t>(s) * H;
        if (first_row) for (size_t c = 0; c < H; ++c) acc[c] = 0.0f + bf16_to_f32(y[c]);
        else for (size_t c = 0; c < H; ++c) acc[c] += bf16_to_f32(y[c]);
      }
      first_row = false;
    }
    if (first_row) std::fill(acc, acc + H, 0.0f);
    if (dtype == DType::kBF16) {
      uint16_t* o = static_cast<uint16_t*>(out) + static_cast<size_t>(t) * H;
      for (size_t c = 0; c < H; ++c) o[c] = f32_to_bf16(acc[c]);
    }
  }
}

}  // namespace arbiter::moe_pack
