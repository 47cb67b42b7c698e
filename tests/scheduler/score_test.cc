// Score mode (verdict-only classification) on a tiny random model with the real tokenizer: the
// probabilities the Classifier reports equal a softmax, renormalised over the allowed answers, of
// the logits an independent Model::forward gives at the same positions (0/1, labels that share
// their first tokens or end where another goes on, JSON verdicts; both forced prefixes); they do not
// depend on what else is in the batch; the engine's candidate log-probabilities are those of the
// whole distribution.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_backend.h"
#include "runtime/config.h"
#include "runtime/generate.h"
#include "runtime/make_model.h"
#include "runtime/model.h"
#include "runtime/safetensors.h"
#include "scheduler/classify.h"
#include "scheduler/serving.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

std::string tokenizer_dir() {
  const char* env = std::getenv("ARBITER_TOKENIZER_DIR");
  return env && *env ? env : ARBITER_TOKENIZER_DIR;
}

class ScoreMode : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(tokenizer_dir() + "/tokenizer.json"))
      GTEST_SKIP() << "no tokenizer: run scripts/fetch-tokenizer.sh";
    dir_ = std::make_unique<testing::TempDir>();
    config_ = preset_config("tiny");
    MakeModelOptions o;
    o.seed = 11;
    o.tokenizer_dir = tokenizer_dir();
    make_random_model(config_, dir_->path(), o);
    ServingOptions so;
    so.model_dir = dir_->path();
    so.device = "cpu";
    so.max_context = 512;
    so.kv_blocks = 512;
    so.classifier.budgets = {8, 8, 8};
    so.classifier.answer_tokens = 8;
    serving_ = std::make_unique<ServingRank>(so);
    checkpoint_ = std::make_unique<Checkpoint>(dir_->path());
    // The reference: a second Model over the same weights, run position by position on its own.
    backend_ = std::make_unique<CpuBackend>();
    reference_ = std::make_unique<Model>(config_, *checkpoint_, *backend_, testing::small_model_options(64, 64));
  }
  static void TearDownTestSuite() {
    reference_.reset();
    backend_.reset();
    checkpoint_.reset();
    serving_.reset();
    dir_.reset();
  }

  static Classifier& classifier() { return serving_->classifier(); }
  static const Tokenizer& tokenizer() { return serving_->tokenizer(); }

  // Runs one request to completion on the serving rank.
  static ClassifyResult run(const ClassifyRequest& request) {
    std::optional<ClassifyResult> got;
    std::string why;
    EXPECT_EQ(classifier().submit(request, [&](ClassifyResult r) { got = std::move(r); }, &why), SubmitStatus::kAccepted) << why;
    serving_->loop().run_until_idle();
    EXPECT_TRUE(got.has_value());
    return got ? *got : ClassifyResult{};
  }

  // The reference model's log-probabilities of the next token after `tokens` (the whole vocabulary).
  static std::vector<double> next_logprobs(const std::vector<int32_t>& tokens) {
    const std::vector<float> all = compute_all_logits(*reference_, tokens);
    const size_t vocab = static_cast<size_t>(config_.vocab_size);
    const float* last = all.data() + (tokens.size() - 1) * vocab;
    double max = -INFINITY;
    for (size_t i = 0; i < vocab; ++i) max = std::max(max, static_cast<double>(last[i]));
    double sum = 0;
    for (size_t i = 0; i < vocab; ++i) sum += std::exp(last[i] - max);
    std::vector<double> lp(vocab);
    for (size_t i = 0; i < vocab; ++i) lp[i] = last[i] - max - std::log(sum);
    return lp;
  }

  // Each answer's probability computed independently of the Classifier's trie: the answers spelled
  // as token lists after `prompt`; at every depth where the answers agreeing with this one so far
  // put different tokens, its token's probability renormalised over theirs, multiplied together.
  static std::map<std::string, double> expected(const std::vector<int32_t>& prompt,
                                                const std::vector<std::pair<std::string, std::vector<int32_t>>>& answers) {
    std::map<std::string, double> out;
    std::map<std::vector<int32_t>, std::vector<double>> memo;  // reference log-probabilities by context
    for (const auto& [name, mine] : answers) {
      double p = 1;
      for (size_t d = 0; d < mine.size(); ++d) {
        std::vector<int32_t> rivals;  // distinct tokens at d of the answers equal to mine on [0, d)
        for (const auto& [other_name, other] : answers) {
          if (other.size() <= d || !std::equal(mine.begin(), mine.begin() + static_cast<std::ptrdiff_t>(d), other.begin())) continue;
          if (std::find(rivals.begin(), rivals.end(), other[d]) == rivals.end()) rivals.push_back(other[d]);
        }
        if (rivals.size() < 2) continue;
        std::vector<int32_t> context = prompt;
        context.insert(context.end(), mine.begin(), mine.begin() + static_cast<std::ptrdiff_t>(d));
        auto it = memo.find(context);
        if (it == memo.end()) it = memo.emplace(context, next_logprobs(context)).first;
        double sum = 0;
        for (const int32_t t : rivals) sum += std::exp(it->second[static_cast<size_t>(t)]);
        p *= std::exp(it->second[static_cast<size_t>(mine[d])]) / sum;
      }
      out[name] = p;
    }
    return out;
  }

  static ClassifyRequest request(const std::string& content, std::vector<ClassifyPolicy> policies,
                                 ScorePrefix prefix = ScorePrefix::kEmptyAnalysis) {
    ClassifyRequest r;
    r.id = "req-" + std::to_string(next_id_++);
    r.content = content;
    r.policies = std::move(policies);
    r.effort = ReasoningEffort::kLow;
    r.mode = ClassifyMode::kScore;
    r.score_prefix = prefix;
    return r;
  }

  static std::vector<int32_t> spell(const std::string& text, bool stop) {
    std::vector<int32_t> t = serving_->tokenizer().encode(text);
    if (stop) t.push_back(kTokenReturn);
    return t;
  }

  static void expect_scores(const PolicyResult& got, const std::map<std::string, double>& want) {
    ASSERT_EQ(got.scores.size(), want.size()) << got.policy_id << ": " << got.verdict_error;
    double total = 0;
    std::string best;
    for (const auto& [answer, p] : want) {
      ASSERT_TRUE(got.scores.count(answer)) << answer;
      EXPECT_NEAR(got.scores.at(answer), p, 2e-5 + 1e-4 * p) << got.policy_id << " answer " << answer;
      total += got.scores.at(answer);
      if (best.empty() || p > want.at(best)) best = answer;
    }
    EXPECT_NEAR(total, 1.0, 1e-9);
    ASSERT_TRUE(got.confidence.has_value());
    EXPECT_NEAR(*got.confidence, want.at(best), 2e-5 + 1e-4 * want.at(best));
  }

  static inline std::unique_ptr<testing::TempDir> dir_;
  static inline ModelConfig config_;
  static inline std::unique_ptr<ServingRank> serving_;
  static inline std::unique_ptr<Checkpoint> checkpoint_;
  static inline std::unique_ptr<CpuBackend> backend_;
  static inline std::unique_ptr<Model> reference_;
  static inline int next_id_ = 0;
};

