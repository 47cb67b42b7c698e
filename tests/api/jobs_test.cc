// Durable jobs end to end, against `arbiter serve` on a tiny random model (docs/jobs.md): JSON and
// JSONL (OpenAI batch lines) jobs run to completion with every custom_id exactly once in the
// results; an item that fails when run keeps its error as its result; a job with bad items is
// refused whole, every bad line listed by number, nothing stored; the item limit; idempotency keys
// (same job, 200; other items, 409; per API key); key scoping (404 for another key's job, an admin
// sees all); cancellation (no result is stored after it); SIGTERM mid-job and a restart; kill -9 at
// three points of a job and restarts on the same database: every item ends with exactly one result;
// a webhook delivered to a loopback receiver, signed (HMAC-SHA256, checked here) and retried after a
// 500, and one not delivered before a crash sent after the restart; https webhooks delivered only to
// a receiver whose certificate the server trusts; item webhooks (one signed POST per result);
// retention (finished jobs deleted, unless a webhook of theirs is pending);
// webhook URLs outside the allow-list refused. Built twice: against SQLite files, and (api_jobs_pg_test, label postgres,
// ARBITER_JOBS_ON_POSTGRES) against PostgreSQL databases, one per server, as replicas would use.
#include <gtest/gtest.h>
#include <httplib.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sqlite3.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/api/serve_process.h"
#include "tests/api/tls_test_cert.h"
#include "tests/test_util.h"
#ifdef ARBITER_JOBS_ON_POSTGRES
#include "tests/api/pg_test_db.h"
#endif

namespace arbiter {
namespace {

// A POST with any content type (call() sends application/json).
Reply post(int port, const std::string& path, const std::string& body, const std::string& content_type, const std::string& key) {
  httplib::Client client("127.0.0.1", port);
  client.set_read_timeout(120, 0);
  httplib::Headers headers{{"Authorization", "Bearer " + key}};
  Reply out;
  httplib::Result r = client.Post(path.c_str(), headers, body, content_type.c_str());
  if (!r) {
    out.raw = "no response";
    return out;
  }
  out.status = r->status;
  out.raw = r->body;
  out.body = json::parse(r->body, nullptr, false);
  return out;
}

json classify_body(const std::string& content) {
  return {{"content", content},
          {"policies", {{{"id", "inline"}, {"text", kPolicyTexts[0]}}}},
          {"reasoning_effort", "low"},
          {"max_tokens", 3},
          {"return_reasoning", false}};
}

std::string item_id(const std::string& prefix, int i) { return prefix + "-" + std::to_string(i); }

json json_job(const std::string& prefix, int n) {
  json items = json::array();
  for (int i = 0; i < n; ++i) items.push_back({{"custom_id", item_id(prefix, i)}, {"body", classify_body("message " + std::to_string(i))}});
  return {{"items", items}};
}

std::string jsonl_job(const std::string& prefix, int n) {
  std::string out;
  for (int i = 0; i < n; ++i)
    out += json({{"custom_id", item_id(prefix, i)}, {"method", "POST"}, {"url", "/v1/classify"},
                 {"body", classify_body("line " + std::to_string(i))}})
               .dump() +
           "\n";
  return out;
}

// The job once finished (polls); its last state when `seconds` pass first.
json wait_job(int port, const std::string& id, const std::string& key, double seconds = 120) {
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  json job;
  while (Clock::now() < until) {
    const Reply r = call(port, "GET", "/v1/jobs/" + id, "", key);
    if (r.status != 200) return r.body;
    job = r.body;
    const std::string state = job["state"];
    if (state == "completed" || state == "failed" || state == "cancelled") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return job;
}

// The result lines of a job.
std::vector<json> results(int port, const std::string& id, const std::string& key) {
  const Reply r = call(port, "GET", "/v1/jobs/" + id + "/results", "", key);
  EXPECT_EQ(r.status, 200) << r.raw;
  std::vector<json> out;
  std::istringstream in(r.raw);
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    out.push_back(json::parse(line, nullptr, false));
    EXPECT_FALSE(out.back().is_discarded()) << line;
  }
  return out;
}

// Every custom_id prefix-0..n-1 exactly once, each a 200 classify response.
void expect_each_once(const std::vector<json>& lines, const std::string& prefix, int n) {
  std::map<std::string, int> seen;
  for (const json& l : lines) {
    ++seen[l["custom_id"].get<std::string>()];
    EXPECT_EQ(l["response"]["status_code"], 200) << l.dump();
    EXPECT_EQ(l["response"]["body"]["results"].size(), 1u) << l.dump();
    EXPECT_TRUE(l["error"].is_null()) << l.dump();
  }
  EXPECT_EQ(lines.size(), static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) EXPECT_EQ(seen[item_id(prefix, i)], 1) << item_id(prefix, i);
}

std::string hmac_hex(const std::string& key, const std::string& body) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(body.data()), body.size(), mac, &length);
  std::string out;
  char buf[3];
  for (unsigned int i = 0; i < length; ++i) {
    std::snprintf(buf, sizeof(buf), "%02x", mac[i]);
    out += buf;
  }
  return out;
}

// A loopback webhook receiver: answers 500 to the first delivery, 200 after; keeps what came.
class Receiver {
 public:
  // port 0: any free port; `server`: plain HTTP by default, or an httplib::SSLServer.
  explicit Receiver(int port = 0, std::unique_ptr<httplib::Server> server = std::make_unique<httplib::Server>()) : server_(std::move(server)) {
    server_->Post("/hook/.*", [this](const httplib::Request& req, httplib::Response& res) {
      std::lock_guard<std::mutex> lock(mutex_);
      bodies_.push_back(req.body);
      signatures_.push_back(req.get_header_value("X-Arbiter-Signature"));
      paths_.push_back(req.path);
      res.status = bodies_.size() == 1 ? 500 : 200;
    });
    port_ = port > 0 ? (server_->bind_to_port("127.0.0.1", port) ? port : -1) : server_->bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_->listen_after_bind(); });
    // Listening before anything can stop it (a stop() before the loop starts is lost).
    while (port_ > 0 && !server_->is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ~Receiver() {
    server_->stop();
    thread_.join();
  }
  int port() const { return port_; }
  size_t count() {
    std::lock_guard<std::mutex> lock(mutex_);
    return bodies_.size();
  }
  std::vector<std::string> bodies, signatures, paths;
  void snapshot() {
    std::lock_guard<std::mutex> lock(mutex_);
    bodies = bodies_;
    signatures = signatures_;
    paths = paths_;
  }

 private:
  std::unique_ptr<httplib::Server> server_;
  int port_ = 0;
  std::thread thread_;
  std::mutex mutex_;
  std::vector<std::string> bodies_, signatures_, paths_;
};

