// Loading: config.json parsing and validation, safetensors headers, sharded checkpoints, and every
// error a bad checkpoint can raise (each message must name the file and the tensor or field).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>

#include "kernels/cpu/cpu_backend.h"
#include "runtime/config.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "runtime/safetensors.h"
#include "runtime/weights.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

using testing::TempDir;

// config.json of gpt-oss-20b as published on Hugging Face.
const char* kPublished20b = R"({
  "architectures": ["GptOssForCausalLM"], "attention_bias": true, "attention_dropout": 0.0,
  "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
  "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
  "intermediate_size": 2880,
  "layer_types": ["sliding_attention","full_attention","sliding_attention","full_attention",
    "sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention",
    "full_attention","sliding_attention","full_attention","sliding_attention","full_attention",
    "sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention",
    "full_attention","sliding_attention","full_attention","sliding_attention","full_attention"],
  "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
  "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
  "output_router_logits": false, "pad_token_id": 199999,
  "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
    "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
  "rms_norm_eps": 1e-05,
  "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
    "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false},
  "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
  "tie_word_embeddings": false, "transformers_version": "4.55.0.dev0", "use_cache": true,
  "vocab_size": 201088})";

TEST(ConfigTest, ParsesPublished20bAnd120b) {
  const ModelConfig c = parse_model_config(kPublished20b, "20b/config.json");
  EXPECT_EQ(c.num_hidden_layers, 24);
  EXPECT_EQ(c.num_local_experts, 32);
  EXPECT_EQ(c.vocab_size, 201088);
  EXPECT_EQ(c.sliding_window, 128);
  EXPECT_TRUE(c.layer_is_sliding[0]);
  EXPECT_FALSE(c.layer_is_sliding[1]);
  EXPECT_DOUBLE_EQ(c.rope_factor, 32.0);
  // 120b differs in layers and experts only.
  std::string text = kPublished20b;
  auto replace = [&](const std::string& from, const std::string& to) { text.replace(text.find(from), from.size(), to); };
  replace("\"num_hidden_layers\": 24", "\"num_hidden_layers\": 36");
  replace("\"num_local_experts\": 32", "\"num_local_experts\": 128");
  replace("\"layer_types\"", "\"ignored_layer_types\"");  // falls back to alternating layers
  const ModelConfig big = parse_model_config(text, "120b/config.json");
  EXPECT_EQ(big.num_hidden_layers, 36);
  EXPECT_EQ(big.num_local_experts, 128);
  EXPECT_EQ(big.layer_is_sliding.size(), 36u);
  EXPECT_TRUE(big.layer_is_sliding[34]);
  EXPECT_FALSE(big.layer_is_sliding[35]);
}

TEST(ConfigTest, RoundTripsThroughToJson) {
  const ModelConfig c = preset_config("120b-shape");
  const ModelConfig back = parse_model_config(c.to_json(), "roundtrip");
  EXPECT_EQ(back.num_local_experts, 128);
  EXPECT_EQ(back.layer_is_sliding, c.layer_is_sliding);
  EXPECT_EQ(back.to_json(), c.to_json());
}

void expect_config_error(const std::string& text, const std::string& needle) {
  try {
    parse_model_config(text, "bad/config.json");
    FAIL() << "no error for: " << needle;
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("bad/config.json"), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  }
}

TEST(ConfigTest, InconsistentConfigsAreRejectedWithTheField) {
  auto with = [](const std::string& from, const std::string& to) {
    std::string t = kPublished20b;
    t.replace(t.find(from), from.size(), to);
    return t;
  };
  expect_config_error(with("\"hidden_size\": 2880", "\"hidden_size\": 2890"), "hidden_size (2890) is not a multiple of 32");
  expect_config_error(with("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 7"), "not divisible by num_key_value_heads");
  expect_config_error(with("\"quant_method\": \"mxfp4\"", "\"quant_method\": \"gptq\""), "unsupported quantization_config");
  expect_config_error(with("\"vocab_size\": 201088", "\"vocab_size\": \"big\""), "field 'vocab_size' must be a number");
  expect_config_error(with("\"vocab_size\": 201088", "\"vocab_sizes\": 201088"), "missing field 'vocab_size'");
  expect_config_error(with("\"num_hidden_layers\": 24", "\"num_hidden_layers\": 23"), "layer_types has 24 entries for 23 layers");
  expect_config_error(with("\"num_experts_per_tok\": 4", "\"num_experts_per_tok\": 40"), "exceeds num_local_experts");
  expect_config_error(with("\"model_type\": \"gpt_oss\"", "\"model_type\": \"llama\""), "model_type");
  expect_config_error(with("\"head_dim\": 64", "\"head_dim\": 64.5"), "must be an integer");
  expect_config_error("{\"hidden_size\": 2880,", "malformed JSON");
  expect_config_error("[1, 2]", "must be a JSON object");
}

