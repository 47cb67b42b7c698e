// PgJobStore: jobs in PostgreSQL, shared by every `arbiter serve` replica on the database
// (docs/jobs.md, "Many replicas on PostgreSQL"). An item is run by one replica at a time: claiming
// takes pending items whose lease is free or expired (SELECT ... FOR UPDATE SKIP LOCKED, so replicas
// claiming at once never wait for or take each other's rows) and leases them to this replica; a
// thread renews this replica's leases every third of the lease time. Storing a result checks that
// the lease is still this replica's in the same transaction that marks the item done, so a
// replica that lost its lease (it stalled past it, and another took the item) stores nothing: one
// result per item. A replica that dies stops renewing; its items are claimable once the lease ends.
// Webhook deliveries are leased the same way.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "api/jobs.h"
#include "api/pg_util.h"

namespace arbiter::api {

// The PostgreSQL JobStore of one replica (see the top of this file). Thread-safe.
class PgJobStore : public JobStore {
 public:
  // Connects to `url` (and migrates the schema, api/pg_util.h); `lease`: how long a claim holds
  // without renewal. Throws StorageUnavailable when the database cannot be reached.
  PgJobStore(const std::string& url, std::chrono::milliseconds lease);
  // Stops renewing and hands back this replica's leases on items not done, for others to take now.
  ~PgJobStore() override;
  PgJobStore(const PgJobStore&) = delete;
  PgJobStore& operator=(const PgJobStore&) = delete;

  JobInfo create(const std::string& owner, const JobSubmission& submission, const std::string& request_sha256, bool& created) override;
  std::optional<JobInfo> get(const std::string& id) override;
  std::vector<JobInfo> list(const std::optional<std::string>& owner, int64_t before_seq, size_t limit) override;
  std::optional<JobInfo> cancel(const std::string& id, bool& changed) override;
  std::vector<ClaimedItem> claim(size_t n, const std::set<std::pair<int64_t, int64_t>>& busy) override;
  std::vector<JobInfo> finish_items(const std::vector<ItemResult>& results) override;
  size_t results(int64_t job_seq, int64_t after_index, size_t limit,
                 const std::function<void(int64_t, const std::string&, int, const std::string&)>& row) override;
  std::vector<JobInfo> webhooks_due(int64_t now_ms, std::optional<int64_t>& next_ms) override;
  void webhook_tried(const std::string& id, bool delivered, std::optional<int64_t> retry_ms) override;
  std::vector<ItemWebhook> item_webhooks_due(int64_t now_ms, size_t limit, std::optional<int64_t>& next_ms) override;
  void item_webhook_tried(int64_t job_seq, int64_t index, bool delivered, std::optional<int64_t> retry_ms) override;
  int64_t delete_finished_before(int64_t cutoff_s) override;
  // Heard through LISTEN/NOTIFY: every replica's store announces new jobs, and leases handed back
  // at shutdown, on one channel.
  void on_work_elsewhere(std::function<void()> woken) override;

  // This replica's name in the lease columns: host, pid and a random part.
  const std::string& replica() const { return replica_; }

 private:
  void renew_loop();
  void listen_loop();
  std::string url_;
  std::mutex mutex_;  // guards conn_: every write, and the claims
  pg::Connection conn_;
  // The API's reads (a job, the list, results pages) on a connection of their own: they never
  // wait behind a large submission or the runner's claims and commits.
  std::mutex read_mutex_;
  pg::Connection reader_;
  std::chrono::milliseconds lease_;
  std::string replica_;
  std::mutex renew_mutex_;
  std::condition_variable renew_wake_;
  bool stopping_ = false;  // guarded by renew_mutex_; ends both threads
  std::thread renewer_;
  std::mutex woken_mutex_;  // guards woken_, and is held while it runs
  std::function<void()> woken_;
  std::thread listener_;
};

}  // namespace arbiter::api
