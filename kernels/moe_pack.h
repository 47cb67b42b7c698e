// Host implementation of the expert-parallel dispatch and combine operations
// (Backend::moe_dispatch_pack, Backend::moe_combine): the plan (which rank gets which token, the
// receivers' local ids), the row copies and the per-token sums, as functions on plain pointers so that
// the Backend defaults (host copies of device data) and the CPU backend (its own buffers, rows split
// over its thread pool) share one definition of the order of rows and of additions.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/tensor.h"

namespace arbiter::moe_pack {

// Plans one dispatch: fills slots [rows, ranks] (the row of send_x each token takes per destination,
// -1: not sent there), send_ids / send_weights [sent rows, k] and rows_per_rank [ranks], and adds the
// tokens per expert to `load` (may be null). Rows are grouped by destination in rank order, token
// order within one. Throws std::out_of_range for an expert id >= experts or an owner outside the ranks.
// capacity > 0 (fixed-capacity exchange, rows <= capacity): destination d's rows start at row
// d * capacity, and every row of the ranks * capacity that no token takes gets ids -1 and weights 0.
void plan(const int32_t* ids, const float* weights, int64_t rows, int k, const int32_t* owner, const int32_t* local,
          int experts, int ranks, int32_t* slots, int32_t* send_ids, float* send_weights, int64_t* rows_per_rank,
          int32_t* load, int64_t capacity = 0);

// Copies the rows of tokens [first, last) to their slots in send_x (`row_bytes` per row).
void copy_rows(const void* x, size_t row_bytes, const int32_t* slots, int ranks, int64_t first, int64_t last,
               void* send_x);

// out rows [first, last) = the sum of each token's rows of `back` in rank order (fp32 from zero;
// F32 or BF16 rows of `hidden` elements; `scratch` holds `hidden` floats for BF16).
void sum_rows(const void* back, DType dtype, int64_t hidden, const int32_t* slots, int ranks, int64_t first,
              int64_t last, void* out, float* scratch);

}  // namespace arbiter::moe_pack
