// The per-rank Engine and the StepExchange: step plans against the single-process drivers
// (greedy_generate, compute_all_logits), serving-mode block tables against ring tables, prefix
// reuse, batch invariance of sampling, the sampler itself, malformed plans, the exchange over
// expert-parallel thread ranks, and Backend::top_logprobs.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>

#include "kernels/cpu/cpu_backend.h"
#include "parallel/thread_comm.h"
#include "runtime/engine.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

constexpr int kBlockSize = 4;

ModelOptions engine_options(int step_rows = 64, int logit_rows = 16, int blocks = 64, Communicator* comm = nullptr) {
  ModelOptions o;
  o.max_step_rows = step_rows;
  o.max_logit_rows = logit_rows;
  o.kv.block_size = kBlockSize;
  o.kv.full_blocks = blocks;
  o.kv.sliding_blocks = blocks;
  o.comm = comm;
  return o;
}

// A model loaded from a checkpoint folder with its own one-thread CPU backend.
struct LoadedModel {
  LoadedModel(const std::string& dir, const ModelOptions& options, const ModelConfig* config_override = nullptr)
      : config(config_override ? *config_override : load_model_config(dir + "/config.json")),
        ck(dir),
        backend(1),
        model(config, ck, backend, options) {}
  ModelConfig config;
  Checkpoint ck;
  CpuBackend backend;
  Model model;
};

proto::Sampling greedy() { return proto::Sampling(); }

proto::Sampling temperature(float t, float top_p, uint64_t seed) {
  proto::Sampling s;
  s.set_temperature(t);
  s.set_top_p(top_p);
  s.set_seed(seed);
  return s;
}

// One sequence as a test drives it through plans: its tokens so far (prompt, then what was
// sampled), how many of them are cached, its block table (allocated by the test, as the scheduler
// would) and the samples that came back.
struct TestSequence {
  TestSequence(uint64_t id_, std::vector<int32_t> prompt, proto::Sampling sampling_, int top_logprobs_)
      : id(id_), tokens(std::move(prompt)), prompt_size(tokens.size()), sampling(std::move(sampling_)),
        top_logprobs(top_logprobs_) {}

  // The next share of a step: up to `chunk` uncached tokens, sampling when they reach the end.
  proto::SequenceWork next(int chunk, BlockAllocator& pool) {
    const int count = std::min<int>(chunk, static_cast<int>(tokens.size()) - cached);
    while (static_cast<int>(blocks.size()) * kBlockSize < cached + count) blocks.push_back(pool.allocate());
    proto::SequenceWork w;
    w.set_sequence_id(id);
    w.mutable_tokens()->Add(tokens.begin() + cached, tokens.begin() + cached + count);
    w.set_num_cached(cached);
    w.mutable_blocks()->Add(blocks.begin(), blocks.end());
    w.set_sample(cached + count == static_cast<int>(tokens.size()));
    *w.mutable_sampling() = sampling;
    w.set_top_logprobs(top_logprobs);
    return w;
  }
  // Takes in a step that ran `work`; `sample` is this sequence's sample, if it sampled.
  void commit(const proto::SequenceWork& work, const proto::SampledToken* sample) {
    cached += work.tokens_size();
    if (sample) {
      tokens.push_back(sample->token());
      samples.push_back(*sample);
    }
  }
  std::vector<int32_t> generated() const { return {tokens.begin() + static_cast<std::ptrdiff_t>(prompt_size), tokens.end()}; }

  uint64_t id;
  std::vector<int32_t> tokens;
  size_t prompt_size;
  proto::Sampling sampling;
  int top_logprobs;
  int cached = 0;
  std::vector<int32_t> blocks;
  std::vector<proto::SampledToken> samples;
};

const proto::SampledToken* find_sample(const proto::StepResult& result, uint64_t id) {
  for (const auto& s : result.samples())
    if (s.sequence_id() == id) return &s;
  return nullptr;
}

// Runs steps holding every sequence that still needs samples (each in chunks of `chunk`) until each
// has `new_tokens` samples.
void drive(Engine& engine, BlockAllocator& pool, const std::vector<TestSequence*>& seqs, int chunk, int new_tokens) {
  for (int guard = 0; guard < 1000; ++guard) {
    proto::StepPlan plan;
    plan.set_step(static_cast<uint64_t>(guard));
    std::vector<TestSequence*> in_step;
    for (TestSequence* s : seqs)
      if (static_cast<int>(s->samples.size()) < new_tokens) {
        *plan.add_sequences() = s->next(chunk, pool);
        in_step.push_back(s);
      }
    if (in_step.empty()) return;
    const proto::StepResult result = engine.run(plan);
    ASSERT_EQ(result.step(), plan.step());
    for (size_t i = 0; i < in_step.size(); ++i) {
      const proto::SequenceWork& w = plan.sequences(static_cast<int>(i));
      const proto::SampledToken* s = find_sample(result, w.sequence_id());
      ASSERT_EQ(s != nullptr, w.sample());
      in_step[i]->commit(w, s);
    }
  }
  FAIL() << "drive did not finish";
}

