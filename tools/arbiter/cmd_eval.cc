// `arbiter eval`: evaluates policies on a labelled dataset (pipeline/dataset.h) with the serving
// engine. Every item runs through the Classifier (score or reason mode at one effort) or, with
// --effort auto, through the cascade with every stage run (the verdict is the one routing picks),
// in windows of --concurrency items. Writes DIR/items.jsonl (one record per item, appended window by
// window, so --resume can skip what is done), DIR/report.json and DIR/report.html
// (pipeline/eval_report.h), DIR/verdicts.jsonl (the verdicts as a dataset) and, with --compare,
// DIR/compare.json.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "api/decisions_api.h"
#include "api/pg_decision_store.h"
#include "api/pg_util.h"
#include "api/policy_registry.h"
#include "api/sqlite_decision_store.h"
#include "pipeline/cascade.h"
#include "pipeline/dataset.h"
#include "pipeline/eval_report.h"
#include "pipeline/policy_file.h"
#include "scheduler/classify.h"
#include "scheduler/serving.h"
#include "tools/arbiter/cli_args.h"
#include "tools/arbiter/commands.h"
#include "tools/arbiter/serving_args.h"

namespace arbiter {

const char* const kEvalUsage =
    "usage: arbiter eval --model DIR --dataset FILE.jsonl --policy FILE|ID [--policy ...] --out DIR [options]\n"
    "Evaluates policies on a labelled dataset (docs/policies.md, \"Evaluating a policy\"): precision, recall\n"
    "and F1 with bootstrap intervals, confusion matrices, cost per stage, agreement with high effort and,\n"
    "with --effort auto, a sweep of the cascade's thresholds. Writes DIR/report.json, DIR/report.html,\n"
    "DIR/items.jsonl (per item and policy: expected, verdict, deciding stage, stages) and DIR/verdicts.jsonl\n"
    "(the verdicts as a dataset).\n"
    "  --model DIR              checkpoint folder (required)\n"
    "  --dataset FILE.jsonl     labelled items: {\"id\", \"content\", \"violation\": 0|1} or {..., \"labels\":\n"
    "                           {policy: 0|1|label}}; bad lines are reported and skipped (required)\n"
    "  --policy FILE|ID         a policy (repeat, or a comma-separated list): a text file, a .json file\n"
    "                           {\"text\", \"labels\", \"violating_labels\", \"rules\", \"cascade\"} (id: the file name\n"
    "                           without extension), or ID / ID@VERSION from --policy-db (required)\n"
    "  --policy-db FILE         the policy registry database (`arbiter serve --policy-db`), read only\n"
    "  --out DIR                where the results go (required)\n"
    "  --mode score|reason      fixed-effort runs: score (verdict only) or reason (default)\n"
    "  --effort low|medium|high|auto  reasoning effort (medium); auto: every cascade stage runs, the verdict is\n"
    "                           the one the cascade's routing picks (each policy's \"cascade\", else score -> low\n"
    "                           -> high; a policy with \"rules\" and no cascade starts with its rules)\n"
    "  --triage-dir DIR         where the cascades' \"triage_model\" files are\n"
    "  --concurrency N          items in flight at once (16)\n"
    "  --resume                 keep the items already in DIR/items.jsonl and run only the rest\n"
    "  --decision-log DB        also keep every verdict in the decision log DB (an `arbiter serve --db` SQLite file or\n"
    "                           postgres:// URL): API key id \"eval\", request id eval-RUN-ITEM, the content as its hash\n"
    "  --compare DIR2           diff this run's verdicts with another run's (DIR2/items.jsonl), per policy id (one\n"
    "                           policy on each side: those two): DIR/compare.json\n"
    "  --target-agreement X     the sweep's target agreement with high effort (0.95)\n"
    "  --seed N                 bootstrap seed (1); --bootstrap N resamples per interval (1000; 0: none)\n"
    "  engine: --device cpu|cuda[:N]|auto (auto) --tokenizer DIR (the model's) --kv-blocks N (0: enough for two\n"
    "          sequences of --max-context, at least 2048) --step-tokens N (256) --step-samples N (64)\n"
    "          --top-logprobs N (20) --no-prefix-cache\n"
    "  --max-context N          prompt + generated tokens per policy (8192)\n"
    "  --reasoning-budget N|L,M,H  reasoning tokens per effort (256,1024,4096); --answer-tokens N after it (256)\n";

namespace {

using json = nlohmann::json;
using api::ContentStorage;
using api::DecisionLogSettings;
using api::DecisionRecord;
using api::DecisionStore;

// --policy values: files, else (with --policy-db) registry ids. Ids are made unique by a suffix.
std::vector<PolicyFile> load_policies(const CliArgs& args) {
  std::vector<std::string> refs;
  for (const auto& value : args.get_all("policy"))
    for (const auto& r : split_list(value)) refs.push_back(r);
  if (refs.empty()) throw std::invalid_argument("missing required option --policy");
  const std::string db = args.get("policy-db", "");
  std::unique_ptr<api::PolicyRegistry> registry;
  std::vector<PolicyFile> out;
  for (const auto& ref : refs) {
    PolicyFile p;
    if (std::filesystem::is_regular_file(ref)) {
      p = load_policy_file(ref);
    } else if (!db.empty()) {
      if (!registry) registry = std::make_unique<api::PolicyRegistry>(db, true);
      const auto parsed = api::PolicyRegistry::parse_ref(ref);
      if (!parsed) throw std::invalid_argument("--policy " + ref + ": neither a file nor a policy id (ID or ID@VERSION)");
      const auto stored = registry->get(*parsed);
      if (!stored) throw std::invalid_argument("--policy " + ref + ": no such file, and no such policy in " + db);
      p.id = stored->draft.id;
      p.text = stored->draft.text;
      p.labels = stored->draft.labels;
      p.violating_labels = stored->draft.violating_labels;
      p.rules = stored->draft.rules;
      if (!stored->draft.cascade.is_null()) p.cascade = parse_cascade(stored->draft.cascade);
    } else {
      throw std::invalid_argument("--policy " + ref + ": no such file (give --policy-db to look up a policy id)");
    }
    for (const auto& other : out)
      if (other.id == p.id) p.id += "-" + std::to_string(out.size() + 1);
    out.push_back(std::move(p));
  }
  return out;
}

// A line on stderr that redraws itself ("\r12/40"), only when stderr is a terminal.
class Progress {
 public:
  Progress(size_t done, size_t total) : done_(done), total_(total), enabled_(::isatty(STDERR_FILENO) == 1) {}
  ~Progress() {
    if (enabled_ && drawn_) std::fputs("\n", stderr);
  }
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;
  void advance(size_t n) {
    done_ += n;
    if (!enabled_) return;
    drawn_ = true;
    std::fprintf(stderr, "\reval %zu/%zu", done_, total_);
    std::fflush(stderr);
  }

