#include "runtime/weights.h"

#include <cstring>
#include <functional>
#include <stdexcept>

#include "kernels/device_arena.h"

namespace arbiter {
namespace {

// Every tensor of the model (this rank's experts only), checked and passed through `import`: the
// one list that both load_weights and weights_reserve_bytes walk, so they cannot disagree.
// copy_gathered false (reserve_bytes): an expert set that is not one run is passed on as a tensor of
// the right shape with no data instead of being copied.
ModelWeights collect_weights(const ModelConfig& c, const Checkpoint& ck, ExpertRange range, const LayerExperts& sets,
                             const std::function<Tensor(const Tensor&)>& import, bool copy_gathered) {
  if (range.count < 0) range.count = c.num_local_experts - range.first;
  if (range.first < 0 || range.count <= 0 || range.first + range.count > c.num_local_experts)
    throw std::runtime_error("expert range [" + std::to_string(range.first) + ", " +
                             std::to_string(range.first + range.count) + ") outside the model's " +
                             std::to_string(c.num_local_experts) + " experts");
  if (!sets.empty() && static_cast<int>(sets.size()) != c.num_hidden_layers)
    throw std::runtime_error("expert sets for " + std::to_string(sets.size()) + " layers but the model has " +
                             std::to_string(c.num_hidden_layers));
  for (size_t l = 0; l < sets.size(); ++l) {
    const auto& ids = sets[l];
    if (ids.empty()) throw std::runtime_error("layer " + std::to_string(l) + ": no experts selected");
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || ids[i] >= c.num_local_experts || (i > 0 && ids[i] <= ids[i - 1]))
        throw std::runtime_error("layer " + std::to_string(l) + ": expert ids must be ascending within 0.." +
                                 std::to_string(c.num_local_experts - 1));
  }
  const int64_t H = c.hidden_size, V = c.vocab_size, D = c.head_dim;
  const int64_t Q = c.num_attention_heads * D, KV = c.num_key_value_heads * D;
  const int64_t E = c.num_local_experts, I = c.intermediate_size;
  auto bf16 = [&](const std::string& name, Shape shape) { return import(ck.get(name, DType::kBF16, shape)); };
  auto vec = [&](const std::string& name, int64_t n) {
    return import(ck.get_any(name, {DType::kBF16, DType::kF32}, Shape{n}));
  };
  ModelWeights w;
  w.experts = range;
  w.layer_experts = sets;
  // One expert tensor of layer `layer`: this rank's rows, a slice of the checkpoint when they are one
  // run, else copied into one host block in ascending id order.
  auto experts = [&](int layer, const std::string& name, DType dtype, Shape shape) {
    const Tensor all = ck.get(name, dtype, shape);
    if (sets.empty()) return import(all.slice_rows(range.first, range.count));
    const auto& ids = sets[static_cast<size_t>(layer)];
    const int64_t n = static_cast<int64_t>(ids.size());
    if (ids.back() - ids.front() + 1 == n) return import(all.slice_rows(ids.front(), n));
    Tensor picked = all;
    picked.shape.dims[0] = n;
    if (!copy_gathered) {
      picked.data = nullptr;
      return import(picked);
    }
    const size_t row = all.bytes() / static_cast<size_t>(all.shape.dims[0]);
    auto block = std::make_shared<std::vector<uint8_t>>(row * static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(block->data() + static_cast<size_t>(i) * row,
                  static_cast<const uint8_t*>(all.data) + static_cast<size_t>(ids[static_cast<size_t>(i)]) * row, row);
    picked.data = block->data();
    w.gathered.push_back(std::move(block));
    return import(picked);
  };
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
    l.experts.gate_up_blocks = experts(i, x + "gate_up_proj_blocks", DType::kU8, {E, 2 * I, H / 32, 16});
    l.experts.gate_up_scales = experts(i, x + "gate_up_proj_scales", DType::kU8, {E, 2 * I, H / 32});
    l.experts.gate_up_bias = experts(i, x + "gate_up_proj_bias", DType::kBF16, {E, 2 * I});
    l.experts.down_blocks = experts(i, x + "down_proj_blocks", DType::kU8, {E, H, I / 32, 16});
    l.experts.down_scales = experts(i, x + "down_proj_scales", DType::kU8, {E, H, I / 32});
    l.experts.down_bias = experts(i, x + "down_proj_bias", DType::kBF16, {E, H});
    w.layers.push_back(l);
  }
  return w;
}

// Backend::import_weight, and where a host-memory backend made a copy, the checkpoint's pages under
// the view released right away (Checkpoint::release_pages): the load then needs room for the model
// once, not twice. Device backends leave the page cache alone (ranks on one node share it).
Tensor import_and_release(const Checkpoint& ck, Backend& backend, const Tensor& host) {
  Tensor t = backend.import_weight(host);
  if (backend.host_memory() && t.data != host.data) ck.release_pages(host);
  return t;
}

}  // namespace

ModelWeights load_weights(const ModelConfig& c, const Checkpoint& ck, Backend& backend, ExpertRange range) {
  return collect_weights(c, ck, range, {}, [&](const Tensor& host) { return import_and_release(ck, backend, host); }, true);
}

ModelWeights load_weights(const ModelConfig& c, const Checkpoint& ck, Backend& backend, const LayerExperts& sets) {
  if (sets.empty()) return load_weights(c, ck, backend, ExpertRange{});
  bool every_one_copied = true;
  ModelWeights w = collect_weights(c, ck, {}, sets, [&](const Tensor& host) {
    Tensor t = import_and_release(ck, backend, host);
    every_one_copied = every_one_copied && t.data != host.data;
    return t;
  }, true);
  // A backend that copied the weights no longer needs the host blocks.
  if (every_one_copied) w.gathered.clear();
  return w;
}

static size_t reserve_bytes(const ModelConfig& c, const Checkpoint& ck, ExpertRange range, const LayerExperts& sets) {
  size_t total = 0;
  collect_weights(c, ck, range, sets, [&](const Tensor& host) {
    total += device_arena_bytes(host.bytes());
    return host;
  }, false);
  return total;
}

size_t weights_reserve_bytes(const ModelConfig& c, const Checkpoint& ck, ExpertRange range) {
  return reserve_bytes(c, ck, range, {});
}

size_t weights_reserve_bytes(const ModelConfig& c, const Checkpoint& ck, const LayerExperts& sets) {
  return reserve_bytes(c, ck, {}, sets);
}

}  // namespace arbiter
