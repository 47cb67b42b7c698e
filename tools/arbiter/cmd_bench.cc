// `arbiter bench`: the serving load generator (docs/performance.md). N classify requests over P synthetic
// policies (~500 tokens each) with distinct contents (~100 tokens), reasoning capped at a small
// fixed budget, all submitted at once to the Classifier of one ServingRank and run by the step loop;
// the same workload runs with prefix caching on and off in this process, and the ratios are
// reported (prefill tokens computed, decisions/s), with p50/p99 latency and the step loop's own
// overhead ((scheduler + exchange seconds) / step seconds). A small JSON (--json FILE) and a
// markdown table (stdout). With --mode score the two runs compared are instead reasoning (at low
// effort, within the reasoning budget) and verdict-only scoring, both with prefix caching on.
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel/expert_balance.h"
#include "parallel/mpi_comm.h"
#include "parallel/thread_comm.h"
#include "runtime/config.h"
#include "runtime/expert_stats.h"
#include "runtime/make_model.h"
#include "pipeline/cascade.h"
#include "scheduler/classify.h"
#include "scheduler/serving.h"
#include "tools/arbiter/cli_args.h"
#include "tools/arbiter/commands.h"
#include "tools/arbiter/sweep_svg.h"

namespace arbiter {
namespace {

using Clock = std::chrono::steady_clock;

// What the load generator sends.
struct Workload {
  int requests = 32;
  int policies = 4;
  int policy_tokens = 500;
  int content_tokens = 100;
  int reasoning_tokens = 16;  // budget per sequence (every effort)
  int answer_tokens = 4;      // generated after the forced close
  uint64_t seed = 7;
  ClassifyMode mode = ClassifyMode::kReason;
  // The policies' prefixes are computed inside the timed window (and counted in its prefill tokens).
  // false: before it, as in service, where policies are registered ahead of their traffic.
  bool time_warmup = true;
  // Set: every request goes through the cascade score -> low, score deciding at this confidence.
  std::optional<double> cascade_threshold;
};

// Measurements of one run of the workload.
struct RunReport {
  bool prefix_caching = false;
  ClassifyMode mode = ClassifyMode::kReason;
  std::string label;  // the table's first column (default: the mode)
  std::vector<double> confidences;  // per request, its (first) policy's confidence (score mode)
  int escalated = 0;                // cascade: requests the score stage passed on to reasoning
  double seconds = 0;
  double decisions_per_second = 0;
  double latency_p50 = 0, latency_p99 = 0;
  uint64_t prefill_tokens = 0;   // prompt tokens computed (policy warm-up included)
  uint64_t cached_tokens = 0;    // prompt tokens reused
  uint64_t decode_tokens = 0;
  uint64_t prompt_tokens = 0;    // of the requests
  uint64_t steps = 0;
  double step_seconds = 0, scheduler_seconds = 0, exchange_seconds = 0, forward_seconds = 0;
  double overhead() const { return step_seconds > 0 ? (scheduler_seconds + exchange_seconds) / step_seconds : 0; }
  int errors = 0;
  ExpertLoad expert_load;  // rank 0's routed tokens per layer and expert
};

// Deterministic filler text: words drawn from a small vocabulary until the text is `tokens` long.
std::string synthetic_text(const Tokenizer& tokenizer, std::mt19937_64& rng, const std::string& head, int tokens) {
  static const char* kWords[] = {"content",  "promotional", "message", "link",     "users",   "unsolicited", "account",
                                 "offer",    "repeated",    "posting", "commerce", "severity", "category",   "example",
                                 "deceptive", "automated",  "bulk",    "review",   "signal",  "platform",    "context",
                                 "request",  "violation",   "harm",    "benign",   "label",   "escalate",    "policy"};
  std::string text = head;
  while (static_cast<int>(tokenizer.encode(text).size()) < tokens) {
    for (int i = 0; i < 8; ++i) text += std::string(" ") + kWords[rng() % std::size(kWords)];
    text += rng() % 3 == 0 ? ".\n" : ".";
  }
  return text;
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

ServingOptions workload_options(ServingOptions options, bool prefix_caching, const Workload& w) {
  options.prefix_caching = prefix_caching;
  options.classifier.budgets = {w.reasoning_tokens, w.reasoning_tokens, w.reasoning_tokens};
  options.classifier.answer_tokens = w.answer_tokens;
  return options;
}

RunReport drive_workload(ServingRank& serving, bool prefix_caching, const Workload& w);

RunReport run_workload(const ServingOptions& options, bool prefix_caching, const Workload& w) {
  ServingRank serving(workload_options(options, prefix_caching, w));
  return drive_workload(serving, prefix_caching, w);
}

// Rank 0's part: submits the workload to `serving` (already built with workload_options), runs the
// step loop until every request finished, measures, and stops the loop (which releases the workers).
RunReport drive_workload(ServingRank& serving, bool prefix_caching, const Workload& w) {
  const Tokenizer& tokenizer = serving.tokenizer();
  std::mt19937_64 rng(w.seed);
  std::vector<ClassifyPolicy> policies;
  for (int p = 0; p < w.policies; ++p)
    policies.push_back({"P" + std::to_string(p), synthetic_text(tokenizer, rng, "Policy P" + std::to_string(p) +
                                                                                    ": answer 1 for a violation, else 0.\n",
                                                                w.policy_tokens),
                        {}, {}});
  std::vector<ClassifyRequest> requests;
  for (int i = 0; i < w.requests; ++i) {
    ClassifyRequest r;
    r.id = "bench-" + std::to_string(i);
    r.content = synthetic_text(tokenizer, rng, "Item " + std::to_string(i) + ":", w.content_tokens);
    r.policies = {policies[static_cast<size_t>(i % w.policies)]};
    r.effort = ReasoningEffort::kLow;
    r.return_reasoning = false;
    r.mode = w.mode;
    requests.push_back(std::move(r));
  }

  // What the completion callbacks record; shared with them, so that one run late (the step loop
  // failing what is in flight while an error unwinds) still finds it.
  struct Completions {
    std::vector<double> latencies;
    uint64_t prompt_tokens = 0;
    int errors = 0;
  };
  const auto completions = std::make_shared<Completions>();
  RunReport report;
  report.prefix_caching = prefix_caching;
  report.mode = w.mode;
  // Policies are registered ahead of traffic: their prefixes are computed once (a no-op when
  // prefix caching is off); inside the timed window unless w.time_warmup is false.
  // (The scheduler does not hold back sequences whose prefix another one is computing, so requests
  // submitted before their policy is cached would each compute it.)
  auto warm = [&] {
    for (const auto& p : policies) serving.scheduler().warm(serving.classifier().policy_prefix(p.text, ReasoningEffort::kLow));
    serving.loop().run_until_idle();
  };
  SchedulerStats before;
  StepLoopStats loop_before;
  if (!w.time_warmup) {
    warm();
    before = serving.scheduler().stats();
    loop_before = serving.loop().stats();
  }
  const auto start = Clock::now();
  if (w.time_warmup) warm();
  ClassifierStages stages(serving.classifier());
  Cascade cascade(stages);
  CascadeConfig cascade_config;
  cascade_config.stages = {Stage::kScore, Stage::kLow};
  cascade_config.score_threshold = w.cascade_threshold.value_or(0);
  auto confidences = std::make_shared<std::vector<double>>(requests.size(), -1.0);
  auto escalated = std::make_shared<int>(0);
  for (size_t i = 0; i < requests.size(); ++i) {
    const auto& r = requests[i];
    const auto submitted = Clock::now();
    std::string why;
    auto record = [completions, submitted, confidences, i](const ClassifyResult& result) {
      completions->latencies.push_back(std::chrono::duration<double>(Clock::now() - submitted).count());
      completions->prompt_tokens += static_cast<uint64_t>(result.usage.prompt_tokens);
      if (result.finish == FinishReason::kError) ++completions->errors;
      if (!result.results.empty() && result.results[0].confidence) (*confidences)[i] = *result.results[0].confidence;
    };
    SubmitStatus status;
    if (w.cascade_threshold) {
      CascadeRequest c;
      c.base = r;
      for (const auto& p : r.policies) c.policies.push_back({p, cascade_config, {}, {}});
      status = cascade.submit(std::move(c), [record, escalated](CascadeResult result) {
        record(result.result);
        if (result.policies.size() > 0 && result.policies[0].stages.size() > 1) ++*escalated;
      }, &why);
    } else {
      status = serving.classifier().submit(r, [record](ClassifyResult result) { record(result); }, &why);
    }
    if (status != SubmitStatus::kAccepted)
      throw std::runtime_error("bench request not accepted (" + std::string(to_string(status)) + "): " + why);
  }
  serving.loop().run_until_idle();
  report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const std::vector<double>& latencies = completions->latencies;
  if (static_cast<int>(latencies.size()) != w.requests) throw std::runtime_error("not every bench request finished");
  report.prompt_tokens = completions->prompt_tokens;
  report.errors = completions->errors;
  report.confidences = *confidences;
  report.escalated = *escalated;
  report.decisions_per_second = w.requests / report.seconds;
  report.latency_p50 = percentile(latencies, 0.50);
  report.latency_p99 = percentile(latencies, 0.99);
  const SchedulerStats s = serving.scheduler().stats();
  report.prefill_tokens = s.prefill_tokens - before.prefill_tokens;
  report.cached_tokens = s.cached_tokens - before.cached_tokens;
  report.decode_tokens = s.decode_tokens - before.decode_tokens;
  const StepLoopStats l = serving.loop().stats();
  report.steps = l.steps - loop_before.steps;
  report.step_seconds = l.step_seconds - loop_before.step_seconds;
  report.scheduler_seconds = l.scheduler_seconds - loop_before.scheduler_seconds;
  report.exchange_seconds = l.exchange_seconds - loop_before.exchange_seconds;
  report.forward_seconds = l.forward_seconds - loop_before.forward_seconds;
  serving.loop().stop(true);
  report.expert_load = serving.model().expert_load();
  return report;
}

nlohmann::json to_json(const RunReport& r) {
  return {{"prefix_caching", r.prefix_caching},
          {"mode", to_string(r.mode)},
          {"seconds", r.seconds},
          {"decisions_per_second", r.decisions_per_second},
          {"latency_p50_s", r.latency_p50},
          {"latency_p99_s", r.latency_p99},
          {"prompt_tokens", r.prompt_tokens},
          {"prefill_tokens_computed", r.prefill_tokens},
          {"prompt_tokens_cached", r.cached_tokens},
          {"decode_tokens", r.decode_tokens},
          {"steps", r.steps},
          {"step_seconds", r.step_seconds},
          {"scheduler_seconds", r.scheduler_seconds},
          {"exchange_seconds", r.exchange_seconds},
          {"forward_seconds", r.forward_seconds},
          {"step_loop_overhead", r.overhead()},
          {"errors", r.errors}};
}

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string markdown(const std::vector<const RunReport*>& runs) {
  std::ostringstream t;
  t << "| mode | prefix cache | decisions/s | p50 latency (s) | p99 latency (s) | prefill tokens computed | prompt tokens cached "
       "| decode tokens | steps | step-loop overhead |\n"
    << "|---|---|---|---|---|---|---|---|---|---|\n";
  for (const RunReport* r : runs)
    t << "| " << (r->label.empty() ? to_string(r->mode) : r->label) << " | " << (r->prefix_caching ? "on" : "off") << " | " << fixed(r->decisions_per_second, 2) << " | "
      << fixed(r->latency_p50, 2) << " | " << fixed(r->latency_p99, 2) << " | " << r->prefill_tokens << " | "
      << r->cached_tokens << " | " << r->decode_tokens << " | " << r->steps << " | " << fixed(100 * r->overhead(), 2)
      << "% |\n";
  return t.str();
}

std::string default_tokenizer_dir() {
  if (const char* env = std::getenv("ARBITER_TOKENIZER_DIR")) return env;
  return (std::filesystem::read_symlink("/proc/self/exe").parent_path().parent_path() / ".cache" / "tokenizer").string();
}

// A random model folder removed with the object (the bench's default model).
class TempModel {
 public:
  TempModel(const ModelConfig& config, const std::string& tokenizer_dir) {
    std::random_device rd;
    dir_ = std::filesystem::temp_directory_path() / ("arbiter-bench-" + std::to_string(rd()) + std::to_string(rd()));
    MakeModelOptions o;
    o.tokenizer_dir = tokenizer_dir;
    make_random_model(config, dir_.string(), o);
  }
  ~TempModel() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  TempModel(const TempModel&) = delete;
  TempModel& operator=(const TempModel&) = delete;
  std::string path() const { return dir_.string(); }

 private:
  std::filesystem::path dir_;
};

// The bench's random model shapes: "tiny" (make-model's) and "small", whose layers outweigh the
// 201088-row unembedding per token, as the real models' do.
ModelConfig bench_config(const std::string& preset) {
  ModelConfig c = preset_config("tiny");
  if (preset == "small") {
    c.num_hidden_layers = 8;
    c.hidden_size = 256;
    c.intermediate_size = 1024;
    c.num_local_experts = 8;
    c.num_experts_per_tok = 4;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 2;
    c.head_dim = 64;
    c.sliding_window = 128;
  } else if (preset != "tiny") {
    throw std::invalid_argument("--preset must be tiny or small (not '" + preset + "')");
  }
  c.layer_is_sliding.clear();
  for (int i = 0; i < c.num_hidden_layers; ++i) c.layer_is_sliding.push_back(i % 2 == 0);
  return c;
}

// --mode score: the workload answered with reasoning (low effort, the reasoning budget), then by
// verdict-only scoring, in this process, both with prefix caching on; the ratio of decisions/s.
int report_score_comparison(const ServingOptions& options, Workload w, const ModelConfig& config, const std::string& name,
                            const std::string& json_path) {
  w.mode = ClassifyMode::kReason;
  w.time_warmup = false;  // per-decision cost in service: the policies are cached before their traffic
  std::cerr << "bench: " << w.requests << " requests over " << w.policies << " policies, reasoning (budget "
            << w.reasoning_tokens << ")\n";
  const RunReport reason = run_workload(options, true, w);
  w.mode = ClassifyMode::kScore;
  std::cerr << "bench: the same, verdict-only scoring with the whole lm_head\n";
  ServingOptions full_head = options;
  full_head.classifier.score_restricted_lm_head = false;
  RunReport score_full = run_workload(full_head, true, w);
  score_full.label = "score, whole lm_head";
  std::cerr << "bench: the same, verdict-only scoring with the lm_head on the answers' rows\n";
  RunReport score = run_workload(options, true, w);
  score.label = "score, answers' lm_head rows";
  const double speedup = reason.decisions_per_second > 0 ? score.decisions_per_second / reason.decisions_per_second : 0;
  const double speedup_full = reason.decisions_per_second > 0 ? score_full.decisions_per_second / reason.decisions_per_second : 0;
  nlohmann::json j;
  j["model"] = {{"name", name},
                {"layers", config.num_hidden_layers},
                {"hidden", config.hidden_size},
                {"experts", config.num_local_experts},
                {"vocab", config.vocab_size},
                {"device", options.device}};
  j["workload"] = {{"requests", w.requests},         {"policies", w.policies},
                   {"policy_tokens", w.policy_tokens}, {"content_tokens", w.content_tokens},
                   {"reasoning_tokens", w.reasoning_tokens}, {"answer_tokens", w.answer_tokens}};
  j["reason"] = to_json(reason);
  j["score_whole_lm_head"] = to_json(score_full);
  j["score"] = to_json(score);
  j["ratios"] = {{"decisions_per_second_score_over_reason", speedup},
                 {"decisions_per_second_score_whole_lm_head_over_reason", speedup_full}};
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    if (!out) throw std::runtime_error("cannot write " + json_path);
    out << j.dump(2) << "\n";
  }
  std::cout << "model: " << name << " (" << config.num_hidden_layers << " layers, hidden " << config.hidden_size << ", vocab "
            << config.vocab_size << ") on " << options.device << "; " << w.requests << " requests over " << w.policies
            << " policies of ~" << w.policy_tokens << " tokens, contents ~" << w.content_tokens << " tokens, reasoning at low "
            << "effort capped at " << w.reasoning_tokens << "\n\n"
            << markdown({&reason, &score_full, &score}) << "\nscore vs reason: " << fixed(speedup, 2)
            << "x decisions/s (with the whole lm_head: " << fixed(speedup_full, 2) << "x)\n";
  if (reason.errors || score.errors || score_full.errors) throw std::runtime_error("some bench requests failed");
  return 0;
}

// --mode cascade: the workload answered by reasoning at low effort, then by verdict-only scoring
// (whose confidences set the thresholds), then through the cascade score -> low at the thresholds
// that pass 50%, 20% and 5% of the requests on to reasoning; decisions/s of each over reasoning.
int report_cascade_comparison(const ServingOptions& options, Workload w, const ModelConfig& config, const std::string& name,
                              const std::string& json_path) {
  w.time_warmup = false;
  w.mode = ClassifyMode::kReason;
  std::cerr << "bench: " << w.requests << " requests over " << w.policies << " policies, reasoning (budget " << w.reasoning_tokens
            << ")\n";
  RunReport reason = run_workload(options, true, w);
  reason.label = "reason (low)";
  w.mode = ClassifyMode::kScore;
  std::cerr << "bench: the same, verdict-only scoring\n";
  RunReport score = run_workload(options, true, w);
  score.label = "score";
  std::vector<double> sorted = score.confidences;
  std::sort(sorted.begin(), sorted.end());
  std::vector<RunReport> cascades;
  nlohmann::json levels = nlohmann::json::array();
  w.mode = ClassifyMode::kReason;
  for (const double target : {0.5, 0.2, 0.05}) {
    // Score decides at confidence >= t: t is the confidence below which `target` of the requests lie.
    const size_t k = std::min(sorted.size() - 1, static_cast<size_t>(target * static_cast<double>(sorted.size())));
    w.cascade_threshold = sorted.empty() ? 1.0 : sorted[k];
    std::cerr << "bench: the cascade score -> low, threshold " << fixed(*w.cascade_threshold, 4) << " (target escalation "
              << fixed(100 * target, 0) << "%)\n";
    RunReport c = run_workload(options, true, w);
    c.label = "cascade, " + fixed(100.0 * c.escalated / w.requests, 0) + "% escalated";
    levels.push_back({{"target_escalation", target},
                      {"threshold", *w.cascade_threshold},
                      {"escalated", c.escalated},
                      {"run", to_json(c)},
                      {"decisions_per_second_over_reason", reason.decisions_per_second > 0 ? c.decisions_per_second / reason.decisions_per_second : 0}});
    cascades.push_back(std::move(c));
  }
  nlohmann::json j;
  j["model"] = {{"name", name}, {"layers", config.num_hidden_layers}, {"hidden", config.hidden_size},
                {"experts", config.num_local_experts}, {"vocab", config.vocab_size}, {"device", options.device}};
  j["workload"] = {{"requests", w.requests},         {"policies", w.policies},
                   {"policy_tokens", w.policy_tokens}, {"content_tokens", w.content_tokens},
                   {"reasoning_tokens", w.reasoning_tokens}, {"answer_tokens", w.answer_tokens}};
  j["reason"] = to_json(reason);
  j["score"] = to_json(score);
  j["cascade"] = levels;
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    if (!out) throw std::runtime_error("cannot write " + json_path);
    out << j.dump(2) << "\n";
  }
  std::vector<const RunReport*> rows = {&reason, &score};
  for (const auto& c : cascades) rows.push_back(&c);
  std::cout << "model: " << name << " (" << config.num_hidden_layers << " layers, hidden " << config.hidden_size << ") on "
            << options.device << "; " << w.requests << " requests over " << w.policies << " policies of ~" << w.policy_tokens
            << " tokens, contents ~" << w.content_tokens << " tokens, reasoning at low effort capped at " << w.reasoning_tokens
            << "\n\n"
            << markdown(rows) << "\n";
  for (const auto& l : levels)
    std::cout << "cascade at " << l["escalated"].get<int>() << "/" << w.requests << " escalated: "
              << fixed(l["decisions_per_second_over_reason"].get<double>(), 2) << "x the decisions/s of reasoning\n";
  if (reason.errors || score.errors) throw std::runtime_error("some bench requests failed");
  for (const auto& c : cascades)
    if (c.errors) throw std::runtime_error("some bench requests failed");
  return 0;
}


// --ranks-sweep: the same workload at each rank count (expert parallelism, prefix caching on).
struct SweepPoint {
  int ranks = 1;
  RunReport run;
  // Per step, mean over ranks, milliseconds: the whole forward and its MoE phases (all layers).
  double forward_ms = 0, dispatch_ms = 0, experts_ms = 0, combine_ms = 0, wait_ms = 0;
  double dense_ms() const { return forward_ms - dispatch_ms - experts_ms - combine_ms - wait_ms; }
  double steps_per_rank = 0;
  std::vector<double> bytes_sent;  // per rank, payload to other ranks
  ExpertLoad load;                 // summed over ranks
  std::vector<double> imbalance;   // per layer, under the placement used
};

// One rank's share of a sweep point: builds its ServingRank, runs (rank 0) or serves (workers) the
// workload with phase timers on, and gathers every rank's timers, traffic and expert load to all.
SweepPoint run_sweep_rank(const ServingOptions& options, const Workload& w, Communicator* comm,
                          const std::shared_ptr<const ExpertPlacement>& placement) {
  ServingRank serving(workload_options(options, true, w), comm, placement);
  serving.model().set_profiling(true);
  SweepPoint point;
  point.ranks = comm ? comm->size() : 1;
  if (serving.leads()) point.run = drive_workload(serving, true, w);
  else serving.serve_workers();
  Model& model = serving.model();
  const ForwardPhaseTimes t = model.phase_times();
  const ExpertLoad load = model.expert_load();
  // Fixed-size record per rank: 7 numbers, then the load.
  std::vector<double> mine = {t.forward, t.dispatch, t.experts, t.combine, t.wait, static_cast<double>(t.steps),
                              static_cast<double>(model.bytes_sent_to_peers())};
  for (const auto& row : load)
    for (int64_t v : row) mine.push_back(static_cast<double>(v));
  std::vector<double> all(mine.size() * static_cast<size_t>(point.ranks));
  if (comm) comm->all_gather(mine.data(), mine.size() * sizeof(double), all.data());
  else all = mine;
  const size_t L = load.size(), E = L ? load[0].size() : 0;
  point.load.assign(L, std::vector<int64_t>(E, 0));
  for (int r = 0; r < point.ranks; ++r) {
    const double* rec = all.data() + static_cast<size_t>(r) * mine.size();
    const double steps = std::max(rec[5], 1.0);
    point.forward_ms += 1e3 * rec[0] / steps / point.ranks;
    point.dispatch_ms += 1e3 * rec[1] / steps / point.ranks;
    point.experts_ms += 1e3 * rec[2] / steps / point.ranks;
    point.combine_ms += 1e3 * rec[3] / steps / point.ranks;
    point.wait_ms += 1e3 * rec[4] / steps / point.ranks;
    point.steps_per_rank += rec[5] / point.ranks;
    point.bytes_sent.push_back(rec[6]);
    for (size_t l = 0; l < L; ++l)
      for (size_t e = 0; e < E; ++e) point.load[l][e] += static_cast<int64_t>(rec[7 + l * E + e]);
  }
  if (L) {
    const ExpertPlacement used = placement ? *placement : ExpertPlacement::contiguous(static_cast<int>(E), point.ranks);
    point.imbalance = layer_imbalance(used, point.load);
  }
  return point;
}

nlohmann::json to_json(const SweepPoint& p) {
  double mean_imbalance = 0, worst = 0;
  for (double v : p.imbalance) {
    mean_imbalance += v / static_cast<double>(p.imbalance.size());
    worst = std::max(worst, v);
  }
  return {{"ranks", p.ranks},
          {"decisions_per_second", p.run.decisions_per_second},
          {"seconds", p.run.seconds},
          {"steps_per_rank", p.steps_per_rank},
          {"step_ms", {{"forward", p.forward_ms},
                       {"attention_dense", p.dense_ms()},
                       {"experts", p.experts_ms},
                       {"dispatch", p.dispatch_ms},
                       {"combine", p.combine_ms},
                       {"wait", p.wait_ms}}},
          {"bytes_sent_per_rank", p.bytes_sent},
          {"load_imbalance_mean", mean_imbalance},
          {"load_imbalance_worst", worst},
          {"run", to_json(p.run)},
          {"expert_load", expert_load_json(p.load)}};
}

std::vector<int> parse_rank_list(const std::string& text) {
  std::vector<int> out;
  std::stringstream in(text);
  std::string piece;
  while (std::getline(in, piece, ',')) {
    if (piece.empty() || piece.size() > 4 || !std::all_of(piece.begin(), piece.end(), [](unsigned char c) { return std::isdigit(c); }))
      throw std::invalid_argument("--ranks-sweep takes rank counts like 1,2,4 (got '" + text + "')");
    const int n = std::stoi(piece);
    if (n < 1 || n > 64) throw std::invalid_argument("--ranks-sweep: rank counts must be 1..64 (got " + piece + ")");
    out.push_back(n);
  }
  if (out.empty()) throw std::invalid_argument("--ranks-sweep takes rank counts like 1,2,4");
  return out;
}

// This process's command line (for relaunching it under mpirun).
std::vector<std::string> own_command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::vector<std::string> out;
  std::string arg;
  while (std::getline(in, arg, '\0')) out.push_back(arg);
  return out;
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

int report_ranks_sweep(const ServingOptions& options, const Workload& w, const ModelConfig& config, const std::string& name,
                       const std::string& json_path, const std::vector<int>& counts, const std::string& transport,
                       const std::shared_ptr<const ExpertPlacement>& placement) {
  std::vector<SweepPoint> points;
  if (transport == "mpi" && MpiComm::launched_by_mpirun()) {
    // One point, this job's size (the relaunch below, or a user's own mpirun).
    MpiComm comm;
    if (counts.size() != 1 || counts[0] != comm.size())
      throw std::invalid_argument("under mpirun, --ranks-sweep must be the job's size (" + std::to_string(comm.size()) + ")");
    SweepPoint p;
    try {
      // An untimed pass first (this process's one-time costs), as the thread sweep does.
      Workload warmup = w;
      warmup.requests = std::min(w.requests, 2 * w.policies);
      run_sweep_rank(options, warmup, comm.size() > 1 ? &comm : nullptr, placement);
      p = run_sweep_rank(options, w, comm.size() > 1 ? &comm : nullptr, placement);
    } catch (const std::exception& e) {
      if (comm.size() > 1) comm.abort(e.what());
      throw;
    }
    if (comm.rank() != 0) return 0;
    points.push_back(std::move(p));
  } else if (transport == "mpi") {
    // Each rank count as its own mpirun job of this command; their JSON merged here.
    const std::vector<std::string> self = own_command_line();
    const std::string tmp = json_path.empty() ? "arbiter-sweep" : json_path;
    for (int n : counts) {
      std::string cmd = "OMPI_MCA_plm_rsh_agent= mpirun --oversubscribe --allow-run-as-root -np " + std::to_string(n);
      cmd += " " + shell_quote(std::filesystem::read_symlink("/proc/self/exe").string());
      for (size_t i = 1; i < self.size(); ++i) {
        if (self[i] == "--ranks-sweep" || self[i] == "--json") {
          ++i;
          continue;
        }
        cmd += " " + shell_quote(self[i]);
      }
      const std::string part = tmp + ".ranks" + std::to_string(n) + ".json";
      if (!options.model_dir.empty() && cmd.find("--model") == std::string::npos) cmd += " --model " + shell_quote(options.model_dir);
      cmd += " --ranks-sweep " + std::to_string(n) + " --json " + shell_quote(part);
      std::cerr << "bench: " << cmd << "\n";
      if (std::system(cmd.c_str()) != 0) throw std::runtime_error("the " + std::to_string(n) + "-rank mpirun job failed");
      std::ifstream in(part);
      const nlohmann::json j = nlohmann::json::parse(in);
      std::filesystem::remove(part);
      std::filesystem::remove(std::filesystem::path(part).replace_extension(".svg"));
      SweepPoint p;
      const auto& pt = j.at("points").at(0);
      p.ranks = n;
      p.run.decisions_per_second = pt.at("decisions_per_second").get<double>();
      p.run.seconds = pt.at("seconds").get<double>();
      p.steps_per_rank = pt.at("steps_per_rank").get<double>();
      const auto& ms = pt.at("step_ms");
      p.forward_ms = ms.at("forward").get<double>();
      p.dispatch_ms = ms.at("dispatch").get<double>();
      p.experts_ms = ms.at("experts").get<double>();
      p.combine_ms = ms.at("combine").get<double>();
      p.wait_ms = ms.at("wait").get<double>();
      p.bytes_sent = pt.at("bytes_sent_per_rank").get<std::vector<double>>();
      p.load = parse_expert_stats(pt.dump(), part);
      const ExpertPlacement used = placement ? *placement : ExpertPlacement::contiguous(config.num_local_experts, n);
      p.imbalance = layer_imbalance(used, p.load);
      points.push_back(std::move(p));
    }
  } else {
    for (int n : counts) {
      std::cerr << "bench: " << w.requests << " requests over " << n << " thread rank" << (n > 1 ? "s" : "") << "\n";
      if (placement && placement->num_ranks() != n)
        throw std::invalid_argument("--placement " + placement->source() + " is for " +
                                    std::to_string(placement->num_ranks()) + " ranks; a sweep over " +
                                    std::to_string(n) + " ranks cannot use it");
      if (n == 1) {
        points.push_back(run_sweep_rank(options, w, nullptr, nullptr));
        continue;
      }
      SweepPoint lead;
      run_thread_ranks(n, [&](Communicator& comm) {
        SweepPoint p = run_sweep_rank(options, w, &comm, placement);
        if (comm.rank() == 0) lead = std::move(p);
      });
      points.push_back(std::move(lead));
    }
  }
  nlohmann::json j;
  j["model"] = {{"name", name}, {"layers", config.num_hidden_layers}, {"hidden", config.hidden_size},
                {"experts", config.num_local_experts}, {"experts_per_token", config.num_experts_per_tok},
                {"vocab", config.vocab_size}, {"device", options.device}};
  j["workload"] = {{"requests", w.requests},         {"policies", w.policies},
                   {"policy_tokens", w.policy_tokens}, {"content_tokens", w.content_tokens},
                   {"reasoning_tokens", w.reasoning_tokens}, {"answer_tokens", w.answer_tokens}};
  j["transport"] = transport;
  j["placement"] = placement ? placement->source() : "contiguous";
  j["points"] = nlohmann::json::array();
  for (const auto& p : points) j["points"].push_back(to_json(p));
  j["expert_load"] = expert_load_json(points.front().load);
  std::vector<SweepRow> rows;
  std::ostringstream t;
  t << "| ranks | decisions/s | ms/step: attention+dense | experts | dispatch | combine | waiting | MB sent per rank | load "
       "imbalance (mean / worst layer) |\n|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& p : points) {
    double mb = 0;
    for (double b : p.bytes_sent) mb += b / 1e6 / static_cast<double>(p.bytes_sent.size());
    const nlohmann::json pj = to_json(p);
    t << "| " << p.ranks << " | " << fixed(p.run.decisions_per_second, 2) << " | " << fixed(p.dense_ms(), 2) << " | "
      << fixed(p.experts_ms, 2) << " | " << fixed(p.dispatch_ms, 2) << " | " << fixed(p.combine_ms, 2) << " | "
      << fixed(p.wait_ms, 2) << " | " << fixed(mb, 1) << " | " << fixed(pj["load_imbalance_mean"].get<double>(), 2)
      << " / " << fixed(pj["load_imbalance_worst"].get<double>(), 2) << " |\n";
    rows.push_back({p.ranks, p.run.decisions_per_second, p.dense_ms(), p.experts_ms, p.dispatch_ms, p.combine_ms, p.wait_ms});
  }
  std::cout << "model: " << name << " (" << config.num_hidden_layers << " layers, hidden " << config.hidden_size << ", "
            << config.num_local_experts << " experts top-" << config.num_experts_per_tok << ") on " << options.device
            << ", " << transport << " transport; " << w.requests << " requests over " << w.policies << " policies\n\n"
            << t.str();
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    if (!out) throw std::runtime_error("cannot write " + json_path);
    out << j.dump(2) << "\n";
    const std::string svg = std::filesystem::path(json_path).replace_extension(".svg").string();
    std::ofstream fig(svg);
    if (!fig) throw std::runtime_error("cannot write " + svg);
    fig << ranks_sweep_svg(rows, name + ", " + transport + " transport, " + std::to_string(w.requests) + " requests");
    std::cout << "\nwrote " << json_path << " and " << svg << "\n";
  }
  for (const auto& p : points)
    if (p.run.errors) throw std::runtime_error("some bench requests failed");
  return 0;
}

}  // namespace

