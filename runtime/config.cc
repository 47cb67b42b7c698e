#include "runtime/config.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

namespace arbiter {
namespace {

using nlohmann::json;

[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw std::runtime_error(source + ": " + what);
}

template <typename T>
void read_number(const json& j, const char* key, T& out, const std::string& source, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) fail(source, std::string("missing field '") + key + "'");
    return;
  }
  if (!it->is_number()) fail(source, std::string("field '") + key + "' must be a number");
  const double v = it->get<double>();
  if constexpr (std::is_integral_v<T>) {
    if (v != static_cast<double>(static_cast<long long>(v)) || v < -2147483648.0 || v > 2147483647.0)
      fail(source, std::string("field '") + key + "' must be an integer");
  }
  out = static_cast<T>(v);
}

}  // namespace

void ModelConfig::validate() const {
  const std::string src = "config";
  auto positive = [&](int v, const char* name) {
    if (v <= 0) fail(src, std::string(name) + " must be positive (got " + std::to_string(v) + ")");
  };
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_local_experts, "num_local_experts");
  positive(num_experts_per_tok, "num_experts_per_tok");
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(intermediate_size, "intermediate_size");
  positive(head_dim, "head_dim");
  positive(num_attention_heads, "num_attention_heads");
  positive(num_key_value_heads, "num_key_value_heads");
  positive(sliding_window, "sliding_window");
  if (num_experts_per_tok > num_local_experts)
    fail(src, "num_experts_per_tok (" + std::to_string(num_experts_per_tok) + ") exceeds num_local_experts (" +
                  std::to_string(num_local_experts) + ")");
  if (hidden_size % 32) fail(src, "hidden_size (" + std::to_string(hidden_size) + ") is not a multiple of 32 (MXFP4 blocks)");
  if (intermediate_size % 32)
    fail(src, "intermediate_size (" + std::to_string(intermediate_size) + ") is not a multiple of 32 (MXFP4 blocks)");
  if (num_attention_heads % num_key_value_heads)
    fail(src, "num_attention_heads (" + std::to_string(num_attention_heads) + ") is not divisible by num_key_value_heads (" +
                  std::to_string(num_key_value_heads) + ")");
  if (head_dim % 2) fail(src, "head_dim must be even (rotate-half RoPE)");
  if (static_cast<int>(layer_is_sliding.size()) != num_hidden_layers)
    fail(src, "layer_types has " + std::to_string(layer_is_sliding.size()) + " entries for " +
                  std::to_string(num_hidden_layers) + " layers");
  if (!(rope_theta > 0) || !(rope_factor >= 1) || !(rope_beta_fast > rope_beta_slow) || !(rope_beta_slow > 0) ||
      rope_original_max_position <= 0)
    fail(src, "rope_scaling parameters out of range");
  if (!(rms_norm_eps > 0)) fail(src, "rms_norm_eps must be positive");
  if (!(swiglu_limit > 0)) fail(src, "swiglu_limit must be positive");
}

ModelConfig parse_model_config(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(source, std::string("malformed JSON: ") + e.what());
  }
  if (!j.is_object()) fail(source, "top level must be a JSON object");
  ModelConfig c;
  if (auto it = j.find("model_type"); it != j.end() && (!it->is_string() || *it != "gpt_oss"))
    fail(source, "model_type must be \"gpt_oss\"");
  read_number(j, "num_hidden_layers", c.num_hidden_layers, source, true);
  read_number(j, "num_local_experts", c.num_local_experts, source, true);
  read_number(j, "experts_per_token", c.num_experts_per_tok, source, false);
  read_number(j, "num_experts_per_tok", c.num_experts_per_tok, source, false);
  read_number(j, "vocab_size", c.vocab_size, source, true);
  read_number(j, "hidden_size", c.hidden_size, source, true);
  read_number(j, "intermediate_size", c.intermediate_size, source, true);
  read_number(j, "head_dim", c.head_dim, source, false);
  read_number(j, "num_attention_heads", c.num_attention_heads, source, true);
  read_number(j, "num_key_value_heads", c.num_key_value_heads, source, true);
  read_number(j, "sliding_window", c.sliding_window, source, false);
  read_number(j, "initial_context_length", c.initial_context_length, source, false);
  read_number(j, "max_position_embeddings", c.max_position_embeddings, source, false);
  read_number(j, "rms_norm_eps", c.rms_norm_eps, source, false);
  read_number(j, "swiglu_limit", c.swiglu_limit, source, false);
  read_number(j, "rope_theta", c.rope_theta, source, false);
  read_number(j, "eos_token_id", c.eos_token_id, source, false);
  read_number(j, "pad_token_id", c.pad_token_id, source, false);
  const json* rope = nullptr;
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) rope = &*it;
  if (auto it = j.find("rope_parameters"); !rope && it != j.end() && !it->is_null()) rope = &*it;
  if (rope) {
    if (!rope->is_object()) fail(source, "rope_scaling must be an object");
    if (auto t = rope->find("rope_type"); t != rope->end() && (!t->is_string() || *t != "yarn"))
      fail(source, "rope_scaling.rope_type must be \"yarn\"");
    read_number(*rope, "factor", c.rope_factor, source, false);
    read_number(*rope, "beta_fast", c.rope_beta_fast, source, false);
    read_number(*rope, "beta_slow", c.rope_beta_slow, source, false);
    read_number(*rope, "original_max_position_embeddings", c.rope_original_max_position, source, false);
    read_number(*rope, "rope_theta", c.rope_theta, source, false);
    if (auto t = rope->find("truncate"); t != rope->end()) {
      if (!t->is_boolean()) fail(source, "rope_scaling.truncate must be a boolean");
      c.rope_truncate = t->get<bool>();
    }
  }
  if (auto it = j.find("quantization_config"); it != j.end() && !it->is_null()) {
    const json& q = *it;
    if (!q.is_object()) fail(source, "quantization_config must be an object");
    auto m = q.find("quant_method");
    if (m == q.end() || !m->is_string() || *m != "mxfp4")
      fail(source, "unsupported quantization_config (only quant_method \"mxfp4\" is supported): " + q.dump());
  }
  c.layer_is_sliding.clear();
  if (auto it = j.find("layer_types"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) fail(source, "layer_types must be an array");
    for (const auto& t : *it) {
      if (t == "sliding_attention") c.layer_is_sliding.push_back(true);
      else if (t == "full_attention") c.layer_is_sliding.push_back(false);
      else fail(source, "layer_types entries must be \"sliding_attention\" or \"full_attention\", got " + t.dump());
    }
  } else {
    for (int i = 0; i < std::max(0, c.num_hidden_layers); ++i) c.layer_is_sliding.push_back(i % 2 == 0);
  }
  try {
    c.validate();
  } catch (const std::runtime_error& e) {
    fail(source, std::string(e.what()).substr(8));  // replace the generic "config: " prefix
  }
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_model_config(ss.str(), path);
}

