// The triage classifier: a fastText model (Debian libfasttext) per policy version that decides the
// obvious cases in microseconds, trained from labelled data or from a reasoning run's verdicts
// (`arbiter triage train`). Its labels are the policy's answers: "0"/"1" or the policy's labels.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace arbiter {

// What the model predicts for one content.
struct TriagePrediction {
  nlohmann::json verdict;  // 0/1 (integer) or the label; null when the model gives no answer
  double probability = 0;  // the model's probability for it, in (0, 1]
};

// A loaded fastText model. Thread-safe to predict with.
class TriageModel {
 public:
  // Throws std::runtime_error naming the file when it cannot be read as a supervised fastText model.
  static std::shared_ptr<const TriageModel> load(const std::string& path);
  ~TriageModel();
  // The most probable answer for `content` (read as triage_text(content)).
  TriagePrediction predict(std::string_view content) const;
  // The answers it knows, as verdicts (0/1 or labels).
  std::vector<nlohmann::json> answers() const;

 private:
  struct Impl;
  explicit TriageModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The text fastText sees for a content, one line: ASCII lower-cased, each ASCII punctuation mark a
// word of its own, runs of whitespace and control characters one space, no space at either end.
// Other bytes (UTF-8) pass unchanged. (`_` is punctuation, so no word can read as a fastText label.)
std::string triage_text(std::string_view content);

// Supervised fastText training: softmax loss, every word kept (minCount 1), no character n-grams.
struct TriageTrainOptions {
  int epochs = 25;            // 1..1000
  double learning_rate = 0.5; // (0, 10]
  int word_ngrams = 2;        // 1..5
  int dimension = 50;         // 1..1000
  int threads = 1;            // 1..256
  int buckets = 100000;       // hash buckets of word n-grams (n >= 2), 1..10,000,000: model size ~ buckets * dimension * 4 bytes
};

struct TriageTrainReport {
  size_t examples = 0;
  std::map<std::string, size_t> per_answer;  // examples per answer ("0", "1", or the label)
};

// Trains on (content, answer) pairs (answer 0/1 or a non-empty label) and writes the model to
// `out_path` (written aside and renamed over it, so a reader never sees half a model). The model's
// labels are `__label__<answer>`, a label's whitespace, control characters and '%' percent-encoded
// (`__label__INVALID%20+%20ESCALATE`); a label "0" or "1" reads back as the integer.
// Throws std::invalid_argument for no examples, fewer than two distinct answers, an answer of
// another kind or options out of range, std::runtime_error when the file cannot be written.
TriageTrainReport train_triage(const std::vector<std::pair<std::string, nlohmann::json>>& examples,
                               const TriageTrainOptions& options, const std::string& out_path);

// The triage models a server may use: files in one folder, each loaded once and kept.
class TriageModels {
 public:
  explicit TriageModels(std::string folder) : folder_(std::move(folder)) {}
  // The model in file `name` (a plain file name: no '/', not "." or ".."), loaded on first use and
  // kept. Throws std::invalid_argument with a clear message when there is no folder, the name is
  // not plain, or the file cannot be loaded. Thread-safe.
  std::shared_ptr<const TriageModel> get(const std::string& name) const;
  const std::string& folder() const { return folder_; }

 private:
  std::string folder_;
  mutable std::mutex mutex_;
  mutable std::map<std::string, std::shared_ptr<const TriageModel>> loaded_;
};

}  // namespace arbiter
