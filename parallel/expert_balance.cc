#include "parallel/expert_balance.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

namespace arbiter {

std::vector<double> layer_imbalance(const ExpertPlacement& placement, const ExpertLoad& load) {
  std::vector<double> out;
  for (size_t l = 0; l < load.size(); ++l) {
    if (static_cast<int>(load[l].size()) != placement.num_experts())
      throw std::invalid_argument("expert load of layer " + std::to_string(l) + " has " + std::to_string(load[l].size()) +
                                  " experts but the placement " + std::to_string(placement.num_experts()));
    std::vector<int64_t> per_rank(static_cast<size_t>(placement.num_ranks()), 0);
    for (int e = 0; e < placement.num_experts(); ++e)
      per_rank[static_cast<size_t>(placement.owner(static_cast<int>(l), e))] += load[l][static_cast<size_t>(e)];
    const int64_t total = std::accumulate(per_rank.begin(), per_rank.end(), int64_t{0});
    const int64_t most = *std::max_element(per_rank.begin(), per_rank.end());
    out.push_back(total > 0 ? static_cast<double>(most) * static_cast<double>(per_rank.size()) / static_cast<double>(total)
                            : 1.0);
  }
  return out;
}

ExpertPlacement balanced_placement(const ExpertLoad& load, int ranks, int capacity, const std::string& source) {
  if (load.empty()) throw std::invalid_argument(source + ": no layers in the expert load");
  const int experts = static_cast<int>(load[0].size());
  if (experts == 0) throw std::invalid_argument(source + ": no experts in the expert load");
  if (ranks < 1 || ranks > experts)
    throw std::invalid_argument(source + ": " + std::to_string(ranks) + " ranks for " + std::to_string(experts) +
                                " experts (need 1.." + std::to_string(experts) + ")");
  if (capacity == 0) capacity = (experts + ranks - 1) / ranks;
  if (static_cast<int64_t>(capacity) * ranks < experts)
    throw std::invalid_argument(source + ": " + std::to_string(ranks) + " ranks of at most " + std::to_string(capacity) +
                                " experts cannot hold " + std::to_string(experts));
  std::vector<ExpertPlacement::RankLists> layers;
  for (size_t l = 0; l < load.size(); ++l) {
    const auto& row = load[l];
    if (static_cast<int>(row.size()) != experts)
      throw std::invalid_argument(source + ": layer " + std::to_string(l) + " has " + std::to_string(row.size()) +
                                  " experts, layer 0 has " + std::to_string(experts));
    std::vector<int> order(static_cast<size_t>(experts));
    std::iota(order.begin(), order.end(), 0);
    for (int64_t v : row)
      if (v < 0) throw std::invalid_argument(source + ": negative token count in layer " + std::to_string(l));
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return row[static_cast<size_t>(a)] > row[static_cast<size_t>(b)]; });
    ExpertPlacement::RankLists lists(static_cast<size_t>(ranks));
    std::vector<int64_t> total(static_cast<size_t>(ranks), 0);
    for (const int e : order) {
      int best = -1;
      for (int r = 0; r < ranks; ++r) {
        const size_t ur = static_cast<size_t>(r);
        if (static_cast<int>(lists[ur].size()) >= capacity) continue;
        if (best < 0) {
          best = r;
          continue;
        }
        const size_t ub = static_cast<size_t>(best);
        if (total[ur] < total[ub] || (total[ur] == total[ub] && lists[ur].size() < lists[ub].size())) best = r;
      }
      lists[static_cast<size_t>(best)].push_back(e);
      total[static_cast<size_t>(best)] += row[static_cast<size_t>(e)];
    }
    // A rank left without experts (only when capacity lets others take everything) takes the
    // lightest expert of the rank holding the most.
    for (int r = 0; r < ranks; ++r) {
      if (!lists[static_cast<size_t>(r)].empty()) continue;
      auto donor = std::max_element(lists.begin(), lists.end(), [](const auto& a, const auto& b) { return a.size() < b.size(); });
      auto lightest = std::min_element(donor->begin(), donor->end(),
                                       [&](int a, int b) { return row[static_cast<size_t>(a)] < row[static_cast<size_t>(b)]; });
      lists[static_cast<size_t>(r)].push_back(*lightest);
      donor->erase(lightest);
    }
    layers.push_back(std::move(lists));
  }
  return ExpertPlacement::from_layer_lists(experts, layers, source);
}

}  // namespace arbiter
