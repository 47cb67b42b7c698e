// Durable asynchronous classification jobs (docs/jobs.md): POST /v1/jobs takes many classify
// bodies at once, a runner feeds them through the model behind synchronous traffic, and the results
// are read back later (GET /v1/jobs/{id}/results). This file holds what does not depend on the
// server: the submission parser (JSON or OpenAI batch JSONL), the store interface and its SQLite
// implementation (jobs and items in the decision log's database; PostgreSQL in
// api/pg_job_store.h), the runner's worker threads, and the webhook sender with its HTTP
// client and HMAC signature.
//
// Exactly one result per item: an item is pending until the transaction that stores its result
// also marks it done, so after a crash (kill -9) an item that was in flight is simply pending again
// and runs once more; none is lost, none is stored twice.
#pragma once

#include <sqlite3.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "api/errors.h"
#include "api/webhook_client.h"

namespace arbiter::api {

// How jobs are stored, run and reported (from `arbiter serve` options).
struct JobOptions {
  std::string db;                        // SQLite file or postgres:// URL; "" : no jobs (the endpoints answer 404)
  int max_items = 10000;                 // items per job
  int concurrency = 4;                   // job items in the scheduler at once
  std::vector<std::string> webhook_allow;  // URL prefixes a webhook_url must start with (none: no webhooks)
  std::string webhook_secret;            // HMAC-SHA256 key of X-Arbiter-Signature
  int webhook_attempts = 5;              // deliveries tried before the webhook is given up
  std::chrono::milliseconds webhook_backoff{500};  // before the 2nd try; doubled for each further one
  std::chrono::milliseconds webhook_timeout{5000};  // per delivery (connect, TLS, send, answer)
  std::string webhook_ca;                // PEM file of CAs trusted for https receivers besides the system's
  // PostgreSQL: how long an item (or a webhook) stays leased to the replica working on it after the
  // replica last renewed the lease; a replica that dies leaves its items to others after this.
  std::chrono::milliseconds lease{30000};
  // Finished jobs (with their items and results) are deleted this many days after they finished,
  // once no webhook of theirs is pending; checked at start and every interval. 0: kept forever.
  double retention_days = 0;
  std::chrono::milliseconds retention_interval{std::chrono::hours(1)};
};

// The endpoints a job item may run.
inline constexpr const char* kClassifyUrl = "/v1/classify";
inline constexpr const char* kChatUrl = "/v1/chat/completions";

// One item as submitted: its caller's id, the endpoint it runs and its request body (JSON text).
struct JobItemInput {
  std::string custom_id;
  std::string body;
  std::string url = kClassifyUrl;
};

// A parsed POST /v1/jobs body.
struct JobSubmission {
  std::vector<JobItemInput> items;
  std::optional<std::string> idempotency_key;
  std::optional<std::string> webhook_url;
  bool webhook_items = false;  // also one webhook per finished item
};

// Thrown by parse_job_submission when items are invalid: every bad item with its number (1-based:
// the JSONL line, or the place in "items"), and the error of each.
struct JobItemError {
  size_t line = 0;
  std::string custom_id;  // "" when the item has none
  ApiError error;
};
class JobItemsInvalid : public std::exception {
 public:
  JobItemsInvalid(std::vector<JobItemError> errors, size_t items) : errors_(std::move(errors)), items_(items) {}
  const std::vector<JobItemError>& errors() const { return errors_; }
  size_t items() const { return items_; }
  const char* what() const noexcept override { return "invalid job items"; }
  // The 400 body: an OpenAI-style error whose "errors" lists each bad item.
  std::string body() const;

