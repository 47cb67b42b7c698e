// `arbiter eval` run as a subprocess on a tiny random model (with the real tokenizer) and the spam
// golden set: the report's shape and counts, identical verdicts on a second run, bad dataset lines
// reported with their numbers while the run goes on, several policies with labels, --resume not
// running finished items again, --compare, and the cascade (--effort auto) with every stage run.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "api/policy_registry.h"
#include "api/sqlite_decision_store.h"
#include "pipeline/sha256.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

using json = nlohmann::json;
using testing::RunResult;
using testing::TempDir;

std::string tokenizer_dir() {
  const char* env = std::getenv("ARBITER_TOKENIZER_DIR");
  return env && *env ? env : ARBITER_TOKENIZER_DIR;
}

// The workspace's spam data when present, else the copy in tests/data.
std::string spam_dir() {
  const std::string shared = std::string(ARBITER_SOURCE_DIR) + "/../shared/data/spam";
  if (std::filesystem::exists(shared + "/golden.jsonl")) return shared;
  return std::string(ARBITER_SOURCE_DIR) + "/tests/data/spam";
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) lines.push_back(line);
  return lines;
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

class CliEval : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = std::make_unique<TempDir>();
    const RunResult r = testing::run_command(std::string(ARBITER_BINARY) + " make-model --preset tiny --seed 5 --out " +
                                             testing::shell_quote(dir_->file("model")) + " --tokenizer-dir " + testing::shell_quote(tokenizer_dir()));
    ASSERT_EQ(r.status, 0) << r.output;
    golden_ = read_lines(spam_dir() + "/golden.jsonl");
    ASSERT_EQ(golden_.size(), 40u);
  }
  static void TearDownTestSuite() { dir_.reset(); }

  // Runs `arbiter eval` with small budgets; stdout and stderr merged.
  static RunResult eval(const std::string& args) {
    return testing::run_command(std::string(ARBITER_BINARY) + " eval --model " + testing::shell_quote(dir_->file("model")) +
                                " --device cpu --reasoning-budget 4,4,8 --answer-tokens 8 --max-context 2048 --bootstrap 200 " +
                                args);
  }
  static std::string spam_policy() { return spam_dir() + "/policy.txt"; }

  // A dataset of the first n golden items (plus `extra` lines).
  static std::string subset(const TempDir& dir, const std::string& name, size_t n, const std::string& extra = "") {
    const std::string path = dir.file(name);
    std::ofstream out(path);
    for (size_t i = 0; i < n; ++i) out << golden_[i] << "\n";
    out << extra;
    return path;
  }

  static std::unique_ptr<TempDir> dir_;
  static std::vector<std::string> golden_;
};

std::unique_ptr<TempDir> CliEval::dir_;
std::vector<std::string> CliEval::golden_;

