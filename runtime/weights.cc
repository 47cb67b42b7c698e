#include "runtime/weights.h"

#include <functional>
#include <stdexcept>

#include "kernels/device_arena.h"

namespace arbiter {
namespace {

// Every tensor of the model (this rank's experts only), checked and passed through `import`: the
// one list that both load_weights and weights_reserve_bytes walk, so they cannot disagree.
ModelWeights collect_weights(const ModelConfig& c, const Checkpoint& ck, ExpertRange range,
                             const std::function<Tensor(const Tensor&)>& import) {
  if (range.count < 0) range.count = c.num_local_experts - range.first;
  if (range.first < 0 || range.count <= 0 || range.first + range.count > c.num_local_experts)
    throw std::runtime_error("expert range [" + std::to_string(range.first) + ", " +
                             std::to_string(range.first + range.count) + ") outside the model's " +
                             std::to_string(c.num_local_experts) + " experts");
  const int64_t H = c.hidden_size, V = c.vocab_size, D = c.head_dim;
  const int64_t Q = c.num_attention_heads * D, KV = c.num_key_value_heads * D;
  const int64_t E = c.num_local_experts, I = c.intermediate_size;
  auto bf16 = [&](const std::string& name, Shape shape) { return import(ck.get(name, DType::kBF16, shape)); };
  auto vec = [&](const std::string& name, int64_t n) {
    return import(ck.get_any(name, {DType::kBF16, DType::kF32}, Shape{n}));
  };
  auto experts = [&](const std::string& name, DType dtype, Shape shape) {
    return import(ck.get(name, dtype, shape).slice_rows(range.first, range.count));
  };
  ModelWeights w;
  w.experts = range;
  w.embed_tokens = bf16("model.embed_tokens.weight", {V, H});
  w.final_norm = vec("model.norm.weight", H);
  w.lm_head = bf16("lm_head.weight", {V, H});
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerWeights l;
    l.sliding = c.layer_is_sliding[static_cast<size_t>(i)];
    l.input_norm = vec(p + "input_layernorm.weight", H);
    l.post_attention_norm = vec(p + "post_attention_layernorm.weight", H);
    l.q_weight = bf16(p + "self_attn.q_proj.weight", {Q, H});
    l.q_bias = bf16(p + "self_attn.q_proj.bias", {Q});
    l.k_weight = bf16(p + "self_attn.k_proj.weight", {KV, H});
    l.k_bias = bf16(p + "self_attn.k_proj.bias", {KV});
    l.v_weight = bf16(p + "self_attn.v_proj.weight", {KV, H});
    l.v_bias = bf16(p + "self_attn.v_proj.bias", {KV});
    l.o_weight = bf16(p + "self_attn.o_proj.weight", {H, Q});
    l.o_bias = bf16(p + "self_attn.o_proj.bias", {H});
    l.sinks = vec(p + "self_attn.sinks", c.num_attention_heads);
    l.router_weight = bf16(p + "mlp.router.weight", {E, H});
    l.router_bias = bf16(p + "mlp.router.bias", {E});
    const std::string x = p + "mlp.experts.";
    l.experts.gate_up_blocks = experts(x + "gate_up_proj_blocks", DType::kU8, {E, 2 * I, H / 32, 16});
    l.experts.gate_up_scales = experts(x + "gate_up_proj_scales", DType::kU8, {E, 2 * I, H / 32});
    l.experts.gate_up_bias = experts(x + "gate_up_proj_bias", DType::kBF16, {E, 2 * I});
    l.experts.down_blocks = experts(x + "down_proj_blocks", DType::kU8, {E, H, I / 32, 16});
    l.experts.down_scales = experts(x + "down_proj_scales", DType::kU8, {E, H, I / 32});
    l.experts.down_bias = experts(x + "down_proj_bias", DType::kBF16, {E, H});
    w.layers.push_back(l);
  }
  return w;
}

}  // namespace

ModelWeights load_weights(const ModelConfig& c, const Checkpoint& ck, Backend& backend, ExpertRange range) {
  return collect_weights(c, ck, range, [&](const Tensor& host) { return backend.import_weight(host); });
}

size_t weights_reserve_bytes(const ModelConfig& c, const Checkpoint& ck, ExpertRange range) {
  size_t total = 0;
  collect_weights(c, ck, range, [&](const Tensor& host) {
    total += device_arena_bytes(host.bytes());
    return host;
  });
  return total;
}

}  // namespace arbiter
