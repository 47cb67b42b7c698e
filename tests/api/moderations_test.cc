// POST /v1/moderations against `arbiter serve` on a tiny random model: the OpenAI response shape
// through the npm `openai` client, scores consistent with the categories' flags and the threshold,
// the example config served as shipped, config errors refused at start, bad bodies (400 naming the
// field) and random bodies that never crash the server.
#include <random>

#include "api/moderation_api.h"
#include "tests/api/serve_process.h"

namespace arbiter {
namespace {

class Moderations : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = std::make_unique<testing::TempDir>();
    ASSERT_EQ(make_tiny_model(tmp_->file("model"), 4), "");
    server_ = std::make_unique<ServeProcess>(
        std::vector<std::string>{"--model", tmp_->file("model"), "--port", "0", "--device", "cpu", "--warm-efforts", "none",
                                 "--moderation-config", std::string(ARBITER_SOURCE_DIR) + "/configs/moderation/example.json"},
        tmp_->file("serve.log"));
    ASSERT_TRUE(wait_ready(server_->port(), 60)) << server_->log();
  }
  static void TearDownTestSuite() {
    server_.reset();
    tmp_.reset();
  }
  static int port() { return server_->port(); }
  static std::unique_ptr<testing::TempDir> tmp_;
  static std::unique_ptr<ServeProcess> server_;
};
std::unique_ptr<testing::TempDir> Moderations::tmp_;
std::unique_ptr<ServeProcess> Moderations::server_;

void expect_consistent(const json& result) {
  const std::vector<std::string> names = {"spam", "harassment", "self-harm"};
  bool any = false;
  for (const auto& n : names) {
    ASSERT_TRUE(result["category_scores"].contains(n)) << result.dump();
    const double p = result["category_scores"][n];
    EXPECT_GE(p, 0.0);
    EXPECT_LE(p, 1.0 + 1e-9);
    EXPECT_EQ(result["categories"][n].get<bool>(), p >= 0.5) << result.dump();  // the example's threshold
    EXPECT_EQ(result["category_applied_input_types"][n], json::array({"text"}));
    any = any || result["categories"][n].get<bool>();
  }
  EXPECT_EQ(result["flagged"].get<bool>(), any);
}

TEST_F(Moderations, TheOpenAiClientGetsOneResultPerInput) {
  const std::string node_modules = std::string(ARBITER_NODE_DIR) + "/node_modules";
  ASSERT_TRUE(std::filesystem::exists(node_modules + "/openai/package.json"))
      << "the npm openai client is missing: run scripts/fetch-tokenizer.sh";
  const auto node = testing::run_command("NODE_PATH=" + node_modules + " " + ARBITER_NODE + " " + ARBITER_SOURCE_DIR +
                                             "/tests/api/openai_moderations.cjs http://127.0.0.1:" + std::to_string(port()) + "/v1",
                                         false);
  ASSERT_EQ(node.status, 0) << node.output << server_->log();
  const json o = json::parse(node.output);
  ASSERT_EQ(o["one"]["results"].size(), 1u);
  EXPECT_EQ(o["one"]["model"], "model");
  EXPECT_EQ(o["one"]["id"].get<std::string>().rfind("modr-", 0), 0u);
  expect_consistent(o["one"]["results"][0]);
  ASSERT_EQ(o["many"]["results"].size(), 3u);
  for (const auto& r : o["many"]["results"]) expect_consistent(r);
  EXPECT_EQ(o["error"]["status"], 400);
  EXPECT_EQ(o["error"]["param"], "input");
  // The same input alone and in a batch: the same scores (score mode is batch invariant).
  const Reply alone = call(port(), "POST", "/v1/moderations", json{{"input", "click here to win"}}.dump());
  ASSERT_EQ(alone.status, 200) << alone.raw;
  for (const char* n : {"spam", "harassment", "self-harm"})
    EXPECT_NEAR(alone.body["results"][0]["category_scores"][n].get<double>(),
                o["many"]["results"][1]["category_scores"][n].get<double>(), 1e-5);
}

