// `arbiter classify`: offline classification with the serving engine (no HTTP). One content
// (--content, one JSON result on stdout) or a JSONL file of {"id", "content"} lines (--input /
// --output: one JSON result per input line, in input order; a bad line gets an "error" row, never
// dropped). Runs on one rank, on thread ranks (--ranks N) or under mpirun, where rank 0 schedules
// and the workers only run steps.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "pipeline/cascade.h"
#include "scheduler/classify.h"
#include "scheduler/serving.h"
#include "tools/arbiter/cli_args.h"
#include "tools/arbiter/commands.h"
#include "tools/arbiter/ranks.h"
#include "tools/arbiter/serving_args.h"

namespace arbiter {
namespace {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// --policy FILE[,FILE...]: each file one policy, its id the file name without extension.
std::vector<ClassifyPolicy> load_policies(const CliArgs& args) {
  const auto labels = split_list(args.get("labels", ""));
  // Score mode: which answers are weighed (auto | binary | labels | json).
  const std::string format_name = args.get("answer-format", "auto");
  AnswerFormat format = AnswerFormat::kAuto;
  if (format_name == "binary") format = AnswerFormat::kBinary;
  else if (format_name == "labels") format = AnswerFormat::kLabels;
  else if (format_name == "json") format = AnswerFormat::kJson;
  else if (format_name != "auto")
    throw std::invalid_argument("--answer-format must be auto, binary, labels or json (got '" + format_name + "')");
  if (format == AnswerFormat::kLabels && labels.empty()) throw std::invalid_argument("--answer-format labels needs --labels");
  const auto violating = split_list(args.get("violating", ""));
  for (const auto& v : violating)
    if (std::find(labels.begin(), labels.end(), v) == labels.end())
      throw std::invalid_argument("--violating label '" + v + "' is not among --labels");
  std::vector<ClassifyPolicy> policies;
  for (const auto& file : split_list(args.require("policy"))) {
    ClassifyPolicy p;
    p.id = std::filesystem::path(file).stem().string();
    for (const auto& other : policies)
      if (other.id == p.id) p.id += "-" + std::to_string(policies.size() + 1);
    p.text = read_text_file(file);
    p.labels = labels;
    p.violating_labels = violating;
    p.format = format;
    policies.push_back(std::move(p));
  }
  if (policies.empty()) throw std::invalid_argument("--policy names no file");
  return policies;
}

// One line of --input, as read: a request or why it could not be one.
struct InputLine {
  nlohmann::json id;         // the line's "id" (null when absent or unreadable)
  std::string content;
  std::string error;         // non-empty: a bad line
};

InputLine parse_input_line(const std::string& line) {
  InputLine in;
  if (line.find_first_not_of(" \t\r") == std::string::npos) {
    in.error = "empty line";
    return in;
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(line);
  } catch (const nlohmann::json::exception& e) {
    in.error = std::string("not valid JSON: ") + e.what();
    return in;
  }
  if (!j.is_object()) {
    in.error = "expected a JSON object with \"content\"";
    return in;
  }
  if (const auto it = j.find("id"); it != j.end()) in.id = *it;
  const auto content = j.find("content");
  if (content == j.end() || !content->is_string()) {
    in.error = content == j.end() ? "no \"content\" field" : "\"content\" must be a string";
    return in;
  }
  in.content = content->get<std::string>();
  return in;
}

// A progress bar on stderr, drawn only when stderr is a terminal.
class ProgressBar {
 public:
  explicit ProgressBar(size_t total) : total_(total), enabled_(::isatty(STDERR_FILENO) == 1) {}
  ~ProgressBar() { finish(); }
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  void advance() {
    ++done_;
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    if (done_ != total_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    drawn_ = true;
    const int width = 30;
    const int filled = total_ ? static_cast<int>(width * done_ / total_) : width;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    std::fprintf(stderr, "\r[%s%s] %zu/%zu  %.1f/s ", std::string(filled, '#').c_str(),
                 std::string(width - filled, '.').c_str(), done_, total_, seconds > 0 ? done_ / seconds : 0.0);
    std::fflush(stderr);
  }
  // Ends the bar's line (before anything else is written to stderr).
  void finish() {
    if (enabled_ && drawn_) std::fputs("\n", stderr);
    drawn_ = false;
  }

 private:
  size_t total_;
  size_t done_ = 0;
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_{};
};

// Writes rows in input order as soon as every earlier row is known, to a file or ("-") stdout.
class OrderedWriter {
 public:
  OrderedWriter(const std::string& path, size_t rows) : rows_(rows) {
    if (path == "-") return;
    file_.open(path, std::ios::binary | std::ios::trunc);
    if (!file_) throw std::runtime_error("cannot write " + path);
    out_ = &file_;
  }
  void put(size_t index, nlohmann::json row) {
    rows_.at(index) = std::move(row);
    while (next_ < rows_.size() && rows_[next_]) {
      *out_ << json_line(*rows_[next_]) << "\n";
      rows_[next_].reset();
      ++next_;
    }
    out_->flush();
  }
  bool complete() const { return next_ == rows_.size(); }