// --- safetensors ---

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const uint64_t len = header.size();
  std::memcpy(out.data(), &len, 8);
  return out + header + data;
}

void expect_file_error(const std::string& path, const std::string& needle) {
  try {
    SafetensorsFile f(path);
    FAIL() << "no error for: " << needle;
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  }
}

TEST(SafetensorsTest, ReadsTensorsAndRejectsBadFiles) {
  TempDir dir;
  const std::string good = dir.file("good.safetensors");
  const float values[3] = {1.5f, -2.0f, 3.25f};
  write_safetensors(good, {{"a", DType::kF32, {3}, values}});
  {
    SafetensorsFile f(good);
    const Tensor t = f.view("a");
    EXPECT_EQ(t.dtype, DType::kF32);
    EXPECT_EQ(t.shape, Shape({3}));
    EXPECT_EQ(t.as<const float>()[2], 3.25f);
  }
  const std::string p = dir.file("bad.safetensors");
  write_bytes(p, "abc");
  expect_file_error(p, "file too short");
  write_bytes(p, safetensors_bytes("{\"a\":", ""));
  expect_file_error(p, "malformed safetensors header JSON");
  std::string huge(8, '\0');
  const uint64_t len = 1ull << 40;
  std::memcpy(huge.data(), &len, 8);
  write_bytes(p, huge + "{}");
  expect_file_error(p, "header length 1099511627776 runs past the end of the file");
  write_bytes(p, safetensors_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(8, 'x')));
  expect_file_error(p, "tensor 'a': data_offsets end 16 past the end of the data (8 bytes; file truncated?)");
  write_bytes(p, safetensors_bytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", std::string(16, 'x')));
  expect_file_error(p, "tensor 'a': byte size 16 does not match shape [3] of F32");
  write_bytes(p, safetensors_bytes(R"({"a":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})", std::string(4, 'x')));
  expect_file_error(p, "tensor 'a': unsupported dtype F8_E4M3");
  write_bytes(p, safetensors_bytes(R"({"a":{"dtype":"U8","shape":[-4],"data_offsets":[0,4]}})", std::string(4, 'x')));
  expect_file_error(p, "shape entries must be non-negative integers");
  write_bytes(p, safetensors_bytes(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[4,0]}})", std::string(4, 'x')));
  expect_file_error(p, "data_offsets begin after end");
  expect_file_error(dir.file("missing.safetensors"), "cannot open");
}