TEST_F(CliEval, GoldenSetInScoreModeIsCountedAndDeterministic) {
  TempDir out;
  const std::string args = "--dataset " + testing::shell_quote(spam_dir() + "/golden.jsonl") + " --policy " + testing::shell_quote(spam_policy()) +
                           " --mode score --effort low --concurrency 20 --out ";
  const RunResult a = eval(args + testing::shell_quote(out.file("a")));
  ASSERT_EQ(a.status, 0) << a.output;
  EXPECT_NE(a.output.find("policy: tp "), std::string::npos) << a.output;
  EXPECT_EQ(a.output.find('\r'), std::string::npos);  // not a terminal: no progress line
  const json report = read_json(out.file("a/report.json"));
  const json& p = report.at("policies").at("policy");
  EXPECT_EQ(report.at("items"), 40);
  EXPECT_EQ(p.at("tp").get<int>() + p.at("fp").get<int>() + p.at("tn").get<int>() + p.at("fn").get<int>() +
                p.at("unknown").get<int>(),
            40);
  EXPECT_EQ(p.at("unknown"), 0);
  EXPECT_EQ(p.at("tp").get<int>() + p.at("fn").get<int>(), 19);  // the golden set: 19 spam, 21 not
  for (const char* k : {"precision", "recall", "f1", "intervals", "confusion", "no_verdict"}) EXPECT_TRUE(p.contains(k)) << k;
  EXPECT_EQ(report.at("dataset_errors").at("count"), 0);
  EXPECT_EQ(report.at("accuracy").at("items"), 40);
  const json& score = report.at("cost").at("stages").at("score");
  EXPECT_EQ(score.at("runs"), 40);
  EXPECT_GT(score.at("tokens").at("prompt").get<int>(), 40 * 100);
  EXPECT_TRUE(score.at("latency").at("p99").is_number());
  EXPECT_TRUE(report.at("sweep").is_null());  // one stage: nothing to sweep
  const auto items = read_lines(out.file("a/items.jsonl"));
  ASSERT_EQ(items.size(), 40u);
  const json first = json::parse(items[0]);
  EXPECT_EQ(first.at("id"), "SP0-1");
  const json& rec = first.at("policies").at("policy");
  EXPECT_EQ(rec.at("expected"), 0);
  EXPECT_TRUE(rec.contains("verdict"));
  EXPECT_EQ(rec.at("stages").size(), 1u);
  EXPECT_EQ(rec.at("stages")[0].at("stage"), "score");
  // Score mode always has a verdict, so every item is in verdicts.jsonl as a dataset line.
  const auto verdicts = read_lines(out.file("a/verdicts.jsonl"));
  ASSERT_EQ(verdicts.size(), 40u);
  EXPECT_EQ(json::parse(verdicts[0]).at("labels").at("policy"), rec.at("verdict"));
  EXPECT_TRUE(std::filesystem::file_size(out.file("a/report.html")) > 1000);

  // The same run again: the same verdicts; --compare says nothing flipped.
  const RunResult b = eval(args + testing::shell_quote(out.file("b")) + " --compare " + testing::shell_quote(out.file("a")));
  ASSERT_EQ(b.status, 0) << b.output;
  const auto items_b = read_lines(out.file("b/items.jsonl"));
  ASSERT_EQ(items_b.size(), 40u);
  for (size_t i = 0; i < items.size(); ++i)
    EXPECT_EQ(json::parse(items[i]).at("policies").at("policy").at("verdict"),
              json::parse(items_b[i]).at("policies").at("policy").at("verdict"));
  const json diff = read_json(out.file("b/compare.json"));
  EXPECT_EQ(diff.at("policies").at("policy").at("compared"), 40);
  EXPECT_EQ(diff.at("policies").at("policy").at("flips"), 0);
  EXPECT_NE(b.output.find("compare policy: 0 of 40 items flipped"), std::string::npos) << b.output;
}

TEST_F(CliEval, BadLinesAreReportedAndLabelsPerPolicy) {
  TempDir out;
  std::ofstream(out.file("hate.txt")) << "# Hate\nAnswer 1 if the content attacks a protected group, else 0.\n";
  const std::string data = out.file("data.jsonl");
  {
    std::ofstream d(data);
    d << R"({"id": "a", "content": "Buy cheap watches now!!!", "labels": {"policy": 1, "hate": 0}})" << "\n"
      << "not json at all\n"
      << R"({"id": "b", "content": "See you at lunch", "labels": {"policy": 0}})" << "\n"
      << R"({"id": "c"})" << "\n"
      << R"({"id": "d", "content": "Hello there", "labels": {"hate": 0}})" << "\n"
      << R"({"id": "a", "content": "duplicate id", "labels": {"policy": 1}})" << "\n";
  }
  const RunResult r = eval("--dataset " + testing::shell_quote(data) + " --policy " + testing::shell_quote(spam_policy()) + " --policy " +
                           testing::shell_quote(out.file("hate.txt")) + " --effort low --out " + testing::shell_quote(out.file("run")));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("line 2: not JSON"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("line 4: no \"content\""), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("line 6: duplicate id"), std::string::npos) << r.output;
  const json report = read_json(out.file("run/report.json"));
  EXPECT_EQ(report.at("items"), 3);
  EXPECT_EQ(report.at("dataset_errors").at("count"), 3);
  EXPECT_EQ(report.at("dataset_errors").at("lines")[0].at("line"), 2);
  const json& spam = report.at("policies").at("policy");
  const json& hate = report.at("policies").at("hate");
  EXPECT_EQ(spam.at("unknown"), 1);  // d
  EXPECT_EQ(hate.at("unknown"), 1);  // b
  for (const json* p : {&spam, &hate})
    EXPECT_EQ(p->at("tp").get<int>() + p->at("fp").get<int>() + p->at("tn").get<int>() + p->at("fn").get<int>() +
                  p->at("unknown").get<int>(),
              3);
  EXPECT_EQ(report.at("accuracy").at("items"), 3);
  EXPECT_EQ(report.at("cost").at("stages").at("low").at("runs"), 6);
  const json a = json::parse(read_lines(out.file("run/items.jsonl"))[0]);
  EXPECT_EQ(a.at("policies").at("hate").at("expected"), 0);
  EXPECT_TRUE(a.at("policies").at("hate").at("known").get<bool>());
  const json d = json::parse(read_lines(out.file("run/items.jsonl"))[2]);
  EXPECT_FALSE(d.at("policies").at("policy").at("known").get<bool>());
}

