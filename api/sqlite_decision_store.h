// SqliteDecisionStore: the decision log in an SQLite file (DecisionStore, api/decision_store.h),
// usually the same file as the registered policies. Tables `decisions` (one row per decision, the
// latest feedback beside it), `decision_feedback` (every feedback, for the record) and
// `arbiter_schema` (the version of each part's schema, checked at open: a newer one refuses).
// Commits are durable: the file is switched to WAL mode (one fsync per commit; readers do not wait
// for the writer) with synchronous=FULL.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "api/decision_store.h"

struct sqlite3;

namespace arbiter::api {

// The SQLite DecisionStore (see the top of this file). Two connections: one for writes (appends,
// feedback, retention), one for reads, so that listing does not queue behind a commit's fsync.
class SqliteDecisionStore : public DecisionStore {
 public:
  // Opens (creating the tables in) `path`; read_only: the file must exist and hold the tables, and
  // nothing is written (writes throw std::logic_error). Throws std::runtime_error when the file
  // cannot be used, saying why.
  explicit SqliteDecisionStore(const std::string& path, bool read_only = false);
  ~SqliteDecisionStore() override;
  SqliteDecisionStore(const SqliteDecisionStore&) = delete;
  SqliteDecisionStore& operator=(const SqliteDecisionStore&) = delete;

  void append(const std::vector<DecisionRecord>& records) override;
  std::optional<DecisionRecord> get(const std::string& id, const std::optional<std::string>& api_key_id) const override;
  bool add_feedback(const std::string& decision_id, const std::optional<std::string>& scope,
                    const DecisionFeedback& feedback) override;
  int64_t delete_before(int64_t cutoff_ms) override;
  int64_t count() const override;

  static constexpr int kSchemaVersion = 1;

 private:
  // Closes an SQLite connection (the unique_ptr's deleter).
  struct Closer {
    void operator()(sqlite3* db) const;
  };
  std::unique_ptr<sqlite3, Closer> open(bool read_only) const;
  void query(const DecisionQuery& q, bool paged, const std::function<bool(const DecisionRecord&)>& each) const override;

  std::string path_;
  bool read_only_;
  mutable std::mutex write_mutex_, read_mutex_;
  std::unique_ptr<sqlite3, Closer> writer_;  // null when read-only
  std::unique_ptr<sqlite3, Closer> reader_;
};

}  // namespace arbiter::api
