#include "pipeline/eval_report.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

namespace arbiter {

namespace {

using json = nlohmann::json;

json optional_number(const std::optional<double>& v) { return v ? json(*v) : json(nullptr); }

// A label-set policy's expected answers and verdicts are strings; 0/1 answers are shown as "0"/"1".
std::string answer_key(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_string()) return v.get<std::string>();
  return v.dump();
}

// The q-quantile (0..1) of sorted values, by the nearest-rank method on (n - 1) * q.
double quantile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const double pos = q * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(sorted.size() - 1, lo + 1);
  const double frac = pos - static_cast<double>(lo);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * frac;
}

// The percentile bootstrap 95% interval of `statistic` over `n` units resampled with replacement:
// [2.5%, 97.5%] of the resampled values, widened to include the point estimate (a percentile
// interval need not contain it on a small, lopsided sample). Resamples where the statistic is
// undefined are left out; null when it is undefined everywhere.
json bootstrap_interval(size_t n, const std::function<std::optional<double>(const std::vector<size_t>&)>& statistic,
                        const std::optional<double>& point, uint64_t seed, int resamples) {
  if (n == 0 || resamples <= 0 || !point) return nullptr;
  SplitMix64 rng(seed);
  std::vector<double> values;
  values.reserve(static_cast<size_t>(resamples));
  std::vector<size_t> pick(n);
  for (int r = 0; r < resamples; ++r) {
    for (auto& p : pick) p = rng.below(n);
    if (const auto v = statistic(pick)) values.push_back(*v);
  }
  if (values.empty()) return nullptr;
  std::sort(values.begin(), values.end());
  return json::array({std::min(*point, quantile(values, 0.025)), std::max(*point, quantile(values, 0.975))});
}

// Per-unit seeds derived from the run's seed and a name, so each interval has its own stream and
// adding a policy does not change another's intervals.
uint64_t derive_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (const unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  SplitMix64 mix(seed ^ h);
  return mix.next();
}

const EvalPolicyInfo* find_policy(const EvalRun& run, const std::string& id) {
  for (const auto& p : run.policies)
    if (p.id == id) return &p;
  return nullptr;
}

// One known-label record of a policy, reduced to what the binary metrics need.
struct Outcome {
  bool expected = false;
  bool predicted = false;
};

BinaryCounts count(const std::vector<Outcome>& outcomes, const std::vector<size_t>* pick = nullptr) {
  BinaryCounts c;
  auto add = [&c](const Outcome& o) {
    if (o.expected) (o.predicted ? c.tp : c.fn) += 1;
    else (o.predicted ? c.fp : c.tn) += 1;
  };
  if (pick)
    for (size_t i : *pick) add(outcomes[i]);
  else
    for (const auto& o : outcomes) add(o);
  return c;
}

json percentiles(std::vector<double> v) {
  if (v.empty()) return {{"p50", nullptr}, {"p99", nullptr}};
  std::sort(v.begin(), v.end());
  return {{"p50", quantile(v, 0.5)}, {"p99", quantile(v, 0.99)}};
}

const StageOutcome* find_stage(const EvalPolicyRecord& r, Stage stage) {
  for (const auto& s : r.stages)
    if (s.stage == stage) return &s;
  return nullptr;
}

FinishReason finish_from_string(const std::string& name) {
  for (FinishReason f : {FinishReason::kStop, FinishReason::kLength, FinishReason::kCancelled, FinishReason::kDeadline,
                         FinishReason::kError})
    if (name == to_string(f)) return f;
  throw std::invalid_argument("unknown finish reason \"" + name + "\"");
}

