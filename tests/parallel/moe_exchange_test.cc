// MoeExchange (dispatch/combine without a backend) over thread ranks: each token reaches each owning
// rank once, ranks with no tokens and ranks that receive nothing take part, partial sums add up.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <random>
#include <set>

#include "parallel/moe_dispatch.h"
#include "parallel/thread_comm.h"

namespace arbiter {
namespace {

struct Tokens {
  std::vector<int32_t> ids;
  std::vector<float> weights, hidden;
};

// Rank r has 3*r tokens (rank 0 none); experts are drawn from [0, max_expert] so the ranks owning
// higher experts receive nothing.
Tokens make_tokens(int rank, int K, int H, int max_expert) {
  Tokens t;
  std::mt19937 rng(static_cast<uint32_t>(rank * 977 + 5));
  const int rows = 3 * rank;
  for (int r = 0; r < rows; ++r) {
    std::set<int32_t> chosen;
    while (static_cast<int>(chosen.size()) < K) chosen.insert(static_cast<int32_t>(rng() % static_cast<uint32_t>(max_expert + 1)));
    for (int32_t e : chosen) {
      t.ids.push_back(e);
      t.weights.push_back(0.1f + static_cast<float>(rng() % 100) / 100.0f);
    }
    for (int c = 0; c < H; ++c) t.hidden.push_back(static_cast<float>(rank) + 0.25f * static_cast<float>(r) + 0.0625f * static_cast<float>(c % 7));
  }
  return t;
}

// The stand-in expert e multiplies its input by (e + 1).
void fake_experts(const MoeExchange& ex, int rank, const MoeExchange::Received& got, std::vector<float>& out) {
  const int K = ex.top_k(), H = ex.hidden();
  out.assign(static_cast<size_t>(got.rows * H), 0.0f);
  std::vector<float> gathered(static_cast<size_t>(got.rows * H));
  got.gather_hidden(gathered.data(), sizeof(float) * static_cast<size_t>(H));
  const float* x = gathered.data();
  for (int64_t i = 0; i < got.rows; ++i) {
    float scale = 0;
    for (int j = 0; j < K; ++j) {
      const int32_t local = got.expert_ids[i * K + j];
      if (local >= 0) scale += got.weights[i * K + j] * static_cast<float>(ex.placement().experts_of(rank)[static_cast<size_t>(local)] + 1);
    }
    for (int c = 0; c < H; ++c) out[static_cast<size_t>(i * H + c)] = scale * x[i * H + c];
  }
}

TEST(MoeExchange, DispatchCombineOncePerRank) {
  const int N = 4, E = 12, K = 4, H = 40;
  const auto placement = ExpertPlacement::contiguous(E, N);  // 3 experts per rank
  std::atomic<uint64_t> sent = 0, all_gather = 0;
  run_thread_ranks(N, [&](Communicator& comm) {
    const int me = comm.rank();
    MoeExchange ex(comm, placement, K, H, DType::kF32);
    for (int rep = 0; rep < 2; ++rep) {
      const Tokens t = make_tokens(me, K, H, 8);  // experts 0..8: rank 3 (9..11) receives nothing
      const int64_t rows = static_cast<int64_t>(t.ids.size() / K);
      const auto got = ex.dispatch(t.ids.data(), t.weights.data(), t.hidden.data(), rows);
      // Expected rows: every (token, owner) pair once, over all source ranks.
      int64_t expected = 0;
      for (int src = 0; src < N; ++src) {
        const Tokens s = make_tokens(src, K, H, 8);
        for (size_t r = 0; r < s.ids.size() / K; ++r) {
          bool here = false;
          for (int j = 0; j < K; ++j) here |= placement.owner(s.ids[r * K + static_cast<size_t>(j)]) == me;
          expected += here;
        }
      }
      EXPECT_EQ(got.rows, expected) << "rank " << me;
      if (me == 3) {
        EXPECT_EQ(got.rows, 0);
      }
      std::vector<float> expert_out, out(static_cast<size_t>(rows * H), -1.0f);
      fake_experts(ex, me, got, expert_out);
      ex.combine(expert_out.data(), out.data());
      for (int64_t r = 0; r < rows; ++r) {
        float scale = 0;
        for (int j = 0; j < K; ++j) scale += t.weights[static_cast<size_t>(r * K + j)] * static_cast<float>(t.ids[static_cast<size_t>(r * K + j)] + 1);
        for (int c = 0; c < H; ++c) {
          const float want = scale * t.hidden[static_cast<size_t>(r * H + c)];
          ASSERT_NEAR(out[static_cast<size_t>(r * H + c)], want, 1e-5f * std::fabs(want) + 1e-6f) << "rank " << me << " row " << r;
        }
      }
    }
    sent += ex.traffic().to_peers;
    all_gather += ex.traffic().all_gather_design;
  });
  // Deduplication: fewer bytes than replicating every token on every other rank and back.
  EXPECT_LT(sent.load(), all_gather.load());
}

TEST(MoeExchange, AllExpertsOnOneRankSendTheRowOnce) {
  const int N = 2, E = 8, K = 4, H = 32;
  const auto placement = ExpertPlacement::contiguous(E, N);
  run_thread_ranks(N, [&](Communicator& comm) {
    MoeExchange ex(comm, placement, K, H, DType::kBF16);
    // Both ranks: one token whose 4 experts all live on rank 1.
    const std::vector<int32_t> ids = {4, 5, 6, 7};
    const std::vector<float> w = {0.25f, 0.25f, 0.25f, 0.25f};
    std::vector<uint16_t> hidden(H);
    for (int c = 0; c < H; ++c) hidden[static_cast<size_t>(c)] = f32_to_bf16(static_cast<float>(c) - 8.0f);
    const auto got = ex.dispatch(ids.data(), w.data(), hidden.data(), 1);
    EXPECT_EQ(got.rows, comm.rank() == 1 ? 2 : 0);
    if (comm.rank() == 1) {
      for (int64_t i = 0; i < got.rows; ++i)
        for (int j = 0; j < K; ++j) EXPECT_EQ(got.expert_ids[i * K + j], j);
    }
    EXPECT_EQ(ex.traffic().to_peers + ex.traffic().to_self,
              static_cast<uint64_t>(H * 2 + K * 8));  // one record, to rank 1
    std::vector<uint16_t> out(H);
    std::vector<uint16_t> back(static_cast<size_t>(got.rows * H));
    got.gather_hidden(back.data(), 2 * H);
    ex.combine(back.data(), out.data());  // the identity "expert"
    for (int c = 0; c < H; ++c) EXPECT_EQ(out[static_cast<size_t>(c)], hidden[static_cast<size_t>(c)]);
  });
}

}  // namespace
}  // namespace arbiter