TEST_F(CliEval, ResumeRunsOnlyWhatIsLeftAndCompareFindsFlips) {
  TempDir out;
  const std::string policy = "--policy " + testing::shell_quote(spam_policy()) + " --effort low --concurrency 2 ";
  const RunResult first = eval("--dataset " + testing::shell_quote(subset(out, "six.jsonl", 6)) + " " + policy + "--out " + testing::shell_quote(out.file("r")));
  ASSERT_EQ(first.status, 0) << first.output;
  const auto before = read_lines(out.file("r/items.jsonl"));
  ASSERT_EQ(before.size(), 6u);
  // Three more items; the six done are kept as they are (latencies included: they did not run again).
  const RunResult resumed =
      eval("--dataset " + testing::shell_quote(subset(out, "nine.jsonl", 9)) + " " + policy + "--resume --out " + testing::shell_quote(out.file("r")));
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming: 6 items done, 3 to run"), std::string::npos) << resumed.output;
  const auto after = read_lines(out.file("r/items.jsonl"));
  ASSERT_EQ(after.size(), 9u);
  for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ(json::parse(after[i]), json::parse(before[i]));
  EXPECT_EQ(read_json(out.file("r/report.json")).at("items"), 9);
  // Nothing left: nothing runs (and no model is needed).
  const RunResult again =
      eval("--dataset " + testing::shell_quote(out.file("nine.jsonl")) + " " + policy + "--resume --out " + testing::shell_quote(out.file("r")));
  ASSERT_EQ(again.status, 0) << again.output;
  EXPECT_NE(again.output.find("resuming: 9 items done, 0 to run"), std::string::npos) << again.output;

  // Another version of the policy (same id, other text), compared with the first run.
  std::filesystem::create_directories(out.file("v2"));
  std::ofstream(out.file("v2/policy.txt")) << "Answer 1 for every message that mentions a price, else 0.\n";
  const RunResult v2 = eval("--dataset " + testing::shell_quote(out.file("nine.jsonl")) + " --policy " + testing::shell_quote(out.file("v2/policy.txt")) +
                            " --effort low --out " + testing::shell_quote(out.file("v2run")) + " --compare " + testing::shell_quote(out.file("r")));
  ASSERT_EQ(v2.status, 0) << v2.output;
  const json diff = read_json(out.file("v2run/compare.json"));
  const json& p = diff.at("policies").at("policy");
  EXPECT_EQ(p.at("compared"), 9);
  EXPECT_EQ(p.at("flips").get<size_t>(), p.at("flipped").size());
  EXPECT_NE(v2.output.find("compare policy: "), std::string::npos) << v2.output;
  // Each flip names the item, both verdicts and the expected answer, and they differ.
  for (const auto& f : p.at("flipped")) {
    EXPECT_NE(f.at("here"), f.at("there"));
    EXPECT_TRUE(f.at("expected").is_number());
  }
}

TEST_F(CliEval, CascadeRunsEveryStageAndSweeps) {
  TempDir out;
  const RunResult r = eval("--dataset " + testing::shell_quote(subset(out, "eight.jsonl", 8)) + " --policy " + testing::shell_quote(spam_policy()) +
                           " --effort auto --out " + testing::shell_quote(out.file("auto")));
  ASSERT_EQ(r.status, 0) << r.output;
  const json report = read_json(out.file("auto/report.json"));
  const json& stages = report.at("cost").at("stages");
  for (const char* s : {"score", "low", "high"}) EXPECT_EQ(stages.at(s).at("runs"), 8) << s;  // run_all_stages
  int decided = 0;
  for (const char* s : {"score", "low", "high"}) decided += stages.at(s).at("decided").get<int>();
  EXPECT_EQ(decided + report.at("cost").at("undecided").get<int>(), 8);
  EXPECT_TRUE(report.at("agreement").contains("score_vs_high") || report.at("agreement").empty());
  const json& sweep = report.at("sweep");
  ASSERT_TRUE(sweep.is_object());
  EXPECT_EQ(sweep.at("points").size(), 121u);
  EXPECT_TRUE(sweep.at("configured").is_object());
  const json item = json::parse(read_lines(out.file("auto/items.jsonl"))[0]);
  EXPECT_EQ(item.at("policies").at("policy").at("stages").size(), 3u);
}

