// The arbiter command: one binary, one subcommand per job (like git). Each subcommand parses its
// own options, reports errors on stderr with exit status 2 (usage) or 1 (failure).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>

#include "kernels/backend.h"
#include "runtime/config.h"
#include "runtime/generate.h"
#include "runtime/make_model.h"
#include "runtime/model.h"
#include "runtime/npy.h"
#include "runtime/safetensors.h"
#include "tools/arbiter/cli_args.h"
#include "tools/arbiter/commands.h"
#include "tools/arbiter/ranks.h"

namespace arbiter {
int cmd_serve(const CliArgs& args);  // tools/arbiter/cmd_serve.cc
namespace {

const char* kUsage =
    "usage: arbiter <command> [options]\n"
    "\n"
    "commands:\n"
    "  make-model --out DIR [--preset tiny|20b-shape|120b-shape] [--layers N] [--hidden N]\n"
    "             [--intermediate N] [--experts N] [--experts-per-token N] [--heads N] [--kv-heads N]\n"
    "             [--head-dim N] [--vocab N] [--window N] [--seed N] [--shard-mb N] [--f32-norms]\n"
    "             [--tokenizer-dir DIR]  (default: $ARBITER_TOKENIZER_DIR or .cache/tokenizer)\n"
    "  logits     --model DIR --tokens 1,2,3 --out FILE.npy [--device cpu|cuda[:N]|auto]\n"
    "  tokenize   --tokenizer FILE|--model DIR [--text T | stdin] [--specials] [--jsonl] [--invalid-utf8 replace|error]\n"
    "  detokenize --tokenizer FILE|--model DIR [--tokens 1,2,3 | stdin JSON array] [--jsonl]\n"
    "  render     --tokenizer FILE|--model DIR --policy FILE|--joint ID=FILE,... [--content T|--content-file F|stdin]\n"
    "             [--reasoning low|medium|high] [--date YYYY-MM-DD] [--hf-newlines]\n"
    "  generate   --model DIR --tokens 1,2,3 --max-new-tokens N [--device ...]\n"
    "  serve      --model DIR [--host H] [--port P] [--api-key-file F] [--policy-db FILE] [--no-prefix-cache]\n"
    "             HTTP API: /v1/classify, /v1/policies, /v1/chat/completions, /metrics (`arbiter serve --help`)\n"
    "  classify   --model DIR --policy FILE[,FILE...] (--content T | --input IN.jsonl [--output OUT.jsonl])\n"
    "             [--effort low|medium|high] [--max-tokens N] [--labels A,B --violating B] [--no-reasoning]\n"
    "             [--reasoning-budget N|LOW,MEDIUM,HIGH] [--no-prefix-cache] [--device ...] [--max-context N] [--kv-blocks N]\n"
    "             [--mode reason|score] [--score-prefix empty_analysis|direct] [--answer-format auto|binary|labels|json]\n"
    "             (score: no reasoning, each allowed answer's probability read after a forced final header)\n"
    "  bench      (--model DIR | --preset tiny|small) [--requests N] [--policies P] [--reasoning-tokens N] [--mode score]\n"
    "             [--json FILE]  load generator: prefix caching on vs off, decisions/s, latency, step overhead\n"
    "  (logits, generate, classify and serve also take [--transport auto|threads|mpi|nccl] [--ranks N] [--placement FILE]:\n"
    "   experts split over N thread ranks, or over the processes of `mpirun -np N arbiter ...`)\n";

std::vector<int32_t> token_arg(const CliArgs& args) {
  const auto ids = parse_token_list(args.require("tokens"));
  return std::vector<int32_t>(ids.begin(), ids.end());
}

int cmd_make_model(const CliArgs& args) {
  ModelConfig c = preset_config(args.get("preset", "tiny"));
  auto override_int = [&](const char* flag, int& field) { field = static_cast<int>(args.get_int(flag, field)); };
  override_int("layers", c.num_hidden_layers);
  override_int("hidden", c.hidden_size);
  override_int("intermediate", c.intermediate_size);
  override_int("experts", c.num_local_experts);
  override_int("experts-per-token", c.num_experts_per_tok);
  override_int("heads", c.num_attention_heads);
  override_int("kv-heads", c.num_key_value_heads);
  override_int("head-dim", c.head_dim);
  override_int("vocab", c.vocab_size);
  override_int("window", c.sliding_window);
  c.layer_is_sliding.clear();
  for (int i = 0; i < c.num_hidden_layers; ++i) c.layer_is_sliding.push_back(i % 2 == 0);
  MakeModelOptions o;
  o.seed = static_cast<uint64_t>(args.get_int("seed", 1));
  o.shard_bytes = static_cast<uint64_t>(args.get_int("shard-mb", 4096)) << 20;
  o.norms_f32 = args.flag("f32-norms");
  o.tokenizer_dir = args.get("tokenizer-dir", "");
  if (o.tokenizer_dir.empty()) {
    // Default: the cache scripts/fetch-tokenizer.sh fills, beside the build folder holding this binary.
    const char* env = std::getenv("ARBITER_TOKENIZER_DIR");
    const std::filesystem::path fallback =
        env ? std::filesystem::path(env)
            : std::filesystem::read_symlink("/proc/self/exe").parent_path().parent_path() / ".cache" / "tokenizer";
    if (std::filesystem::exists(fallback / "tokenizer.json")) o.tokenizer_dir = fallback.string();
    else std::cerr << "make-model: no tokenizer at " << fallback.string()
                   << " (run scripts/fetch-tokenizer.sh); writing the model without tokenizer.json\n";
  }
  const std::string out = args.require("out");
  args.check_all_used();
  make_random_model(c, out, o);
  std::cerr << "wrote " << out << " (" << c.num_hidden_layers << " layers, hidden " << c.hidden_size << ", "
            << c.num_local_experts << " experts, vocab " << c.vocab_size << ")\n";
  return 0;
}

struct LoadedModel {
  ModelConfig config;
  std::unique_ptr<Checkpoint> checkpoint;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
};

LoadedModel load(const CliArgs& args, int max_logit_rows, int context, const RankContext& rank = {}) {
  LoadedModel m;
  const std::string dir = args.require("model");
  m.config = load_model_config((std::filesystem::path(dir) / "config.json").string());
  for (int32_t t : token_arg(args))
    if (t >= m.config.vocab_size)
      throw std::invalid_argument("token id " + std::to_string(t) + " outside the vocabulary of " +
                                  std::to_string(m.config.vocab_size));
  m.checkpoint = std::make_unique<Checkpoint>(dir);
  m.backend = make_backend(args.get("device", "auto"));
  ModelOptions o;
  o.max_step_rows = static_cast<int>(args.get_int("step-tokens", 256));
  o.max_logit_rows = max_logit_rows;
  o.kv.block_size = 16;
  o.kv.full_blocks = (context + o.kv.block_size - 1) / o.kv.block_size + 1;
  o.kv.sliding_blocks = (m.config.sliding_window + o.kv.block_size - 1) / o.kv.block_size;
  o.comm = rank.comm;
  o.placement = rank.placement;
  m.model = std::make_unique<Model>(m.config, *m.checkpoint, *m.backend, o);
  return m;
}

int cmd_logits(const CliArgs& args) {
  const auto tokens = token_arg(args);
  const std::string out = args.require("out");
  run_ranks(args, [&](const CliArgs& rank_args, const RankContext& rank) {
    LoadedModel m = load(rank_args, 64, static_cast<int>(tokens.size()), rank);
    rank_args.check_all_used();
    if (!rank.leads()) return m.model->serve_peers();
    const auto logits = compute_all_logits(*m.model, tokens);
    m.model->serve_peers();
    write_npy_f32(out, {static_cast<int64_t>(tokens.size()), m.config.vocab_size}, logits.data());
  });
  return 0;
}

int cmd_generate(const CliArgs& args) {
  const auto tokens = token_arg(args);
  const int max_new = static_cast<int>(args.get_int("max-new-tokens", 16));
  if (max_new < 0) throw std::invalid_argument("--max-new-tokens must be >= 0");
  run_ranks(args, [&](const CliArgs& rank_args, const RankContext& rank) {
    LoadedModel m = load(rank_args, 1, static_cast<int>(tokens.size()) + max_new, rank);
    rank_args.check_all_used();
    if (!rank.leads()) return m.model->serve_peers();
    const auto out = greedy_generate(*m.model, tokens, max_new);
    m.model->serve_peers();
    std::string json = "{\"tokens\":[";
    for (size_t i = 0; i < out.size(); ++i) json += (i ? "," : "") + std::to_string(out[i]);
    std::cout << json << "]}\n";
  });
  return 0;
}

}  // namespace
}  // namespace arbiter