 private:
  std::ofstream file_;
  std::ostream* out_ = &std::cout;
  std::vector<std::optional<nlohmann::json>> rows_;
  size_t next_ = 0;
};

// Everything the completion callbacks of one --input run touch. Shared with the callbacks, so that
// one run late (the step loop failing what is in flight while an error unwinds) still finds it.
struct FileRun {
  FileRun(const std::string& output_path, size_t rows) : writer(output_path, rows), progress(rows) {}
  OrderedWriter writer;
  ProgressBar progress;
  size_t classified = 0, flagged = 0, bad = 0;

  void error(size_t index, const nlohmann::json& id, const std::string& why);
};

void FileRun::error(size_t index, const nlohmann::json& id, const std::string& why) {
  writer.put(index, {{"id", id}, {"line", index + 1}, {"error", why}});
  ++bad;
  progress.advance();
}

struct ClassifyJob {
  std::vector<ClassifyPolicy> policies;
  ReasoningEffort effort = ReasoningEffort::kMedium;
  int max_tokens = 0;
  bool return_reasoning = true;
  ClassifyMode mode = ClassifyMode::kReason;
  ScorePrefix score_prefix = ScorePrefix::kEmptyAnalysis;
  // --effort auto: every policy's cascade, and where its triage model comes from.
  bool cascade = false;
  CascadeConfig cascade_config;
  std::shared_ptr<TriageModels> triage;
};

// Submits one request the way the job asks: to the Classifier, or through the cascade; `done` gets
// the result as JSON (to_json of ClassifyResult or CascadeResult) and whether it was flagged.
class Submitter {
 public:
  Submitter(ServingRank& serving, const ClassifyJob& job) : serving_(serving), job_(job), stages_(serving.classifier()), cascade_(stages_) {
    if (job.cascade && job.cascade_config.has(Stage::kTriage)) triage_ = job.triage->get(job.cascade_config.triage_model);
  }
  SubmitStatus submit(const ClassifyRequest& request, std::function<void(nlohmann::json row, bool flagged)> done, std::string* why) {
    if (!job_.cascade)
      return serving_.classifier().submit(
          request, [done](ClassifyResult r) { done(to_json(r), r.flagged); }, why);
    CascadeRequest c;
    c.base = request;
    for (const auto& p : request.policies) {
      CascadePolicy cp;
      cp.policy = p;
      cp.config = job_.cascade_config;
      if (triage_) cp.triage = [model = triage_](std::string_view content) { return model->predict(content); };
      c.policies.push_back(std::move(cp));
    }
    return cascade_.submit(std::move(c), [done](CascadeResult r) { done(to_json(r), r.result.flagged); }, why);
  }

