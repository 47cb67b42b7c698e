#include "pipeline/cascade.h"

#include <algorithm>
#include <set>
#include <stdexcept>

namespace arbiter {

namespace {

using Clock = std::chrono::steady_clock;

constexpr Stage kAllStages[] = {Stage::kRules, Stage::kTriage, Stage::kScore, Stage::kLow, Stage::kMedium, Stage::kHigh};
constexpr int kMaxStageBudget = 1000000;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// A plain file name: no folders, not "." or "..", printable, at most 255 bytes.
bool plain_file_name(const std::string& name) {
  if (name.empty() || name.size() > 255 || name == "." || name == "..") return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return u > 0x20 && u != 0x7f && c != '/' && c != '\\';
  });
}

// The PolicyResult of a stage that decides without the model (rules, triage).
PolicyResult non_model_result(const ClassifyPolicy& policy, const StageOutcome& outcome) {
  PolicyResult r;
  r.policy_id = policy.id;
  r.verdict = outcome.verdict;
  r.confidence = outcome.confidence;
  r.verdict_details = {{"status", "ok"}, {"violation", outcome.violation ? 1 : 0}};
  if (outcome.verdict.is_string()) r.verdict_details["label"] = outcome.verdict;
  if (!outcome.reason.empty()) r.verdict_details["rule_ids"] = nlohmann::json::array({outcome.reason});
  r.final_text = outcome.verdict.is_string() ? outcome.verdict.get<std::string>() : outcome.verdict.dump();
  return r;
}

// Whether `verdict` is a violation under `policy` (triage answers).
bool violates(const ClassifyPolicy& policy, const nlohmann::json& verdict) {
  if (verdict.is_number_integer()) return verdict.get<int>() == 1;
  if (!verdict.is_string()) return false;
  const auto& v = policy.violating_labels;
  return std::find(v.begin(), v.end(), verdict.get<std::string>()) != v.end();
}

// Whether `verdict` is one of the policy's answers (a triage model trained for other labels is wrong).
bool is_answer(const ClassifyPolicy& policy, const nlohmann::json& verdict) {
  if (policy.labels.empty()) return verdict.is_number_integer() && (verdict.get<int>() == 0 || verdict.get<int>() == 1);
  return verdict.is_string() && std::find(policy.labels.begin(), policy.labels.end(), verdict.get<std::string>()) != policy.labels.end();
}

// Where the cascade goes after the stage at `pos` of config.stages routed `r`: high's place for
// kToHigh (unless every stage runs), else the next stage.
size_t next_position(const CascadeConfig& config, size_t pos, Route r, bool run_all_stages) {
  if (r == Route::kToHigh && !run_all_stages)
    return static_cast<size_t>(std::find(config.stages.begin(), config.stages.end(), Stage::kHigh) - config.stages.begin());
  return pos + 1;
}

}  // namespace

const char* to_string(Stage stage) {
  switch (stage) {
    case Stage::kRules:
      return "rules";
    case Stage::kTriage:
      return "triage";
    case Stage::kScore:
      return "score";
    case Stage::kLow:
      return "low";
    case Stage::kMedium:
      return "medium";
    case Stage::kHigh:
      return "high";
  }
  return "?";
}

std::optional<Stage> stage_from_string(std::string_view name) {
  for (const Stage s : kAllStages)
    if (name == to_string(s)) return s;
  return std::nullopt;
}

bool is_model_stage(Stage stage) { return stage != Stage::kRules && stage != Stage::kTriage; }

ReasoningEffort stage_effort(Stage stage) {
  if (stage == Stage::kMedium) return ReasoningEffort::kMedium;
  if (stage == Stage::kHigh) return ReasoningEffort::kHigh;
  return ReasoningEffort::kLow;
}

double CascadeConfig::threshold(Stage stage) const {
  switch (stage) {
    case Stage::kTriage:
      return triage_threshold;
    case Stage::kScore:
      return score_threshold;
    case Stage::kLow:
      return low_threshold;
    case Stage::kMedium:
      return medium_threshold;
    default:
      return 0;
  }
}

