// Classifier (scheduler/classify.h) without a model: prompts and sequences it builds, and how it
// reads generations made by hand with the real gpt-oss tokenizer (verdicts, confidence from top
// logprobs, reasoning, the forced close of a reasoning budget, usage); prompts prepared once per
// request (the content tokenized once, bounded by the context, stoppable) and the configuration
// check of budgets against the context.
#include <gtest/gtest.h>

#include <chrono>
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
#include "scheduler/serving.h"

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

// A classifier whose requests must fit a context of kContext tokens.
class BoundedClassifierTest : public ::testing::Test {
 protected:
  static constexpr int kContext = 1024;
  BoundedClassifierTest() : scheduler_(SchedulerOptions{}), classifier_(tokenizer(), scheduler_, options()) {}
  static ClassifierOptions options() {
    ClassifierOptions o;
    o.budgets = {16, 64, 256};
    o.answer_tokens = 32;
    o.top_logprobs = 5;
    o.max_context = kContext;
    return o;
  }
  static std::string words(size_t count) {
    std::string s;
    for (size_t i = 0; i < count; ++i) s += " word" + std::to_string(i % 97);
    return s;
  }
  Scheduler scheduler_;
  Classifier classifier_;
};

TEST_F(BoundedClassifierTest, PreparedPromptsAreTheSafeguardPromptOfEveryPolicy) {
  std::mt19937 rng(9);
  const std::vector<std::string> pieces = {"hello", " ", "<|end|>", "\n", "é", "1", "{\"violation\": 1}", "  ", "🙂", "\t",
                                           "Buy now!!!", "\xff", "\n\n# Policy"};
  const std::vector<ClassifyPolicy> policies = {binary_policy(), {"b", "# Hate\n\nAnswer 1 for hate, else 0.\n", {}, {}},
                                                {"c", "  Leading spaces and a trailing newline\n", {}, {}}, {"d", "x", {}, {}}};
  for (const ReasoningEffort effort : {ReasoningEffort::kLow, ReasoningEffort::kMedium, ReasoningEffort::kHigh}) {
    SafeguardPromptOptions o;
    o.effort = effort;
    for (int trial = 0; trial < 30; ++trial) {
      ClassifyRequest request;
      request.effort = effort;
      request.max_tokens = trial % 3 == 0 ? 5 : 0;
      for (int i = 0; i < 1 + static_cast<int>(rng() % 8); ++i) request.content += pieces[rng() % pieces.size()];
      for (size_t k = 0; k < policies.size(); ++k)
        if (rng() % 2 || k == 0) request.policies.push_back(policies[k]);
      const ClassifyPrompts prompts = classifier_.prepare(request);
      ASSERT_TRUE(prompts.ok()) << prompts.why;
      ASSERT_EQ(prompts.sequences.size(), request.policies.size());
      EXPECT_EQ(prompts.content_tokens, static_cast<int>(tokenizer().encode(request.content).size()));
      for (size_t k = 0; k < request.policies.size(); ++k) {
        const SequenceSpec& s = prompts.sequences[k];
        EXPECT_EQ(s.prompt, render_safeguard_prompt(tokenizer(), request.policies[k].text, request.content, o)) << request.content;
        const SequenceSpec one = classifier_.sequence(request, request.policies[k]);
        EXPECT_EQ(s.prompt, one.prompt);
        EXPECT_EQ(s.max_new_tokens, one.max_new_tokens);
        EXPECT_EQ(s.max_reasoning_tokens, one.max_reasoning_tokens);
        EXPECT_EQ(s.close_reasoning, one.close_reasoning);
        EXPECT_EQ(s.top_logprobs, one.top_logprobs);
      }
    }
  }
}

