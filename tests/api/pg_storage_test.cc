// PostgreSQL storage without a server process (label postgres; skipped, saying so, without
// ARBITER_TEST_PG): URL masking and array parameters (randomized), migrations run by replicas
// starting together and a newer schema refused, the DecisionStore cases SQLite passes
// (decision_store_cases.h) and decisions surviving a reopen, two job stores on one database
// splitting a 500-item job with every item stored once, an expired lease taken over and the old
// holder's late result refused, new work heard at once through LISTEN/NOTIFY, policies shared between two registries with unique version
// numbers, and an unreachable database reported as StorageUnavailable.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "api/errors.h"
#include "api/pg_decision_store.h"
#include "api/pg_job_store.h"
#include "api/pg_util.h"
#include "api/policy_registry.h"
#include "tests/api/decision_store_cases.h"
#include "tests/api/pg_test_db.h"

namespace arbiter::api {
namespace {

using testing::PgTestDatabase;

TEST(PgUrl, PasswordsAreMaskedWhereverTheyAre) {
  EXPECT_TRUE(pg::is_url("postgres://h/db"));
  EXPECT_TRUE(pg::is_url("postgresql://u@h/db"));
  EXPECT_FALSE(pg::is_url("/var/lib/arbiter.db"));
  EXPECT_FALSE(pg::is_url("postgres.db"));
  EXPECT_EQ(pg::masked("postgresql://user:secret@db.internal:5432/arbiter"), "postgresql://user:***@db.internal:5432/arbiter");
  EXPECT_EQ(pg::masked("postgres://user@h/db"), "postgres://user@h/db");
  EXPECT_EQ(pg::masked("postgres://h/db?sslmode=require&password=secret"), "postgres://h/db?sslmode=require&password=***");
  // Random passwords (with '@', ':' and '/' percent-encoded as a URL needs) never show.
  std::mt19937 rng(11);
  const std::string alphabet = "abcXYZ019_-.~%40%3A%2F";
  for (int i = 0; i < 200; ++i) {
    std::string password;
    const int n = std::uniform_int_distribution<int>(1, 24)(rng);
    for (int k = 0; k < n; ++k) password += alphabet[std::uniform_int_distribution<size_t>(0, alphabet.size() - 1)(rng)];
    const std::string url = "postgresql://arbiter:" + password + "@host:5432/db";
    const std::string shown = pg::masked(url);
    EXPECT_EQ(shown, "postgresql://arbiter:***@host:5432/db") << url;
  }
}

TEST(PgUtil, ArrayParametersCarryAnyTextExactly) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  pg::Connection c(db.url(), "test db");
  std::mt19937 rng(5);
  const std::string pieces[] = {"\"", "\\", ",", "{", "}", " ", "NULL", "é", "\n", "'", "a", "\\\"", "\t"};
  for (int round = 0; round < 20; ++round) {
    std::vector<std::optional<std::string>> values;
    const int n = std::uniform_int_distribution<int>(1, 30)(rng);
    for (int i = 0; i < n; ++i) {
      if (std::uniform_int_distribution<int>(0, 9)(rng) == 0) {
        values.push_back(std::nullopt);
        continue;
      }
      std::string v;
      const int parts = std::uniform_int_distribution<int>(0, 8)(rng);
      for (int k = 0; k < parts; ++k) v += pieces[std::uniform_int_distribution<size_t>(0, std::size(pieces) - 1)(rng)];
      values.push_back(v);
    }
    const pg::Result r = c.exec("SELECT v FROM unnest($1::text[]) WITH ORDINALITY AS u(v, n) ORDER BY n", {pg::array(values)});
    ASSERT_EQ(r.rows(), n);
    for (int i = 0; i < n; ++i) EXPECT_EQ(r.opt_text(i, 0), values[static_cast<size_t>(i)]) << round << " " << i;
  }
}

TEST(PgSchema, ReplicasStartingTogetherMigrateOnceAndANewerSchemaIsRefused) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  std::vector<std::thread> replicas;
  std::atomic<int> failed{0};
  for (int i = 0; i < 6; ++i)
    replicas.emplace_back([&] {
      try {
        pg::Connection c(db.url(), "test db");
        pg::migrate(c);
      } catch (const std::exception&) {
        ++failed;
      }
    });
  for (auto& t : replicas) t.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(db.value("SELECT count(*) FROM arbiter_schema"), "1");
  EXPECT_EQ(db.value("SELECT version FROM arbiter_schema"), std::to_string(pg::schema_version()));
  EXPECT_EQ(db.value("SELECT count(*) FROM information_schema.tables WHERE table_name IN ('policies', 'decisions', "
                     "'decision_feedback', 'jobs', 'job_items')"),
            "5");
  db.value("UPDATE arbiter_schema SET version = version + 1");
  try {
    PgDecisionStore newer(db.url());
    ADD_FAILURE() << "a newer schema was opened";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("newer"), std::string::npos) << e.what();
  }
}

