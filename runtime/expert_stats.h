// The expert-load statistics file (docs/expert-parallel.md): tokens routed per MoE layer and expert,
// as JSON, written by `arbiter bench --json` (key "expert_load") and GET /v1/stats/experts, read by
// `arbiter placement --stats`:
//
//   {"expert_load": {"experts": 32, "layers": [[tokens of expert 0, 1, ...], ...one row per layer]}}
//
// (the "expert_load" object may also be the whole document).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace arbiter {

// The "expert_load" object for load[layer][expert].
nlohmann::json expert_load_json(const std::vector<std::vector<int64_t>>& load);

// Parses a statistics file's text; errors (std::invalid_argument) name `source` and what is wrong:
// not JSON, no "expert_load" object, a missing or ragged "layers" array, counts that are not
// non-negative integers, "experts" disagreeing with the rows.
std::vector<std::vector<int64_t>> parse_expert_stats(const std::string& text, const std::string& source);
std::vector<std::vector<int64_t>> load_expert_stats(const std::string& path);

// Adds b into a (same shape; a empty: a = b).
void add_expert_load(std::vector<std::vector<int64_t>>& a, const std::vector<std::vector<int64_t>>& b);

}  // namespace arbiter
