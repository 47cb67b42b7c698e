// `arbiter classify` run as a subprocess on a tiny random model (with the real tokenizer): one
// --content, a JSONL file with bad lines (reported in place, never dropped, order kept), the same
// generations with prefix caching off, thread ranks, and usage errors. Also `arbiter bench --quick`.
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "tests/test_util.h"

namespace arbiter {
namespace {

using testing::RunResult;
using testing::TempDir;

std::string tokenizer_dir() {
  const char* env = std::getenv("ARBITER_TOKENIZER_DIR");
  return env && *env ? env : ARBITER_TOKENIZER_DIR;
}

// One tiny random model and two policy files for the whole suite.
class CliClassify : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = std::make_unique<TempDir>();
    const RunResult r = testing::run_command(std::string(ARBITER_BINARY) + " make-model --preset tiny --seed 3 --out " +
                                             testing::shell_quote(model()) + " --tokenizer-dir " + testing::shell_quote(tokenizer_dir()));
    ASSERT_EQ(r.status, 0) << r.output;
    std::ofstream(dir_->file("spam.txt")) << "# Spam\nAnswer 1 if the content is unsolicited promotion, else 0.\n";
    std::ofstream(dir_->file("hate.txt")) << "# Hate\nAnswer 1 if the content attacks a protected group, else 0.\n";
  }
  static void TearDownTestSuite() { dir_.reset(); }

  static std::string model() { return dir_->file("model"); }
  static std::string policy(const std::string& name) { return dir_->file(name); }

  // Runs `arbiter classify` with the common options; stdout only unless merge_stderr.
  static RunResult classify(const std::string& args, bool merge_stderr = false) {
    return testing::run_command(std::string(ARBITER_BINARY) + " classify --model " + testing::shell_quote(model()) +
                                    " --device cpu --effort low --reasoning-budget 4 --max-tokens 12 --max-context 512 " +
                                    args,
                                merge_stderr);
  }

  static std::vector<nlohmann::json> read_jsonl(const std::string& path) {
    std::ifstream in(path);
    std::vector<nlohmann::json> rows;
    std::string line;
    while (std::getline(in, line)) rows.push_back(nlohmann::json::parse(line));
    return rows;
  }

  static std::unique_ptr<TempDir> dir_;
};

std::unique_ptr<TempDir> CliClassify::dir_;

TEST_F(CliClassify, OneContent) {
  const RunResult r = classify("--policy " + testing::shell_quote(policy("spam.txt")) + " --content 'Buy cheap watches now!'");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j.at("object"), "classification");
  ASSERT_EQ(j.at("results").size(), 1u);
  const auto& p = j.at("results")[0];
  EXPECT_EQ(p.at("policy_id"), "spam");
  EXPECT_TRUE(p.contains("verdict"));
  EXPECT_TRUE(p.contains("final"));
  EXPECT_TRUE(p.contains("confidence"));
  // The random model answers nonsense: then the verdict is null and says why.
  if (p.at("verdict").is_null()) {
    EXPECT_FALSE(p.at("verdict_error").get<std::string>().empty());
  }
  EXPECT_GT(p.at("usage").at("prompt_tokens").get<int>(), 30);
  EXPECT_LE(p.at("usage").at("completion_tokens").get<int>(), 12);
  EXPECT_GT(p.at("usage").at("completion_tokens").get<int>(), 0);
  EXPECT_EQ(j.at("usage").at("prompt_tokens"), p.at("usage").at("prompt_tokens"));
}

TEST_F(CliClassify, SeveralPoliciesInOrder) {
  const RunResult r = classify("--policy " + testing::shell_quote(policy("spam.txt") + "," + policy("hate.txt")) + " --content 'hello'");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  ASSERT_EQ(j.at("results").size(), 2u);
  EXPECT_EQ(j.at("results")[0].at("policy_id"), "spam");
  EXPECT_EQ(j.at("results")[1].at("policy_id"), "hate");
  EXPECT_EQ(j.at("usage").at("prompt_tokens").get<int>(),
            j.at("results")[0].at("usage").at("prompt_tokens").get<int>() +
                j.at("results")[1].at("usage").at("prompt_tokens").get<int>());
}

