// The decision log end to end, against `arbiter serve` on a tiny random model: every answered
// classification stored with the right fields and its id in the response; key scoping (a key reads
// only its own decisions, an admin key all); cursor pages without duplicates or gaps; decisions =
// 200s after a burst of concurrent requests, some refused; feedback and the disagreement filter;
// malformed queries and bodies (400 naming the parameter); decisions survive a restart; `arbiter
// export`; content storage modes; retention at start and periodically (rows aged through SQLite);
// a locked database answers 503 and stores nothing; no decision log without a database.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "pipeline/sha256.h"
#include "tests/api/serve_process.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

std::string sql(const std::string& db, const std::string& statement) {
  sqlite3* raw = nullptr;
  sqlite3_open(db.c_str(), &raw);
  char* error = nullptr;
  sqlite3_exec(raw, statement.c_str(), nullptr, nullptr, &error);
  const std::string why = error ? error : "";
  sqlite3_free(error);
  sqlite3_close(raw);
  return why;
}

class Decisions : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = std::make_unique<testing::TempDir>();
    ASSERT_EQ(make_tiny_model(model_dir(), 5), "");
    std::ofstream(file("keys")) << "key-one\nkey-two\nadmin:key-admin\n";
  }
  static void TearDownTestSuite() { tmp_.reset(); }
  static std::string model_dir() { return tmp_->file("model"); }
  static std::string file(const std::string& name) { return tmp_->file(name); }
  static std::vector<std::string> args(const std::string& db, std::vector<std::string> more = {}) {
    std::vector<std::string> a = {"--model", model_dir(), "--port", "0", "--device", "cpu", "--request-timeout", "120",
                                  "--api-key-file", file("keys"), "--warm-efforts", "none"};
    if (!db.empty()) a.insert(a.end(), {"--db", db});
    a.insert(a.end(), more.begin(), more.end());
    return a;
  }
  static json body(const std::string& content, bool reasoning = false) {
    return {{"content", content},
            {"policies", {{{"id", "spam"}}, {{"id", "inline"}, {"text", kPolicyTexts[1]}}}},
            {"reasoning_effort", "low"}, {"max_tokens", 3}, {"return_reasoning", reasoning}};
  }
  // Every decision `key` can list (all pages of `limit`), newest first; fails on a repeated id.
  static std::vector<json> list_all(int port, const std::string& key, const std::string& filter = "", int limit = 7) {
    std::vector<json> out;
    std::set<std::string> ids;
    std::string after;
    for (int page = 0; page < 200; ++page) {
      const Reply r = call(port, "GET", "/v1/decisions?limit=" + std::to_string(limit) + filter + (after.empty() ? "" : "&after=" + after), "", key);
      EXPECT_EQ(r.status, 200) << r.raw;
      if (r.status != 200) break;
      for (const json& d : r.body["data"]) {
        EXPECT_TRUE(ids.insert(d["id"].get<std::string>()).second) << "listed twice: " << d["id"];
        if (!out.empty()) {
          EXPECT_LT(d["id"].get<std::string>(), out.back()["id"].get<std::string>()) << "not newest first";
        }
        out.push_back(d);
      }
      if (!r.body["has_more"].get<bool>()) break;
      EXPECT_EQ(r.body["data"].size(), static_cast<size_t>(limit));
      after = r.body["last_id"].get<std::string>();
    }
    return out;
  }
  static inline std::unique_ptr<testing::TempDir> tmp_;
};

