// Text-layer benchmark: encode throughput (MB/s, one thread) on a corpus file, chunked exactly
// like bench/text/tiktoken_speed.mjs chunks it for npm tiktoken, and the time to render and
// tokenize a safeguard prompt (a ~500-token policy and a ~100-token content). Prints one JSON
// object; bench/text/encode_speed.sh runs both sides and prints the ratio.
//   text_bench --tokenizer DIR|FILE --corpus FILE [--policy FILE] [--reps N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/safeguard.h"
#include "runtime/tokenizer.h"
#include "runtime/utf8.h"

namespace {

using Clock = std::chrono::steady_clock;

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Chunks end at the first '\n' at or after every 64 KiB (the same rule as tiktoken_speed.mjs).
std::vector<std::string_view> chunks_of(const std::string& text) {
  std::vector<std::string_view> out;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = std::min(text.size(), start + 65536);
    if (end < text.size()) {
      const size_t nl = text.find('\n', end);
      end = nl == std::string::npos ? text.size() : nl + 1;
    }
    out.push_back(std::string_view(text).substr(start, end - start));
    start = end;
  }
  return out;
}

std::string arg(int argc, char** argv, const std::string& name, const std::string& fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (argv[i] == "--" + name) return argv[i + 1];
  if (fallback.empty()) throw std::invalid_argument("missing --" + name);
  return fallback;
}

}  // namespace

int main(int argc, char** argv) try {
  using namespace arbiter;
  const Tokenizer tok = Tokenizer::load(arg(argc, argv, "tokenizer", ""));
  const std::string corpus = read_file(arg(argc, argv, "corpus", ""));
  const int reps = std::stoi(arg(argc, argv, "reps", "3"));
  const auto chunks = chunks_of(corpus);

  std::vector<int32_t> ids;
  size_t tokens = 0;
  for (const auto c : chunks) {  // warm-up; counts tokens
    ids.clear();
    tok.encode_append(c, ids);
    tokens += ids.size();
  }
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    for (const auto c : chunks) {
      ids.clear();
      tok.encode_append(c, ids);
    }
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }

  // Prompt rendering: a policy cut to ~500 tokens, a content of ~100 tokens from the corpus.
  std::string policy = read_file(arg(argc, argv, "policy", std::string(ARBITER_SOURCE_DIR) + "/../shared/data/spam/policy.txt"));
  while (tok.encode(policy).size() > 500) policy.resize(utf8::valid_prefix(policy.substr(0, policy.size() * 9 / 10)));
  std::string content = corpus.substr(0, 2000);
  while (tok.encode(content).size() > 100) content.resize(utf8::valid_prefix(content.substr(0, content.size() * 9 / 10)));
  SafeguardPromptOptions o;
  o.effort = ReasoningEffort::kLow;
  size_t prompt_tokens = 0;
  const int prompts = 2000;
  double render_best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    for (int i = 0; i < prompts; ++i) prompt_tokens = render_safeguard_prompt(tok, policy, content, o).size();
    render_best = std::min(render_best, std::chrono::duration<double>(Clock::now() - t0).count());
  }

  nlohmann::json j;
  j["engine"] = "arbiter";
  j["bytes"] = corpus.size();
  j["tokens"] = tokens;
  j["chunks"] = chunks.size();
  j["seconds"] = best;
  j["mb_per_s"] = static_cast<double>(corpus.size()) / 1e6 / best;
  j["render_prompt_tokens"] = prompt_tokens;
  j["render_policy_tokens"] = tok.encode(policy).size();
  j["render_content_tokens"] = tok.encode(content).size();
  j["render_us"] = render_best / prompts * 1e6;
  std::cout << j.dump() << "\n";
  return 0;
} catch (const std::exception& e) {
  std::cerr << "text_bench: " << e.what() << "\n";
  return 1;
}