// Writes the JSONL input used by the file tests: good lines, bad ones, repeated and missing ids.
std::string write_input(const TempDir& dir) {
  const std::string path = dir.file("in.jsonl");
  std::ofstream out(path);
  out << R"({"id": "a", "content": "Limited offer: click example.com for free money"})" << "\n"
      << R"(this is not json)" << "\n"
      << R"({"id": 7, "content": "See you at lunch tomorrow?"})" << "\n"
      << R"({"id": "no-content"})" << "\n"
      << "\n"
      << R"({"id": "a", "content": "Same id again, other content"})" << "\n"
      << R"({"content": "no id at all"})" << "\n"
      << R"({"id": "num", "content": 12})" << "\n"
      << R"({"id": "last", "content": "Limited offer: click example.com for free money"})" << "\n";
  return path;
}

TEST_F(CliClassify, InputFileKeepsOrderAndReportsBadLines) {
  TempDir io;
  const std::string in = write_input(io), out = io.file("out.jsonl");
  const RunResult r = classify("--policy " + testing::shell_quote(policy("spam.txt")) + " --input " + testing::shell_quote(in) + " --output " + testing::shell_quote(out), true);
  ASSERT_EQ(r.status, 0) << r.output;
  // stderr is not a terminal here: a summary, no progress bar.
  EXPECT_EQ(r.output.find('\r'), std::string::npos);
  EXPECT_NE(r.output.find("9 lines, 5 classified"), std::string::npos) << r.output;
  const auto rows = read_jsonl(out);
  ASSERT_EQ(rows.size(), 9u);
  for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(rows[i].at("line"), i + 1) << rows[i];
  EXPECT_EQ(rows[0].at("id"), "a");
  EXPECT_TRUE(rows[0].contains("results"));
  EXPECT_NE(rows[1].at("error").get<std::string>().find("not valid JSON"), std::string::npos);
  EXPECT_TRUE(rows[1].at("id").is_null());
  EXPECT_EQ(rows[2].at("id"), 7);
  EXPECT_TRUE(rows[2].contains("results"));
  EXPECT_EQ(rows[3].at("id"), "no-content");
  EXPECT_NE(rows[3].at("error").get<std::string>().find("content"), std::string::npos);
  EXPECT_EQ(rows[4].at("error"), "empty line");
  EXPECT_EQ(rows[5].at("id"), "a");
  EXPECT_TRUE(rows[5].contains("results"));
  EXPECT_TRUE(rows[6].at("id").is_null());
  EXPECT_TRUE(rows[6].contains("results"));
  EXPECT_NE(rows[7].at("error").get<std::string>().find("must be a string"), std::string::npos);
  EXPECT_EQ(rows[8].at("id"), "last");
  // Lines 1 and 9 are the same content under the same policy: the same generation. The later one
  // reuses the policy prefix from the cache.
  EXPECT_EQ(rows[0].at("results")[0].at("final"), rows[8].at("results")[0].at("final"));
  EXPECT_EQ(rows[0].at("results")[0].at("verdict"), rows[8].at("results")[0].at("verdict"));
  int cached = 0;
  for (const auto& row : rows)
    if (row.contains("results")) cached += row.at("usage").at("cached_tokens").get<int>();
  EXPECT_GT(cached, 0);
}

