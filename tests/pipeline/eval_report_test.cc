// The evaluation report (pipeline/eval_report.h) on hand-made records: confusion counts and
// precision / recall / F1 against hand-computed values, undefined ratios, unknown labels, label
// sets and their confusion matrix, multi-policy accuracy, bootstrap intervals, agreement with high
// effort, the threshold sweep on hand-made traces, the items.jsonl round trip, comparing two runs,
// the HTML page, and the policy file loader.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "pipeline/eval_report.h"
#include "pipeline/policy_file.h"

namespace arbiter {
namespace {

using json = nlohmann::json;

EvalPolicyRecord record(const std::string& policy, std::optional<json> expected, json verdict, bool violation,
                        std::optional<Stage> decided_by = Stage::kLow) {
  EvalPolicyRecord r;
  r.policy = policy;
  r.expected = std::move(expected);
  r.verdict = std::move(verdict);
  r.violation = violation;
  r.decided_by = decided_by;
  return r;
}

// A binary record: expected e (nullopt: unknown), verdict v (-1: none).
EvalPolicyRecord binary(const std::string& policy, std::optional<int> e, int v) {
  return record(policy, e ? std::optional<json>(*e) : std::nullopt, v < 0 ? json(nullptr) : json(v), v == 1);
}

EvalItemRecord item(const std::string& id, std::vector<EvalPolicyRecord> policies) { return {id, std::move(policies)}; }

EvalRun one_policy_run(const std::vector<std::pair<std::optional<int>, int>>& rows) {
  EvalRun run;
  run.policies = {{"spam", {}, {}, {}}};
  int i = 0;
  for (const auto& [e, v] : rows) run.records.push_back(item("i" + std::to_string(i++), {binary("spam", e, v)}));
  return run;
}

TEST(EvalReport, BinaryCountsAndMetrics) {
  // 3 tp, 1 fp, 4 tn, 2 fn.
  EvalRun run = one_policy_run({{1, 1}, {1, 1}, {1, 1}, {0, 1}, {0, 0}, {0, 0}, {0, 0}, {0, -1}, {1, 0}, {1, -1}});
  const json r = eval_report(run);
  const json& p = r["policies"]["spam"];
  EXPECT_EQ(p["tp"], 3);
  EXPECT_EQ(p["fp"], 1);
  EXPECT_EQ(p["tn"], 4);
  EXPECT_EQ(p["fn"], 2);
  EXPECT_EQ(p["unknown"], 0);
  EXPECT_EQ(p["no_verdict"], 2);
  EXPECT_DOUBLE_EQ(p["precision"].get<double>(), 0.75);
  EXPECT_DOUBLE_EQ(p["recall"].get<double>(), 0.6);
  EXPECT_DOUBLE_EQ(p["f1"].get<double>(), 2 * 0.75 * 0.6 / 1.35);
  EXPECT_DOUBLE_EQ(p["accuracy"].get<double>(), 0.7);
  EXPECT_EQ(r["items"], 10);
  // Binary confusion: rows 0/1, columns 0/1/null.
  EXPECT_EQ(p["confusion"]["matrix"]["1"]["1"], 3);
  EXPECT_EQ(p["confusion"]["matrix"]["1"]["0"], 1);
  EXPECT_EQ(p["confusion"]["matrix"]["1"]["null"], 1);
  EXPECT_EQ(p["confusion"]["matrix"]["0"]["null"], 1);
  EXPECT_EQ(p["confusion"]["matrix"]["0"]["1"], 1);
}

TEST(EvalReport, UndefinedRatios) {
  BinaryCounts c;
  EXPECT_FALSE(c.precision());
  EXPECT_FALSE(c.recall());
  EXPECT_FALSE(c.f1());
  c.tn = 5;
  EXPECT_FALSE(c.precision());
  c.fn = 2;  // expected violations, none found
  EXPECT_DOUBLE_EQ(*c.recall(), 0.0);
  EXPECT_FALSE(c.f1());  // precision still undefined
  c.fp = 1;
  EXPECT_DOUBLE_EQ(*c.precision(), 0.0);
  EXPECT_DOUBLE_EQ(*c.f1(), 0.0);  // both defined and zero
  const json r = eval_report(one_policy_run({{0, 0}, {0, 0}}));
  EXPECT_TRUE(r["policies"]["spam"]["precision"].is_null());
  EXPECT_TRUE(r["policies"]["spam"]["recall"].is_null());
  EXPECT_TRUE(r["policies"]["spam"]["f1"].is_null());
  EXPECT_TRUE(r["policies"]["spam"]["intervals"]["precision"].is_null());
  // An empty run.
  const json empty = eval_report(one_policy_run({}));
  EXPECT_EQ(empty["policies"]["spam"]["tp"], 0);
  EXPECT_TRUE(empty["accuracy"]["value"].is_null());
}

TEST(EvalReport, UnknownLabelsAreExcluded) {
  const json r = eval_report(one_policy_run({{1, 1}, {std::nullopt, 1}, {std::nullopt, 0}, {0, 0}}));
  const json& p = r["policies"]["spam"];
  EXPECT_EQ(p["unknown"], 2);
  EXPECT_EQ(p["tp"], 1);
  EXPECT_EQ(p["tn"], 1);
  EXPECT_EQ(p["fp"], 0);  // the unknown item judged 1 is not a false positive
  EXPECT_EQ(p["fn"], 0);
  EXPECT_EQ(p["tp"].get<int>() + p["fp"].get<int>() + p["tn"].get<int>() + p["fn"].get<int>() + p["unknown"].get<int>(), 4);
}

TEST(EvalReport, LabelSetsAndConfusionMatrix) {
  EvalRun run;
  run.policies = {{"tox", {"SAFE", "MILD", "SEVERE"}, {"SEVERE"}, {}}};
  auto lab = [](const std::string& e, const json& v) {
    const bool violation = v == "SEVERE";
    return record("tox", json(e), v, violation);
  };
  run.records = {item("a", {lab("SAFE", "SAFE")}), item("b", {lab("SAFE", "MILD")}), item("c", {lab("SEVERE", "SEVERE")}),
                 item("d", {lab("SEVERE", "MILD")}), item("e", {lab("MILD", json(nullptr))}),
                 item("f", {lab("MILD", "MILD")})};
  const json p = eval_report(run)["policies"]["tox"];
  const json& m = p["confusion"]["matrix"];
  EXPECT_EQ(p["confusion"]["expected"], json({"SAFE", "MILD", "SEVERE"}));
  EXPECT_EQ(p["confusion"]["predicted"], json({"SAFE", "MILD", "SEVERE", "null"}));
  EXPECT_EQ(m["SAFE"]["SAFE"], 1);
  EXPECT_EQ(m["SAFE"]["MILD"], 1);
  EXPECT_EQ(m["SEVERE"]["SEVERE"], 1);
  EXPECT_EQ(m["SEVERE"]["MILD"], 1);
  EXPECT_EQ(m["MILD"]["null"], 1);
  EXPECT_EQ(m["MILD"]["MILD"], 1);
  EXPECT_EQ(m["MILD"]["SEVERE"], 0);
  // Binary view: SEVERE is the violating label.
  EXPECT_EQ(p["tp"], 1);
  EXPECT_EQ(p["fn"], 1);
  EXPECT_EQ(p["fp"], 0);
  EXPECT_EQ(p["tn"], 4);
  EXPECT_DOUBLE_EQ(p["accuracy"].get<double>(), 3.0 / 6);  // a, c, f
}

TEST(EvalReport, MultiPolicyAccuracy) {
  EvalRun run;
  run.policies = {{"spam", {}, {}, {}}, {"hate", {}, {}, {}}};
  run.records = {
      item("all-right", {binary("spam", 1, 1), binary("hate", 0, 0)}),
      item("one-wrong", {binary("spam", 1, 1), binary("hate", 0, 1)}),
      item("one-known", {binary("spam", 0, 0), binary("hate", std::nullopt, 1)}),  // hate unknown: not held against it
      item("none-known", {binary("spam", std::nullopt, 1), binary("hate", std::nullopt, 0)}),  // left out
  };
  const json a = eval_report(run)["accuracy"];
  EXPECT_EQ(a["items"], 3);
  EXPECT_EQ(a["correct"], 2);
  EXPECT_DOUBLE_EQ(a["value"].get<double>(), 2.0 / 3);
}

TEST(EvalReport, BootstrapIntervalsContainTheEstimateAndAreDeterministic) {
  std::vector<std::pair<std::optional<int>, int>> rows;
  for (int i = 0; i < 60; ++i) rows.push_back({i % 3 == 0 ? 1 : 0, (i % 3 == 0) != (i % 7 == 0) ? 1 : 0});
  EvalRun run = one_policy_run(rows);
  run.options.seed = 42;
  const json a = eval_report(run), b = eval_report(run);
  EXPECT_EQ(a, b);
  const json& p = a["policies"]["spam"];
  for (const char* m : {"tp", "fp", "tn", "fn", "precision", "recall", "f1"}) {
    const json& iv = p["intervals"][m];
    ASSERT_TRUE(iv.is_array()) << m;
    EXPECT_LE(iv[0].get<double>(), p[m].get<double>()) << m;
    EXPECT_GE(iv[1].get<double>(), p[m].get<double>()) << m;
    EXPECT_LT(iv[0].get<double>(), iv[1].get<double>()) << m;  // 60 mixed items: not a point
  }
  EXPECT_LE(a["accuracy"]["interval"][0].get<double>(), a["accuracy"]["value"].get<double>());
  EXPECT_GE(a["accuracy"]["interval"][1].get<double>(), a["accuracy"]["value"].get<double>());
  run.options.seed = 43;
  EXPECT_NE(eval_report(run)["policies"]["spam"]["intervals"], p["intervals"]);
  run.options.bootstrap = 0;
  EXPECT_TRUE(eval_report(run)["policies"]["spam"]["intervals"]["f1"].is_null());
}

StageOutcome outcome(Stage stage, json verdict, double confidence, int computed) {
  StageOutcome o;
  o.stage = stage;
  o.violation = verdict == 1;
  o.verdict = std::move(verdict);
  o.confidence = confidence;
  o.usage.prompt_tokens = computed + 10;
  o.usage.cached_tokens = 10;
  o.usage.completion_tokens = 0;
  o.usage.reasoning_tokens = stage == Stage::kScore ? 0 : 1;
  o.seconds = 0.5;
  return o;
}

// Hand-made cascade traces (score -> low -> high): score costs 1 token, low 10, high 100.
EvalRun cascade_run() {
  EvalRun run;
  EvalPolicyInfo p{"spam", {}, {}, {}};
  p.cascade.stages = {Stage::kScore, Stage::kLow, Stage::kHigh};
  p.cascade.score_threshold = 0.9;
  p.cascade.low_threshold = 0.8;
  run.policies = {p};
  auto trace = [](const std::string& id, int expected, std::vector<StageOutcome> stages) {
    EvalPolicyRecord r = record("spam", json(expected), stages.back().verdict, stages.back().verdict == 1, Stage::kHigh);
    r.stages = std::move(stages);
    return item(id, {r});
  };
  run.records = {
      // score sure and right
      trace("a", 1, {outcome(Stage::kScore, 1, 0.97, 1), outcome(Stage::kLow, 1, 0.9, 10), outcome(Stage::kHigh, 1, 0.99, 100)}),
      // score sure but wrong at 0.92; low sure and right
      trace("b", 0, {outcome(Stage::kScore, 1, 0.92, 1), outcome(Stage::kLow, 0, 0.85, 10), outcome(Stage::kHigh, 0, 0.99, 100)}),
      // score unsure; low unsure and wrong at 0.7
      trace("c", 0, {outcome(Stage::kScore, 1, 0.6, 1), outcome(Stage::kLow, 1, 0.7, 10), outcome(Stage::kHigh, 0, 0.99, 100)}),
      // every stage agrees, all unsure but high
      trace("d", 1, {outcome(Stage::kScore, 1, 0.55, 1), outcome(Stage::kLow, 1, 0.65, 10), outcome(Stage::kHigh, 1, 0.9, 100)}),
  };
  return run;
}

TEST(EvalReport, AgreementWithHigh) {
  const json a = eval_report(cascade_run())["agreement"];
  EXPECT_EQ(a["score_vs_high"]["items"], 4);
  EXPECT_EQ(a["score_vs_high"]["agree"], 2);  // a, d
  EXPECT_EQ(a["low_vs_high"]["agree"], 3);    // a, b, d
  EXPECT_FALSE(a.contains("medium_vs_high"));
  // Fixed-effort runs (one stage) have nothing to compare.
  EXPECT_TRUE(eval_report(one_policy_run({{1, 1}}))["agreement"].empty());
}

TEST(EvalReport, ThresholdSweep) {
  EvalRun run = cascade_run();
  run.options.target_agreement = 1.0;
  const json r = eval_report(run);
  const json& s = r["sweep"];
  ASSERT_FALSE(s.is_null());
  EXPECT_EQ(s["grid"].size(), 11u);
  EXPECT_EQ(s["points"].size(), 121u);
  auto point = [&s](double score, double low) {
    for (const auto& p : s["points"])
      if (std::abs(p["score"].get<double>() - score) < 1e-9 && std::abs(p["low"].get<double>() - low) < 1e-9) return p;
    return json();
  };
  // Configured (0.9 / 0.8): a decided by score (1 token), b by score (wrong: 1), c and d by high
  // (1 + 10 + 100 each); agreement 3/4.
  EXPECT_EQ(s["configured"]["cost"], 1 + 1 + 111 + 111);
  EXPECT_DOUBLE_EQ(s["configured"]["agreement"].get<double>(), 0.75);
  EXPECT_EQ(point(0.9, 0.8), json(s["configured"]));
  // Score at 0.95: b goes on to low (sure at 0.85 >= 0.8, right): 1 + 11 + 111 + 111, agreement 1.
  EXPECT_EQ(point(0.95, 0.8)["cost"], 1 + 11 + 111 + 111);
  EXPECT_DOUBLE_EQ(point(0.95, 0.8)["agreement"].get<double>(), 1.0);
  // Everything at 0.5: score decides all (4 tokens), agrees on a and d only.
  EXPECT_EQ(point(0.5, 0.5)["cost"], 4);
  EXPECT_DOUBLE_EQ(point(0.5, 0.5)["agreement"].get<double>(), 0.5);
  // Every threshold at 1.0: all go to high.
  EXPECT_EQ(point(1.0, 1.0)["cost"], 4 * 111);
  // The cheapest point with full agreement: score above 0.92 (so b escalates), above 0.97 is dearer
  // (a escalates); low at or below 0.85 (b decided by low) but above 0.7 (c not decided by low).
  const json& best = s["best"];
  ASSERT_TRUE(best.is_object());
  EXPECT_EQ(best["cost"], 1 + 11 + 111 + 111);
  EXPECT_DOUBLE_EQ(best["agreement"].get<double>(), 1.0);
  EXPECT_GT(best["score"].get<double>(), 0.92);
  EXPECT_LE(best["score"].get<double>(), 0.97);
  EXPECT_GT(best["low"].get<double>(), 0.7);
  EXPECT_LE(best["low"].get<double>(), 0.85);
  EXPECT_EQ(s["high_only_cost"], 400);
  EXPECT_TRUE(s["policies"].contains("spam"));
  // Per-stage cost over the traces: every stage ran on every item.
  const json& cost = r["cost"]["stages"];
  EXPECT_EQ(cost["score"]["runs"], 4);
  EXPECT_EQ(cost["high"]["decided"], 4);
  EXPECT_EQ(cost["low"]["tokens"]["prompt"], 80);
  EXPECT_EQ(cost["low"]["tokens"]["cached"], 40);
  EXPECT_DOUBLE_EQ(cost["low"]["per_decision"]["computed"].get<double>(), 10.0);
  EXPECT_DOUBLE_EQ(cost["high"]["latency"]["p50"].get<double>(), 0.5);
  // No traces, no sweep.
  EXPECT_TRUE(eval_report(one_policy_run({{1, 1}}))["sweep"].is_null());
  // A target no point reaches.
  run.records[0].policies[0].stages[2].verdict = 0;  // high now disagrees with every cheap stage on a...
  run.records[0].policies[0].stages[1].verdict = 1;
  run.options.target_agreement = 1.0;
  const json s2 = eval_report(run)["sweep"];
  EXPECT_EQ(s2["best"]["cost"], 4 * 111);  // ...so only running high everywhere agrees fully
}

TEST(EvalReport, ItemRecordsRoundTrip) {
  EvalRun run = cascade_run();
  run.records[0].policies[0].confidence = 0.5;
  run.records[0].policies[0].latency = 1.25;
  run.records[0].policies[0].stages[0].reason = "why";
  run.records[0].policies[0].stages[0].finish = FinishReason::kLength;
  run.records[0].policies.push_back(binary("other", std::nullopt, -1));
  run.records[0].policies.back().decided_by.reset();
  const json j = to_json(run.records[0]);
  const EvalItemRecord back = eval_item_from_json(json::parse(j.dump()));
  EXPECT_EQ(to_json(back), j);
  EXPECT_FALSE(back.find("other")->expected);
  EXPECT_FALSE(back.find("other")->decided_by);
  EXPECT_EQ(back.find("spam")->stages[0].finish, FinishReason::kLength);
  EXPECT_THROW(eval_item_from_json(json::parse(R"({"policies": {}})")), std::invalid_argument);
  EXPECT_THROW(eval_item_from_json(json::parse(R"({"id": "x", "policies": {"p": {"stages": [{"stage": "nope"}]}}})")),
               std::invalid_argument);
}

TEST(EvalReport, CompareRuns) {
  const std::vector<EvalPolicyInfo> policies = {{"spam", {}, {}, {}}};
  const std::vector<EvalItemRecord> here = {item("a", {binary("spam", 1, 1)}), item("b", {binary("spam", 0, 1)}),
                                            item("c", {binary("spam", 0, 0)}), item("new", {binary("spam", 0, 0)})};
  const std::vector<EvalItemRecord> there = {item("a", {binary("spam", 1, 0)}), item("b", {binary("spam", 0, 0)}),
                                             item("c", {binary("spam", 0, 0)}), item("old", {binary("spam", 1, 1)})};
  const json c = compare_runs(here, there, policies);
  const json& p = c["policies"]["spam"];
  EXPECT_EQ(p["compared"], 3);
  EXPECT_EQ(p["flips"], 2);
  EXPECT_EQ(p["fixed"], 1);   // a: right here, wrong there
  EXPECT_EQ(p["broken"], 1);  // b
  EXPECT_EQ(p["flipped"][0], json({{"id", "a"}, {"here", 1}, {"there", 0}, {"expected", 1}}));
  EXPECT_EQ(p["flipped"][1]["id"], "b");
  EXPECT_EQ(c["only_here"], json({"new"}));
  EXPECT_EQ(c["only_there"], json({"old"}));
}

TEST(EvalReport, HtmlCarriesTheNumbers) {
  EvalRun run = cascade_run();
  run.meta = {{"model", "<tiny>"}};
  run.dataset_errors = {{3, "not JSON"}};
  const json r = eval_report(run);
  const std::string html = report_html(r);
  EXPECT_EQ(html.rfind("<!DOCTYPE html>", 0), 0u);
  EXPECT_EQ(html.find("http://"), std::string::npos);  // nothing fetched
  EXPECT_EQ(html.find("https://"), std::string::npos);
  EXPECT_NE(html.find("&lt;tiny&gt;"), std::string::npos);  // escaped
  EXPECT_NE(html.find(R"(data-policy="spam" data-metric="tp" data-value="2")"), std::string::npos) << html;
  const std::string precision = r["policies"]["spam"]["precision"].dump();
  EXPECT_NE(html.find(R"(data-policy="spam" data-metric="precision" data-value=")" + precision + "\""), std::string::npos);
  EXPECT_NE(html.find(R"(data-metric="confusion" data-expected="0" data-predicted="0" data-value="2")"), std::string::npos);
  EXPECT_NE(html.find("id=\"sweep-chart\""), std::string::npos);
  EXPECT_NE(html.find("id=\"stage-cost-chart\""), std::string::npos);
  EXPECT_NE(html.find("line 3: not JSON"), std::string::npos);
  EXPECT_NE(html.find(R"(data-metric="dataset_errors" data-value="1")"), std::string::npos);
}

TEST(PolicyFile, Json) {
  const PolicyFile p = parse_policy_json(
      json::parse(R"({"text": "T", "labels": ["A", "B"], "violating_labels": ["B"], "rules": {"deny": []},
                      "cascade": {"stages": ["score", "high"], "thresholds": {"score": 0.7}}})"),
      "tox", "tox.json");
  EXPECT_EQ(p.id, "tox");
  EXPECT_EQ(p.labels, (std::vector<std::string>{"A", "B"}));
  EXPECT_EQ(p.violating_labels, (std::vector<std::string>{"B"}));
  EXPECT_TRUE(p.rules.is_object());
  ASSERT_TRUE(p.cascade);
  EXPECT_EQ(p.cascade->stages, (std::vector<Stage>{Stage::kScore, Stage::kHigh}));
  EXPECT_DOUBLE_EQ(p.cascade->score_threshold, 0.7);
  auto error = [](const char* text) {
    try {
      parse_policy_json(json::parse(text), "p", "p.json");
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error(R"({"labels": ["A"]})").find("\"text\""), std::string::npos);
  EXPECT_NE(error(R"({"text": "T", "colour": 1})").find("unknown key \"colour\""), std::string::npos);
  EXPECT_NE(error(R"({"text": "T", "labels": ["A", "A"]})").find("repeats"), std::string::npos);
  EXPECT_NE(error(R"({"text": "T", "labels": ["A"], "violating_labels": ["B"]})").find("not among"), std::string::npos);
  EXPECT_NE(error(R"({"text": "T", "cascade": {"stages": ["nope"]}})").find("\"cascade\""), std::string::npos);
  EXPECT_NE(error(R"([1])").find("p.json"), std::string::npos);
}

}  // namespace
}  // namespace arbiter
