// The cascade (pipeline/cascade.h) over a scripted generation source: routing at every threshold
// edge, escalation of violations, per-request overrides, stage accounting, lock-step and batched
// escalations, refusals, cancellation, and the offline routing (decide_on_trace) against the live one.
#include "pipeline/cascade.h"

#include <gtest/gtest.h>

#include <deque>
#include <random>

namespace arbiter {
namespace {

// What a scripted stage answers for one policy.
struct Scripted {
  nlohmann::json verdict;  // 0/1 or a label; null: no verdict
  double confidence = 0.5;
  FinishReason finish = FinishReason::kStop;
};

Stage stage_of(const ClassifyRequest& r) {
  if (r.mode == ClassifyMode::kScore) return Stage::kScore;
  if (r.effort == ReasoningEffort::kLow) return Stage::kLow;
  if (r.effort == ReasoningEffort::kMedium) return Stage::kMedium;
  return Stage::kHigh;
}

// ModelStages that answer from a script: (stage, policy id) -> Scripted. Submissions are queued
// until step() answers every one queued so far (one "scheduler step"), or answered at once when
// `immediate`.
class ScriptedStages : public ModelStages {
 public:
  std::map<std::pair<Stage, std::string>, Scripted> script;
  bool immediate = false;
  std::optional<SubmitStatus> refuse;           // answer every submission with this
  std::optional<Stage> refuse_stage;            // ... or only this stage's
  std::vector<ClassifyRequest> submitted;       // every submission, in order
  std::vector<std::string> cancelled;

  SubmitStatus submit(const ClassifyRequest& request, std::function<void(ClassifyResult)> done, std::string* why) override {
    if (refuse && (!refuse_stage || *refuse_stage == stage_of(request))) {
      if (why) *why = "refused by the script";
      return *refuse;
    }
    submitted.push_back(request);
    if (immediate) {
      done(answer(request, false));
      return SubmitStatus::kAccepted;
    }
    pending.emplace_back(request, std::move(done));
    return SubmitStatus::kAccepted;
  }
  void cancel(const std::string& id) override {
    cancelled.push_back(id);
    for (auto& p : pending)
      if (p.first.id == id) p.first.id = "(cancelled)" + id;
  }
  // Answers everything queued before this call; returns how many requests it answered.
  size_t step() {
    std::deque<std::pair<ClassifyRequest, std::function<void(ClassifyResult)>>> now;
    now.swap(pending);
    for (auto& [request, done] : now) {
      const bool was_cancelled = request.id.rfind("(cancelled)", 0) == 0;
      if (was_cancelled) request.id = request.id.substr(11);
      done(answer(request, was_cancelled));
    }
    return now.size();
  }
  size_t queued() const { return pending.size(); }

