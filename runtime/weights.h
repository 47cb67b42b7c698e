// ModelWeights: every tensor of a gpt-oss checkpoint, checked against the config and made
// resident on a backend. Dense weights stay bf16; experts stay packed MXFP4. A rank may hold only
// some of each layer's experts (expert parallelism): a contiguous range of every layer's, or per
// layer any set of ids (a set that is not one run is copied out of the checkpoint into one block).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "runtime/config.h"
#include "runtime/safetensors.h"

namespace arbiter {

struct LayerWeights {
  Tensor input_norm, post_attention_norm;  // bf16 or f32 [hidden]
  Tensor q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias;
  Tensor sinks;  // bf16 or f32 [q heads]
  Tensor router_weight, router_bias;
  ExpertWeights experts;  // this rank's experts only
  bool sliding = false;
};

struct ExpertRange {
  int first = 0;
  int count = -1;  // -1: all experts
};

// Per layer, the ascending ids of the experts this rank holds; empty: the ExpertRange decides.
using LayerExperts = std::vector<std::vector<int>>;

struct ModelWeights {
  Tensor embed_tokens, final_norm, lm_head;
  std::vector<LayerWeights> layers;
  ExpertRange experts;        // which experts of each layer this rank holds (when layer_experts is empty)
  LayerExperts layer_experts; // or per layer
  // Host copies of expert sets that are not one run of the checkpoint (a backend that imports by
  // view points into them, so they live as long as the weights).
  std::vector<std::shared_ptr<const std::vector<uint8_t>>> gathered;
};

// Checks every tensor's presence, dtype and shape (errors name the file and the tensor) and imports
// it into the backend. The checkpoint must outlive the weights on backends that import by view.
ModelWeights load_weights(const ModelConfig& config, const Checkpoint& checkpoint, Backend& backend,
                          ExpertRange experts = {});
// The same with per-layer expert sets (layer_experts.size() == layers; each set ascending, non-empty).
ModelWeights load_weights(const ModelConfig& config, const Checkpoint& checkpoint, Backend& backend,
                          const LayerExperts& layer_experts);

// The bytes load_weights will import (each tensor rounded up as an arena allocation, see
// kernels/device_arena.h), for Backend::reserve. Checks the tensors like load_weights.
size_t weights_reserve_bytes(const ModelConfig& config, const Checkpoint& checkpoint, ExpertRange experts = {});
size_t weights_reserve_bytes(const ModelConfig& config, const Checkpoint& checkpoint, const LayerExperts& layer_experts);

}  // namespace arbiter