const ClassifyPolicy kBinary{"spam", "# Spam\nReturn exactly one character: 0 or 1.", {}, {}};
const ClassifyPolicy kLabels{"tier", "# Spam tiers\nAnswer with one label.", {"SPAM_LOW", "SPAM_HIGH", "OK", "spam", "spam-bot"},
                             {"SPAM_HIGH", "spam-bot"}};
const ClassifyPolicy kJson{"json", "# Fraud\nAnswer {\"violation\": 0 or 1, \"policy_category\": null}.", {}, {}};

TEST_F(ScoreMode, ProbabilitiesAreTheModelsSoftmaxOverTheAllowedAnswers) {
  const std::string content = "Limited offer!!! Click example.com for free money";
  for (const ScorePrefix prefix : {ScorePrefix::kEmptyAnalysis, ScorePrefix::kDirect}) {
    SCOPED_TRACE(to_string(prefix));
    const ClassifyRequest r = request(content, {kBinary, kLabels, kJson}, prefix);
    const ClassifyResult result = run(r);
    ASSERT_EQ(result.results.size(), 3u);
    EXPECT_EQ(result.finish, FinishReason::kStop);
    const auto forced = classifier().score_prefix_tokens(prefix);
    auto prompt_of = [&](const ClassifyPolicy& p) {
      std::vector<int32_t> t = classifier().render(p, content, r.effort);
      t.insert(t.end(), forced.begin(), forced.end());
      return t;
    };
    // 0/1 (at one position).
    expect_scores(result.results[0], expected(prompt_of(kBinary), {{"0", spell("0", true)}, {"1", spell("1", true)}}));
    EXPECT_EQ(result.results[0].usage.completion_tokens, 1);
    EXPECT_EQ(result.results[0].usage.forced_tokens, static_cast<int>(forced.size()));
    EXPECT_EQ(result.results[0].usage.prompt_tokens, static_cast<int>(prompt_of(kBinary).size() - forced.size()));
    EXPECT_EQ(result.results[0].verdict, result.results[0].scores.at("1") > result.results[0].scores.at("0") ? 1 : 0);
    EXPECT_TRUE(result.results[0].reasoning.empty());
    // Labels: SPAM_LOW / SPAM_HIGH share their start, spam ends where spam-bot goes on.
    std::vector<std::pair<std::string, std::vector<int32_t>>> labels;
    for (const auto& l : kLabels.labels) labels.emplace_back(l, spell(l, true));
    expect_scores(result.results[1], expected(prompt_of(kLabels), labels));
    EXPECT_EQ(result.results[1].usage.completion_tokens, 3);  // the root, SPAM..., spam|spam-bot
    EXPECT_TRUE(result.results[1].verdict.is_string());
    // JSON: the key is forced, the value weighed.
    expect_scores(result.results[2], expected(prompt_of(kJson), {{"0", spell("{\"violation\": 0", false)},
                                                                 {"1", spell("{\"violation\": 1", false)}}));
    EXPECT_EQ(result.results[2].usage.completion_tokens, 1);
    EXPECT_EQ(result.results[2].usage.forced_tokens, static_cast<int>(forced.size() + spell("{\"violation\": ", false).size()));
    EXPECT_EQ(result.results[2].verdict_details.at("violation"), result.results[2].verdict);
  }
}