TEST_F(Decisions, StoredScopedPagedWithFeedbackExportAndRestart) {
  const std::string db = file("log.db");
  json first_response;
  std::string decision, inline_decision, feedback_body;
  int ok = 0;
  {
    ServeProcess server(args(db, {"--store-content", "full", "--http-threads", "8", "--max-queued", "3"}), file("log.log"));
    const int port = server.port();
    ASSERT_TRUE(wait_ready(port, 60)) << server.log();
    ASSERT_EQ(call(port, "POST", "/v1/policies", json{{"id", "spam"}, {"text", kPolicyTexts[0]}}.dump(), "key-one").status, 201);

    // One request, two policies: two decisions, each with every field.
    const auto before = std::chrono::system_clock::now();
    Reply r = call(port, "POST", "/v1/classify", body("win a free cruise").dump(), "key-one");
    ASSERT_EQ(r.status, 200) << r.raw;
    first_response = r.body;
    decision = r.body["results"][0]["decision_id"];
    inline_decision = r.body["results"][1]["decision_id"];
    EXPECT_NE(decision, inline_decision);
    EXPECT_FALSE(r.body["results"][0].contains("reasoning"));  // not asked for, yet stored
    r = call(port, "GET", "/v1/decisions/" + decision, "", "key-one");
    ASSERT_EQ(r.status, 200) << r.raw;
    const json& d = r.body;
    const json& result = first_response["results"][0];
    EXPECT_EQ(d["object"], "decision");
    EXPECT_EQ(d["id"], decision);
    EXPECT_EQ(d["request_id"], first_response["id"]);
    EXPECT_EQ(d["api_key_id"], "key_" + arbiter::sha256_hex("key-one").substr(0, 16));
    EXPECT_EQ(r.raw.find("key-one"), std::string::npos) << "the key itself was stored";
    EXPECT_EQ(d["model"], first_response["model"]);
    EXPECT_EQ(d["policy_id"], "spam");
    EXPECT_EQ(d["policy_version"], 1);
    EXPECT_EQ(d["policy_sha256"], arbiter::sha256_hex(kPolicyTexts[0]));
    EXPECT_EQ(d["reasoning_effort"], "low");
    EXPECT_EQ(d["mode"], "reasoning");
    EXPECT_EQ(d["verdict"], result["verdict"]);
    EXPECT_EQ(d["violation"], result["violation"]);
    EXPECT_EQ(d["confidence"], result["confidence"]);
    EXPECT_EQ(d["final"], result["final"]);
    EXPECT_EQ(d["finish_reason"], result["finish_reason"]);
    EXPECT_EQ(d["usage"], result["usage"]);
    EXPECT_TRUE(d.contains("reasoning")) << r.raw;
    EXPECT_EQ(d["content"], "win a free cruise");
    EXPECT_EQ(d["content_sha256"], arbiter::sha256_hex("win a free cruise"));
    EXPECT_GT(d["latency_ms"].get<double>(), 0);
    const auto created = std::chrono::system_clock::time_point(std::chrono::seconds(d["created"].get<int64_t>()));
    EXPECT_LE(std::chrono::abs(created - before), std::chrono::seconds(5));
    EXPECT_FALSE(d.contains("feedback"));
    EXPECT_EQ(d["feedback_count"], 0);
    r = call(port, "GET", "/v1/decisions/" + inline_decision, "", "key-one");
    EXPECT_EQ(r.body["policy_id"], "inline");
    EXPECT_FALSE(r.body.contains("policy_version"));

    // Scope: another key cannot see it (404, as if absent), an admin key can.
    EXPECT_EQ(call(port, "GET", "/v1/decisions/" + decision, "", "key-two").status, 404);
    EXPECT_EQ(call(port, "GET", "/v1/decisions/" + decision, "", "key-admin").status, 200);
    EXPECT_EQ(call(port, "GET", "/v1/decisions/" + decision, "").status, 401);

    // A burst of concurrent requests from key-two, more than the queue takes: decisions = 200s.
    std::vector<Reply> burst(24);
    {
      std::vector<std::thread> threads;
      for (int i = 0; i < 24; ++i)
        threads.emplace_back([&, i] { burst[i] = call(port, "POST", "/v1/classify", body("burst " + std::to_string(i)).dump(), "key-two"); });
      for (auto& t : threads) t.join();
    }
    std::set<std::string> answered;
    for (const Reply& b : burst) {
      EXPECT_TRUE(b.status == 200 || b.status == 429) << b.raw;
      if (b.status != 200) continue;
      ++ok;
      for (const json& res : b.body["results"]) answered.insert(res["decision_id"].get<std::string>());
    }
    const std::vector<json> mine = list_all(port, "key-two");
    std::set<std::string> listed;
    for (const json& x : mine) listed.insert(x["id"].get<std::string>());
    EXPECT_EQ(listed, answered) << ok << " requests answered 200";
    EXPECT_EQ(list_all(port, "key-one").size(), 2u);
    const std::vector<json> everything = list_all(port, "key-admin", "", 5);
    EXPECT_EQ(everything.size(), 2u + answered.size());
    EXPECT_EQ(list_all(port, "key-admin", "&policy=spam").size(), 1u + answered.size() / 2);
    EXPECT_EQ(list_all(port, "key-admin", "&policy=spam%401").size(), 1u + answered.size() / 2);
    EXPECT_EQ(list_all(port, "key-admin", "&policy=spam@2").size(), 0u);
    EXPECT_EQ(list_all(port, "key-admin", "&policy=inline&since=" + std::to_string(d["created"].get<int64_t>() - 2)).size(),
              1u + answered.size() / 2);
    EXPECT_EQ(list_all(port, "key-admin", "&since=2100-01-01T00:00:00Z").size(), 0u);

    // Feedback: the latest is shown; disagreement lists decisions whose latest label differs.
    // (The tiny random model rarely answers in its final channel: verdicts are often null.)
    const json verdict = d["verdict"];
    const json other = verdict == json(1) ? json(0) : json(1);
    r = call(port, "POST", "/v1/decisions/" + decision + "/feedback", json{{"label", "SAFE"}, {"reviewer", "ann"}}.dump(), "key-one");
    ASSERT_EQ(r.status, 200) << r.raw;
    r = call(port, "POST", "/v1/decisions/" + decision + "/feedback",
             json{{"label", other}, {"reviewer", "bob"}, {"note", "clearly spam"}}.dump(), "key-admin");
    ASSERT_EQ(r.status, 200) << r.raw;
    EXPECT_EQ(r.body["feedback"]["label"], other);
    EXPECT_EQ(r.body["feedback"]["reviewer"], "bob");
    EXPECT_EQ(r.body["feedback"]["note"], "clearly spam");
    EXPECT_EQ(r.body["feedback_count"], 2);
    feedback_body = r.raw;
    r = call(port, "POST", "/v1/decisions/" + inline_decision + "/feedback",
             json{{"label", first_response["results"][1]["verdict"].is_null() ? json(0) : first_response["results"][1]["verdict"]},
                  {"reviewer", "ann"}}.dump(), "key-one");
    ASSERT_EQ(r.status, 200) << r.raw;
    std::vector<json> dis = list_all(port, "key-one", "&disagreement=true");
    std::set<std::string> disagreeing;
    for (const json& x : dis) disagreeing.insert(x["id"].get<std::string>());
    if (first_response["results"][1]["verdict"].is_null()) {
      EXPECT_EQ(disagreeing, (std::set<std::string>{decision, inline_decision}));
    } else {
      EXPECT_EQ(disagreeing, std::set<std::string>{decision});
    }
    EXPECT_EQ(list_all(port, "key-two", "&disagreement=true").size(), 0u);
    EXPECT_EQ(list_all(port, "key-one", "&has_feedback=false").size(), 0u);
    // Another key cannot give feedback on it.
    EXPECT_EQ(call(port, "POST", "/v1/decisions/" + decision + "/feedback", json{{"label", 1}, {"reviewer", "x"}}.dump(), "key-two").status,
              404);

    // Malformed queries and bodies: 400 naming the parameter.
    auto param_of = [&](const std::string& method, const std::string& path, const std::string& b = "") {
      const Reply e = call(port, method, path, b, "key-one");
      EXPECT_EQ(e.status, 400) << path << " " << e.raw;
      return e.body["error"]["param"].is_string() ? e.body["error"]["param"].get<std::string>() : std::string("null");
    };
    EXPECT_EQ(param_of("GET", "/v1/decisions?limit=0"), "limit");
    EXPECT_EQ(param_of("GET", "/v1/decisions?limit=ten"), "limit");
    EXPECT_EQ(param_of("GET", "/v1/decisions?after=123"), "after");
    EXPECT_EQ(param_of("GET", "/v1/decisions?since=yesterday"), "since");
    EXPECT_EQ(param_of("GET", "/v1/decisions?disagreement=1"), "disagreement");
    EXPECT_EQ(param_of("GET", "/v1/decisions?verdict="), "verdict");
    EXPECT_EQ(param_of("GET", "/v1/decisions?sort=asc"), "sort");
    EXPECT_EQ(param_of("GET", "/v1/decisions?limit=1&limit=2"), "limit");
    EXPECT_EQ(param_of("GET", "/v1/decisions/not-an-id"), "id");
    const std::string fb = "/v1/decisions/" + decision + "/feedback";
    EXPECT_EQ(param_of("POST", fb, json{{"reviewer", "x"}}.dump()), "label");
    EXPECT_EQ(param_of("POST", fb, json{{"label", true}, {"reviewer", "x"}}.dump()), "label");
    EXPECT_EQ(param_of("POST", fb, json{{"label", 0.5}, {"reviewer", "x"}}.dump()), "label");
    EXPECT_EQ(param_of("POST", fb, json{{"label", ""}, {"reviewer", "x"}}.dump()), "label");
    EXPECT_EQ(param_of("POST", fb, json{{"label", 1}}.dump()), "reviewer");
    EXPECT_EQ(param_of("POST", fb, json{{"label", 1}, {"reviewer", 7}}.dump()), "reviewer");
    EXPECT_EQ(call(port, "POST", fb, "{", "key-one").status, 400);
    EXPECT_EQ(call(port, "GET", "/v1/decisions/dec_" + std::string(28, '0'), "", "key-admin").status, 404);
    EXPECT_EQ(call(port, "DELETE", "/v1/decisions/" + decision, "", "key-admin").status, 405);
    EXPECT_EQ(call(port, "GET", fb, "", "key-admin").status, 405);
  }

  // After a restart on the same file: the same decisions, the same feedback.
  {
    ServeProcess again(args(db), file("log2.log"));
    ASSERT_TRUE(wait_ready(again.port(), 60)) << again.log();
    const Reply r = call(again.port(), "GET", "/v1/decisions/" + decision, "", "key-one");
    ASSERT_EQ(r.status, 200) << r.raw;
    EXPECT_EQ(r.raw, feedback_body);
    EXPECT_EQ(list_all(again.port(), "key-admin").size(), 2u + 2u * static_cast<size_t>(ok));
  }

  // Export: human labels, and the model's with --model-labels; other policies left out.
  const std::string out = file("spam.jsonl");
  auto exported = [&](const std::string& extra) {
    const auto run = testing::run_command(std::string(ARBITER_BINARY) + " export --db " + db + " --policy spam --out " + out + extra);
    EXPECT_EQ(run.status, 0) << run.output;
    std::vector<json> lines;
    std::ifstream in(out);
    for (std::string line; std::getline(in, line);) lines.push_back(json::parse(line));
    return lines;
  };
  std::vector<json> lines = exported("");
  ASSERT_EQ(lines.size(), 1u);
  const json other = first_response["results"][0]["verdict"] == json(1) ? json(0) : json(1);
  EXPECT_EQ(lines[0]["id"], decision);
  EXPECT_EQ(lines[0]["decision_id"], decision);
  EXPECT_EQ(lines[0]["content"], "win a free cruise");
  EXPECT_EQ(lines[0]["label"], other);
  EXPECT_EQ(lines[0]["label_source"], "human");
  EXPECT_EQ(lines[0]["policy_id"], "spam");
  EXPECT_EQ(lines[0]["policy_version"], 1);
  lines = exported(" --model-labels");
  size_t with_verdict = 0;
  // Burst decisions under `spam` whose verdict parsed count as model-labelled lines.
  sqlite3* raw = nullptr;
  sqlite3_open(db.c_str(), &raw);
  sqlite3_stmt* s = nullptr;
  sqlite3_prepare_v2(raw, "SELECT COUNT(*) FROM decisions WHERE policy_id = 'spam' AND verdict_key IS NOT NULL", -1, &s, nullptr);
  if (sqlite3_step(s) == SQLITE_ROW) with_verdict = static_cast<size_t>(sqlite3_column_int(s, 0));
  sqlite3_finalize(s);
  sqlite3_close(raw);
  const bool first_parsed = !first_response["results"][0]["verdict"].is_null();
  EXPECT_EQ(lines.size(), with_verdict + (first_parsed ? 0u : 1u));
  for (const json& l : lines)
    EXPECT_EQ(l["label_source"], l["id"] == decision ? "human" : "model") << l;
  const auto bad = testing::run_command(std::string(ARBITER_BINARY) + " export --db " + file("missing.db") + " --policy spam --out " + out);
  EXPECT_NE(bad.status, 0) << bad.output;
}

