// Model: the gpt-oss forward pass (DESIGN.md §1), written once against the Backend interface.
// One forward() call runs one step: any mix of prefill chunks and decode tokens from many
// sequences, reading and extending the paged KV cache through the block tables in the StepLayout.
#pragma once

#include <memory>
#include <vector>

#include "kernels/backend.h"
#include "runtime/config.h"
#include "runtime/kv_cache.h"
#include "runtime/weights.h"

namespace arbiter {

struct ModelOptions {
  int max_step_rows = 512;   // tokens per forward step (the activation workspace is sized for it)
  int max_logit_rows = 64;   // rows per step whose logits can be requested
  KvCacheOptions kv;
  ExpertRange experts;       // experts this rank holds (all by default)
};

// YaRN (NTK-by-parts) inverse frequencies and concentration for a config (DESIGN.md §1, gpt-oss.md §4.3).
RopeParams yarn_rope_params(const ModelConfig& config);

class Model {
 public:
  Model(const ModelConfig& config, const Checkpoint& checkpoint, Backend& backend, const ModelOptions& options = {});

  // Runs one step. Returns the logits of layout.logit_rows as float32 [logit_rows, vocab] on the host.
  std::vector<float> forward(const StepLayout& layout);
  // Same, but returns only the argmax of each requested row (no logits copied to the host).
  std::vector<int32_t> forward_argmax(const StepLayout& layout);

  const ModelConfig& config() const { return config_; }
  const ModelOptions& options() const { return options_; }
  KvCache& kv_cache() { return kv_; }
  Backend& backend() { return backend_; }

 private:
  // Runs every layer and the final norm + lm_head into logits_ for the requested rows.
  void run(const StepLayout& layout);

  ModelConfig config_;
  ModelOptions options_;
  Backend& backend_;
  ModelWeights weights_;
  KvCache kv_;
  RopeParams rope_;
  std::vector<DeviceBuffer> buffers_;
  Tensor x_, normed_, q_, k_, v_, attn_, delta_, router_logits_, expert_ids_, expert_weights_, final_rows_, logits_,
      argmax_;
};

}  // namespace arbiter