int CascadeConfig::budget(Stage stage) const {
  if (stage == Stage::kLow) return low_budget;
  if (stage == Stage::kMedium) return medium_budget;
  if (stage == Stage::kHigh) return high_budget;
  return 0;
}

bool CascadeConfig::has(Stage stage) const { return std::find(stages.begin(), stages.end(), stage) != stages.end(); }

CascadeConfig parse_cascade(const nlohmann::json& j, const CascadeConfig& base, bool allow_model) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("cascade: " + what); };
  if (!j.is_object()) bad("must be a JSON object");
  CascadeConfig c = base;
  for (const auto& [key, value] : j.items()) {
    if (key == "stages") {
      if (!value.is_array() || value.empty()) bad("\"stages\" must be a non-empty array of stage names");
      c.stages.clear();
      for (const auto& s : value) {
        const auto stage = s.is_string() ? stage_from_string(s.get<std::string>()) : std::nullopt;
        if (!stage) bad("unknown stage " + s.dump() + " (rules, triage, score, low, medium, high)");
        if (c.has(*stage)) bad("stage \"" + s.get<std::string>() + "\" appears twice");
        if (!c.stages.empty() && *stage < c.stages.back())
          bad("stages run from cheap to expensive: \"" + s.get<std::string>() + "\" cannot come after \"" +
              to_string(c.stages.back()) + "\" (order: rules, triage, score, low, medium, high)");
        c.stages.push_back(*stage);
      }
    } else if (key == "thresholds") {
      if (!value.is_object()) bad("\"thresholds\" must be an object of stage -> 0..1");
      for (const auto& [name, t] : value.items()) {
        const auto stage = stage_from_string(name);
        if (!stage || *stage == Stage::kRules || *stage == Stage::kHigh)
          bad("\"thresholds\" has no stage \"" + name + "\" (triage, score, low, medium)");
        if (!t.is_number() || t.get<double>() < 0 || t.get<double>() > 1)
          bad("thresholds." + name + " must be a number from 0 to 1, got " + t.dump());
        const double v = t.get<double>();
        if (*stage == Stage::kTriage) c.triage_threshold = v;
        if (*stage == Stage::kScore) c.score_threshold = v;
        if (*stage == Stage::kLow) c.low_threshold = v;
        if (*stage == Stage::kMedium) c.medium_threshold = v;
      }
    } else if (key == "budgets") {
      if (!value.is_object()) bad("\"budgets\" must be an object of stage -> reasoning tokens");
      for (const auto& [name, b] : value.items()) {
        const auto stage = stage_from_string(name);
        if (!stage || (*stage != Stage::kLow && *stage != Stage::kMedium && *stage != Stage::kHigh))
          bad("\"budgets\" has no stage \"" + name + "\" (low, medium, high)");
        if (!b.is_number_integer() || b.get<int64_t>() < 0 || b.get<int64_t>() > kMaxStageBudget)
          bad("budgets." + name + " must be an integer from 0 (the server's budget) to " + std::to_string(kMaxStageBudget) +
              ", got " + b.dump());
        const int v = static_cast<int>(b.get<int64_t>());
        if (*stage == Stage::kLow) c.low_budget = v;
        if (*stage == Stage::kMedium) c.medium_budget = v;
        if (*stage == Stage::kHigh) c.high_budget = v;
      }
    } else if (key == "escalate_violations") {
      if (!value.is_boolean()) bad("\"escalate_violations\" must be true or false");
      c.escalate_violations = value.get<bool>();
    } else if (key == "triage_model") {
      if (!allow_model) bad("\"triage_model\" is set where the policy is registered, not per request");
      if (!value.is_string() || !plain_file_name(value.get<std::string>()))
        bad("\"triage_model\" must be a file name in the server's triage folder (no folders)");
      c.triage_model = value.get<std::string>();
    } else {
      bad("unknown field \"" + key + "\" (stages, thresholds, budgets, escalate_violations, triage_model)");
    }
  }
  if (c.escalate_violations && !c.has(Stage::kHigh)) bad("\"escalate_violations\" needs the \"high\" stage");
  if (c.has(Stage::kTriage) && c.triage_model.empty()) bad("the \"triage\" stage needs a \"triage_model\"");
  return c;
}