 private:
  size_t done_, total_;
  bool enabled_;
  bool drawn_ = false;
};

std::vector<EvalItemRecord> read_items(const std::string& path, bool required) {
  std::vector<EvalItemRecord> out;
  std::ifstream in(path);
  if (!in) {
    if (required) throw std::runtime_error("cannot read " + path);
    return out;
  }
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      out.push_back(eval_item_from_json(json::parse(line)));
    } catch (const std::exception& e) {
      // A line cut short by an interrupted run: that item runs again.
      std::cerr << "eval: " << path << " line " << number << " skipped: " << e.what() << "\n";
    }
  }
  return out;
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out || !(out << text) || !out.flush()) throw std::runtime_error("cannot write " + path);
}

struct EvalJob {
  std::vector<PolicyFile> files;
  std::vector<EvalPolicyInfo> infos;
  bool automatic = false;  // --effort auto
  ReasoningEffort effort = ReasoningEffort::kMedium;
  ClassifyMode mode = ClassifyMode::kReason;
  std::vector<CascadePolicy> cascade;  // automatic: per policy
  size_t window = 16;
  // --decision-log: each verdict is also kept there, as `arbiter serve` keeps a request's.
  DecisionStore* decisions = nullptr;
  std::string run_id;      // request ids are eval-<run_id>-<item id>
  std::string model_name;
};

