// Cases every DecisionStore must pass, whatever keeps it: run against SQLite
// (decision_store_test.cc) and PostgreSQL (pg_storage_test.cc). Append, get, scoped reads, keyset
// pages without duplicates or gaps, filters; feedback and disagreement, retention.
#pragma once

#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "api/decision_store.h"

namespace arbiter::api::testing_cases {

inline DecisionRecord make(int64_t ms, const std::string& key, const std::string& policy, const std::string& verdict) {
  DecisionRecord r;
  r.id = new_decision_id(ms);
  r.created_ms = ms;
  r.api_key_id = key;
  r.request_id = "clf-1";
  r.model = "m";
  r.policy_id = policy;
  r.policy_version = 2;
  r.policy_sha256 = "ab";
  r.effort = "low";
  r.mode = "reasoning";
  r.verdict_json = verdict;
  r.verdict_key = verdict == "null" ? std::nullopt : std::optional<std::string>(verdict);
  r.violation = verdict == "1";
  r.confidence = 0.75;
  r.final_text = verdict;
  r.reasoning = "because";
  r.content = "text";
  r.content_sha256 = "cd";
  r.finish_reason = "stop";
  r.prompt_tokens = 10;
  r.cached_tokens = 4;
  r.reasoning_tokens = 3;
  r.completion_tokens = 5;
  r.latency_ms = 12.5;
  return r;
}


// 57 decisions of two keys and two policies: read back whole, paged newest first, filtered.
inline void stores_reads_scopes_and_pages(DecisionStore& store) {
  std::vector<DecisionRecord> all;
  for (int i = 0; i < 57; ++i) all.push_back(make(1'000'000 + i * 10, i % 3 == 0 ? "key_b" : "key_a", i % 2 ? "spam" : "hate", i % 4 ? "0" : "1"));
  all[5].content.reset();
  all[5].reasoning.reset();
  all[5].confidence.reset();
  all[5].policy_version.reset();
  store.append(std::vector<DecisionRecord>(all.begin(), all.begin() + 30));
  store.append(std::vector<DecisionRecord>(all.begin() + 30, all.end()));
  EXPECT_EQ(store.count(), 57);

  // Every field comes back as stored; a scope hides other keys' decisions.
  for (int i : {0, 5, 56}) {
    const auto got = store.get(all[i].id, std::nullopt);
    ASSERT_TRUE(got);
    EXPECT_EQ(*got, all[i]);
  }
  EXPECT_TRUE(store.get(all[1].id, std::string("key_a")));
  EXPECT_FALSE(store.get(all[0].id, std::string("key_a")));
  EXPECT_FALSE(store.get(new_decision_id(5), std::nullopt));

  // Pages of 7, newest first: every decision once, in order.
  DecisionQuery q;
  q.limit = 7;
  std::vector<std::string> seen;
  for (int pages = 0;; ++pages) {
    ASSERT_LT(pages, 20);
    const DecisionPage page = store.list(q);
    for (const auto& d : page.decisions) seen.push_back(d.id);
    if (!page.has_more) break;
    EXPECT_EQ(page.decisions.size(), 7u);
    q.after = page.decisions.back().id;
  }
  ASSERT_EQ(seen.size(), 57u);
  EXPECT_EQ(std::set<std::string>(seen.begin(), seen.end()).size(), 57u);
  for (size_t i = 0; i < seen.size(); ++i) EXPECT_EQ(seen[i], all[56 - i].id) << i;

  // Filters, alone and together.
  auto count = [&](DecisionQuery f) {
    f.limit = 100;
    return store.list(f).decisions.size();
  };
  DecisionQuery f;
  f.api_key_id = "key_b";
  EXPECT_EQ(count(f), 19u);
  f = {};
  f.policy_id = "spam";
  EXPECT_EQ(count(f), 28u);
  f.policy_version = 2;
  EXPECT_EQ(count(f), 27u);  // all[5] has no version (an inline policy)
  f.policy_version = 3;
  EXPECT_EQ(count(f), 0u);
  f = {};
  f.verdict_key = "1";
  EXPECT_EQ(count(f), 15u);
  f = {};
  f.violation = true;
  EXPECT_EQ(count(f), 15u);
  f = {};
  f.since_ms = 1'000'000 + 100;
  f.until_ms = 1'000'000 + 200;
  EXPECT_EQ(count(f), 10u);
  f = {};
  f.policy_id = "hate";
  f.api_key_id = "key_a";
  EXPECT_EQ(count(f), 19u);
}

// Feedback (latest shown, history counted, scoped), disagreement filters, an unparsed verdict,
// retention with the feedback; `all` gets the six decisions stored (oldest first).
inline void feedback_disagreement_and_retention(DecisionStore& store, std::vector<DecisionRecord>& all) {
  for (int i = 0; i < 6; ++i) all.push_back(make(1000 * (i + 1), "key_a", "spam", i % 2 ? "1" : "0"));
  all[4].verdict_json = "null";
  all[4].verdict_key.reset();
  store.append(all);
  DecisionFeedback f{"1", "1", "ann", "first", "key_r", 7000};
  EXPECT_TRUE(store.add_feedback(all[0].id, std::nullopt, f));  // 0 -> 1: disagrees
  f.label = "0", f.label_json = "0", f.note = "second";
  EXPECT_TRUE(store.add_feedback(all[0].id, std::nullopt, f));  // the latest agrees
  f.label = "0", f.label_json = "0";
  EXPECT_TRUE(store.add_feedback(all[1].id, std::string("key_a"), f));  // 1 -> 0: disagrees
  EXPECT_TRUE(store.add_feedback(all[2].id, std::nullopt, f));          // 0 -> 0: agrees
  EXPECT_TRUE(store.add_feedback(all[4].id, std::nullopt, f));          // null -> 0: disagrees
  EXPECT_FALSE(store.add_feedback(all[3].id, std::string("key_b"), f)); // out of scope
  EXPECT_FALSE(store.add_feedback(new_decision_id(1), std::nullopt, f));

  const auto first = store.get(all[0].id, std::nullopt);
  ASSERT_TRUE(first && first->feedback);
  EXPECT_EQ(first->feedback->note, "second");
  EXPECT_EQ(first->feedback->label, "0");
  EXPECT_EQ(first->feedback_count, 2);
  EXPECT_FALSE(store.get(all[3].id, std::nullopt)->feedback);

  DecisionQuery q;
  q.disagreement = true;
  std::set<std::string> ids;
  for (const auto& d : store.list(q).decisions) ids.insert(d.id);
  EXPECT_EQ(ids, (std::set<std::string>{all[1].id, all[4].id}));
  q.disagreement = false;
  ids.clear();
  for (const auto& d : store.list(q).decisions) ids.insert(d.id);
  EXPECT_EQ(ids, (std::set<std::string>{all[0].id, all[2].id}));
  q = {};
  q.verdict_key = "null";
  ASSERT_EQ(store.list(q).decisions.size(), 1u);
  EXPECT_EQ(store.list(q).decisions[0].id, all[4].id);

  // Retention: exactly the decisions before the cutoff go, with their feedback.
  EXPECT_EQ(store.delete_before(3000), 2);
  EXPECT_FALSE(store.get(all[0].id, std::nullopt));
  EXPECT_FALSE(store.get(all[1].id, std::nullopt));
  EXPECT_TRUE(store.get(all[2].id, std::nullopt));
  EXPECT_EQ(store.count(), 4);
}

}  // namespace arbiter::api::testing_cases
