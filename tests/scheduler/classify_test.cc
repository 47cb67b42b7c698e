// Classifier (scheduler/classify.h) without a model: prompts and sequences it builds, and how it
// reads generations made by hand with the real gpt-oss tokenizer (verdicts, confidence from top
// logprobs, reasoning, the forced close of a reasoning budget, usage).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "runtime/harmony.h"
#include "runtime/safeguard.h"
#include "runtime/tokenizer.h"
#include "scheduler/classify.h"
#include "scheduler/scheduler.h"

namespace arbiter {
namespace {

const Tokenizer& tokenizer() {
  static const Tokenizer t = [] {
    const char* env = std::getenv("ARBITER_TOKENIZER_DIR");
    const std::string dir = env && *env ? env : ARBITER_TOKENIZER_DIR;
    const std::string path = dir + "/tokenizer.json";
    if (!std::filesystem::exists(path))
      throw std::runtime_error(path + " is missing: run scripts/fetch-tokenizer.sh (or set ARBITER_TOKENIZER_DIR)");
    return Tokenizer::from_hf_json(path);
  }();
  return t;
}

int32_t single_token(const std::string& text) {
  const auto ids = tokenizer().encode(text);
  if (ids.size() != 1) throw std::runtime_error("'" + text + "' is not one token");
  return ids[0];
}

// Builds generated token sequences as the model would produce them, with top logprobs.
class Generation {
 public:
  // Sampled tokens of `text` (content mode), each sure of itself unless `top` is given for one.
  Generation& text(const std::string& s) {
    for (const int32_t id : tokenizer().encode(s)) sampled(id);
    return *this;
  }
  Generation& special(const std::string& s, bool forced = false) {
    for (const int32_t id : tokenizer().encode_with_specials(s)) {
      if (forced) forced_token(id);
      else sampled(id);
    }
    return *this;
  }
  Generation& sampled(int32_t id, std::vector<std::pair<int32_t, float>> top = {}) {
    GeneratedToken g;
    g.token = id;
    if (top.empty()) top = {{id, std::log(0.97f)}, {id == 0 ? 1 : 0, std::log(0.01f)}};
    for (const auto& [t, lp] : top) {
      proto::TokenLogprob p;
      p.set_token(t);
      p.set_logprob(lp);
      g.top.push_back(p);
      if (t == id) g.logprob = lp;
    }
    result_.tokens.push_back(std::move(g));
    return *this;
  }
  Generation& forced_token(int32_t id) {
    GeneratedToken g;
    g.token = id;
    g.forced = true;
    result_.tokens.push_back(std::move(g));
    return *this;
  }
  Generation& analysis(const std::string& reasoning) {
    special("<|channel|>analysis<|message|>");
    return text(reasoning).special("<|end|><|start|>assistant");
  }
  Generation& final_header() { return special("<|channel|>final<|message|>"); }
  Generation& end() { return special("<|return|>"); }
  Generation& finish(FinishReason reason) {
    result_.finish = reason;
    return *this;
  }
  Generation& usage(int prompt, int cached, int reasoning) {
    result_.prompt_tokens = prompt;
    result_.cached_tokens = cached;
    result_.reasoning_tokens = reasoning;
    return *this;
  }
  SequenceResult done() const { return result_; }