// log-softmax of one row of logits, in double.
std::vector<double> log_softmax(const float* row, int vocab) {
  const double max = *std::max_element(row, row + vocab);
  double sum = 0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(row[i] - max);
  std::vector<double> out(static_cast<size_t>(vocab));
  for (int i = 0; i < vocab; ++i) out[static_cast<size_t>(i)] = row[i] - max - std::log(sum);
  return out;
}

// Checks a sample (its token's logprob and its `top` list) against the log-softmax of the logits row
// that produced it.
void expect_matches_row(const proto::SampledToken& sample, const std::vector<double>& ls, int want_top,
                        const std::string& what) {
  ASSERT_GE(sample.token(), 0) << what;
  ASSERT_LT(sample.token(), static_cast<int>(ls.size())) << what;
  EXPECT_NEAR(sample.logprob(), ls[static_cast<size_t>(sample.token())], 1e-4) << what;
  ASSERT_EQ(sample.top_size(), want_top) << what;
  std::vector<double> sorted = ls;
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  for (int j = 0; j < want_top; ++j) {
    const auto& t = sample.top(j);
    if (j > 0) {
      EXPECT_GE(sample.top(j - 1).logprob(), t.logprob()) << what << ": top list not sorted";
    }
    EXPECT_NEAR(t.logprob(), sorted[static_cast<size_t>(j)], 1e-4) << what << " top " << j;
    EXPECT_NEAR(t.logprob(), ls[static_cast<size_t>(t.token())], 1e-4) << what << " top " << j;
  }
}

// ---------------------------------------------------------------------------------------------
// Plans against the single-process drivers, on the golden models.

class EngineGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(EngineGoldenTest, ChunkedPrefillThenDecodeMatchesGreedyGenerate) {
  const auto g = testing::load_golden_case(GetParam());
  LoadedModel served(g.dir, engine_options());
  LoadedModel reference(g.dir, engine_options());
  Engine engine(served.model);
  BlockAllocator pool(engine.num_blocks());
  pool.allocate();  // block 0 stays unused, as in serving
  const int n = static_cast<int>(g.greedy.size());
  TestSequence seq(7, g.tokens, greedy(), 5);
  drive(engine, pool, {&seq}, 5, n);  // prefill chunks of 5 (not aligned to blocks or the window)

  EXPECT_EQ(seq.generated(), greedy_generate(reference.model, g.tokens, n));
  EXPECT_EQ(seq.generated(), g.greedy);
  const std::vector<int32_t> context(seq.tokens.begin(), seq.tokens.end() - 1);
  const std::vector<float> logits = compute_all_logits(reference.model, context);
  const int vocab = reference.config.vocab_size;
  ASSERT_EQ(static_cast<int>(seq.samples.size()), n);
  for (int i = 0; i < n; ++i) {
    const size_t row = g.tokens.size() - 1 + static_cast<size_t>(i);
    const auto ls = log_softmax(logits.data() + row * static_cast<size_t>(vocab), vocab);
    expect_matches_row(seq.samples[static_cast<size_t>(i)], ls, 5, "sample " + std::to_string(i));
    EXPECT_EQ(seq.samples[static_cast<size_t>(i)].top(0).token(), seq.samples[static_cast<size_t>(i)].token());
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, EngineGoldenTest, ::testing::ValuesIn(testing::golden_case_names()));

// ---------------------------------------------------------------------------------------------
// A random model whose sliding window (5) is shorter than the sequences.

class EngineRandomTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = std::make_unique<testing::TempDir>();
    config_ = testing::small_config();
    MakeModelOptions o;
    o.seed = 11;
    make_random_model(config_, dir_->path(), o);
  }
  static void TearDownTestSuite() { dir_.reset(); }
  static std::vector<int32_t> tokens(int n, int seed) {
    std::vector<int32_t> t;
    for (int i = 0; i < n; ++i) t.push_back((i * 41 + seed * 97 + 5) % config_.vocab_size);
    return t;
  }
  static std::string dir() { return dir_->path(); }

  static inline std::unique_ptr<testing::TempDir> dir_;
  static inline ModelConfig config_;
};

TEST_F(EngineRandomTest, AccessorsAndEmptyPlan) {
  LoadedModel m(dir(), engine_options(48, 8, 40));
  Engine engine(m.model);
  EXPECT_EQ(engine.block_size(), kBlockSize);
  EXPECT_EQ(engine.num_blocks(), 40);
  EXPECT_EQ(engine.max_step_tokens(), 48);
  EXPECT_EQ(engine.max_step_samples(), 8);
  proto::StepPlan plan;
  plan.set_step(9);
  const proto::StepResult r = engine.run(plan);
  EXPECT_EQ(r.step(), 9u);
  EXPECT_EQ(r.rank(), 0);
  EXPECT_EQ(r.samples_size(), 0);
  EXPECT_TRUE(r.error().empty());

  ModelOptions uneven = engine_options();
  uneven.kv.full_blocks = 30;
  uneven.kv.sliding_blocks = 20;
  LoadedModel u(dir(), uneven);
  EXPECT_EQ(Engine(u.model).num_blocks(), 20);
}

