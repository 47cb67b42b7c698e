#include "pipeline/policy_file.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>

namespace arbiter {

namespace {

std::vector<std::string> string_list(const nlohmann::json& j, const std::string& field, const std::string& source) {
  if (!j.is_array()) throw std::invalid_argument(source + ": \"" + field + "\" must be a list of strings");
  std::vector<std::string> out;
  std::set<std::string> seen;
  for (const auto& v : j) {
    if (!v.is_string() || v.get<std::string>().empty())
      throw std::invalid_argument(source + ": \"" + field + "\" must hold non-empty strings, got " + v.dump());
    if (!seen.insert(v.get<std::string>()).second)
      throw std::invalid_argument(source + ": \"" + field + "\" repeats \"" + v.get<std::string>() + "\"");
    out.push_back(v.get<std::string>());
  }
  return out;
}

}  // namespace

PolicyFile parse_policy_json(const nlohmann::json& j, const std::string& id, const std::string& source) {
  if (!j.is_object()) throw std::invalid_argument(source + ": a policy file must hold a JSON object");
  static const std::set<std::string> known = {"text", "labels", "violating_labels", "rules", "cascade"};
  for (const auto& [key, value] : j.items())
    if (!known.count(key))
      throw std::invalid_argument(source + ": unknown key \"" + key + "\" (text, labels, violating_labels, rules, cascade)");
  PolicyFile p;
  p.id = id;
  const auto text = j.find("text");
  if (text == j.end() || !text->is_string() || text->get<std::string>().empty())
    throw std::invalid_argument(source + ": \"text\" (the policy) must be a non-empty string");
  p.text = text->get<std::string>();
  if (const auto it = j.find("labels"); it != j.end() && !it->is_null()) p.labels = string_list(*it, "labels", source);
  if (const auto it = j.find("violating_labels"); it != j.end() && !it->is_null()) {
    p.violating_labels = string_list(*it, "violating_labels", source);
    for (const auto& v : p.violating_labels)
      if (std::find(p.labels.begin(), p.labels.end(), v) == p.labels.end())
        throw std::invalid_argument(source + ": violating label \"" + v + "\" is not among \"labels\"");
  }
  if (const auto it = j.find("rules"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) throw std::invalid_argument(source + ": \"rules\" must be an object");
    p.rules = *it;
  }
  if (const auto it = j.find("cascade"); it != j.end() && !it->is_null()) {
    try {
      p.cascade = parse_cascade(*it);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(source + ": \"cascade\": " + e.what());
    }
  }
  return p;
}

PolicyFile load_policy_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read the policy file " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  const std::filesystem::path fs_path(path);
  const std::string id = fs_path.stem().string();
  if (fs_path.extension() == ".json") {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(ss.str());
    } catch (const nlohmann::json::parse_error& e) {
      throw std::invalid_argument(path + ": not JSON (" + e.what() + ")");
    }
    return parse_policy_json(j, id, path);
  }
  PolicyFile p;
  p.id = id;
  p.text = ss.str();
  if (p.text.find_first_not_of(" \t\r\n") == std::string::npos) throw std::invalid_argument(path + ": the policy is empty");
  return p;
}

}  // namespace arbiter
