// The decision log's storage layer without a server: SqliteDecisionStore (append, get, scoped
// reads, keyset pages without duplicates or gaps, filters, feedback and disagreement, retention,
// read-only opening, a newer schema refused), DecisionLog (group commit across concurrent
// requests, refusal when the store fails or the queue is full, the retention sweep on a test
// clock), the query-string parser of GET /v1/decisions, and admin keys.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <future>
#include <set>
#include <thread>

#include "api/auth.h"
#include "api/decision_log.h"
#include "api/decisions_api.h"
#include "api/errors.h"
#include "api/sqlite_decision_store.h"
#include "tests/api/decision_store_cases.h"
#include "tests/test_util.h"

namespace arbiter::api {
namespace {

using testing_cases::make;

std::string exec_sql(const std::string& db, const std::string& sql) {
  sqlite3* raw = nullptr;
  sqlite3_open(db.c_str(), &raw);
  char* error = nullptr;
  sqlite3_exec(raw, sql.c_str(), nullptr, nullptr, &error);
  const std::string why = error ? error : "";
  sqlite3_free(error);
  sqlite3_close(raw);
  return why;
}

TEST(DecisionStore, StoresReadsScopesAndPages) {
  testing::TempDir tmp;
  SqliteDecisionStore store(tmp.file("d.db"));
  testing_cases::stores_reads_scopes_and_pages(store);
}

TEST(DecisionStore, FeedbackDisagreementRetentionAndReadOnly) {
  testing::TempDir tmp;
  const std::string path = tmp.file("d.db");
  std::vector<DecisionRecord> all;
  {
    SqliteDecisionStore store(path);
    testing_cases::feedback_disagreement_and_retention(store, all);
  }
  {
    sqlite3* raw = nullptr;
    sqlite3_open(path.c_str(), &raw);
    sqlite3_stmt* s = nullptr;
    sqlite3_prepare_v2(raw, "SELECT COUNT(*) FROM decision_feedback", -1, &s, nullptr);
    ASSERT_EQ(sqlite3_step(s), SQLITE_ROW);
    EXPECT_EQ(sqlite3_column_int(s, 0), 2);  // the feedback of all[2] and all[4]
    sqlite3_finalize(s);
    sqlite3_close(raw);
  }
  // Read-only: reads work, writes throw; a missing file or a newer schema is refused.
  const SqliteDecisionStore ro(path, true);
  EXPECT_EQ(ro.count(), 4);
  std::vector<std::string> order;
  ro.for_each({}, [&](const DecisionRecord& d) { order.push_back(d.id); });
  EXPECT_EQ(order, (std::vector<std::string>{all[2].id, all[3].id, all[4].id, all[5].id}));
  EXPECT_THROW(SqliteDecisionStore(tmp.file("missing.db"), true), std::runtime_error);
  ASSERT_EQ(exec_sql(path, "UPDATE arbiter_schema SET version = 2 WHERE component = 'decisions'"), "");
  try {
    SqliteDecisionStore newer(path);
    ADD_FAILURE() << "a newer schema was opened";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("newer"), std::string::npos) << e.what();
  }
}

// A store whose appends can be made to fail or to wait.
class ScriptedStore : public DecisionStore {
 public:
  std::atomic<bool> fail{false};
  std::promise<void> release;
  std::shared_future<void> gate = release.get_future().share();
  std::atomic<bool> gated{false};
  std::atomic<int> appends{0};
  std::atomic<int> records{0};
  std::atomic<int64_t> cutoff{-1};
  void append(const std::vector<DecisionRecord>& r) override {
    if (gated) gate.wait();
    if (fail) throw std::runtime_error("disk full");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // an fsync
    ++appends;
    records += static_cast<int>(r.size());
  }
  std::optional<DecisionRecord> get(const std::string&, const std::optional<std::string>&) const override { return std::nullopt; }
  bool add_feedback(const std::string&, const std::optional<std::string>&, const DecisionFeedback&) override { return false; }
  int64_t delete_before(int64_t ms) override {
    cutoff = ms;
    return 3;
  }
  int64_t count() const override { return records; }
  void query(const DecisionQuery&, bool, const std::function<bool(const DecisionRecord&)>&) const override {}
};

TEST(DecisionLog, GroupCommitsConcurrentRequestsAndRefusesWhatItCannotStore) {
  auto owned = std::make_unique<ScriptedStore>();
  ScriptedStore& store = *owned;
  DecisionLogOptions o;
  o.max_queued = 64;
  DecisionLog log(std::move(owned), o);
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 32; ++t)
    threads.emplace_back([&] {
      log.record({make(1, "k", "p", "0"), make(1, "k", "p", "1")});
      ++ok;
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 32);
  EXPECT_EQ(store.records.load(), 64);  // every record() returned after its records were stored
  EXPECT_LT(store.appends.load(), 32) << "no group commit: one transaction per request";
  EXPECT_EQ(log.stats().stored, 64u);

  // The store fails: the caller hears of it.
  store.fail = true;
  try {
    log.record({make(1, "k", "p", "0")});
    ADD_FAILURE() << "a failed write was acknowledged";
  } catch (const DecisionLogUnavailable& e) {
    EXPECT_FALSE(e.full());
  }
  store.fail = false;

  // The writer is stuck: the queue fills to its bound and the next request is refused at once.
  store.gated = true;
  std::vector<std::thread> stuck;
  std::atomic<int> stored_later{0};
  stuck.emplace_back([&] {
    log.record({make(1, "k", "p", "0")});  // taken by the writer, which waits at the gate
    ++stored_later;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  for (int i = 0; i < 4; ++i)
    stuck.emplace_back([&] {
      log.record(std::vector<DecisionRecord>(16, make(1, "k", "p", "0")));  // 64 queued: the bound
      ++stored_later;
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  try {
    log.record({make(1, "k", "p", "0")});
    ADD_FAILURE() << "a request over the queue's bound was accepted";
  } catch (const DecisionLogUnavailable& e) {
    EXPECT_TRUE(e.full());
  }
  store.release.set_value();
  for (auto& t : stuck) t.join();
  EXPECT_EQ(stored_later.load(), 5);
  EXPECT_EQ(store.records.load(), 64 + 1 + 64);
}

TEST(DecisionLog, RetentionSweepsAtStartAndPeriodically) {
  auto owned = std::make_unique<ScriptedStore>();
  ScriptedStore& store = *owned;
  DecisionLogOptions o;
  o.retention_days = 2;
  o.retention_interval = std::chrono::milliseconds(50);
  std::atomic<int64_t> now{10LL * 86400 * 1000};
  o.now_ms = [&] { return now.load(); };
  DecisionLog log(std::move(owned), o);
  EXPECT_EQ(store.cutoff.load(), 8LL * 86400 * 1000);  // at start
  now = 20LL * 86400 * 1000;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (store.cutoff.load() != 18LL * 86400 * 1000 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(store.cutoff.load(), 18LL * 86400 * 1000);  // periodically
  EXPECT_GE(log.stats().swept, 6u);
}

TEST(DecisionQueryString, ParsesAndRefusesWithTheParameterNamed) {
  const DecisionQuery q = parse_decision_query("policy=spam%402&since=2026-01-02T03:04:05.5Z&verdict=FRAUD&disagreement=true&limit=7&after=" +
                                               new_decision_id(5).substr(0, 4) + std::string(28, 'a'));
  EXPECT_EQ(q.policy_id, "spam");
  EXPECT_EQ(q.policy_version, 2);
  EXPECT_EQ(q.since_ms, 1767323045500);
  EXPECT_EQ(q.verdict_key, "FRAUD");
  EXPECT_EQ(q.disagreement, true);
  EXPECT_EQ(q.limit, 7);
  EXPECT_EQ(q.after, "dec_" + std::string(28, 'a'));
  EXPECT_EQ(parse_decision_query("").limit, kDefaultDecisionPage);
  EXPECT_EQ(parse_decision_query("since=1767323045").since_ms, 1767323045000);
  EXPECT_EQ(parse_time_ms("2026-01-02T05:04:05+02:00"), 1767323045000);
  EXPECT_EQ(parse_decision_query("policy=my+policy").policy_id, "my policy");

  const std::vector<std::pair<std::string, std::string>> bad = {
      {"limit=0", "limit"},          {"limit=101", "limit"},           {"limit=5x", "limit"},
      {"after=dec_xyz", "after"},    {"since=yesterday", "since"},     {"until=2026-13-01T00:00:00Z", "until"},
      {"verdict=", "verdict"},       {"disagreement=yes", "disagreement"}, {"violation=1", "violation"},
      {"colour=red", "colour"},      {"policy=a&policy=b", "policy"}, {"since=20&until=10", "until"},
      {"policy=%zz", "policy"},            {"has_feedback=", "has_feedback"}};
  for (const auto& [query, param] : bad) {
    try {
      parse_decision_query(query);
      ADD_FAILURE() << query << " was accepted";
    } catch (const ApiException& e) {
      EXPECT_EQ(e.error().status, 400) << query;
      EXPECT_EQ(e.error().param, param) << query;
    }
  }
}

TEST(ApiKeysAdmin, AdminLinesAndStableNonSecretIds) {
  testing::TempDir tmp;
  {
    std::ofstream(tmp.file("keys")) << "# keys\nplain-key\nadmin: boss-key\n";
  }
  const ApiKeys keys = ApiKeys::load(tmp.file("keys"));
  const auto plain = keys.identify("Bearer plain-key");
  const auto boss = keys.identify("Bearer boss-key");
  ASSERT_TRUE(plain && boss);
  EXPECT_FALSE(plain->admin);
  EXPECT_TRUE(boss->admin);
  EXPECT_EQ(plain->id, ApiKeys::key_id("plain-key"));
  EXPECT_EQ(plain->id.size(), 20u);
  EXPECT_EQ(plain->id.find("plain"), std::string::npos);
  EXPECT_NE(plain->id, boss->id);
  EXPECT_FALSE(keys.identify("Bearer admin: boss-key"));
  EXPECT_FALSE(keys.identify("Bearer nope"));
  EXPECT_TRUE(ApiKeys().identify("")->admin);  // no keys: everyone sees everything
  {
    std::ofstream(tmp.file("empty-admin")) << "admin:\n";
  }
  EXPECT_THROW(ApiKeys::load(tmp.file("empty-admin")), std::runtime_error);
}

}  // namespace
}  // namespace arbiter::api
