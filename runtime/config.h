// ModelConfig: the shape and hyper-parameters of a gpt-oss model, read from a Hugging Face
// config.json (field names as published) and validated so later code can trust it.
#pragma once

#include <string>
#include <vector>

namespace arbiter {

struct ModelConfig {
  int num_hidden_layers = 0;
  int num_local_experts = 0;
  int num_experts_per_tok = 4;
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int head_dim = 64;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int sliding_window = 128;
  int initial_context_length = 4096;
  int max_position_embeddings = 131072;
  float rms_norm_eps = 1e-5f;
  float swiglu_limit = 7.0f;
  double rope_theta = 150000.0;
  double rope_factor = 32.0;
  double rope_beta_fast = 32.0;
  double rope_beta_slow = 1.0;
  int rope_original_max_position = 4096;
  bool rope_truncate = false;
  std::vector<bool> layer_is_sliding;  // per layer; from layer_types (default: even layers)
  int eos_token_id = 200002;
  int pad_token_id = 199999;

  // Throws std::runtime_error naming the field when the configuration is inconsistent.
  void validate() const;
  std::string to_json() const;  // config.json as Hugging Face writes it
};

// Parses config.json text; `source` names the file in error messages.
ModelConfig parse_model_config(const std::string& json_text, const std::string& source);
ModelConfig load_model_config(const std::string& path);

// Presets for `arbiter make-model` and tests: "tiny", "20b-shape", "120b-shape"; throws on other names.
ModelConfig preset_config(const std::string& name);

}  // namespace arbiter