constexpr const char* kSecret = "webhook-secret-for-tests";

#ifdef ARBITER_JOBS_ON_POSTGRES
// The databases made for the suite, dropped at its end.
std::vector<std::unique_ptr<testing::PgTestDatabase>>& databases() {
  static std::vector<std::unique_ptr<testing::PgTestDatabase>> all;
  return all;
}
#endif

// A new, empty database for a server: an SQLite file named `name`, or a PostgreSQL database.
std::string new_db(testing::TempDir& tmp, const std::string& name) {
#ifdef ARBITER_JOBS_ON_POSTGRES
  (void)tmp;
  (void)name;
  databases().push_back(std::make_unique<testing::PgTestDatabase>());
  return databases().back()->url();
#else
  return tmp.file(name);
#endif
}

// The first value of `query` in the database `db` ("" for no rows).
std::string sql_value(const std::string& db, const std::string& query) {
#ifdef ARBITER_JOBS_ON_POSTGRES
  return testing::PgTestDatabase::run(db, query);
#else
  sqlite3* raw = nullptr;
  sqlite3_open(db.c_str(), &raw);
  sqlite3_stmt* s = nullptr;
  std::string out;
  if (sqlite3_prepare_v2(raw, query.c_str(), -1, &s, nullptr) == SQLITE_OK && sqlite3_step(s) == SQLITE_ROW)
    out = reinterpret_cast<const char*>(sqlite3_column_text(s, 0));
  sqlite3_finalize(s);
  sqlite3_close(raw);
  return out;
#endif
}

class Jobs : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
#ifdef ARBITER_JOBS_ON_POSTGRES
    if (!std::getenv("ARBITER_TEST_PG") || !*std::getenv("ARBITER_TEST_PG")) return;
#endif
    tmp_ = std::make_unique<testing::TempDir>();
    ASSERT_EQ(make_tiny_model(tmp_->file("model"), 7), "");
    std::ofstream(tmp_->file("keys")) << "key-one\nkey-two\nadmin:key-admin\n";
    std::ofstream(tmp_->file("secret")) << kSecret << "\n";
    receiver_ = std::make_unique<Receiver>();
    server_ = std::make_unique<ServeProcess>(
        args(new_db(*tmp_, "shared.db"), {"--max-job-items", "300", "--webhook-allow",
                                       "http://127.0.0.1:" + std::to_string(receiver_->port()) + "/hook/",
                                       "--webhook-secret-file", tmp_->file("secret")}),
        tmp_->file("shared.log"));
    ASSERT_TRUE(wait_ready(server_->port(), 60)) << server_->log();
  }
  static void TearDownTestSuite() {
    server_.reset();
    receiver_.reset();
#ifdef ARBITER_JOBS_ON_POSTGRES
    databases().clear();
#endif
    tmp_.reset();
  }
#ifdef ARBITER_JOBS_ON_POSTGRES
  void SetUp() override { ARBITER_REQUIRE_PG(); }
#endif
  static std::vector<std::string> args(const std::string& db, std::vector<std::string> more = {}) {
    std::vector<std::string> a = {"--model", tmp_->file("model"), "--port", "0", "--device", "cpu", "--api-key-file", tmp_->file("keys"),
                                  "--warm-efforts", "none", "--reasoning-budget", "4,4,8", "--answer-tokens", "16", "--db", db,
                                  "--job-concurrency", "4"};
#ifdef ARBITER_JOBS_ON_POSTGRES
    // A restarted server is another replica: what the killed one leased is free after 2 s.
    a.insert(a.end(), {"--job-lease-seconds", "2"});
#endif
    a.insert(a.end(), more.begin(), more.end());
    return a;
  }
  static int port() { return server_->port(); }

  static std::unique_ptr<testing::TempDir> tmp_;
  static std::unique_ptr<Receiver> receiver_;
  static std::unique_ptr<ServeProcess> server_;
};
std::unique_ptr<testing::TempDir> Jobs::tmp_;
std::unique_ptr<Receiver> Jobs::receiver_;
std::unique_ptr<ServeProcess> Jobs::server_;