// Random corruptions of a valid file: every outcome is a clean load or a runtime_error naming the file.
TEST(SafetensorsTest, RandomizedHeaderCorruptionNeverCrashes) {
  TempDir dir;
  const std::string good = dir.file("good.safetensors");
  std::vector<uint16_t> w(48, 0x3f80);
  const uint8_t blocks[64] = {};
  write_safetensors(good, {{"model.w", DType::kBF16, {6, 8}, w.data()}, {"model.b", DType::kU8, {4, 16}, blocks}});
  std::ifstream in(good, std::ios::binary);
  const std::string original((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t header_len = 0;
  std::memcpy(&header_len, original.data(), 8);
  std::mt19937 rng(1234);
  const std::string alphabet = "{}[]\":,0123456789-eE.abcdefFUIB_ \\\x00\xff";
  const std::string p = dir.file("fuzz.safetensors");
  int loaded = 0, rejected = 0;
  for (int iter = 0; iter < 2000; ++iter) {
    std::string bytes = original;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      switch (rng() % 5) {
        case 0:  // replace a header byte
          if (bytes.size() > 8) bytes[8 + rng() % std::min<uint64_t>(header_len, bytes.size() - 8)] = alphabet[rng() % alphabet.size()];
          break;
        case 1:  // truncate anywhere
          if (!bytes.empty()) bytes.resize(rng() % bytes.size());
          break;
        case 2: {  // random header length
          const uint64_t l = rng() % 2 ? rng() % (bytes.size() + 16) : (static_cast<uint64_t>(rng()) << 32 | rng());
          if (bytes.size() >= 8) std::memcpy(bytes.data(), &l, 8);
          break;
        }
        case 3:  // duplicate a slice of the header
          if (bytes.size() > 16) {
            const size_t at = 8 + rng() % (bytes.size() - 8);
            bytes.insert(at, bytes.substr(at, rng() % 12));
          }
          break;
        default:  // flip a digit
          for (size_t i = 8; i < std::min<size_t>(bytes.size(), 8 + header_len); ++i)
            if (std::isdigit(static_cast<unsigned char>(bytes[i])) && rng() % 8 == 0) bytes[i] = static_cast<char>('0' + rng() % 10);
      }
    }
    write_bytes(p, bytes);
    try {
      SafetensorsFile f(p);
      for (const auto& [name, info] : f.tensors()) {
        const Tensor t = f.view(name);
        ASSERT_LE(info.end, bytes.size());
        ASSERT_EQ(t.bytes(), info.end - info.begin);
      }
      ++loaded;
    } catch (const std::runtime_error& e) {
      ASSERT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 100);
  EXPECT_GT(loaded, 0);
}

// --- checkpoints ---

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = testing::small_config(256);
    make_random_model(config_, dir_.path());
  }
  // Rewrites model.safetensors with one tensor dropped or replaced.
  void rewrite(const std::string& name, const TensorToWrite* replacement) {
    const std::string path = dir_.file("model.safetensors");
    std::vector<TensorToWrite> tensors;
    std::vector<std::vector<uint8_t>> storage;
    {
      SafetensorsFile f(path);
      for (const auto& [n, info] : f.tensors()) {
        if (n == name) {
          if (replacement) tensors.push_back(*replacement);
          continue;
        }
        const Tensor t = f.view(n);
        storage.emplace_back(static_cast<const uint8_t*>(t.data), static_cast<const uint8_t*>(t.data) + t.bytes());
        tensors.push_back({n, info.dtype, info.shape, storage.back().data()});
      }
      write_safetensors(path + ".new", tensors);
    }
    std::filesystem::rename(path + ".new", path);
  }
  void expect_load_error(const std::string& needle) {
    try {
      Checkpoint ck(dir_.path());
      CpuBackend backend(1);
      load_weights(config_, ck, backend);
      FAIL() << "no error for: " << needle;
    } catch (const std::runtime_error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    }
  }
  TempDir dir_;
  ModelConfig config_;
};

TEST_F(CheckpointTest, MissingTensorIsNamed) {
  rewrite("model.layers.1.self_attn.sinks", nullptr);
  expect_load_error("missing tensor 'model.layers.1.self_attn.sinks'");
}

TEST_F(CheckpointTest, WrongShapeIsNamedWithFile) {
  std::vector<uint16_t> data(10);
  TensorToWrite t{"model.layers.0.self_attn.k_proj.bias", DType::kBF16, {10}, data.data()};
  rewrite(t.name, &t);
  expect_load_error("model.safetensors: tensor 'model.layers.0.self_attn.k_proj.bias' has shape [10], expected [128]");
}

TEST_F(CheckpointTest, WrongDtypeIsNamed) {
  std::vector<float> data(128);
  TensorToWrite t{"model.layers.2.self_attn.v_proj.bias", DType::kF32, {128}, data.data()};
  rewrite(t.name, &t);
  expect_load_error("tensor 'model.layers.2.self_attn.v_proj.bias' has dtype F32, expected BF16");
}

TEST_F(CheckpointTest, NormsMayBeF32OrBf16) {
  std::vector<float> ones(64, 1.0f);
  TensorToWrite t{"model.norm.weight", DType::kF32, {64}, ones.data()};
  rewrite(t.name, &t);
  Checkpoint ck(dir_.path());
  CpuBackend backend(1);
  EXPECT_NO_THROW(load_weights(config_, ck, backend));
}

