// The whole forward pass on the GPU: every golden case (per position: same argmax as the reference
// logits, cosine >= 0.999), greedy continuations where the reference margin allows, and the KV-cache
// paths (prefill, token-by-token decode, unaligned chunks, ragged batches) against each other and
// against the CPU backend. Skips without a GPU.
#include <gtest/gtest.h>

#include "runtime/generate.h"
#include "runtime/make_model.h"
#include "runtime/model.h"
#include "runtime/npy.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

using namespace gpu_testing;

ModelOptions small_options(int step_rows = 64, int logit_rows = 64) {
  ModelOptions o;
  o.max_step_rows = step_rows;
  o.max_logit_rows = logit_rows;
  o.kv.block_size = 4;
  o.kv.full_blocks = 64;
  o.kv.sliding_blocks = 32;
  return o;
}

struct Agreement {
  double min_cosine = 1.0;
  int argmax_mismatches = 0;
  double max_abs_err = 0;
};

Agreement compare_rows(const std::vector<float>& got, const std::vector<float>& ref, size_t vocab) {
  Agreement a;
  EXPECT_EQ(got.size(), ref.size());
  const size_t rows = std::min(got.size(), ref.size()) / vocab;
  for (size_t r = 0; r < rows; ++r) {
    const float* g = got.data() + r * vocab;
    const float* f = ref.data() + r * vocab;
    a.min_cosine = std::min(a.min_cosine, cosine(g, f, vocab));
    if (argmax_of(g, vocab) != argmax_of(f, vocab)) ++a.argmax_mismatches;
    for (size_t i = 0; i < vocab; ++i)
      a.max_abs_err = std::max(a.max_abs_err, static_cast<double>(std::fabs(g[i] - f[i])));
  }
  return a;
}

TEST(GpuGolden, LogitsMatchReference) {
  ARBITER_SKIP_WITHOUT_GPU();
  const auto cases = golden_cases();
  ASSERT_FALSE(cases.empty()) << "no golden cases under " << golden_dir() << " (set ARBITER_GOLDEN_DIR)";
  for (const auto& g : cases) {
    SCOPED_TRACE(g.name);
    const ModelConfig config = load_model_config(g.dir + "/config.json");
    Checkpoint ck(g.dir);
    auto gpu = make_backend("cuda");
    Model model(config, ck, *gpu, small_options());
    const auto logits = compute_all_logits(model, g.tokens);
    const NpyArray ref = read_npy_f32(g.dir + "/logits.npy");
    ASSERT_EQ(ref.data.size(), logits.size());
    const Agreement a = compare_rows(logits, ref.data, static_cast<size_t>(config.vocab_size));
    ::testing::Test::RecordProperty(g.name + "_min_cosine", std::to_string(a.min_cosine));
    ::testing::Test::RecordProperty(g.name + "_argmax_mismatches", std::to_string(a.argmax_mismatches));
    ::testing::Test::RecordProperty(g.name + "_max_abs_err", std::to_string(a.max_abs_err));
    EXPECT_GE(a.min_cosine, 0.999);
    EXPECT_EQ(a.argmax_mismatches, 0);
  }
}

// Greedy decoding through the paged cache. Where the GPU picks another token than the reference, the
// reference's top-2 margin at that step (from the CPU backend, which matches the reference to 2e-4)
// must be within the GPU's measured logit error; after such a near-tie nothing further is comparable.
TEST(GpuGolden, GreedyContinuationMatchesWhereMarginAllows) {
  ARBITER_SKIP_WITHOUT_GPU();
  const auto cases = golden_cases();
  ASSERT_FALSE(cases.empty()) << "no golden cases under " << golden_dir();
  for (const auto& g : cases) {
    SCOPED_TRACE(g.name);
    const ModelConfig config = load_model_config(g.dir + "/config.json");
    const size_t V = static_cast<size_t>(config.vocab_size);
    Checkpoint ck(g.dir);
    auto gpu = make_backend("cuda");
    Model gpu_model(config, ck, *gpu, small_options());
    const auto out = greedy_generate(gpu_model, g.tokens, static_cast<int>(g.greedy.size()));
    ASSERT_EQ(out.size(), g.greedy.size());
    const NpyArray ref = read_npy_f32(g.dir + "/logits.npy");
    const double err = compare_rows(compute_all_logits(gpu_model, g.tokens), ref.data, V).max_abs_err;
    CpuBackend cpu;
    Model cpu_model(config, ck, cpu, small_options());
    std::vector<int32_t> all = g.tokens;
    all.insert(all.end(), g.greedy.begin(), g.greedy.end());
    const auto cpu_logits = compute_all_logits(cpu_model, all);
    int matched = 0;
    for (size_t i = 0; i < g.greedy.size(); ++i) {
      if (out[i] == g.greedy[i]) {
        ++matched;
        continue;
      }
      const float* l = cpu_logits.data() + (g.tokens.size() - 1 + i) * V;
      std::vector<float> sorted(l, l + V);
      std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
      const double margin = sorted[0] - sorted[1];
      EXPECT_LE(margin, 2.0 * err) << "token " << i << ": GPU chose " << out[i] << ", reference " << g.greedy[i]
                                   << " with margin " << margin << " (GPU logit error " << err << ")";
      break;
    }
    ::testing::Test::RecordProperty(g.name + "_greedy_matched", std::to_string(matched) + "/" + std::to_string(g.greedy.size()));
  }
}

