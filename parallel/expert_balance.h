// Expert placement from measured load: per MoE layer, experts assigned to ranks so that the tokens
// each rank's experts process are as even as a per-rank expert capacity allows (greedy longest
// processing time), and the imbalance a placement gives a load (the most loaded rank over the mean).
#pragma once

#include <cstdint>
#include <vector>

#include "parallel/expert_placement.h"

namespace arbiter {

// Tokens routed per layer and expert: load[layer][expert].
using ExpertLoad = std::vector<std::vector<int64_t>>;

// Per layer: the tokens each rank's experts get under `placement`, the most over the mean (1 =
// perfectly even; a layer with no tokens counts as 1).
std::vector<double> layer_imbalance(const ExpertPlacement& placement, const ExpertLoad& load);

// A per-layer placement of load[l].size() experts over `ranks` ranks: each layer's experts, heaviest
// first, go to the rank with the least load so far among those below `capacity` experts (ties: the
// rank with fewer experts, then the lower rank). capacity 0: ceil(experts / ranks), the even split of
// memory; larger values allow uneven counts. Throws std::invalid_argument for an empty or ragged
// load, negative counts, more ranks than experts, or a capacity that cannot hold every expert.
ExpertPlacement balanced_placement(const ExpertLoad& load, int ranks, int capacity = 0,
                                   const std::string& source = "balanced placement");

}  // namespace arbiter