TEST_F(Jobs, JsonAndJsonlJobsRunToCompletion) {
  const Reply a = call(port(), "POST", "/v1/jobs", json_job("json", 12).dump(), "key-one");
  ASSERT_EQ(a.status, 201) << a.raw;
  EXPECT_EQ(a.body["object"], "job");
  EXPECT_EQ(a.body["counts"]["total"], 12);
  const Reply b = post(port(), "/v1/jobs", jsonl_job("jsonl", 10), "application/jsonl", "key-one");
  ASSERT_EQ(b.status, 201) << b.raw;
  const Reply c = post(port(), "/v1/jobs", jsonl_job("ndjson", 3), "application/x-ndjson; charset=utf-8", "key-one");
  ASSERT_EQ(c.status, 201) << c.raw;

  for (const auto& [reply, prefix, n] : {std::tuple{a, "json", 12}, std::tuple{b, "jsonl", 10}, std::tuple{c, "ndjson", 3}}) {
    const json job = wait_job(port(), reply.body["id"], "key-one");
    EXPECT_EQ(job["state"], "completed") << job.dump();
    EXPECT_EQ(job["counts"]["completed"], n);
    EXPECT_EQ(job["counts"]["failed"], 0);
    EXPECT_EQ(job["progress"], 1.0);
    EXPECT_TRUE(job["finished_at"].is_number());
    EXPECT_GE(job["finished_at"].get<int64_t>(), job["created_at"].get<int64_t>());
    expect_each_once(results(port(), reply.body["id"], "key-one"), prefix, n);
  }
  // The key's jobs, newest first.
  const Reply list = call(port(), "GET", "/v1/jobs?limit=100", "", "key-one");
  ASSERT_EQ(list.status, 200) << list.raw;
  std::vector<std::string> ids;
  for (const json& j : list.body["data"]) ids.push_back(j["id"]);
  const auto pos = [&](const json& id) { return std::find(ids.begin(), ids.end(), id.get<std::string>()) - ids.begin(); };
  ASSERT_LT(pos(c.body["id"]), static_cast<long>(ids.size()));
  EXPECT_LT(pos(c.body["id"]), pos(b.body["id"]));
  EXPECT_LT(pos(b.body["id"]), pos(a.body["id"]));
  EXPECT_LT(pos(a.body["id"]), static_cast<long>(ids.size()));
  // Pages of one.
  const Reply page = call(port(), "GET", "/v1/jobs?limit=1&after=" + c.body["id"].get<std::string>(), "", "key-one");
  ASSERT_EQ(page.status, 200) << page.raw;
  ASSERT_EQ(page.body["data"].size(), 1u);
  EXPECT_EQ(page.body["data"][0]["id"], b.body["id"]);
  EXPECT_TRUE(page.body["has_more"].get<bool>());
}

// Chat completions as job items, beside classify items, in both forms: each result is the chat
// completion POST /v1/chat/completions would answer.
TEST_F(Jobs, ChatCompletionItemsRunBesideClassifyItems) {
  const json chat_body = {{"messages", {{{"role", "system"}, {"content", kPolicyTexts[0]}}, {{"role", "user"}, {"content", "buy now"}}}},
                          {"reasoning_effort", "low"},
                          {"max_completion_tokens", 4}};
  json items = json_job("mixed", 2)["items"];
  items.push_back({{"custom_id", "chat-json"}, {"url", "/v1/chat/completions"}, {"body", chat_body}});
  const Reply a = call(port(), "POST", "/v1/jobs", json({{"items", items}}).dump(), "key-one");
  ASSERT_EQ(a.status, 201) << a.raw;
  const std::string lines = jsonl_job("mixedl", 1) +
                            json({{"custom_id", "chat-line"}, {"method", "POST"}, {"url", "/v1/chat/completions"}, {"body", chat_body}}).dump() +
                            "\n";
  const Reply b = post(port(), "/v1/jobs", lines, "application/jsonl", "key-one");
  ASSERT_EQ(b.status, 201) << b.raw;
  for (const auto& [reply, chat_id, total] : {std::tuple{a, "chat-json", 3}, std::tuple{b, "chat-line", 2}}) {
    const json job = wait_job(port(), reply.body["id"], "key-one");
    EXPECT_EQ(job["state"], "completed") << job.dump();
    EXPECT_EQ(job["counts"]["completed"], total) << job.dump();
    int chats = 0;
    for (const json& line : results(port(), reply.body["id"], "key-one")) {
      const json& response = line["response"];
      if (line["custom_id"] == chat_id) {
        ++chats;
        EXPECT_EQ(response["status_code"], 200) << line.dump();
        EXPECT_EQ(response["body"]["object"], "chat.completion") << line.dump();
        EXPECT_EQ(response["body"]["choices"].size(), 1u) << line.dump();
        EXPECT_LE(response["body"]["usage"]["completion_tokens"].get<int>(), 4) << line.dump();
      } else {
        EXPECT_EQ(response["body"]["results"].size(), 1u) << line.dump();  // a classify response
      }
    }
    EXPECT_EQ(chats, 1);
  }
}

TEST_F(Jobs, ResultsOfMoreItemsThanOnePageStreamEachOnce) {
  // The results are streamed 256 items a page: 300 items cross a page boundary.
  const Reply r = post(port(), "/v1/jobs?idempotency_key=pages", jsonl_job("page", 300), "application/x-ndjson", "key-one");
  ASSERT_EQ(r.status, 201) << r.raw;
  EXPECT_EQ(r.body["idempotency_key"], "pages");
  EXPECT_EQ(wait_job(port(), r.body["id"], "key-one")["state"], "completed");
  const std::vector<json> lines = results(port(), r.body["id"], "key-one");
  expect_each_once(lines, "page", 300);
  for (size_t i = 0; i < lines.size(); ++i) EXPECT_EQ(lines[i]["custom_id"], item_id("page", static_cast<int>(i)));  // in order
}

TEST_F(Jobs, AnItemThatFailsWhenRunHasItsErrorAsItsResult) {
  // Content that passes the up-front checks but does not fit the context when its prompt is built.
  std::string long_content;
  for (int i = 0; i < 12000; ++i) long_content += "w" + std::to_string(i) + " ";
  json mixed = {{"items", {{{"custom_id", "fits"}, {"body", classify_body("short")}},
                           {{"custom_id", "too-long"}, {"body", classify_body(long_content)}}}}};
  const Reply a = call(port(), "POST", "/v1/jobs", mixed.dump(), "key-one");
  ASSERT_EQ(a.status, 201) << a.raw;
  const json job = wait_job(port(), a.body["id"], "key-one");
  EXPECT_EQ(job["state"], "completed") << job.dump();
  EXPECT_EQ(job["counts"]["completed"], 1);
  EXPECT_EQ(job["counts"]["failed"], 1);
  const std::vector<json> lines = results(port(), a.body["id"], "key-one");
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0]["custom_id"], "fits");
  EXPECT_EQ(lines[0]["response"]["status_code"], 200);
  EXPECT_EQ(lines[1]["custom_id"], "too-long");
  EXPECT_EQ(lines[1]["response"]["status_code"], 400);
  EXPECT_EQ(lines[1]["error"]["code"], "context_length_exceeded") << lines[1].dump();
  EXPECT_EQ(lines[1]["response"]["body"]["error"]["code"], "context_length_exceeded");
  // Every item failed: the job failed.
  json only_bad = {{"items", {{{"custom_id", "too-long"}, {"body", classify_body(long_content)}}}}};
  const Reply b = call(port(), "POST", "/v1/jobs", only_bad.dump(), "key-one");
  ASSERT_EQ(b.status, 201) << b.raw;
  EXPECT_EQ(wait_job(port(), b.body["id"], "key-one")["state"], "failed");
}

