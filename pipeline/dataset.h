// Labelled datasets (JSONL) for policy evaluation and triage training: one item per line with an
// `id`, the `content`, and its expected answers, either `violation` (0/1: the label of the one
// policy a run evaluates) or `labels` (policy id -> 0/1, or -> a label for label-set policies). A
// policy missing from an item's labels is unknown for that item. A bad line is reported with its
// number and skipped; the rest of the file is still read.
#pragma once

#include <cstddef>
#include <istream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace arbiter {

// One labelled item.
struct DatasetItem {
  int line = 0;  // 1-based line in the file
  std::string id;
  std::string content;
  std::optional<int> violation;                 // `violation`: 0 or 1
  std::map<std::string, nlohmann::json> labels;  // `labels`: policy id -> 0/1 (integer) or a label (string)

  // The expected answer of `policy` (0/1 or a label), or nullopt when unknown for this item.
  // `violation` labels the run's only policy: it applies when `single_policy` is true.
  std::optional<nlohmann::json> expected(const std::string& policy, bool single_policy) const;
};

// A line that could not be read, and why.
struct DatasetError {
  int line = 0;
  std::string message;
};

struct Dataset {
  std::vector<DatasetItem> items;
  std::vector<DatasetError> errors;
};

// Limits on what one dataset may hold (checked while reading, so a huge file is refused early).
struct DatasetLimits {
  size_t max_line_bytes = 1 << 20;
  size_t max_items = 1000000;
};

// Parses one line (`line_number` for messages). Throws std::invalid_argument with a message that
// says what is wrong (not JSON, no content, a label of the wrong type, ...).
DatasetItem parse_dataset_line(const std::string& line, int line_number);

// Reads a whole dataset: blank lines are skipped; bad lines and duplicate ids go to `errors`.
// Throws std::runtime_error only when the stream cannot be read or exceeds `limits.max_items`.
Dataset read_dataset(std::istream& in, const DatasetLimits& limits = {});
Dataset read_dataset_file(const std::string& path, const DatasetLimits& limits = {});

// One item as a dataset line (what parse_dataset_line reads back), for writing datasets
// (`arbiter eval`'s verdicts, `arbiter export`).
nlohmann::json to_json(const DatasetItem& item);

}  // namespace arbiter
