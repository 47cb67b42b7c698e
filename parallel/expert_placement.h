// ExpertPlacement: which rank owns which experts of each MoE layer (one placement for every layer).
// Default: contiguous blocks, uneven when the ranks do not divide the experts (12 experts over 8
// ranks: ranks 0-3 own 2, ranks 4-7 own 1). A placement file overrides it; format
// (configs/placement/README.md):
//
//   # comment
//   experts 12
//   rank 0: 0-2
//   rank 1: 3 4
//   rank 2: 5,6-11
//
// Every expert must be owned by exactly one rank and every rank must own at least one. A rank's
// experts must be one contiguous run of ids, because each rank maps one contiguous slice of every
// expert tensor from the checkpoint (runtime/weights.h ExpertRange).
#pragma once

#include <string>
#include <vector>

namespace arbiter {

struct ExpertBlock {
  int first = 0;
  int count = 0;
};

class ExpertPlacement {
 public:
  ExpertPlacement() = default;
  // Contiguous blocks; throws std::invalid_argument when there are more ranks than experts.
  static ExpertPlacement contiguous(int num_experts, int num_ranks);
  // Explicit lists, validated; errors start with `source`.
  static ExpertPlacement from_lists(int num_experts, const std::vector<std::vector<int>>& experts_of_rank,
                                    const std::string& source = "placement");
  // Parses the file format above; errors name `source` and the line.
  static ExpertPlacement parse(const std::string& text, const std::string& source);
  static ExpertPlacement load(const std::string& path);

  int num_experts() const { return static_cast<int>(owner_.size()); }
  int num_ranks() const { return static_cast<int>(experts_.size()); }
  int owner(int expert) const { return owner_.at(static_cast<size_t>(expert)); }
  // Index of `expert` among its owner's experts (the id the owner's ExpertWeights use).
  int local_index(int expert) const { return local_.at(static_cast<size_t>(expert)); }
  const std::vector<int>& experts_of(int rank) const { return experts_.at(static_cast<size_t>(rank)); }
  ExpertBlock block_of(int rank) const;
  // Throws std::invalid_argument unless the placement fits a model of `num_experts` experts run on
  // `num_ranks` ranks.
  void check_fits(int num_experts, int num_ranks) const;
  // The file format; parse(to_text()) gives the same placement.
  std::string to_text() const;

 private:
  std::vector<std::vector<int>> experts_;  // per rank, ascending
  std::vector<int> owner_, local_;         // per expert
};

}  // namespace arbiter
