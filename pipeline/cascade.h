// The cascade (`"reasoning_effort": "auto"`): a policy's content goes through stages from cheap to
// expensive and the first that is sure enough decides: rules (pipeline/rules.h) -> the triage
// classifier (pipeline/triage.h) -> verdict-only scoring -> reasoning at low effort (-> medium) ->
// reasoning at high effort. Each policy version may carry its cascade (CascadeConfig); a request may override it
// field by field. Model stages run through the Classifier, so escalations batch with everything
// else in the scheduler and reuse the policy's cached prefix.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "pipeline/rules.h"
#include "pipeline/triage.h"
#include "scheduler/classify.h"

namespace arbiter {

// The stages, in the only order they run in.
enum class Stage { kRules, kTriage, kScore, kLow, kMedium, kHigh };
const char* to_string(Stage stage);  // "rules", "triage", "score", "low", "medium", "high"
std::optional<Stage> stage_from_string(std::string_view name);
bool is_model_stage(Stage stage);    // score, low, medium, high: run through the Classifier
// The effort a reasoning stage runs at (score runs at low: it shares low's cached prefix).
ReasoningEffort stage_effort(Stage stage);

// Which stages a policy's cascade runs and when each decides.
struct CascadeConfig {
  // A subset of the stages, in cascade order. The last one always decides (when it has a verdict).
  std::vector<Stage> stages = {Stage::kScore, Stage::kLow, Stage::kHigh};
  // A stage decides when its verdict's confidence reaches its threshold (0..1). Rules always decide
  // when one matches; the last stage always decides.
  double triage_threshold = 0.9;
  double score_threshold = 0.9;
  double low_threshold = 0.8;
  double medium_threshold = 0.8;
  // Reasoning tokens for the reasoning stages; 0: the server's budget for that effort.
  int low_budget = 0;
  int medium_budget = 0;
  int high_budget = 0;
  // A violation found by triage, score, low or medium is not final: it goes on to high (which must be a stage).
  bool escalate_violations = false;
  // The triage stage's fastText model: a file name in the server's triage folder (--triage-dir).
  std::string triage_model;