TEST_F(CheckpointTest, TruncatedFileIsRejected) {
  const std::string path = dir_.file("model.safetensors");
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 100);
  try {
    Checkpoint ck(dir_.path());
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("file truncated?"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

TEST_F(CheckpointTest, ShardedEqualsSingleFile) {
  TempDir sharded;
  MakeModelOptions o;
  o.shard_bytes = 200 << 10;  // forces several shards
  make_random_model(config_, sharded.path(), o);
  EXPECT_TRUE(std::filesystem::exists(sharded.file("model.safetensors.index.json")));
  EXPECT_TRUE(std::filesystem::exists(sharded.file("model-00000-of-00002.safetensors")) ||
              std::filesystem::exists(sharded.file("model-00000-of-00003.safetensors")) ||
              std::filesystem::exists(sharded.file("model-00000-of-00004.safetensors")));
  Checkpoint a(dir_.path()), b(sharded.path());
  EXPECT_EQ(a.names(), b.names());
  CpuBackend backend(1);
  ModelOptions mo;
  mo.max_step_rows = 8;
  mo.max_logit_rows = 8;
  mo.kv.block_size = 4;
  Model ma(config_, a, backend, mo), mb(config_, b, backend, mo);
  const std::vector<int32_t> tokens = {1, 5, 9, 200, 17};
  EXPECT_EQ(compute_all_logits(ma, tokens), compute_all_logits(mb, tokens));
}

TEST_F(CheckpointTest, IndexNamingAMissingShardOrTensorIsAnError) {
  TempDir sharded;
  MakeModelOptions o;
  o.shard_bytes = 200 << 10;
  make_random_model(config_, sharded.path(), o);
  const std::string index = sharded.file("model.safetensors.index.json");
  std::ifstream in(index);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  in.close();
  const std::string bad = std::regex_replace(text, std::regex("model-00000-of"), "model-99999-of");
  write_bytes(index, bad);
  EXPECT_THROW(Checkpoint ck(sharded.path()), std::runtime_error);
  write_bytes(index, "{\"weight_map\": {\"x\": \"../../etc/passwd\"}}");
  EXPECT_THROW(Checkpoint ck(sharded.path()), std::runtime_error);
  write_bytes(index, "{\"weight_map\": ");
  try {
    Checkpoint ck(sharded.path());
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors.index.json: malformed JSON"), std::string::npos) << e.what();
  }
}

TEST_F(CheckpointTest, ExpertsStayPackedAndCanBeSliced) {
  Checkpoint ck(dir_.path());
  CpuBackend backend(1);
  backend.set_copy_weights(false);  // the checkpoint's own mapping
  const ModelWeights w = load_weights(config_, ck, backend, ExpertRange{2, 3});
  const ExpertWeights& e = w.layers[0].experts;
  EXPECT_EQ(e.gate_up_blocks.dtype, DType::kU8);
  EXPECT_EQ(e.num_experts(), 3);
  EXPECT_EQ(e.gate_up_blocks.shape, Shape({3, 128, 2, 16}));
  const Tensor all = ck.get("model.layers.0.mlp.experts.gate_up_proj_blocks", DType::kU8, {6, 128, 2, 16});
  const auto* slice = static_cast<const uint8_t*>(all.data) + 2 * 128 * 2 * 16;
  EXPECT_EQ(e.gate_up_blocks.data, slice);  // a view, no copy
  EXPECT_THROW(load_weights(config_, ck, backend, ExpertRange{5, 2}), std::runtime_error);
  // By default every weight is a 64-byte-aligned copy of its view: the slice alone, not the
  // checkpoint's whole tensor.
  CpuBackend copying(1);
  const ModelWeights a = load_weights(config_, ck, copying, ExpertRange{2, 3});
  const Tensor& codes = a.layers[0].experts.gate_up_blocks;
  EXPECT_EQ(reinterpret_cast<uintptr_t>(codes.data) % 64, 0u);
  EXPECT_NE(codes.data, slice);
  EXPECT_EQ(codes.bytes(), e.gate_up_blocks.bytes());
  EXPECT_EQ(0, std::memcmp(codes.data, slice, codes.bytes()));
  const Tensor& scales = a.layers[0].experts.gate_up_scales;
  const auto* scale_slice =
      static_cast<const uint8_t*>(ck.get("model.layers.0.mlp.experts.gate_up_proj_scales", DType::kU8, {6, 128, 2}).data) + 2 * 128 * 2;
  EXPECT_NE(scales.data, scale_slice);
  EXPECT_EQ(0, std::memcmp(scales.data, scale_slice, scales.bytes()));
  EXPECT_EQ(0, std::memcmp(a.layers[0].q_weight.data, w.layers[0].q_weight.data, w.layers[0].q_weight.bytes()));
  EXPECT_NE(a.layers[0].q_weight.data, w.layers[0].q_weight.data);
}

// Resident kB of the mapping that holds `p` (/proc/self/smaps), or -1 where there is none.
long mapping_rss_kb(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  const auto at = reinterpret_cast<uintptr_t>(p);
  bool in = false;
  while (std::getline(smaps, line)) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find(':') > line.find('-')) {
      in = lo <= at && at < hi;
      continue;
    }
    long kb = 0;
    if (in && std::sscanf(line.c_str(), "Rss: %ld kB", &kb) == 1) return kb;
  }
  return -1;
}