TEST_F(Jobs, BadItemsRefuseTheWholeJobWithEveryLineNumbered) {
  json bad_body = classify_body("x");
  bad_body.erase("policies");
  std::string lines;
  lines += json({{"custom_id", "ok-1"}, {"method", "POST"}, {"url", "/v1/classify"}, {"body", classify_body("fine")}}).dump() + "\n";
  lines += "{not json\n";                                                                                     // 2
  lines += json({{"method", "POST"}, {"url", "/v1/classify"}, {"body", classify_body("y")}}).dump() + "\n";   // 3: no custom_id
  lines += "\n";                                                                                              // 4: blank, skipped
  lines += json({{"custom_id", "u"}, {"method", "POST"}, {"url", "/v1/embeddings"}, {"body", classify_body("y")}}).dump() + "\n";  // 5
  lines += json({{"custom_id", "p"}, {"method", "POST"}, {"url", "/v1/classify"}, {"body", bad_body}}).dump() + "\n";              // 6
  lines += json({{"custom_id", "ok-1"}, {"method", "POST"}, {"url", "/v1/classify"}, {"body", classify_body("z")}}).dump() + "\n";  // 7
  lines += json({{"custom_id", "c"}, {"method", "POST"}, {"url", "/v1/chat/completions"}, {"body", {{"messages", json::array()}}}}).dump() +
           "\n";  // 8
  lines += json({{"custom_id", "ok-2"}, {"method", "POST"}, {"url", "/v1/classify"}, {"body", classify_body("fine")}}).dump() + "\n";  // 9
  lines += json({{"custom_id", "s"}, {"method", "POST"}, {"url", "/v1/chat/completions"},
                 {"body", {{"stream", true}, {"messages", {{{"role", "user"}, {"content", "hi"}}}}}}}).dump() + "\n";  // 10
  const Reply r = post(port(), "/v1/jobs", lines, "application/jsonl", "key-two");
  ASSERT_EQ(r.status, 400) << r.raw;
  EXPECT_EQ(r.body["error"]["code"], "invalid_items");
  std::vector<int> numbers;
  std::map<int, json> by_line;
  for (const json& e : r.body["error"]["errors"]) {
    numbers.push_back(e["line"]);
    by_line[e["line"]] = e;
  }
  EXPECT_EQ(numbers, (std::vector<int>{2, 3, 5, 6, 7, 8, 10})) << r.raw;
  EXPECT_EQ(by_line[2]["code"], "invalid_json");
  EXPECT_EQ(by_line[3]["param"], "custom_id");
  EXPECT_EQ(by_line[5]["param"], "url");
  EXPECT_EQ(by_line[6]["param"].get<std::string>().rfind("body", 0), 0u) << by_line[6].dump();
  EXPECT_EQ(by_line[6]["custom_id"], "p");
  EXPECT_EQ(by_line[7]["code"], "duplicate_custom_id");
  EXPECT_EQ(by_line[8]["param"].get<std::string>().rfind("body", 0), 0u) << by_line[8].dump();  // a chat with no messages
  EXPECT_EQ(by_line[10]["param"], "body.stream");

  // JSON items are numbered from 1 likewise.
  json job = json_job("j", 3);
  job["items"][1]["body"]["reasoning_effort"] = "extreme";
  const Reply j = call(port(), "POST", "/v1/jobs", job.dump(), "key-two");
  ASSERT_EQ(j.status, 400) << j.raw;
  ASSERT_EQ(j.body["error"]["errors"].size(), 1u);
  EXPECT_EQ(j.body["error"]["errors"][0]["line"], 2);
  EXPECT_EQ(j.body["error"]["errors"][0]["custom_id"], "j-1");
  // Envelope problems, and the item limit (--max-job-items 300).
  EXPECT_EQ(call(port(), "POST", "/v1/jobs", "[]", "key-two").status, 400);
  EXPECT_EQ(call(port(), "POST", "/v1/jobs", R"({"items": []})", "key-two").body["error"]["code"], "no_items");
  const Reply many = post(port(), "/v1/jobs", jsonl_job("many", 301), "application/jsonl", "key-two");
  EXPECT_EQ(many.status, 400);
  EXPECT_EQ(many.body["error"]["code"], "too_many_items") << many.raw;
  EXPECT_EQ(call(port(), "POST", "/v1/jobs", json_job("many", 301).dump(), "key-two").body["error"]["code"], "too_many_items");
  // Nothing was stored for key-two.
  const Reply list = call(port(), "GET", "/v1/jobs", "", "key-two");
  ASSERT_EQ(list.status, 200) << list.raw;
  EXPECT_TRUE(list.body["data"].empty()) << list.raw;
  // Unknown paths, methods, parameters.
  EXPECT_EQ(call(port(), "GET", "/v1/jobs/job_nope", "", "key-two").status, 404);
  EXPECT_EQ(call(port(), "DELETE", "/v1/jobs/job_nope", "", "key-two").status, 405);
  EXPECT_EQ(call(port(), "GET", "/v1/jobs?limit=0", "", "key-two").status, 400);
  EXPECT_EQ(call(port(), "GET", "/v1/jobs?color=red", "", "key-two").body["error"]["param"], "color");
  EXPECT_EQ(call(port(), "GET", "/v1/jobs", "", "").status, 401);
}

