// Helpers for the text-layer tests: the real gpt-oss tokenizer (fetched by
// scripts/fetch-tokenizer.sh; a missing tokenizer fails the test, it never skips), the node
// oracles, the golden harmony example and subprocess capture.
#pragma once

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/wait.h>

#include "runtime/tokenizer.h"
#include "tests/test_util.h"

namespace arbiter::text_testing {

inline std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

// Folder holding tokenizer.json (env ARBITER_TOKENIZER_DIR overrides the CMake setting).
inline std::string tokenizer_dir() { return env_or("ARBITER_TOKENIZER_DIR", ARBITER_TOKENIZER_DIR); }
inline std::string node_dir() { return env_or("ARBITER_NODE_DIR", ARBITER_NODE_DIR); }
inline std::string node_binary() { return env_or("ARBITER_NODE", ARBITER_NODE); }
inline std::string source_dir() { return ARBITER_SOURCE_DIR; }
inline std::string golden_dir() { return ARBITER_GOLDEN_DIR; }
inline std::string data_dir() { return std::string(ARBITER_GOLDEN_DIR) + "/../data"; }

inline std::string tokenizer_json() {
  const std::string path = tokenizer_dir() + "/tokenizer.json";
  if (!std::filesystem::exists(path))
    throw std::runtime_error(path + " is missing: run scripts/fetch-tokenizer.sh (or set ARBITER_TOKENIZER_DIR)");
  return path;
}

// One tokenizer per test process.
inline const Tokenizer& tokenizer() {
  static const Tokenizer t = Tokenizer::from_hf_json(tokenizer_json());
  return t;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline nlohmann::json golden_harmony() {
  return nlohmann::json::parse(read_file(golden_dir() + "/harmony/safeguard_prompt.json"));
}

using arbiter::testing::RunResult;
using arbiter::testing::run_command;

inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (const char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// A fresh temporary folder, removed with the object.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/arbiter-text-XXXXXX";
    if (!::mkdtemp(tmpl)) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Runs tests/text/oracle.mjs in `mode`, writing to `out`; throws with node's output on failure.
inline void run_oracle(const std::string& mode, const std::string& out) {
  const std::string node = node_binary();
  if (node.empty() || node.find("NOTFOUND") != std::string::npos)
    throw std::runtime_error("node is not installed (needed for the tiktoken oracle)");
  if (!std::filesystem::exists(node_dir() + "/node_modules/tiktoken/package.json"))
    throw std::runtime_error(node_dir() + " has no tiktoken: run scripts/fetch-tokenizer.sh");
  const auto r = run_command(shell_quote(node) + " " + shell_quote(source_dir() + "/tests/text/oracle.mjs") + " " +
                             shell_quote(node_dir()) + " " + mode + " " + shell_quote(out));
  if (r.status != 0) throw std::runtime_error("oracle.mjs " + mode + " failed: " + r.output);
}

}  // namespace arbiter::text_testing
