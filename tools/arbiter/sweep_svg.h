// The rank-scaling figure of `arbiter bench --ranks-sweep`, drawn as a standalone SVG: decisions/s
// against ranks (left) and each rank count's step time split into its phases, stacked (right).
#pragma once

#include <string>
#include <vector>

namespace arbiter {

// One rank count's numbers: decisions/s and milliseconds per step of each phase (summed over layers).
struct SweepRow {
  int ranks = 1;
  double decisions_per_second = 0;
  double dense_ms = 0, experts_ms = 0, dispatch_ms = 0, combine_ms = 0, wait_ms = 0;
};

std::string ranks_sweep_svg(const std::vector<SweepRow>& rows, const std::string& title);

}  // namespace arbiter