// --mode score: JSONL rows in input order with verdict, confidence and the scores of 0 and 1, one
// position read per policy; --score-prefix and --answer-format are checked.
TEST_F(CliClassify, ScoreModeJsonl) {
  TempDir io;
  const std::string in = write_input(io), out = io.file("score.jsonl");
  const RunResult r = classify("--mode score --policy " + testing::shell_quote(policy("spam.txt") + "," + policy("hate.txt")) + " --input " +
                                   testing::shell_quote(in) + " --output " + testing::shell_quote(out),
                               true);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("9 lines, 5 classified"), std::string::npos) << r.output;
  const auto rows = read_jsonl(out);
  ASSERT_EQ(rows.size(), 9u);
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].at("line"), i + 1);
    if (!rows[i].contains("results")) continue;
    ASSERT_EQ(rows[i]["results"].size(), 2u);
    for (const auto& p : rows[i]["results"]) {
      ASSERT_EQ(p.at("scores").size(), 2u) << p;
      const double p0 = p["scores"]["0"], p1 = p["scores"]["1"];
      EXPECT_NEAR(p0 + p1, 1.0, 1e-9);
      EXPECT_EQ(p.at("verdict"), p1 > p0 ? 1 : 0);
      EXPECT_DOUBLE_EQ(p.at("confidence").get<double>(), std::max(p0, p1));
      EXPECT_EQ(p.at("usage").at("completion_tokens"), 1);
      EXPECT_EQ(p.at("usage").at("forced_tokens"), 9);
      EXPECT_EQ(p.at("finish_reason"), "stop");
    }
  }
  // The same content on lines 1 and 9 (the later one from the prefix cache, in another batch): the
  // same scores up to float rounding.
  for (const char* answer : {"0", "1"})
    EXPECT_NEAR(rows[0]["results"][0]["scores"][answer].get<double>(), rows[8]["results"][0]["scores"][answer].get<double>(), 1e-5);
  EXPECT_EQ(rows[0]["results"][0]["verdict"], rows[8]["results"][0]["verdict"]);
  RunResult bad = classify("--mode fast --policy " + testing::shell_quote(policy("spam.txt")) + " --content x", true);
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("--mode"), std::string::npos) << bad.output;
  bad = classify("--mode score --score-prefix none --policy " + testing::shell_quote(policy("spam.txt")) + " --content x", true);
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("--score-prefix"), std::string::npos) << bad.output;
  const RunResult direct = classify("--mode score --score-prefix direct --answer-format json --policy " + testing::shell_quote(policy("spam.txt")) +
                                    " --content 'Buy now'");
  ASSERT_EQ(direct.status, 0) << direct.output;
  const auto j = nlohmann::json::parse(direct.output);
  EXPECT_GT(j["results"][0]["usage"]["forced_tokens"].get<int>(), 3);  // the header + {"violation":
  EXPECT_EQ(j["results"][0]["details"]["violation"], j["results"][0]["verdict"]);
}

TEST_F(CliClassify, SameGenerationsWithoutThePrefixCache) {
  TempDir io;
  const std::string in = write_input(io), on = io.file("on.jsonl"), off = io.file("off.jsonl");
  const std::string common = "--policy " + testing::shell_quote(policy("spam.txt") + "," + policy("hate.txt")) + " --input " + testing::shell_quote(in);
  RunResult r = classify(common + " --output " + testing::shell_quote(on));
  ASSERT_EQ(r.status, 0) << r.output;
  r = classify(common + " --no-prefix-cache --output " + testing::shell_quote(off));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto a = read_jsonl(on), b = read_jsonl(off);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].contains("results"), b[i].contains("results")) << i;
    if (!a[i].contains("results")) continue;
    EXPECT_EQ(b[i].at("usage").at("cached_tokens"), 0) << b[i];
    for (size_t p = 0; p < 2; ++p) {
      EXPECT_EQ(a[i]["results"][p]["final"], b[i]["results"][p]["final"]) << "line " << i + 1;
      EXPECT_EQ(a[i]["results"][p]["verdict"], b[i]["results"][p]["verdict"]) << "line " << i + 1;
      EXPECT_EQ(a[i]["results"][p]["usage"]["completion_tokens"], b[i]["results"][p]["usage"]["completion_tokens"]);
    }
  }
}

TEST_F(CliClassify, ThreadRanksServeTheSameFile) {
  TempDir io;
  const std::string in = write_input(io), out = io.file("out.jsonl");
  const RunResult r = classify("--transport threads --ranks 2 --policy " + testing::shell_quote(policy("spam.txt")) + " --input " + testing::shell_quote(in) +
                               " --output " + testing::shell_quote(out));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto rows = read_jsonl(out);
  ASSERT_EQ(rows.size(), 9u);
  EXPECT_TRUE(rows[0].contains("results"));
  EXPECT_TRUE(rows[1].contains("error"));
}