TEST(PgDecisionStore, PassesTheDecisionStoreCases) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  {
    PgDecisionStore store(db.url());
    testing_cases::stores_reads_scopes_and_pages(store);
  }
  PgTestDatabase second;
  std::vector<DecisionRecord> all;
  {
    PgDecisionStore store(second.url());
    testing_cases::feedback_disagreement_and_retention(store, all);
  }
  EXPECT_EQ(second.value("SELECT count(*) FROM decision_feedback"), "2");  // the feedback of all[2] and all[4]
  // A new store (a restart, or another replica) reads what was stored, oldest first.
  const PgDecisionStore reopened(second.url());
  std::vector<std::string> order;
  reopened.for_each({}, [&](const DecisionRecord& d) { order.push_back(d.id); });
  EXPECT_EQ(order, (std::vector<std::string>{all[2].id, all[3].id, all[4].id, all[5].id}));
}

JobSubmission items(int n) {
  JobSubmission sub;
  for (int i = 0; i < n; ++i) sub.items.push_back({"item-" + std::to_string(i), "{\"n\": " + std::to_string(i) + "}"});
  return sub;
}

TEST(PgJobStore, TwoReplicasSplitAJobAndStoreEveryItemOnce) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  PgJobStore a(db.url(), std::chrono::seconds(30)), b(db.url(), std::chrono::seconds(30));
  EXPECT_NE(a.replica(), b.replica());
  bool created = false;
  const JobInfo job = a.create("key", items(500), "sha", created);
  ASSERT_TRUE(created);
  // The same idempotency key from the other replica returns the first job.
  JobSubmission keyed = items(3);
  keyed.idempotency_key = "k1";
  const JobInfo first = a.create("key", keyed, "sha3", created);
  EXPECT_TRUE(created);
  EXPECT_EQ(b.create("key", keyed, "sha3", created).id, first.id);
  EXPECT_FALSE(created);
  ASSERT_TRUE(a.cancel(first.id, created));

  // Both replicas claim and finish in small batches at once, as their runners do.
  std::map<std::string, int> runs;  // custom_id -> times handed out
  std::mutex runs_mutex;
  std::vector<JobInfo> finished_a, finished_b;
  auto replica = [&](PgJobStore& store, std::vector<JobInfo>& finished, int& count) {
    for (;;) {
      const auto claimed = store.claim(7, {});
      if (claimed.empty()) return;
      std::vector<JobStore::ItemResult> results;
      for (const ClaimedItem& item : claimed) {
        EXPECT_EQ(item.job_id, job.id);
        {
          std::lock_guard<std::mutex> lock(runs_mutex);
          ++runs[item.custom_id];
        }
        results.push_back({item.job_seq, item.index, item.index % 10 == 0 ? 500 : 200, "{\"by\": \"" + store.replica() + "\"}"});
      }
      count += static_cast<int>(claimed.size());
      for (JobInfo& j : store.finish_items(results)) finished.push_back(std::move(j));
    }
  };
  int count_a = 0, count_b = 0;
  std::thread ta([&] { replica(a, finished_a, count_a); });
  std::thread tb([&] { replica(b, finished_b, count_b); });
  ta.join();
  tb.join();
  EXPECT_EQ(runs.size(), 500u);
  for (const auto& [id, n] : runs) EXPECT_EQ(n, 1) << id;
  EXPECT_EQ(count_a + count_b, 500);
  EXPECT_GT(count_a, 0);
  EXPECT_GT(count_b, 0);
  // Exactly one replica saw the job finish; its counts are whole.
  ASSERT_EQ(finished_a.size() + finished_b.size(), 1u);
  const JobInfo done = *a.get(job.id);
  EXPECT_EQ(done.state, "completed");
  EXPECT_EQ(done.completed, 450);
  EXPECT_EQ(done.failed, 50);
  size_t rows = 0;
  for (int64_t after = -1;;) {
    const size_t n = b.results(job.seq, after, 64, [&](int64_t index, const std::string& custom_id, int status, const std::string&) {
      EXPECT_EQ(custom_id, "item-" + std::to_string(index));
      EXPECT_EQ(status, index % 10 == 0 ? 500 : 200);
      after = index;
    });
    rows += n;
    if (n < 64) break;
  }
  EXPECT_EQ(rows, 500u);
  EXPECT_EQ(db.value("SELECT count(*) FROM job_items WHERE state = 1"), "500");
}

