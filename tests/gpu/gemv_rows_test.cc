// Host-side check of the GEMV's block-to-row mapping (kernels/cuda/gemv_rows.cuh): every weight row
// is owned by exactly one (block, local row), and a rotated target's block holds whole RoPE pairs
// (i, i + head_dim / 2) of one head, which its epilogue rotates. Needs no GPU, so CI runs it.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/cuda/gemv_rows.cuh"

namespace arbiter {
namespace {

template <int R>
void check_mapping(int heads, int head_dim, bool rotated) {
  SCOPED_TRACE("R " + std::to_string(R) + ", heads " + std::to_string(heads) + ", head_dim " + std::to_string(head_dim) +
               (rotated ? ", rotated" : ", plain"));
  const int n = heads * head_dim, half = head_dim / 2;
  std::vector<int> owners(static_cast<size_t>(n), 0);
  for (int block = 0; block < n / R; ++block) {
    for (int r = 0; r < R; ++r) {
      const int row = cuda::gemv_row<R>(block, r, rotated, head_dim);
      ASSERT_GE(row, 0);
      ASSERT_LT(row, n);
      ++owners[static_cast<size_t>(row)];
      if (!rotated) {
        EXPECT_EQ(row, block * R + r);
      } else if (r < R / 2) {
        const int partner = cuda::gemv_row<R>(block, r + R / 2, true, head_dim);
        EXPECT_EQ(partner, row + half) << "block " << block << " r " << r;
        EXPECT_LT(row % head_dim, half);
        EXPECT_EQ(row / head_dim, partner / head_dim);
      }
    }
  }
  for (int row = 0; row < n; ++row) EXPECT_EQ(owners[static_cast<size_t>(row)], 1) << "row " << row;
}

TEST(GemvRows, EveryRowOnceAndRopePairsTogether) {
  for (const bool rotated : {false, true}) {
    for (const int head_dim : {8, 16, 64, 128}) {
      for (const int heads : {1, 2, 8, 64}) {
        check_mapping<2>(heads, head_dim, rotated);
        check_mapping<4>(heads, head_dim, rotated);
      }
    }
  }
}

}  // namespace
}  // namespace arbiter