// The eval's verdicts as the decision log keeps a request's: content as its hash, no reasoning.
DecisionRecord eval_decision(const EvalJob& job, const PolicyResult& result, const ClassifyPolicy& policy, const DatasetItem& item,
                             const std::string& effort, const std::string& mode, double latency_s) {
  static const DecisionLogSettings kSettings = [] {
    DecisionLogSettings s;
    s.content = ContentStorage::kHash;
    s.store_reasoning = false;
    return s;
  }();
  const int64_t now_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  DecisionRecord d = api::decision_record(result, policy, item.content, std::nullopt, kSettings, now_ms);
  d.api_key_id = "eval";
  d.request_id = "eval-" + job.run_id + "-" + item.id;
  d.model = job.model_name;
  d.effort = effort;
  d.mode = mode;
  d.latency_ms = latency_s * 1000;
  return d;
}

ClassifyPolicy classify_policy(const PolicyFile& p) {
  ClassifyPolicy c;
  c.id = p.id;
  c.text = p.text;
  c.labels = p.labels;
  c.violating_labels = p.violating_labels;
  return c;
}

// Where the records of one window land, by item index within the window.
struct WindowResults {
  std::vector<std::optional<EvalItemRecord>> records;
  std::vector<DecisionRecord> decisions;  // --decision-log
  std::vector<std::chrono::steady_clock::time_point> started;
};

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

EvalItemRecord failed_record(const EvalJob& job, const DatasetItem& item, const std::string& why) {
  EvalItemRecord r{item.id, {}};
  for (const auto& p : job.infos) {
    EvalPolicyRecord pr;
    pr.policy = p.id;
    pr.expected = item.expected(p.id, job.infos.size() == 1);
    pr.error = why;
    r.policies.push_back(std::move(pr));
  }
  return r;
}

// Runs one window of items to completion and returns their records in order.
std::vector<EvalItemRecord> run_window(ServingRank& serving, Cascade* cascade, const EvalJob& job,
                                       const std::vector<const DatasetItem*>& items) {
  auto results = std::make_shared<WindowResults>();
  results->records.resize(items.size());
  results->started.resize(items.size());
  const bool single = job.infos.size() == 1;
  for (size_t i = 0; i < items.size(); ++i) {
    const DatasetItem& item = *items[i];
    ClassifyRequest base;
    base.id = "eval-" + std::to_string(i) + "-" + item.id;
    base.content = item.content;
    base.return_reasoning = false;
    std::vector<std::optional<json>> expected;
    for (const auto& p : job.infos) expected.push_back(item.expected(p.id, single));
    results->started[i] = std::chrono::steady_clock::now();
    std::string why;
    SubmitStatus status;
    if (job.automatic) {
      CascadeRequest request;
      request.base = std::move(base);
      request.policies = job.cascade;
      request.run_all_stages = true;
      status = cascade->submit(std::move(request), [results, i, expected, id = item.id, &job, &item](CascadeResult r) {
        EvalItemRecord record{id, {}};
        const double latency = seconds_since(results->started[i]);
        for (size_t k = 0; k < r.policies.size(); ++k) {
          const CascadePolicyResult& c = r.policies[k];
          EvalPolicyRecord pr;
          pr.policy = c.result.policy_id;
          pr.expected = k < expected.size() ? expected[k] : std::nullopt;
          pr.verdict = c.result.verdict;
          pr.violation = c.result.violation();
          pr.confidence = c.result.confidence;
          pr.decided_by = c.decided_by;
          pr.stages = c.stages;
          pr.latency = latency;
          pr.error = c.result.error;
          record.policies.push_back(std::move(pr));
          if (job.decisions && k < job.cascade.size())
            results->decisions.push_back(eval_decision(job, c.result, job.cascade[k].policy, item, "auto",
                                                       c.decided_by ? to_string(*c.decided_by) : "none", latency));
        }
        results->records[i] = std::move(record);
      }, &why);
    } else {
      base.effort = job.effort;
      base.mode = job.mode;
      for (const auto& p : job.files) base.policies.push_back(classify_policy(p));
      const Stage stage = job.mode == ClassifyMode::kScore ? Stage::kScore
                          : job.effort == ReasoningEffort::kLow  ? Stage::kLow
                          : job.effort == ReasoningEffort::kHigh ? Stage::kHigh
                                                                 : Stage::kMedium;
      status = serving.classifier().submit(base, [results, i, expected, stage, id = item.id, &job, &item](ClassifyResult r) {
        EvalItemRecord record{id, {}};
        const double latency = seconds_since(results->started[i]);
        for (size_t k = 0; k < r.results.size(); ++k) {
          const PolicyResult& p = r.results[k];
          const StageOutcome o = stage_outcome(stage, p, latency);
          EvalPolicyRecord pr;
          pr.policy = p.policy_id;
          pr.expected = k < expected.size() ? expected[k] : std::nullopt;
          pr.verdict = p.verdict;
          pr.violation = o.violation;
          pr.confidence = p.confidence;
          if (o.has_verdict()) pr.decided_by = stage;
          pr.latency = latency;
          pr.error = p.error;
          pr.stages = {std::move(o)};
          record.policies.push_back(std::move(pr));
          if (job.decisions && k < job.files.size())
            results->decisions.push_back(eval_decision(job, p, classify_policy(job.files[k]), item, to_string(job.effort),
                                                       job.mode == ClassifyMode::kScore ? "score" : "reasoning", latency));
        }
        results->records[i] = std::move(record);
      }, &why);
    }
    if (status != SubmitStatus::kAccepted)
      results->records[i] = failed_record(job, item, std::string(to_string(status)) + (why.empty() ? "" : ": " + why));
  }
  serving.loop().run_until_idle();
  // The window's verdicts in the decision log, in one transaction.
  if (job.decisions && !results->decisions.empty()) job.decisions->append(results->decisions);
  std::vector<EvalItemRecord> out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (!results->records[i]) throw std::runtime_error("item " + items[i]->id + " never finished");
    out.push_back(std::move(*results->records[i]));
  }
  return out;
}

