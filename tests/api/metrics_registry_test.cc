// The Prometheus registry's text format, and the policy registry's versions and SQLite persistence:
// rows the API could not serve and databases that cannot be written refuse start-up; read-only mode.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <string>

#include "api/metrics.h"
#include "api/policy_registry.h"
#include "tests/test_util.h"
#include "tests/unwritable.h"

namespace arbiter::api {
namespace {

TEST(ApiMetrics, TextExpositionFormat) {
  MetricsRegistry m;
  m.counter("requests_total", "Requests.", {{"endpoint", "/v1/classify"}, {"status", "200"}}).inc();
  m.counter("requests_total", "Requests.", {{"endpoint", "/v1/classify"}, {"status", "200"}}).inc(2);
  m.counter("requests_total", "Requests.", {{"endpoint", "/v1/classify"}, {"status", "429"}}).inc();
  m.gauge("queue_depth", "Queued.\nSecond line").set(3.5);
  Histogram& h = m.histogram("latency_seconds", "Latency.", {0.1, 1});
  h.observe(0.05);
  h.observe(0.5);
  h.observe(5);
  m.gauge("weird", "Label escaping.", {{"v", "a\"b\\c\nd"}}).set(1);
  const std::string text = m.render();
  const std::string expected =
      "# HELP requests_total Requests.\n"
      "# TYPE requests_total counter\n"
      "requests_total{endpoint=\"/v1/classify\",status=\"200\"} 3\n"
      "requests_total{endpoint=\"/v1/classify\",status=\"429\"} 1\n"
      "# HELP queue_depth Queued.\\nSecond line\n"
      "# TYPE queue_depth gauge\n"
      "queue_depth 3.5\n"
      "# HELP latency_seconds Latency.\n"
      "# TYPE latency_seconds histogram\n"
      "latency_seconds_bucket{le=\"0.1\"} 1\n"
      "latency_seconds_bucket{le=\"1\"} 2\n"
      "latency_seconds_bucket{le=\"+Inf\"} 3\n"
      "latency_seconds_sum 5.55\n"
      "latency_seconds_count 3\n"
      "# HELP weird Label escaping.\n"
      "# TYPE weird gauge\n"
      "weird{v=\"a\\\"b\\\\c\\nd\"} 1\n";
  EXPECT_EQ(text, expected);
}

TEST(ApiMetrics, MirroredHistogramAndCountersAndBadNames) {
  MetricsRegistry m;
  m.histogram("step_seconds", "Steps.", {0.01, 0.1}, {{"rank", "0"}}).set({4, 0, 1}, 2.25);
  m.counter("steps_total", "Steps.").set_total(5);
  const std::string text = m.render();
  EXPECT_NE(text.find("step_seconds_bucket{rank=\"0\",le=\"0.01\"} 4\n"), std::string::npos) << text;
  EXPECT_NE(text.find("step_seconds_bucket{rank=\"0\",le=\"0.1\"} 4\n"), std::string::npos) << text;
  EXPECT_NE(text.find("step_seconds_bucket{rank=\"0\",le=\"+Inf\"} 5\n"), std::string::npos) << text;
  EXPECT_NE(text.find("step_seconds_count{rank=\"0\"} 5\n"), std::string::npos) << text;
  EXPECT_NE(text.find("steps_total 5\n"), std::string::npos) << text;
  EXPECT_THROW(m.gauge("steps_total", "clash"), std::invalid_argument);
  EXPECT_THROW(m.gauge("1bad", "x"), std::invalid_argument);
  EXPECT_THROW(m.gauge("ok", "x", {{"bad-label", "v"}}), std::invalid_argument);
  EXPECT_THROW(m.histogram("h", "x", {1, 0.5}), std::invalid_argument);
  EXPECT_THROW(m.counter("c", "x").inc(-1), std::invalid_argument);
  EXPECT_EQ(format_metric_value(0.25), "0.25");
  EXPECT_EQ(format_metric_value(1e20), "1e+20");
}

TEST(ApiPolicyRegistry, RefsAndIds) {
  EXPECT_TRUE(PolicyRegistry::valid_id("spam.v2_x-1"));
  EXPECT_FALSE(PolicyRegistry::valid_id(""));
  EXPECT_FALSE(PolicyRegistry::valid_id("a b"));
  EXPECT_FALSE(PolicyRegistry::valid_id(std::string(129, 'a')));
  EXPECT_EQ(PolicyRegistry::parse_ref("spam@12")->version, 12);
  EXPECT_FALSE(PolicyRegistry::parse_ref("spam")->version.has_value());
  for (const char* bad : {"spam@", "spam@0", "spam@01", "spam@x", "@1", "a@1@2", "spam@9999999999"})
    EXPECT_FALSE(PolicyRegistry::parse_ref(bad).has_value()) << bad;
}

TEST(ApiPolicyRegistry, VersionsNeverReused) {
  PolicyRegistry r;
  bool created = false;
  EXPECT_EQ(r.put({"p", "one", {}, {}, ""}, &created).version, 1);
  EXPECT_TRUE(created);
  EXPECT_EQ(r.put({"p", "one", {}, {}, ""}, &created).version, 1);
  EXPECT_FALSE(created);
  EXPECT_EQ(r.put({"p", "two", {"A", "B"}, {"B"}, "d"}).version, 2);
  EXPECT_EQ(r.get({"p", std::nullopt})->draft.text, "two");
  EXPECT_EQ(r.get({"p", 1})->draft.text, "one");
  EXPECT_EQ(r.versions("p"), (std::vector<int>{1, 2}));
  EXPECT_EQ(r.remove({"p", std::nullopt}), (std::vector<int>{1, 2}));
  EXPECT_FALSE(r.get({"p", std::nullopt}).has_value());
  EXPECT_TRUE(r.list().empty());
  EXPECT_EQ(r.put({"p", "three", {}, {}, ""}).version, 3);
  EXPECT_THROW(r.put({"bad id", "x", {}, {}, ""}), std::invalid_argument);
  EXPECT_THROW(r.put({"q", "", {}, {}, ""}), std::invalid_argument);
}

TEST(ApiPolicyRegistry, PersistsInSqlite) {
  testing::TempDir tmp;
  const std::string db = tmp.file("policies.db");
  {
    PolicyRegistry r(db);
    EXPECT_TRUE(r.persistent());
    r.put({"spam", "v1", {"0", "1"}, {"1"}, "first"});
    r.put({"spam", "v2 with 'quotes' and unicode \xc3\xa9", {"0", "1"}, {"1"}, "second"});
    r.put({"hate", "h1", {}, {}, ""});
    r.put({"gone", "g", {}, {}, ""});
    r.remove({"gone", std::nullopt});
    r.remove({"spam", 1});
  }
  PolicyRegistry again(db);
  ASSERT_EQ(again.list().size(), 2u);
  const auto spam = again.get({"spam", std::nullopt});
  ASSERT_TRUE(spam);
  EXPECT_EQ(spam->version, 2);
  EXPECT_EQ(spam->draft.text, "v2 with 'quotes' and unicode \xc3\xa9");
  EXPECT_EQ(spam->draft.labels, (std::vector<std::string>{"0", "1"}));
  EXPECT_EQ(spam->draft.violating_labels, (std::vector<std::string>{"1"}));
  EXPECT_EQ(spam->draft.description, "second");
  EXPECT_FALSE(again.get({"spam", 1}).has_value());
  EXPECT_FALSE(again.get({"gone", std::nullopt}).has_value());
  EXPECT_EQ(again.put({"gone", "g2", {}, {}, ""}).version, 2);  // numbering continues after the restart
  EXPECT_THROW(PolicyRegistry(tmp.file("no/such/dir/x.db")), std::runtime_error);
}

// Runs SQL on a policy db directly (what an operator or another tool might write into it).
void run_sql(const std::string& db, const std::string& sql) {
  sqlite3* raw = nullptr;
  ASSERT_EQ(sqlite3_open(db.c_str(), &raw), SQLITE_OK);
  char* error = nullptr;
  const int rc = sqlite3_exec(raw, sql.c_str(), nullptr, nullptr, &error);
  const std::string why = error ? error : "";
  sqlite3_free(error);
  sqlite3_close(raw);
  ASSERT_EQ(rc, SQLITE_OK) << why;
}

std::string start_error(const std::string& db, bool read_only = false) {
  try {
    PolicyRegistry r(db, read_only);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

TEST(ApiPolicyRegistry, RowsTheApiCouldNotServeRefuseStartWithTheRowNamed) {
  testing::TempDir tmp;
  struct Bad {
    const char* values;  // id, version, text, labels, violating_labels
    const char* named;   // how the row is named
    const char* problem;
  };
  const Bad bad[] = {
      {"'spam@2', 1, 'x', '[]', '[]'", "id 'spam@2' and version 1", "the id is not"},
      {"'has space', 1, 'x', '[]', '[]'", "id 'has space'", "the id is not"},
      {"'big', 2147483648, 'x', '[]', '[]'", "version 2147483648", "not in 1..2147483647"},
      {"'zero', 0, 'x', '[]', '[]'", "version 0", "not in 1..2147483647"},
      {"'empty', 1, '', '[]', '[]'", "id 'empty'", "the text is empty"},
      {"'labels', 1, 'x', 'not json', '[]'", "id 'labels'", "'labels' is not a JSON array of strings"},
      {"'numbers', 1, 'x', '[1, 2]', '[]'", "id 'numbers'", "'labels' is not a JSON array of strings"},
      {"'blank', 1, 'x', '[\"\"]', '[]'", "id 'blank'", "a label is empty"},
      {"'stray', 1, 'x', '[\"A\"]', '[\"B\"]'", "id 'stray'", "the violating label 'B' is not one of its labels"},
  };
  for (size_t i = 0; i < std::size(bad); ++i) {
    const std::string db = tmp.file("bad" + std::to_string(i) + ".db");
    { PolicyRegistry fresh(db); fresh.put({"good", "fine", {}, {}, ""}); }
    run_sql(db, std::string("INSERT INTO policies (id, version, text, labels, violating_labels, description, created) VALUES (") +
                    bad[i].values + ", '', 0)");
    const std::string why = start_error(db);
    EXPECT_NE(why.find(db), std::string::npos) << why;
    EXPECT_NE(why.find(bad[i].named), std::string::npos) << why;
    EXPECT_NE(why.find(bad[i].problem), std::string::npos) << why;
    // Read-only mode checks rows the same way.
    EXPECT_NE(start_error(db, true).find(bad[i].problem), std::string::npos);
  }
  // A deleted version may keep an empty text; the good rows load.
  const std::string db = tmp.file("ok.db");
  { PolicyRegistry fresh(db); fresh.put({"good", "fine", {"A"}, {"A"}, ""}); }
  run_sql(db, "INSERT INTO policies (id, version, text, labels, violating_labels, description, created, deleted) "
              "VALUES ('old', 1, '', '[]', '[]', '', 0, 1)");
  PolicyRegistry loaded(db);
  EXPECT_EQ(loaded.list().size(), 1u);
  EXPECT_EQ(loaded.put({"old", "new text", {}, {}, ""}).version, 2);
}

// Rules and cascades are stored with their version and survive a restart; a file written before
// policies had them gains the column and loads as it was; a row whose pipeline is not the JSON the
// API writes refuses start-up with the row named.
TEST(ApiPolicyRegistry, RulesAndCascadesArePersistedAndOldFilesUpgraded) {
  testing::TempDir tmp;
  const std::string db = tmp.file("p.db");
  PolicyDraft draft{"spam", "text", {}, {}, ""};
  draft.rules = {{"deny", {{{"id", "R1"}, {"pattern", "crypto"}}}}};
  draft.cascade = {{"stages", {"rules", "score", "high"}}};
  { PolicyRegistry r(db); EXPECT_EQ(r.put(draft).version, 1); }
  {
    PolicyRegistry again(db);
    const auto got = again.get({"spam", std::nullopt});
    ASSERT_TRUE(got.has_value());
    EXPECT_EQ(got->draft.rules, draft.rules);
    EXPECT_EQ(got->draft.cascade, draft.cascade);
    bool created = true;
    again.put(draft, &created);
    EXPECT_FALSE(created);  // the same draft, rules and cascade included: no new version
    PolicyDraft changed = draft;
    changed.cascade = {{"stages", {"score", "high"}}};
    EXPECT_EQ(again.put(changed).version, 2);
  }
  const std::string old = tmp.file("old.db");
  run_sql(old,
          "CREATE TABLE policies (id TEXT NOT NULL, version INTEGER NOT NULL, text TEXT NOT NULL, labels TEXT NOT NULL,"
          " violating_labels TEXT NOT NULL, description TEXT NOT NULL, created INTEGER NOT NULL,"
          " deleted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (id, version));"
          "INSERT INTO policies VALUES ('legacy', 3, 'old text', '[]', '[]', '', 0, 0)");
  EXPECT_EQ(start_error(old, true), "");  // read-only: served as it is, without the column
  {
    PolicyRegistry upgraded(old);
    const auto got = upgraded.get({"legacy", std::nullopt});
    ASSERT_TRUE(got.has_value());
    EXPECT_EQ(got->version, 3);
    EXPECT_TRUE(got->draft.rules.is_null());
    EXPECT_EQ(upgraded.put(draft).version, 1);
  }
  EXPECT_TRUE(PolicyRegistry(old).get({"spam", std::nullopt})->draft.rules.is_object());
  for (const char* pipeline : {"not json", "[]", "{\"rules\": 3}", "{\"cascade\": \"x\"}"}) {
    const std::string bad = tmp.file(std::string("bad-") + std::to_string(std::hash<std::string>{}(pipeline)) + ".db");
    { PolicyRegistry fresh(bad); }
    run_sql(bad, std::string("INSERT INTO policies (id, version, text, labels, violating_labels, description, created, pipeline) "
                             "VALUES ('odd', 1, 'x', '[]', '[]', '', 0, '") + pipeline + "')");
    const std::string why = start_error(bad);
    EXPECT_NE(why.find("id 'odd'"), std::string::npos) << why;
    EXPECT_NE(why.find("'pipeline'"), std::string::npos) << why;
  }
}

TEST(ApiPolicyRegistry, UnwritableDatabaseRefusesStartUnlessReadOnly) {
  testing::TempDir tmp;
  const std::string db = tmp.file("policies.db");
  { PolicyRegistry r(db); r.put({"kept", "a policy", {}, {}, ""}); }
  {
    testing::Unwritable file(db, false);
    if (!file.ok()) GTEST_SKIP() << "cannot make a file unwritable here";
    const std::string why = start_error(db);
    EXPECT_NE(why.find("policy db " + db + " is read-only"), std::string::npos) << why;
    EXPECT_NE(why.find("--policy-db-readonly"), std::string::npos) << why;
    PolicyRegistry r(db, true);
    EXPECT_TRUE(r.read_only());
    ASSERT_EQ(r.list().size(), 1u);
    EXPECT_EQ(r.get({"kept", std::nullopt})->draft.text, "a policy");
    EXPECT_THROW(r.put({"new", "x", {}, {}, ""}), std::logic_error);
    EXPECT_THROW(r.remove({"kept", std::nullopt}), std::logic_error);
  }
  {
    // The file is writable but its folder is not: SQLite could not create its journal.
    testing::Unwritable folder(tmp.path(), true);
    if (!folder.ok()) GTEST_SKIP() << "cannot make a folder unwritable here";
    const std::string why = start_error(db);
    EXPECT_NE(why.find("policy db " + db + " cannot be written"), std::string::npos) << why;
    EXPECT_NE(why.find("its folder"), std::string::npos) << why;
    // A new file in it cannot be made either.
    EXPECT_NE(start_error(tmp.file("new.db")), "");
    EXPECT_EQ(start_error(db, true), "");
  }
  PolicyRegistry writable(db);  // permissions back: starts, and the probe left nothing behind
  EXPECT_EQ(writable.put({"kept", "second", {}, {}, ""}).version, 2);
  EXPECT_NE(start_error(tmp.file("missing.db"), true).find("does not exist"), std::string::npos);
  EXPECT_THROW(PolicyRegistry("", true), std::invalid_argument);
}

}  // namespace
}  // namespace arbiter::api