TEST_F(Decisions, ContentModesRetentionLockedDbAndNoLog) {
  // Default: the content's hash only; the reasoning kept. none + off: neither.
  const std::string hash_db = file("hash.db"), none_db = file("none.db");
  {
    ServeProcess hashed(args(hash_db), file("hash.log"));
    ServeProcess bare(args(none_db, {"--store-content", "none", "--store-reasoning", "off"}), file("none.log"));
    ASSERT_TRUE(wait_ready(hashed.port(), 60)) << hashed.log();
    ASSERT_TRUE(wait_ready(bare.port(), 60)) << bare.log();
    for (const ServeProcess* s : {&hashed, &bare}) {
      ASSERT_EQ(call(s->port(), "POST", "/v1/policies", json{{"id", "spam"}, {"text", kPolicyTexts[0]}}.dump(), "key-one").status, 201);
      const Reply r = call(s->port(), "POST", "/v1/classify", body("secret text", true).dump(), "key-one");
      ASSERT_EQ(r.status, 200) << r.raw;
      const Reply d = call(s->port(), "GET", "/v1/decisions/" + r.body["results"][0]["decision_id"].get<std::string>(), "", "key-one");
      ASSERT_EQ(d.status, 200) << d.raw;
      EXPECT_FALSE(d.body.contains("content")) << d.raw;
      EXPECT_EQ(d.raw.find("secret text"), std::string::npos) << d.raw;
      if (s == &hashed) {
        EXPECT_EQ(d.body["content_sha256"], arbiter::sha256_hex("secret text"));
        EXPECT_EQ(d.body["reasoning"], r.body["results"][0]["reasoning"]);
      } else {
        EXPECT_FALSE(d.body.contains("content_sha256")) << d.raw;
        EXPECT_FALSE(d.body.contains("reasoning")) << d.raw;
      }
    }
  }

  // Retention: rows aged through SQLite go at start, and while running at each sweep; nothing else.
  const std::string db = file("retention.db");
  std::vector<std::string> ids;
  {
    ServeProcess server(args(db), file("ret1.log"));
    ASSERT_TRUE(wait_ready(server.port(), 60)) << server.log();
    for (int i = 0; i < 4; ++i) {
      const Reply r = call(server.port(), "POST", "/v1/classify",
                           json{{"content", "c" + std::to_string(i)}, {"policies", {{{"text", "Answer 0 or 1."}}}}, {"max_tokens", 1}}.dump(),
                           "key-one");
      ASSERT_EQ(r.status, 200) << r.raw;
      ids.push_back(r.body["results"][0]["decision_id"]);
    }
  }
  const int64_t day_ms = 86400000;
  ASSERT_EQ(sql(db, "UPDATE decisions SET created_ms = created_ms - 3 * " + std::to_string(day_ms) + " WHERE id = '" + ids[0] + "'"), "");
  ASSERT_EQ(sql(db, "UPDATE decisions SET created_ms = created_ms - " + std::to_string(day_ms / 2) + " WHERE id = '" + ids[1] + "'"), "");
  {
    ServeProcess server(args(db, {"--retention-days", "1", "--retention-interval", "0.2"}), file("ret2.log"));
    const int port = server.port();
    ASSERT_TRUE(wait_ready(port, 60)) << server.log();
    EXPECT_EQ(call(port, "GET", "/v1/decisions/" + ids[0], "", "key-one").status, 404);  // 3 days old: gone at start
    EXPECT_EQ(call(port, "GET", "/v1/decisions/" + ids[1], "", "key-one").status, 200);  // half a day: kept
    ASSERT_EQ(sql(db, "UPDATE decisions SET created_ms = created_ms - 2 * " + std::to_string(day_ms) + " WHERE id = '" + ids[2] + "'"), "");
    const auto until = Clock::now() + std::chrono::seconds(20);
    while (call(port, "GET", "/v1/decisions/" + ids[2], "", "key-one").status == 200 && Clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_EQ(call(port, "GET", "/v1/decisions/" + ids[2], "", "key-one").status, 404);  // aged while running
    EXPECT_EQ(call(port, "GET", "/v1/decisions/" + ids[1], "", "key-one").status, 200);
    EXPECT_EQ(call(port, "GET", "/v1/decisions/" + ids[3], "", "key-one").status, 200);
    EXPECT_EQ(metric(port, "arbiter_decisions_expired_total"), 2);  // ids[0] at start, ids[2] later

    // The database is locked by someone else past the writer's patience: 503, and nothing stored.
    const int64_t before = list_all(port, "key-admin").size();
    sqlite3* lock = nullptr;
    ASSERT_EQ(sqlite3_open(db.c_str(), &lock), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(lock, "BEGIN EXCLUSIVE", nullptr, nullptr, nullptr), SQLITE_OK);
    const Reply r = call(port, "POST", "/v1/classify",
                         json{{"content", "while locked"}, {"policies", {{{"text", "Answer 0 or 1."}}}}, {"max_tokens", 1}}.dump(), "key-one");
    sqlite3_exec(lock, "ROLLBACK", nullptr, nullptr, nullptr);
    sqlite3_close(lock);
    EXPECT_EQ(r.status, 503) << r.raw;
    EXPECT_EQ(r.body["error"]["code"], "decision_log_unavailable") << r.raw;
    EXPECT_EQ(r.retry_after, "1");
    EXPECT_EQ(static_cast<int64_t>(list_all(port, "key-admin").size()), before);
    EXPECT_EQ(call(port, "POST", "/v1/classify",
                   json{{"content", "unlocked"}, {"policies", {{{"text", "Answer 0 or 1."}}}}, {"max_tokens", 1}}.dump(), "key-one").status,
              200);
    EXPECT_EQ(static_cast<int64_t>(list_all(port, "key-admin").size()), before + 1);
  }

  // Without a database: no decision ids, the endpoints say the log is off; its options are refused.
  {
    ServeProcess plain(args(""), file("plain.log"));
    ASSERT_TRUE(wait_ready(plain.port(), 60)) << plain.log();
    const Reply r = call(plain.port(), "POST", "/v1/classify",
                         json{{"content", "x"}, {"policies", {{{"text", "Answer 0 or 1."}}}}, {"max_tokens", 1}}.dump(), "key-one");
    ASSERT_EQ(r.status, 200) << r.raw;
    EXPECT_FALSE(r.body["results"][0].contains("decision_id"));
    const Reply d = call(plain.port(), "GET", "/v1/decisions", "", "key-one");
    EXPECT_EQ(d.status, 404);
    EXPECT_EQ(d.body["error"]["code"], "decision_log_disabled");
  }
  const auto refused = testing::run_command(std::string(ARBITER_BINARY) + " serve --model " + model_dir() + " --store-content full");
  EXPECT_EQ(refused.status, 2) << refused.output;
  EXPECT_NE(refused.output.find("--store-content needs a decision log"), std::string::npos) << refused.output;
}

}  // namespace
}  // namespace arbiter