TEST_F(ScoreMode, BatchInvariant) {
  const std::string probe = "Win a free cruise, reply with your bank details";
  const ClassifyResult alone = run(request(probe, {kBinary, kLabels, kJson}));
  // The same request among many others, all submitted before any step runs.
  // Some of the others reason (their steps need the whole distribution: the score sequences sharing
  // a step with them take the full lm_head instead of the candidates' rows).
  std::vector<std::optional<ClassifyResult>> got(24);
  for (size_t i = 0; i < got.size(); ++i) {
    const std::string content = i == 13 ? probe : "message " + std::to_string(i) + " about cheap watches and lunch";
    ClassifyRequest r = request(content, i % 2 ? std::vector<ClassifyPolicy>{kBinary, kLabels, kJson}
                                               : std::vector<ClassifyPolicy>{kJson, kBinary});
    if (i % 3 == 0) r.mode = ClassifyMode::kReason;
    std::string why;
    ASSERT_EQ(classifier().submit(r, [&got, i](ClassifyResult res) { got[i] = std::move(res); }, &why), SubmitStatus::kAccepted)
        << why;
  }
  serving_->loop().run_until_idle();
  ASSERT_TRUE(got[13].has_value());
  const ClassifyResult& batched = *got[13];
  ASSERT_EQ(batched.results.size(), alone.results.size());
  for (size_t p = 0; p < alone.results.size(); ++p) {
    EXPECT_EQ(batched.results[p].verdict, alone.results[p].verdict);
    ASSERT_EQ(batched.results[p].scores.size(), alone.results[p].scores.size());
    for (const auto& [answer, prob] : alone.results[p].scores)
      EXPECT_NEAR(batched.results[p].scores.at(answer), prob, 1e-5) << alone.results[p].policy_id << " " << answer;
  }
}

// The engine's candidate log-probabilities are those of the whole distribution (not renormalised):
// a candidate that is also among the top ones has the same log-probability in both lists.
TEST_F(ScoreMode, CandidateLogprobsAgreeWithTheTopList) {
  const ClassifyRequest r = request("hello there", {kBinary});
  ClassifyPrompts prompts = classifier().prepare(r);
  ASSERT_TRUE(prompts.ok());
  SequenceSpec spec = prompts.sequences.at(0);
  spec.top_logprobs = 20;
  spec.candidates_only = false;  // the whole distribution
  const auto reference = next_logprobs(spec.prompt);
  // The top token of the reference distribution, and 0 / 1.
  const int32_t top = static_cast<int32_t>(std::max_element(reference.begin(), reference.end()) - reference.begin());
  spec.candidate_tokens = {15, 16, top};
  RequestSpec rs;
  rs.id = "raw";
  rs.sequences = {spec};
  std::optional<SequenceResult> out;
  rs.on_done = [&](std::vector<SequenceResult> results) { out = results.at(0); };
  std::string why;
  ASSERT_EQ(serving_->scheduler().submit(std::move(rs), &why), SubmitStatus::kAccepted) << why;
  serving_->loop().run_until_idle();
  ASSERT_TRUE(out.has_value());
  ASSERT_EQ(out->tokens.size(), 1u);
  const GeneratedToken& g = out->tokens[0];
  ASSERT_EQ(g.candidates.size(), 3u);
  for (const auto& c : g.candidates) EXPECT_NEAR(c.logprob(), reference[static_cast<size_t>(c.token())], 1e-3) << c.token();
  ASSERT_FALSE(g.top.empty());
  EXPECT_EQ(g.top[0].token(), g.candidates[2].token());
  EXPECT_EQ(g.top[0].logprob(), g.candidates[2].logprob());
}