const char* const kBenchUsage =
    "usage: arbiter bench [--model DIR | --preset tiny|small] [options]\n"
    "Load generator: N classify requests over P synthetic policies with distinct contents, all submitted at\n"
    "once, run with prefix caching on and then off in the same process; prints decisions/s, latency, tokens\n"
    "and the step-loop overhead of each.\n"
    "  --model DIR              checkpoint folder (default: a random model of --preset, written to a temp folder)\n"
    "  --preset tiny|small      the random model's shape (small)\n"
    "  --requests N             requests (32)\n"
    "  --policies P             distinct policies (4)\n"
    "  --policy-tokens N        tokens per policy (500)\n"
    "  --content-tokens N       tokens per content (100)\n"
    "  --reasoning-tokens N     reasoning budget; the final channel is then forced open (16)\n"
    "  --answer-tokens N        answer tokens after the reasoning (4)\n"
    "  --seed N                 workload seed (7)\n"
    "  --mode score             compare verdict-only scoring with reasoning (both with prefix caching on), and\n"
    "                           scoring with the lm_head restricted to the answers' rows with the whole lm_head\n"
    "  --mode cascade           compare the cascade score -> low at 50%, 20% and 5% escalation with reasoning\n"
    "                           (score and cascade runs time decisions only: the policies are cached before)\n"
    "  --ranks-sweep 1,2,4      run the workload (prefix caching on) at each rank count, expert-parallel, and\n"
    "                           report decisions/s, the step time split (attention/dense, experts, dispatch,\n"
    "                           combine, waiting for peers), bytes each rank sent and the expert-load\n"
    "                           imbalance; with --json also an SVG figure next to the JSON (FILE.svg)\n"
    "  --transport threads|mpi  how the sweep's ranks talk (threads); mpi relaunches this command under\n"
    "                           mpirun -np N for each N\n"
    "  --placement FILE         expert placement for the sweep (one rank count only)\n"
    "  --json FILE              also write the results as JSON (with the routed tokens per layer and\n"
    "                           expert, \"expert_load\": `arbiter placement --stats` reads it)\n"
    "  --quick                  a smoke run for tests (8 requests, 2 short policies)\n"
    "  engine: --device cpu|cuda[:N]|auto (cpu) --tokenizer DIR (.cache/tokenizer) --max-context N (2048)\n"
    "          --step-tokens N (512) --step-samples N (64) --kv-blocks N (0: every request's blocks at once)\n"
    "          --top-logprobs N (5)\n";

