// DecisionStore: where the decision log lives (docs/decisions.md). One stored classification per
// policy result (DecisionRecord), the human feedback given on it, the queries of GET
// /v1/decisions and `arbiter export`, and the retention sweep. An interface so that the storage can
// change without the API noticing: SQLite (sqlite_decision_store.h, one file) and PostgreSQL
// (pg_decision_store.h, shared by replicas) implement the same calls (every call is one
// transaction, ids are made by the caller, the cursor is a decision id).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace arbiter::api {

// The latest human feedback on a decision.
struct DecisionFeedback {
  std::string label;       // as a verdict key (see DecisionRecord::verdict_key)
  std::string label_json;  // the label as the reviewer sent it (a JSON string or number)
  std::string reviewer;
  std::string note;
  std::string api_key_id;  // the key that sent it
  int64_t created_ms = 0;
  bool operator==(const DecisionFeedback&) const = default;
};

// One stored decision: one policy's verdict on one content.
struct DecisionRecord {
  std::string id;              // "dec_" + 12 hex digits of unix ms + 16 random hex digits (sorts by time)
  int64_t created_ms = 0;      // unix milliseconds
  std::string api_key_id;      // the non-secret id of the key that asked ("" without keys)
  std::string request_id;      // the classify response's id
  std::string model;
  std::string policy_id;
  std::optional<int> policy_version;  // registered policies
  std::string policy_sha256;   // of the policy text that judged
  std::string effort;          // low | medium | high | auto (the cascade)
  std::string mode;            // how the verdict was reached: "reasoning", "score", or the cascade stage that decided (rules, triage, score, low, medium, high; "none")
  std::string verdict_json;    // the verdict as JSON: 0, 1, "LABEL" or null
  // The verdict as the filters and feedback compare it: a number's JSON text ("0", "1"), a label's
  // text; nullopt when the answer could not be parsed.
  std::optional<std::string> verdict_key;
  bool violation = false;
  std::optional<double> confidence;
  std::string final_text;
  std::optional<std::string> reasoning;        // absent: not stored (--store-reasoning off)
  std::optional<std::string> content;          // absent: not stored (--store-content hash|none)
  std::optional<std::string> content_sha256;   // absent with --store-content none
  std::string finish_reason;   // stop | length
  int prompt_tokens = 0, cached_tokens = 0, reasoning_tokens = 0, completion_tokens = 0;
  double latency_ms = 0;       // from the request's arrival to its result
  std::optional<DecisionFeedback> feedback;    // the latest (filled by reads)
  int feedback_count = 0;                      // filled by reads
  bool operator==(const DecisionRecord&) const = default;
};

// The filters of GET /v1/decisions (all optional) and the page wanted.
struct DecisionQuery {
  std::optional<std::string> api_key_id;   // scope: only this key's decisions (non-admin keys)
  std::optional<std::string> policy_id;
  std::optional<int> policy_version;
  std::optional<int64_t> since_ms;         // created_ms >= since_ms
  std::optional<int64_t> until_ms;         // created_ms < until_ms
  std::optional<std::string> verdict_key;  // "null": unparsed verdicts
  std::optional<bool> violation;
  std::optional<bool> disagreement;        // true: latest feedback differs; false: it agrees
  std::optional<bool> has_feedback;
  std::optional<std::string> after;        // cursor: decisions listed after this id
  int limit = 20;
  bool oldest_first = false;               // default newest first; export reads oldest first
};

// A page of decisions, newest first (or oldest first when asked).
struct DecisionPage {
  std::vector<DecisionRecord> decisions;
  bool has_more = false;
};

// Where decisions and feedback are kept. Implementations are thread-safe; every call is atomic.
class DecisionStore {
 public:
  virtual ~DecisionStore() = default;
  // Stores every record, all or none (one transaction); throws std::runtime_error when they could
  // not be stored durably.
  virtual void append(const std::vector<DecisionRecord>& records) = 0;
  // The decision (with its latest feedback) or nullopt; with a scope, only that key's.
  virtual std::optional<DecisionRecord> get(const std::string& id, const std::optional<std::string>& api_key_id) const = 0;
  // A page of decisions matching `query` (query.limit of them, has_more when there are more).
  DecisionPage list(const DecisionQuery& query) const;
  // Adds feedback (kept as history; the latest is shown with the decision); false when there is no
  // such decision in the scope.
  virtual bool add_feedback(const std::string& decision_id, const std::optional<std::string>& scope,
                            const DecisionFeedback& feedback) = 0;
  // Deletes decisions (and their feedback) created before `cutoff_ms`; returns how many decisions.
  virtual int64_t delete_before(int64_t cutoff_ms) = 0;
  // Calls `each` for every decision matching `query` (limit ignored), oldest first.
  void for_each(const DecisionQuery& query, const std::function<void(const DecisionRecord&)>& each) const;
  virtual int64_t count() const = 0;

 protected:
  // Calls `each` with the decisions matching `query` in its order until `each` returns false;
  // paged: from its cursor (query.after) on, reading at least limit + 1 of them when there are.
  virtual void query(const DecisionQuery& query, bool paged, const std::function<bool(const DecisionRecord&)>& each) const = 0;
};

// One condition of a decision query, for a store's WHERE clause: SQL over the decisions table with
// at most one '?' standing for its value (text, or a number).
struct DecisionCondition {
  std::string sql;
  std::optional<std::string> text;
  std::optional<int64_t> number;
};
// The conditions of `query`'s filters (its scope and filters; not its cursor), in a fixed order.
std::vector<DecisionCondition> decision_conditions(const DecisionQuery& query);

// A new decision id for a decision made at `unix_ms`: ids sort by time (then at random).
std::string new_decision_id(int64_t unix_ms);
// Whether `id` has that shape ("dec_" + 28 lower-case hex digits).
bool valid_decision_id(const std::string& id);

}  // namespace arbiter::api