TEST_F(Jobs, IdempotencyKeysReturnTheSameJobPerApiKey) {
  json job = json_job("idem", 2);
  job["idempotency_key"] = "nightly-42";
  const Reply first = call(port(), "POST", "/v1/jobs", job.dump(), "key-one");
  ASSERT_EQ(first.status, 201) << first.raw;
  const Reply again = call(port(), "POST", "/v1/jobs", job.dump(), "key-one");
  ASSERT_EQ(again.status, 200) << again.raw;
  EXPECT_EQ(again.body["id"], first.body["id"]);
  // The same key with other items: a conflict, not a silent reuse.
  json other = json_job("other", 2);
  other["idempotency_key"] = "nightly-42";
  const Reply conflict = call(port(), "POST", "/v1/jobs", other.dump(), "key-one");
  EXPECT_EQ(conflict.status, 409) << conflict.raw;
  EXPECT_EQ(conflict.body["error"]["code"], "idempotency_key_reused");
  // Another API key has its own idempotency keys.
  const Reply theirs = call(port(), "POST", "/v1/jobs", job.dump(), "key-two");
  ASSERT_EQ(theirs.status, 201) << theirs.raw;
  EXPECT_NE(theirs.body["id"], first.body["id"]);
  // JSONL: the key as a header.
  httplib::Client client("127.0.0.1", port());
  httplib::Headers headers{{"Authorization", "Bearer key-one"}, {"Idempotency-Key", "jsonl-7"}};
  const std::string body = jsonl_job("idl", 2);
  const auto r1 = client.Post("/v1/jobs", headers, body, "application/jsonl");
  const auto r2 = client.Post("/v1/jobs", headers, body, "application/jsonl");
  ASSERT_TRUE(r1 && r2);
  EXPECT_EQ(r1->status, 201);
  EXPECT_EQ(r2->status, 200);
  EXPECT_EQ(json::parse(r1->body)["id"], json::parse(r2->body)["id"]);
  EXPECT_EQ(wait_job(port(), first.body["id"], "key-one")["state"], "completed");
}

TEST_F(Jobs, KeysSeeOnlyTheirOwnJobsUnlessAdmin) {
  const Reply mine = call(port(), "POST", "/v1/jobs", json_job("scope", 2).dump(), "key-one");
  ASSERT_EQ(mine.status, 201) << mine.raw;
  const std::string id = mine.body["id"];
  EXPECT_EQ(call(port(), "GET", "/v1/jobs/" + id, "", "key-two").status, 404);
  EXPECT_EQ(call(port(), "GET", "/v1/jobs/" + id + "/results", "", "key-two").status, 404);
  EXPECT_EQ(call(port(), "POST", "/v1/jobs/" + id + "/cancel", "", "key-two").status, 404);
  EXPECT_EQ(call(port(), "GET", "/v1/jobs?after=" + id, "", "key-two").status, 400);
  const Reply theirs = call(port(), "GET", "/v1/jobs?limit=100", "", "key-two");
  for (const json& j : theirs.body["data"]) EXPECT_NE(j["id"], id);
  EXPECT_EQ(call(port(), "GET", "/v1/jobs/" + id, "", "key-admin").status, 200);
  bool listed = false;
  const Reply all = call(port(), "GET", "/v1/jobs?limit=100", "", "key-admin");
  for (const json& j : all.body["data"]) listed |= j["id"] == id;
  EXPECT_TRUE(listed);
  EXPECT_EQ(wait_job(port(), id, "key-admin")["state"], "completed");
  EXPECT_EQ(results(port(), id, "key-admin").size(), 2u);
}

TEST_F(Jobs, CancelStopsAJobAndNoResultComesAfterIt) {
  const Reply r = call(port(), "POST", "/v1/jobs", json_job("cancel", 60).dump(), "key-one");
  ASSERT_EQ(r.status, 201) << r.raw;
  const std::string id = r.body["id"];
  const Reply c = call(port(), "POST", "/v1/jobs/" + id + "/cancel", "", "key-one");
  ASSERT_EQ(c.status, 200) << c.raw;
  EXPECT_EQ(c.body["state"], "cancelled");
  EXPECT_TRUE(c.body["finished_at"].is_number());
  EXPECT_EQ(call(port(), "POST", "/v1/jobs/" + id + "/cancel", "", "key-one").status, 409);
  const std::vector<json> before = results(port(), id, "key-one");
  EXPECT_LT(before.size(), 60u);
  // Another job runs to its end behind it: the runner has moved on, and nothing was added.
  const Reply next = call(port(), "POST", "/v1/jobs", json_job("after-cancel", 5).dump(), "key-one");
  ASSERT_EQ(next.status, 201);
  EXPECT_EQ(wait_job(port(), next.body["id"], "key-one")["state"], "completed");
  const std::vector<json> after = results(port(), id, "key-one");
  EXPECT_EQ(after.size(), before.size());
  const json job = call(port(), "GET", "/v1/jobs/" + id, "", "key-one").body;
  EXPECT_EQ(job["state"], "cancelled");
  EXPECT_EQ(job["counts"]["completed"].get<size_t>(), before.size());
}