// Serving mode: one block table covering every position for full and sliding layers alike, against
// LocalSequence's ring tables for the sliding layers (which wrap: the ring holds 8 positions).
TEST_F(EngineRandomTest, SlidingWindowWithOneTableEqualsRingMode) {
  ASSERT_LT(config_.sliding_window, 30);
  LoadedModel served(dir(), engine_options());
  LoadedModel reference(dir(), engine_options());
  const auto t = tokens(30, 1);
  const int vocab = config_.vocab_size;
  const std::vector<float> ring_logits = compute_all_logits(reference.model, t);
  // Chunks of 1, 3, 7, ...: every chunk end is compared against the ring-mode logits there.
  const std::vector<int> chunks = {1, 3, 7, 2, 1, 5, 1, 1, 6, 1, 1, 1};
  ASSERT_EQ(std::accumulate(chunks.begin(), chunks.end(), 0), 30);
  Engine engine(served.model);
  BlockAllocator pool(engine.num_blocks());
  pool.allocate();
  TestSequence seq(1, t, greedy(), Engine::kMaxReportedLogprobs);
  int end = 0;
  for (int chunk : chunks) {
    proto::StepPlan plan;
    proto::SequenceWork w = seq.next(chunk, pool);
    w.set_sample(true);
    *plan.add_sequences() = w;
    const proto::StepResult r = engine.run(plan);
    ASSERT_EQ(r.samples_size(), 1);
    seq.cached += chunk;
    end += chunk;
    const auto ls = log_softmax(ring_logits.data() + static_cast<size_t>(end - 1) * static_cast<size_t>(vocab), vocab);
    expect_matches_row(r.samples(0), ls, Engine::kMaxReportedLogprobs, "position " + std::to_string(end - 1));
    // Greedy: the argmax of the ring-mode row.
    EXPECT_EQ(r.samples(0).token(), static_cast<int>(std::max_element(ls.begin(), ls.end()) - ls.begin()));
  }
  EXPECT_EQ(static_cast<int>(seq.blocks.size()), 30 / kBlockSize + 1);
}

// Sequence B's table starts with the whole blocks of the prefix A already computed; B sends only
// its own tokens (num_cached = prefix length) and gets what B computed from scratch gets. A goes on
// unharmed afterwards.
TEST_F(EngineRandomTest, PrefixReuseEqualsFromScratch) {
  LoadedModel served(dir(), engine_options());
  Engine engine(served.model);
  BlockAllocator pool(engine.num_blocks());
  pool.allocate();
  const auto prefix = tokens(12, 3);  // three whole blocks, longer than the window
  auto with = [&](const std::vector<int32_t>& tail) {
    std::vector<int32_t> t = prefix;
    t.insert(t.end(), tail.begin(), tail.end());
    return t;
  };
  const auto a_tokens = with(tokens(5, 4)), b_tokens = with(tokens(6, 5));
  TestSequence a(1, a_tokens, greedy(), 3);
  drive(engine, pool, {&a}, 8, 2);

  TestSequence b(2, b_tokens, temperature(0.9f, 0.95f, 17), 4);
  b.blocks.assign(a.blocks.begin(), a.blocks.begin() + 3);
  b.cached = 12;
  TestSequence b_scratch(3, b_tokens, temperature(0.9f, 0.95f, 17), 4);
  TestSequence b_greedy(4, b_tokens, greedy(), 4);
  b_greedy.blocks.assign(a.blocks.begin(), a.blocks.begin() + 3);
  b_greedy.cached = 12;
  TestSequence b_greedy_scratch(5, b_tokens, greedy(), 4);
  drive(engine, pool, {&b, &b_greedy}, 64, 5);
  drive(engine, pool, {&b_scratch, &b_greedy_scratch}, 64, 5);
  EXPECT_EQ(b.generated(), b_scratch.generated());
  EXPECT_EQ(b_greedy.generated(), b_greedy_scratch.generated());
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_NEAR(b.samples[i].logprob(), b_scratch.samples[i].logprob(), 1e-4);
    EXPECT_NEAR(b_greedy.samples[i].logprob(), b_greedy_scratch.samples[i].logprob(), 1e-4);
    ASSERT_EQ(b_greedy.samples[i].top_size(), 4);
    for (int j = 0; j < 4; ++j)
      EXPECT_NEAR(b_greedy.samples[i].top(j).logprob(), b_greedy_scratch.samples[i].top(j).logprob(), 1e-4);
  }
  // A's continuation is still A's.
  drive(engine, pool, {&a}, 8, 5);
  LoadedModel reference(dir(), engine_options());
  EXPECT_EQ(a.generated(), greedy_generate(reference.model, a_tokens, 5));
}

