// The cascade through the HTTP API, against `arbiter serve` on a tiny random model:
// `"reasoning_effort": "auto"` answers with the deciding stage and every stage's verdict and cost;
// inline and registered rules decide without the model; registered cascades, request overrides
// and their errors (bad thresholds, a rules stage without rules, a triage stage without a model,
// patterns that do not compile, with their offset); the decision log keeps the deciding stage.
#include "tests/api/serve_process.h"

namespace arbiter {
namespace {

class CascadeApi : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = std::make_unique<testing::TempDir>();
    ASSERT_EQ(make_tiny_model(tmp_->file("model"), 9), "");
    std::filesystem::create_directories(tmp_->file("triage"));
    server_ = std::make_unique<ServeProcess>(
        std::vector<std::string>{"--model", tmp_->file("model"), "--port", "0", "--device", "cpu", "--warm-efforts", "none",
                                 "--reasoning-budget", "8,8,16", "--answer-tokens", "32", "--db", tmp_->file("log.db"),
                                 "--triage-dir", tmp_->file("triage")},
        tmp_->file("serve.log"));
    ASSERT_TRUE(wait_ready(server_->port(), 60)) << server_->log();
  }
  static void TearDownTestSuite() {
    server_.reset();
    tmp_.reset();
  }
  static int port() { return server_->port(); }
  static Reply classify(const json& body) { return call(port(), "POST", "/v1/classify", body.dump()); }

  static std::unique_ptr<testing::TempDir> tmp_;
  static std::unique_ptr<ServeProcess> server_;
};
std::unique_ptr<testing::TempDir> CascadeApi::tmp_;
std::unique_ptr<ServeProcess> CascadeApi::server_;

std::vector<std::string> stage_names(const json& result) {
  std::vector<std::string> out;
  for (const auto& s : result["stages"]) out.push_back(s["stage"]);
  return out;
}

TEST_F(CascadeApi, AutoRunsStagesUntilOneIsSureEnough) {
  // Thresholds of 1: a stage goes on unless the model is certain (score's two renormalised
  // probabilities never are), so at least score and low run, and the last stage that ran decided.
  const json body = {{"content", "win a free cruise"},
                     {"reasoning_effort", "auto"},
                     {"policies", {{{"id", "spam"}, {"text", kPolicyTexts[0]}}}},
                     {"cascade", {{"thresholds", {{"score", 1}, {"low", 1}}}}}};
  Reply r = classify(body);
  ASSERT_EQ(r.status, 200) << r.raw;
  const json& p = r.body["results"][0];
  const std::vector<std::string> ran = stage_names(p);
  ASSERT_GE(ran.size(), 2u) << p.dump();
  EXPECT_EQ(std::vector<std::string>(ran.begin(), ran.begin() + 2), (std::vector<std::string>{"score", "low"})) << p.dump();
  if (ran.size() == 3) {
    EXPECT_EQ(ran[2], "high");
  }
  for (size_t i = 0; i + 1 < ran.size(); ++i)  // every stage that passed it on was not certain
    EXPECT_TRUE(p["stages"][i]["verdict"].is_null() || p["stages"][i]["confidence"].get<double>() < 1) << p.dump();
  if (!p["stages"].back()["verdict"].is_null()) {
    EXPECT_EQ(p["decided_by"], ran.back()) << p.dump();
    EXPECT_EQ(p["verdict"], p["stages"].back()["verdict"]);
  }
  int completion = 0, prompt = 0;
  for (const auto& s : p["stages"]) {
    completion += s["usage"]["completion_tokens"].get<int>();
    prompt += s["usage"]["prompt_tokens"].get<int>();
    EXPECT_GE(s["seconds"].get<double>(), 0);
  }
  EXPECT_EQ(p["usage"]["completion_tokens"], completion);
  EXPECT_EQ(p["usage"]["prompt_tokens"], prompt);
  EXPECT_EQ(p["stages"][0]["usage"]["completion_tokens"], 1);  // score: one position read

  // Threshold 0: score is always sure enough.
  json sure = body;
  sure["cascade"] = {{"thresholds", {{"score", 0}}}};
  r = classify(sure);
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body["results"][0]["decided_by"], "score");
  EXPECT_EQ(stage_names(r.body["results"][0]), (std::vector<std::string>{"score"}));
  EXPECT_EQ(r.body["results"][0]["verdict"], r.body["results"][0]["stages"][0]["verdict"]);

  // The stages a request names are the ones that run.
  json only_low = body;
  only_low["cascade"] = {{"stages", {"low"}}};
  r = classify(only_low);
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(stage_names(r.body["results"][0]), (std::vector<std::string>{"low"}));
  EXPECT_EQ(metric(port(), "arbiter_cascade_decisions_total{stage=\"score\"}"), 1);
}

