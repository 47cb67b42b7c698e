#include "api/moderation_api.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "api/errors.h"
#include "api/json_io.h"

namespace arbiter::api {

namespace {

constexpr int kMaxCategories = 32;

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::invalid_argument("cannot read " + path.string());
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

std::vector<std::string> string_list(const nlohmann::json& j, const std::string& where) {
  if (!j.is_array()) throw std::invalid_argument(where + " must be an array of strings");
  std::vector<std::string> out;
  for (const auto& v : j) {
    if (!v.is_string() || v.get<std::string>().empty()) throw std::invalid_argument(where + " must hold non-empty strings");
    out.push_back(v.get<std::string>());
  }
  return out;
}

// The probability of a violation in a result: score mode, the violating answers' share; reasoning,
// the verdict's confidence for a violation and its complement otherwise.
double violation_probability(const ClassifyPolicy& policy, const PolicyResult& r) {
  if (!r.scores.empty()) {
    double p = 0;
    for (const auto& [answer, share] : r.scores)
      if (answer == "1" || std::find(policy.violating_labels.begin(), policy.violating_labels.end(), answer) != policy.violating_labels.end())
        p += share;
    return p;
  }
  if (r.verdict.is_null()) return 0;
  const double confidence = r.confidence.value_or(1.0);
  return r.violation() ? confidence : 1.0 - confidence;
}

}  // namespace

ModerationConfig load_moderation_config(const std::string& path) {
  const std::string where = "moderation config " + path;
  const nlohmann::json j = nlohmann::json::parse(read_text(path), nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw std::invalid_argument(where + ": not a JSON object");
  ModerationConfig c;
  for (const auto& [key, value] : j.items()) {
    if (key == "mode") {
      if (value == "score") c.mode = ClassifyMode::kScore;
      else if (value == "reason") c.mode = ClassifyMode::kReason;
      else throw std::invalid_argument(where + ": \"mode\" must be \"score\" or \"reason\"");
    } else if (key == "effort") {
      if (value == "low") c.effort = ReasoningEffort::kLow;
      else if (value == "medium") c.effort = ReasoningEffort::kMedium;
      else if (value == "high") c.effort = ReasoningEffort::kHigh;
      else throw std::invalid_argument(where + ": \"effort\" must be \"low\", \"medium\" or \"high\"");
    } else if (key == "threshold") {
      if (!value.is_number() || value.get<double>() < 0 || value.get<double>() > 1)
        throw std::invalid_argument(where + ": \"threshold\" must be a number from 0 to 1");
      c.threshold = value.get<double>();
    } else if (key == "max_inputs") {
      if (!value.is_number_integer() || value.get<int64_t>() < 1 || value.get<int64_t>() > 2048)
        throw std::invalid_argument(where + ": \"max_inputs\" must be an integer from 1 to 2048");
      c.max_inputs = static_cast<int>(value.get<int64_t>());
    } else if (key == "categories") {
      if (!value.is_object() || value.empty() || value.size() > kMaxCategories)
        throw std::invalid_argument(where + ": \"categories\" must be an object of 1 to " + std::to_string(kMaxCategories) +
                                    " categories");
      for (const auto& [name, spec] : value.items()) {
        const std::string at = where + ": categories." + name;
        if (!PolicyRegistry::valid_id(name)) throw std::invalid_argument(at + ": a category name is 1-128 letters, digits, '_', '-', '.'");
        if (!spec.is_object()) throw std::invalid_argument(at + " must be an object");
        ModerationCategory cat;
        cat.name = name;
        cat.policy.id = name;
        int sources = 0;
        for (const auto& [field, v] : spec.items()) {
          if (field == "policy") {
            cat.registered = v.is_string() ? PolicyRegistry::parse_ref(v.get<std::string>()) : std::nullopt;
            if (!cat.registered) throw std::invalid_argument(at + ".policy must be a policy id or id@version");
            ++sources;
          } else if (field == "text" || field == "text_file") {
            if (!v.is_string() || v.get<std::string>().empty()) throw std::invalid_argument(at + "." + field + " must be a non-empty string");
            cat.policy.text = field == "text" ? v.get<std::string>()
                                              : read_text(std::filesystem::path(path).parent_path() / v.get<std::string>());
            if (cat.policy.text.empty()) throw std::invalid_argument(at + "." + field + ": the policy text is empty");
            ++sources;
          } else if (field == "labels") {
            cat.policy.labels = string_list(v, at + ".labels");
          } else if (field == "violating_labels") {
            cat.policy.violating_labels = string_list(v, at + ".violating_labels");
          } else {
            throw std::invalid_argument(at + ": unknown field \"" + field + "\" (policy, text, text_file, labels, violating_labels)");
          }
        }
        if (sources != 1) throw std::invalid_argument(at + ": give exactly one of \"policy\", \"text\" and \"text_file\"");
        for (const auto& l : cat.policy.violating_labels)
          if (std::find(cat.policy.labels.begin(), cat.policy.labels.end(), l) == cat.policy.labels.end())
            throw std::invalid_argument(at + ": violating label \"" + l + "\" is not one of its labels");
        c.categories.push_back(std::move(cat));
      }
    } else {
      throw std::invalid_argument(where + ": unknown field \"" + key + "\" (categories, mode, effort, threshold, max_inputs)");
    }
  }
  if (c.categories.empty()) throw std::invalid_argument(where + ": no \"categories\"");
  return c;
}

std::vector<std::string> moderation_inputs(const wire::ModerationRequest& body, const ModerationConfig& config) {
  std::vector<std::string> inputs;
  const auto& in = body.input();
  if (in.kind_case() == google::protobuf::Value::kStringValue) {
    inputs.push_back(in.string_value());
  } else if (in.kind_case() == google::protobuf::Value::kListValue) {
    for (int i = 0; i < in.list_value().values_size(); ++i) {
      const auto& v = in.list_value().values(i);
      if (v.kind_case() != google::protobuf::Value::kStringValue)
        throw bad_request("Each input must be a string (text moderation).", "input[" + std::to_string(i) + "]", "invalid_type");
      inputs.push_back(v.string_value());
    }
  } else {
    throw bad_request("'input' must be a string or an array of strings.", "input", "invalid_type");
  }
  if (inputs.empty()) throw bad_request("'input' must not be empty.", "input", "empty_input");
  if (static_cast<int>(inputs.size()) > config.max_inputs)
    throw bad_request("At most " + std::to_string(config.max_inputs) + " inputs per request (got " + std::to_string(inputs.size()) + ").",
                      "input", "too_many_inputs");
  for (size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].empty())
      throw bad_request("Inputs must be non-empty strings.", inputs.size() == 1 ? "input" : "input[" + std::to_string(i) + "]",
                        "empty_input");
  return inputs;
}

std::vector<ClassifyPolicy> moderation_policies(const ModerationConfig& config, const PolicyRegistry& registry) {
  std::vector<ClassifyPolicy> out;
  for (const auto& cat : config.categories) {
    ClassifyPolicy p = cat.policy;
    if (cat.registered) {
      const auto stored = registry.get(*cat.registered);
      if (!stored)
        throw ApiException({500, "The moderation category '" + cat.name + "' names the policy '" + cat.registered->id +
                                     (cat.registered->version ? "@" + std::to_string(*cat.registered->version) : "") +
                                     "', which is not registered.",
                            "server_error", "", "moderation_policy_missing", 0});
      p.text = stored->draft.text;
      p.labels = stored->draft.labels;
      p.violating_labels = stored->draft.violating_labels;
    }
    p.id = cat.name;
    out.push_back(std::move(p));
  }
  return out;
}

wire::ModerationResult moderation_result(const ModerationConfig& config, const std::vector<ClassifyPolicy>& policies,
                                         const ClassifyResult& result) {
  wire::ModerationResult w;
  nlohmann::json types = nlohmann::json::object();
  bool flagged = false;
  for (size_t i = 0; i < config.categories.size() && i < result.results.size() && i < policies.size(); ++i) {
    const ModerationCategory& cat = config.categories[i];
    const double p = violation_probability(policies[i], result.results[i]);
    const bool hit = p >= config.threshold && !(result.results[i].verdict.is_null() && result.results[i].scores.empty());
    (*w.mutable_categories())[cat.name] = hit;
    (*w.mutable_category_scores())[cat.name] = p;
    types[cat.name] = nlohmann::json::array({"text"});
    flagged = flagged || hit;
  }
  w.set_flagged(flagged);
  *w.mutable_category_applied_input_types() = to_struct(types);
  return w;
}

}  // namespace arbiter::api