// A sequence samples the same tokens alone and among other sequences (greedy and seeded temperature).
TEST_F(EngineRandomTest, SamplesDoNotDependOnBatchComposition) {
  LoadedModel served(dir(), engine_options());
  Engine engine(served.model);
  BlockAllocator pool(engine.num_blocks());
  pool.allocate();
  const int n = 6;
  TestSequence g_alone(1, tokens(9, 1), greedy(), 3), t_alone(2, tokens(13, 2), temperature(1.0f, 1.0f, 99), 2);
  drive(engine, pool, {&g_alone}, 6, n);
  drive(engine, pool, {&t_alone}, 6, n);
  TestSequence g_batched(11, tokens(9, 1), greedy(), 3), t_batched(12, tokens(13, 2), temperature(1.0f, 1.0f, 99), 2);
  TestSequence other1(13, tokens(17, 3), temperature(0.7f, 0.8f, 5), 0), other2(14, tokens(3, 4), greedy(), 1);
  drive(engine, pool, {&other1, &g_batched, &other2, &t_batched}, 6, n);
  EXPECT_EQ(g_batched.generated(), g_alone.generated());
  EXPECT_EQ(t_batched.generated(), t_alone.generated());
  for (size_t i = 0; i < static_cast<size_t>(n); ++i) {
    EXPECT_NEAR(g_batched.samples[i].logprob(), g_alone.samples[i].logprob(), 1e-4);
    EXPECT_NEAR(t_batched.samples[i].logprob(), t_alone.samples[i].logprob(), 1e-4);
  }
  // The seeded draw is a real draw: another seed gives another continuation.
  std::vector<std::vector<int32_t>> continuations;
  for (uint64_t seed : {1, 2, 3, 4}) {
    TestSequence s(100 + seed, tokens(13, 2), temperature(1.5f, 1.0f, seed), 0);
    drive(engine, pool, {&s}, 13, n);
    continuations.push_back(s.generated());
  }
  std::sort(continuations.begin(), continuations.end());
  EXPECT_GT(std::unique(continuations.begin(), continuations.end()) - continuations.begin(), 1);
}

// ---------------------------------------------------------------------------------------------
// The sampler.

TEST(SampleToken, GreedyAndTinyTopPPickTheFirstCandidate) {
  const std::vector<int32_t> ids = {42, 7, 9, 100};
  const std::vector<float> lps = {std::log(0.4f), std::log(0.3f), std::log(0.2f), std::log(0.1f)};
  for (int64_t pos = 0; pos < 200; ++pos) {
    EXPECT_EQ(sample_token(greedy(), pos, ids.data(), lps.data(), 4), 42);
    EXPECT_EQ(sample_token(temperature(0.0f, 0.5f, pos), pos, ids.data(), lps.data(), 4), 42);
    EXPECT_EQ(sample_token(temperature(1.0f, 1e-6f, static_cast<uint64_t>(pos) * 3), pos, ids.data(), lps.data(), 4), 42);
  }
  EXPECT_THROW(sample_token(greedy(), 0, ids.data(), lps.data(), 0), std::invalid_argument);
}

// Frequencies over many (seed, position) keys against the candidate probabilities: a chi-square
// statistic with 3 degrees of freedom (p < 1e-6 above 33).
TEST(SampleToken, FrequenciesFollowTheProbabilities) {
  const std::vector<int32_t> ids = {5, 6, 7, 8};
  const std::vector<double> p = {0.5, 0.25, 0.15, 0.1};
  std::vector<float> lps;
  for (double x : p) lps.push_back(static_cast<float>(std::log(x)));
  auto chi_square = [&](const proto::Sampling& base, const std::vector<double>& want, int draws, bool vary_seed) {
    std::map<int32_t, int> counts;
    for (int i = 0; i < draws; ++i) {
      proto::Sampling s = base;
      if (vary_seed) s.set_seed(static_cast<uint64_t>(i));
      counts[sample_token(s, vary_seed ? 3 : i, ids.data(), lps.data(), 4)]++;
    }
    double chi = 0;
    for (size_t j = 0; j < want.size(); ++j) {
      const double expected = want[j] * draws, got = counts[ids[j]];
      if (expected == 0) {
        EXPECT_EQ(got, 0) << "candidate " << j << " was cut";
        continue;
      }
      chi += (got - expected) * (got - expected) / expected;
    }
    return chi;
  };
  // Over positions with one seed, and over seeds at one position.
  EXPECT_LT(chi_square(temperature(1.0f, 1.0f, 1234), p, 20000, false), 33.0);
  EXPECT_LT(chi_square(temperature(1.0f, 0.0f, 0), p, 20000, true), 33.0);
  // A skewed expectation must fail the same bound (the statistic has power).
  EXPECT_GT(chi_square(temperature(1.0f, 1.0f, 1234), {0.4, 0.3, 0.2, 0.1}, 20000, false), 33.0);
  // top_p 0.7: the first two (0.75 of the mass) stay, renormalized.
  EXPECT_LT(chi_square(temperature(1.0f, 0.7f, 77), {2.0 / 3, 1.0 / 3, 0, 0}, 20000, false), 33.0);
  // Temperature 0.5 squares the probabilities before normalizing.
  std::vector<double> sharp;
  double z = 0;
  for (double x : p) z += x * x;
  for (double x : p) sharp.push_back(x * x / z);
  EXPECT_LT(chi_square(temperature(0.5f, 1.0f, 5), sharp, 20000, false), 33.0);
}

TEST(SampleToken, SameSeedAndPositionSameToken) {
  std::vector<int32_t> ids(64);
  std::vector<float> lps(64);
  for (int j = 0; j < 64; ++j) {
    ids[static_cast<size_t>(j)] = 1000 - j;
    lps[static_cast<size_t>(j)] = -1.0f - 0.05f * static_cast<float>(j);
  }
  int differing = 0;
  for (int64_t pos = 0; pos < 300; ++pos) {
    const auto s = temperature(1.3f, 0.9f, 0xfeedull);
    const int32_t first = sample_token(s, pos, ids.data(), lps.data(), 64);
    EXPECT_EQ(sample_token(s, pos, ids.data(), lps.data(), 64), first);
    if (sample_token(temperature(1.3f, 0.9f, 0xbeefull), pos, ids.data(), lps.data(), 64) != first) ++differing;
  }
  EXPECT_GT(differing, 100);  // another seed is another stream
}