// Runs raw sequences as one request on the serving rank; their results in order.
std::vector<SequenceResult> run_raw(ServingRank& serving, std::vector<SequenceSpec> specs, const std::string& id) {
  RequestSpec rs;
  rs.id = id;
  rs.sequences = std::move(specs);
  std::optional<std::vector<SequenceResult>> out;
  rs.on_done = [&](std::vector<SequenceResult> results) { out = std::move(results); };
  std::string why;
  EXPECT_EQ(serving.scheduler().submit(std::move(rs), &why), SubmitStatus::kAccepted) << why;
  serving.loop().run_until_idle();
  return out.value_or(std::vector<SequenceResult>{});
}

// The lm_head restricted to the candidates' rows (a step of candidates-only sequences) gives the
// probabilities the full lm_head gives, renormalised over the candidates; so does a candidates-only
// sequence in a step that also needs full logits (which then takes the full path).
TEST_F(ScoreMode, RestrictedLmHeadEqualsTheFullOne) {
  const ClassifyRequest r = request("Limited offer, click now", {kLabels});
  ClassifyPrompts prompts = classifier().prepare(r);
  ASSERT_TRUE(prompts.ok());
  SequenceSpec spec = prompts.sequences.at(0);  // the root: SPAM... / OK / spam
  // More candidates than the answers need, among them the full distribution's most likely token.
  const auto reference = next_logprobs(spec.prompt);
  const int32_t top = static_cast<int32_t>(std::max_element(reference.begin(), reference.end()) - reference.begin());
  spec.candidate_tokens.push_back(top);
  spec.candidate_tokens.push_back(1000);
  ASSERT_TRUE(spec.candidates_only);
  SequenceSpec full = spec;
  full.candidates_only = false;
  SequenceSpec other;  // a sequence that needs the full distribution
  other.prompt = tokenizer().encode("an unrelated prompt");
  other.max_new_tokens = 1;
  other.top_logprobs = 5;

  const auto restricted = run_raw(*serving_, {spec}, "restricted");
  const auto whole = run_raw(*serving_, {full}, "whole");
  const auto mixed = run_raw(*serving_, {spec, other}, "mixed");
  ASSERT_EQ(restricted.size(), 1u);
  ASSERT_EQ(whole.size(), 1u);
  ASSERT_EQ(mixed.size(), 2u);
  const auto& rc = restricted[0].tokens.at(0).candidates;
  const auto& wc = whole[0].tokens.at(0).candidates;
  const auto& mc = mixed[0].tokens.at(0).candidates;
  ASSERT_EQ(rc.size(), spec.candidate_tokens.size());
  ASSERT_EQ(wc.size(), rc.size());
  ASSERT_EQ(mc.size(), rc.size());
  // The full path's log-probabilities renormalised over the candidates by hand.
  double z = 0;
  for (const auto& c : wc) z += std::exp(static_cast<double>(c.logprob()));
  double total = 0;
  for (size_t j = 0; j < rc.size(); ++j) {
    EXPECT_EQ(rc[j].token(), spec.candidate_tokens[j]);
    const double want = std::exp(static_cast<double>(wc[j].logprob())) / z;
    EXPECT_NEAR(std::exp(static_cast<double>(rc[j].logprob())), want, 1e-5 + 1e-4 * want) << j;
    EXPECT_NEAR(std::exp(static_cast<double>(mc[j].logprob())), want, 1e-5 + 1e-4 * want) << j;
    // And the independent reference model's.
    double ref_z = 0;
    for (const int32_t t : spec.candidate_tokens) ref_z += std::exp(reference[static_cast<size_t>(t)]);
    EXPECT_NEAR(std::exp(static_cast<double>(rc[j].logprob())), std::exp(reference[static_cast<size_t>(rc[j].token())]) / ref_z,
                1e-5 + 1e-4 * want);
    total += std::exp(static_cast<double>(rc[j].logprob()));
  }
  EXPECT_NEAR(total, 1.0, 1e-5);
  // The generated token is the best candidate, on either path; no top list.
  EXPECT_EQ(restricted[0].tokens[0].token, top);
  EXPECT_EQ(mixed[0].tokens[0].token, top);
  EXPECT_TRUE(restricted[0].tokens[0].top.empty());
  EXPECT_FALSE(mixed[1].tokens.at(0).top.empty());
}

}  // namespace
}  // namespace arbiter