// Prints the figures people look at first.
void print_summary(const json& report, const std::string& out_dir) {
  char buf[256];
  for (const auto& [id, p] : report.at("policies").items()) {
    auto num = [](const json& v) { return v.is_number() ? v.get<double>() : -1.0; };
    std::snprintf(buf, sizeof buf, "%s: tp %d fp %d tn %d fn %d unknown %d  precision %.3f recall %.3f f1 %.3f", id.c_str(),
                  p.at("tp").get<int>(), p.at("fp").get<int>(), p.at("tn").get<int>(), p.at("fn").get<int>(),
                  p.at("unknown").get<int>(), num(p.at("precision")), num(p.at("recall")), num(p.at("f1")));
    std::cout << buf << "\n";
  }
  const json& acc = report.at("accuracy");
  if (acc.at("value").is_number()) {
    std::snprintf(buf, sizeof buf, "accuracy %.3f over %d items", acc.at("value").get<double>(), acc.at("items").get<int>());
    std::cout << buf << "\n";
  }
  if (const json& best = report.at("sweep"); best.is_object() && best.at("best").is_object()) {
    const json& b = best.at("best");
    std::cout << "sweep: cheapest thresholds reaching agreement " << best.at("target_agreement") << ": score "
              << b.at("score") << ", low " << b.at("low") << " (" << b.at("cost") << " tokens)\n";
  }
  std::cout << "report: " << (std::filesystem::path(out_dir) / "report.json").string() << "\n";
}

}  // namespace