// The policy's metrics block of the report.
json policy_report(const EvalRun& run, const EvalPolicyInfo& policy) {
  std::vector<Outcome> outcomes;
  int unknown = 0, no_verdict = 0, correct = 0;
  // The confusion matrix: expected answer x predicted answer ("null": no verdict).
  std::vector<std::string> rows, cols;
  auto add_key = [](std::vector<std::string>& keys, const std::string& k) {
    if (std::find(keys.begin(), keys.end(), k) == keys.end()) keys.push_back(k);
  };
  if (policy.labels.empty()) rows = cols = {"0", "1"};
  else rows = cols = policy.labels;
  std::map<std::string, std::map<std::string, int>> matrix;
  for (const auto& item : run.records) {
    const EvalPolicyRecord* r = item.find(policy.id);
    if (!r) continue;
    if (r->verdict.is_null()) ++no_verdict;
    if (!r->expected) {
      ++unknown;
      continue;
    }
    outcomes.push_back({expected_violation(*r->expected, policy.violating_labels), r->violation});
    correct += verdict_matches(*r, policy) ? 1 : 0;
    const std::string e = answer_key(*r->expected), p = answer_key(r->verdict);
    add_key(rows, e);
    if (p != "null") add_key(cols, p);
    ++matrix[e][p];
  }
  cols.push_back("null");
  const BinaryCounts c = count(outcomes);
  const size_t n = outcomes.size();
  const uint64_t seed = derive_seed(run.options.seed, policy.id);
  const int B = run.options.bootstrap;
  auto resampled = [&outcomes](const std::vector<size_t>& pick) { return count(outcomes, &pick); };
  json intervals = json::object();
  intervals["tp"] = bootstrap_interval(n, [&](const auto& p) { return std::optional<double>(resampled(p).tp); }, c.tp, seed, B);
  intervals["fp"] = bootstrap_interval(n, [&](const auto& p) { return std::optional<double>(resampled(p).fp); }, c.fp, seed, B);
  intervals["tn"] = bootstrap_interval(n, [&](const auto& p) { return std::optional<double>(resampled(p).tn); }, c.tn, seed, B);
  intervals["fn"] = bootstrap_interval(n, [&](const auto& p) { return std::optional<double>(resampled(p).fn); }, c.fn, seed, B);
  intervals["precision"] = bootstrap_interval(n, [&](const auto& p) { return resampled(p).precision(); }, c.precision(), seed, B);
  intervals["recall"] = bootstrap_interval(n, [&](const auto& p) { return resampled(p).recall(); }, c.recall(), seed, B);
  intervals["f1"] = bootstrap_interval(n, [&](const auto& p) { return resampled(p).f1(); }, c.f1(), seed, B);
  json confusion_matrix = json::object();
  for (const auto& e : rows) {
    json row = json::object();
    for (const auto& p : cols) {
      const auto it = matrix.find(e);
      row[p] = it == matrix.end() || !it->second.count(p) ? 0 : it->second.at(p);
    }
    confusion_matrix[e] = row;
  }
  json out = {
      {"tp", c.tp},
      {"fp", c.fp},
      {"tn", c.tn},
      {"fn", c.fn},
      {"precision", optional_number(c.precision())},
      {"recall", optional_number(c.recall())},
      {"f1", optional_number(c.f1())},
      {"intervals", intervals},
      {"labelled", n},
      {"unknown", unknown},
      {"no_verdict", no_verdict},
      {"accuracy", n ? json(static_cast<double>(correct) / static_cast<double>(n)) : json(nullptr)},
      {"confusion", {{"expected", rows}, {"predicted", cols}, {"matrix", confusion_matrix}}},
  };
  if (!policy.labels.empty()) {
    out["labels"] = policy.labels;
    out["violating_labels"] = policy.violating_labels;
  }
  return out;
}

// Items correct under every known label; items without any known label are left out.
json multi_policy_accuracy(const EvalRun& run) {
  std::vector<int> correct;  // per counted item: 1 / 0
  for (const auto& item : run.records) {
    bool known = false, ok = true;
    for (const auto& r : item.policies) {
      if (!r.expected) continue;
      const EvalPolicyInfo* p = find_policy(run, r.policy);
      if (!p) continue;
      known = true;
      ok = ok && verdict_matches(r, *p);
    }
    if (known) correct.push_back(ok ? 1 : 0);
  }
  const size_t n = correct.size();
  int k = 0;
  for (int c : correct) k += c;
  const std::optional<double> value = n ? std::optional<double>(static_cast<double>(k) / static_cast<double>(n)) : std::nullopt;
  const json interval = bootstrap_interval(
      n,
      [&](const std::vector<size_t>& pick) {
        int s = 0;
        for (size_t i : pick) s += correct[i];
        return std::optional<double>(static_cast<double>(s) / static_cast<double>(pick.size()));
      },
      value, derive_seed(run.options.seed, "accuracy"), run.options.bootstrap);
  return {{"items", n}, {"correct", k}, {"value", optional_number(value)}, {"interval", interval}};
}

