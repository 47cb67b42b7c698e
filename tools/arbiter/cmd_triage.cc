// `arbiter triage train`: the fastText triage classifier of one policy (pipeline/triage.h) from a
// labelled dataset (pipeline/dataset.h). `arbiter triage bench`: how fast a model of the default
// shape predicts, on synthetic data, on one thread.
#include <stdlib.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "pipeline/dataset.h"
#include "pipeline/triage.h"
#include "runtime/temp_folder.h"
#include "tools/arbiter/cli_args.h"
#include "tools/arbiter/commands.h"

namespace arbiter {

const char* const kTriageUsage =
    "usage: arbiter triage train --dataset FILE.jsonl --policy ID --out MODEL.bin [options]\n"
    "       arbiter triage bench [--contents N] [--tokens N]\n"
    "train: learns a policy's answers (0/1 or its labels) from a labelled dataset (docs/policies.md#triage)\n"
    "and writes a fastText model, the file a policy's cascade names in \"triage_model\" (served from\n"
    "`arbiter serve --triage-dir`). Prints a one-line JSON summary; bad dataset lines are reported on\n"
    "stderr with their line numbers and skipped, items without an answer for the policy are counted.\n"
    "  --dataset FILE.jsonl     labelled dataset: {\"id\", \"content\", \"violation\" or \"labels\"} a line (required)\n"
    "  --policy ID              the policy whose answers to learn: its key in \"labels\"; \"violation\" counts too (required)\n"
    "  --out MODEL.bin          the model file to write (required)\n"
    "  --epochs N               passes over the data (25)\n"
    "  --lr X                   learning rate (0.5)\n"
    "  --word-ngrams N          longest word n-gram used as a feature (2)\n"
    "  --dim N                  dimension of the word vectors (50)\n"
    "  --buckets N              hash buckets for word n-grams; the model is about N * dim * 4 bytes (100000)\n"
    "  --threads N              training threads (1)\n"
    "bench: trains a model of the default shape on synthetic data, then times its predictions on one\n"
    "thread; prints predictions per second of wall time and of the thread's CPU time, and the contents'\n"
    "size in words (after triage_text), as JSON.\n"
    "  --contents N             contents to predict (20000)\n"
    "  --tokens N               words per content (100)\n";

namespace {

long long int_option(const CliArgs& args, const std::string& name, long long fallback, long long low, long long high) {
  const long long v = args.get_int(name, fallback);
  if (v < low || v > high)
    throw std::invalid_argument("--" + name + " must be from " + std::to_string(low) + " to " + std::to_string(high) +
                                ", got " + std::to_string(v));
  return v;
}

double double_option(const CliArgs& args, const std::string& name, double fallback) {
  const std::string v = args.get(name, "");
  if (v.empty()) return fallback;
  size_t pos = 0;
  double x = 0;
  try {
    x = std::stod(v, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (pos != v.size()) throw std::invalid_argument("option --" + name + " expects a number, got '" + v + "'");
  return x;
}

int train(const CliArgs& args) {
  const std::string dataset_path = args.require("dataset");
  const std::string policy = args.require("policy");
  const std::string out_path = args.require("out");
  TriageTrainOptions options;
  options.epochs = static_cast<int>(int_option(args, "epochs", options.epochs, 1, 1000));
  options.learning_rate = double_option(args, "lr", options.learning_rate);
  options.word_ngrams = static_cast<int>(int_option(args, "word-ngrams", options.word_ngrams, 1, 5));
  options.dimension = static_cast<int>(int_option(args, "dim", options.dimension, 1, 1000));
  options.buckets = static_cast<int>(int_option(args, "buckets", options.buckets, 1, 10000000));
  options.threads = static_cast<int>(int_option(args, "threads", options.threads, 1, 256));
  args.check_all_used();
  if (!(options.learning_rate > 0 && options.learning_rate <= 10))
    throw std::invalid_argument("--lr must be above 0 and at most 10");

  const Dataset dataset = read_dataset_file(dataset_path);
  for (const DatasetError& e : dataset.errors)
    std::cerr << "arbiter triage: " << dataset_path << ":" << e.line << ": " << e.message << " (skipped)\n";
  std::vector<std::pair<std::string, nlohmann::json>> examples;
  size_t unlabelled = 0;
  for (const DatasetItem& item : dataset.items) {
    if (auto answer = item.expected(policy, true))
      examples.emplace_back(item.content, std::move(*answer));
    else
      ++unlabelled;
  }
  if (examples.empty())
    throw std::runtime_error(dataset_path + " has no item with an answer for policy \"" + policy + "\"");
  const TriageTrainReport report = train_triage(examples, options, out_path);
  const nlohmann::json summary = {{"policy", policy},
                                  {"examples", report.examples},
                                  {"per_answer", report.per_answer},
                                  {"unlabelled", unlabelled},
                                  {"dataset_errors", dataset.errors.size()},
                                  {"out", out_path}};
  std::cout << json_line(summary) << "\n";
  return 0;
}


// Synthetic text: words drawn from a shared vocabulary, with a class's own words mixed in, and some
// punctuation (which triage_text makes words of their own).
struct SyntheticText {
  std::vector<std::string> vocabulary, class_words[2];
  SyntheticText() {
    for (int i = 0; i < 5000; ++i) vocabulary.push_back("w" + std::to_string(i * 7919 % 100000));
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < 200; ++i) class_words[c].push_back((c ? "spam" : "ham") + std::to_string(i));
  }
  std::string make(std::mt19937& rng, int cls, int words) const {
    std::string s;
    for (int i = 0; i < words; ++i) {
      if (i) s += ' ';
      s += rng() % 4 == 0 ? class_words[cls][rng() % class_words[cls].size()] : vocabulary[rng() % vocabulary.size()];
      if (rng() % 12 == 0) s += ',';  // "word ," after normalisation: punctuation counts as a word
    }
    return s;
  }
};

int bench(const CliArgs& args) {
  const int contents = static_cast<int>(int_option(args, "contents", 20000, 1, 10000000));
  const int tokens = static_cast<int>(int_option(args, "tokens", 100, 1, 100000));
  args.check_all_used();

  const SyntheticText text;
  std::mt19937 rng(1);
  std::vector<std::pair<std::string, nlohmann::json>> examples;
  for (int i = 0; i < 2000; ++i) examples.emplace_back(text.make(rng, i % 2, tokens), i % 2);
  const TempFolder tmp("arbiter-triage-bench");
  const std::string model_path = tmp.file("bench.bin");
  TriageTrainOptions options;  // the default shape; fewer epochs, as they do not change the cost of a prediction
  options.epochs = 5;
  const auto train_start = std::chrono::steady_clock::now();
  train_triage(examples, options, model_path);
  const double train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - train_start).count();
  const auto model = TriageModel::load(model_path);

  std::vector<std::string> inputs;
  inputs.reserve(static_cast<size_t>(contents));
  size_t words = 0, bytes = 0;
  for (int i = 0; i < contents; ++i) {
    inputs.push_back(text.make(rng, i % 2, tokens));
    const std::string line = triage_text(inputs.back());
    words += 1 + static_cast<size_t>(std::count(line.begin(), line.end(), ' '));
    bytes += inputs.back().size();
  }
  model->predict(inputs.front());  // warm-up
  size_t correct = 0;
  // Wall time, and this thread's CPU time (what one core does, whatever else the machine runs).
  timespec cpu_start{}, cpu_end{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu_start);
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < contents; ++i) correct += model->predict(inputs[static_cast<size_t>(i)]).verdict == nlohmann::json(i % 2);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu_end);
  const double cpu_seconds =
      static_cast<double>(cpu_end.tv_sec - cpu_start.tv_sec) + 1e-9 * static_cast<double>(cpu_end.tv_nsec - cpu_start.tv_nsec);
  const nlohmann::json result = {
      {"contents", contents},
      {"words_per_content", static_cast<double>(words) / contents},
      {"bytes_per_content", static_cast<double>(bytes) / contents},
      {"threads", 1},
      {"seconds", seconds},
      {"predictions_per_s", contents / seconds},
      {"us_per_prediction", seconds * 1e6 / contents},
      {"cpu_seconds", cpu_seconds},
      {"predictions_per_cpu_s", contents / cpu_seconds},
      {"accuracy", static_cast<double>(correct) / contents},
      {"model", {{"dim", options.dimension}, {"word_ngrams", options.word_ngrams}, {"buckets", options.buckets},
                 {"bytes", std::filesystem::file_size(model_path)}, {"train_seconds", train_seconds}}}};
  std::cout << result.dump() << "\n";
  return 0;
}

}  // namespace

int cmd_triage(const CliArgs& args) {
  const std::string action = args.word(0);
  if (action == "train") return train(args);
  if (action == "bench") return bench(args);
  throw std::invalid_argument(action.empty() ? "missing action: arbiter triage train|bench (arbiter triage --help)"
                                             : "unknown action '" + action + "': train or bench");
}

}  // namespace arbiter