// --decision-log: every verdict of a fixed-effort run and of a cascade run is kept as `arbiter serve`
// keeps a request's, under the API key id "eval", the content as its hash, no reasoning.
TEST_F(CliEval, VerdictsGoToTheDecisionLogWhenAsked) {
  TempDir out;
  const std::string data = subset(out, "six.jsonl", 6);
  const std::string db = out.file("decisions.db");
  RunResult r = eval("--dataset " + testing::shell_quote(data) + " --policy " + testing::shell_quote(spam_policy()) +
                     " --mode score --effort low --decision-log " + testing::shell_quote(db) + " --out " + testing::shell_quote(out.file("s")));
  ASSERT_EQ(r.status, 0) << r.output;
  r = eval("--dataset " + testing::shell_quote(data) + " --policy " + testing::shell_quote(spam_policy()) + " --effort auto --decision-log " +
           testing::shell_quote(db) + " --out " + testing::shell_quote(out.file("a")));
  ASSERT_EQ(r.status, 0) << r.output;
  std::map<std::string, json> verdicts;  // "s/ID" or "a/ID" -> the verdict items.jsonl holds
  std::map<std::string, std::string> contents;
  for (const char* run : {"s", "a"})
    for (const std::string& line : read_lines(out.file(std::string(run) + "/items.jsonl"))) {
      const json item = json::parse(line);
      verdicts[std::string(run) + "/" + item.at("id").get<std::string>()] = item.at("policies").at("policy").at("verdict");
    }
  for (const std::string& line : read_lines(data)) {
    const json item = json::parse(line);
    contents[item.at("id")] = item.at("content");
  }
  api::SqliteDecisionStore store(db, true);
  api::DecisionQuery q;
  q.limit = 100;
  const api::DecisionPage page = store.list(q);
  ASSERT_EQ(page.decisions.size(), 12u);
  int score = 0, automatic = 0;
  for (const api::DecisionRecord& d : page.decisions) {
    EXPECT_EQ(d.api_key_id, "eval");
    EXPECT_EQ(d.policy_id, "policy");
    EXPECT_EQ(d.model, "model");
    ASSERT_EQ(d.request_id.rfind("eval-", 0), 0u) << d.request_id;
    const std::string item_id = d.request_id.substr(d.request_id.find('-', 5) + 1);
    ASSERT_TRUE(contents.count(item_id)) << d.request_id;
    EXPECT_EQ(d.content_sha256, sha256_hex(contents[item_id]));
    EXPECT_FALSE(d.content);
    EXPECT_FALSE(d.reasoning);
    const bool is_auto = d.effort == "auto";
    (is_auto ? automatic : score)++;
    if (!is_auto) EXPECT_EQ(d.mode, "score");
    else EXPECT_TRUE(d.mode == "score" || d.mode == "low" || d.mode == "high" || d.mode == "none") << d.mode;
    EXPECT_EQ(json::parse(d.verdict_json), verdicts[std::string(is_auto ? "a/" : "s/") + item_id]) << d.request_id;
  }
  EXPECT_EQ(score, 6);
  EXPECT_EQ(automatic, 6);
}

