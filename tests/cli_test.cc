// The CLI contract other tools depend on: `arbiter make-model`, `arbiter logits` (.npy output) and
// `arbiter generate` (JSON), run as a subprocess exactly as users run it.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <sys/wait.h>

#include "runtime/config.h"
#include "runtime/npy.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

using Result = testing::RunResult;

Result run(const std::string& args) { return testing::run_command(std::string(ARBITER_BINARY) + " " + args); }

std::string join(const std::vector<int32_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

TEST(CliTest, LogitsAndGenerateMatchGolden) {
  const auto g = testing::load_golden_case("tiny-a");
  testing::TempDir tmp;
  const std::string npy = tmp.file("out.npy");
  const Result r = run("logits --device cpu --model " + g.dir + " --tokens " + join(g.tokens) + " --out " + npy);
  ASSERT_EQ(r.status, 0) << r.output;
  const NpyArray mine = read_npy_f32(npy), ref = read_npy_f32(g.dir + "/logits.npy");
  ASSERT_EQ(mine.shape, ref.shape);
  float max_err = 0, max_logit = 0;
  for (size_t i = 0; i < ref.data.size(); ++i) {
    max_err = std::max(max_err, std::fabs(mine.data[i] - ref.data[i]));
    max_logit = std::max(max_logit, std::fabs(ref.data[i]));
  }
  EXPECT_LE(max_err, 2e-4f * max_logit);

  const Result gen = run("generate --device cpu --model " + g.dir + " --tokens " + join(g.tokens) +
                         " --max-new-tokens " + std::to_string(g.greedy.size()));
  ASSERT_EQ(gen.status, 0) << gen.output;
  const auto j = nlohmann::json::parse(gen.output);
  EXPECT_EQ(j.at("tokens").get<std::vector<int32_t>>(), g.greedy);
  EXPECT_FALSE(j.contains("timings"));

  // --timings: the same tokens, and where the time went.
  const Result timed = run("generate --device cpu --model " + g.dir + " --tokens " + join(g.tokens) +
                           " --max-new-tokens " + std::to_string(g.greedy.size()) + " --timings");
  ASSERT_EQ(timed.status, 0) << timed.output;
  const auto tj = nlohmann::json::parse(timed.output);
  EXPECT_EQ(tj.at("tokens").get<std::vector<int32_t>>(), g.greedy);
  const auto& t = tj.at("timings");
  EXPECT_EQ(t.at("prefill_tokens").get<int>(), static_cast<int>(g.tokens.size()));
  EXPECT_EQ(t.at("decode_steps").get<int>(), static_cast<int>(g.greedy.size()) - 1);
  for (const char* k : {"load_s", "prefill_s", "decode_s", "decode_tokens_per_s"}) EXPECT_GT(t.at(k).get<double>(), 0.0) << k;
  EXPECT_NEAR(t.at("decode_tokens_per_s").get<double>() * t.at("decode_s").get<double>(), g.greedy.size() - 1.0, 1e-6);
}

TEST(CliTest, MakeModelWritesALoadableCheckpointWithTheRealVocabulary) {
  testing::TempDir tmp;
  const Result r = run("make-model --preset tiny --layers 2 --experts 4 --seed 3 --out " + tmp.path());
  ASSERT_EQ(r.status, 0) << r.output;
  const ModelConfig c = load_model_config(tmp.file("config.json"));
  EXPECT_EQ(c.vocab_size, 201088);
  EXPECT_EQ(c.num_local_experts, 4);
  EXPECT_EQ(c.num_hidden_layers, 2);
  // A complete checkpoint folder: the real tokenizer comes along (fetched by scripts/fetch-tokenizer.sh).
  EXPECT_TRUE(std::filesystem::exists(tmp.file("tokenizer.json"))) << r.output;
  EXPECT_TRUE(std::filesystem::exists(tmp.file("tokenizer_config.json")));
  testing::TempDir untouched;
  const Result missing = run("make-model --preset tiny --tokenizer-dir /nonexistent --out " + untouched.path());
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.output.find("/nonexistent: no tokenizer.json"), std::string::npos) << missing.output;
  EXPECT_TRUE(std::filesystem::is_empty(untouched.path()));  // nothing half-written
  const Result gen = run("generate --device cpu --model " + tmp.path() + " --tokens 199998,5,200005 --max-new-tokens 3");
  ASSERT_EQ(gen.status, 0) << gen.output;
  EXPECT_EQ(nlohmann::json::parse(gen.output).at("tokens").size(), 3u);
  // Same seed, same bytes.
  testing::TempDir again;
  ASSERT_EQ(run("make-model --preset tiny --layers 2 --experts 4 --seed 3 --out " + again.path()).status, 0);
  EXPECT_EQ(std::filesystem::file_size(tmp.file("model.safetensors")), std::filesystem::file_size(again.file("model.safetensors")));
  const Result a = run("generate --device cpu --model " + again.path() + " --tokens 199998,5,200005 --max-new-tokens 3");
  EXPECT_EQ(a.output, gen.output);
}

TEST(CliTest, BadInputGetsAClearErrorAndExitStatus) {
  const auto g = testing::load_golden_case("tiny-a");
  Result r = run("generate --device cpu --model " + g.dir + " --tokens 1,x,3");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("bad token id 'x'"), std::string::npos) << r.output;
  r = run("generate --device cpu --model " + g.dir + " --tokens 1,99999 --max-new-tokens 1");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("token id 99999 outside the vocabulary"), std::string::npos) << r.output;
  r = run("generate --device cpu --model " + g.dir + " --tokens 1 --max-new-tokns 1");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("unknown option --max-new-tokns"), std::string::npos) << r.output;
  r = run("logits --device cpu --model /nonexistent --tokens 1 --out /tmp/x.npy");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("/nonexistent"), std::string::npos) << r.output;
  r = run("frobnicate");
  EXPECT_EQ(r.status, 2);
  r = run("generate --device tpu --model " + g.dir + " --tokens 1");
  EXPECT_NE(r.output.find("unknown device 'tpu'"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace arbiter