TEST_F(BoundedClassifierTest, BoundedPrefixIsThePolicyPrefixOrStopsOverItsLimit) {
  std::mt19937 rng(4);
  for (int trial = 0; trial < 60; ++trial) {
    const std::string text = "Policy " + std::to_string(trial) + "." + words(rng() % 300);
    const ReasoningEffort effort = static_cast<ReasoningEffort>(trial % 3);
    // A fresh classifier each time: nothing cached, the bounded path tokenizes.
    Classifier fresh(tokenizer(), scheduler_, options());
    EncodeBounds bounds;
    bounds.max_tokens = 40 + rng() % 400;
    std::vector<int32_t> bounded;
    const EncodeEnd end = fresh.bounded_prefix(text, effort, bounds, bounded);
    const std::vector<int32_t> whole = classifier_.policy_prefix(text, effort);
    if (whole.size() <= bounds.max_tokens) {
      ASSERT_EQ(end, EncodeEnd::kComplete);
      EXPECT_EQ(bounded, whole);
    } else {
      EXPECT_EQ(end, EncodeEnd::kOverLimit);
    }
  }
}

TEST_F(BoundedClassifierTest, PolicyFitHasTheNumbers) {
  const int suffix = classifier_.suffix_tokens();
  EXPECT_EQ(suffix, 3);
  // Low effort: 16 reasoning + 6 closing + 32 answer tokens.
  EXPECT_EQ(classifier_.generation_tokens(ReasoningEffort::kLow), 16 + 6 + 32);
  EXPECT_EQ(classifier_.generation_tokens(ReasoningEffort::kHigh, 9), 9);
  const std::string small = binary_policy().text;
  PolicyFit fit = classifier_.policy_fit(small, ReasoningEffort::kHigh);
  EXPECT_TRUE(fit.fits);
  EXPECT_TRUE(fit.exact);
  EXPECT_EQ(fit.prompt_tokens, static_cast<int>(classifier_.policy_prefix(small, ReasoningEffort::kHigh).size()) + suffix);
  EXPECT_EQ(fit.generation_tokens, 256 + 6 + 32);

  // A policy of 200,000 words: tokenized only as far as it could fit, and quickly.
  const std::string huge = words(200000);
  const auto t0 = std::chrono::steady_clock::now();
  fit = classifier_.policy_fit_any(huge);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 0.5);
  EXPECT_FALSE(fit.fits);
  EXPECT_FALSE(fit.exact);
  EXPECT_EQ(fit.effort, ReasoningEffort::kLow);
  EXPECT_EQ(fit.generation_tokens, 54);
  EXPECT_EQ(fit.prompt_tokens, kContext - 54 - 1 + 1);  // one more token than could fit
  const std::string message = fit.describe();
  EXPECT_NE(message.find("at least " + std::to_string(fit.prompt_tokens) + " tokens"), std::string::npos) << message;
  EXPECT_NE(message.find("54 tokens for the reasoning and the answer"), std::string::npos) << message;
  EXPECT_NE(message.find("the context is 1024 tokens"), std::string::npos) << message;

  // Right at the edge: a policy whose prompt leaves exactly one content token fits at low effort,
  // one token more does not.
  std::string edge = "x";
  while (classifier_.policy_fit(edge, ReasoningEffort::kLow).prompt_tokens + 1 + 54 < kContext) edge += " y";
  fit = classifier_.policy_fit(edge, ReasoningEffort::kLow);
  EXPECT_TRUE(fit.fits) << fit.describe();
  EXPECT_EQ(fit.prompt_tokens + 1 + 54, kContext);
  EXPECT_FALSE(classifier_.policy_fit(edge, ReasoningEffort::kMedium).fits);
  EXPECT_FALSE(classifier_.policy_fit(edge + " y", ReasoningEffort::kLow).fits);
  EXPECT_EQ(classifier_.policy_fit_any(edge).effort, ReasoningEffort::kLow);
}