 private:
  std::vector<JobItemError> errors_;
  size_t items_;
};

// Parses a submission. jsonl: the body is OpenAI batch-file lines {"custom_id", "method": "POST",
// "url": "/v1/classify" | "/v1/chat/completions", "body"} (blank lines skipped; the idempotency key
// and webhook URL then come from the caller); else a JSON object {"items": [{"custom_id", "url"?,
// "body"}], "idempotency_key"?, "webhook_url"?, "webhook_items"?} (url default "/v1/classify"). `check` validates one
// item's body for its url (throws ApiException). Throws ApiException for a malformed envelope, more
// than `max_items` items, or none; JobItemsInvalid (all bad items) when any item is bad. custom_ids
// must be unique in a job.
JobSubmission parse_job_submission(const std::string& body, bool jsonl, size_t max_items,
                                   const std::function<void(const std::string& url, const std::string& body)>& check);

// A job as stored.
struct JobInfo {
  int64_t seq = 0;              // store order
  std::string id;               // "job_" + 24 hex digits
  std::string owner;            // the API key id that created it
  std::optional<std::string> idempotency_key;
  std::optional<std::string> webhook_url;
  std::string request_sha256;   // of the items, to tell a reused idempotency key with other items
  std::string state;            // queued | running | completed | failed | cancelled
  int64_t total = 0, completed = 0, failed = 0;
  int64_t created_at = 0;       // unix seconds
  std::optional<int64_t> started_at, finished_at;
  std::string webhook_state;    // none | pending | delivered | failed
  int64_t webhook_attempts = 0;
  int64_t webhook_next_ms = 0;  // unix ms of the next try (pending)
  bool webhook_items = false;   // each finished item is posted to webhook_url too
  bool finished() const { return state == "completed" || state == "failed" || state == "cancelled"; }
};

// A new job id: "job_" + 24 random hex digits.
std::string new_job_id();

// The job object of the API (GET /v1/jobs/{id}).
nlohmann::json job_json(const JobInfo& job);

// An item handed to the runner.
struct ClaimedItem {
  int64_t job_seq = 0;
  int64_t index = 0;
  std::string job_id;
  std::string owner;
  std::string custom_id;
  std::string body;
  std::string url = kClassifyUrl;  // the endpoint it runs
};

// A finished item whose own webhook is due (jobs submitted with webhook_items).
struct ItemWebhook {
  int64_t job_seq = 0;
  int64_t index = 0;
  std::string job_id;
  std::string url;  // the job's webhook_url
  std::string custom_id;
  int status = 0;
  std::string response;
  int64_t attempts = 0;  // deliveries tried so far
};

// One item's result: its HTTP status and response body.
struct JobItemResult {
  int64_t job_seq = 0;
  int64_t index = 0;
  int status = 200;
  std::string response;
};

// Where jobs and their items are kept: SQLite (SqliteJobStore, below) or PostgreSQL shared by
// several replicas (PgJobStore, api/pg_job_store.h). The runner, the webhook sender and the API see
// only this. Implementations are thread-safe; every call is atomic.
class JobStore {
 public:
  using ItemResult = JobItemResult;
  virtual ~JobStore() = default;

  // Stores a new job and its items in one transaction; when `owner` already has a job under the
  // submission's idempotency key, stores nothing and returns that job (created = false).
  virtual JobInfo create(const std::string& owner, const JobSubmission& submission, const std::string& request_sha256, bool& created) = 0;
  virtual std::optional<JobInfo> get(const std::string& id) = 0;
  // Newest first; owner nullopt: every owner's. `before_seq` > 0: only jobs stored before that one.
  virtual std::vector<JobInfo> list(const std::optional<std::string>& owner, int64_t before_seq, size_t limit) = 0;
  // Cancels a queued or running job: its pending items are dropped (they will not run). nullopt: no
  // such job; `changed` false: it had finished already.
  virtual std::optional<JobInfo> cancel(const std::string& id, bool& changed) = 0;
  // Up to `n` pending items of queued or running jobs (oldest job first) that are not in `busy`
  // ({job_seq, index}: this process's items being run); their jobs are marked running. A store shared
  // by several processes hands an item to one of them at a time (a lease).
  virtual std::vector<ClaimedItem> claim(size_t n, const std::set<std::pair<int64_t, int64_t>>& busy) = 0;
  // Stores each item's result and marks it done, all in one transaction (the result and the done
  // mark together, so an item never has a result without being done, nor the reverse); an item that
  // is not pending (done already, or its job was cancelled) or, in a shared store, no longer leased
  // to this process is left as it is. Returns the jobs these items finished.
  virtual std::vector<JobInfo> finish_items(const std::vector<ItemResult>& results) = 0;
  // Calls `row` with up to `limit` done items after item `after_index` (-1: from the start), in
  // order: index, custom_id, status, response body. Returns how many it read.
  virtual size_t results(int64_t job_seq, int64_t after_index, size_t limit,
                         const std::function<void(int64_t, const std::string&, int, const std::string&)>& row) = 0;
  // Finished jobs whose webhook is pending and due at `now_ms` (in a shared store: leased to this
  // process until webhook_tried); and the soonest due time of any other pending webhook (nullopt:
  // none).
  virtual std::vector<JobInfo> webhooks_due(int64_t now_ms, std::optional<int64_t>& next_ms) = 0;
  // Records a delivery try: delivered, or failed and retried at `retry_ms` (nullopt: given up).
  virtual void webhook_tried(const std::string& id, bool delivered, std::optional<int64_t> retry_ms) = 0;
  // The same for the items of jobs with webhook_items: at most `limit` items whose webhook is due
  // (leased as above in a shared store), and the soonest due time of the others (now_ms when more
  // may be due at once).
  virtual std::vector<ItemWebhook> item_webhooks_due(int64_t now_ms, size_t limit, std::optional<int64_t>& next_ms) = 0;
  virtual void item_webhook_tried(int64_t job_seq, int64_t index, bool delivered, std::optional<int64_t> retry_ms) = 0;
  // Deletes the jobs that finished before `cutoff_s` (unix seconds) and have no webhook (of the job
  // or an item) pending, with their items; returns how many jobs.
  virtual int64_t delete_finished_before(int64_t cutoff_s) = 0;
  // Calls `woken` (from another thread) whenever another process may have stored work to claim,
  // until it is replaced or cleared ({}); once it returns, the previous callback is not running and
  // will not be called. A store one process owns has nothing to hear: the default does nothing.
  virtual void on_work_elsewhere(std::function<void()> woken) { (void)woken; }
};

// Jobs and their items in SQLite (tables jobs and job_items, created if missing): one process.
class SqliteJobStore : public JobStore {
 public:
  explicit SqliteJobStore(const std::string& path);
  ~SqliteJobStore() override;
  SqliteJobStore(const SqliteJobStore&) = delete;
  SqliteJobStore& operator=(const SqliteJobStore&) = delete;

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

