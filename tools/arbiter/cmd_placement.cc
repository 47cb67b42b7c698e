// `arbiter placement`: writes a per-layer expert placement that balances measured expert load
// (parallel/expert_balance.h) from a statistics file (runtime/expert_stats.h), and reports the
// predicted imbalance (the most loaded rank's tokens over the mean) before and after.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <numeric>
#include <stdexcept>

#include "parallel/expert_balance.h"
#include "runtime/expert_stats.h"
#include "tools/arbiter/commands.h"

namespace arbiter {
namespace {

std::string fixed(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", v);
  return buf;
}

// "mean X, worst Y (layer L)" of per-layer imbalances.
std::string summary(const std::vector<double>& per_layer) {
  const double mean = std::accumulate(per_layer.begin(), per_layer.end(), 0.0) / static_cast<double>(per_layer.size());
  const auto worst = std::max_element(per_layer.begin(), per_layer.end());
  return "mean " + fixed(mean) + ", worst " + fixed(*worst) + " (layer " +
         std::to_string(worst - per_layer.begin()) + ")";
}

}  // namespace

const char* const kPlacementUsage =
    "usage: arbiter placement --stats FILE --ranks N --out FILE.placement [options]\n"
    "Writes an expert placement that balances measured expert load per layer (each layer's experts,\n"
    "heaviest first, to the least loaded rank with room), for `--placement` of logits, generate,\n"
    "classify, serve and bench. Prints the predicted imbalance (most loaded rank's tokens / mean) of\n"
    "the current placement and of the new one.\n"
    "  --stats FILE             expert-load statistics: `arbiter bench --json` output or GET /v1/stats/experts\n"
    "  --ranks N                ranks the placement is for\n"
    "  --out FILE               where to write the placement\n"
    "  --capacity N             most experts one rank may hold per layer (default: ceil(experts / ranks));\n"
    "                           larger values allow uneven counts\n"
    "  --from FILE              the current placement to compare with (default: contiguous blocks)\n";

int cmd_placement(const CliArgs& args) {
  const std::string stats_path = args.require("stats"), out_path = args.require("out");
  const long long ranks = args.get_int("ranks", 0);
  if (!args.has("ranks") || ranks < 1) throw std::invalid_argument("--ranks N (at least 1) is required");
  const long long capacity = args.get_int("capacity", 0);
  if (capacity < 0) throw std::invalid_argument("--capacity must be positive");
  const std::string from = args.get("from", "");
  args.check_all_used();

  const auto load = load_expert_stats(stats_path);
  const int experts = static_cast<int>(load[0].size()), layers = static_cast<int>(load.size());
  const ExpertPlacement current = from.empty() ? ExpertPlacement::contiguous(experts, static_cast<int>(ranks))
                                               : ExpertPlacement::load(from);
  current.check_fits(experts, layers, static_cast<int>(ranks));
  const ExpertPlacement next = balanced_placement(load, static_cast<int>(ranks), static_cast<int>(capacity), out_path);
  int64_t tokens = 0;
  for (const auto& row : load) tokens = std::accumulate(row.begin(), row.end(), tokens);
  std::ofstream out(out_path);
  if (!out) throw std::runtime_error("cannot write " + out_path);
  out << "# Balanced from " << stats_path << " (" << tokens << " routed tokens over " << layers << " layers) for "
      << ranks << " ranks; predicted imbalance (most loaded rank / mean) " << summary(layer_imbalance(next, load))
      << ".\n"
      << next.to_text();
  if (!out) throw std::runtime_error("cannot write " + out_path);
  std::cout << "statistics: " << stats_path << ": " << layers << " layers x " << experts << " experts, " << tokens
            << " routed tokens\n"
            << "imbalance (most loaded rank / mean), " << (from.empty() ? "contiguous placement" : from) << ": "
            << summary(layer_imbalance(current, load)) << "\n"
            << "imbalance, balanced placement: " << summary(layer_imbalance(next, load)) << "\n"
            << "wrote " << out_path << "\n";
  return 0;
}

}  // namespace arbiter
