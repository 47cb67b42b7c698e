// `arbiter tokenize | detokenize | render` run as a subprocess, as users and scripts run them.
#include <gtest/gtest.h>

#include <fstream>

#include "tests/text/text_test_util.h"

namespace arbiter {
namespace {

using text_testing::RunResult;
using text_testing::shell_quote;

RunResult arbiter(const std::string& args, const std::string& stdin_text = "", bool merge_stderr = true) {
  text_testing::TempDir dir;
  const std::string in = dir.file("stdin");
  std::ofstream(in, std::ios::binary) << stdin_text;
  return text_testing::run_command(std::string(ARBITER_BINARY) + " " + args + " < " + shell_quote(in), merge_stderr);
}

std::string model_arg() { return "--model " + shell_quote(text_testing::tokenizer_dir()); }

TEST(CliText, Tokenize) {
  text_testing::tokenizer_json();  // fails clearly when the tokenizer was not fetched
  auto r = arbiter("tokenize " + model_arg() + " --text 'Hello world'");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "[13225,2375]\n");
  r = arbiter("tokenize --tokenizer " + shell_quote(text_testing::tokenizer_json()), "Hello world");
  EXPECT_EQ(r.output, "[13225,2375]\n");
  // Content mode by default; --specials for trusted text.
  r = arbiter("tokenize " + model_arg() + " --text '<|start|>'");
  EXPECT_EQ(r.output, "[27,91,5236,91,29]\n");
  r = arbiter("tokenize " + model_arg() + " --specials --text '<|start|>user'");
  EXPECT_EQ(r.output, "[200006,1428]\n");
  // --jsonl: one JSON string per line in, one array per line out.
  r = arbiter("tokenize " + model_arg() + " --jsonl", "\"Hello world\"\n\"12345678\"\n\"a\\u00a0b\"\n\"\"\n");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "[13225,2375]\n[7633,19354,4388]\n[64,5310,65]\n[]\n");
  // Invalid UTF-8: replaced by default, or an error.
  r = arbiter("tokenize " + model_arg(), "a\xff");
  EXPECT_EQ(r.status, 0);
  r = arbiter("tokenize " + model_arg() + " --invalid-utf8 error", "a\xff");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("invalid UTF-8 at byte 1"), std::string::npos) << r.output;
}

TEST(CliText, Detokenize) {
  auto r = arbiter("detokenize " + model_arg() + " --tokens 13225,2375,200007", "", false);
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(r.output, "Hello world<|end|>");
  r = arbiter("detokenize " + model_arg(), "[13225, 2375]", false);
  EXPECT_EQ(r.output, "Hello world");
  r = arbiter("detokenize " + model_arg() + " --jsonl", "[13225,2375]\n[64,5310,65]\n", false);
  EXPECT_EQ(r.output, "\"Hello world\"\n\"a\u00a0b\"\n");
  r = arbiter("detokenize " + model_arg() + " --tokens 201088");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("not in the vocabulary"), std::string::npos) << r.output;
}

TEST(CliText, RenderReproducesTheGoldenPrompt) {
  const auto g = text_testing::golden_harmony();
  text_testing::TempDir dir;
  std::ofstream(dir.file("policy.txt"), std::ios::binary) << g.at("policy").get<std::string>();
  const auto r = arbiter("render " + model_arg() + " --policy " + shell_quote(dir.file("policy.txt")) + " --content " +
                             shell_quote(g.at("content").get<std::string>()) + " --reasoning low --date 2025-11-01",
                         "", false);
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j.at("ids"), g.at("prompt_ids"));
  EXPECT_EQ(j.at("text"), g.at("prompt_text"));
  EXPECT_EQ(j.at("num_tokens"), 224);
}

TEST(CliText, RenderSpamPolicyAndJoint) {
  const std::string policy = text_testing::data_dir() + "/spam/policy.txt";
  auto r = arbiter("render " + model_arg() + " --policy " + shell_quote(policy) + " --reasoning medium",
                   "Buy gold rings here!", false);
  ASSERT_EQ(r.status, 0) << r.output;
  auto j = nlohmann::json::parse(r.output);
  EXPECT_NE(j.at("text").get<std::string>().find("<|start|>user<|message|>Buy gold rings here!<|end|><|start|>assistant"),
            std::string::npos);
  r = arbiter("render " + model_arg() + " --joint SP=" + shell_quote(policy) + ",SP2=" + shell_quote(policy) +
                  " --content x",
              "", false);
  ASSERT_EQ(r.status, 0) << r.output;
  j = nlohmann::json::parse(r.output);
  EXPECT_NE(j.at("text").get<std::string>().find("# Policy SP2"), std::string::npos);
}

TEST(CliText, ErrorsAreNamed) {
  auto r = arbiter("tokenize --text x");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("--tokenizer"), std::string::npos) << r.output;
  r = arbiter("tokenize --model /nonexistent --text x");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("/nonexistent"), std::string::npos) << r.output;
  r = arbiter("render " + model_arg() + " --policy /nonexistent/p.txt --content x --reasoning extreme");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("extreme"), std::string::npos) << r.output;
  r = arbiter("tokenize " + model_arg() + " --jsonl", "not json\n");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("line 1"), std::string::npos) << r.output;
  r = arbiter("tokenize " + model_arg() + " --text x --bogus 1");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("--bogus"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace arbiter
