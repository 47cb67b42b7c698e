// The arbiter command: one binary, one subcommand per job (like git). Each subcommand parses its
// own options, reports errors on stderr with exit status 2 (usage) or 1 (failure).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

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
namespace {

const char* kUsage =
    "usage: arbiter <command> [options]      (arbiter <command> --help: that command's options)\n"
    "\n"
    "commands:\n"
    "  serve       HTTP (and gRPC) API: /v1/classify, /v1/policies, /v1/chat/completions, /metrics\n"
    "  classify    offline classification: one content or a JSONL file against one or more policies\n"
    "  bench       load generator: prefix caching on vs off, decisions/s, latency, step-loop overhead\n"
    "  export      labelled dataset (JSONL) from the decision log: human feedback, else the model's verdict\n"
    "  eval        evaluate policies on a labelled dataset: precision/recall/F1, cost per stage, cascade sweep\n"
    "  triage      train the fastText triage classifier of a policy from a labelled dataset; its benchmark\n"
    "  placement   expert placement balanced from measured expert load (for --placement)\n"
    "  make-model  write a random checkpoint in the Hugging Face layout (presets tiny, 20b-shape, 120b-shape)\n"
    "  logits      logits of a token sequence as a float32 .npy\n"
    "  generate    greedy continuation of a token sequence\n"
    "  tokenize    text to o200k_harmony token ids\n"
    "  detokenize  token ids to text\n"
    "  render      the harmony prompt of a safeguard classification\n"
    "\n"
    "Every command takes --config FILE: more options from a deployment config (configs/deploy/*.yaml),\n"
    "one `option: value` per line; options on the command line win. Usage errors exit 2, failures 1.\n";

// Options that logits, generate, classify and serve take to split the experts over ranks.
#define ARBITER_RANK_OPTIONS                                                                                      \
  "  --transport auto|threads|mpi|nccl  how ranks talk (auto: mpi under mpirun, else threads)\n"                 \
  "  --ranks N                expert-parallel thread ranks in this process (1); under mpirun use -np N\n"        \
  "  --placement FILE         expert placement (configs/placement/; default: contiguous, even)\n"

const char* const kMakeModelUsage =
    "usage: arbiter make-model --out DIR [options]\n"
    "Writes a random checkpoint in the Hugging Face layout (config.json, model.safetensors or shards with\n"
    "an index, tokenizer.json).\n"
    "  --out DIR                where to write (required)\n"
    "  --preset NAME            tiny | 20b-shape | 120b-shape (tiny)\n"
    "  --layers N, --hidden N, --intermediate N, --experts N, --experts-per-token N, --heads N,\n"
    "  --kv-heads N, --head-dim N, --vocab N, --window N\n"
    "                           override the preset's shape\n"
    "  --seed N                 random seed (1)\n"
    "  --shard-mb N             largest safetensors shard in MiB (4096)\n"
    "  --f32-norms              store the norm weights as float32 instead of bf16\n"
    "  --tokenizer-dir DIR      folder with tokenizer.json to copy in ($ARBITER_TOKENIZER_DIR or .cache/tokenizer)\n";

const char* const kLogitsUsage =
    "usage: arbiter logits --model DIR --tokens 1,2,3 --out FILE.npy [options]\n"
    "Writes the logits of every position as float32 [tokens, vocab].\n"
    "  --model DIR              checkpoint folder (required)\n"
    "  --tokens IDS             comma-separated token ids (required)\n"
    "  --out FILE.npy           output file (required)\n"
    "  --device cpu|cuda[:N]|auto  (auto: CUDA when a GPU is present)\n"
    "  --step-tokens N          rows per forward step (256)\n" ARBITER_RANK_OPTIONS;

const char* const kGenerateUsage =
    "usage: arbiter generate --model DIR --tokens 1,2,3 [options]\n"
    "Greedy continuation through the KV cache; prints {\"tokens\": [...]}.\n"
    "  --model DIR              checkpoint folder (required)\n"
    "  --tokens IDS             comma-separated prompt token ids (required)\n"
    "  --max-new-tokens N       tokens to generate (16)\n"
    "  --timings                also print \"timings\": seconds to load, prefill (which yields the first new\n"
    "                           token) and decode (one step per further token), and decode tokens/s\n"
    "  --device cpu|cuda[:N]|auto  (auto: CUDA when a GPU is present)\n"
    "  --step-tokens N          rows per forward step (256)\n" ARBITER_RANK_OPTIONS;

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
  const bool timings = args.flag("timings");
  run_ranks(args, [&](const CliArgs& rank_args, const RankContext& rank) {
    const auto start = std::chrono::steady_clock::now();
    LoadedModel m = load(rank_args, 1, static_cast<int>(tokens.size()) + max_new, rank);
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    rank_args.check_all_used();
    if (!rank.leads()) return m.model->serve_peers();
    GenerateTimings t;
    const auto out = greedy_generate(*m.model, tokens, max_new, {}, &t);
    m.model->serve_peers();
    nlohmann::ordered_json j;
    j["tokens"] = out;
    if (timings)
      j["timings"] = {{"load_s", load_s},
                      {"prefill_tokens", t.prefill_tokens},
                      {"prefill_s", t.prefill_seconds},
                      {"decode_steps", t.decode_steps},
                      {"decode_s", t.decode_seconds},
                      {"decode_tokens_per_s", t.decode_steps > 0 ? t.decode_steps / t.decode_seconds : 0.0}};
    std::cout << j.dump() << "\n";
  });
  return 0;
}

}  // namespace
}  // namespace arbiter

