#include "runtime/expert_stats.h"

#include <fstream>
#include <sstream>
#include <stdexcept>

namespace arbiter {

nlohmann::json expert_load_json(const std::vector<std::vector<int64_t>>& load) {
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& row : load) layers.push_back(row);
  return {{"experts", load.empty() ? 0 : load[0].size()}, {"layers", layers}};
}

std::vector<std::vector<int64_t>> parse_expert_stats(const std::string& text, const std::string& source) {
  auto fail = [&](const std::string& why) -> void { throw std::invalid_argument(source + ": " + why); };
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("not valid JSON (") + e.what() + ")");
  }
  const nlohmann::json* stats = &doc;
  if (doc.is_object() && doc.contains("expert_load")) stats = &doc["expert_load"];
  if (!stats->is_object() || !stats->contains("layers"))
    fail("no \"expert_load\" object with \"layers\" (write one with arbiter bench --json or GET /v1/stats/experts)");
  const nlohmann::json& layers = (*stats)["layers"];
  if (!layers.is_array() || layers.empty()) fail("\"layers\" must be a non-empty array of per-expert token counts");
  std::vector<std::vector<int64_t>> load;
  for (size_t l = 0; l < layers.size(); ++l) {
    const nlohmann::json& row = layers[l];
    if (!row.is_array() || row.empty()) fail("layer " + std::to_string(l) + " is not a non-empty array of counts");
    std::vector<int64_t> counts;
    for (const auto& v : row) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0)
        fail("layer " + std::to_string(l) + ": counts must be non-negative integers (got " + v.dump() + ")");
      counts.push_back(v.get<int64_t>());
    }
    if (!load.empty() && counts.size() != load[0].size())
      fail("layer " + std::to_string(l) + " has " + std::to_string(counts.size()) + " experts, layer 0 has " +
           std::to_string(load[0].size()));
    load.push_back(std::move(counts));
  }
  if (stats->contains("experts")) {
    const nlohmann::json& e = (*stats)["experts"];
    if (!e.is_number_integer() || e.get<int64_t>() != static_cast<int64_t>(load[0].size()))
      fail("\"experts\" is " + e.dump() + " but the rows have " + std::to_string(load[0].size()) + " experts");
  }
  return load;
}

std::vector<std::vector<int64_t>> load_expert_stats(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read expert statistics file " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_expert_stats(ss.str(), path);
}

void add_expert_load(std::vector<std::vector<int64_t>>& a, const std::vector<std::vector<int64_t>>& b) {
  if (a.empty()) {
    a = b;
    return;
  }
  if (a.size() != b.size()) throw std::invalid_argument("add_expert_load: layer counts differ");
  for (size_t l = 0; l < a.size(); ++l) {
    if (a[l].size() != b[l].size()) throw std::invalid_argument("add_expert_load: expert counts differ");
    for (size_t e = 0; e < a[l].size(); ++e) a[l][e] += b[l][e];
  }
}

}  // namespace arbiter
