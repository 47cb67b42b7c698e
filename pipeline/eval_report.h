// Policy evaluation on labelled data (`arbiter eval`): the records of a run (per item and policy,
// the expected answer, the verdict and every stage that ran) and the pure functions that turn them
// into a report: confusion counts, precision / recall / F1 with seeded bootstrap intervals, label-set
// confusion matrices, multi-policy accuracy, per-stage cost, agreement of the cheap stages with high
// effort, the cascade's threshold sweep, the HTML page, and the diff of two runs. Nothing here runs
// a model, so everything can be tested on hand-made records.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "pipeline/cascade.h"
#include "pipeline/dataset.h"

namespace arbiter {

// One policy of a run: its id, its label set (empty: a 0/1 policy) and its cascade (effort auto).
struct EvalPolicyInfo {
  std::string id;
  std::vector<std::string> labels;
  std::vector<std::string> violating_labels;
  CascadeConfig cascade;
};

// What happened to one policy on one item.
struct EvalPolicyRecord {
  std::string policy;
  std::optional<nlohmann::json> expected;  // nullopt: the item has no label for this policy
  nlohmann::json verdict;                  // 0/1, a label, or null (no verdict)
  bool violation = false;                  // the verdict says violation (false without a verdict)
  std::optional<double> confidence;
  std::optional<Stage> decided_by;         // the stage whose verdict is the answer
  std::vector<StageOutcome> stages;        // every stage that ran, in cascade order
  double latency = 0;                      // seconds from submission to the answer
  std::string error;                       // why the item could not be run for this policy (no stages then)
};

struct EvalItemRecord {
  std::string id;
  std::vector<EvalPolicyRecord> policies;
  const EvalPolicyRecord* find(const std::string& policy) const;
};

// How the report is computed.
struct EvalOptions {
  uint64_t seed = 1;             // bootstrap resampling seed
  int bootstrap = 1000;          // resamples per interval (0: no intervals)
  double target_agreement = 0.95;
  double sweep_min = 0.5;        // the threshold grid: sweep_min, +sweep_step, ..., 1.0
  double sweep_step = 0.05;
};

// A run: its policies, its records (one per dataset item evaluated) and what else the report states.
struct EvalRun {
  std::vector<EvalPolicyInfo> policies;
  std::vector<EvalItemRecord> records;
  std::vector<DatasetError> dataset_errors;
  nlohmann::json meta = nlohmann::json::object();  // model, dataset, mode, effort ...: copied into the report
  EvalOptions options;
};

// Binary confusion counts and the metrics over them. Undefined ratios (0/0) are nullopt: precision
// without predicted violations, recall without expected ones, F1 when either is undefined.
struct BinaryCounts {
  int tp = 0, fp = 0, tn = 0, fn = 0;
  std::optional<double> precision() const;
  std::optional<double> recall() const;
  std::optional<double> f1() const;
};

// Whether an expected answer means violation: 1, or a label among `violating_labels`.
bool expected_violation(const nlohmann::json& expected, const std::vector<std::string>& violating_labels);
// Whether a record's verdict matches its expected answer: equal labels when the expected answer is a
// label, else the same violation bit (no verdict: not a violation). False without an expected answer.
bool verdict_matches(const EvalPolicyRecord& record, const EvalPolicyInfo& policy);

// The deterministic pseudo-random generator the bootstrap uses (splitmix64): the same seed gives the
// same intervals on every platform.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next();
  size_t below(size_t n) { return static_cast<size_t>(next() % n); }

 private:
  uint64_t state_;
};

// Model tokens a stage computed: prompt tokens not taken from the cache + completion tokens.
int64_t computed_tokens(const StageOutcome& outcome);

// The report (report.json): see docs/policies.md, "Evaluating a policy".
nlohmann::json eval_report(const EvalRun& run);

// The threshold sweep of one set of records (items' records of the policies in `policies`): for each
// point of the grid over the score and low thresholds, the tokens the cascade would have computed
// (decide_on_trace) and how often its verdict equals high's; plus the cheapest point reaching
// options.target_agreement. Null when no record has a trace with a high stage.
nlohmann::json threshold_sweep(const EvalRun& run, const std::vector<std::string>& policies);

// One self-contained HTML page (inline CSS and SVG, no network) of a report. The numbers a test
// reads back carry data attributes: data-metric (and data-policy) with data-value.
std::string report_html(const nlohmann::json& report);

// items.jsonl lines: one item's records, and back (throws std::invalid_argument on a malformed line).
nlohmann::json to_json(const EvalItemRecord& item);
EvalItemRecord eval_item_from_json(const nlohmann::json& j);
// Stage outcomes as stored in items.jsonl, and back.
nlohmann::json stage_to_json(const StageOutcome& outcome);
StageOutcome stage_from_json(const nlohmann::json& j);

// The verdicts that differ between two runs (`here` and `there`, e.g. two versions of a policy),
// per policy both ran, over the items both ran: {"policies": {id: {"compared", "flipped": [{id,
// here, there, expected}], "fixed", "broken"}}, "only_here", "only_there"}. "fixed": flips where
// here matches the expected answer and there did not; "broken": the reverse.
nlohmann::json compare_runs(const std::vector<EvalItemRecord>& here, const std::vector<EvalItemRecord>& there,
                            const std::vector<EvalPolicyInfo>& policies);

}  // namespace arbiter