// Per stage: how often it ran and decided, its token sums and per-decision means, its latency.
json stage_costs(const EvalRun& run) {
  struct Sums {
    int runs = 0, decided = 0;
    int64_t prompt = 0, cached = 0, reasoning = 0, completion = 0, computed = 0;
    std::vector<double> seconds;
  };
  std::map<Stage, Sums> by_stage;
  int decisions = 0, undecided = 0;
  for (const auto& item : run.records)
    for (const auto& r : item.policies) {
      ++decisions;
      if (r.decided_by) ++by_stage[*r.decided_by].decided;
      else ++undecided;
      for (const auto& s : r.stages) {
        Sums& sum = by_stage[s.stage];
        ++sum.runs;
        sum.prompt += s.usage.prompt_tokens;
        sum.cached += s.usage.cached_tokens;
        sum.reasoning += s.usage.reasoning_tokens;
        sum.completion += s.usage.completion_tokens;
        sum.computed += computed_tokens(s);
        sum.seconds.push_back(s.seconds);
      }
    }
  json stages = json::object();
  auto per = [decisions](int64_t v) { return decisions ? json(static_cast<double>(v) / decisions) : json(nullptr); };
  for (const auto& [stage, s] : by_stage) {
    json lat = percentiles(s.seconds);
    stages[to_string(stage)] = {
        {"runs", s.runs},
        {"decided", s.decided},
        {"decided_fraction", decisions ? json(static_cast<double>(s.decided) / decisions) : json(nullptr)},
        {"tokens", {{"prompt", s.prompt}, {"cached", s.cached}, {"reasoning", s.reasoning}, {"completion", s.completion},
                    {"computed", s.computed}}},
        {"per_decision", {{"prompt", per(s.prompt)}, {"cached", per(s.cached)}, {"reasoning", per(s.reasoning)},
                          {"completion", per(s.completion)}, {"computed", per(s.computed)}}},
        {"latency", lat},
    };
  }
  std::vector<double> latency;
  for (const auto& item : run.records)
    for (const auto& r : item.policies) latency.push_back(r.latency);
  return {{"decisions", decisions}, {"undecided", undecided}, {"stages", stages}, {"latency", percentiles(latency)}};
}

// How often each cheaper stage's verdict equals high effort's, over the records where both ran and
// high gave a verdict.
json agreement(const EvalRun& run) {
  json out = json::object();
  for (Stage stage : {Stage::kRules, Stage::kTriage, Stage::kScore, Stage::kLow, Stage::kMedium}) {
    int items = 0, agree = 0;
    for (const auto& item : run.records)
      for (const auto& r : item.policies) {
        const StageOutcome* s = find_stage(r, stage);
        const StageOutcome* h = find_stage(r, Stage::kHigh);
        if (!s || !h || !h->has_verdict()) continue;
        ++items;
        agree += s->verdict == h->verdict ? 1 : 0;
      }
    if (items == 0) continue;
    out[std::string(to_string(stage)) + "_vs_high"] = {
        {"items", items}, {"agree", agree}, {"value", static_cast<double>(agree) / items}};
  }
  return out;
}

}  // namespace

const EvalPolicyRecord* EvalItemRecord::find(const std::string& policy) const {
  for (const auto& r : policies)
    if (r.policy == policy) return &r;
  return nullptr;
}

std::optional<double> BinaryCounts::precision() const {
  if (tp + fp == 0) return std::nullopt;
  return static_cast<double>(tp) / (tp + fp);
}
std::optional<double> BinaryCounts::recall() const {
  if (tp + fn == 0) return std::nullopt;
  return static_cast<double>(tp) / (tp + fn);
}
std::optional<double> BinaryCounts::f1() const {
  const auto p = precision(), r = recall();
  if (!p || !r) return std::nullopt;
  if (*p + *r == 0) return 0.0;
  return 2 * *p * *r / (*p + *r);
}

bool expected_violation(const nlohmann::json& expected, const std::vector<std::string>& violating_labels) {
  if (expected.is_string())
    return std::find(violating_labels.begin(), violating_labels.end(), expected.get<std::string>()) != violating_labels.end();
  return expected == 1;
}