int main(int argc, char** argv) {
  using namespace arbiter;
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "help")) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "make-model") return cmd_make_model(CliArgs(argc - 2, argv + 2, {"f32-norms"}));
    if (cmd == "logits") return cmd_logits(CliArgs(argc - 2, argv + 2, {}));
    if (cmd == "tokenize") return cmd_tokenize(CliArgs(argc - 2, argv + 2, {"specials", "jsonl"}));
    if (cmd == "detokenize") return cmd_detokenize(CliArgs(argc - 2, argv + 2, {"jsonl"}));
    if (cmd == "render") return cmd_render(CliArgs(argc - 2, argv + 2, {"hf-newlines"}));
    if (cmd == "generate") return cmd_generate(CliArgs(argc - 2, argv + 2, {}));
    if (cmd == "serve") return cmd_serve(CliArgs(argc - 2, argv + 2, {"no-prefix-cache", "policy-db-readonly", "help"}));
    if (cmd == "classify") return cmd_classify(CliArgs(argc - 2, argv + 2, {"no-prefix-cache", "no-reasoning"}));
    if (cmd == "bench") return cmd_bench(CliArgs(argc - 2, argv + 2, {"quick"}));
    std::cerr << "arbiter: unknown command '" << cmd << "'\n" << kUsage;
    return 2;
  } catch (const std::invalid_argument& e) {
    std::cerr << "arbiter " << cmd << ": " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "arbiter " << cmd << ": " << e.what() << "\n";
    return 1;
  }
}
