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
  nlohmann::json verdict;  // 0/1 (integer) or the label
  double probability = 0;  // the model's probability for it
};

// A loaded fastText model. Thread-safe to predict with.
class TriageModel {
 public:
  // Throws std::runtime_error naming the file when it cannot be read as a fastText model.
  static std::shared_ptr<const TriageModel> load(const std::string& path);
  ~TriageModel();
  TriagePrediction predict(std::string_view content) const;
  // The answers it knows, as verdicts (0/1 or labels).
  std::vector<nlohmann::json> answers() const;

 private:
  struct Impl;
  explicit TriageModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The text fastText sees for a content (one line: lower-cased, punctuation apart, whitespace one space).
std::string triage_text(std::string_view content);

struct TriageTrainOptions {
  int epochs = 25;
  double learning_rate = 0.5;
  int word_ngrams = 2;
  int dimension = 50;
  int threads = 1;
};

struct TriageTrainReport {
  size_t examples = 0;
  std::map<std::string, size_t> per_answer;  // examples per answer ("0", "1", or the label)
};

// Trains on (content, answer) pairs (answer 0/1 or a label) and writes the model to `out_path`.
// Throws std::invalid_argument for fewer than two distinct answers or no examples,
// std::runtime_error when the file cannot be written.
TriageTrainReport train_triage(const std::vector<std::pair<std::string, nlohmann::json>>& examples,
                               const TriageTrainOptions& options, const std::string& out_path);

// The triage models a server may use: files in one folder, each loaded once and kept.
class TriageModels {
 public:
  explicit TriageModels(std::string folder) : folder_(std::move(folder)) {}
  // The model in file `name` (a plain file name: no folders). Throws std::invalid_argument with a
  // clear message when there is no folder, the name is not plain, or the file cannot be loaded.
  std::shared_ptr<const TriageModel> get(const std::string& name) const;
  const std::string& folder() const { return folder_; }

 private:
  std::string folder_;
  mutable std::mutex mutex_;
  mutable std::map<std::string, std::shared_ptr<const TriageModel>> loaded_;
};

}  // namespace arbiter