  double threshold(Stage stage) const;  // 0 for rules and high
  int budget(Stage stage) const;        // low/medium/high; 0 otherwise
  bool has(Stage stage) const;
  bool operator==(const CascadeConfig&) const = default;
};

// Parses a cascade object over `base` (the fields present replace base's):
//   {"stages": ["rules", "triage", "score", "low", "high"],
//    "thresholds": {"triage": 0.95, "score": 0.9, "low": 0.8, "medium": 0.8},
//    "budgets": {"low": 256, "medium": 1024, "high": 4096},
//    "escalate_violations": true, "triage_model": "spam-v2.bin"}
// Throws std::invalid_argument naming the field: unknown keys, stages unknown, repeated, out of
// order or empty, thresholds outside 0..1, budgets below 0 or above 1,000,000, escalation without
// high, a triage stage without a model, a model name that is not a plain file name.
// `allow_model` false (a request's override): triage_model is refused.
CascadeConfig parse_cascade(const nlohmann::json& j, const CascadeConfig& base = {}, bool allow_model = true);
nlohmann::json to_json(const CascadeConfig& config);  // every field, canonical (parse_cascade reads it back)

// What one stage said about one policy.
struct StageOutcome {
  Stage stage = Stage::kScore;
  nlohmann::json verdict;         // 0/1 or a label; null when the stage gave none
  bool violation = false;
  std::optional<double> confidence;
  std::string reason;             // rules: the id of the rule that matched
  ClassifyUsage usage;            // model stages
  double seconds = 0;             // wall time of the stage, queueing included
  FinishReason finish = FinishReason::kStop;
  std::string error;
  bool has_verdict() const { return !verdict.is_null(); }
};
nlohmann::json to_json(const StageOutcome& outcome);
// A model stage's outcome from the Classifier's result for the policy, `seconds` after it started.
StageOutcome stage_outcome(Stage stage, const PolicyResult& result, double seconds);

// What the cascade does after a stage.
enum class Route {
  kDecide,    // this stage's verdict is the answer
  kNext,      // not sure enough: the next stage
  kToHigh,    // a violation under escalate_violations: straight to high
};
// The routing rule, a pure function (the live cascade and `arbiter eval`'s threshold sweep share
// it). `last`: no stage comes after this one in the config.
Route route(const CascadeConfig& config, const StageOutcome& outcome, bool last);
// Given a full trace (every stage of `config` run, in order), the index of the stage the cascade
// would have decided at, and the indices it would have run; nullopt when it would decide nowhere
// (no stage had a verdict).
struct TraceDecision {
  std::optional<size_t> decided;
  std::vector<size_t> ran;
};
TraceDecision decide_on_trace(const CascadeConfig& config, const std::vector<StageOutcome>& trace);

// One policy of a cascade request: the policy, its cascade, and what its rules and triage stages
// ask (PolicyRules::match and TriageModel::predict of the policy's compiled rules and model; empty
// when the config has no such stage; must be thread-safe).
struct CascadePolicy {
  ClassifyPolicy policy;
  CascadeConfig config;
  std::function<std::optional<RuleMatch>(std::string_view content)> rules;
  std::function<TriagePrediction(std::string_view content)> triage;
};

struct CascadeRequest {
  ClassifyRequest base;  // id, content, deadline, cancellation, return_reasoning, constrain, score_prefix
  std::vector<CascadePolicy> policies;
  // Every stage of every policy runs (the verdict is still the one the routing picks): what
  // `arbiter eval` needs for its agreement figures and threshold sweep.
  bool run_all_stages = false;
};

// Per policy: the deciding stage's result (usage summed over every stage that ran), which stage
// decided, and each stage's outcome in order.
struct CascadePolicyResult {
  PolicyResult result;
  std::optional<Stage> decided_by;  // nullopt: no stage produced a verdict
  std::vector<StageOutcome> stages;
};
struct CascadeResult {
  std::string id;
  std::vector<CascadePolicyResult> policies;
  ClassifyResult result;  // the per-policy results put together (flagged, usage sums, worst finish)
};
// to_json(result.result) with each policy's "decided_by" (null: none) and "stages" (the API's field names).
nlohmann::json to_json(const CascadeResult& result);

// Where model stages run: the Classifier in service, a scripted source in tests.
class ModelStages {
 public:
  virtual ~ModelStages() = default;
  // Like Classifier::submit: `done` is called once (from any thread) unless the answer is not kAccepted.
  virtual SubmitStatus submit(const ClassifyRequest& request, std::function<void(ClassifyResult)> done, std::string* why) = 0;
  virtual void cancel(const std::string& request_id) = 0;
};

// ModelStages over a Classifier and its Scheduler.
class ClassifierStages : public ModelStages {
 public:
  explicit ClassifierStages(Classifier& classifier) : classifier_(classifier) {}
  SubmitStatus submit(const ClassifyRequest& request, std::function<void(ClassifyResult)> done, std::string* why) override;
  void cancel(const std::string& request_id) override;

 private:
  Classifier& classifier_;
};

// Runs cascade requests. Rules and triage run inline in submit(); model stages go to `stages` in
// lock-step per request: all of a request's policies that need the same next stage go as one
// Classifier request (id `<id>/<stage>`), so a stage's escalations are submitted together as soon as
// it finishes and batch with the rest of the scheduler's work. Thread-safe.
class Cascade {
 public:
  explicit Cascade(ModelStages& stages) : stages_(stages) {}
  ~Cascade();
  Cascade(const Cascade&) = delete;
  Cascade& operator=(const Cascade&) = delete;

  // Starts `request`; `done` is called once with the result (from the thread that finished the last
  // stage, or from this one when rules/triage decide everything) unless the answer is not kAccepted.
  // The first model stage's admission is the answer; a later stage refused by the scheduler ends
  // its policies with FinishReason::kError.
  SubmitStatus submit(CascadeRequest request, std::function<void(CascadeResult)> done, std::string* why = nullptr);
  // Cancels the request's running stage and stops it from escalating.
  void cancel(const std::string& id);
  // Requests started and not yet done.
  size_t in_flight() const;

 private:
  struct Run;
  static std::vector<std::pair<Stage, std::vector<size_t>>> next_groups(const Run& run);
  // Submits the request's next stages (see the .cc); `first`: its first, whose refusal is the answer.
  SubmitStatus launch(const std::shared_ptr<Run>& run, bool first, std::string* why);
  SubmitStatus submit_stage(const std::shared_ptr<Run>& run, Stage stage, const std::vector<size_t>& members,
                            bool continuation, std::string* why);
  void stage_done(const std::shared_ptr<Run>& run, Stage stage, const std::vector<size_t>& policies, ClassifyResult result,
                  std::chrono::steady_clock::time_point started);
  void finish(const std::shared_ptr<Run>& run);

  ModelStages& stages_;
  mutable std::mutex mutex_;
  std::map<std::string, std::shared_ptr<Run>> runs_;
};

}  // namespace arbiter