std::string ModelConfig::to_json() const {
  json j;
  j["architectures"] = {"GptOssForCausalLM"};
  j["model_type"] = "gpt_oss";
  j["attention_bias"] = true;
  j["attention_dropout"] = 0.0;
  j["eos_token_id"] = eos_token_id;
  j["pad_token_id"] = pad_token_id;
  j["experts_per_token"] = num_experts_per_tok;
  j["num_experts_per_tok"] = num_experts_per_tok;
  j["head_dim"] = head_dim;
  j["hidden_act"] = "silu";
  j["hidden_size"] = hidden_size;
  j["initial_context_length"] = initial_context_length;
  j["initializer_range"] = 0.02;
  j["intermediate_size"] = intermediate_size;
  json types = json::array();
  for (bool s : layer_is_sliding) types.push_back(s ? "sliding_attention" : "full_attention");
  j["layer_types"] = types;
  j["max_position_embeddings"] = max_position_embeddings;
  j["num_attention_heads"] = num_attention_heads;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_key_value_heads"] = num_key_value_heads;
  j["num_local_experts"] = num_local_experts;
  j["output_router_logits"] = false;
  j["quantization_config"] = {{"quant_method", "mxfp4"},
                              {"modules_to_not_convert",
                               {"model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"}}};
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_scaling"] = {{"beta_fast", rope_beta_fast},
                       {"beta_slow", rope_beta_slow},
                       {"factor", rope_factor},
                       {"original_max_position_embeddings", rope_original_max_position},
                       {"rope_type", "yarn"},
                       {"truncate", rope_truncate}};
  j["rope_theta"] = rope_theta;
  j["router_aux_loss_coef"] = 0.9;
  j["sliding_window"] = sliding_window;
  j["swiglu_limit"] = swiglu_limit;
  j["tie_word_embeddings"] = false;
  j["use_cache"] = true;
  j["vocab_size"] = vocab_size;
  return j.dump(2) + "\n";
}

ModelConfig preset_config(const std::string& name) {
  ModelConfig c;
  c.vocab_size = 201088;
  c.hidden_size = 2880;
  c.intermediate_size = 2880;
  c.num_attention_heads = 64;
  c.num_key_value_heads = 8;
  c.head_dim = 64;
  c.sliding_window = 128;
  if (name == "20b-shape") {
    c.num_hidden_layers = 24;
    c.num_local_experts = 32;
  } else if (name == "120b-shape") {
    c.num_hidden_layers = 36;
    c.num_local_experts = 128;
  } else if (name == "tiny") {
    c.num_hidden_layers = 2;
    c.num_local_experts = 8;
    c.hidden_size = 64;
    c.intermediate_size = 64;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.sliding_window = 8;
  } else {
    throw std::runtime_error("unknown preset '" + name + "' (expected tiny, 20b-shape or 120b-shape)");
  }
  for (int i = 0; i < c.num_hidden_layers; ++i) c.layer_is_sliding.push_back(i % 2 == 0);
  return c;
}

}  // namespace arbiter
