// ExpertPlacement: which rank owns which experts of each MoE layer. Either one placement for every
// layer or one per layer (a rank may then hold a different set in each layer). Default: contiguous
// blocks, uneven when the ranks do not divide the experts (12 experts over 8 ranks: ranks 0-3 own 2,
// ranks 4-7 own 1). A placement file overrides it; format (configs/placement/README.md):
//
//   # comment
//   experts 12
//   rank 0: 0-2          # before any 'layer' line: every layer's placement (the default)
//   rank 1: 3 4
//   rank 2: 5,6-11
//   layers 24            # only with 'layer' sections: the model's layer count
//   layer 3              # rank lines up to the next 'layer' line are layer 3's own placement
//   rank 0: 0 5 9
//   ...
//
// In every layer each expert is owned by exactly one rank and every rank owns at least one. A rank's
// experts need not be contiguous: the loader copies the listed experts' weights (runtime/weights.h).
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
  // Per rank, the experts it owns (any order; stored ascending).
  using RankLists = std::vector<std::vector<int>>;

  ExpertPlacement() = default;
  // Contiguous blocks; throws std::invalid_argument when there are more ranks than experts.
  static ExpertPlacement contiguous(int num_experts, int num_ranks);
  // Explicit lists, the same for every layer, validated; errors start with `source`.
  static ExpertPlacement from_lists(int num_experts, const RankLists& experts_of_rank,
                                    const std::string& source = "placement");
  // One list set per layer (layers.size() layers), validated; errors start with `source`.
  static ExpertPlacement from_layer_lists(int num_experts, const std::vector<RankLists>& layers,
                                          const std::string& source = "placement");
  // Parses the file format above; errors name `source` and the line.
  static ExpertPlacement parse(const std::string& text, const std::string& source);
  static ExpertPlacement load(const std::string& path);

  int num_experts() const { return num_experts_; }
  int num_ranks() const { return layers_.empty() ? 0 : static_cast<int>(layers_[0].experts.size()); }
  // Layers the placement was written for; 0 when it is the same for every layer (any model depth).
  int num_layers() const { return per_layer_ ? static_cast<int>(layers_.size()) : 0; }
  bool per_layer() const { return per_layer_; }
  // Where it came from (the file path, or a description): error messages name it.
  const std::string& source() const { return source_; }

  // In `layer` (ignored when the placement is the same for every layer): the rank owning `expert`,
  // its index among that rank's experts (the id the owner's ExpertWeights use), and a rank's experts.
  int owner(int layer, int expert) const { return at(layer).owner.at(static_cast<size_t>(expert)); }
  int local_index(int layer, int expert) const { return at(layer).local.at(static_cast<size_t>(expert)); }
  const std::vector<int>& experts_of(int layer, int rank) const {
    return at(layer).experts.at(static_cast<size_t>(rank));
  }
  // The same for layer 0 (for placements that are the same in every layer).
  int owner(int expert) const { return owner(0, expert); }
  int local_index(int expert) const { return local_index(0, expert); }
  const std::vector<int>& experts_of(int rank) const { return experts_of(0, rank); }
  // A rank's experts in layer 0 as one run; throws std::logic_error when they are not contiguous.
  ExpertBlock block_of(int rank) const;
  // The most experts `rank` holds in any layer.
  int max_experts_of(int rank) const;

  // Throws std::invalid_argument, naming source(), unless the placement fits a model of
  // `num_experts` experts per layer and `num_layers` layers run on `num_ranks` ranks.
  void check_fits(int num_experts, int num_layers, int num_ranks) const;
  // The file format; parse(to_text()) gives the same placement.
  std::string to_text() const;

 private:
  // One layer's maps.
  struct LayerMap {
    RankLists experts;              // per rank, ascending
    std::vector<int> owner, local;  // per expert
  };
  const LayerMap& at(int layer) const { return per_layer_ ? layers_.at(static_cast<size_t>(layer)) : layers_.at(0); }
  static LayerMap build(int num_experts, const RankLists& lists, const std::string& where);

  int num_experts_ = 0;
  bool per_layer_ = false;
  std::vector<LayerMap> layers_;  // one entry unless per_layer_
  std::string source_;
};

}  // namespace arbiter