bool verdict_matches(const EvalPolicyRecord& record, const EvalPolicyInfo& policy) {
  if (!record.expected) return false;
  if (record.expected->is_string()) return record.verdict == *record.expected;
  return expected_violation(*record.expected, policy.violating_labels) == record.violation;
}

uint64_t SplitMix64::next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

int64_t computed_tokens(const StageOutcome& outcome) {
  return static_cast<int64_t>(outcome.usage.prompt_tokens) - outcome.usage.cached_tokens + outcome.usage.completion_tokens;
}

nlohmann::json threshold_sweep(const EvalRun& run, const std::vector<std::string>& policies) {
  // The records whose trace reaches high (the reference) and every stage of their policy's cascade.
  struct Trace {
    const EvalPolicyInfo* policy;
    const EvalPolicyRecord* record;
    const StageOutcome* high;
  };
  std::vector<Trace> traces;
  bool has_score = false, has_low = false;
  for (const auto& item : run.records)
    for (const auto& r : item.policies) {
      if (std::find(policies.begin(), policies.end(), r.policy) == policies.end()) continue;
      const EvalPolicyInfo* p = find_policy(run, r.policy);
      const StageOutcome* h = find_stage(r, Stage::kHigh);
      if (!p || !h || r.stages.size() != p->cascade.stages.size()) continue;
      traces.push_back({p, &r, h});
      has_score = has_score || p->cascade.has(Stage::kScore);
      has_low = has_low || p->cascade.has(Stage::kLow);
    }
  if (traces.empty()) return nullptr;
  std::vector<double> grid;
  const double step = run.options.sweep_step > 0 ? run.options.sweep_step : 0.05;
  for (int i = 0;; ++i) {
    const double t = std::round((run.options.sweep_min + i * step) * 1e6) / 1e6;
    if (t > 1.0 + 1e-9) break;
    grid.push_back(t);
  }
  // Thresholds not on the grid keep each policy's own value (a dimension the cascades lack).
  const std::vector<std::optional<double>> score_grid =
      has_score ? std::vector<std::optional<double>>(grid.begin(), grid.end()) : std::vector<std::optional<double>>{std::nullopt};
  const std::vector<std::optional<double>> low_grid =
      has_low ? std::vector<std::optional<double>>(grid.begin(), grid.end()) : std::vector<std::optional<double>>{std::nullopt};
  auto evaluate = [&traces](const std::optional<double>& score, const std::optional<double>& low) {
    int64_t cost = 0;
    int compared = 0, agree = 0;
    for (const auto& t : traces) {
      CascadeConfig config = t.policy->cascade;
      if (score) config.score_threshold = *score;
      if (low) config.low_threshold = *low;
      const TraceDecision d = decide_on_trace(config, t.record->stages);
      for (size_t i : d.ran)
        if (is_model_stage(t.record->stages[i].stage)) cost += computed_tokens(t.record->stages[i]);
      if (!t.high->has_verdict()) continue;
      ++compared;
      const json verdict = d.decided ? t.record->stages[*d.decided].verdict : json(nullptr);
      agree += verdict == t.high->verdict ? 1 : 0;
    }
    const double n = static_cast<double>(traces.size());
    return json{{"score", optional_number(score)},
                {"low", optional_number(low)},
                {"cost", cost},
                {"cost_per_item", static_cast<double>(cost) / n},
                {"agreement", compared ? json(static_cast<double>(agree) / compared) : json(nullptr)}};
  };
  json points = json::array();
  for (const auto& s : score_grid)
    for (const auto& l : low_grid) points.push_back(evaluate(s, l));
  // The cheapest point reaching the target (ties: the higher agreement, then the higher thresholds).
  json best = nullptr;
  for (const auto& p : points) {
    if (p["agreement"].is_null() || p["agreement"].get<double>() + 1e-12 < run.options.target_agreement) continue;
    if (best.is_null() || p["cost"].get<int64_t>() < best["cost"].get<int64_t>() ||
        (p["cost"] == best["cost"] && p["agreement"].get<double>() > best["agreement"].get<double>()))
      best = p;
  }
  // The cascades as configured, and high effort alone (the reference's own cost).
  int64_t high_cost = 0;
  for (const auto& t : traces) high_cost += computed_tokens(*t.high);
  // The configured point names the thresholds where every policy of the sweep shares them.
  json configured = evaluate(std::nullopt, std::nullopt);
  auto shared = [&traces](double CascadeConfig::*field) {
    const double v = traces.front().policy->cascade.*field;
    for (const auto& t : traces)
      if (t.policy->cascade.*field != v) return json(nullptr);
    return json(v);
  };
  if (has_score) configured["score"] = shared(&CascadeConfig::score_threshold);
  if (has_low) configured["low"] = shared(&CascadeConfig::low_threshold);
  return {{"grid", grid},
          {"items", traces.size()},
          {"target_agreement", run.options.target_agreement},
          {"points", points},
          {"best", best},
          {"configured", configured},
          {"high_only_cost", high_cost}};
}

