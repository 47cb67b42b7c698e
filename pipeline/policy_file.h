// Policies given as files (`arbiter eval --policy FILE`): a text file holds the policy text; a .json
// file holds {"text", "labels", "violating_labels", "rules", "cascade"}. The policy's id is the file
// name without its extension. Errors name the file and the field.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "pipeline/cascade.h"

namespace arbiter {

struct PolicyFile {
  std::string id;
  std::string text;
  std::vector<std::string> labels;
  std::vector<std::string> violating_labels;
  nlohmann::json rules;               // null: none (compiled by whoever runs the rules stage)
  std::optional<CascadeConfig> cascade;  // the file's cascade over the defaults; nullopt: none given
};

// Parses the JSON form; `source` names it in errors. Throws std::invalid_argument: not an object,
// unknown keys, no or empty text, labels not a list of distinct non-empty strings, violating labels
// not among the labels, a bad cascade (parse_cascade's message).
PolicyFile parse_policy_json(const nlohmann::json& j, const std::string& id, const std::string& source);
// Reads a policy file (.json: parse_policy_json; anything else: the whole file is the text). Throws
// std::runtime_error when it cannot be read, std::invalid_argument when its content is wrong.
PolicyFile load_policy_file(const std::string& path);

}  // namespace arbiter
