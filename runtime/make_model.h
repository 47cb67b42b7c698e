// Random gpt-oss checkpoints in exactly the Hugging Face layout (config.json, safetensors with
// bf16 dense weights and MXFP4 experts, sharded with an index when large): everyone's test model.
#pragma once

#include <cstdint>
#include <string>

#include "runtime/config.h"

namespace arbiter {

struct MakeModelOptions {
  uint64_t seed = 1;
  // Files larger than this are split into shards listed by model.safetensors.index.json.
  uint64_t shard_bytes = 4ull << 30;
  bool norms_f32 = false;  // write norm weights as f32 instead of bf16
  // Folder holding tokenizer.json (+ tokenizer_config.json) to copy into the model, so a random
  // model is a complete checkpoint folder like the real one. Empty: write no tokenizer.
  std::string tokenizer_dir;
};

// Writes config.json and the weights into `dir` (created if missing). Deterministic for a seed.
void make_random_model(const ModelConfig& config, const std::string& dir, const MakeModelOptions& options = {});

}  // namespace arbiter