nlohmann::json to_json(const CascadeConfig& c) {
  nlohmann::json stages = nlohmann::json::array();
  for (const Stage s : c.stages) stages.push_back(to_string(s));
  nlohmann::json j = {{"stages", stages},
                      {"thresholds",
                       {{"triage", c.triage_threshold}, {"score", c.score_threshold}, {"low", c.low_threshold}, {"medium", c.medium_threshold}}},
                      {"budgets", {{"low", c.low_budget}, {"medium", c.medium_budget}, {"high", c.high_budget}}},
                      {"escalate_violations", c.escalate_violations}};
  if (!c.triage_model.empty()) j["triage_model"] = c.triage_model;
  return j;
}

nlohmann::json to_json(const StageOutcome& o) {
  nlohmann::json j = {{"stage", to_string(o.stage)}, {"verdict", o.verdict}, {"violation", o.violation},
                      {"confidence", o.confidence ? nlohmann::json(*o.confidence) : nlohmann::json(nullptr)},
                      {"seconds", o.seconds}, {"finish_reason", to_string(o.finish)}};
  if (!o.reason.empty()) j["reason"] = o.reason;
  if (is_model_stage(o.stage)) j["usage"] = to_json(o.usage);
  if (!o.error.empty()) j["error"] = o.error;
  return j;
}

nlohmann::json to_json(const CascadeResult& result) {
  nlohmann::json j = to_json(result.result);
  for (size_t i = 0; i < result.policies.size() && i < j["results"].size(); ++i) {
    const CascadePolicyResult& p = result.policies[i];
    j["results"][i]["decided_by"] = p.decided_by ? nlohmann::json(to_string(*p.decided_by)) : nlohmann::json(nullptr);
    nlohmann::json stages = nlohmann::json::array();
    for (const auto& s : p.stages) stages.push_back(to_json(s));
    j["results"][i]["stages"] = stages;
  }
  return j;
}

StageOutcome stage_outcome(Stage stage, const PolicyResult& result, double seconds) {
  StageOutcome o;
  o.stage = stage;
  o.verdict = result.verdict;
  o.violation = result.violation();
  o.confidence = result.confidence;
  o.usage = result.usage;
  o.seconds = seconds;
  o.finish = result.finish;
  o.error = result.error;
  return o;
}

Route route(const CascadeConfig& config, const StageOutcome& outcome, bool last) {
  if (!outcome.has_verdict()) return Route::kNext;
  if (outcome.stage == Stage::kRules) return Route::kDecide;
  if (outcome.violation && config.escalate_violations && outcome.stage != Stage::kHigh && config.has(Stage::kHigh))
    return Route::kToHigh;
  if (last) return Route::kDecide;
  return outcome.confidence.value_or(0) >= config.threshold(outcome.stage) ? Route::kDecide : Route::kNext;
}

TraceDecision decide_on_trace(const CascadeConfig& config, const std::vector<StageOutcome>& trace) {
  TraceDecision d;
  auto index_of = [&](Stage s) -> std::optional<size_t> {
    for (size_t i = 0; i < trace.size(); ++i)
      if (trace[i].stage == s) return i;
    return std::nullopt;
  };
  size_t k = 0;  // position in config.stages
  while (k < config.stages.size()) {
    const Stage stage = config.stages[k];
    const auto i = index_of(stage);
    if (!i) {  // not in the trace: as if it had said nothing
      ++k;
      continue;
    }
    d.ran.push_back(*i);
    const Route r = route(config, trace[*i], k + 1 == config.stages.size());
    if (r == Route::kDecide) {
      d.decided = *i;
      break;
    }
    k = next_position(config, k, r, false);
  }
  return d;
}

// ---------------------------------------------------------------------------------------------

SubmitStatus ClassifierStages::submit(const ClassifyRequest& request, std::function<void(ClassifyResult)> done, std::string* why) {
  return classifier_.submit(request, std::move(done), why);
}

void ClassifierStages::cancel(const std::string& request_id) { classifier_.scheduler().cancel(request_id); }