// A policy file with rules and a triage model: the rules decide the items they match, triage (trained
// here on the golden set) runs on every item the rules leave, and both show in the per-stage cost.
TEST_F(CliEval, RulesAndTriageStagesRunFromThePolicyFile) {
  TempDir out;
  const std::string data = subset(out, "twelve.jsonl", 12);
  std::ifstream text_in(spam_policy());
  const std::string text((std::istreambuf_iterator<char>(text_in)), std::istreambuf_iterator<char>());
  std::filesystem::create_directories(out.file("triage"));
  RunResult r = testing::run_command(std::string(ARBITER_BINARY) + " triage train --dataset " + testing::shell_quote(spam_dir() + "/golden.jsonl") +
                                     " --policy spam --out " + testing::shell_quote(out.file("triage/spam.bin")) + " --epochs 5 --dim 8 --buckets 1000");
  ASSERT_EQ(r.status, 0) << r.output;
  const json policy = {{"text", text},
                       {"rules", {{"allow", {{{"id", "A-attached"}, {"pattern", "(?i)\\battached\\b"}}}}}},
                       {"cascade", {{"stages", {"rules", "triage", "score", "high"}}, {"triage_model", "spam.bin"}}}};
  std::ofstream(out.file("spam.json")) << policy.dump();
  r = eval("--dataset " + testing::shell_quote(data) + " --policy " + testing::shell_quote(out.file("spam.json")) + " --effort auto --triage-dir " +
           testing::shell_quote(out.file("triage")) + " --out " + testing::shell_quote(out.file("auto")));
  ASSERT_EQ(r.status, 0) << r.output;
  int attached = 0;
  for (size_t i = 0; i < 12; ++i)
    if (json::parse(golden_[i]).at("content").get<std::string>().find("attached") != std::string::npos) ++attached;
  ASSERT_GT(attached, 0);
  const json report = read_json(out.file("auto/report.json"));
  const json& stages = report.at("cost").at("stages");
  EXPECT_EQ(stages.at("rules").at("runs"), 12);
  EXPECT_EQ(stages.at("rules").at("decided"), attached);
  EXPECT_EQ(stages.at("triage").at("runs"), 12);  // every stage runs for the sweep; routing picks the verdict
  for (const auto& line : read_lines(out.file("auto/items.jsonl"))) {
    const json item = json::parse(line);
    const json& p = item.at("policies").at("spam");
    if (p.at("decided_by") == "rules") {
      EXPECT_EQ(p.at("verdict"), 0) << line;
    }
  }
  // A rules stage without rules is refused before any model loads.
  std::ofstream(out.file("bare.json")) << json{{"text", text}, {"cascade", {{"stages", {"rules", "high"}}}}}.dump();
  r = eval("--dataset " + testing::shell_quote(data) + " --policy " + testing::shell_quote(out.file("bare.json")) + " --effort auto --out " + testing::shell_quote(out.file("x")));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("no \"rules\""), std::string::npos) << r.output;
}

// Policies from the registry database, by id and by id@version, with their registered cascade.
TEST_F(CliEval, PoliciesFromTheRegistryByIdAndVersion) {
  TempDir out;
  const std::string db = out.file("policies.db");
  {
    api::PolicyRegistry registry(db);
    api::PolicyDraft first{"spam", "Spam policy. Answer 1 if the content is spam, else 0.", {}, {}, ""};
    registry.put(first);
    api::PolicyDraft second = first;
    second.text += " Promotions count as spam.";
    second.cascade = {{"stages", {"score", "high"}}};
    registry.put(second);
  }
  const std::string data = subset(out, "four.jsonl", 4);
  RunResult r = eval("--dataset " + testing::shell_quote(data) + " --policy-db " + testing::shell_quote(db) + " --policy spam@1 --mode score --out " +
                     testing::shell_quote(out.file("v1")));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(read_json(out.file("v1/report.json")).at("policies").contains("spam"));
  r = eval("--dataset " + testing::shell_quote(data) + " --policy-db " + testing::shell_quote(db) + " --policy spam --effort auto --out " + testing::shell_quote(out.file("auto")));
  ASSERT_EQ(r.status, 0) << r.output;
  const json report = read_json(out.file("auto/report.json"));
  EXPECT_FALSE(report.at("cost").at("stages").contains("low")) << report.at("cost").dump();  // the registered cascade: score, high
  EXPECT_EQ(report.at("cost").at("stages").at("high").at("runs"), 4);
  r = eval("--dataset " + testing::shell_quote(data) + " --policy-db " + testing::shell_quote(db) + " --policy spam@9 --out " + testing::shell_quote(out.file("x")));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("spam@9"), std::string::npos) << r.output;
}

TEST_F(CliEval, UsageErrors) {
  TempDir out;
  const std::string data = subset(out, "one.jsonl", 1);
  auto status = [&](const std::string& args) { return eval("--dataset " + testing::shell_quote(data) + " --out " + testing::shell_quote(out.file("o")) + " " + args); };
  RunResult r = status("--policy /nonexistent/policy.txt");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("no such file"), std::string::npos) << r.output;
  r = status("--policy " + testing::shell_quote(spam_policy()) + " --mode fast");
  EXPECT_EQ(r.status, 2) << r.output;
  r = status("--policy " + testing::shell_quote(spam_policy()) + " --effort auto --mode score");
  EXPECT_EQ(r.status, 2) << r.output;
  std::ofstream(out.file("bad.json")) << R"({"text": "x", "cascade": {"stages": ["warp"]}})";
  r = status("--policy " + testing::shell_quote(out.file("bad.json")));
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("\"cascade\""), std::string::npos) << r.output;
}

}  // namespace
}  // namespace arbiter