// ---------------------------------------------------------------------------------------------
// Malformed plans: each is refused with a clear message before the cache is touched.

TEST_F(EngineRandomTest, MalformedPlansAreRefusedAndTheCacheStaysIntact) {
  const int num_blocks = 32, max_rows = 16, max_samples = 2;
  LoadedModel served(dir(), engine_options(max_rows, max_samples, num_blocks));
  LoadedModel reference(dir(), engine_options());
  Engine engine(served.model);
  BlockAllocator pool(engine.num_blocks());
  pool.allocate();
  const auto prompt = tokens(9, 6);
  TestSequence x(1, prompt, greedy(), 5);
  {  // the first 8 tokens, no sample yet
    proto::StepPlan plan;
    proto::SequenceWork w = x.next(8, pool);
    ASSERT_FALSE(w.sample());
    *plan.add_sequences() = w;
    engine.run(plan);
    x.commit(w, nullptr);
  }
  const proto::SequenceWork valid = x.next(8, pool);  // the last prompt token, sampling
  ASSERT_TRUE(valid.sample());
  auto other = [&] {  // a well-formed second sequence in blocks nobody else uses
    proto::SequenceWork w;
    w.set_sequence_id(99);
    w.add_tokens(3);
    w.add_tokens(4);
    w.add_blocks(20);
    w.set_sample(true);
    return w;
  };
  struct Case {
    std::string name;
    std::function<void(proto::StepPlan&)> spoil;
    std::string message;
  };
  const int vocab = config_.vocab_size;
  const std::vector<Case> cases = {
      {"token past vocab", [&](proto::StepPlan& p) { p.mutable_sequences(1)->set_tokens(1, vocab); },
       "token id " + std::to_string(vocab) + " outside the vocabulary"},
      {"negative token", [](proto::StepPlan& p) { p.mutable_sequences(1)->set_tokens(0, -1); }, "token id -1 outside"},
      {"no tokens", [](proto::StepPlan& p) { p.mutable_sequences(1)->clear_tokens(); }, "sequence 99: no tokens"},
      {"table too short", [](proto::StepPlan& p) { p.mutable_sequences(1)->set_num_cached(3); },
       "block table of 1 blocks does not cover 5 positions"},
      {"negative block", [](proto::StepPlan& p) { p.mutable_sequences(1)->set_blocks(0, -1); },
       "block id -1 outside the KV pool"},
      {"block past pool", [&](proto::StepPlan& p) { p.mutable_sequences(1)->set_blocks(0, num_blocks); },
       "block id " + std::to_string(num_blocks) + " outside the KV pool"},
      {"negative num_cached", [](proto::StepPlan& p) { p.mutable_sequences(1)->set_num_cached(-4); },
       "num_cached -4 is negative"},
      {"too many rows",
       [](proto::StepPlan& p) {
         auto* w = p.mutable_sequences(1);
         for (int i = 0; i < 14; ++i) w->add_tokens(1);
         for (int i = 0; i < 4; ++i) w->add_blocks(21 + i);
       },
       "more than 16 tokens in one step"},
      {"too many samples",
       [&](proto::StepPlan& p) {
         proto::SequenceWork w = other();
         w.set_sequence_id(98);
         w.set_blocks(0, 22);
         *p.add_sequences() = w;
       },
       "3 sequences sample in one step (at most 2"},
      {"top_logprobs 21", [](proto::StepPlan& p) { p.mutable_sequences(1)->set_top_logprobs(21); },
       "top_logprobs 21 outside 0..20"},
      {"top_logprobs -1", [](proto::StepPlan& p) { p.mutable_sequences(1)->set_top_logprobs(-1); },
       "top_logprobs -1 outside"},
      {"duplicate id", [](proto::StepPlan& p) { p.mutable_sequences(1)->set_sequence_id(1); },
       "sequence 1: appears twice"},
      {"candidate outside the vocabulary", [](proto::StepPlan& p) { p.mutable_sequences(1)->add_candidate_tokens(-3); },
       "candidate token id -3 outside the vocabulary"},
      {"candidates only without candidates", [](proto::StepPlan& p) { p.mutable_sequences(1)->set_candidates_only(true); },
       "candidates_only without candidate tokens"},
      {"too many candidates",
       [](proto::StepPlan& p) {
         for (int i = 0; i <= Model::kMaxCandidateTokens; ++i) p.mutable_sequences(1)->add_candidate_tokens(i);
       },
       "257 candidate tokens (at most 256)"},
      {"negative temperature",
       [](proto::StepPlan& p) { p.mutable_sequences(1)->mutable_sampling()->set_temperature(-0.5f); }, "temperature"},
      {"NaN temperature",
       [](proto::StepPlan& p) {
         p.mutable_sequences(1)->mutable_sampling()->set_temperature(std::numeric_limits<float>::quiet_NaN());
       },
       "temperature"},
      {"top_p above 1", [](proto::StepPlan& p) { p.mutable_sequences(1)->mutable_sampling()->set_top_p(1.5f); },
       "top_p 1.5"},
      {"negative top_p", [](proto::StepPlan& p) { p.mutable_sequences(1)->mutable_sampling()->set_top_p(-0.1f); },
       "top_p -0.1"},
      {"shared written block",
       [&](proto::StepPlan& p) { p.mutable_sequences(1)->set_blocks(0, x.blocks.back()); }, "also writes in this step"},
      {"shutdown plan", [](proto::StepPlan& p) { p.set_shutdown(true); }, "shutdown"},
  };
  for (const Case& c : cases) {
    proto::StepPlan plan;
    *plan.add_sequences() = valid;  // the valid sequence first: nothing may run before the whole plan is checked
    *plan.add_sequences() = other();
    c.spoil(plan);
    try {
      engine.run(plan);
      ADD_FAILURE() << c.name << ": no exception";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(c.message), std::string::npos) << c.name << ": " << e.what();
    }
  }
  // The well-formed pair runs (the second sequence is fine on its own).
  proto::StepPlan plan;
  *plan.add_sequences() = valid;
  *plan.add_sequences() = other();
  const proto::StepResult r = engine.run(plan);
  ASSERT_EQ(r.samples_size(), 2);
  x.commit(valid, &r.samples(0));
  drive(engine, pool, {&x}, 8, 4);
  EXPECT_EQ(x.generated(), greedy_generate(reference.model, prompt, 4));
  const std::vector<float> logits = compute_all_logits(reference.model, prompt);
  const auto ls = log_softmax(logits.data() + (prompt.size() - 1) * static_cast<size_t>(vocab), vocab);
  expect_matches_row(x.samples[0], ls, 5, "first sample after the refused plans");
}

