// Helpers shared by the test suites: golden-case loading, temporary folders, small random models.
#pragma once

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>
#include <sys/wait.h>

#include "runtime/config.h"
#include "runtime/make_model.h"
#include "runtime/model.h"

namespace arbiter::testing {

inline std::string golden_dir() { return ARBITER_GOLDEN_DIR; }

struct GoldenCase {
  std::string dir;
  std::vector<int32_t> tokens;
  std::vector<int32_t> greedy;
  double min_top2_margin = 0;
};

inline GoldenCase load_golden_case(const std::string& name) {
  GoldenCase g;
  g.dir = golden_dir() + "/" + name;
  std::ifstream in(g.dir + "/case.json");
  if (!in) throw std::runtime_error("golden case missing: " + g.dir);
  const auto j = nlohmann::json::parse(in);
  g.tokens = j.at("tokens").get<std::vector<int32_t>>();
  g.greedy = j.at("greedy_continuation").get<std::vector<int32_t>>();
  g.min_top2_margin = j.value("min_top2_margin", 0.0);
  return g;
}

inline std::vector<std::string> golden_case_names() {
  std::vector<std::string> names;
  std::error_code ec;  // a missing folder yields no cases; GoldenData.CasesArePresent then fails
  for (const auto& e : std::filesystem::directory_iterator(golden_dir(), ec))
    if (std::filesystem::exists(e.path() / "case.json")) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// A fresh temporary folder, removed with the object.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() / ("arbiter-test-" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string path() const { return path_.string(); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

struct RunResult {
  int status;
  std::string output;
};

// Runs a shell command, capturing stdout (and stderr when merge_stderr).
// `s` as one word for the shell (single-quoted).
inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (const char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

inline RunResult run_command(const std::string& cmd, bool merge_stderr = true) {
  const std::string full = cmd + (merge_stderr ? " 2>&1" : "");
  std::FILE* pipe = ::popen(full.c_str(), "r");
  if (!pipe) return {-1, "popen failed"};
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) out.append(buf.data(), n);
  const int st = ::pclose(pipe);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out};
}

// A small config with every feature switched on (GQA, sliding window shorter than test sequences).
inline ModelConfig small_config(int vocab = 512) {
  ModelConfig c = preset_config("tiny");
  c.vocab_size = vocab;
  c.num_hidden_layers = 3;
  c.hidden_size = 64;
  c.intermediate_size = 64;
  c.num_local_experts = 6;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.sliding_window = 5;
  c.layer_is_sliding = {true, false, true};
  return c;
}

// Model options for small_config(): blocks of 4 (so short tests cross block boundaries), 64 full
// blocks and a 32-block sliding pool per layer.
inline ModelOptions small_model_options(int step_rows = 64, int logit_rows = 64) {
  ModelOptions o;
  o.max_step_rows = step_rows;
  o.max_logit_rows = logit_rows;
  o.kv.block_size = 4;
  o.kv.full_blocks = 64;
  o.kv.sliding_blocks = 32;
  return o;
}

}  // namespace arbiter::testing