TEST_F(CascadeApi, RegisteredPoliciesCarryTheirCascadeAndTheDecisionLogTheStage) {
  json policy = {{"id", "cascaded"}, {"text", kPolicyTexts[3]},
                 {"cascade", {{"stages", {"score", "high"}}, {"thresholds", {{"score", 0}}}}}};
  Reply r = call(port(), "POST", "/v1/policies", policy.dump());
  ASSERT_EQ(r.status, 201) << r.raw;
  EXPECT_EQ(r.body["cascade"]["stages"], json({"score", "high"}));
  r = classify({{"content", "hello"}, {"reasoning_effort", "auto"}, {"policies", {{{"id", "cascaded"}}}}});
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body["results"][0]["decided_by"], "score");
  const std::string decision = r.body["results"][0]["decision_id"];
  const Reply d = call(port(), "GET", "/v1/decisions/" + decision);
  ASSERT_EQ(d.status, 200) << d.raw;
  EXPECT_EQ(d.body["reasoning_effort"], "auto");
  EXPECT_EQ(d.body["mode"], "score");
  // A request overrides the registered cascade for itself only.
  r = classify({{"content", "hello"}, {"reasoning_effort", "auto"},
                {"policies", {{{"id", "cascaded"}, {"cascade", {{"thresholds", {{"score", 1}}}}}}}}});
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_NE(r.body["results"][0]["stages"].size(), 1u) << r.raw;  // score is never certain: it went on
  // Without "auto" the same policy runs at the effort asked, with no stages.
  r = classify({{"content", "hello"}, {"reasoning_effort", "low"}, {"policies", {{{"id", "cascaded"}}}}});
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_TRUE(r.body["results"][0].value("stages", json::array()).empty()) << r.raw;
  EXPECT_EQ(r.body["results"][0].value("decided_by", ""), "");
}

TEST_F(CascadeApi, BadCascadesAreRefusedWithTheField) {
  auto refused = [](const Reply& r, const std::string& code, const std::string& text) {
    EXPECT_EQ(r.status, 400) << r.raw;
    EXPECT_EQ(r.body["error"]["code"], code) << r.raw;
    EXPECT_NE(r.body["error"]["message"].get<std::string>().find(text), std::string::npos) << r.raw;
  };
  refused(call(port(), "POST", "/v1/policies",
               json{{"id", "x"}, {"text", "t"}, {"cascade", {{"thresholds", {{"score", 1.5}}}}}}.dump()),
          "invalid_cascade", "thresholds.score");
  refused(call(port(), "POST", "/v1/policies", json{{"id", "x"}, {"text", "t"}, {"cascade", {{"stages", {"rules", "high"}}}}}.dump()),
          "invalid_cascade", "no rules");
  refused(call(port(), "POST", "/v1/policies", json{{"id", "x"}, {"text", "t"}, {"cascade", {{"stages", {"triage", "high"}}}}}.dump()),
          "invalid_cascade", "triage_model");
  refused(call(port(), "POST", "/v1/policies",
               json{{"id", "x"}, {"text", "t"}, {"cascade", {{"stages", {"triage", "high"}}, {"triage_model", "absent.bin"}}}}.dump()),
          "triage_model_unavailable", "absent.bin");
  refused(call(port(), "POST", "/v1/policies",
               json{{"id", "x"}, {"text", "t"}, {"cascade", {{"stages", {"high", "score"}}}}}.dump()),
          "invalid_cascade", "cannot come after");
  const json policies = {{{"id", "p"}, {"text", kPolicyTexts[0]}}};
  refused(classify({{"content", "c"}, {"reasoning_effort", "auto"}, {"mode", "score"}, {"policies", policies}}), "invalid_value", "score");
  refused(classify({{"content", "c"}, {"reasoning_effort", "auto"}, {"max_tokens", 5}, {"policies", policies}}), "invalid_value",
          "budgets");
  refused(classify({{"content", "c"}, {"reasoning_effort", "low"}, {"cascade", {{"stages", {"low"}}}}, {"policies", policies}}),
          "invalid_value", "auto");
  refused(classify({{"content", "c"}, {"reasoning_effort", "fastest"}, {"policies", policies}}), "invalid_value", "'auto'");
  refused(classify({{"content", "c"}, {"reasoning_effort", "auto"}, {"cascade", {{"triage_model", "m.bin"}}}, {"policies", policies}}),
          "invalid_cascade", "registered");
  refused(classify({{"content", "c"}, {"reasoning_effort", "auto"}, {"cascade", {{"budgets", {{"low", -3}}}}}, {"policies", policies}}),
          "invalid_cascade", "budgets.low");
}

}  // namespace
}  // namespace arbiter