TEST_F(Jobs, WebhookIsSignedAndRetried) {
  json job = json_job("hook", 3);
  const std::string url = "http://127.0.0.1:" + std::to_string(receiver_->port()) + "/hook/done";
  job["webhook_url"] = url;
  const Reply r = call(port(), "POST", "/v1/jobs", job.dump(), "key-one");
  ASSERT_EQ(r.status, 201) << r.raw;
  EXPECT_EQ(r.body["webhook_url"], url);
  const std::string id = r.body["id"];
  EXPECT_EQ(wait_job(port(), id, "key-one")["state"], "completed");
  // The first delivery is answered 500, the second (after the backoff) 200.
  const auto until = Clock::now() + std::chrono::seconds(30);
  while (receiver_->count() < 2 && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  json seen;
  for (int i = 0; i < 200; ++i) {
    seen = call(port(), "GET", "/v1/jobs/" + id, "", "key-one").body;
    if (seen["webhook"]["state"] != "pending") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  receiver_->snapshot();
  ASSERT_EQ(receiver_->bodies.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(receiver_->paths[i], "/hook/done");
    EXPECT_EQ(receiver_->signatures[i], "sha256=" + hmac_hex(kSecret, receiver_->bodies[i]));
    EXPECT_NE(receiver_->signatures[i], "sha256=" + hmac_hex("another key", receiver_->bodies[i]));
    const json body = json::parse(receiver_->bodies[i]);
    EXPECT_EQ(body["id"], id);
    EXPECT_EQ(body["state"], "completed");
    EXPECT_EQ(body["counts"]["total"], 3);
    EXPECT_EQ(body["counts"]["completed"], 3);
  }
  EXPECT_EQ(seen["webhook"]["state"], "delivered") << seen.dump();
  EXPECT_EQ(seen["webhook"]["attempts"], 2);
  EXPECT_EQ(metric(port(), "arbiter_job_webhooks_total{outcome=\"retried\"}"), 1);
  EXPECT_EQ(metric(port(), "arbiter_job_webhooks_total{outcome=\"delivered\"}"), 1);

  // Outside the allow-list (another port, scheme or host): refused, nothing stored.
  for (const std::string& bad : std::vector<std::string>{"http://127.0.0.1:1/hook/x", "https://127.0.0.1:" + std::to_string(receiver_->port()) + "/hook/x",
                                "http://example.com/hook/"}) {
    job["webhook_url"] = bad;
    const Reply refused = call(port(), "POST", "/v1/jobs", job.dump(), "key-two");
    EXPECT_EQ(refused.status, 400) << bad;
    EXPECT_EQ(refused.body["error"]["param"], "webhook_url") << refused.raw;
  }
}


TEST_F(Jobs, SigtermLeavesUnfinishedItemsForTheNextStart) {
  const std::string db = new_db(*tmp_, "term.db");
  std::string id;
  {
    ServeProcess server(args(db), tmp_->file("term0.log"));
    ASSERT_TRUE(wait_ready(server.port(), 60)) << server.log();
    const Reply r = call(server.port(), "POST", "/v1/jobs", json_job("term", 40).dump(), "key-one");
    ASSERT_EQ(r.status, 201) << r.raw;
    id = r.body["id"];
    kill(server.server_pid(), SIGTERM);
    EXPECT_EQ(server.wait_exit(60), 0) << server.log();
  }
  EXPECT_EQ(sql_value(db, "SELECT count(*) FROM job_items WHERE state = 1"),
            sql_value(db, "SELECT completed + failed FROM jobs WHERE id = '" + id + "'"));
  ServeProcess server(args(db), tmp_->file("term1.log"));
  ASSERT_TRUE(wait_ready(server.port(), 60)) << server.log();
  EXPECT_EQ(wait_job(server.port(), id, "key-one")["state"], "completed");
  expect_each_once(results(server.port(), id, "key-one"), "term", 40);
}

TEST_F(Jobs, ItemWebhooksPostEveryResultOnceSigned) {
  Receiver receiver;  // answers the first delivery 500: that one is tried again
  const std::string prefix = "http://127.0.0.1:" + std::to_string(receiver.port()) + "/hook/";
  ServeProcess server(args(new_db(*tmp_, "items.db"), {"--webhook-allow", prefix, "--webhook-secret-file", tmp_->file("secret")}),
                      tmp_->file("items.log"));
  ASSERT_TRUE(wait_ready(server.port(), 60)) << server.log();
  json job = json_job("each", 6);
  job["webhook_items"] = true;  // without a webhook_url
  Reply r = call(server.port(), "POST", "/v1/jobs", job.dump(), "key-one");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.body["error"]["param"], "webhook_items") << r.raw;
  job["webhook_url"] = prefix + "json";
  job["webhook_items"] = "yes";
  r = call(server.port(), "POST", "/v1/jobs", job.dump(), "key-one");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.body["error"]["code"], "invalid_type") << r.raw;
  r = post(server.port(), "/v1/jobs?webhook_url=" + prefix + "jsonl&webhook_items=1", jsonl_job("eachl", 4), "application/jsonl", "key-one");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.body["error"]["param"], "webhook_items") << r.raw;

  job["webhook_items"] = true;
  r = call(server.port(), "POST", "/v1/jobs", job.dump(), "key-one");
  ASSERT_EQ(r.status, 201) << r.raw;
  EXPECT_EQ(r.body["webhook"]["items"], true);
  const std::string json_id = r.body["id"];
  r = post(server.port(), "/v1/jobs?webhook_url=" + prefix + "jsonl&webhook_items=true", jsonl_job("eachl", 4), "application/jsonl", "key-one");
  ASSERT_EQ(r.status, 201) << r.raw;
  const std::string jsonl_id = r.body["id"];
  EXPECT_EQ(wait_job(server.port(), json_id, "key-one")["state"], "completed");
  EXPECT_EQ(wait_job(server.port(), jsonl_id, "key-one")["state"], "completed");
  const auto until = Clock::now() + std::chrono::seconds(60);
  while ((metric(server.port(), "arbiter_job_item_webhooks_total{outcome=\"delivered\"}") < 10 ||
          metric(server.port(), "arbiter_job_webhooks_total{outcome=\"delivered\"}") < 2) &&
         Clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(metric(server.port(), "arbiter_job_item_webhooks_total{outcome=\"delivered\"}"), 10);
  EXPECT_EQ(metric(server.port(), "arbiter_job_webhooks_total{outcome=\"delivered\"}"), 2);
  receiver.snapshot();
  // Every item once as delivered (plus the one answered 500, sent twice), each signed, with its
  // result line; and each job's own webhook.
  std::map<std::string, int> items;
  int finished = 0;
  for (size_t i = 0; i < receiver.bodies.size(); ++i) {
    EXPECT_EQ(receiver.signatures[i], "sha256=" + hmac_hex(kSecret, receiver.bodies[i]));
    const json body = json::parse(receiver.bodies[i]);
    if (body["object"] == "job.finished") {
      ++finished;
      continue;
    }
    ASSERT_EQ(body["object"], "job.item") << body.dump();
    const std::string custom_id = body["custom_id"];
    EXPECT_EQ(body["job_id"], custom_id.rfind("eachl-", 0) == 0 ? jsonl_id : json_id);
    EXPECT_EQ(receiver.paths[i], custom_id.rfind("eachl-", 0) == 0 ? "/hook/jsonl" : "/hook/json");
    EXPECT_EQ(body["response"]["status_code"], 200);
    EXPECT_TRUE(body["response"]["body"]["results"].is_array()) << body.dump();
    ++items[custom_id];
  }
  EXPECT_EQ(finished, 2);
  EXPECT_EQ(items.size(), 10u);
  int twice = 0;
  for (const auto& [id, n] : items) twice += n - 1;
  EXPECT_EQ(twice, receiver.bodies.size() == 13u ? 1 : 0) << receiver.bodies.size();
  EXPECT_LE(receiver.bodies.size(), 13u);
}