 private:
  ServingRank& serving_;
  const ClassifyJob& job_;
  ClassifierStages stages_;
  Cascade cascade_;
  std::shared_ptr<const TriageModel> triage_;
};

ClassifyRequest make_request(const ClassifyJob& job, std::string id, std::string content) {
  ClassifyRequest r;
  r.id = std::move(id);
  r.content = std::move(content);
  r.policies = job.policies;
  r.effort = job.effort;
  r.max_tokens = job.max_tokens;
  r.return_reasoning = job.return_reasoning;
  r.mode = job.mode;
  r.score_prefix = job.score_prefix;
  return r;
}

// --content: one request, one JSON result on stdout.
void classify_one(ServingRank& serving, const ClassifyJob& job, const std::string& content) {
  auto result = std::make_shared<std::optional<nlohmann::json>>();
  std::string why;
  Submitter submitter(serving, job);
  const SubmitStatus status =
      submitter.submit(make_request(job, "content", content), [result](nlohmann::json r, bool) { *result = std::move(r); }, &why);
  if (status != SubmitStatus::kAccepted)
    throw std::runtime_error(std::string("request not accepted (") + to_string(status) + "): " + why);
  serving.loop().run_until_idle();
  if (!*result) throw std::runtime_error("the scheduler went idle without finishing the request");
  std::cout << json_line(**result) << "\n";
}

// --input/--output: every line classified, results written in input order. Requests are submitted
// in waves no larger than the scheduler's queue, each run until the scheduler is idle.
void classify_file(ServingRank& serving, const ClassifyJob& job, const std::string& input_path,
                   const std::string& output_path) {
  std::vector<InputLine> lines;
  {
    std::ifstream file;
    if (input_path != "-") {
      file.open(input_path, std::ios::binary);
      if (!file) throw std::runtime_error("cannot read " + input_path);
    }
    std::istream& in = input_path == "-" ? std::cin : file;
    std::string line;
    while (std::getline(in, line)) lines.push_back(parse_input_line(line));
  }
  const auto run = std::make_shared<FileRun>(output_path, lines.size());
  // A policy that leaves no room for content and the answer would fail every line: say so at once.
  // (Score mode generates a handful of tokens: each request's prompts are checked as they come.)
  // (A cascade is checked at its most demanding stage.)
  const ReasoningEffort fit_effort = job.cascade ? stage_effort(job.cascade_config.stages.back()) : job.effort;
  const int fit_tokens = job.cascade ? serving.classifier().generation_tokens(fit_effort, 0, job.cascade_config.budget(job.cascade_config.stages.back()))
                                     : job.max_tokens;
  for (const auto& policy : job.mode == ClassifyMode::kScore ? std::vector<ClassifyPolicy>{} : job.policies)
    if (const PolicyFit fit = serving.classifier().policy_fit(policy.text, fit_effort, fit_tokens); !fit.fits)
      throw std::runtime_error("policy '" + policy.id + "': " + fit.describe());
  // The policies' prefixes are computed once, before the requests that share them arrive (requests
  // admitted together would each compute an uncached prefix). A no-op without prefix caching. A
  // cascade's model stages use their own efforts' prefixes.
  std::vector<ReasoningEffort> efforts = {job.effort};
  if (job.cascade) {
    efforts.clear();
    for (const Stage s : job.cascade_config.stages)
      if (is_model_stage(s) && std::find(efforts.begin(), efforts.end(), stage_effort(s)) == efforts.end())
        efforts.push_back(stage_effort(s));
  }
  for (const auto& policy : job.policies)
    for (const ReasoningEffort effort : efforts) serving.scheduler().warm(serving.classifier().policy_prefix(policy.text, effort));
  serving.loop().run_until_idle();
  const size_t wave = static_cast<size_t>(std::max(1, serving.options().max_queued_requests));
  Submitter submitter(serving, job);
  size_t next = 0;
  while (next < lines.size()) {
    size_t submitted = 0;
    for (; next < lines.size() && submitted < wave; ++next) {
      InputLine& line = lines[next];
      const size_t index = next;
      if (!line.error.empty()) {
        run->error(index, line.id, line.error);
        continue;
      }
      // Input ids may repeat or be missing; the scheduler gets the line number, the output the id.
      ClassifyRequest request = make_request(job, "line-" + std::to_string(index + 1), std::move(line.content));
      const nlohmann::json id = line.id;
      std::string why;
      const SubmitStatus status = submitter.submit(
          request,
          [run, id, index](nlohmann::json row, bool flagged) {
            row["id"] = id;
            row["line"] = index + 1;
            run->flagged += flagged ? 1 : 0;
            ++run->classified;
            run->writer.put(index, std::move(row));
            run->progress.advance();
          },
          &why);
      if (status == SubmitStatus::kQueueFull) break;  // run what is queued, then go on from this line
      if (status != SubmitStatus::kAccepted) {
        run->error(index, id, std::string(to_string(status)) + ": " + why);
        continue;
      }
      ++submitted;
    }
    serving.loop().run_until_idle();
    if (submitted == 0 && next < lines.size() && !serving.scheduler().has_work())
      throw std::runtime_error("the scheduler accepts no request (queue full while idle)");
  }
  run->progress.finish();
  if (!run->writer.complete()) throw std::runtime_error("some requests never finished");
  std::cerr << "classify: " << lines.size() << " lines, " << run->classified << " classified (" << run->flagged
            << " flagged), " << run->bad << " errors\n";
}

}  // namespace

const char* const kClassifyUsage =
    "usage: arbiter classify --model DIR --policy FILE[,FILE...] (--content T | --input IN.jsonl) [options]\n"
    "Classifies offline with the serving engine (no HTTP). --content: one JSON result on stdout. --input: a\n"
    "JSONL file of {\"id\", \"content\"} lines, one JSON result per line in input order (a bad line gets an\n"
    "\"error\" row). Under mpirun (or --ranks N) rank 0 schedules and the other ranks run steps.\n"
    "  --model DIR              checkpoint folder (required)\n"
    "  --policy FILE[,FILE...]  policy files; each policy's id is its file name without extension (required)\n"
    "  --content T              one content to classify\n"
    "  --input IN.jsonl         contents to classify, one {\"id\", \"content\"} per line\n"
    "  --output OUT.jsonl       where the results of --input go (- : stdout, the default)\n"
    "  --effort low|medium|high|auto  reasoning effort (medium); auto: the cascade (pipeline/README.md), each\n"
    "                           result with the stage that decided and every stage's verdict and cost\n"
    "  --cascade JSON           --effort auto: the cascade (default: score, low, high), e.g.\n"
    "                           '{\"stages\": [\"score\", \"high\"], \"thresholds\": {\"score\": 0.95}}'\n"
    "  --triage-dir DIR         where the cascade's \"triage_model\" file is\n"
    "  --max-tokens N           generated tokens per policy (0: the effort's reasoning budget + answer tokens)\n"
    "  --labels A,B,...         the policy answers with one of these labels instead of 0/1\n"
    "  --violating B,...        which of the --labels count as a violation\n"
    "  --no-reasoning           leave the reasoning text out of the results\n"
    "  --mode reason|score      reason (default): reasoning, then the answer; score: no reasoning, each allowed\n"
    "                           answer's probability read after a forced final header (api/README.md)\n"
    "  --score-prefix empty_analysis|direct  score mode: what is forced after the prompt (empty_analysis)\n"
    "  --answer-format auto|binary|labels|json  score mode: the policies' answers (auto: labels when given, JSON\n"
    "                           when the policy text asks for \"violation\", else 0/1)\n"
    "  engine: --device cpu|cuda[:N]|auto (auto) --tokenizer DIR (the model's) --kv-blocks N (0: enough for two\n"
    "          sequences of --max-context, at least 2048) --step-tokens N (256) --step-samples N (64)\n"
    "          --top-logprobs N (20) --no-prefix-cache\n"
    "  --max-context N          prompt + generated tokens per policy (8192)\n"
    "  --reasoning-budget N|L,M,H  reasoning tokens per effort (256,1024,4096); --answer-tokens N after it (256)\n"
    "  --transport auto|threads|mpi|nccl, --ranks N, --placement FILE  expert parallelism (see `arbiter logits --help`)\n";

int cmd_classify(const CliArgs& args) {
  const bool has_content = args.has("content"), has_input = args.has("input");
  if (has_content == has_input) throw std::invalid_argument("give exactly one of --content TEXT and --input FILE.jsonl");
  ClassifyJob job;
  job.policies = load_policies(args);
  const std::string effort = args.get("effort", "medium");
  job.cascade = effort == "auto";
  job.effort = job.cascade ? ReasoningEffort::kLow : parse_reasoning_effort(effort);
  if (args.has("cascade") && !job.cascade) throw std::invalid_argument("--cascade goes with --effort auto");
  if (job.cascade) {
    const std::string text = args.get("cascade", "{}");
    const nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded()) throw std::invalid_argument("--cascade is not JSON: " + text);
    job.cascade_config = parse_cascade(j);
    if (job.cascade_config.has(Stage::kRules))
      throw std::invalid_argument("--cascade: policy files carry no rules here; leave the \"rules\" stage out");
    job.triage = std::make_shared<TriageModels>(args.get("triage-dir", ""));
  }
  if (args.has("triage-dir") && !job.cascade) throw std::invalid_argument("--triage-dir goes with --effort auto");
  job.max_tokens = static_cast<int>(args.get_int("max-tokens", 0));
  if (job.max_tokens < 0) throw std::invalid_argument("--max-tokens must not be negative");
  if (job.max_tokens > 0 && job.cascade) throw std::invalid_argument("--max-tokens does not apply with --effort auto: set the budgets in --cascade");
  job.return_reasoning = !args.flag("no-reasoning");
  // --mode reason (default) | score; --score-prefix empty_analysis (default) | direct.
  const std::string mode = args.get("mode", "reason");
  if (mode == "score" && job.cascade) throw std::invalid_argument("--mode score is a stage of --effort auto's cascade: name it in --cascade");
  if (mode == "score") job.mode = ClassifyMode::kScore;
  else if (mode != "reason") throw std::invalid_argument("--mode must be reason or score (got '" + mode + "')");
  const std::string prefix = args.get("score-prefix", "empty_analysis");
  if (prefix == "direct") job.score_prefix = ScorePrefix::kDirect;
  else if (prefix != "empty_analysis")
    throw std::invalid_argument("--score-prefix must be empty_analysis or direct (got '" + prefix + "')");
  const std::string content = has_content ? args.require("content") : "";
  const std::string input = has_input ? args.require("input") : "";
  const std::string output = has_input ? args.get("output", "-") : "";
  if (has_content && args.has("output")) throw std::invalid_argument("--output goes with --input");
  const ServingOptions options = serving_options(args);
  if (job.max_tokens >= options.max_context)
    throw std::invalid_argument("--max-tokens (" + std::to_string(job.max_tokens) + ") must be below the max context (" +
                                std::to_string(options.max_context) + ")");
  run_ranks(args, [&](const CliArgs& rank_args, const RankContext& rank) {
    rank_args.check_all_used();
    ServingRank serving(options, rank.comm, rank.placement);
    if (!serving.leads()) return serving.serve_workers();
    if (has_content) classify_one(serving, job, content);
    else classify_file(serving, job, input, output);
    serving.loop().stop(true);  // the workers leave serve_workers()
  });
  return 0;
}

}  // namespace arbiter