// ---------------------------------------------------------------------------------------------
// StepExchange over expert-parallel thread ranks.

// Builds each step's plans for every rank from its sequences and takes the results in; the same
// driver runs the thread ranks and the single-rank reference, so both see the same plans.
class ExchangeDriver {
 public:
  using RunStep = std::function<std::vector<proto::StepResult>(const std::vector<proto::StepPlan>&)>;

  ExchangeDriver(int ranks, int blocks) {
    for (int r = 0; r < ranks; ++r) {
      pools_.push_back(std::make_unique<BlockAllocator>(blocks));
      pools_.back()->allocate();
    }
    seqs_.resize(static_cast<size_t>(ranks));
  }
  void add(int rank, TestSequence seq) { seqs_[static_cast<size_t>(rank)].push_back(std::move(seq)); }

  // Steps until every sequence has `new_tokens` samples. At step `idle_step` rank `idle_rank` gets an
  // empty plan; at step `bad_step` rank 1's plan carries an extra sequence with a token outside the
  // vocabulary. Returns every step's results.
  std::vector<std::vector<proto::StepResult>> run(const RunStep& run_step, int chunk, int new_tokens, int idle_step,
                                                  int idle_rank, int bad_step, int vocab) {
    std::vector<std::vector<proto::StepResult>> all;
    for (int step = 0; step < 100; ++step) {
      std::vector<proto::StepPlan> plans(seqs_.size());
      std::vector<std::vector<TestSequence*>> in_step(seqs_.size());
      bool any = false;
      for (size_t r = 0; r < seqs_.size(); ++r) {
        plans[r].set_step(static_cast<uint64_t>(step));
        if (step == idle_step && static_cast<int>(r) == idle_rank) continue;
        for (TestSequence& s : seqs_[r])
          if (static_cast<int>(s.samples.size()) < new_tokens) {
            *plans[r].add_sequences() = s.next(chunk, *pools_[r]);
            in_step[r].push_back(&s);
            any = true;
          }
        if (step == bad_step && r == 1) {
          proto::SequenceWork w;
          w.set_sequence_id(999);
          w.add_tokens(vocab + 3);
          w.add_blocks(1);
          *plans[r].add_sequences() = w;
        }
      }
      if (!any) return all;
      std::vector<proto::StepResult> results = run_step(plans);
      if (results.size() != seqs_.size()) throw std::runtime_error("wrong number of results");
      for (size_t r = 0; r < seqs_.size(); ++r) {
        if (!results[r].error().empty()) continue;  // nothing ran on that rank: the same work comes again
        for (size_t i = 0; i < in_step[r].size(); ++i) {
          const proto::SequenceWork& w = plans[r].sequences(static_cast<int>(i));
          in_step[r][i]->commit(w, find_sample(results[r], w.sequence_id()));
        }
      }
      all.push_back(std::move(results));
    }
    throw std::runtime_error("exchange driver did not finish");
  }
  const std::vector<std::vector<TestSequence>>& sequences() const { return seqs_; }

 private:
  std::vector<std::unique_ptr<BlockAllocator>> pools_;
  std::vector<std::vector<TestSequence>> seqs_;
};