int cmd_eval(const CliArgs& args) {
  EvalJob job;
  job.files = load_policies(args);
  const std::string dataset_path = args.require("dataset");
  const std::string out_dir = args.require("out");
  const std::string effort = args.get("effort", "medium");
  const std::string mode = args.get("mode", "reason");
  if (mode == "score") job.mode = ClassifyMode::kScore;
  else if (mode != "reason") throw std::invalid_argument("--mode must be score or reason (got '" + mode + "')");
  job.automatic = effort == "auto";
  if (job.automatic && args.has("mode")) throw std::invalid_argument("--mode goes with a fixed --effort, not auto");
  if (!job.automatic) job.effort = parse_reasoning_effort(effort);
  const long long concurrency = args.get_int("concurrency", 16);
  if (concurrency < 1) throw std::invalid_argument("--concurrency must be at least 1");
  const bool resume = args.flag("resume");
  const std::string triage_dir = args.get("triage-dir", "");
  const std::string compare_dir = args.get("compare", "");
  const std::string decision_log = args.get("decision-log", "");
  EvalOptions options;
  options.seed = static_cast<uint64_t>(args.get_int("seed", 1));
  options.bootstrap = static_cast<int>(args.get_int("bootstrap", 1000));
  if (options.bootstrap < 0 || options.bootstrap > 100000) throw std::invalid_argument("--bootstrap must be in 0..100000");
  options.target_agreement = std::stod(args.get("target-agreement", "0.95"));
  if (!(options.target_agreement >= 0 && options.target_agreement <= 1))
    throw std::invalid_argument("--target-agreement must be in 0..1");
  const ServingOptions serving_opts = serving_options(args);
  args.check_all_used();

  // The policies' cascades (auto), before any model loads.
  const TriageModels triage_models(triage_dir);
  for (const auto& f : job.files) {
    EvalPolicyInfo info{f.id, f.labels, f.violating_labels, f.cascade.value_or(CascadeConfig{})};
    if (job.automatic) {
      CascadePolicy c;
      c.policy = classify_policy(f);
      c.config = info.cascade;
      // A policy with rules and no cascade of its own starts with its rules (as in `arbiter serve`).
      if (!f.cascade && !f.rules.is_null()) c.config.stages.insert(c.config.stages.begin(), Stage::kRules);
      info.cascade = c.config;
      if (c.config.has(Stage::kRules)) {
        if (f.rules.is_null()) throw std::invalid_argument("policy " + f.id + ": the cascade has a rules stage but the policy has no \"rules\"");
        const auto rules = PolicyRules::compile(f.rules, f.labels, f.violating_labels);
        c.rules = [rules](std::string_view content) { return rules->match(content); };
      }
      if (c.config.has(Stage::kTriage)) {
        const auto model = triage_models.get(c.config.triage_model);
        c.triage = [model](std::string_view content) { return model->predict(content); };
      }
      job.cascade.push_back(std::move(c));
    }
    job.infos.push_back(std::move(info));
  }

  Dataset dataset = read_dataset_file(dataset_path);
  for (const auto& e : dataset.errors) std::cerr << "eval: " << dataset_path << " line " << e.line << ": " << e.message << "\n";
  std::filesystem::create_directories(out_dir);
  const std::string items_path = (std::filesystem::path(out_dir) / "items.jsonl").string();

  // --resume: the records already written for items of this dataset that cover every policy.
  std::map<std::string, EvalItemRecord> done;
  if (resume) {
    for (auto& r : read_items(items_path, false)) {
      bool complete = true;
      for (const auto& p : job.infos) complete = complete && r.find(p.id) != nullptr;
      if (complete) done[r.id] = std::move(r);
    }
  }
  std::vector<const DatasetItem*> todo;
  {
    std::ofstream items_out(items_path, std::ios::binary | std::ios::trunc);
    if (!items_out) throw std::runtime_error("cannot write " + items_path);
    size_t kept = 0;
    for (const auto& item : dataset.items) {
      if (const auto it = done.find(item.id); it != done.end()) {
        items_out << json_line(to_json(it->second)) << "\n";
        ++kept;
      } else {
        todo.push_back(&item);
      }
    }
    if (resume) std::cerr << "eval: resuming: " << kept << " items done, " << todo.size() << " to run\n";
  }

  std::vector<EvalItemRecord> fresh;
  if (!todo.empty()) {
    ServingRank serving(serving_opts);
    std::unique_ptr<DecisionStore> decisions;
    if (!decision_log.empty()) {
      decisions = api::pg::is_url(decision_log) ? std::unique_ptr<DecisionStore>(std::make_unique<api::PgDecisionStore>(decision_log))
                                                : std::make_unique<api::SqliteDecisionStore>(decision_log);
      job.decisions = decisions.get();
      job.run_id = std::to_string(
          std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
      job.model_name = serving.model_name();
    }
    job.window = static_cast<size_t>(std::min<long long>(concurrency, std::max(1, serving.options().max_queued_requests)));
    // The policies' prefixes, computed once before the requests that share them.
    for (size_t i = 0; i < job.files.size(); ++i) {
      const PolicyFile& f = job.files[i];
      if (job.automatic) {
        for (Stage s : job.infos[i].cascade.stages)
          if (is_model_stage(s)) serving.scheduler().warm(serving.classifier().policy_prefix(f.text, stage_effort(s)));
      } else {
        serving.scheduler().warm(serving.classifier().policy_prefix(
            f.text, job.mode == ClassifyMode::kScore ? ReasoningEffort::kLow : job.effort));
      }
    }
    serving.loop().run_until_idle();
    ClassifierStages stages(serving.classifier());
    std::unique_ptr<Cascade> cascade = job.automatic ? std::make_unique<Cascade>(stages) : nullptr;
    Progress progress(done.size(), dataset.items.size());
    std::ofstream items_out(items_path, std::ios::binary | std::ios::app);
    for (size_t start = 0; start < todo.size(); start += job.window) {
      const std::vector<const DatasetItem*> window(todo.begin() + static_cast<std::ptrdiff_t>(start),
                                                   todo.begin() + static_cast<std::ptrdiff_t>(std::min(todo.size(), start + job.window)));
      for (auto& r : run_window(serving, cascade.get(), job, window)) {
        items_out << json_line(to_json(r)) << "\n";
        fresh.push_back(std::move(r));
      }
      items_out.flush();
      if (!items_out) throw std::runtime_error("cannot write " + items_path);
      progress.advance(window.size());
    }
    serving.loop().stop(true);
  }

  // Every record of this dataset, in dataset order.
  for (auto& r : fresh) done[r.id] = std::move(r);
  EvalRun run;
  run.policies = job.infos;
  run.dataset_errors = dataset.errors;
  run.options = options;
  std::vector<DatasetItem> verdict_items;
  for (const auto& item : dataset.items) {
    const auto it = done.find(item.id);
    if (it == done.end()) continue;
    run.records.push_back(it->second);
    DatasetItem v;
    v.id = item.id;
    v.content = item.content;
    for (const auto& p : it->second.policies)
      if (!p.verdict.is_null()) v.labels[p.policy] = p.verdict;
    if (!v.labels.empty()) verdict_items.push_back(std::move(v));
  }
  json policy_meta = json::array();
  for (const auto& f : job.files) policy_meta.push_back(f.id);
  run.meta = {{"model", serving_opts.model_dir},     {"dataset", dataset_path},
              {"policies", policy_meta},             {"mode", job.automatic ? "cascade" : mode},
              {"effort", effort},                    {"concurrency", concurrency},
              {"reasoning_budgets", {serving_opts.classifier.budgets.low, serving_opts.classifier.budgets.medium,
                                     serving_opts.classifier.budgets.high}}};
  if (job.automatic) {
    json cascades = json::object();
    for (const auto& p : job.infos) cascades[p.id] = to_json(p.cascade);
    run.meta["cascades"] = cascades;
  }
  const json report = eval_report(run);
  const std::filesystem::path dir(out_dir);
  write_file((dir / "report.json").string(), report.dump(2, ' ', false, json::error_handler_t::replace) + "\n");
  write_file((dir / "report.html").string(), report_html(report));
  {
    std::string text;
    for (const auto& v : verdict_items) text += json_line(to_json(v)) + "\n";
    write_file((dir / "verdicts.jsonl").string(), text);
  }
  print_summary(report, out_dir);

  if (!compare_dir.empty()) {
    auto there = read_items((std::filesystem::path(compare_dir) / "items.jsonl").string(), true);
    // One policy on each side under different ids (two files, e.g. spam.txt and spam-v2.txt): the
    // same policy in two versions, compared as one.
    std::set<std::string> there_ids;
    for (const auto& item : there)
      for (const auto& p : item.policies) there_ids.insert(p.policy);
    if (job.infos.size() == 1 && there_ids.size() == 1 && *there_ids.begin() != job.infos[0].id)
      for (auto& item : there)
        for (auto& p : item.policies) p.policy = job.infos[0].id;
    const json diff = compare_runs(run.records, there, job.infos);
    write_file((dir / "compare.json").string(), diff.dump(2, ' ', false, json::error_handler_t::replace) + "\n");
    for (const auto& [id, p] : diff.at("policies").items()) {
      std::cout << "compare " << id << ": " << p.at("flips") << " of " << p.at("compared") << " items flipped (" << p.at("fixed")
                << " fixed, " << p.at("broken") << " broken)\n";
      for (const auto& f : p.at("flipped"))
        std::cout << "  " << f.at("id").get<std::string>() << ": " << json_line(f.at("here")) << " here, " << json_line(f.at("there"))
                  << " there, expected " << json_line(f.at("expected")) << "\n";
    }
    if (!diff.at("only_here").empty() || !diff.at("only_there").empty())
      std::cout << "compare: " << diff.at("only_here").size() << " items only here, " << diff.at("only_there").size()
                << " only there\n";
  }
  return 0;
}

}  // namespace arbiter