TEST_F(CliClassify, UnderMpirunTheWorkersServeRankZero) {
  const std::string mpiexec = ARBITER_MPIEXEC;
  if (mpiexec.empty()) GTEST_SKIP() << "no mpiexec found at configure time";
  TempDir io;
  const std::string in = write_input(io), one = io.file("one.jsonl"), two = io.file("two.jsonl");
  const std::string common = "--policy " + testing::shell_quote(policy("spam.txt")) + " --input " + testing::shell_quote(in);
  RunResult r = classify(common + " --output " + testing::shell_quote(one));
  ASSERT_EQ(r.status, 0) << r.output;
  r = testing::run_command("OMPI_MCA_plm_rsh_agent= OMPI_MCA_btl_vader_single_copy_mechanism=none " + mpiexec +
                           " --oversubscribe --allow-run-as-root -np 2 " + ARBITER_BINARY + " classify --model " +
                           testing::shell_quote(model()) + " --device cpu --effort low --reasoning-budget 4 --max-tokens 12 --max-context 512 " +
                           common + " --output " + testing::shell_quote(two));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto a = read_jsonl(one), b = read_jsonl(two);
  ASSERT_EQ(a.size(), 9u);
  ASSERT_EQ(b.size(), 9u);
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].contains("results"), b[i].contains("results")) << i;
    if (a[i].contains("results")) {
      EXPECT_EQ(a[i]["results"][0]["final"], b[i]["results"][0]["final"]) << "line " << i + 1;
    }
  }
}

TEST_F(CliClassify, UsageErrors) {
  RunResult r = classify("--policy " + testing::shell_quote(policy("spam.txt")), true);
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("--content"), std::string::npos) << r.output;
  r = classify("--policy " + testing::shell_quote(policy("spam.txt")) + " --content x --labels A,B --violating C", true);
  EXPECT_EQ(r.status, 2) << r.output;
  r = classify("--policy " + testing::shell_quote(policy("spam.txt")) + " --content x --effort extreme", true);
  EXPECT_EQ(r.status, 2) << r.output;
  r = classify("--policy " + testing::shell_quote(policy("spam.txt")) + " --content x --bogus 1", true);
  EXPECT_EQ(r.status, 2) << r.output;
  r = classify("--policy /nonexistent/policy.txt --content x", true);
  EXPECT_EQ(r.status, 1) << r.output;
}

TEST(CliBench, QuickRunReportsBothModes) {
  TempDir io;
  const std::string json = io.file("bench.json");
  const RunResult r = testing::run_command(std::string(ARBITER_BINARY) + " bench --quick --preset tiny --tokenizer " +
                                           testing::shell_quote(tokenizer_dir()) + " --json " + testing::shell_quote(json));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("| prefix cache |"), std::string::npos) << r.output;
  std::ifstream in(json);
  const auto j = nlohmann::json::parse(in);
  EXPECT_TRUE(j.at("prefix_cache_on").at("prefix_caching").get<bool>());
  EXPECT_FALSE(j.at("prefix_cache_off").at("prefix_caching").get<bool>());
  EXPECT_EQ(j.at("prefix_cache_off").at("prompt_tokens_cached"), 0);
  EXPECT_LT(j.at("prefix_cache_on").at("prefill_tokens_computed").get<double>(),
            j.at("prefix_cache_off").at("prefill_tokens_computed").get<double>());
  EXPECT_GT(j.at("ratios").at("prefill_tokens_off_over_on").get<double>(), 1.0);
  // Expert-load statistics: every layer's counts sum to k per computed token (prefill + decode).
  const auto& load = j.at("expert_load");
  ASSERT_GT(load.at("layers").size(), 0u);
  int64_t first = -1;
  for (const auto& row : load.at("layers")) {
    EXPECT_EQ(row.size(), load.at("experts").get<size_t>());
    int64_t sum = 0;
    for (const auto& v : row) sum += v.get<int64_t>();
    EXPECT_GT(sum, 0);
    if (first < 0) first = sum;
    EXPECT_EQ(sum, first) << "every layer routes every token";
  }
  // ... which `arbiter placement` turns into a per-layer placement, reporting the imbalance.
  const std::string placement = io.file("balanced.placement");
  const RunResult p = testing::run_command(std::string(ARBITER_BINARY) + " placement --stats " + testing::shell_quote(json) +
                                           " --ranks 2 --out " + testing::shell_quote(placement));
  ASSERT_EQ(p.status, 0) << p.output;
  EXPECT_NE(p.output.find("imbalance, balanced placement: mean "), std::string::npos) << p.output;
  std::ifstream written(placement);
  const std::string text((std::istreambuf_iterator<char>(written)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("layers " + std::to_string(load.at("layers").size())), std::string::npos) << text;
  // Bad statistics: a clear error naming the file.
  std::ofstream(io.file("bad.json")) << "{\"expert_load\": {\"layers\": [[1, 2], [3]]}}";
  const RunResult bad = testing::run_command(std::string(ARBITER_BINARY) + " placement --stats " +
                                             testing::shell_quote(io.file("bad.json")) + " --ranks 2 --out " +
                                             testing::shell_quote(io.file("x.placement")));
  EXPECT_EQ(bad.status, 2) << bad.output;
  EXPECT_NE(bad.output.find("bad.json: layer 1 has 1 experts, layer 0 has 2"), std::string::npos) << bad.output;
}