ExchangeDriver make_exchange_driver(const std::vector<int32_t>& base) {
  ExchangeDriver d(2, 64);
  auto slice = [&](size_t from, size_t to) { return std::vector<int32_t>(base.begin() + from, base.begin() + to); };
  d.add(0, TestSequence(1, slice(0, 20), greedy(), 3));
  d.add(0, TestSequence(2, slice(3, 24), temperature(1.0f, 1.0f, 7), 2));
  d.add(1, TestSequence(3, slice(5, 24), greedy(), 4));
  d.add(1, TestSequence(4, slice(1, 14), temperature(0.7f, 0.9f, 3), 0));
  return d;
}

TEST(StepExchangeTest, ExpertParallelRanksMatchSingleRank) {
  const auto g = testing::load_golden_case("tiny-a");
  const int vocab = load_model_config(g.dir + "/config.json").vocab_size;
  const int chunk = 6, new_tokens = 4, idle_step = 1, idle_rank = 1, bad_step = 5;

  // Reference: each rank's sequences on a single-rank model of their own.
  ExchangeDriver reference_driver = make_exchange_driver(g.tokens);
  std::vector<std::unique_ptr<LoadedModel>> reference_models;
  std::vector<std::unique_ptr<Engine>> reference_engines;
  for (int r = 0; r < 2; ++r) {
    reference_models.push_back(std::make_unique<LoadedModel>(g.dir, engine_options()));
    reference_engines.push_back(std::make_unique<Engine>(reference_models.back()->model));
  }
  StepExchange single(nullptr);
  EXPECT_EQ(single.world_size(), 1);
  const auto want = reference_driver.run(
      [&](const std::vector<proto::StepPlan>& plans) {
        std::vector<proto::StepResult> out;
        for (size_t r = 0; r < plans.size(); ++r) {
          auto one = single.run_step(*reference_engines[r], {plans[r]});
          one.at(0).set_rank(static_cast<int>(r));
          out.push_back(one.at(0));
        }
        return out;
      },
      chunk, new_tokens, idle_step, idle_rank, bad_step, vocab);

  ExchangeDriver driver = make_exchange_driver(g.tokens);
  std::vector<std::vector<proto::StepResult>> got;
  std::atomic<bool> worker_returned{false};
  run_thread_ranks(
      2,
      [&](Communicator& comm) {
        LoadedModel m(g.dir, engine_options(64, 16, 64, &comm));
        Engine engine(m.model);
        StepExchange exchange(&comm);
        EXPECT_EQ(exchange.world_size(), 2);
        if (exchange.rank() == 0) {
          got = driver.run([&](const std::vector<proto::StepPlan>& plans) { return exchange.run_step(engine, plans); },
                           chunk, new_tokens, idle_step, idle_rank, bad_step, vocab);
          // A step where rank 0 has nothing and rank 1 has nothing either still runs on both.
          const auto idle = exchange.run_step(engine, {proto::StepPlan(), proto::StepPlan()});
          EXPECT_EQ(idle.size(), 2u);
          // Rank 0's own malformed plan comes back as its error; rank 1 still takes part.
          proto::StepPlan bad;
          bad.set_step(77);
          bad.add_sequences()->set_sequence_id(5);
          const auto failed = exchange.run_step(engine, {bad, proto::StepPlan()});
          ASSERT_EQ(failed.size(), 2u);
          EXPECT_NE(failed[0].error().find("sequence 5: no tokens"), std::string::npos) << failed[0].error();
          EXPECT_EQ(failed[0].step(), 77u);
          EXPECT_TRUE(failed[1].error().empty()) << failed[1].error();
          exchange.shutdown();
          exchange.shutdown();  // a second call is a no-op
          EXPECT_THROW(exchange.run_step(engine, {proto::StepPlan(), proto::StepPlan()}), std::logic_error);
        } else {
          EXPECT_THROW(exchange.run_step(engine, {}), std::logic_error);
          exchange.serve(engine);
          worker_returned = true;
        }
      },
      120);
  EXPECT_TRUE(worker_returned);

  ASSERT_EQ(got.size(), want.size());
  bool saw_error = false, saw_idle = false;
  for (size_t step = 0; step < got.size(); ++step) {
    ASSERT_EQ(got[step].size(), 2u);
    for (size_t r = 0; r < 2; ++r) {
      const proto::StepResult& a = got[step][r];
      const proto::StepResult& b = want[step][r];
      const std::string where = "step " + std::to_string(step) + " rank " + std::to_string(r);
      EXPECT_EQ(a.rank(), static_cast<int>(r)) << where;
      EXPECT_EQ(a.step(), step) << where;
      EXPECT_EQ(a.error().empty(), b.error().empty()) << where << ": " << a.error() << " / " << b.error();
      if (!a.error().empty()) {
        saw_error = true;
        EXPECT_EQ(r, 1u) << where;
        EXPECT_NE(a.error().find("outside the vocabulary"), std::string::npos) << a.error();
      }
      if (step == static_cast<size_t>(idle_step) && r == static_cast<size_t>(idle_rank)) {
        saw_idle = true;
        EXPECT_EQ(a.samples_size(), 0);
        EXPECT_TRUE(a.error().empty());
      }
      ASSERT_EQ(a.samples_size(), b.samples_size()) << where;
      for (int i = 0; i < a.samples_size(); ++i) {
        const auto &x = a.samples(i), &y = b.samples(i);
        EXPECT_EQ(x.sequence_id(), y.sequence_id()) << where;
        EXPECT_EQ(x.token(), y.token()) << where;
        EXPECT_NEAR(x.logprob(), y.logprob(), 1e-5 * std::max(1.0f, std::fabs(y.logprob()))) << where;
        ASSERT_EQ(x.top_size(), y.top_size()) << where;
        for (int j = 0; j < x.top_size(); ++j) {
          EXPECT_EQ(x.top(j).token(), y.top(j).token()) << where;
          EXPECT_NEAR(x.top(j).logprob(), y.top(j).logprob(), 1e-5 * std::max(1.0f, std::fabs(y.top(j).logprob())))
              << where;
        }
      }
    }
  }
  EXPECT_TRUE(saw_error);
  EXPECT_TRUE(saw_idle);
  // Rank 1 failed at bad_step while rank 0's step beside it ran (and matched the reference above).
  EXPECT_FALSE(got[static_cast<size_t>(bad_step)][1].error().empty());
  EXPECT_TRUE(got[static_cast<size_t>(bad_step)][0].error().empty());
  EXPECT_GT(got[static_cast<size_t>(bad_step)][0].forward_seconds(), 0);
  for (size_t r = 0; r < 2; ++r)
    for (size_t i = 0; i < driver.sequences()[r].size(); ++i)
      EXPECT_EQ(driver.sequences()[r][i].generated(), reference_driver.sequences()[r][i].generated());
}

