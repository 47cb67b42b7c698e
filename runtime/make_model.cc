#include "runtime/make_model.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <vector>

#include "kernels/tensor.h"

namespace arbiter {
namespace {

// splitmix64: small, fast, good enough for random weights.
struct Rng {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }  // [0, 1)
  // Sum of uniforms: cheap, roughly normal, unit variance.
  float normal() {
    float s = 0;
    for (int i = 0; i < 4; ++i) s += uniform();
    return (s - 2.0f) * 1.7320508f;
  }
};

enum class Fill { kNormal, kOnePlusNormal, kMxfp4Codes, kMxfp4Scales };

struct Spec {
  std::string name;
  DType dtype;
  Shape shape;
  Fill fill;
  float scale;  // std of normal fills; scale byte centre for kMxfp4Scales
  uint64_t bytes() const { return static_cast<uint64_t>(shape.elements()) * dtype_size(dtype); }
};

void fill_chunk(const Spec& s, Rng& rng, uint8_t* out, uint64_t bytes) {
  switch (s.fill) {
    case Fill::kMxfp4Codes:
      for (uint64_t i = 0; i < bytes; i += 8) {
        const uint64_t r = rng.next();
        std::memcpy(out + i, &r, std::min<uint64_t>(8, bytes - i));
      }
      return;
    case Fill::kMxfp4Scales:
      for (uint64_t i = 0; i < bytes; ++i) out[i] = static_cast<uint8_t>(static_cast<int>(s.scale) + static_cast<int>(rng.next() % 3) - 1);
      return;
    case Fill::kNormal:
    case Fill::kOnePlusNormal: {
      const float base = s.fill == Fill::kOnePlusNormal ? 1.0f : 0.0f;
      const size_t n = bytes / dtype_size(s.dtype);
      if (s.dtype == DType::kF32) {
        float* f = reinterpret_cast<float*>(out);
        for (size_t i = 0; i < n; ++i) f[i] = base + s.scale * rng.normal();
      } else {
        uint16_t* h = reinterpret_cast<uint16_t*>(out);
        for (size_t i = 0; i < n; ++i) h[i] = f32_to_bf16(base + s.scale * rng.normal());
      }
      return;
    }
  }
}

std::vector<Spec> model_specs(const ModelConfig& c, bool norms_f32) {
  const int64_t H = c.hidden_size, V = c.vocab_size, D = c.head_dim;
  const int64_t Q = c.num_attention_heads * D, KV = c.num_key_value_heads * D;
  const int64_t E = c.num_local_experts, I = c.intermediate_size;
  const DType norm = norms_f32 ? DType::kF32 : DType::kBF16;
  const float in_h = 1.0f / std::sqrt(static_cast<float>(H)), in_q = 1.0f / std::sqrt(static_cast<float>(Q));
  // MXFP4 values average |v| ~ 2.6; pick the scale exponent so a row's output has about unit variance.
  auto scale_byte = [](int64_t fan_in) {
    return 127.0f + std::round(std::log2(1.0f / (2.6f * std::sqrt(static_cast<float>(fan_in)))));
  };
  std::vector<Spec> s;
  s.push_back({"model.embed_tokens.weight", DType::kBF16, {V, H}, Fill::kNormal, 1.0f});
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    s.push_back({p + "input_layernorm.weight", norm, {H}, Fill::kOnePlusNormal, 0.1f});
    s.push_back({p + "self_attn.q_proj.weight", DType::kBF16, {Q, H}, Fill::kNormal, in_h});
    s.push_back({p + "self_attn.q_proj.bias", DType::kBF16, {Q}, Fill::kNormal, 0.1f});
    s.push_back({p + "self_attn.k_proj.weight", DType::kBF16, {KV, H}, Fill::kNormal, in_h});
    s.push_back({p + "self_attn.k_proj.bias", DType::kBF16, {KV}, Fill::kNormal, 0.1f});
    s.push_back({p + "self_attn.v_proj.weight", DType::kBF16, {KV, H}, Fill::kNormal, in_h});
    s.push_back({p + "self_attn.v_proj.bias", DType::kBF16, {KV}, Fill::kNormal, 0.1f});
    s.push_back({p + "self_attn.o_proj.weight", DType::kBF16, {H, Q}, Fill::kNormal, in_q});
    s.push_back({p + "self_attn.o_proj.bias", DType::kBF16, {H}, Fill::kNormal, 0.1f});
    s.push_back({p + "self_attn.sinks", DType::kBF16, {c.num_attention_heads}, Fill::kNormal, 1.0f});
    s.push_back({p + "post_attention_layernorm.weight", norm, {H}, Fill::kOnePlusNormal, 0.1f});
    s.push_back({p + "mlp.router.weight", DType::kBF16, {E, H}, Fill::kNormal, in_h});
    s.push_back({p + "mlp.router.bias", DType::kBF16, {E}, Fill::kNormal, 0.1f});
    const std::string x = p + "mlp.experts.";
    s.push_back({x + "gate_up_proj_blocks", DType::kU8, {E, 2 * I, H / 32, 16}, Fill::kMxfp4Codes, 0});
    s.push_back({x + "gate_up_proj_scales", DType::kU8, {E, 2 * I, H / 32}, Fill::kMxfp4Scales, scale_byte(H)});
    s.push_back({x + "gate_up_proj_bias", DType::kBF16, {E, 2 * I}, Fill::kNormal, 0.1f});
    s.push_back({x + "down_proj_blocks", DType::kU8, {E, H, I / 32, 16}, Fill::kMxfp4Codes, 0});
    s.push_back({x + "down_proj_scales", DType::kU8, {E, H, I / 32}, Fill::kMxfp4Scales, scale_byte(I)});
    s.push_back({x + "down_proj_bias", DType::kBF16, {E, H}, Fill::kNormal, 0.1f});
  }
  s.push_back({"model.norm.weight", norm, {H}, Fill::kOnePlusNormal, 0.1f});
  s.push_back({"lm_head.weight", DType::kBF16, {V, H}, Fill::kNormal, in_h});
  return s;
}