 private:
  ClassifyResult answer(const ClassifyRequest& request, bool was_cancelled) {
    ClassifyResult out;
    out.id = request.id;
    const Stage stage = stage_of(request);
    for (const auto& p : request.policies) {
      PolicyResult r;
      r.policy_id = p.id;
      const auto it = script.find({stage, p.id});
      const Scripted s = it == script.end() ? Scripted{} : it->second;
      r.verdict = was_cancelled ? nlohmann::json(nullptr) : s.verdict;
      r.finish = was_cancelled ? FinishReason::kCancelled : s.finish;
      if (!r.verdict.is_null()) {
        const bool v = r.verdict.is_number_integer() ? r.verdict.get<int>() == 1
                                                     : std::find(p.violating_labels.begin(), p.violating_labels.end(),
                                                                 r.verdict.get<std::string>()) != p.violating_labels.end();
        r.verdict_details = {{"violation", v ? 1 : 0}};
        r.confidence = s.confidence;
      }
      // Distinct, recognisable costs per stage: score 1 completion token, low 10 reasoning, high 100.
      r.usage.prompt_tokens = 50;
      r.usage.cached_tokens = 40;
      r.usage.completion_tokens = stage == Stage::kScore ? 1 : stage == Stage::kLow ? 12 : stage == Stage::kMedium ? 52 : 102;
      r.usage.reasoning_tokens = stage == Stage::kScore ? 0 : r.usage.completion_tokens - 2;
      out.results.push_back(r);
    }
    return out;
  }
  std::deque<std::pair<ClassifyRequest, std::function<void(ClassifyResult)>>> pending;
};

CascadeRequest request_for(const std::string& id, std::vector<std::string> policies, const CascadeConfig& config) {
  CascadeRequest r;
  r.base.id = id;
  r.base.content = "some content";
  for (auto& p : policies) {
    CascadePolicy cp;
    cp.policy.id = p;
    cp.policy.text = "policy " + p;
    cp.config = config;
    r.policies.push_back(cp);
  }
  return r;
}

// Runs one request to the end with the scripted stages answering at once.
CascadeResult run_one(ScriptedStages& stages, CascadeRequest request) {
  Cascade cascade(stages);
  std::optional<CascadeResult> out;
  std::string why;
  EXPECT_EQ(cascade.submit(std::move(request), [&](CascadeResult r) { out = std::move(r); }, &why), SubmitStatus::kAccepted) << why;
  while (!out && stages.step() > 0) {
  }
  EXPECT_TRUE(out.has_value());
  EXPECT_EQ(cascade.in_flight(), 0u);
  return out.value_or(CascadeResult{});
}

std::vector<Stage> stages_ran(const CascadePolicyResult& r) {
  std::vector<Stage> out;
  for (const auto& s : r.stages) out.push_back(s.stage);
  return out;
}

TEST(CascadeRouting, ThresholdEdgesDecideAtOrAbove) {
  CascadeConfig config;  // score (0.9) -> low (0.8) -> high
  for (const double delta : {0.0, 1e-9, -1e-9, -0.2}) {
    ScriptedStages stages;
    stages.script[{Stage::kScore, "p"}] = {0, 0.9 + delta};
    stages.script[{Stage::kLow, "p"}] = {0, 0.8 + delta};
    stages.script[{Stage::kHigh, "p"}] = {1, 0.51};
    const CascadeResult r = run_one(stages, request_for("edge", {"p"}, config));
    ASSERT_EQ(r.policies.size(), 1u);
    const auto& p = r.policies[0];
    if (delta >= 0) {
      EXPECT_EQ(p.decided_by, Stage::kScore) << delta;
      EXPECT_EQ(stages_ran(p), (std::vector<Stage>{Stage::kScore}));
      EXPECT_EQ(p.result.verdict, 0);
    } else {
      // Below both thresholds: score and low pass it on, high (the last stage) decides whatever its confidence.
      EXPECT_EQ(p.decided_by, Stage::kHigh) << delta;
      EXPECT_EQ(stages_ran(p), (std::vector<Stage>{Stage::kScore, Stage::kLow, Stage::kHigh}));
      EXPECT_EQ(p.result.verdict, 1);
      EXPECT_TRUE(r.result.flagged);
    }
  }
}

TEST(CascadeRouting, LowDecidesBetweenScoreAndHigh) {
  ScriptedStages stages;
  stages.script[{Stage::kScore, "p"}] = {1, 0.6};
  stages.script[{Stage::kLow, "p"}] = {0, 0.95};
  const CascadeResult r = run_one(stages, request_for("low", {"p"}, CascadeConfig{}));
  EXPECT_EQ(r.policies[0].decided_by, Stage::kLow);
  EXPECT_EQ(r.policies[0].result.verdict, 0);
  EXPECT_FALSE(r.result.flagged);
  // Usage: every stage that ran is paid for.
  EXPECT_EQ(r.policies[0].result.usage.completion_tokens, 1 + 12);
  EXPECT_EQ(r.policies[0].result.usage.prompt_tokens, 100);
  EXPECT_EQ(r.result.usage.completion_tokens, 13);
  EXPECT_EQ(r.policies[0].stages[0].usage.completion_tokens, 1);
  EXPECT_EQ(r.policies[0].stages[1].usage.reasoning_tokens, 10);
}

TEST(CascadeRouting, ViolationsGoStraightToHighWhenAsked) {
  CascadeConfig config;
  config.escalate_violations = true;
  ScriptedStages stages;
  stages.script[{Stage::kScore, "p"}] = {1, 0.99};  // a sure violation: not final, and low is skipped
  stages.script[{Stage::kHigh, "p"}] = {0, 0.7};
  const CascadeResult r = run_one(stages, request_for("esc", {"p"}, config));
  EXPECT_EQ(stages_ran(r.policies[0]), (std::vector<Stage>{Stage::kScore, Stage::kHigh}));
  EXPECT_EQ(r.policies[0].decided_by, Stage::kHigh);
  EXPECT_EQ(r.policies[0].result.verdict, 0);
  // A sure non-violation still ends at score.
  ScriptedStages clean;
  clean.script[{Stage::kScore, "p"}] = {0, 0.99};
  EXPECT_EQ(run_one(clean, request_for("esc2", {"p"}, config)).policies[0].decided_by, Stage::kScore);
}

TEST(CascadeRouting, NoVerdictEscalatesAndTheLastStageWithoutOneLeavesNull) {
  ScriptedStages stages;
  stages.script[{Stage::kScore, "p"}] = {nullptr, 0};
  stages.script[{Stage::kLow, "p"}] = {nullptr, 0, FinishReason::kLength};
  stages.script[{Stage::kHigh, "p"}] = {nullptr, 0, FinishReason::kLength};
  const CascadeResult r = run_one(stages, request_for("null", {"p"}, CascadeConfig{}));
  EXPECT_EQ(stages_ran(r.policies[0]).size(), 3u);
  EXPECT_FALSE(r.policies[0].decided_by.has_value());
  EXPECT_TRUE(r.policies[0].result.verdict.is_null());
  EXPECT_EQ(r.policies[0].result.finish, FinishReason::kLength);
}

TEST(CascadeRouting, LabelsAndBudgetsReachTheStages) {
  CascadeConfig config = parse_cascade({{"stages", {"score", "low", "high"}}, {"budgets", {{"low", 64}, {"high", 512}}}});
  auto request = request_for("labels", {"tier"}, config);
  request.policies[0].policy.labels = {"OK", "SPAM"};
  request.policies[0].policy.violating_labels = {"SPAM"};
  ScriptedStages stages;
  stages.script[{Stage::kScore, "tier"}] = {"SPAM", 0.5};
  stages.script[{Stage::kLow, "tier"}] = {"SPAM", 0.5};
  stages.script[{Stage::kHigh, "tier"}] = {"SPAM", 0.9};
  const CascadeResult r = run_one(stages, request);
  EXPECT_EQ(r.policies[0].result.verdict, "SPAM");
  EXPECT_TRUE(r.result.flagged);
  ASSERT_EQ(stages.submitted.size(), 3u);
  EXPECT_EQ(stages.submitted[0].mode, ClassifyMode::kScore);
  EXPECT_EQ(stages.submitted[0].effort, ReasoningEffort::kLow);  // score shares low's cached prefix
  EXPECT_EQ(stages.submitted[1].reasoning_budget, 64);
  EXPECT_EQ(stages.submitted[1].effort, ReasoningEffort::kLow);
  EXPECT_EQ(stages.submitted[2].reasoning_budget, 512);
  EXPECT_EQ(stages.submitted[2].effort, ReasoningEffort::kHigh);
  EXPECT_FALSE(stages.submitted[0].continuation);
  EXPECT_TRUE(stages.submitted[1].continuation);  // admitted once: later stages are not refused for a full queue
}

TEST(CascadeRouting, PoliciesMoveInLockStepAndOnlyTheUndecidedEscalate) {
  ScriptedStages stages;
  stages.script[{Stage::kScore, "sure"}] = {0, 0.99};
  stages.script[{Stage::kScore, "unsure"}] = {1, 0.6};
  stages.script[{Stage::kLow, "unsure"}] = {1, 0.95};
  const CascadeResult r = run_one(stages, request_for("two", {"sure", "unsure"}, CascadeConfig{}));
  ASSERT_EQ(stages.submitted.size(), 2u);
  EXPECT_EQ(stages.submitted[0].policies.size(), 2u);  // both policies' score positions in one request
  ASSERT_EQ(stages.submitted[1].policies.size(), 1u);
  EXPECT_EQ(stages.submitted[1].policies[0].id, "unsure");
  EXPECT_EQ(r.policies[0].decided_by, Stage::kScore);
  EXPECT_EQ(r.policies[1].decided_by, Stage::kLow);
  EXPECT_EQ(r.result.results.size(), 2u);
  EXPECT_EQ(r.result.results[1].policy_id, "unsure");
}

TEST(CascadeRouting, EscalationsOfManyRequestsAreSubmittedTogether) {
  ScriptedStages stages;
  stages.script[{Stage::kScore, "p"}] = {1, 0.5};
  stages.script[{Stage::kLow, "p"}] = {1, 0.99};
  Cascade cascade(stages);
  int done = 0;
  for (int i = 0; i < 8; ++i)
    ASSERT_EQ(cascade.submit(request_for("r" + std::to_string(i), {"p"}, CascadeConfig{}), [&](CascadeResult) { ++done; }),
              SubmitStatus::kAccepted);
  EXPECT_EQ(stages.queued(), 8u);
  EXPECT_EQ(stages.step(), 8u);  // one step finishes every score stage ...
  EXPECT_EQ(stages.queued(), 8u);  // ... and all eight escalations are waiting for the next, together
  EXPECT_EQ(done, 0);
  EXPECT_EQ(stages.step(), 8u);
  EXPECT_EQ(done, 8);
  EXPECT_EQ(cascade.in_flight(), 0u);
}

TEST(CascadeRouting, StagesThatAnswerAtOnceStillRunInOrder) {
  ScriptedStages stages;
  stages.immediate = true;  // done() runs inside submit(), as a stage that fails at once would
  stages.script[{Stage::kScore, "a"}] = {0, 0.2};
  stages.script[{Stage::kScore, "b"}] = {0, 0.2};
  stages.script[{Stage::kLow, "a"}] = {0, 0.2};  // b has no answer at low: it escalates too
  stages.script[{Stage::kHigh, "a"}] = {0, 0.5};
  stages.script[{Stage::kHigh, "b"}] = {1, 0.5};
  const CascadeResult r = run_one(stages, request_for("sync", {"a", "b"}, CascadeConfig{}));
  EXPECT_EQ(stages.submitted.size(), 3u);  // score (a, b), low (a, b), high (a, b)
  EXPECT_EQ(r.policies[0].decided_by, Stage::kHigh);
  EXPECT_EQ(r.policies[1].decided_by, Stage::kHigh);
}

TEST(CascadeRouting, OverridesMergeFieldByField) {
  const CascadeConfig policy = parse_cascade({{"stages", {"score", "high"}}, {"thresholds", {{"score", 0.7}}}, {"escalate_violations", true}});
  const CascadeConfig merged = parse_cascade({{"thresholds", {{"score", 0.99}}}}, policy, false);
  EXPECT_EQ(merged.stages, policy.stages);
  EXPECT_DOUBLE_EQ(merged.score_threshold, 0.99);
  EXPECT_TRUE(merged.escalate_violations);
  EXPECT_THROW(parse_cascade({{"triage_model", "x.bin"}}, policy, false), std::invalid_argument);
  // Round trip.
  EXPECT_EQ(parse_cascade(to_json(merged)), merged);
  ScriptedStages stages;
  stages.script[{Stage::kScore, "p"}] = {0, 0.9};
  EXPECT_EQ(run_one(stages, request_for("o1", {"p"}, policy)).policies[0].decided_by, Stage::kScore);
  ScriptedStages strict;
  strict.script[{Stage::kScore, "p"}] = {0, 0.9};
  strict.script[{Stage::kHigh, "p"}] = {0, 0.9};
  EXPECT_EQ(run_one(strict, request_for("o2", {"p"}, merged)).policies[0].decided_by, Stage::kHigh);
}

TEST(CascadeRouting, BadConfigsAreRefusedWithTheField) {
  auto error_of = [](const nlohmann::json& j) {
    try {
      parse_cascade(j);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(error_of({{"stages", {"score", "medium", "low"}}}).find("cannot come after"), std::string::npos);
  EXPECT_NE(error_of({{"stages", {"score", "score"}}}).find("twice"), std::string::npos);
  EXPECT_NE(error_of({{"stages", {"fast"}}}).find("unknown stage"), std::string::npos);
  EXPECT_NE(error_of({{"stages", nlohmann::json::array()}}).find("non-empty"), std::string::npos);
  EXPECT_NE(error_of({{"thresholds", {{"score", 1.5}}}}).find("thresholds.score"), std::string::npos);
  EXPECT_NE(error_of({{"thresholds", {{"score", -0.1}}}}).find("thresholds.score"), std::string::npos);
  EXPECT_NE(error_of({{"thresholds", {{"high", 0.5}}}}).find("no stage \"high\""), std::string::npos);
  EXPECT_NE(error_of({{"budgets", {{"low", -1}}}}).find("budgets.low"), std::string::npos);
  EXPECT_NE(error_of({{"budgets", {{"score", 10}}}}).find("no stage \"score\""), std::string::npos);
  EXPECT_NE(error_of({{"stages", {"score", "low"}}, {"escalate_violations", true}}).find("needs the \"high\" stage"),
            std::string::npos);
  EXPECT_NE(error_of({{"stages", {"triage", "high"}}}).find("needs a \"triage_model\""), std::string::npos);
  EXPECT_NE(error_of({{"stages", {"triage", "high"}}, {"triage_model", "../x.bin"}}).find("file name"), std::string::npos);
  EXPECT_NE(error_of({{"speed", 1}}).find("unknown field"), std::string::npos);
  EXPECT_NE(error_of(nlohmann::json::array()).find("object"), std::string::npos);
  EXPECT_EQ(error_of({{"stages", {"triage", "score", "high"}}, {"triage_model", "spam.bin"}}), "accepted");
}

TEST(CascadeRouting, ARefusedFirstStageIsTheAnswerAndALaterOneAnError) {
  {
    ScriptedStages stages;
    stages.refuse = SubmitStatus::kQueueFull;
    Cascade cascade(stages);
    bool called = false;
    std::string why;
    EXPECT_EQ(cascade.submit(request_for("full", {"p"}, CascadeConfig{}), [&](CascadeResult) { called = true; }, &why),
              SubmitStatus::kQueueFull);
    EXPECT_FALSE(called);
    EXPECT_EQ(cascade.in_flight(), 0u);
    EXPECT_FALSE(why.empty());
  }
  ScriptedStages stages;
  stages.script[{Stage::kScore, "p"}] = {0, 0.1};
  stages.refuse = SubmitStatus::kTooLong;
  stages.refuse_stage = Stage::kLow;
  const CascadeResult r = run_one(stages, request_for("later", {"p"}, CascadeConfig{}));
  EXPECT_EQ(r.policies[0].result.finish, FinishReason::kError);
  EXPECT_EQ(r.result.finish, FinishReason::kError);
  ASSERT_EQ(r.policies[0].stages.size(), 2u);
  EXPECT_EQ(r.policies[0].stages[1].stage, Stage::kLow);
  EXPECT_FALSE(r.policies[0].stages[1].error.empty());
}

TEST(CascadeRouting, CancelStopsTheRunningStageAndEscalation) {
  ScriptedStages stages;
  stages.script[{Stage::kScore, "p"}] = {0, 0.1};
  Cascade cascade(stages);
  std::optional<CascadeResult> out;
  ASSERT_EQ(cascade.submit(request_for("c", {"p"}, CascadeConfig{}), [&](CascadeResult r) { out = std::move(r); }),
            SubmitStatus::kAccepted);
  stages.step();  // score done, low queued
  ASSERT_EQ(stages.queued(), 1u);
  cascade.cancel("c");
  ASSERT_EQ(stages.cancelled.size(), 1u);
  EXPECT_EQ(stages.cancelled[0], stages.submitted[1].id);
  stages.step();
  ASSERT_TRUE(out.has_value());
  EXPECT_EQ(out->result.finish, FinishReason::kCancelled);
  EXPECT_EQ(stages.queued(), 0u);  // no high stage
  EXPECT_EQ(stages.submitted.size(), 2u);
}

TEST(CascadeRouting, RunAllStagesRunsEverythingAndKeepsTheRoutedVerdict) {
  ScriptedStages stages;
  stages.script[{Stage::kScore, "p"}] = {1, 0.95};
  stages.script[{Stage::kLow, "p"}] = {0, 0.9};
  stages.script[{Stage::kHigh, "p"}] = {0, 0.9};
  auto request = request_for("all", {"p"}, CascadeConfig{});
  request.run_all_stages = true;
  const CascadeResult r = run_one(stages, request);
  EXPECT_EQ(stages_ran(r.policies[0]), (std::vector<Stage>{Stage::kScore, Stage::kLow, Stage::kHigh}));
  EXPECT_EQ(r.policies[0].decided_by, Stage::kScore);
  EXPECT_EQ(r.policies[0].result.verdict, 1);
}

TEST(CascadeRouting, RulesAndTriageDecideWithoutTheModel) {
  const CascadeConfig config =
      parse_cascade({{"stages", {"rules", "triage", "score", "high"}}, {"triage_model", "t.bin"}, {"thresholds", {{"triage", 0.9}}}});
  auto make = [&](const std::string& id) {
    auto r = request_for(id, {"p"}, config);
    r.policies[0].rules = [](std::string_view content) -> std::optional<RuleMatch> {
      if (content.find("crypto") != std::string_view::npos) return RuleMatch{"R-crypto", true, 1, true};
      if (content.find("receipt") != std::string_view::npos) return RuleMatch{"A-receipt", false, 0, false};
      return std::nullopt;
    };
    r.policies[0].triage = [](std::string_view content) {
      if (content.find("sure") != std::string_view::npos) return TriagePrediction{0, 0.97};
      if (content.find("odd") != std::string_view::npos) return TriagePrediction{"MAYBE", 0.99};
      return TriagePrediction{1, 0.6};
    };
    return r;
  };
  {
    ScriptedStages stages;
    auto r = make("deny");
    r.base.content = "free crypto now";
    const CascadeResult out = run_one(stages, r);
    EXPECT_EQ(out.policies[0].decided_by, Stage::kRules);
    EXPECT_EQ(out.policies[0].stages[0].reason, "R-crypto");
    EXPECT_EQ(out.policies[0].result.verdict, 1);
    EXPECT_TRUE(out.result.flagged);
    EXPECT_TRUE(stages.submitted.empty());  // decided inline: no model stage at all
    EXPECT_EQ(out.result.usage.prompt_tokens, 0);
  }
  {
    ScriptedStages stages;
    auto r = make("allow");
    r.base.content = "your receipt";
    const CascadeResult out = run_one(stages, r);
    EXPECT_EQ(out.policies[0].decided_by, Stage::kRules);
    EXPECT_FALSE(out.result.flagged);
  }
  {
    ScriptedStages stages;
    auto r = make("triage");
    r.base.content = "sure thing";
    const CascadeResult out = run_one(stages, r);
    EXPECT_EQ(out.policies[0].decided_by, Stage::kTriage);
    EXPECT_EQ(stages_ran(out.policies[0]), (std::vector<Stage>{Stage::kRules, Stage::kTriage}));
    EXPECT_DOUBLE_EQ(out.policies[0].result.confidence.value_or(0), 0.97);
  }
  {
    ScriptedStages stages;  // triage unsure (0.6 < 0.9): the model stages go on
    stages.script[{Stage::kScore, "p"}] = {0, 0.95};
    const CascadeResult out = run_one(stages, make("unsure"));
    EXPECT_EQ(out.policies[0].decided_by, Stage::kScore);
    EXPECT_EQ(stages_ran(out.policies[0]), (std::vector<Stage>{Stage::kRules, Stage::kTriage, Stage::kScore}));
  }
  {
    ScriptedStages stages;  // a triage answer the policy does not have is an error of that stage, not a verdict
    stages.script[{Stage::kScore, "p"}] = {0, 0.95};
    auto r = make("odd");
    r.base.content = "odd one";
    const CascadeResult out = run_one(stages, r);
    EXPECT_EQ(out.policies[0].decided_by, Stage::kScore);
    EXPECT_FALSE(out.policies[0].stages[1].error.empty());
  }
}

// The offline routing over a full trace picks the stage the live cascade decides at, and the live
// cascade runs exactly the stages the offline one says, for random configs and answers.
TEST(CascadeRouting, OfflineRoutingMatchesTheLiveCascadeOnRandomTraces) {
  std::mt19937 rng(11);
  const std::vector<Stage> model_stages = {Stage::kScore, Stage::kLow, Stage::kMedium, Stage::kHigh};
  for (int trial = 0; trial < 400; ++trial) {
    CascadeConfig config;
    config.stages.clear();
    for (const Stage s : model_stages)
      if (rng() % 2) config.stages.push_back(s);
    if (config.stages.empty()) config.stages.push_back(Stage::kHigh);
    auto threshold = [&] { return static_cast<double>(rng() % 11) / 10.0; };
    config.score_threshold = threshold();
    config.low_threshold = threshold();
    config.medium_threshold = threshold();
    config.escalate_violations = config.has(Stage::kHigh) && rng() % 2;
    ScriptedStages live;
    std::vector<StageOutcome> trace;
    for (const Stage s : config.stages) {
      Scripted answer;
      answer.verdict = rng() % 6 == 0 ? nlohmann::json(nullptr) : nlohmann::json(static_cast<int>(rng() % 2));
      answer.confidence = static_cast<double>(rng() % 11) / 10.0;
      live.script[{s, "p"}] = answer;
      StageOutcome o;
      o.stage = s;
      o.verdict = answer.verdict;
      o.violation = answer.verdict == 1;
      if (!answer.verdict.is_null()) o.confidence = answer.confidence;
      trace.push_back(o);
    }
    const TraceDecision offline = decide_on_trace(config, trace);
    const CascadeResult r = run_one(live, request_for("t" + std::to_string(trial), {"p"}, config));
    std::vector<Stage> offline_ran;
    for (const size_t i : offline.ran) offline_ran.push_back(trace[i].stage);
    EXPECT_EQ(stages_ran(r.policies[0]), offline_ran) << to_json(config).dump();
    if (offline.decided) {
      EXPECT_EQ(r.policies[0].decided_by, trace[*offline.decided].stage) << to_json(config).dump();
      EXPECT_EQ(r.policies[0].result.verdict, trace[*offline.decided].verdict);
    } else {
      EXPECT_FALSE(r.policies[0].decided_by.has_value());
    }
  }
}

}  // namespace
}  // namespace arbiter