nlohmann::json eval_report(const EvalRun& run) {
  json report = json::object();
  report["meta"] = run.meta;
  report["items"] = run.records.size();
  json errors = json::array();
  for (const auto& e : run.dataset_errors) errors.push_back({{"line", e.line}, {"message", e.message}});
  report["dataset_errors"] = {{"count", run.dataset_errors.size()}, {"lines", errors}};
  report["bootstrap"] = {{"resamples", run.options.bootstrap}, {"seed", run.options.seed}, {"level", 0.95}};
  json policies = json::object();
  std::vector<std::string> ids;
  for (const auto& p : run.policies) {
    policies[p.id] = policy_report(run, p);
    ids.push_back(p.id);
  }
  report["policies"] = policies;
  report["accuracy"] = multi_policy_accuracy(run);
  report["cost"] = stage_costs(run);
  report["agreement"] = agreement(run);
  json sweep = threshold_sweep(run, ids);
  if (!sweep.is_null()) {
    json per_policy = json::object();
    for (const auto& id : ids)
      if (json s = threshold_sweep(run, {id}); !s.is_null()) per_policy[id] = s;
    sweep["policies"] = per_policy;
  }
  report["sweep"] = sweep;
  return report;
}

nlohmann::json stage_to_json(const StageOutcome& o) {
  json j = {{"stage", to_string(o.stage)},
            {"verdict", o.verdict},
            {"violation", o.violation},
            {"confidence", optional_number(o.confidence)},
            {"usage",
             {{"prompt_tokens", o.usage.prompt_tokens},
              {"cached_tokens", o.usage.cached_tokens},
              {"reasoning_tokens", o.usage.reasoning_tokens},
              {"completion_tokens", o.usage.completion_tokens},
              {"forced_tokens", o.usage.forced_tokens}}},
            {"seconds", o.seconds},
            {"finish", to_string(o.finish)}};
  if (!o.reason.empty()) j["reason"] = o.reason;
  if (!o.error.empty()) j["error"] = o.error;
  return j;
}

StageOutcome stage_from_json(const nlohmann::json& j) {
  StageOutcome o;
  try {
    const auto stage = stage_from_string(j.at("stage").get<std::string>());
    if (!stage) throw std::invalid_argument("unknown stage " + j.at("stage").dump());
    o.stage = *stage;
    o.verdict = j.value("verdict", json(nullptr));
    o.violation = j.value("violation", false);
    if (j.contains("confidence") && !j["confidence"].is_null()) o.confidence = j["confidence"].get<double>();
    o.reason = j.value("reason", "");
    o.error = j.value("error", "");
    o.seconds = j.value("seconds", 0.0);
    o.finish = finish_from_string(j.value("finish", "stop"));
    const json& u = j.at("usage");
    o.usage.prompt_tokens = u.value("prompt_tokens", 0);
    o.usage.cached_tokens = u.value("cached_tokens", 0);
    o.usage.reasoning_tokens = u.value("reasoning_tokens", 0);
    o.usage.completion_tokens = u.value("completion_tokens", 0);
    o.usage.forced_tokens = u.value("forced_tokens", 0);
  } catch (const json::exception& e) {
    throw std::invalid_argument(std::string("bad stage outcome: ") + e.what());
  }
  return o;
}