TEST(PgJobStore, AnExpiredLeaseIsTakenOverAndTheOldHoldersResultRefused) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  const auto lease = std::chrono::milliseconds(600);
  auto dead = std::make_unique<PgJobStore>(db.url(), lease);
  PgJobStore live(db.url(), lease);
  bool created = false;
  const JobInfo job = live.create("key", items(10), "sha", created);
  const auto held = dead->claim(4, {});
  ASSERT_EQ(held.size(), 4u);
  // While the lease holds, the other replica gets only the rest.
  const auto rest = live.claim(10, {});
  EXPECT_EQ(rest.size(), 6u);
  for (const ClaimedItem& item : rest)
    for (const ClaimedItem& h : held) EXPECT_NE(item.index, h.index);
  // The holder's lease runs out (as when a replica dies and stops renewing; ended here directly).
  db.value("UPDATE job_items SET lease_until = now() - interval '1 second' WHERE leased_by = '" + dead->replica() + "'");
  const auto taken = live.claim(10, {{rest[0].job_seq, rest[0].index}});
  std::set<int64_t> taken_indexes;
  for (const ClaimedItem& item : taken) taken_indexes.insert(item.index);
  std::set<int64_t> held_indexes;
  for (const ClaimedItem& item : held) held_indexes.insert(item.index);
  // Its own items not in `busy` come back too (given back after a full queue).
  for (int64_t i : held_indexes) EXPECT_TRUE(taken_indexes.count(i)) << i;
  EXPECT_FALSE(taken_indexes.count(rest[0].index));
  // The old holder's late results are refused; the new holder's stored.
  std::vector<JobStore::ItemResult> late, fresh;
  for (const ClaimedItem& item : held) late.push_back({item.job_seq, item.index, 200, "{\"by\": \"dead\"}"});
  EXPECT_TRUE(dead->finish_items(late).empty());
  EXPECT_EQ(db.value("SELECT count(*) FROM job_items WHERE state = 1"), "0");
  for (const ClaimedItem& item : taken) fresh.push_back({item.job_seq, item.index, 200, "{\"by\": \"live\"}"});
  fresh.push_back({rest[0].job_seq, rest[0].index, 200, "{\"by\": \"live\"}"});
  const auto finished = live.finish_items(fresh);
  ASSERT_EQ(finished.size(), 1u);
  EXPECT_EQ(finished[0].id, job.id);
  EXPECT_EQ(db.value("SELECT count(*) FROM job_items WHERE response LIKE '%dead%'"), "0");
  EXPECT_EQ(db.value("SELECT count(*) FROM job_items WHERE state = 1"), "10");
  // A replica that stops hands its unfinished leases back at once.
  const JobInfo second = live.create("key", items(3), "sha", created);
  ASSERT_EQ(dead->claim(3, {}).size(), 3u);
  dead.reset();
  EXPECT_EQ(live.claim(3, {}).size(), 3u);
  (void)second;
}

TEST(PgJobStore, AWebhookIsLeasedToOneReplicaAtATime) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  PgJobStore a(db.url(), std::chrono::seconds(30)), b(db.url(), std::chrono::seconds(30));
  JobSubmission sub = items(1);
  sub.webhook_url = "http://127.0.0.1:9/hook";
  bool created = false;
  const JobInfo job = a.create("key", sub, "sha", created);
  const auto claimed = a.claim(1, {});
  ASSERT_EQ(claimed.size(), 1u);
  ASSERT_EQ(a.finish_items({{claimed[0].job_seq, claimed[0].index, 200, "{}"}}).size(), 1u);
  std::optional<int64_t> next_a, next_b;
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  const auto due_a = a.webhooks_due(now, next_a);
  const auto due_b = b.webhooks_due(now, next_b);
  ASSERT_EQ(due_a.size(), 1u);
  EXPECT_EQ(due_a[0].id, job.id);
  EXPECT_TRUE(due_b.empty());
  ASSERT_TRUE(next_b);  // b looks again when a's lease would end
  EXPECT_GT(*next_b, now);
  a.webhook_tried(job.id, false, now);  // failed; due again at once, for either replica
  const auto again = b.webhooks_due(now + 1, next_b);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].webhook_attempts, 1);
}