// The rank-scaling sweep over thread ranks: a row per rank count, the JSON with the time split and
// traffic, and the SVG figure next to it.
TEST(CliBench, RanksSweepWritesTableJsonAndFigure) {
  TempDir io;
  const std::string json = io.file("sweep.json");
  const RunResult r = testing::run_command(std::string(ARBITER_BINARY) + " bench --quick --preset tiny --tokenizer " +
                                           testing::shell_quote(tokenizer_dir()) + " --ranks-sweep 1,2 --json " +
                                           testing::shell_quote(json));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("| ranks | decisions/s |"), std::string::npos) << r.output;
  std::ifstream in(json);
  const auto j = nlohmann::json::parse(in);
  ASSERT_EQ(j.at("points").size(), 2u);
  const auto& one = j.at("points")[0];
  const auto& two = j.at("points")[1];
  EXPECT_EQ(one.at("ranks"), 1);
  EXPECT_EQ(two.at("ranks"), 2);
  EXPECT_GT(two.at("decisions_per_second").get<double>(), 0);
  EXPECT_GT(two.at("step_ms").at("experts").get<double>(), 0);
  EXPECT_GT(two.at("step_ms").at("dispatch").get<double>(), 0);
  EXPECT_EQ(one.at("step_ms").at("dispatch").get<double>(), 0) << "one rank dispatches nothing";
  EXPECT_EQ(two.at("bytes_sent_per_rank").size(), 2u);
  EXPECT_GT(two.at("bytes_sent_per_rank")[0].get<double>(), 0);
  EXPECT_GE(two.at("load_imbalance_mean").get<double>(), 1.0);
  std::ifstream svg(io.file("sweep.svg"));
  const std::string figure((std::istreambuf_iterator<char>(svg)), std::istreambuf_iterator<char>());
  EXPECT_EQ(figure.rfind("<svg", 0), 0u);
  EXPECT_NE(figure.find("decisions/s"), std::string::npos);
  EXPECT_NE(figure.find("</svg>"), std::string::npos);
  const RunResult bad = testing::run_command(std::string(ARBITER_BINARY) + " bench --quick --preset tiny --ranks-sweep 1,x");
  EXPECT_EQ(bad.status, 2) << bad.output;
  EXPECT_NE(bad.output.find("--ranks-sweep takes rank counts"), std::string::npos) << bad.output;
}

// The README's main job (scripts/demo.sh) with this build's binary: offline classification of three
// contents and one classification over HTTP, and a zero exit status at the end.
TEST(MainJob, DemoScriptClassifiesOfflineAndOverHttp) {
  TempDir dir;
  const int port = 20000 + static_cast<int>(::getpid() % 20000);
  const RunResult r = testing::run_command(
      "ARBITER_DEMO_BIN=" + testing::shell_quote(ARBITER_BINARY) + " ARBITER_DEMO_MODEL=" + testing::shell_quote(dir.file("tiny")) +
          " ARBITER_DEMO_PORT=" + std::to_string(port) + " ARBITER_TOKENIZER_DIR=" + testing::shell_quote(tokenizer_dir()) +
          " bash " + testing::shell_quote(std::string(ARBITER_SOURCE_DIR) + "/scripts/demo.sh"),
      true);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("classify: 3 lines, 3 classified"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("\"object\":\"classification\",\"created\""), std::string::npos) << r.output;
}

}  // namespace
}  // namespace arbiter