int main(int argc, char** argv) {
  using namespace arbiter;
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  std::string cmd = argv[1];
  const bool help = cmd == "help";  // `arbiter help [NAME]`
  if (help) {
    if (argc < 3) return std::fputs(kUsage, stdout), 0;
    cmd = argv[2];
  }
  // name, boolean flags, usage (printed by `arbiter NAME --help`), the command.
  struct Command {
    const char* name;
    std::set<std::string> flags;
    const char* usage;
    int (*run)(const CliArgs&);
  };
  const Command commands[] = {
      {"make-model", {"f32-norms"}, kMakeModelUsage, cmd_make_model},
      {"logits", {}, kLogitsUsage, cmd_logits},
      {"tokenize", {"specials", "jsonl"}, kTokenizeUsage, cmd_tokenize},
      {"detokenize", {"jsonl"}, kDetokenizeUsage, cmd_detokenize},
      {"render", {"hf-newlines"}, kRenderUsage, cmd_render},
      {"generate", {"timings"}, kGenerateUsage, cmd_generate},
      {"serve", {"no-prefix-cache", "policy-db-readonly", "no-decision-log", "no-expert-stats"}, kServeUsage, cmd_serve},
      {"classify", {"no-prefix-cache", "no-reasoning"}, kClassifyUsage, cmd_classify},
      {"bench", {"quick"}, kBenchUsage, cmd_bench},
      {"export", {"model-labels"}, kExportUsage, cmd_export},
      {"triage", {}, kTriageUsage, cmd_triage},
      {"eval", {"no-prefix-cache", "resume"}, kEvalUsage, cmd_eval},
      {"placement", {}, kPlacementUsage, cmd_placement},
  };
  // Commands whose first argument is an action word (`arbiter triage train ...`).
  const std::set<std::string> with_action = {"triage"};
  try {
    for (const Command& c : commands) {
      if (cmd != c.name) continue;
      if (help) return std::fputs(c.usage, stdout), 0;
      std::set<std::string> flags = c.flags;
      flags.insert("help");
      const CliArgs args(argc - 2, argv + 2, flags, with_action.count(cmd));
      if (args.flag("help")) {
        std::fputs(c.usage, stdout);
        return 0;
      }
      return c.run(args);
    }
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