 private:
  SequenceResult result_;
};

// The tests need a Scheduler only to construct the Classifier (and for the submit checks).
class ClassifierTest : public ::testing::Test {
 protected:
  ClassifierTest() : scheduler_(SchedulerOptions{}), classifier_(tokenizer(), scheduler_, options()) {}
  static ClassifierOptions options() {
    ClassifierOptions o;
    o.budgets = {16, 64, 256};
    o.answer_tokens = 32;
    o.top_logprobs = 5;
    return o;
  }
  Scheduler scheduler_;
  Classifier classifier_;
};

ClassifyPolicy binary_policy() { return {"spam", "Answer 1 if the content is spam, else 0.", {}, {}}; }

TEST_F(ClassifierTest, CloseReasoningIsTheFinalHeader) {
  EXPECT_EQ(classifier_.close_reasoning(),
            tokenizer().encode_with_specials("<|end|><|start|>assistant<|channel|>final<|message|>"));
}

TEST_F(ClassifierTest, RenderEqualsTheSafeguardPromptAndSharesThePolicyPrefix) {
  std::mt19937 rng(7);
  const std::vector<std::string> pieces = {"hello", " ", "<|end|>", "\n", "é", "1", "{\"violation\": 1}", "  ",
                                           "<|start|>assistant", "🙂", "SP2", "\t", "Buy now!!!"};
  const ClassifyPolicy policy = binary_policy();
  for (const ReasoningEffort effort : {ReasoningEffort::kLow, ReasoningEffort::kMedium, ReasoningEffort::kHigh}) {
    SafeguardPromptOptions o;
    o.effort = effort;
    const auto prefix = classifier_.policy_prefix(policy.text, effort);
    ASSERT_FALSE(prefix.empty());
    EXPECT_EQ(prefix.back(), harmony_ids::kMessage);
    for (int trial = 0; trial < 40; ++trial) {
      std::string content;
      const int n = static_cast<int>(rng() % 8);
      for (int i = 0; i < n; ++i) content += pieces[rng() % pieces.size()];
      const auto ids = classifier_.render(policy, content, effort);
      EXPECT_EQ(ids, render_safeguard_prompt(tokenizer(), policy.text, content, o)) << content;
      ASSERT_GE(ids.size(), prefix.size());
      EXPECT_TRUE(std::equal(prefix.begin(), prefix.end(), ids.begin())) << "content: " << content;
    }
  }
  // Different efforts render different system messages, hence different prefixes.
  EXPECT_NE(classifier_.policy_prefix(policy.text, ReasoningEffort::kLow),
            classifier_.policy_prefix(policy.text, ReasoningEffort::kHigh));
}

TEST_F(ClassifierTest, SequencesCarryBudgetCloseAndTopLogprobs) {
  ClassifyRequest request;
  request.content = "win a prize";
  request.policies = {binary_policy()};
  request.effort = ReasoningEffort::kLow;
  SequenceSpec s = classifier_.sequence(request, request.policies[0]);
  EXPECT_EQ(s.max_reasoning_tokens, 16);
  EXPECT_EQ(s.close_reasoning, classifier_.close_reasoning());
  EXPECT_EQ(s.top_logprobs, 5);
  EXPECT_EQ(s.max_new_tokens, 16 + static_cast<int>(classifier_.close_reasoning().size()) + 32);
  request.effort = ReasoningEffort::kHigh;
  s = classifier_.sequence(request, request.policies[0]);
  EXPECT_EQ(s.max_reasoning_tokens, 256);
  request.max_tokens = 7;
  s = classifier_.sequence(request, request.policies[0]);
  EXPECT_EQ(s.max_new_tokens, 7);
}

TEST_F(ClassifierTest, BinaryVerdictWithConfidence) {
  const int32_t one = single_token("1"), zero = single_token("0"), other = single_token("2");
  const auto g = Generation()
                     .analysis("The content offers a prize. That is spam.")
                     .final_header()
                     .sampled(one, {{one, std::log(0.8f)}, {zero, std::log(0.15f)}, {other, std::log(0.05f)}})
                     .end()
                     .done();
  PolicyResult r = classifier_.interpret(binary_policy(), g, true);
  EXPECT_EQ(r.policy_id, "spam");
  EXPECT_EQ(r.verdict, nlohmann::json(1));
  EXPECT_TRUE(r.violation());
  EXPECT_TRUE(r.verdict_error.empty());
  EXPECT_EQ(r.final_text, "1");
  EXPECT_EQ(r.reasoning, "The content offers a prize. That is spam.");
  EXPECT_FALSE(r.reasoning_truncated);
  ASSERT_TRUE(r.confidence.has_value());
  EXPECT_NEAR(*r.confidence, 0.8 / 0.95, 1e-5);
  // Without reasoning asked for, the verdict is the same and the reasoning is left out.
  r = classifier_.interpret(binary_policy(), g, false);
  EXPECT_EQ(r.verdict, nlohmann::json(1));
  EXPECT_TRUE(r.reasoning.empty());
}

TEST_F(ClassifierTest, BinaryVerdictAfterWhitespace) {
  const int32_t zero = single_token("0"), one = single_token("1");
  const auto g = Generation()
                     .analysis("fine")
                     .final_header()
                     .text("\n")
                     .sampled(zero, {{zero, std::log(0.6f)}, {one, std::log(0.2f)}})
                     .end()
                     .done();
  const PolicyResult r = classifier_.interpret(binary_policy(), g, true);
  EXPECT_EQ(r.verdict, nlohmann::json(0));
  EXPECT_FALSE(r.violation());
  ASSERT_TRUE(r.confidence.has_value());
  EXPECT_NEAR(*r.confidence, 0.75, 1e-5);
}

TEST_F(ClassifierTest, JsonVerdictWithConfidenceAtTheViolationValue) {
  const int32_t one = single_token("1"), zero = single_token("0");
  const auto g = Generation()
                     .analysis("Promotional link.")
                     .final_header()
                     .text("{\"violation\": ")
                     .sampled(one, {{one, std::log(0.9f)}, {zero, std::log(0.1f)}})
                     .text(", \"policy_category\": \"SP2\", \"rationale\": \"link spam\"}")
                     .end()
                     .done();
  const PolicyResult r = classifier_.interpret(binary_policy(), g, true);
  EXPECT_EQ(r.verdict, nlohmann::json(1));
  EXPECT_TRUE(r.violation());
  EXPECT_EQ(r.verdict_details.at("status"), "ok");
  EXPECT_EQ(r.verdict_details.at("violation"), 1);
  EXPECT_EQ(r.verdict_details.at("policy_category"), "SP2");
  EXPECT_EQ(r.verdict_details.at("rationale"), "link spam");
  ASSERT_TRUE(r.confidence.has_value());
  EXPECT_NEAR(*r.confidence, 0.9, 1e-5);
}

TEST_F(ClassifierTest, JsonBooleanVerdict) {
  const int32_t yes = single_token(" true"), no = single_token(" false");
  const auto g = Generation()
                     .analysis("ok")
                     .final_header()
                     .text("```json\n{\"violation\":")
                     .sampled(no, {{no, std::log(0.7f)}, {yes, std::log(0.3f)}})
                     .text("}\n```")
                     .end()
                     .done();
  const PolicyResult r = classifier_.interpret(binary_policy(), g, true);
  EXPECT_EQ(r.verdict, nlohmann::json(0));
  ASSERT_TRUE(r.confidence.has_value());
  EXPECT_NEAR(*r.confidence, 0.7, 1e-5);
}

TEST_F(ClassifierTest, LabelVerdictSharingAFirstToken) {
  // "SP0" and "SP2" share their first token ("SP"): the second one decides.
  ClassifyPolicy policy{"sp", "Label the content SP0, SP2, SP3 or SP4.", {"SP0", "SP2", "SP3", "SP4"}, {"SP2", "SP3", "SP4"}};
  const auto sp2 = tokenizer().encode("SP2");
  ASSERT_EQ(sp2.size(), 2u);
  ASSERT_EQ(tokenizer().encode("SP0")[0], sp2[0]);
  const int32_t d0 = single_token("0"), d2 = single_token("2"), d3 = single_token("3"), d4 = single_token("4");
  const auto g = Generation()
                     .analysis("Unsolicited promotion.")
                     .final_header()
                     .sampled(sp2[0])
                     .sampled(d2, {{d2, std::log(0.5f)}, {d3, std::log(0.2f)}, {d0, std::log(0.1f)}, {d4, std::log(0.1f)},
                                   {single_token("5"), std::log(0.1f)}})
                     .end()
                     .done();
  const PolicyResult r = classifier_.interpret(policy, g, true);
  EXPECT_EQ(r.verdict, nlohmann::json("SP2"));
  EXPECT_TRUE(r.violation());
  EXPECT_EQ(r.verdict_details.at("label"), "SP2");
  ASSERT_TRUE(r.confidence.has_value());
  EXPECT_NEAR(*r.confidence, 0.5 / 0.9, 1e-5);

  // A non-violating label.
  const auto g0 = Generation().analysis("fine").final_header().sampled(sp2[0]).sampled(d0).end().done();
  const PolicyResult r0 = classifier_.interpret(policy, g0, true);
  EXPECT_EQ(r0.verdict, nlohmann::json("SP0"));
  EXPECT_FALSE(r0.violation());
}

TEST_F(ClassifierTest, LabelVerdictWithDistinctFirstTokensMatchesLabelConfidenceTop) {
  ClassifyPolicy policy{"v", "Answer VALID or INVALID.", {"VALID", "INVALID"}, {"INVALID"}};
  const int32_t valid = single_token("VALID"), invalid = single_token("INVALID");
  const std::vector<std::pair<int32_t, float>> top = {{invalid, std::log(0.6f)}, {valid, std::log(0.3f)}, {42, std::log(0.1f)}};
  const auto g = Generation().analysis("scam").final_header().sampled(invalid, top).end().done();
  const PolicyResult r = classifier_.interpret(policy, g, true);
  EXPECT_EQ(r.verdict, nlohmann::json("INVALID"));
  EXPECT_TRUE(r.violation());
  const Confidence expected = label_confidence_top(tokenizer(), top, policy.labels, "INVALID");
  ASSERT_TRUE(expected.ok);
  ASSERT_TRUE(r.confidence.has_value());
  EXPECT_NEAR(*r.confidence, expected.probability, 1e-6);
  EXPECT_NEAR(*r.confidence, 2.0 / 3.0, 1e-5);
}

TEST_F(ClassifierTest, LabelThatIsAPrefixOfAnotherIsDecidedByTheStopToken) {
  // "spam" is the first token of "spam-bot": choosing "spam" means stopping where "spam-bot" goes on.
  // "ok" parts at the first token: P = 0.9 / (0.9 + 0.1) there, times 0.6 / (0.6 + 0.3) at the stop.
  ClassifyPolicy policy{"b", "Answer spam, spam-bot or ok.", {"spam", "spam-bot", "ok"}, {"spam", "spam-bot"}};
  const int32_t spam = single_token("spam");
  const auto bot = tokenizer().encode("spam-bot");
  ASSERT_GT(bot.size(), 1u);
  ASSERT_EQ(bot[0], spam);
  Generation gen;
  gen.analysis("promo").final_header().sampled(spam, {{spam, std::log(0.9f)}, {single_token("ok"), std::log(0.1f)}});
  gen.sampled(kTokenReturn, {{kTokenReturn, std::log(0.6f)}, {bot[1], std::log(0.3f)}, {42, std::log(0.1f)}});
  const PolicyResult r = classifier_.interpret(policy, gen.done(), true);
  EXPECT_EQ(r.verdict, nlohmann::json("spam"));
  EXPECT_TRUE(r.violation());
  ASSERT_TRUE(r.confidence.has_value());
  EXPECT_NEAR(*r.confidence, 0.9 * (0.6 / 0.9), 1e-5);
}

TEST_F(ClassifierTest, UnexpectedLabelIsANullVerdict) {
  ClassifyPolicy policy{"v", "Answer VALID or INVALID.", {"VALID", "INVALID"}, {"INVALID"}};
  const auto g = Generation().analysis("hmm").final_header().text("PROBABLY VALID").end().done();
  const PolicyResult r = classifier_.interpret(policy, g, true);
  EXPECT_TRUE(r.verdict.is_null());
  EXPECT_FALSE(r.violation());
  EXPECT_NE(r.verdict_error.find("not one of"), std::string::npos) << r.verdict_error;
  EXPECT_EQ(r.final_text, "PROBABLY VALID");
  EXPECT_FALSE(r.confidence.has_value());
}

TEST_F(ClassifierTest, UnparseableAnswerIsANullVerdictWithTheRawText) {
  auto g = Generation().analysis("unsure").final_header().text("maybe spam?").end().done();
  PolicyResult r = classifier_.interpret(binary_policy(), g, true);
  EXPECT_TRUE(r.verdict.is_null());
  EXPECT_FALSE(r.verdict_error.empty());
  EXPECT_EQ(r.final_text, "maybe spam?");
  EXPECT_EQ(r.verdict_details.at("status"), "malformed");
  EXPECT_FALSE(r.confidence.has_value());
  // Broken JSON.
  g = Generation().analysis("x").final_header().text("{\"violation\": 2}").end().done();
  r = classifier_.interpret(binary_policy(), g, true);
  EXPECT_TRUE(r.verdict.is_null());
  EXPECT_NE(r.verdict_error.find("violation"), std::string::npos) << r.verdict_error;
  EXPECT_EQ(r.final_text, "{\"violation\": 2}");
}

TEST_F(ClassifierTest, CutOffBeforeTheAnswer) {
  const auto g = Generation().special("<|channel|>analysis<|message|>").text("still thinking").finish(FinishReason::kLength).done();
  const PolicyResult r = classifier_.interpret(binary_policy(), g, true);
  EXPECT_TRUE(r.verdict.is_null());
  EXPECT_EQ(r.finish, FinishReason::kLength);
  EXPECT_NE(r.verdict_error.find("no final answer"), std::string::npos) << r.verdict_error;
  EXPECT_NE(r.verdict_error.find("length"), std::string::npos) << r.verdict_error;
  EXPECT_EQ(r.reasoning, "still thinking");
  EXPECT_TRUE(r.final_text.empty());
}

TEST_F(ClassifierTest, ForcedCloseOfTheReasoningBudget) {
  const int32_t zero = single_token("0"), one = single_token("1");
  Generation gen;
  gen.special("<|channel|>analysis<|message|>").text("The budget runs out in the middle of");
  for (const int32_t id : classifier_.close_reasoning()) gen.forced_token(id);
  gen.sampled(zero, {{zero, std::log(0.55f)}, {one, std::log(0.45f)}}).end();
  const PolicyResult r = classifier_.interpret(binary_policy(), gen.done(), true);
  EXPECT_TRUE(r.reasoning_truncated);
  EXPECT_EQ(r.reasoning, "The budget runs out in the middle of");
  EXPECT_EQ(r.verdict, nlohmann::json(0));
  ASSERT_TRUE(r.confidence.has_value());
  EXPECT_NEAR(*r.confidence, 0.55, 1e-5);
}

TEST_F(ClassifierTest, AssembleSumsUsageFlagsAndTakesTheWorstFinish) {
  ClassifyRequest request;
  request.id = "r1";
  request.policies = {binary_policy(), {"other", "Answer 1 for hate, else 0.", {}, {}}};
  const auto a = Generation().analysis("a").final_header().text("0").end().usage(100, 80, 3).done();
  const auto b = Generation().analysis("b").final_header().text("1").end().usage(120, 96, 4).finish(FinishReason::kStop).done();
  ClassifyResult res = classifier_.assemble(request, {a, b});
  EXPECT_EQ(res.id, "r1");
  ASSERT_EQ(res.results.size(), 2u);
  EXPECT_EQ(res.results[0].policy_id, "spam");
  EXPECT_EQ(res.results[1].policy_id, "other");
  EXPECT_TRUE(res.flagged);
  EXPECT_EQ(res.results[0].usage.prompt_tokens, 100);
  EXPECT_EQ(res.results[0].usage.cached_tokens, 80);
  EXPECT_EQ(res.results[0].usage.reasoning_tokens, 3);
  EXPECT_EQ(res.results[0].usage.completion_tokens, static_cast<int>(a.tokens.size()));
  EXPECT_EQ(res.usage.prompt_tokens, 220);
  EXPECT_EQ(res.usage.cached_tokens, 176);
  EXPECT_EQ(res.usage.reasoning_tokens, 7);
  EXPECT_EQ(res.usage.completion_tokens, static_cast<int>(a.tokens.size() + b.tokens.size()));
  EXPECT_EQ(res.finish, FinishReason::kStop);

  const auto c = Generation().analysis("c").finish(FinishReason::kDeadline).done();
  res = classifier_.assemble(request, {a, c});
  EXPECT_FALSE(res.flagged);
  EXPECT_EQ(res.finish, FinishReason::kDeadline);
  EXPECT_EQ(res.results[1].finish, FinishReason::kDeadline);

  const nlohmann::json j = to_json(res);
  EXPECT_EQ(j.at("id"), "r1");
  EXPECT_EQ(j.at("object"), "classification");
  EXPECT_FALSE(j.at("flagged"));
  EXPECT_EQ(j.at("results")[1].at("finish_reason"), to_string(FinishReason::kDeadline));
  EXPECT_EQ(j.at("results")[0].at("final"), "0");
  EXPECT_EQ(j.at("results").size(), 2u);
  EXPECT_EQ(j.at("results")[0].at("verdict"), 0);
  EXPECT_TRUE(j.at("results")[1].at("verdict").is_null());
  EXPECT_EQ(j.at("usage").at("prompt_tokens"), 100);
  EXPECT_EQ(j.at("usage").at("total_tokens"), 100 + res.usage.completion_tokens);
}

TEST_F(ClassifierTest, SubmitRejectsARequestWithoutPolicies) {
  ClassifyRequest request;
  request.id = "empty";
  request.content = "x";
  std::string why;
  EXPECT_EQ(classifier_.submit(request, [](ClassifyResult) {}, &why), SubmitStatus::kInvalid);
  EXPECT_NE(why.find("no policies"), std::string::npos);
}

TEST_F(ClassifierTest, SubmitFansOutOneSequencePerPolicyAndReportsOnCancel) {
  ClassifyRequest request;
  request.id = "fan";
  request.content = "Buy cheap watches at example.com";
  request.policies = {binary_policy(), {"other", "Answer 1 for hate, else 0.", {}, {}}, {"third", "Answer 0.", {}, {}}};
  std::optional<ClassifyResult> got;
  std::string why;
  ASSERT_EQ(classifier_.submit(request, [&](ClassifyResult r) { got = std::move(r); }, &why), SubmitStatus::kAccepted) << why;
  const SchedulerStats stats = scheduler_.stats();
  EXPECT_TRUE(stats.queued_requests == 1 || stats.waiting_sequences + stats.running_sequences == 3);
  scheduler_.cancel("fan");
  scheduler_.plan_step();  // the step loop would: cancelled requests finish there
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->id, "fan");
  ASSERT_EQ(got->results.size(), 3u);
  EXPECT_EQ(got->results[2].policy_id, "third");
  EXPECT_EQ(got->finish, FinishReason::kCancelled);
  EXPECT_TRUE(got->results[0].verdict.is_null());
}

TEST_F(ClassifierTest, SubmitReportsEachPolicyBeforeTheRequest) {
  ClassifyRequest request;
  request.id = "each";
  request.content = "Buy cheap watches at example.com";
  request.policies = {binary_policy(), {"other", "Answer 1 for hate, else 0.", {}, {}}};
  std::vector<std::pair<size_t, PolicyResult>> each;
  bool done_seen = false, after_done = false;
  std::string why;
  ASSERT_EQ(classifier_.submit(
                request, [&](ClassifyResult) { done_seen = true; }, &why,
                [&](size_t index, const PolicyResult& r) {
                  after_done = after_done || done_seen;
                  each.emplace_back(index, r);
                }),
            SubmitStatus::kAccepted)
      << why;
  scheduler_.cancel("each");
  scheduler_.plan_step();
  EXPECT_TRUE(done_seen);
  EXPECT_FALSE(after_done);
  ASSERT_EQ(each.size(), 2u);
  std::set<size_t> indices;
  for (const auto& [index, r] : each) {
    indices.insert(index);
    EXPECT_EQ(r.policy_id, request.policies[index].id);
    EXPECT_EQ(r.finish, FinishReason::kCancelled);
  }
  EXPECT_EQ(indices, (std::set<size_t>{0, 1}));
}

}  // namespace
}  // namespace arbiter
