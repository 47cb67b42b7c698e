// Replicas of `arbiter serve` on one PostgreSQL database, end to end (label postgres; skipped,
// saying so, without ARBITER_TEST_PG): two replicas share a 500-item job, both run items and every
// item has exactly one result; the same with one replica killed (kill -9) mid-job, its leased items
// taken over once the lease ends, and with one stopped (SIGTERM), its items handed back at once; policies registered on one are served by the other, and the
// decisions both made are read from either and survive a restart; the database unavailable: 503
// with Retry-After, and every decision acknowledged with a 200 is in the database.
#include <gtest/gtest.h>
#include <httplib.h>

#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/api/pg_test_db.h"
#include "tests/api/serve_process.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

using testing::PgTestDatabase;

json classify_body(const std::string& content, const json& policy) {
  return {{"content", content}, {"policies", {policy}}, {"reasoning_effort", "low"}, {"max_tokens", 3}, {"return_reasoning", false}};
}
json inline_policy() { return {{"id", "inline"}, {"text", kPolicyTexts[0]}}; }

json job_of(int n) {
  json items = json::array();
  for (int i = 0; i < n; ++i)
    items.push_back({{"custom_id", "item-" + std::to_string(i)}, {"body", classify_body("message " + std::to_string(i), inline_policy())}});
  return {{"items", items}};
}

// The job once finished (polls); its last state when `seconds` pass first.
json wait_job(int port, const std::string& id, double seconds = 300) {
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  json job;
  while (Clock::now() < until) {
    const Reply r = call(port, "GET", "/v1/jobs/" + id, "", "key-one");
    if (r.status != 200) return r.body;
    job = r.body;
    const std::string state = job["state"];
    if (state == "completed" || state == "failed" || state == "cancelled") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return job;
}

// Every custom_id item-0..n-1 exactly once in the results, each a 200.
void expect_each_once(int port, const std::string& id, int n) {
  const Reply r = call(port, "GET", "/v1/jobs/" + id + "/results", "", "key-one");
  ASSERT_EQ(r.status, 200) << r.raw;
  std::map<std::string, int> seen;
  std::istringstream in(r.raw);
  size_t lines = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    ++lines;
    const json l = json::parse(line, nullptr, false);
    ASSERT_FALSE(l.is_discarded()) << line;
    ++seen[l["custom_id"].get<std::string>()];
    EXPECT_EQ(l["response"]["status_code"], 200) << line;
  }
  EXPECT_EQ(lines, static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) EXPECT_EQ(seen["item-" + std::to_string(i)], 1) << i;
}

class PgReplicas : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::getenv("ARBITER_TEST_PG") || !*std::getenv("ARBITER_TEST_PG")) return;
    tmp_ = std::make_unique<testing::TempDir>();
    ASSERT_EQ(make_tiny_model(tmp_->file("model"), 7), "");
    std::ofstream(tmp_->file("keys")) << "key-one\nadmin:key-admin\n";
  }
  static void TearDownTestSuite() { tmp_.reset(); }
  static std::vector<std::string> args(const std::string& url, std::vector<std::string> more = {}) {
    std::vector<std::string> a = {"--model", tmp_->file("model"), "--port", "0", "--device", "cpu", "--api-key-file", tmp_->file("keys"),
                                  "--warm-efforts", "none", "--reasoning-budget", "4,4,8", "--answer-tokens", "16", "--db", url,
                                  "--job-concurrency", "4", "--max-job-items", "1000"};
    a.insert(a.end(), more.begin(), more.end());
    return a;
  }
  static std::unique_ptr<ServeProcess> start(const std::string& url, const std::string& log, std::vector<std::string> more = {}) {
    auto server = std::make_unique<ServeProcess>(args(url, std::move(more)), tmp_->file(log));
    EXPECT_TRUE(wait_ready(server->port(), 60)) << server->log();
    return server;
  }
  // Items whose result a replica (by its pid) stored.
  static int done_by(const PgTestDatabase& db, int pid) {
    return std::stoi(db.value("SELECT count(*) FROM job_items WHERE state = 1 AND split_part(leased_by, ':', 2) = '" +
                              std::to_string(pid) + "'"));
  }
  static std::unique_ptr<testing::TempDir> tmp_;
};
std::unique_ptr<testing::TempDir> PgReplicas::tmp_;