int cmd_bench(const CliArgs& args) {
  Workload w;
  auto read_int = [&](const char* flag, int& field, int min) {
    field = static_cast<int>(args.get_int(flag, field));
    if (field < min) throw std::invalid_argument(std::string("--") + flag + " must be at least " + std::to_string(min));
  };
  if (args.flag("quick")) {  // a smoke run for tests
    w.requests = 8;
    w.policies = 2;
    w.policy_tokens = 120;
    w.content_tokens = 20;
    w.reasoning_tokens = 4;
    w.answer_tokens = 2;
  }
  read_int("requests", w.requests, 1);
  read_int("policies", w.policies, 1);
  read_int("policy-tokens", w.policy_tokens, 1);
  read_int("content-tokens", w.content_tokens, 1);
  read_int("reasoning-tokens", w.reasoning_tokens, 0);
  read_int("answer-tokens", w.answer_tokens, 1);
  w.seed = static_cast<uint64_t>(args.get_int("seed", static_cast<long long>(w.seed)));
  // --mode score: compare verdict-only scoring with reasoning (both with prefix caching on).
  const std::string mode = args.get("mode", "");
  if (!mode.empty() && mode != "score" && mode != "cascade")
    throw std::invalid_argument("--mode takes 'score' or 'cascade' (got '" + mode + "')");
  const bool compare_score = mode == "score";
  const std::string json_path = args.get("json", "");
  const bool has_model = args.has("model");
  const std::string preset = args.get("preset", "small");
  ServingOptions options;
  options.device = args.get("device", "cpu");
  options.tokenizer_dir = args.get("tokenizer", default_tokenizer_dir());
  options.max_context = static_cast<int>(args.get_int("max-context", 2048));
  options.max_step_tokens = static_cast<int>(args.get_int("step-tokens", 512));
  options.max_step_samples = static_cast<int>(args.get_int("step-samples", 64));
  options.kv_blocks = static_cast<int>(args.get_int("kv-blocks", 0));
  options.max_queued_requests = std::max(options.max_queued_requests, w.requests);
  options.classifier.top_logprobs = static_cast<int>(args.get_int("top-logprobs", 5));
  options.count_expert_load = true;  // the JSON's "expert_load"; the sweep's imbalance
  const std::string model_arg = has_model ? args.require("model") : "";
  const std::string sweep = args.get("ranks-sweep", "");
  const std::string transport = args.get("transport", "threads");
  const std::string placement_file = args.get("placement", "");
  args.check_all_used();
  if (transport != "threads" && transport != "mpi")
    throw std::invalid_argument("--transport takes threads or mpi (got '" + transport + "')");
  const std::vector<int> sweep_counts = sweep.empty() ? std::vector<int>{} : parse_rank_list(sweep);
  if (sweep.empty() && (args.has("transport") || !placement_file.empty()))
    throw std::invalid_argument("--transport and --placement go with --ranks-sweep");
  const auto placement = placement_file.empty()
                             ? nullptr
                             : std::make_shared<const ExpertPlacement>(ExpertPlacement::load(placement_file));

  std::unique_ptr<TempModel> temp;
  ModelConfig config;
  if (has_model) {
    options.model_dir = model_arg;
    config = load_model_config((std::filesystem::path(model_arg) / "config.json").string());
  } else {
    config = bench_config(preset);
    std::cerr << "bench: writing a random '" << preset << "' model\n";
    temp = std::make_unique<TempModel>(config, options.tokenizer_dir);
    options.model_dir = temp->path();
  }
  if (options.kv_blocks == 0) {
    // Every request's blocks at once, plus the policies' (and room to spare).
    const int per_sequence = (w.policy_tokens + w.content_tokens + 128 + w.reasoning_tokens + 16 + w.answer_tokens) /
                                 options.block_size + 2;
    options.kv_blocks = std::max(256, per_sequence * (w.requests + w.policies) + 1);
  }

  if (!sweep_counts.empty()) {
    const std::string name = has_model ? std::filesystem::path(model_arg).filename().string() : "random-" + preset;
    if (transport == "threads") {
      Workload warmup = w;
      warmup.requests = std::min(w.requests, 2 * w.policies);
      std::cerr << "bench: warm-up pass (" << warmup.requests << " requests, not reported)\n";
      run_workload(options, true, warmup);
    }
    return report_ranks_sweep(options, w, config, name, json_path, sweep_counts, transport, placement);
  }
  // An untimed pass first: the process's first model and steps pay one-time costs (device context,
  // library handles, allocator growth) that would otherwise land on whichever run goes first.
  Workload warmup = w;
  warmup.requests = std::min(w.requests, 2 * w.policies);
  std::cerr << "bench: warm-up pass (" << warmup.requests << " requests, not reported)\n";
  run_workload(options, true, warmup);
  if (compare_score) return report_score_comparison(options, w, config, has_model ? model_arg : "random-" + preset, json_path);
  if (mode == "cascade") return report_cascade_comparison(options, w, config, has_model ? model_arg : "random-" + preset, json_path);
  std::cerr << "bench: " << w.requests << " requests over " << w.policies << " policies, prefix caching on\n";
  const RunReport on = run_workload(options, true, w);
  std::cerr << "bench: the same with prefix caching off\n";
  const RunReport off = run_workload(options, false, w);

  const double prefill_ratio = on.prefill_tokens ? static_cast<double>(off.prefill_tokens) / on.prefill_tokens : 0;
  const double speedup = off.decisions_per_second > 0 ? on.decisions_per_second / off.decisions_per_second : 0;
  nlohmann::json j;
  j["model"] = {{"name", has_model ? std::filesystem::path(model_arg).filename().string() : "random-" + preset},
                {"layers", config.num_hidden_layers},
                {"hidden", config.hidden_size},
                {"intermediate", config.intermediate_size},
                {"experts", config.num_local_experts},
                {"experts_per_token", config.num_experts_per_tok},
                {"heads", config.num_attention_heads},
                {"kv_heads", config.num_key_value_heads},
                {"vocab", config.vocab_size},
                {"device", options.device}};
  j["workload"] = {{"requests", w.requests},         {"policies", w.policies},
                   {"policy_tokens", w.policy_tokens}, {"content_tokens", w.content_tokens},
                   {"reasoning_tokens", w.reasoning_tokens}, {"answer_tokens", w.answer_tokens},
                   {"step_tokens", options.max_step_tokens}, {"step_samples", options.max_step_samples}};
  j["prefix_cache_on"] = to_json(on);
  j["expert_load"] = expert_load_json(on.expert_load);
  j["prefix_cache_off"] = to_json(off);
  j["ratios"] = {{"prefill_tokens_off_over_on", prefill_ratio}, {"decisions_per_second_on_over_off", speedup}};
  j["targets"] = {{"prefill_ratio_at_least_3", prefill_ratio >= 3},
                  {"speedup_at_least_2", speedup >= 2},
                  {"overhead_at_most_5_percent", on.overhead() <= 0.05 && off.overhead() <= 0.05}};
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    if (!out) throw std::runtime_error("cannot write " + json_path);
    out << j.dump(2) << "\n";
  }
  std::cout << "model: " << j["model"]["name"].get<std::string>() << " (" << config.num_hidden_layers << " layers, hidden "
            << config.hidden_size << ", " << config.num_local_experts << " experts top-" << config.num_experts_per_tok
            << ", vocab " << config.vocab_size << ") on " << options.device << "; " << w.requests << " requests over "
            << w.policies << " policies of ~" << w.policy_tokens << " tokens, contents ~" << w.content_tokens
            << " tokens, reasoning capped at " << w.reasoning_tokens << "\n\n"
            << markdown({&on, &off}) << "\nprefix caching on vs off: " << fixed(prefill_ratio, 2)
            << "x fewer prefill tokens computed, " << fixed(speedup, 2) << "x decisions/s\n";
  if (on.errors || off.errors) throw std::runtime_error("some bench requests failed");
  return 0;
}

}  // namespace arbiter