// A random model whose window (5) is shorter than the sequences below.
class GpuCachePaths : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    config_ = testing::small_config();
    MakeModelOptions o;
    o.seed = 7;
    make_random_model(config_, dir_->path(), o);
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  void SetUp() override {
    ARBITER_SKIP_WITHOUT_GPU();
    gpu_ = make_backend("cuda");
  }
  static std::vector<int32_t> tokens(int n, int seed) {
    std::vector<int32_t> t;
    for (int i = 0; i < n; ++i) t.push_back((i * 37 + seed * 101 + 11) % config_.vocab_size);
    return t;
  }
  static void expect_close(const std::vector<float>& got, const std::vector<float>& ref, const std::string& what) {
    const Agreement a = compare_rows(got, ref, static_cast<size_t>(config_.vocab_size));
    EXPECT_GE(a.min_cosine, 0.999) << what;
    EXPECT_LE(rel_max_error(got, ref), 3e-2) << what;
  }
  static inline testing::TempDir* dir_ = nullptr;
  static inline ModelConfig config_;
  std::unique_ptr<Backend> gpu_;
};

TEST_F(GpuCachePaths, DecodeEqualsPrefillAndCpu) {
  Checkpoint ck(dir_->path());
  const auto t = tokens(23, 1);
  Model whole(config_, ck, *gpu_, small_options(64, 64));
  const auto prefill = compute_all_logits(whole, t);
  Model stepwise(config_, ck, *gpu_, small_options(1, 1));
  expect_close(compute_all_logits(stepwise, t), prefill, "token-by-token decode vs prefill");
  Model chunked(config_, ck, *gpu_, small_options(7, 7));
  expect_close(compute_all_logits(chunked, t), prefill, "7-token chunks vs prefill");
  CpuBackend cpu;
  Model reference(config_, ck, cpu, small_options(64, 64));
  expect_close(prefill, compute_all_logits(reference, t), "GPU vs CPU");
}

TEST_F(GpuCachePaths, BatchOfDifferentLengthsEqualsEachAlone) {
  Checkpoint ck(dir_->path());
  Model model(config_, ck, *gpu_, small_options(64, 64));
  const std::vector<std::vector<int32_t>> seqs = {tokens(3, 1), tokens(17, 2), tokens(9, 3), tokens(1, 4)};
  std::vector<std::vector<float>> alone;
  for (const auto& s : seqs) alone.push_back(compute_all_logits(model, s));
  KvBlockPools pools(model.options().kv);
  std::vector<std::unique_ptr<LocalSequence>> live;
  StepLayout layout;
  layout.block_size = model.options().kv.block_size;
  for (const auto& s : seqs) {
    live.push_back(std::make_unique<LocalSequence>(pools, model.kv_cache().ring_blocks_per_sequence()));
    live.back()->append_to_step(layout, s.data(), static_cast<int>(s.size()), true, true);
  }
  const auto batched = model.forward(layout);
  const size_t V = static_cast<size_t>(config_.vocab_size);
  size_t offset = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    std::vector<float> part(batched.begin() + static_cast<long>(offset),
                            batched.begin() + static_cast<long>(offset + seqs[i].size() * V));
    expect_close(part, alone[i], "sequence " + std::to_string(i));
    offset += seqs[i].size() * V;
  }
  // A decode step for all four after the batched prefill equals the CPU's.
  for (size_t i = 0; i < seqs.size(); ++i) live[i]->commit(static_cast<int>(seqs[i].size()));
  StepLayout decode;
  decode.block_size = layout.block_size;
  const int32_t next = 5;
  for (auto& s : live) s->append_to_step(decode, &next, 1, true);
  const auto gpu_decode = model.forward(decode);
  CpuBackend cpu;
  Model reference(config_, ck, cpu, small_options(64, 64));
  KvBlockPools cpu_pools(reference.options().kv);
  std::vector<std::unique_ptr<LocalSequence>> cpu_live;
  StepLayout cpu_prefill;
  cpu_prefill.block_size = layout.block_size;
  for (const auto& s : seqs) {
    cpu_live.push_back(std::make_unique<LocalSequence>(cpu_pools, reference.kv_cache().ring_blocks_per_sequence()));
    cpu_live.back()->append_to_step(cpu_prefill, s.data(), static_cast<int>(s.size()), false);
  }
  reference.forward(cpu_prefill);
  for (size_t i = 0; i < seqs.size(); ++i) cpu_live[i]->commit(static_cast<int>(seqs[i].size()));
  StepLayout cpu_decode;
  cpu_decode.block_size = layout.block_size;
  for (auto& s : cpu_live) s->append_to_step(cpu_decode, &next, 1, true);
  expect_close(gpu_decode, reference.forward(cpu_decode), "batched decode vs CPU");
}

TEST_F(GpuCachePaths, ArgmaxPathEqualsLogits) {
  Checkpoint ck(dir_->path());
  Model model(config_, ck, *gpu_, small_options(64, 64));
  const auto t = tokens(11, 9);
  const auto greedy = greedy_generate(model, t, 6);
  // The same continuation from full logits, recomputed on the whole sequence each time.
  std::vector<int32_t> seq = t;
  const size_t V = static_cast<size_t>(config_.vocab_size);
  for (size_t i = 0; i < greedy.size(); ++i) {
    const auto logits = compute_all_logits(model, seq);
    const int32_t next = static_cast<int32_t>(argmax_of(logits.data() + (seq.size() - 1) * V, V));
    if (next != greedy[i]) {
      // Allowed only at a near-tie.
      const float* l = logits.data() + (seq.size() - 1) * V;
      EXPECT_LE(std::fabs(l[next] - l[greedy[i]]), 2e-2f * std::fabs(l[next])) << "step " << i;
      break;
    }
    seq.push_back(next);
  }
}

}  // namespace
}  // namespace arbiter