TEST_F(BoundedClassifierTest, PrepareRefusesWhatCannotFitBeforeAnyScheduling) {
  ClassifyRequest request;
  request.effort = ReasoningEffort::kLow;
  request.content = "hello";
  request.policies = {binary_policy(), {"long", words(5000), {}, {}}};
  ClassifyPrompts prompts = classifier_.prepare(request);
  EXPECT_EQ(prompts.status, PromptStatus::kPolicyTooLong);
  EXPECT_EQ(prompts.policy, 1);
  EXPECT_NE(prompts.why.find("the context is 1024 tokens"), std::string::npos) << prompts.why;
  std::string why;
  EXPECT_EQ(classifier_.submit(request, [](ClassifyResult) {}, &why), SubmitStatus::kTooLong);
  EXPECT_EQ(scheduler_.stats().queued_requests, 0);

  // 4 MB of content under 32 policies: the content is tokenized once, only as far as it can fit.
  request.policies.clear();
  for (int i = 0; i < 32; ++i) request.policies.push_back({"p" + std::to_string(i), "Policy " + std::to_string(i) + ". Answer 0 or 1.", {}, {}});
  request.content = words(600000);
  int polls = 0;
  request.cancelled = [&] { return ++polls < 0; };
  const auto t0 = std::chrono::steady_clock::now();
  prompts = classifier_.prepare(request);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 0.5);
  EXPECT_EQ(prompts.status, PromptStatus::kContentTooLong);
  EXPECT_NE(prompts.why.find("The content takes more than"), std::string::npos) << prompts.why;
  EXPECT_NE(prompts.why.find("1024 tokens"), std::string::npos) << prompts.why;
  EXPECT_LT(polls, 100);  // once per policy, then every 64 KB of the content read

  // Unbounded by the context, the content is still read once, not once per policy.
  ClassifierOptions unbounded = options();
  unbounded.max_context = 0;
  Classifier open(tokenizer(), scheduler_, unbounded);
  request.content = words(100000);
  polls = 0;
  prompts = open.prepare(request);
  ASSERT_TRUE(prompts.ok()) << prompts.why;
  EXPECT_EQ(prompts.content_tokens, static_cast<int>(tokenizer().encode(request.content).size()));
  EXPECT_LT(polls, 32 + static_cast<int>(request.content.size() / (64 * 1024)) + 8);

  // A deadline that passed, a client that left: stopped, with nothing scheduled.
  request.cancelled = nullptr;
  request.deadline = std::chrono::steady_clock::now() - std::chrono::milliseconds(1);
  prompts = open.prepare(request);
  EXPECT_EQ(prompts.status, PromptStatus::kDeadline);
  EXPECT_TRUE(prompts.sequences.empty());
  request.deadline.reset();
  polls = 0;
  request.cancelled = [&] { return ++polls > 5; };  // the client leaves during the content (prefixes are cached)
  prompts = open.prepare(request);
  EXPECT_EQ(prompts.status, PromptStatus::kCancelled);
  EXPECT_EQ(polls, 6);
  EXPECT_EQ(classifier_.submit(request, [](ClassifyResult) {}, &why), SubmitStatus::kInvalid);
  EXPECT_EQ(scheduler_.stats().queued_requests, 0);
}