// One cascade request while it runs. Guarded by `mutex`.
struct Cascade::Run {
  std::mutex mutex;
  CascadeRequest request;
  std::function<void(CascadeResult)> done;
  std::vector<CascadePolicyResult> results;
  std::vector<size_t> position;          // per policy: index into its config.stages of the next stage
  std::vector<bool> finished;            // per policy: no more stages
  std::vector<std::optional<PolicyResult>> decided;  // per policy: the deciding stage's PolicyResult
  std::set<std::string> live;            // model-stage requests in flight
  int rounds = 0;
  bool cancelled = false;
  bool submitting = false;  // a thread is submitting this request's next stages
  bool completed = false;
};

Cascade::~Cascade() = default;

size_t Cascade::in_flight() const {
  std::lock_guard lock(mutex_);
  return runs_.size();
}

SubmitStatus Cascade::submit(CascadeRequest request, std::function<void(CascadeResult)> done, std::string* why) {
  auto fail = [&](SubmitStatus s, const std::string& what) {
    if (why) *why = what;
    return s;
  };
  if (request.policies.empty()) return fail(SubmitStatus::kInvalid, "no policies");
  if (!done) return fail(SubmitStatus::kInvalid, "no completion callback");
  for (const auto& p : request.policies) {
    if (p.config.stages.empty()) return fail(SubmitStatus::kInvalid, "policy " + p.policy.id + ": the cascade has no stages");
    if (p.config.has(Stage::kRules) && !p.rules) return fail(SubmitStatus::kInvalid, "policy " + p.policy.id + ": the rules stage has no rules");
    if (p.config.has(Stage::kTriage) && !p.triage)
      return fail(SubmitStatus::kInvalid, "policy " + p.policy.id + ": the triage stage has no model");
  }
  auto run = std::make_shared<Run>();
  const size_t n = request.policies.size();
  run->request = std::move(request);
  run->done = std::move(done);
  run->results.resize(n);
  run->position.assign(n, 0);
  run->finished.assign(n, false);
  run->decided.resize(n);
  const std::string id = run->request.base.id;
  {
    std::lock_guard lock(mutex_);
    if (runs_.count(id)) return fail(SubmitStatus::kInvalid, "request id '" + id + "' is in use");
    runs_[id] = run;
  }

  // Rules and triage, inline: microseconds each.
  {
    std::lock_guard lock(run->mutex);
    for (size_t i = 0; i < n; ++i) {
      const CascadePolicy& cp = run->request.policies[i];
      auto& pos = run->position[i];
      while (pos < cp.config.stages.size() && !is_model_stage(cp.config.stages[pos]) && !run->finished[i]) {
        const Stage stage = cp.config.stages[pos];
        const auto start = Clock::now();
        StageOutcome o;
        o.stage = stage;
        if (stage == Stage::kRules) {
          if (const auto m = cp.rules(run->request.base.content)) {
            o.verdict = m->verdict;
            o.violation = m->violation;
            o.confidence = 1.0;
            o.reason = m->rule_id;
          }
        } else {
          const TriagePrediction p = cp.triage(run->request.base.content);
          if (is_answer(cp.policy, p.verdict)) {
            o.verdict = p.verdict;
            o.violation = violates(cp.policy, p.verdict);
            o.confidence = p.probability;
          } else {
            o.error = "the triage model answered " + p.verdict.dump() + ", not one of the policy's answers";
          }
        }
        o.seconds = seconds_since(start);
        const bool last = pos + 1 == cp.config.stages.size();
        const Route r = route(cp.config, o, last);
        run->results[i].stages.push_back(o);
        if (r == Route::kDecide && !run->results[i].decided_by) {
          run->results[i].decided_by = stage;
          run->decided[i] = non_model_result(cp.policy, o);
          if (!run->request.run_all_stages) run->finished[i] = true;
        }
        pos = next_position(cp.config, pos, r, run->request.run_all_stages);
      }
      if (pos >= cp.config.stages.size()) run->finished[i] = true;
    }
  }

  // The first model stage(s): their admission is the request's.
  const SubmitStatus s = launch(run, true, why);
  if (s != SubmitStatus::kAccepted) {
    std::lock_guard lock(mutex_);
    runs_.erase(id);
  }
  return s;
}

