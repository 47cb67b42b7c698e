// PgDecisionStore: the decision log in PostgreSQL (DecisionStore, api/decision_store.h), shared by
// every `arbiter serve` replica on the database: tables `decisions` and `decision_feedback` as in
// SQLite (api/pg_schema.cc). Commits are durable (the server's synchronous_commit, on by default).
// A statement that cannot reach the server throws StorageUnavailable (api/errors.h).
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "api/decision_store.h"
#include "api/pg_util.h"

namespace arbiter::api {

// The PostgreSQL DecisionStore. Two connections, like the SQLite store: one for writes, one for
// reads, so that listing does not queue behind a commit.
class PgDecisionStore : public DecisionStore {
 public:
  // Connects to `url` and brings its schema up to date; throws StorageUnavailable when the server
  // cannot be reached.
  explicit PgDecisionStore(const std::string& url);
  ~PgDecisionStore() override;
  PgDecisionStore(const PgDecisionStore&) = delete;
  PgDecisionStore& operator=(const PgDecisionStore&) = delete;

  void append(const std::vector<DecisionRecord>& records) override;
  std::optional<DecisionRecord> get(const std::string& id, const std::optional<std::string>& api_key_id) const override;
  bool add_feedback(const std::string& decision_id, const std::optional<std::string>& scope,
                    const DecisionFeedback& feedback) override;
  int64_t delete_before(int64_t cutoff_ms) override;
  int64_t count() const override;

 private:
  void query(const DecisionQuery& q, bool paged, const std::function<bool(const DecisionRecord&)>& each) const override;
  mutable std::mutex write_mutex_, read_mutex_;
  mutable pg::Connection writer_, reader_;
};

}  // namespace arbiter::api
