// `arbiter triage train` run as users run it: a generated JSONL dataset with a bad line (reported,
// skipped), the model file and the summary's counts, and the usage errors (exit 2).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>

#include "pipeline/triage.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

using nlohmann::json;

testing::RunResult run(const std::string& args, bool merge_stderr = true) {
  return testing::run_command(std::string(ARBITER_BINARY) + " " + args, merge_stderr);
}

// A dataset of 60 spam/ham items for policy "spam" (half by "violation", half by "labels"), 5 items
// labelled only for another policy, and a bad line (line 4).
std::string write_dataset(const testing::TempDir& tmp) {
  const std::string path = tmp.file("data.jsonl");
  std::ofstream out(path);
  std::mt19937 rng(5);
  const std::vector<std::string> spam = {"free", "crypto", "winner", "prize", "cash", "click"};
  const std::vector<std::string> ham = {"meeting", "lunch", "report", "garden", "family", "coffee"};
  int line = 0;
  for (int i = 0; i < 60; ++i) {
    if (++line == 4) {
      out << "{\"id\": \"broken\", \"content\": \n";
      ++line;
    }
    const bool is_spam = i % 2 == 0;
    std::string content;
    for (int w = 0; w < 12; ++w) content += (w ? " " : "") + (is_spam ? spam : ham)[rng() % 6];
    json item = {{"id", "item-" + std::to_string(i)}, {"content", content}};
    if (i % 4 < 2)
      item["violation"] = is_spam ? 1 : 0;
    else
      item["labels"] = {{"spam", is_spam ? 1 : 0}};
    out << item.dump() << "\n";
  }
  for (int i = 0; i < 5; ++i) {
    out << json({{"id", "other-" + std::to_string(i)}, {"content", "hello there"}, {"labels", {{"hate", 0}}}}).dump() << "\n";
  }
  return path;
}

TEST(TriageCliTest, TrainsFromADatasetAndReportsBadLines) {
  testing::TempDir tmp;
  const std::string data = write_dataset(tmp);
  const std::string model = tmp.file("spam.bin");
  const auto r = run("triage train --dataset " + data + " --policy spam --out " + model + " --epochs 10 --dim 16 --buckets 10000");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find(data + ":4:"), std::string::npos) << r.output;  // the bad line, by number
  ASSERT_TRUE(std::filesystem::exists(model));
  const auto loaded = TriageModel::load(model);
  EXPECT_EQ(loaded->answers().size(), 2u);

  // stdout alone: the one-line summary.
  const auto quiet = run("triage train --dataset " + data + " --policy spam --out " + model + " --epochs 5 --dim 8 --buckets 1000", false);
  ASSERT_EQ(quiet.status, 0) << quiet.output;
  const json summary = json::parse(quiet.output);
  EXPECT_EQ(summary["examples"], 60);
  EXPECT_EQ(summary["per_answer"], json({{"0", 30}, {"1", 30}}));
  EXPECT_EQ(summary["unlabelled"], 5);
  EXPECT_EQ(summary["dataset_errors"], 1);
  EXPECT_EQ(summary["out"], model);
  EXPECT_EQ(summary["policy"], "spam");
}

TEST(TriageCliTest, UsageErrorsExit2) {
  testing::TempDir tmp;
  const std::string data = write_dataset(tmp);
  const std::string model = tmp.file("m.bin");
  auto r = run("triage train --dataset " + data + " --out " + model);
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("--policy"), std::string::npos) << r.output;
  r = run("triage train --policy spam --out " + model);
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("--dataset"), std::string::npos) << r.output;
  r = run("triage train --dataset " + data + " --policy spam --out " + model + " --epochs 0");
  EXPECT_EQ(r.status, 2) << r.output;
  r = run("triage train --dataset " + data + " --policy spam --out " + model + " --lr abc");
  EXPECT_EQ(r.status, 2) << r.output;
  r = run("triage train --dataset " + data + " --policy spam --out " + model + " --contents 5");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("unknown option --contents"), std::string::npos) << r.output;
  r = run("triage");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("missing action"), std::string::npos) << r.output;
  r = run("triage fly");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_FALSE(std::filesystem::exists(model));
  // Failures (not usage) exit 1: no answers for the policy, an unreadable dataset.
  // ("violation" answers for any one policy: this dataset has "labels" only.)
  const std::string labels_only = tmp.file("labels.jsonl");
  std::ofstream(labels_only) << R"({"id": "a", "content": "x", "labels": {"spam": 1}})" << "\n"
                             << R"({"id": "b", "content": "y", "labels": {"spam": 0}})" << "\n";
  r = run("triage train --dataset " + labels_only + " --policy nobody --out " + model);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("\"nobody\""), std::string::npos) << r.output;
  r = run("triage train --dataset " + tmp.file("missing.jsonl") + " --policy spam --out " + model);
  EXPECT_EQ(r.status, 1) << r.output;
  // Help lists both forms.
  r = run("triage --help");
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.output.find("arbiter triage train"), std::string::npos);
  EXPECT_NE(r.output.find("arbiter triage bench"), std::string::npos);
}

}  // namespace
}  // namespace arbiter