 private:
  std::mutex mutex_;
  sqlite3* db_ = nullptr;
};

// What running one item gave: its response (status and body), or `retry` when it could not run now
// (429 / 503: a full queue, a draining server) and stays pending.
struct ItemOutcome {
  int status = 200;
  std::string body;
  bool retry = false;
};

// The runner: `concurrency` worker threads run items (the classify path, which waits on the
// worker's thread and never on the step loop), so at most `concurrency` job items are in the
// scheduler at once: synchronous requests go first while jobs always progress. Pending items are
// claimed a few at a time into memory; finished items are handed to one writer thread, which stores
// whatever has finished meanwhile in one transaction (group commit). An item stays pending in the
// database until its result is committed, and is kept out of further claims (`busy_`) until then.
class JobRunner {
 public:
  using Run = std::function<ItemOutcome(const ClaimedItem&)>;
  using Finished = std::function<void(const JobInfo&)>;
  // `finished`: a job's last item was stored; `stored` (optional): a batch of results was stored.
  JobRunner(JobStore& store, int concurrency, Run run, Finished finished, std::function<void()> stored = {});
  // Deletes finished jobs `days` after they finished (JobOptions::retention_days), at start() and
  // every `interval`, from the writer thread; call before start(). 0 days: never.
  void set_retention(double days, std::chrono::milliseconds interval);
  ~JobRunner();  // stop()
  JobRunner(const JobRunner&) = delete;
  JobRunner& operator=(const JobRunner&) = delete;
  void start();
  void wake();  // new items were stored
  // Returns once the items being run are finished and their results stored; items not started
  // stay pending (in the database) for the next start.
  void stop();
  size_t in_flight() const;  // items being run now

 private:
  void work();
  void write();
  JobStore& store_;
  int concurrency_;
  Run run_;
  Finished finished_;
  std::function<void()> stored_;
  double retention_days_ = 0;
  std::chrono::milliseconds retention_interval_{std::chrono::hours(1)};
  void sweep();  // the retention sweep (no lock held)
  mutable std::mutex mutex_;
  std::condition_variable wake_, written_;
  std::set<std::pair<int64_t, int64_t>> busy_;  // claimed and not yet stored (or released)
  std::deque<ClaimedItem> claimed_;              // claimed, not started
  std::vector<JobStore::ItemResult> finished_items_;  // run, waiting for the writer
  size_t running_ = 0;
  bool stopping_ = false, workers_done_ = false;
  bool woken_ = false;  // wake() since the last claim: claim again before waiting
  std::vector<std::thread> workers_;
  std::thread writer_;
};

// HMAC-SHA256 of `body` under `key`, lower-case hex.
std::string hmac_sha256_hex(const std::string& key, const std::string& body);

// The webhook sender: one thread POSTing each finished job's webhook (body {"id", "object":
// "job.finished", "state", "counts"}, signed with X-Arbiter-Signature: sha256=<hex>), retrying with
// exponential backoff; what it has to send is in the store, so a restart resumes it. Throws
// std::invalid_argument when options.webhook_ca cannot be read.
class WebhookSender {
 public:
  // Counts a delivery try: of a job's webhook or an item's; "delivered" | "retried" | "failed".
  using Delivered = std::function<void(bool item, const char* outcome)>;
  WebhookSender(JobStore& store, const JobOptions& options, Delivered counted);
  ~WebhookSender();
  WebhookSender(const WebhookSender&) = delete;
  WebhookSender& operator=(const WebhookSender&) = delete;
  void wake();  // a job (or an item of a job with item webhooks) finished

 private:
  void run();
  // POSTs one signed webhook body and counts the try; returns when to retry (nullopt: delivered or
  // given up, as `delivered` says).
  std::optional<int64_t> deliver(WebhookClient& client, const std::string& what, const std::string& url, const std::string& body,
                                 int64_t attempts, bool item, bool& delivered);
  // Posts a batch of item webhooks, several at once (a slow receiver costs its latency once per
  // batch slice, not once per item), and records each try; returns the soonest retry.
  std::optional<int64_t> deliver_items(const std::vector<ItemWebhook>& items);
  JobStore& store_;
  JobOptions options_;
  std::vector<std::unique_ptr<WebhookClient>> clients_;  // one per delivery in flight at once
  Delivered counted_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false, woken_ = false;
  std::thread thread_;
};

// The webhook body of a finished job.
std::string webhook_body(const JobInfo& job);
// An item's line of GET /v1/jobs/{id}/results (an OpenAI batch output line): {"custom_id",
// "response": {"status_code", "body"}, "error"}.
nlohmann::json job_result_line(const std::string& custom_id, int status, const std::string& response);
// The webhook body of a finished item: its result line with "object": "job.item" and "job_id".
std::string item_webhook_body(const ItemWebhook& item);

}  // namespace arbiter::api