TEST_F(Jobs, RetentionDeletesFinishedJobsWhoseWebhooksAreDone) {
  int closed_port = 0;
  {
    Receiver probe;  // a free port, closed again: deliveries to it fail and stay pending
    closed_port = probe.port();
  }
  const std::string db = new_db(*tmp_, "retention.db");
  const std::string hook = "http://127.0.0.1:" + std::to_string(closed_port) + "/hook/";
  // Finished jobs go 0.00002 days (1.7 s) after they finished; sweeps every 0.3 s.
  ServeProcess server(args(db, {"--job-retention-days", "0.00002", "--retention-interval", "0.3", "--webhook-allow", hook,
                                "--webhook-secret-file", tmp_->file("secret"), "--webhook-attempts", "20"}),
                      tmp_->file("retention.log"));
  ASSERT_TRUE(wait_ready(server.port(), 60)) << server.log();
  Reply r = call(server.port(), "POST", "/v1/jobs", json_job("gone", 3).dump(), "key-one");
  ASSERT_EQ(r.status, 201) << r.raw;
  const std::string gone = r.body["id"];
  json pending_job = json_job("kept", 3);
  pending_job["webhook_url"] = hook + "x";
  r = call(server.port(), "POST", "/v1/jobs", pending_job.dump(), "key-one");
  ASSERT_EQ(r.status, 201) << r.raw;
  const std::string kept = r.body["id"];
  const json finished = wait_job(server.port(), gone, "key-one");
  EXPECT_EQ(finished["state"], "completed");
  const int64_t seq = std::stoll(sql_value(db, "SELECT seq FROM jobs WHERE id = '" + gone + "'"));
  EXPECT_EQ(wait_job(server.port(), kept, "key-one")["state"], "completed");
  int status = 200;
  for (int i = 0; i < 300 && status == 200; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    status = call(server.port(), "GET", "/v1/jobs/" + gone, "", "key-one").status;
  }
  EXPECT_EQ(status, 404) << server.log();
  EXPECT_EQ(call(server.port(), "GET", "/v1/jobs/" + gone + "/results", "", "key-one").status, 404);
  EXPECT_EQ(sql_value(db, "SELECT count(*) FROM job_items WHERE job_seq = " + std::to_string(seq)), "0");
  // Finished as long ago, but its webhook is still pending: kept, with its results.
  const Reply still = call(server.port(), "GET", "/v1/jobs/" + kept, "", "key-one");
  ASSERT_EQ(still.status, 200) << still.raw;
  EXPECT_EQ(still.body["webhook"]["state"], "pending");
  EXPECT_EQ(results(server.port(), kept, "key-one").size(), 3u);
}