TEST(PgJobStore, ItemWebhooksAreLeasedToOneReplicaAtATime) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  PgJobStore a(db.url(), std::chrono::seconds(30)), b(db.url(), std::chrono::seconds(30));
  JobSubmission sub = items(5);
  sub.webhook_url = "http://127.0.0.1:9/hook";
  sub.webhook_items = true;
  bool created = false;
  const JobInfo job = a.create("key", sub, "sha", created);
  EXPECT_TRUE(job.webhook_items);
  const auto claimed = a.claim(5, {});
  ASSERT_EQ(claimed.size(), 5u);
  std::vector<JobStore::ItemResult> done;
  for (const ClaimedItem& c : claimed) done.push_back({c.job_seq, c.index, 200, "{\"n\":" + std::to_string(c.index) + "}"});
  a.finish_items(done);
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::optional<int64_t> next_a, next_b;
  const auto first = a.item_webhooks_due(now, 3, next_a);  // a batch of 3: more are due
  ASSERT_EQ(first.size(), 3u);
  EXPECT_EQ(next_a, now);
  EXPECT_EQ(first[0].job_id, job.id);
  EXPECT_EQ(first[0].url, "http://127.0.0.1:9/hook");
  const auto rest = b.item_webhooks_due(now, 10, next_b);  // the two a did not take
  ASSERT_EQ(rest.size(), 2u);
  std::set<int64_t> seen;
  for (const auto* batch : {&first, &rest})
    for (const ItemWebhook& w : *batch) {
      EXPECT_TRUE(seen.insert(w.index).second) << "item " << w.index << " leased twice";
      EXPECT_EQ(w.response, "{\"n\":" + std::to_string(w.index) + "}");
    }
  EXPECT_TRUE(b.item_webhooks_due(now, 10, next_b).empty());
  // Failed and due again: free for either replica; delivered: gone.
  a.item_webhook_tried(first[0].job_seq, first[0].index, false, now);
  for (size_t i = 1; i < first.size(); ++i) a.item_webhook_tried(first[i].job_seq, first[i].index, true, std::nullopt);
  const auto again = b.item_webhooks_due(now + 1, 10, next_b);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].index, first[0].index);
  EXPECT_EQ(again[0].attempts, 1);
  EXPECT_EQ(db.value("SELECT count(*) FROM job_items WHERE webhook_state = 'delivered'"), "2");
}

TEST(PgJobStore, ReplicasHearOfNewWorkAtOnce) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  PgJobStore listening(db.url(), std::chrono::seconds(30)), other(db.url(), std::chrono::seconds(30));
  std::mutex mutex;
  std::condition_variable heard;
  int calls = 0;
  listening.on_work_elsewhere([&] {
    std::lock_guard<std::mutex> lock(mutex);
    ++calls;
    heard.notify_all();
  });
  const auto calls_after = [&](std::chrono::milliseconds wait, int more_than) {
    std::unique_lock<std::mutex> lock(mutex);
    heard.wait_for(lock, wait, [&] { return calls > more_than; });
    return calls;
  };
  // The listener's first connection counts as news (what was stored before it is claimable).
  calls_after(std::chrono::seconds(5), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const int before = calls_after(std::chrono::milliseconds(0), 1000);
  bool created = false;
  other.create("key", items(2), "sha", created);
  // The store itself never polls: a call within the wait can only be the other replica's NOTIFY.
  EXPECT_GT(calls_after(std::chrono::seconds(5), before), before);
  // A replica that stops hands its leases back and says so.
  auto stopping = std::make_unique<PgJobStore>(db.url(), std::chrono::seconds(30));
  ASSERT_EQ(stopping->claim(2, {}).size(), 2u);
  const int before_stop = calls_after(std::chrono::milliseconds(300), 1000);
  stopping.reset();
  EXPECT_GT(calls_after(std::chrono::seconds(5), before_stop), before_stop);
  // Cleared: no more calls.
  listening.on_work_elsewhere({});
  const int cleared = calls_after(std::chrono::milliseconds(0), 1000);
  other.create("key", items(1), "sha", created);
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  EXPECT_EQ(calls_after(std::chrono::milliseconds(0), 1000), cleared);
}

