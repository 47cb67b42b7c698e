// The whole forward pass against the golden reference, and the KV-cache paths against each other.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "kernels/cpu/cpu_backend.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "runtime/npy.h"
#include "tests/memory_ledger.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

using testing::load_golden_case;

class GoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTest, LogitsMatchReference) {
  const auto g = load_golden_case(GetParam());
  const ModelConfig config = load_model_config(g.dir + "/config.json");
  Checkpoint ck(g.dir);
  CpuBackend backend;
  Model model(config, ck, backend, testing::small_model_options());
  const auto logits = compute_all_logits(model, g.tokens);
  const NpyArray ref = read_npy_f32(g.dir + "/logits.npy");
  ASSERT_EQ(ref.shape.size(), 2u);
  ASSERT_EQ(ref.shape[0], static_cast<int64_t>(g.tokens.size()));
  ASSERT_EQ(ref.shape[1], config.vocab_size);
  ASSERT_EQ(logits.size(), ref.data.size());
  float max_logit = 0, max_err = 0;
  for (size_t i = 0; i < ref.data.size(); ++i) {
    max_logit = std::max(max_logit, std::fabs(ref.data[i]));
    max_err = std::max(max_err, std::fabs(ref.data[i] - logits[i]));
  }
  EXPECT_LE(max_err, 2e-4f * max_logit) << "max |logit| " << max_logit;
  // A wrong model cannot pass by having tiny logits.
  EXPECT_GT(max_logit, 0.1f);
}

TEST_P(GoldenTest, GreedyContinuationMatchesReference) {
  const auto g = load_golden_case(GetParam());
  const ModelConfig config = load_model_config(g.dir + "/config.json");
  Checkpoint ck(g.dir);
  CpuBackend backend;
  Model model(config, ck, backend, testing::small_model_options());
  const auto out = greedy_generate(model, g.tokens, static_cast<int>(g.greedy.size()));
  EXPECT_EQ(out, g.greedy);
}

TEST(GoldenData, CasesArePresent) {
  EXPECT_GE(testing::golden_case_names().size(), 2u) << "no golden cases under " << testing::golden_dir();
}

INSTANTIATE_TEST_SUITE_P(Golden, GoldenTest, ::testing::ValuesIn(testing::golden_case_names()));

// Backend::reserve: one call, before the first allocation, announcing exactly the bytes the model
// then allocates (weights, KV pools, buffers; each rounded as an arena allocation), also when the
// model holds only some experts; a step allocates nothing.
TEST(ModelReserve, AnnouncesExactlyWhatItAllocates) {
  const auto g = load_golden_case(testing::golden_case_names().at(0));
  const ModelConfig config = load_model_config(g.dir + "/config.json");
  Checkpoint ck(g.dir);
  CpuBackend cpu;
  for (const ExpertRange experts : {ExpertRange{}, ExpertRange{1, 2}}) {
    for (const int rows : {1, 7, 64}) {
      SCOPED_TRACE("experts from " + std::to_string(experts.first) + ", rows " + std::to_string(rows));
      testing::MemoryLedger ledger(cpu);
      ModelOptions o = testing::small_model_options(rows, rows);
      o.experts = experts;
      Model model(config, ck, ledger, o);
      EXPECT_EQ(ledger.reserve_calls, 1);
      EXPECT_EQ(ledger.allocations_before_reserve, 0);
      EXPECT_EQ(ledger.reserved_bytes, ledger.allocated_bytes);
      EXPECT_GT(ledger.reserved_bytes, 0u);
      EXPECT_EQ(ledger.last_moe.max_rows, rows);
      EXPECT_EQ(ledger.last_moe.k, config.num_experts_per_tok);
      EXPECT_EQ(ledger.last_moe.experts, experts.count < 0 ? config.num_local_experts : experts.count);
      EXPECT_EQ(ledger.last_moe.hidden, config.hidden_size);
      EXPECT_EQ(ledger.last_moe.intermediate, config.intermediate_size);
      if (experts.count < 0) {
        const size_t before = ledger.allocated_bytes;
        compute_all_logits(model, std::vector<int32_t>(g.tokens.begin(), g.tokens.begin() + 5));
        EXPECT_EQ(ledger.allocated_bytes, before) << "a step allocated memory";
      }
    }
  }
}

// A random model whose window (5) is shorter than the sequences below.
class CachePathsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    config_ = testing::small_config();
    MakeModelOptions o;
    o.seed = 7;
    make_random_model(config_, dir_->path(), o);
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::vector<int32_t> tokens(int n, int seed) {
    std::vector<int32_t> t;
    for (int i = 0; i < n; ++i) t.push_back((i * 37 + seed * 101 + 11) % config_.vocab_size);
    return t;
  }
  static float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    EXPECT_EQ(a.size(), b.size());
    float m = 0;
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
    return m;
  }
  static inline testing::TempDir* dir_ = nullptr;
  static inline ModelConfig config_;
};

TEST_F(CachePathsTest, PrefillEqualsTokenByTokenDecode) {
  Checkpoint ck(dir_->path());
  CpuBackend backend;
  const auto t = tokens(23, 1);
  Model whole(config_, ck, backend, testing::small_model_options(64, 64));
  const auto prefill = compute_all_logits(whole, t);
  Model stepwise(config_, ck, backend, testing::small_model_options(1, 1));  // one token per step: pure decode
  const auto decode = compute_all_logits(stepwise, t);
  EXPECT_LE(max_abs_diff(prefill, decode), 1e-4f);
  Model chunked(config_, ck, backend, testing::small_model_options(7, 7));  // chunks not aligned to blocks or the window
  EXPECT_LE(max_abs_diff(prefill, compute_all_logits(chunked, t)), 1e-4f);
}

TEST_F(CachePathsTest, BatchOfDifferentLengthsEqualsEachAlone) {
  Checkpoint ck(dir_->path());
  CpuBackend backend;
  Model model(config_, ck, backend, testing::small_model_options(64, 64));
  const std::vector<std::vector<int32_t>> seqs = {tokens(3, 1), tokens(17, 2), tokens(9, 3), tokens(1, 4)};
  std::vector<std::vector<float>> alone;
  for (const auto& s : seqs) alone.push_back(compute_all_logits(model, s));
  // Now all four in one step.
  const auto batched = compute_batch_logits(model, seqs);
  ASSERT_EQ(batched.size(), seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) EXPECT_LE(max_abs_diff(batched[i], alone[i]), 1e-4f) << "sequence " << i;
}

TEST_F(CachePathsTest, SequenceLongerThanWindowDiffersFromFullAttention) {
  // Guard that the window is really applied: the same checkpoint with a huge window gives other logits
  // at positions past the window, and the same logits before it.
  Checkpoint ck(dir_->path());
  CpuBackend backend;
  const auto t = tokens(12, 5);
  Model windowed(config_, ck, backend, testing::small_model_options());
  ModelConfig wide = config_;
  wide.sliding_window = 64;
  Model unwindowed(wide, ck, backend, testing::small_model_options());
  const auto a = compute_all_logits(windowed, t), b = compute_all_logits(unwindowed, t);
  const size_t V = static_cast<size_t>(config_.vocab_size);
  float before = 0, after = 0;
  for (size_t i = 0; i < a.size(); ++i) (i / V < 5 ? before : after) = std::max(i / V < 5 ? before : after, std::fabs(a[i] - b[i]));
  EXPECT_LE(before, 1e-5f);
  EXPECT_GT(after, 1e-3f);
}

}  // namespace
}  // namespace arbiter
