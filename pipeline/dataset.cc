#include "pipeline/dataset.h"

#include <fstream>
#include <set>
#include <stdexcept>

namespace arbiter {

namespace {

// 0/1 from a JSON integer or boolean; nullopt for anything else.
std::optional<int> binary_value(const nlohmann::json& v) {
  if (v.is_boolean()) return v.get<bool>() ? 1 : 0;
  if (v.is_number_integer() || v.is_number_unsigned()) {
    const auto n = v.get<int64_t>();
    if (n == 0 || n == 1) return static_cast<int>(n);
  }
  return std::nullopt;
}

}  // namespace

std::optional<nlohmann::json> DatasetItem::expected(const std::string& policy, bool single_policy) const {
  if (const auto it = labels.find(policy); it != labels.end()) return it->second;
  if (single_policy && violation) return nlohmann::json(*violation);
  return std::nullopt;
}

DatasetItem parse_dataset_line(const std::string& line, int line_number) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(line);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::invalid_argument(std::string("not JSON (") + e.what() + ")");
  }
  if (!j.is_object()) throw std::invalid_argument("not a JSON object");
  DatasetItem item;
  item.line = line_number;
  if (const auto it = j.find("id"); it != j.end()) {
    if (it->is_string())
      item.id = it->get<std::string>();
    else if (it->is_number_integer() || it->is_number_unsigned())
      item.id = std::to_string(it->get<int64_t>());
    else
      throw std::invalid_argument("\"id\" must be a string or an integer");
    if (item.id.empty()) throw std::invalid_argument("\"id\" is empty");
  } else {
    item.id = "line-" + std::to_string(line_number);
  }
  const auto content = j.find("content");
  if (content == j.end()) throw std::invalid_argument("no \"content\"");
  if (!content->is_string()) throw std::invalid_argument("\"content\" must be a string");
  item.content = content->get<std::string>();
  if (item.content.empty()) throw std::invalid_argument("\"content\" is empty");
  if (const auto it = j.find("violation"); it != j.end() && !it->is_null()) {
    item.violation = binary_value(*it);
    if (!item.violation) throw std::invalid_argument("\"violation\" must be 0 or 1 (or true/false), got " + it->dump());
  }
  if (const auto it = j.find("labels"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) throw std::invalid_argument("\"labels\" must be an object of policy id -> 0/1 or label");
    for (const auto& [policy, value] : it->items()) {
      if (policy.empty()) throw std::invalid_argument("\"labels\" has an empty policy id");
      if (value.is_null()) continue;  // unknown, as if absent
      if (value.is_string()) {
        if (value.get<std::string>().empty()) throw std::invalid_argument("\"labels\"." + policy + " is an empty label");
        item.labels[policy] = value;
      } else if (const auto b = binary_value(value)) {
        item.labels[policy] = *b;
      } else {
        throw std::invalid_argument("\"labels\"." + policy + " must be 0/1 or a label string, got " + value.dump());
      }
    }
  }
  if (!item.violation && item.labels.empty()) throw std::invalid_argument("no \"violation\" and no \"labels\"");
  return item;
}

Dataset read_dataset(std::istream& in, const DatasetLimits& limits) {
  Dataset out;
  std::set<std::string> ids;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    if (line.size() > limits.max_line_bytes) {
      out.errors.push_back({number, "line longer than " + std::to_string(limits.max_line_bytes) + " bytes"});
      continue;
    }
    try {
      DatasetItem item = parse_dataset_line(line, number);
      if (!ids.insert(item.id).second) {
        out.errors.push_back({number, "duplicate id \"" + item.id + "\""});
        continue;
      }
      if (out.items.size() >= limits.max_items)
        throw std::runtime_error("the dataset has more than " + std::to_string(limits.max_items) + " items");
      out.items.push_back(std::move(item));
    } catch (const std::invalid_argument& e) {
      out.errors.push_back({number, e.what()});
    }
  }
  if (in.bad()) throw std::runtime_error("the dataset could not be read");
  return out;
}

Dataset read_dataset_file(const std::string& path, const DatasetLimits& limits) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open the dataset " + path);
  return read_dataset(in, limits);
}

nlohmann::json to_json(const DatasetItem& item) {
  nlohmann::json j = {{"id", item.id}, {"content", item.content}};
  if (item.violation) j["violation"] = *item.violation;
  if (!item.labels.empty()) {
    nlohmann::json labels = nlohmann::json::object();
    for (const auto& [policy, value] : item.labels) labels[policy] = value;
    j["labels"] = labels;
  }
  return j;
}

}  // namespace arbiter