nlohmann::json to_json(const EvalItemRecord& item) {
  json policies = json::object();
  for (const auto& r : item.policies) {
    json stages = json::array();
    for (const auto& s : r.stages) stages.push_back(stage_to_json(s));
    policies[r.policy] = {{"expected", r.expected ? *r.expected : json(nullptr)},
                          {"known", r.expected.has_value()},
                          {"verdict", r.verdict},
                          {"violation", r.violation},
                          {"confidence", optional_number(r.confidence)},
                          {"decided_by", r.decided_by ? json(to_string(*r.decided_by)) : json(nullptr)},
                          {"latency", r.latency},
                          {"stages", stages}};
    if (!r.error.empty()) policies[r.policy]["error"] = r.error;
  }
  return {{"id", item.id}, {"policies", policies}};
}

EvalItemRecord eval_item_from_json(const nlohmann::json& j) {
  EvalItemRecord item;
  try {
    item.id = j.at("id").get<std::string>();
    for (const auto& [policy, p] : j.at("policies").items()) {
      EvalPolicyRecord r;
      r.policy = policy;
      if (p.value("known", false)) r.expected = p.at("expected");
      r.verdict = p.value("verdict", json(nullptr));
      r.violation = p.value("violation", false);
      if (p.contains("confidence") && !p["confidence"].is_null()) r.confidence = p["confidence"].get<double>();
      if (p.contains("decided_by") && !p["decided_by"].is_null()) {
        r.decided_by = stage_from_string(p["decided_by"].get<std::string>());
        if (!r.decided_by) throw std::invalid_argument("unknown stage " + p["decided_by"].dump());
      }
      r.latency = p.value("latency", 0.0);
      r.error = p.value("error", "");
      for (const auto& s : p.value("stages", json::array())) r.stages.push_back(stage_from_json(s));
      item.policies.push_back(std::move(r));
    }
  } catch (const json::exception& e) {
    throw std::invalid_argument(std::string("bad item record: ") + e.what());
  }
  return item;
}

nlohmann::json compare_runs(const std::vector<EvalItemRecord>& here, const std::vector<EvalItemRecord>& there,
                            const std::vector<EvalPolicyInfo>& policies) {
  std::map<std::string, const EvalItemRecord*> there_by_id;
  for (const auto& item : there) there_by_id[item.id] = &item;
  std::set<std::string> here_ids;
  json only_here = json::array(), only_there = json::array();
  json out_policies = json::object();
  for (const auto& policy : policies) {
    int compared = 0, fixed = 0, broken = 0;
    json flipped = json::array();
    for (const auto& item : here) {
      const auto it = there_by_id.find(item.id);
      if (it == there_by_id.end()) continue;
      const EvalPolicyRecord* a = item.find(policy.id);
      const EvalPolicyRecord* b = it->second->find(policy.id);
      if (!a || !b) continue;
      ++compared;
      if (a->verdict == b->verdict) continue;
      // The expected answer is the same data in both runs; take either side's.
      EvalPolicyRecord b_expected = *b;
      if (!b_expected.expected) b_expected.expected = a->expected;
      const std::optional<json> expected = a->expected ? a->expected : b->expected;
      EvalPolicyRecord a_expected = *a;
      a_expected.expected = expected;
      const bool here_ok = verdict_matches(a_expected, policy), there_ok = verdict_matches(b_expected, policy);
      if (expected && here_ok && !there_ok) ++fixed;
      if (expected && there_ok && !here_ok) ++broken;
      flipped.push_back({{"id", item.id}, {"here", a->verdict}, {"there", b->verdict},
                         {"expected", expected ? *expected : json(nullptr)}});
    }
    if (compared == 0) continue;
    out_policies[policy.id] = {{"compared", compared}, {"flips", flipped.size()}, {"fixed", fixed}, {"broken", broken},
                               {"flipped", flipped}};
  }
  for (const auto& item : here) {
    here_ids.insert(item.id);
    if (!there_by_id.count(item.id)) only_here.push_back(item.id);
  }
  for (const auto& item : there)
    if (!here_ids.count(item.id)) only_there.push_back(item.id);
  return {{"policies", out_policies}, {"only_here", only_here}, {"only_there", only_there}};
}

}  // namespace arbiter