// Checkpoint::release_pages (what a loader does once a host backend has copied a view): the pages
// wholly inside the view leave the process's resident set, reading the view again gives the same
// bytes, and views outside the checkpoint (or reaching past a mapping) are left alone.
TEST_F(CheckpointTest, ReleasedPagesLeaveTheResidentSetAndReadBackTheSame) {
  Checkpoint ck(dir_.path());
  const Tensor t = ck.get("model.layers.0.mlp.experts.gate_up_proj_blocks", DType::kU8, {6, 128, 2, 16});
  ASSERT_GE(t.bytes(), size_t{5} * 4096);
  const std::vector<uint8_t> before(static_cast<const uint8_t*>(t.data), static_cast<const uint8_t*>(t.data) + t.bytes());
  const long touched = mapping_rss_kb(t.data);
  ASSERT_GT(touched, 0);
  ck.release_pages(t);
  const long released = mapping_rss_kb(t.data);
  EXPECT_LE(released, touched - 16) << "at least the 4 whole pages inside the tensor leave the resident set";
  EXPECT_EQ(0, std::memcmp(t.data, before.data(), before.size()));
  EXPECT_GT(mapping_rss_kb(t.data), released);
  std::vector<uint8_t> heap(3 * 4096, 7);
  ck.release_pages(Tensor{heap.data(), DType::kU8, {static_cast<int64_t>(heap.size())}});
  EXPECT_EQ(std::count(heap.begin(), heap.end(), 7), static_cast<long>(heap.size()));
  const auto* end = static_cast<const uint8_t*>(t.data) + t.bytes();
  const long again = mapping_rss_kb(t.data);
  ck.release_pages(Tensor{const_cast<uint8_t*>(end) - 4096, DType::kU8, {int64_t{1} << 40}});  // past the mapping
  EXPECT_EQ(mapping_rss_kb(t.data), again);
}

// Loading into a copying host backend releases the checkpoint's pages as it goes; the mapping
// backend keeps them.
TEST_F(CheckpointTest, CopyingLoadReleasesTheMapping) {
  Checkpoint ck(dir_.path());
  const Tensor q = ck.get("model.layers.0.self_attn.q_proj.weight", DType::kBF16,
                          {config_.num_attention_heads * config_.head_dim, config_.hidden_size});
  CpuBackend mapping(1);
  mapping.set_copy_weights(false);
  const ModelWeights views = load_weights(config_, ck, mapping, ExpertRange{});
  volatile unsigned sum = 0;  // every page of every tensor touched
  for (const std::string& name : ck.names()) {
    const Tensor t = ck.get_any(name, {ck.info(name).dtype}, ck.info(name).shape);
    for (size_t i = 0; i < t.bytes(); i += 512) sum = sum + static_cast<const uint8_t*>(t.data)[i];
  }
  const long mapped = mapping_rss_kb(q.data);
  CpuBackend copying(1);
  const ModelWeights copies = load_weights(config_, ck, copying, ExpertRange{});
  EXPECT_LT(mapping_rss_kb(q.data), mapped);
  EXPECT_EQ(0, std::memcmp(copies.layers[0].q_weight.data, views.layers[0].q_weight.data, q.bytes()));
}

}  // namespace
}  // namespace arbiter