TEST(ClassifierOptionsCheck, EveryEffortMustLeaveRoomForAPrompt) {
  ClassifierOptions o;  // the defaults: budgets 256 / 1024 / 4096, 256 answer tokens
  o.max_context = 4096;
  try {
    check_classifier_options(tokenizer(), o);
    FAIL() << "high effort's budget fills a 4096 context";
  } catch (const std::invalid_argument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("'high'"), std::string::npos) << m;
    EXPECT_NE(m.find("(4096)"), std::string::npos) << m;
    EXPECT_NE(m.find("4358 generated tokens"), std::string::npos) << m;
    EXPECT_NE(m.find("max context of 4096"), std::string::npos) << m;
  }
  o.max_context = 8192;  // the serving default
  EXPECT_NO_THROW(check_classifier_options(tokenizer(), o));
  o.max_context = 0;  // unchecked
  EXPECT_NO_THROW(check_classifier_options(tokenizer(), o));
  o.max_context = 512;
  o.budgets = {16, 64, 128};
  EXPECT_NO_THROW(check_classifier_options(tokenizer(), o));
  o.answer_tokens = 400;
  EXPECT_THROW(check_classifier_options(tokenizer(), o), std::invalid_argument);
  o.answer_tokens = 0;
  EXPECT_THROW(check_classifier_options(tokenizer(), o), std::invalid_argument);
  o.answer_tokens = 32;
  o.budgets.low = -1;
  EXPECT_THROW(check_classifier_options(tokenizer(), o), std::invalid_argument);
  // The serving defaults agree with each other: every effort leaves room for a prompt.
  ServingOptions serving;
  serving.classifier.max_context = serving.max_context;
  EXPECT_EQ(serving.max_context, 8192);
  EXPECT_NO_THROW(check_classifier_options(tokenizer(), serving.classifier));
  // The Classifier itself refuses a contradicting configuration.
  Scheduler scheduler{SchedulerOptions{}};
  ClassifierOptions bad;
  bad.max_context = 4096;
  EXPECT_THROW(Classifier(tokenizer(), scheduler, bad), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Score mode (verdict-only): the plans of answers and the results read off candidate log-probabilities.

// One score sequence's generation: one sampled token carrying the candidates' log-probabilities.
SequenceResult scored(const std::vector<std::pair<int32_t, float>>& candidates, int prompt_tokens = 0, int cached = 0) {
  SequenceResult r;
  r.finish = FinishReason::kLength;
  r.prompt_tokens = prompt_tokens;
  r.cached_tokens = cached;
  GeneratedToken g;
  g.token = candidates.at(0).first;
  for (const auto& [t, lp] : candidates) {
    proto::TokenLogprob c;
    c.set_token(t);
    c.set_logprob(lp);
    g.candidates.push_back(c);
  }
  r.tokens.push_back(g);
  return r;
}

std::vector<const SequenceResult*> pointers(const std::vector<SequenceResult>& v) {
  std::vector<const SequenceResult*> out;
  for (const auto& r : v) out.push_back(&r);
  return out;
}

TEST_F(ClassifierTest, ScorePrefixesOpenTheFinalChannel) {
  EXPECT_EQ(classifier_.score_prefix_tokens(ScorePrefix::kEmptyAnalysis),
            tokenizer().encode_with_specials("<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>"));
  EXPECT_EQ(classifier_.score_prefix_tokens(ScorePrefix::kDirect), tokenizer().encode_with_specials("<|channel|>final<|message|>"));
}

TEST_F(ClassifierTest, ScorePlanOfABinaryPolicyIsOnePositionWeighingZeroAndOne) {
  const ScorePlan plan = classifier_.score_plan(binary_policy(), ScorePrefix::kDirect);
  EXPECT_EQ(plan.format, AnswerFormat::kBinary);
  EXPECT_EQ(plan.answers, (std::vector<std::string>{"0", "1"}));
  ASSERT_EQ(plan.nodes.size(), 1u);
  EXPECT_TRUE(plan.nodes[0].path.empty());
  EXPECT_EQ(plan.nodes[0].candidates, (std::vector<int32_t>{15, 16}));
  EXPECT_EQ(plan.generation_tokens(), 4);  // <|channel|> final <|message|> + the one read
}

TEST_F(ClassifierTest, ScorePlanOfAJsonPolicyForcesTheKeyAndWeighsTheValue) {
  const ClassifyPolicy policy{"j", "Answer {\"violation\": 0 or 1, \"rationale\": \"...\"}", {}, {}};
  const ScorePlan plan = classifier_.score_plan(policy, ScorePrefix::kEmptyAnalysis);
  EXPECT_EQ(plan.format, AnswerFormat::kJson);
  ASSERT_EQ(plan.nodes.size(), 1u);
  // The shared start is exactly how a written answer tokenizes up to the value.
  const auto whole = tokenizer().encode("{\"violation\": 1, \"rationale\": \"x\"}");
  ASSERT_GT(whole.size(), plan.nodes[0].path.size());
  EXPECT_TRUE(std::equal(plan.nodes[0].path.begin(), plan.nodes[0].path.end(), whole.begin()));
  EXPECT_EQ(whole[plan.nodes[0].path.size()], 16);
  EXPECT_EQ(tokenizer().decode(plan.nodes[0].path), "{\"violation\": ");
  EXPECT_EQ(plan.nodes[0].candidates, (std::vector<int32_t>{15, 16}));
  // An explicit format wins over the guess.
  ClassifyPolicy binary = policy;
  binary.format = AnswerFormat::kBinary;
  EXPECT_EQ(classifier_.score_plan(binary, ScorePrefix::kDirect).format, AnswerFormat::kBinary);
}

TEST_F(ClassifierTest, ScorePlanTellsLabelsWithASharedStartApartWhereTheyPartWays) {
  const ClassifyPolicy policy{"l", "Label it.", {"SPAM_LOW", "SPAM_HIGH", "OK", "spam", "spam-bot"}, {"SPAM_HIGH"}};
  const ScorePlan plan = classifier_.score_plan(policy, ScorePrefix::kDirect);
  EXPECT_EQ(plan.format, AnswerFormat::kLabels);
  ASSERT_EQ(tokenizer().encode("SPAM_LOW")[0], tokenizer().encode("SPAM_HIGH")[0]);
  ASSERT_EQ(tokenizer().encode("spam-bot")[0], tokenizer().encode("spam")[0]);
  // The root weighs the distinct first tokens (SPAM, OK, spam); then SPAM... parts at its second
  // token and spam / spam-bot at <|return|> against "-bot"'s first token.
  ASSERT_EQ(plan.nodes.size(), 3u);
  EXPECT_TRUE(plan.nodes[0].path.empty());
  EXPECT_EQ(plan.nodes[0].candidates.size(), 3u);
  for (size_t n = 1; n < 3; ++n) {
    EXPECT_EQ(plan.nodes[n].candidates.size(), 2u);
    EXPECT_FALSE(plan.nodes[n].path.empty());
  }
  const auto spam = tokenizer().encode("spam");
  bool stop_weighed = false;
  for (const auto& node : plan.nodes)
    if (node.path == spam) stop_weighed = std::find(node.candidates.begin(), node.candidates.end(), kTokenReturn) != node.candidates.end();
  EXPECT_TRUE(stop_weighed);
  // "OK" is decided at the root alone; SPAM_LOW needs the root and its own node.
  EXPECT_EQ(plan.steps[2].size(), 1u);
  EXPECT_EQ(plan.steps[0].size(), 2u);
}

TEST_F(ClassifierTest, ScoreResultRenormalisesOverTheAllowedAnswers) {
  // Binary: log-probabilities of "0" and "1" of -2 and -0.5 (most of the mass elsewhere is ignored).
  const ScorePlan plan = classifier_.score_plan(binary_policy(), ScorePrefix::kEmptyAnalysis);
  ASSERT_EQ(plan.forced.size(), 9u);  // <|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>
  const std::vector<SequenceResult> gen = {scored({{15, -2.0f}, {16, -0.5f}}, 100 + 9, 64)};
  const PolicyResult r = classifier_.score_result(binary_policy(), plan, pointers(gen));
  const double p1 = std::exp(-0.5) / (std::exp(-0.5) + std::exp(-2.0));
  EXPECT_EQ(r.verdict, 1);
  ASSERT_TRUE(r.confidence.has_value());
  EXPECT_NEAR(*r.confidence, p1, 1e-6);
  EXPECT_NEAR(r.scores.at("1"), p1, 1e-6);
  EXPECT_NEAR(r.scores.at("0"), 1 - p1, 1e-6);
  EXPECT_TRUE(r.violation());
  EXPECT_EQ(r.finish, FinishReason::kStop);
  EXPECT_TRUE(r.reasoning.empty());
  EXPECT_EQ(r.usage.prompt_tokens, 100);
  EXPECT_EQ(r.usage.forced_tokens, 9);
  EXPECT_EQ(r.usage.completion_tokens, 1);
  EXPECT_EQ(r.usage.cached_tokens, 64);
  EXPECT_EQ(to_json(r).at("scores").size(), 2u);
  EXPECT_EQ(to_json(r.usage).at("total_tokens"), 110);
}

TEST_F(ClassifierTest, ScoreResultMultipliesAlongLabelsThatShareAStart) {
  const ClassifyPolicy policy{"l", "Label it.", {"SPAM_LOW", "SPAM_HIGH", "OK"}, {"SPAM_HIGH"}};
  const ScorePlan plan = classifier_.score_plan(policy, ScorePrefix::kDirect);
  ASSERT_EQ(plan.nodes.size(), 2u);
  // Root: SPAM vs OK at log-probabilities log .6 / log .2 (renormalised: .75 / .25); then LOW vs
  // HIGH at log .1 / log .3 (.25 / .75).
  const auto& root = plan.nodes[0].candidates;
  const auto& second = plan.nodes[1].candidates;
  auto lp_root = [&](int32_t t) { return t == tokenizer().encode("OK")[0] ? std::log(0.2f) : std::log(0.6f); };
  // SPAM_LOW and SPAM_HIGH part ways right after the second node's path.
  const int32_t low = tokenizer().encode("SPAM_LOW").at(plan.nodes[1].path.size());
  auto lp_second = [&](int32_t t) { return t == low ? std::log(0.1f) : std::log(0.3f); };
  const std::vector<SequenceResult> gen = {scored({{root[0], lp_root(root[0])}, {root[1], lp_root(root[1])}}),
                                           scored({{second[0], lp_second(second[0])}, {second[1], lp_second(second[1])}})};
  const PolicyResult r = classifier_.score_result(policy, plan, pointers(gen));
  EXPECT_NEAR(r.scores.at("OK"), 0.25, 1e-6);
  EXPECT_NEAR(r.scores.at("SPAM_LOW"), 0.75 * 0.25, 1e-6);
  EXPECT_NEAR(r.scores.at("SPAM_HIGH"), 0.75 * 0.75, 1e-6);
  EXPECT_EQ(r.verdict, "SPAM_HIGH");
  EXPECT_NEAR(*r.confidence, 0.5625, 1e-6);
  EXPECT_TRUE(r.violation());
  EXPECT_EQ(r.usage.completion_tokens, 2);
  EXPECT_EQ(r.usage.forced_tokens, static_cast<int>(2 * plan.forced.size() + plan.nodes[1].path.size()));
}

TEST_F(ClassifierTest, ScoreResultOfAnUnfinishedSequenceIsANullVerdict) {
  const ScorePlan plan = classifier_.score_plan(binary_policy(), ScorePrefix::kDirect);
  SequenceResult cut;
  cut.finish = FinishReason::kDeadline;
  const PolicyResult r = classifier_.score_result(binary_policy(), plan, {&cut});
  EXPECT_TRUE(r.verdict.is_null());
  EXPECT_EQ(r.finish, FinishReason::kDeadline);
  EXPECT_TRUE(r.scores.empty());
  EXPECT_FALSE(r.verdict_error.empty());
}

TEST_F(ClassifierTest, ScoreModeSubmitsOneSequencePerPositionRead) {
  ClassifyRequest request;
  request.id = "score";
  request.content = "Buy cheap watches at example.com";
  request.mode = ClassifyMode::kScore;
  request.policies = {binary_policy(), {"l", "Label it.", {"SPAM_LOW", "SPAM_HIGH", "OK"}, {}}};
  const ClassifyPrompts prompts = classifier_.prepare(request);
  ASSERT_TRUE(prompts.ok()) << prompts.why;
  ASSERT_EQ(prompts.sequences.size(), 3u);
  EXPECT_EQ(prompts.first_sequence, (std::vector<size_t>{0, 1, 3}));
  const auto base = classifier_.render(request.policies[0], request.content, request.effort);
  const auto forced = classifier_.score_prefix_tokens(ScorePrefix::kEmptyAnalysis);
  std::vector<int32_t> want = base;
  want.insert(want.end(), forced.begin(), forced.end());
  EXPECT_EQ(prompts.sequences[0].prompt, want);
  EXPECT_EQ(prompts.sequences[0].max_new_tokens, 1);
  EXPECT_EQ(prompts.sequences[0].candidate_tokens, (std::vector<int32_t>{15, 16}));
  EXPECT_TRUE(prompts.sequences[0].candidates_only);
  EXPECT_TRUE(prompts.sequences[0].close_reasoning.empty() || prompts.sequences[0].max_reasoning_tokens < 0);
  std::optional<ClassifyResult> got;
  std::vector<size_t> early;
  std::string why;
  ASSERT_EQ(classifier_.submit(request, [&](ClassifyResult r) { got = std::move(r); }, &why,
                               [&](size_t index, const PolicyResult&) { early.push_back(index); }),
            SubmitStatus::kAccepted)
      << why;
  scheduler_.cancel("score");
  scheduler_.plan_step();
  ASSERT_TRUE(got.has_value());
  ASSERT_EQ(got->results.size(), 2u);
  EXPECT_EQ(got->results[1].policy_id, "l");
  EXPECT_EQ(got->finish, FinishReason::kCancelled);
  std::sort(early.begin(), early.end());
  EXPECT_EQ(early, (std::vector<size_t>{0, 1}));  // each policy once, when its last sequence ended
}

}  // namespace
}  // namespace arbiter