TEST_F(PgReplicas, TwoReplicasShareA500ItemJobWithNoDuplicateAndNoLoss) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  auto a = start(db.url(), "share-a.log");
  auto b = start(db.url(), "share-b.log");
  // The password-free URL is logged; the schema is there once.
  EXPECT_NO_THROW(a->wait_for_output(std::regex("storage in PostgreSQL postgresql://postgres@"), 30)) << a->output();
  EXPECT_EQ(db.value("SELECT count(*) FROM arbiter_schema"), "1");
  const Reply r = call(a->port(), "POST", "/v1/jobs", job_of(500).dump(), "key-one");
  ASSERT_EQ(r.status, 201) << r.raw;
  const std::string id = r.body["id"];
  // b sees the job a stored.
  EXPECT_EQ(call(b->port(), "GET", "/v1/jobs/" + id, "", "key-one").status, 200);
  const json job = wait_job(b->port(), id);
  EXPECT_EQ(job["state"], "completed") << job.dump() << a->log() << b->log();
  EXPECT_EQ(job["counts"]["completed"], 500);
  expect_each_once(a->port(), id, 500);
  const int by_a = done_by(db, a->server_pid()), by_b = done_by(db, b->server_pid());
  EXPECT_EQ(by_a + by_b, 500);
  EXPECT_GT(by_a, 0);
  EXPECT_GT(by_b, 0);
  EXPECT_EQ(db.value("SELECT count(*) FROM job_items WHERE state = 1 AND response IS NOT NULL"), "500");
}

TEST_F(PgReplicas, AReplicaKilledMidJobLeavesItsItemsToTheOther) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  auto a = start(db.url(), "kill-a.log", {"--job-lease-seconds", "2"});
  auto b = start(db.url(), "kill-b.log", {"--job-lease-seconds", "2"});
  const Reply r = call(a->port(), "POST", "/v1/jobs", job_of(500).dump(), "key-one");
  ASSERT_EQ(r.status, 201) << r.raw;
  const std::string id = r.body["id"];
  // Kill b once it has stored some results (and holds leases on more).
  const auto give_up = Clock::now() + std::chrono::seconds(240);
  while (done_by(db, b->server_pid()) < 20 && Clock::now() < give_up) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const std::string leased = db.value("SELECT count(*) FROM job_items WHERE state = 0 AND split_part(leased_by, ':', 2) = '" +
                                      std::to_string(b->server_pid()) + "'");
  kill(b->server_pid(), SIGKILL);
  EXPECT_EQ(b->wait_exit(30), -1);
  const int by_b = done_by(db, b->server_pid());
  EXPECT_GE(by_b, 20);
  const json job = wait_job(a->port(), id);
  EXPECT_EQ(job["state"], "completed") << job.dump() << a->log();
  EXPECT_EQ(job["counts"]["completed"], 500);
  expect_each_once(a->port(), id, 500);
  // Nothing b stored was redone, and a finished the rest (including what b held when it died).
  EXPECT_EQ(done_by(db, b->server_pid()), by_b);
  EXPECT_EQ(done_by(db, a->server_pid()), 500 - by_b);
  EXPECT_EQ(db.value("SELECT count(*) FROM job_items WHERE state = 1"), "500");
  std::cout << "b stored " << by_b << " results and held " << leased << " leases when killed\n";
}

TEST_F(PgReplicas, AReplicaStoppedMidJobHandsItsItemsBackAtOnce) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  // Leases far longer than the test may wait: the job only finishes if b gives its items back.
  auto a = start(db.url(), "stop-a.log", {"--job-lease-seconds", "3600"});
  auto b = start(db.url(), "stop-b.log", {"--job-lease-seconds", "3600"});
  const Reply r = call(a->port(), "POST", "/v1/jobs", job_of(300).dump(), "key-one");
  ASSERT_EQ(r.status, 201) << r.raw;
  const std::string id = r.body["id"];
  const auto give_up = Clock::now() + std::chrono::seconds(240);
  while (done_by(db, b->server_pid()) < 10 && Clock::now() < give_up) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  kill(b->server_pid(), SIGTERM);
  EXPECT_EQ(b->wait_exit(60), 0) << b->log();
  EXPECT_EQ(db.value("SELECT count(*) FROM job_items WHERE state = 0 AND split_part(leased_by, ':', 2) = '" +
                     std::to_string(b->server_pid()) + "'"),
            "0");
  const json job = wait_job(a->port(), id, 240);
  EXPECT_EQ(job["state"], "completed") << job.dump() << a->log();
  expect_each_once(a->port(), id, 300);
}