TEST_F(Moderations, BadBodiesAreRefusedAndRandomOnesNeverCrash) {
  auto code = [](const Reply& r) { return r.body.is_object() ? r.body["error"].value("code", json()).dump() : r.raw; };
  EXPECT_EQ(code(call(port(), "POST", "/v1/moderations", R"({"input": ""})")), "\"empty_input\"");
  EXPECT_EQ(code(call(port(), "POST", "/v1/moderations", R"({"input": ["a", 3]})")), "\"invalid_type\"");
  EXPECT_EQ(code(call(port(), "POST", "/v1/moderations", R"({})")), "\"invalid_type\"");
  json many = json::array();
  for (int i = 0; i < 33; ++i) many.push_back("x");
  EXPECT_EQ(code(call(port(), "POST", "/v1/moderations", json{{"input", many}}.dump())), "\"too_many_inputs\"");
  EXPECT_EQ(call(port(), "POST", "/v1/moderations", json{{"input", "x"}, {"model", "other"}}.dump()).status, 404);
  EXPECT_EQ(call(port(), "GET", "/v1/moderations").status, 405);
  std::mt19937 rng(3);
  const std::vector<json> pieces = {"text", 1, nullptr, json::array({"a", "b"}), json::object(), true, json::array({json::array()})};
  for (int i = 0; i < 60; ++i) {
    json body = json::object();
    if (rng() % 4) body["input"] = pieces[rng() % pieces.size()];
    if (rng() % 3 == 0) body["model"] = pieces[rng() % pieces.size()];
    std::string raw = body.dump();
    if (rng() % 5 == 0) raw = raw.substr(0, rng() % (raw.size() + 1));
    const Reply r = call(port(), "POST", "/v1/moderations", raw);
    EXPECT_TRUE(r.status == 200 || (r.status >= 400 && r.status < 500)) << raw << " -> " << r.status << " " << r.raw;
  }
  EXPECT_EQ(call(port(), "GET", "/health").status, 200);
}

TEST(ModerationConfig, ErrorsNameTheFileAndField) {
  testing::TempDir tmp;
  auto error_of = [&](const std::string& text) {
    const std::string path = tmp.file("m.json");
    std::ofstream(path) << text;
    try {
      api::load_moderation_config(path);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(error_of("[]").find("not a JSON object"), std::string::npos);
  EXPECT_NE(error_of(R"({"categories": {}})").find("\"categories\""), std::string::npos);
  EXPECT_NE(error_of(R"({"categories": {"spam": {}}})").find("exactly one of"), std::string::npos);
  EXPECT_NE(error_of(R"({"categories": {"spam": {"policy": "a", "text": "b"}}})").find("exactly one of"), std::string::npos);
  EXPECT_NE(error_of(R"({"categories": {"spam": {"policy": "a@0"}}})").find("categories.spam.policy"), std::string::npos);
  EXPECT_NE(error_of(R"({"categories": {"spam": {"text_file": "missing.txt"}}})").find("cannot read"), std::string::npos);
  EXPECT_NE(error_of(R"({"categories": {"spam": {"text": "t", "labels": ["A"], "violating_labels": ["B"]}}})").find("\"B\""),
            std::string::npos);
  EXPECT_NE(error_of(R"({"threshold": 2, "categories": {"spam": {"text": "t"}}})").find("threshold"), std::string::npos);
  EXPECT_NE(error_of(R"({"speed": 1, "categories": {"spam": {"text": "t"}}})").find("unknown field"), std::string::npos);
  EXPECT_EQ(error_of(R"({"mode": "reason", "categories": {"spam": {"policy": "spam@2"}}})"), "accepted");
  EXPECT_NE(error_of("{").find(tmp.file("m.json")), std::string::npos);
  // The server refuses to start on a bad config, naming it.
  const auto r = testing::run_command(std::string(ARBITER_BINARY) + " serve --model /nonexistent --moderation-config " +
                                      tmp.file("m.json"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("moderation config"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace arbiter