void write_shard(const std::string& path, const std::vector<const Spec*>& specs, uint64_t seed) {
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const Spec* s : specs) {
    nlohmann::json shape = nlohmann::json::array();
    for (int i = 0; i < s->shape.rank; ++i) shape.push_back(s->shape[i]);
    header[s->name] = {{"dtype", dtype_name(s->dtype)}, {"shape", shape}, {"data_offsets", {offset, offset + s->bytes()}}};
    offset += s->bytes();
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string text = header.dump();
  while ((text.size() + 8) % 8) text.push_back(' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error(path + ": cannot create");
  const uint64_t len = text.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  std::vector<uint8_t> chunk(16u << 20);
  for (const Spec* s : specs) {
    // Seed per tensor name, so a tensor's values do not depend on how the files are sharded.
    Rng rng{seed ^ std::hash<std::string>{}(s->name)};
    for (uint64_t done = 0; done < s->bytes();) {
      const uint64_t n = std::min<uint64_t>(chunk.size(), s->bytes() - done);
      fill_chunk(*s, rng, chunk.data(), n);
      out.write(reinterpret_cast<const char*>(chunk.data()), static_cast<std::streamsize>(n));
      done += n;
    }
  }
  if (!out) throw std::runtime_error(path + ": write failed (disk full?)");
}

}  // namespace

void make_random_model(const ModelConfig& config, const std::string& dir, const MakeModelOptions& options) {
  config.validate();
  namespace fs = std::filesystem;
  // Check every input before writing anything.
  if (!options.tokenizer_dir.empty() && !fs::exists(fs::path(options.tokenizer_dir) / "tokenizer.json"))
    throw std::runtime_error(options.tokenizer_dir + ": no tokenizer.json (run scripts/fetch-tokenizer.sh)");
  fs::create_directories(dir);
  {
    std::ofstream cfg(fs::path(dir) / "config.json");
    cfg << config.to_json();
    if (!cfg) throw std::runtime_error(dir + "/config.json: write failed");
  }
  if (!options.tokenizer_dir.empty()) {
    const fs::path from(options.tokenizer_dir);
    for (const char* name : {"tokenizer.json", "tokenizer_config.json"})
      if (fs::exists(from / name)) fs::copy_file(from / name, fs::path(dir) / name, fs::copy_options::overwrite_existing);
  }
  const std::vector<Spec> specs = model_specs(config, options.norms_f32);
  std::vector<std::vector<const Spec*>> shards(1);
  uint64_t in_shard = 0, total = 0;
  for (const Spec& s : specs) {
    if (in_shard > 0 && in_shard + s.bytes() > options.shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(&s);
    in_shard += s.bytes();
    total += s.bytes();
  }
  fs::remove(fs::path(dir) / "model.safetensors");
  fs::remove(fs::path(dir) / "model.safetensors.index.json");
  if (shards.size() == 1) {
    write_shard((fs::path(dir) / "model.safetensors").string(), shards[0], options.seed);
    return;
  }
  // Hugging Face names shards 0-based: model-00000-of-0000N.safetensors (N + 1 files).
  nlohmann::json index;
  index["metadata"] = {{"total_size", total}};
  const size_t last = shards.size() - 1;
  for (size_t i = 0; i < shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i, last);
    write_shard((fs::path(dir) / name).string(), shards[i], options.seed);
    for (const Spec* s : shards[i]) index["weight_map"][s->name] = name;
  }
  std::ofstream idx(fs::path(dir) / "model.safetensors.index.json");
  idx << index.dump(2) << "\n";
}

}  // namespace arbiter