std::vector<std::pair<Stage, std::vector<size_t>>> Cascade::next_groups(const Run& run) {
  // Policies that need the same stage with the same reasoning budget run as one request.
  std::map<std::pair<Stage, int>, std::vector<size_t>> by_stage;
  for (size_t i = 0; i < run.finished.size(); ++i) {
    if (run.finished[i] || run.cancelled) continue;
    const auto& config = run.request.policies[i].config;
    const Stage s = config.stages[run.position[i]];
    by_stage[{s, config.budget(s)}].push_back(i);
  }
  std::vector<std::pair<Stage, std::vector<size_t>>> groups;
  for (auto& [key, members] : by_stage) groups.emplace_back(key.first, std::move(members));
  return groups;
}

SubmitStatus Cascade::launch(const std::shared_ptr<Run>& run, bool first, std::string* why) {
  // Lock-step: a request's next stages go once nothing of it is in flight, all at once, from one
  // thread at a time (`submitting`); stages that finish while it submits are picked up by its next round.
  bool first_group = first;
  for (;;) {
    std::vector<std::pair<Stage, std::vector<size_t>>> groups;
    {
      std::lock_guard lock(run->mutex);
      if (run->completed || run->submitting || !run->live.empty()) return SubmitStatus::kAccepted;
      groups = next_groups(*run);
      if (groups.empty()) break;
      run->submitting = true;
    }
    for (const auto& [stage, members] : groups) {
      std::string stage_why;
      const SubmitStatus s = submit_stage(run, stage, members, !first_group, &stage_why);
      if (s != SubmitStatus::kAccepted && first_group) {  // nothing of the request runs yet: refuse it
        std::lock_guard lock(run->mutex);
        run->submitting = false;
        if (why) *why = stage_why;
        return s;
      }
      first_group = false;
      if (s == SubmitStatus::kAccepted) continue;
      std::lock_guard lock(run->mutex);
      for (const size_t i : members) {
        StageOutcome o;
        o.stage = stage;
        o.finish = run->cancelled ? FinishReason::kCancelled : FinishReason::kError;
        o.error = stage_why;
        run->results[i].stages.push_back(o);
        if (!run->decided[i]) {
          PolicyResult pr;
          pr.policy_id = run->request.policies[i].policy.id;
          pr.finish = o.finish;
          pr.error = stage_why;
          run->decided[i] = std::move(pr);
        }
        run->finished[i] = true;
      }
    }
    std::lock_guard lock(run->mutex);
    run->submitting = false;
    if (!run->live.empty()) return SubmitStatus::kAccepted;
  }
  finish(run);
  return SubmitStatus::kAccepted;
}

SubmitStatus Cascade::submit_stage(const std::shared_ptr<Run>& run, Stage stage, const std::vector<size_t>& members,
                                   bool continuation, std::string* why) {
  ClassifyRequest r;
  std::string sub_id;
  {
    std::lock_guard lock(run->mutex);
    if (run->cancelled) {
      if (why) *why = "cancelled";
      return SubmitStatus::kInvalid;
    }
    const ClassifyRequest& base = run->request.base;
    r.id = base.id + "/" + to_string(stage) + "/" + std::to_string(run->rounds++);
    r.content = base.content;
    r.deadline = base.deadline;
    r.return_reasoning = base.return_reasoning;
    r.constrain = base.constrain;
    r.score_prefix = base.score_prefix;
    r.continuation = continuation || base.continuation;  // a job item is admitted work from its first stage
    r.background = base.background;
    r.effort = stage_effort(stage);
    r.mode = stage == Stage::kScore ? ClassifyMode::kScore : ClassifyMode::kReason;
    // Policies of one group share the stage; the budget is the first member's (configs that differ
    // in budgets go in separate groups, below).
    r.reasoning_budget = run->request.policies[members.front()].config.budget(stage);
    for (const size_t i : members) r.policies.push_back(run->request.policies[i].policy);
    sub_id = r.id;
    run->live.insert(sub_id);
  }
  const auto started = Clock::now();
  std::weak_ptr<Run> weak = run;
  const SubmitStatus s = stages_.submit(
      r,
      [this, weak, stage, members, started](ClassifyResult result) {
        if (auto run = weak.lock()) stage_done(run, stage, members, std::move(result), started);
      },
      why);
  if (s != SubmitStatus::kAccepted) {
    std::lock_guard lock(run->mutex);
    run->live.erase(sub_id);
  }
  return s;
}