TEST_F(PgReplicas, PoliciesAndDecisionsAreSharedAndSurviveARestart) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  std::string decision_id;
  {
    auto a = start(db.url(), "share-policies-a.log");
    auto b = start(db.url(), "share-policies-b.log");
    const json policy = {{"id", "spam"}, {"text", kPolicyTexts[0]}};
    const Reply put = call(a->port(), "POST", "/v1/policies", policy.dump(), "key-admin");
    ASSERT_EQ(put.status, 201) << put.raw;
    EXPECT_EQ(put.body["version"], 1);
    // b serves the policy a registered, and numbers the next version after a's.
    const Reply on_b = call(b->port(), "POST", "/v1/classify", classify_body("buy now", {{"id", "spam"}}).dump(), "key-one");
    ASSERT_EQ(on_b.status, 200) << on_b.raw;
    json second = policy;
    second["text"] = std::string(kPolicyTexts[0]) + "\nLinks to shops count.";
    const Reply put2 = call(b->port(), "POST", "/v1/policies", second.dump(), "key-admin");
    ASSERT_EQ(put2.status, 201) << put2.raw;
    EXPECT_EQ(put2.body["version"], 2);
    EXPECT_EQ(call(a->port(), "GET", "/v1/policies/spam", "", "key-one").body["version"], 2);
    // The decision b made is read from a.
    const Reply list = call(a->port(), "GET", "/v1/decisions?policy=spam", "", "key-admin");
    ASSERT_EQ(list.status, 200) << list.raw;
    ASSERT_EQ(list.body["data"].size(), 1u) << list.raw;
    decision_id = list.body["data"][0]["id"];
  }
  // Both stopped; a new replica has the policies and the decision.
  auto c = start(db.url(), "share-policies-c.log");
  EXPECT_EQ(call(c->port(), "GET", "/v1/policies/spam", "", "key-one").body["version"], 2);
  const Reply got = call(c->port(), "GET", "/v1/decisions/" + decision_id, "", "key-admin");
  EXPECT_EQ(got.status, 200) << got.raw;
  EXPECT_EQ(got.body["id"], decision_id);
}

TEST_F(PgReplicas, TheDatabaseUnavailableIs503AndNothingUnstoredIsAcknowledged) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  auto a = start(db.url(), "down.log");
  int acknowledged = 0;
  auto classify = [&](int i) {
    const Reply r = call(a->port(), "POST", "/v1/classify", classify_body("message " + std::to_string(i), inline_policy()).dump(), "key-one");
    if (r.status == 200) ++acknowledged;
    return r;
  };
  for (int i = 0; i < 5; ++i) ASSERT_EQ(classify(i).status, 200);
  // The database refuses connections and ends the open ones.
  db.admin("ALTER DATABASE " + db.name() + " ALLOW_CONNECTIONS false");
  db.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '" + db.name() + "'");
  for (int i = 5; i < 10; ++i) {
    const Reply r = classify(i);
    EXPECT_EQ(r.status, 503) << r.raw;
    EXPECT_EQ(r.retry_after, "1");
    EXPECT_EQ(r.body["error"]["type"], "server_error") << r.raw;
  }
  const Reply job = call(a->port(), "POST", "/v1/jobs", job_of(3).dump(), "key-one");
  EXPECT_EQ(job.status, 503) << job.raw;
  EXPECT_EQ(job.body["error"]["code"], "database_unavailable") << job.raw;
  EXPECT_FALSE(job.retry_after.empty());
  const Reply list = call(a->port(), "GET", "/v1/decisions", "", "key-admin");
  EXPECT_EQ(list.status, 503) << list.raw;
  // Back: the server reconnects by itself.
  db.admin("ALTER DATABASE " + db.name() + " ALLOW_CONNECTIONS true");
  for (int i = 10; i < 15; ++i) EXPECT_EQ(classify(i).status, 200);
  EXPECT_EQ(acknowledged, 10);
  // Exactly the acknowledged decisions are stored (one policy each).
  EXPECT_EQ(db.value("SELECT count(*) FROM decisions"), std::to_string(acknowledged));
}

}  // namespace
}  // namespace arbiter