TEST(PgPolicies, TwoRegistriesShareVersionsWithUniqueNumbers) {
  ARBITER_REQUIRE_PG();
  PgTestDatabase db;
  PolicyRegistry a(db.url()), b(db.url());
  PolicyDraft draft;
  draft.id = "spam";
  draft.text = "v1";
  draft.labels = {"ok", "spam"};
  draft.violating_labels = {"spam"};
  bool created = false;
  EXPECT_EQ(a.put(draft, &created).version, 1);
  EXPECT_TRUE(created);
  // b serves what a stored, and a repeat of the latest stores nothing.
  ASSERT_TRUE(b.get({"spam", std::nullopt}));
  EXPECT_EQ(b.get({"spam", std::nullopt})->draft, draft);
  EXPECT_EQ(b.put(draft, &created).version, 1);
  EXPECT_FALSE(created);
  // Both store new versions at once: every number once.
  std::vector<int> made_a, made_b;
  auto writer = [&](PolicyRegistry& r, std::vector<int>& made, const std::string& tag) {
    for (int i = 0; i < 15; ++i) {
      PolicyDraft d = draft;
      d.text = tag + std::to_string(i);
      made.push_back(r.put(d).version);
    }
  };
  std::thread ta([&] { writer(a, made_a, "a"); });
  std::thread tb([&] { writer(b, made_b, "b"); });
  ta.join();
  tb.join();
  std::set<int> all(made_a.begin(), made_a.end());
  all.insert(made_b.begin(), made_b.end());
  EXPECT_EQ(all.size(), 30u);
  EXPECT_EQ(*all.begin(), 2);
  EXPECT_EQ(*all.rbegin(), 31);
  EXPECT_EQ(a.versions("spam").size(), 31u);
  EXPECT_EQ(b.versions("spam"), a.versions("spam"));
  // A delete on one is seen by the other; the number is not reused.
  EXPECT_EQ(a.remove({"spam", 31}), std::vector<int>{31});
  EXPECT_FALSE(b.get({"spam", 31}));
  EXPECT_EQ(b.get({"spam", std::nullopt})->version, 30);
  PolicyDraft next = draft;
  next.text = "after the delete";
  EXPECT_EQ(b.put(next).version, 32);
  EXPECT_EQ(a.list().size(), 1u);
  // A new registry (a restart) loads the same.
  PolicyRegistry c(db.url());
  EXPECT_EQ(c.versions("spam"), a.versions("spam"));
}

TEST(PgUtil, AnUnreachableDatabaseIsStorageUnavailable) {
  ARBITER_REQUIRE_PG();
  // A loopback port nothing listens on (bound and closed).
  try {
    pg::Connection("postgresql://postgres:hunter2@127.0.0.1:1/none", "test db");
    ADD_FAILURE() << "connected to nothing";
  } catch (const StorageUnavailable& e) {
    EXPECT_EQ(std::string(e.what()).find("hunter2"), std::string::npos) << e.what();  // the password is never shown
    EXPECT_NE(std::string(e.what()).find("postgresql://postgres:***@127.0.0.1:1/none"), std::string::npos) << e.what();
  }
  PgTestDatabase db;
  pg::Connection c(db.url(), "test db");
  c.exec("SELECT 1");
  // The server ends the connection and refuses new ones: StorageUnavailable, then a reconnect
  // once it takes connections again.
  db.admin("ALTER DATABASE " + db.name() + " ALLOW_CONNECTIONS false");
  db.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '" + db.name() + "'");
  EXPECT_THROW(c.exec("SELECT 1"), StorageUnavailable);
  EXPECT_THROW(c.exec("SELECT 1"), StorageUnavailable);
  db.admin("ALTER DATABASE " + db.name() + " ALLOW_CONNECTIONS true");
  EXPECT_EQ(c.exec("SELECT 41 + 1").integer(0, 0), 42);
  // An SQL error is not an outage.
  try {
    c.exec("SELECT * FROM no_such_table");
    ADD_FAILURE() << "no error";
  } catch (const StorageUnavailable&) {
    ADD_FAILURE() << "an SQL error reported as an outage";
  } catch (const pg::Error& e) {
    EXPECT_EQ(e.sqlstate(), "42P01");
  }
}

}  // namespace
}  // namespace arbiter::api