void Cascade::stage_done(const std::shared_ptr<Run>& run, Stage stage, const std::vector<size_t>& members, ClassifyResult result,
                         Clock::time_point started) {
  const double seconds = seconds_since(started);
  {
    std::lock_guard lock(run->mutex);
    run->live.erase(result.id);
    for (size_t k = 0; k < members.size(); ++k) {
      const size_t i = members[k];
      const CascadePolicy& cp = run->request.policies[i];
      PolicyResult pr;
      if (k < result.results.size()) {
        pr = std::move(result.results[k]);
      } else {
        pr.policy_id = cp.policy.id;
        pr.finish = FinishReason::kError;
        pr.error = "no result for this policy";
      }
      const StageOutcome o = stage_outcome(stage, pr, seconds);
      auto& pos = run->position[i];
      const bool last = pos + 1 >= cp.config.stages.size();
      const Route r = route(cp.config, o, last);
      run->results[i].stages.push_back(o);
      const bool ended = pr.finish == FinishReason::kCancelled || pr.finish == FinishReason::kDeadline ||
                         pr.finish == FinishReason::kError || run->cancelled;
      if (r == Route::kDecide && !run->results[i].decided_by) {
        run->results[i].decided_by = stage;
        run->decided[i] = std::move(pr);
        if (!run->request.run_all_stages) run->finished[i] = true;
      } else if (!run->decided[i] && (last || ended)) {
        run->decided[i] = std::move(pr);  // nobody decided: the last stage's result (null verdict) stands
      }
      if (ended) run->finished[i] = true;
      pos = next_position(cp.config, pos, r, run->request.run_all_stages);
      if (pos >= cp.config.stages.size()) run->finished[i] = true;
    }
  }
  launch(run, false, nullptr);
}

void Cascade::finish(const std::shared_ptr<Run>& run) {
  CascadeResult out;
  std::function<void(CascadeResult)> done;
  {
    std::lock_guard lock(run->mutex);
    if (run->completed) return;
    run->completed = true;
    out.id = run->request.base.id;
    out.result.id = out.id;
    for (size_t i = 0; i < run->results.size(); ++i) {
      CascadePolicyResult& r = run->results[i];
      if (run->decided[i]) {
        r.result = std::move(*run->decided[i]);
      } else {
        r.result.policy_id = run->request.policies[i].policy.id;
        r.result.finish = run->cancelled ? FinishReason::kCancelled : FinishReason::kStop;
        r.result.verdict_error = "no stage gave a verdict";
      }
      // The decision's cost is every stage's.
      ClassifyUsage usage;
      for (const auto& s : r.stages) usage += s.usage;
      r.result.usage = usage;
      out.result.flagged = out.result.flagged || r.result.violation();
      out.result.usage += usage;
      if (finish_severity(r.result.finish) > finish_severity(out.result.finish)) out.result.finish = r.result.finish;
      out.result.results.push_back(r.result);
      out.policies.push_back(std::move(r));
    }
    done = std::move(run->done);
  }
  {
    std::lock_guard lock(mutex_);
    runs_.erase(out.id);
  }
  done(std::move(out));
}

void Cascade::cancel(const std::string& id) {
  std::shared_ptr<Run> run;
  {
    std::lock_guard lock(mutex_);
    const auto it = runs_.find(id);
    if (it == runs_.end()) return;
    run = it->second;
  }
  std::vector<std::string> live;
  {
    std::lock_guard lock(run->mutex);
    run->cancelled = true;
    live.assign(run->live.begin(), run->live.end());
  }
  for (const auto& sub : live) stages_.cancel(sub);
}

}  // namespace arbiter