TEST(StepExchangeTest, SingleRankRunsTheLocalEngineAndReportsErrors) {
  const auto g = testing::load_golden_case("tiny-a");
  LoadedModel m(g.dir, engine_options());
  Engine engine(m.model);
  StepExchange exchange(nullptr);
  EXPECT_EQ(exchange.rank(), 0);
  EXPECT_THROW(exchange.run_step(engine, {}), std::invalid_argument);
  EXPECT_THROW(exchange.serve(engine), std::logic_error);
  proto::StepPlan bad;
  bad.set_step(3);
  auto* w = bad.add_sequences();
  w->add_tokens(1);  // no block table
  const auto results = exchange.run_step(engine, {bad});
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results[0].step(), 3u);
  EXPECT_NE(results[0].error().find("does not cover"), std::string::npos) << results[0].error();
  exchange.shutdown();  // nothing to stop
}

// ---------------------------------------------------------------------------------------------
// Backend::top_logprobs on the CPU backend against a naive sort.

TEST(TopLogprobs, CpuBackendMatchesNaiveSort) {
  CpuBackend backend(1);
  const int64_t rows = 5, vocab = 300;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_int_distribution<int> level(0, 3);
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float> host(static_cast<size_t>(rows * vocab));
  for (int64_t i = 0; i < vocab; ++i) {
    host[static_cast<size_t>(i)] = normal(rng);                                        // random
    host[static_cast<size_t>(vocab + i)] = static_cast<float>(level(rng));             // many ties
    host[static_cast<size_t>(2 * vocab + i)] = i % 3 == 0 ? normal(rng) : ninf;        // mostly -inf
    host[static_cast<size_t>(3 * vocab + i)] = i == 250 || i == 17 ? 1.0f : ninf;      // fewer finite than k
    host[static_cast<size_t>(4 * vocab + i)] = 0.5f;                                   // all equal
  }
  DeviceBuffer logits_buf = backend.allocate(host.size() * sizeof(float));
  const Tensor logits = logits_buf.view(DType::kF32, {rows, vocab});
  backend.upload(host.data(), logits);
  for (int k : {1, 5, 64}) {
    DeviceBuffer ids_buf = backend.allocate(static_cast<size_t>(rows * k) * sizeof(int32_t));
    DeviceBuffer lp_buf = backend.allocate(static_cast<size_t>(rows * k) * sizeof(float));
    const Tensor ids = ids_buf.view(DType::kI32, {rows, k}), lps = lp_buf.view(DType::kF32, {rows, k});
    backend.top_logprobs(logits, k, ids, lps);
    std::vector<int32_t> got_ids(static_cast<size_t>(rows * k));
    std::vector<float> got_lps(static_cast<size_t>(rows * k));
    backend.download(ids, got_ids.data());
    backend.download(lps, got_lps.data());
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = host.data() + r * vocab;
      std::vector<int32_t> order(static_cast<size_t>(vocab));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
      const auto ls = log_softmax(row, static_cast<int>(vocab));
      for (int j = 0; j < k; ++j) {
        const size_t at = static_cast<size_t>(r * k + j);
        const std::string where = "k " + std::to_string(k) + " row " + std::to_string(r) + " rank " + std::to_string(j);
        EXPECT_EQ(got_ids[at], order[static_cast<size_t>(j)]) << where;
        const double want = ls[static_cast<size_t>(order[static_cast<size_t>(j)])];
        if (std::isinf(want)) {
          EXPECT_TRUE(std::isinf(got_lps[at]) && got_lps[at] < 0) << where;
        } else {
          EXPECT_NEAR(got_lps[at], want, 1e-5) << where;
        }
      }
    }
  }
}

}  // namespace
}  // namespace arbiter