TEST_F(Jobs, HttpsWebhooksGoOnlyToReceiversWithTrustedCertificates) {
  ASSERT_TRUE(testing::make_self_signed_cert(tmp_->file("trusted.pem"), tmp_->file("trusted.key"), "IP:127.0.0.1"));
  ASSERT_TRUE(testing::make_self_signed_cert(tmp_->file("unknown.pem"), tmp_->file("unknown.key"), "IP:127.0.0.1"));
  Receiver trusted(0, std::make_unique<httplib::SSLServer>(tmp_->file("trusted.pem").c_str(), tmp_->file("trusted.key").c_str()));
  Receiver unknown(0, std::make_unique<httplib::SSLServer>(tmp_->file("unknown.pem").c_str(), tmp_->file("unknown.key").c_str()));
  const std::string good = "https://127.0.0.1:" + std::to_string(trusted.port()) + "/hook/";
  const std::string bad = "https://127.0.0.1:" + std::to_string(unknown.port()) + "/hook/";
  ServeProcess server(args(new_db(*tmp_, "https.db"), {"--webhook-allow", good + "," + bad, "--webhook-ca", tmp_->file("trusted.pem"),
                                                      "--webhook-secret-file", tmp_->file("secret"), "--webhook-attempts", "2"}),
                      tmp_->file("https.log"));
  ASSERT_TRUE(wait_ready(server.port(), 60)) << server.log();
  std::vector<std::string> ids;
  for (const std::string& url : {good + "done", bad + "done"}) {
    json job = json_job("tls", 2);
    job["webhook_url"] = url;
    const Reply r = call(server.port(), "POST", "/v1/jobs", job.dump(), "key-one");
    ASSERT_EQ(r.status, 201) << r.raw;
    ids.push_back(r.body["id"]);
  }
  std::vector<json> seen(2);
  for (size_t j = 0; j < 2; ++j)
    for (int i = 0; i < 1500; ++i) {
      seen[j] = call(server.port(), "GET", "/v1/jobs/" + ids[j], "", "key-one").body;
      if (seen[j]["state"] == "completed" && seen[j]["webhook"]["state"] != "pending") break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  // The trusted receiver answered 500, then 200: delivered on the second try, signed.
  EXPECT_EQ(seen[0]["webhook"]["state"], "delivered") << seen[0].dump() << server.log();
  EXPECT_EQ(seen[0]["webhook"]["attempts"], 2);
  trusted.snapshot();
  ASSERT_EQ(trusted.bodies.size(), 2u);
  EXPECT_EQ(json::parse(trusted.bodies[1])["id"], ids[0]);
  EXPECT_EQ(trusted.signatures[1], "sha256=" + hmac_hex(kSecret, trusted.bodies[1]));
  // The other's certificate is not one the server trusts: both tries fail in the handshake, and it
  // never sees the body.
  EXPECT_EQ(seen[1]["webhook"]["state"], "failed") << seen[1].dump();
  EXPECT_EQ(seen[1]["webhook"]["attempts"], 2);
  EXPECT_EQ(unknown.count(), 0u);
  EXPECT_NE(server.log().find("certificate verify failed"), std::string::npos) << server.log();
}

TEST_F(Jobs, AWebhookNotDeliveredBeforeACrashIsSentAfterTheRestart) {
  int port_for_hook = 0;
  {
    Receiver probe;  // a free port, closed again: deliveries to it fail until a receiver listens there
    port_for_hook = probe.port();
  }
  const std::string db = new_db(*tmp_, "hook.db");
  const std::string url = "http://127.0.0.1:" + std::to_string(port_for_hook) + "/hook/later";
  const std::vector<std::string> hook_args = {"--webhook-allow", "http://127.0.0.1:" + std::to_string(port_for_hook) + "/hook/",
                                              "--webhook-secret-file", tmp_->file("secret"), "--webhook-attempts", "20"};
  std::string id;
  {
    ServeProcess server(args(db, hook_args), tmp_->file("hook0.log"));
    ASSERT_TRUE(wait_ready(server.port(), 60)) << server.log();
    json job = json_job("later", 2);
    job["webhook_url"] = url;
    const Reply r = call(server.port(), "POST", "/v1/jobs", job.dump(), "key-one");
    ASSERT_EQ(r.status, 201) << r.raw;
    id = r.body["id"];
    EXPECT_EQ(wait_job(server.port(), id, "key-one")["state"], "completed");
    json seen;
    for (int i = 0; i < 600; ++i) {  // the first delivery has failed
      seen = call(server.port(), "GET", "/v1/jobs/" + id, "", "key-one").body;
      if (seen["webhook"]["attempts"].get<int>() >= 1) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_EQ(seen["webhook"]["state"], "pending") << seen.dump();
    kill(server.server_pid(), SIGKILL);
    EXPECT_EQ(server.wait_exit(30), -1);
  }
  Receiver receiver(port_for_hook);
  ASSERT_EQ(receiver.port(), port_for_hook);
  ServeProcess server(args(db, hook_args), tmp_->file("hook1.log"));
  ASSERT_TRUE(wait_ready(server.port(), 60)) << server.log();
  json seen;
  for (int i = 0; i < 1500; ++i) {
    seen = call(server.port(), "GET", "/v1/jobs/" + id, "", "key-one").body;
    if (seen["webhook"]["state"] != "pending") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(seen["webhook"]["state"], "delivered") << seen.dump();
  receiver.snapshot();
  ASSERT_EQ(receiver.bodies.size(), 2u);  // 500, then 200
  EXPECT_EQ(json::parse(receiver.bodies[1])["id"], id);
  EXPECT_EQ(receiver.signatures[1], "sha256=" + hmac_hex(kSecret, receiver.bodies[1]));
}

TEST_F(Jobs, KillNineAtThreePointsLosesAndRepeatsNothing) {
  const std::string db = new_db(*tmp_, "crash.db");
  constexpr int kItems = 60;
  std::mt19937 rng(std::random_device{}());
  // Three increasing points (items finished) at which the server is killed.
  std::vector<int> points;
  int from = 1;
  for (int k = 0; k < 3; ++k) {
    const int p = std::uniform_int_distribution<int>(from, from + 12)(rng);
    points.push_back(p);
    from = p + 1;
  }
  std::string id;
  for (size_t round = 0; round <= points.size(); ++round) {
    ServeProcess server(args(db), tmp_->file("crash" + std::to_string(round) + ".log"));
    ASSERT_TRUE(wait_ready(server.port(), 60)) << server.log();
    if (round == 0) {
      // Without --webhook-allow a webhook_url is refused.
      json hooked = json_job("crash", 2);
      hooked["webhook_url"] = "http://127.0.0.1:9/hook";
      const Reply refused = call(server.port(), "POST", "/v1/jobs", hooked.dump(), "key-one");
      EXPECT_EQ(refused.status, 400);
      EXPECT_EQ(refused.body["error"]["param"], "webhook_url");
      const Reply r = post(server.port(), "/v1/jobs", jsonl_job("crash", kItems), "application/jsonl", "key-one");
      ASSERT_EQ(r.status, 201) << r.raw;
      id = r.body["id"];
    }
    if (round == points.size()) {
      const json job = wait_job(server.port(), id, "key-one");
      EXPECT_EQ(job["state"], "completed") << job.dump() << server.log();
      EXPECT_EQ(job["counts"]["completed"], kItems);
      expect_each_once(results(server.port(), id, "key-one"), "crash", kItems);
      break;
    }
    for (;;) {
      const Reply r = call(server.port(), "GET", "/v1/jobs/" + id, "", "key-one");
      ASSERT_EQ(r.status, 200) << r.raw;
      if (r.body["counts"]["completed"].get<int>() >= points[round]) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    kill(server.server_pid(), SIGKILL);
    EXPECT_EQ(server.wait_exit(30), -1);
    // What the killed server left: results and counts agree, no item done twice.
    EXPECT_EQ(sql_value(db, "SELECT count(*) FROM job_items WHERE state = 1"),
              sql_value(db, "SELECT completed + failed FROM jobs WHERE id = '" + id + "'"));
  }
  EXPECT_EQ(sql_value(db, "SELECT count(*) FROM job_items WHERE state = 1 AND response IS NOT NULL"), std::to_string(kItems));
  EXPECT_EQ(sql_value(db, "SELECT count(DISTINCT custom_id) FROM job_items"), std::to_string(kItems));
}

}  // namespace
}  // namespace arbiter
