#include "api/pg_job_store.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <random>

namespace arbiter::api {
namespace {

constexpr const char* kJobColumns =
    "seq, id, owner, idempotency_key, webhook_url, request_sha256, state, total, completed, failed, created_at, started_at, "
    "finished_at, webhook_state, webhook_attempts, webhook_next_ms, webhook_items";
// Webhook deliveries claimed per look.
constexpr int kWebhooksPerClaim = 16;

int64_t unix_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

JobInfo read_job(const pg::Result& r, int row) {
  JobInfo j;
  j.seq = r.integer(row, 0);
  j.id = r.text(row, 1);
  j.owner = r.text(row, 2);
  j.idempotency_key = r.opt_text(row, 3);
  j.webhook_url = r.opt_text(row, 4);
  j.request_sha256 = r.text(row, 5);
  j.state = r.text(row, 6);
  j.total = r.integer(row, 7);
  j.completed = r.integer(row, 8);
  j.failed = r.integer(row, 9);
  j.created_at = r.integer(row, 10);
  if (!r.null(row, 11)) j.started_at = r.integer(row, 11);
  if (!r.null(row, 12)) j.finished_at = r.integer(row, 12);
  j.webhook_state = r.text(row, 13);
  j.webhook_attempts = r.integer(row, 14);
  j.webhook_next_ms = r.integer(row, 15);
  j.webhook_items = r.boolean(row, 16);
  return j;
}

std::optional<JobInfo> job_where(pg::Connection& c, const std::string& where, const std::vector<pg::Param>& params) {
  const pg::Result r = c.exec(std::string("SELECT ") + kJobColumns + " FROM jobs WHERE " + where, params);
  if (r.rows() == 0) return std::nullopt;
  return read_job(r, 0);
}

std::string replica_name() {
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  std::mt19937_64 rng{std::random_device{}()};
  char tail[17];
  std::snprintf(tail, sizeof(tail), "%08llx", static_cast<unsigned long long>(rng() & 0xffffffffULL));
  return std::string(host) + ":" + std::to_string(getpid()) + ":" + tail;
}

// When the webhooks pending in `table` (jobs or job_items) not leased to `replica` are next worth a
// look: the soonest retry, or when another replica's lease on a delivery ends (nullopt: none).
std::optional<int64_t> next_webhook_look(pg::Connection& c, const std::string& table, const std::string& replica, int64_t now_ms) {
  const pg::Result next = c.exec(
      "SELECT min(GREATEST(webhook_next_ms, CASE WHEN webhook_lease_until > now()"
      "  THEN (extract(epoch FROM webhook_lease_until) * 1000)::bigint ELSE 0 END))"
      " FROM " + table + " WHERE webhook_state = 'pending' AND webhook_leased_by IS DISTINCT FROM $1",
      {replica});
  if (next.null(0, 0)) return std::nullopt;
  return std::max(next.integer(0, 0), now_ms + 1);
}

// The LISTEN/NOTIFY channel on which stores announce work to claim.
constexpr const char* kWorkChannel = "arbiter_job_work";

}  // namespace

PgJobStore::PgJobStore(const std::string& url, std::chrono::milliseconds lease)
    : url_(url), conn_(url, "job db"), reader_(url, "job db"), lease_(std::max(lease, std::chrono::milliseconds(300))), replica_(replica_name()) {
  pg::migrate(conn_);
  renewer_ = std::thread([this] { renew_loop(); });
  listener_ = std::thread([this] { listen_loop(); });
}

PgJobStore::~PgJobStore() {
  {
    std::lock_guard<std::mutex> lock(renew_mutex_);
    stopping_ = true;
  }
  renew_wake_.notify_all();
  renewer_.join();
  listener_.join();
  // What this replica leased and did not finish is free for the others at once (and they hear so).
  try {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t items =
        conn_.exec("UPDATE job_items SET leased_by = NULL, lease_until = NULL WHERE leased_by = $1 AND state = 0", {replica_}).affected();
    conn_.exec("UPDATE jobs SET webhook_leased_by = NULL, webhook_lease_until = NULL WHERE webhook_leased_by = $1", {replica_});
    conn_.exec("UPDATE job_items SET webhook_leased_by = NULL, webhook_lease_until = NULL WHERE webhook_leased_by = $1", {replica_});
    if (items > 0) conn_.exec(std::string("NOTIFY ") + kWorkChannel);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "arbiter serve: jobs: releasing leases: %s (they expire by themselves)\n", e.what());
  }
}

void PgJobStore::renew_loop() {
  std::unique_ptr<pg::Connection> conn;
  const std::string lease_ms = std::to_string(lease_.count());
  std::unique_lock<std::mutex> lock(renew_mutex_);
  while (!renew_wake_.wait_for(lock, lease_ / 3, [&] { return stopping_; })) {
    lock.unlock();
    try {
      // A connection of its own: renewal never waits behind a large submission.
      if (!conn) conn = std::make_unique<pg::Connection>(url_, "job db");
      conn->exec("UPDATE job_items SET lease_until = now() + $2::bigint * interval '1 millisecond' WHERE leased_by = $1 AND state = 0",
                 {replica_, lease_ms});
      conn->exec("UPDATE jobs SET webhook_lease_until = now() + $2::bigint * interval '1 millisecond'"
                 " WHERE webhook_leased_by = $1 AND webhook_state = 'pending'",
                 {replica_, lease_ms});
      conn->exec("UPDATE job_items SET webhook_lease_until = now() + $2::bigint * interval '1 millisecond'"
                 " WHERE webhook_leased_by = $1 AND webhook_state = 'pending'",
                 {replica_, lease_ms});
    } catch (const std::exception& e) {
      std::fprintf(stderr, "arbiter serve: jobs: renewing leases: %s\n", e.what());
    }
    lock.lock();
  }
}

void PgJobStore::on_work_elsewhere(std::function<void()> woken) {
  std::lock_guard<std::mutex> lock(woken_mutex_);
  woken_ = std::move(woken);
}

void PgJobStore::listen_loop() {
  std::unique_ptr<pg::Listener> listener;
  bool reported = false;
  std::unique_lock<std::mutex> lock(renew_mutex_);
  while (!stopping_) {
    lock.unlock();
    bool heard = false;
    try {
      if (!listener) {
        listener = std::make_unique<pg::Listener>(url_, kWorkChannel);
        heard = true;  // anything stored before it listened is claimed now
      }
      // Short waits: a stop is seen within one.
      heard = listener->wait(250) || heard;
      reported = false;
    } catch (const std::exception& e) {
      if (!reported) std::fprintf(stderr, "arbiter serve: jobs: listening for other replicas' jobs: %s (polling meanwhile)\n", e.what());
      reported = true;
      listener.reset();
    }
    if (heard) {
      std::lock_guard<std::mutex> woken_lock(woken_mutex_);
      if (woken_) woken_();
    }
    lock.lock();
    if (!listener) renew_wake_.wait_for(lock, std::chrono::seconds(1), [&] { return stopping_; });
  }
}

JobInfo PgJobStore::create(const std::string& owner, const JobSubmission& sub, const std::string& request_sha256, bool& created) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (int attempt = 0;; ++attempt) {
    try {
      pg::Transaction t(conn_);
      if (sub.idempotency_key) {
        auto existing = job_where(conn_, "owner = $1 AND idempotency_key = $2", {owner, *sub.idempotency_key});
        if (existing) {
          t.commit();
          created = false;
          return *existing;
        }
      }
      const pg::Result inserted = conn_.exec(
          "INSERT INTO jobs (id, owner, idempotency_key, webhook_url, request_sha256, state, total, created_at, webhook_items)"
          " VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8) RETURNING seq",
          {new_job_id(), owner, sub.idempotency_key, sub.webhook_url, request_sha256, pg::param(static_cast<int64_t>(sub.items.size())),
           pg::param(unix_ms() / 1000), std::string(sub.webhook_items && sub.webhook_url ? "true" : "false")});
      const int64_t seq = inserted.integer(0, 0);
      std::vector<std::string> ids, bodies, urls;
      ids.reserve(sub.items.size());
      bodies.reserve(sub.items.size());
      urls.reserve(sub.items.size());
      for (const JobItemInput& item : sub.items) {
        ids.push_back(item.custom_id);
        bodies.push_back(item.body);
        urls.push_back(item.url);
      }
      // All items in one statement (idx from 0, in submission order).
      conn_.exec("INSERT INTO job_items (job_seq, idx, custom_id, body, url)"
                 " SELECT $1, n - 1, c, b, u FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS x(c, b, u, n)",
                 {pg::param(seq), pg::array(ids), pg::array(bodies), pg::array(urls)});
      auto job = job_where(conn_, "seq = $1", {pg::param(seq)});
      conn_.exec(std::string("NOTIFY ") + kWorkChannel);  // sent to every listening replica at the commit
      t.commit();
      created = true;
      return *job;
    } catch (const pg::Error& e) {
      // Another replica stored a job under the same key meanwhile: the next try returns it.
      if (!(e.sqlstate() == "23505" || e.retryable()) || attempt >= 3) throw;
    }
  }
}

std::optional<JobInfo> PgJobStore::get(const std::string& id) {
  std::lock_guard<std::mutex> lock(read_mutex_);
  return job_where(reader_, "id = $1", {id});
}

std::vector<JobInfo> PgJobStore::list(const std::optional<std::string>& owner, int64_t before_seq, size_t limit) {
  std::lock_guard<std::mutex> lock(read_mutex_);
  const pg::Result r = reader_.exec(std::string("SELECT ") + kJobColumns +
                                      " FROM jobs WHERE ($1::text IS NULL OR owner = $1) AND ($2::bigint <= 0 OR seq < $2)"
                                      " ORDER BY seq DESC LIMIT $3",
                                  {owner, pg::param(before_seq), pg::param(static_cast<int64_t>(limit))});
  std::vector<JobInfo> out;
  for (int i = 0; i < r.rows(); ++i) out.push_back(read_job(r, i));
  return out;
}

std::optional<JobInfo> PgJobStore::cancel(const std::string& id, bool& changed) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::optional<JobInfo> job;
  pg::retrying([&] {
    pg::Transaction t(conn_);
    // The job's row first (as finish_items does): a cancellation and a last result never cross.
    job = job_where(conn_, "id = $1 FOR UPDATE", {id});
    if (!job) return;
    changed = !job->finished();
    if (changed) {
      conn_.exec("UPDATE job_items SET state = 2 WHERE job_seq = $1 AND state = 0", {pg::param(job->seq)});
      conn_.exec("UPDATE jobs SET state = 'cancelled', finished_at = $2,"
                 " webhook_state = CASE WHEN webhook_url IS NULL THEN 'none' ELSE 'pending' END,"
                 " webhook_next_ms = 0 WHERE seq = $1",
                 {pg::param(job->seq), pg::param(unix_ms() / 1000)});
      job = job_where(conn_, "seq = $1", {pg::param(job->seq)});
    }
    t.commit();
  });
  return job;
}

std::vector<ClaimedItem> PgJobStore::claim(size_t n, const std::set<std::pair<int64_t, int64_t>>& busy) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int64_t> busy_seqs, busy_indexes;
  for (const auto& [seq, index] : busy) {
    busy_seqs.push_back(seq);
    busy_indexes.push_back(index);
  }
  std::vector<ClaimedItem> out;
  pg::retrying([&] {
    out.clear();
    pg::Transaction t(conn_);
    // Pending items whose lease is free, expired, or this replica's own (an item whose run it gave
    // back, e.g. on a full queue) and not being run here now. SKIP LOCKED: rows another replica is
    // claiming at this moment are passed over, not waited for.
    const pg::Result r = conn_.exec(
        "WITH c AS (SELECT job_seq, idx FROM job_items"
        "  WHERE state = 0 AND (leased_by IS NULL OR lease_until < now() OR leased_by = $2)"
        "  AND (job_seq, idx) NOT IN (SELECT * FROM unnest($4::bigint[], $5::bigint[]))"
        "  ORDER BY job_seq, idx LIMIT $1 FOR UPDATE SKIP LOCKED)"
        " UPDATE job_items i SET leased_by = $2, lease_until = now() + $3::bigint * interval '1 millisecond'"
        " FROM c WHERE i.job_seq = c.job_seq AND i.idx = c.idx"
        " RETURNING i.job_seq, i.idx, i.custom_id, i.body, i.url",
        {pg::param(static_cast<int64_t>(n)), replica_, pg::param(static_cast<int64_t>(lease_.count())), pg::array(busy_seqs),
         pg::array(busy_indexes)});
    t.commit();
    for (int i = 0; i < r.rows(); ++i)
      out.push_back({r.integer(i, 0), r.integer(i, 1), "", "", r.text(i, 2), r.text(i, 3), r.text(i, 4)});
  });
  if (out.empty()) return out;
  std::sort(out.begin(), out.end(), [](const ClaimedItem& a, const ClaimedItem& b) {
    return std::pair(a.job_seq, a.index) < std::pair(b.job_seq, b.index);
  });
  std::vector<int64_t> seqs;
  for (const ClaimedItem& item : out)
    if (seqs.empty() || seqs.back() != item.job_seq) seqs.push_back(item.job_seq);
  const pg::Result jobs = conn_.exec("SELECT seq, id, owner FROM jobs WHERE seq = ANY($1::bigint[])", {pg::array(seqs)});
  for (int i = 0; i < jobs.rows(); ++i)
    for (ClaimedItem& item : out)
      if (item.job_seq == jobs.integer(i, 0)) {
        item.job_id = jobs.text(i, 1);
        item.owner = jobs.text(i, 2);
      }
  // After the claim's commit (a statement of its own): the claim never waits for a job's row.
  conn_.exec("UPDATE jobs SET state = 'running', started_at = $2 WHERE seq = ANY($1::bigint[]) AND state = 'queued'",
             {pg::array(seqs), pg::param(unix_ms() / 1000)});
  return out;
}

std::vector<JobInfo> PgJobStore::finish_items(const std::vector<ItemResult>& results_in) {
  std::vector<ItemResult> results = results_in;
  std::sort(results.begin(), results.end(),
            [](const ItemResult& a, const ItemResult& b) { return std::pair(a.job_seq, a.index) < std::pair(b.job_seq, b.index); });
  std::vector<int64_t> seqs;
  for (const ItemResult& r : results)
    if (seqs.empty() || seqs.back() != r.job_seq) seqs.push_back(r.job_seq);
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<JobInfo> jobs;
  pg::retrying([&] {
    jobs.clear();
    pg::Transaction t(conn_);
    // The jobs' rows first, in one order on every replica (no deadlock between replicas storing
    // results of the same jobs; a cancellation takes the job's row first too).
    conn_.exec("SELECT seq FROM jobs WHERE seq = ANY($1::bigint[]) ORDER BY seq FOR UPDATE", {pg::array(seqs)});
    std::vector<int64_t> finished;
    for (const ItemResult& r : results) {
      // Only while the lease is this replica's: another that took the item over stores its own.
      // leased_by stays on a done item: which replica ran it.
      const pg::Result done = conn_.exec(
          "UPDATE job_items SET state = 1, status = $3, response = $4, finished_ms = $5, lease_until = NULL,"
          " webhook_state = CASE WHEN (SELECT webhook_items FROM jobs WHERE seq = $1) THEN 'pending' ELSE 'none' END"
          " WHERE job_seq = $1 AND idx = $2 AND state = 0 AND leased_by = $6",
          {pg::param(r.job_seq), pg::param(r.index), pg::param(static_cast<int64_t>(r.status)), r.response, pg::param(unix_ms()), replica_});
      if (done.affected() == 0) continue;
      conn_.exec(r.status == 200 ? "UPDATE jobs SET completed = completed + 1 WHERE seq = $1" : "UPDATE jobs SET failed = failed + 1 WHERE seq = $1",
                 {pg::param(r.job_seq)});
      // The last item finishes its job: failed when every item failed, else completed.
      const pg::Result fin = conn_.exec(
          "UPDATE jobs SET state = CASE WHEN failed = total THEN 'failed' ELSE 'completed' END, finished_at = $2,"
          " webhook_state = CASE WHEN webhook_url IS NULL THEN 'none' ELSE 'pending' END, webhook_next_ms = 0"
          " WHERE seq = $1 AND completed + failed = total AND state IN ('queued', 'running')",
          {pg::param(r.job_seq), pg::param(unix_ms() / 1000)});
      if (fin.affected() > 0) finished.push_back(r.job_seq);
    }
    for (int64_t seq : finished)
      if (auto job = job_where(conn_, "seq = $1", {pg::param(seq)})) jobs.push_back(std::move(*job));
    t.commit();
  });
  return jobs;
}

size_t PgJobStore::results(int64_t job_seq, int64_t after_index, size_t limit,
                           const std::function<void(int64_t, const std::string&, int, const std::string&)>& row) {
  std::unique_lock<std::mutex> lock(read_mutex_);
  const pg::Result r = reader_.exec(
      "SELECT idx, custom_id, status, response FROM job_items WHERE job_seq = $1 AND state = 1 AND idx > $2 ORDER BY idx LIMIT $3",
      {pg::param(job_seq), pg::param(after_index), pg::param(static_cast<int64_t>(limit))});
  lock.unlock();  // the rows are ours: `row` may write to a slow client
  for (int i = 0; i < r.rows(); ++i) row(r.integer(i, 0), r.text(i, 1), static_cast<int>(r.integer(i, 2)), r.text(i, 3));
  return static_cast<size_t>(r.rows());
}

std::vector<JobInfo> PgJobStore::webhooks_due(int64_t now_ms, std::optional<int64_t>& next_ms) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::string lease_ms = std::to_string(lease_.count());
  std::vector<JobInfo> out;
  pg::retrying([&] {
    out.clear();
    pg::Transaction t(conn_);
    const pg::Result r = conn_.exec(
        std::string("UPDATE jobs SET webhook_leased_by = $1, webhook_lease_until = now() + $3::bigint * interval '1 millisecond'"
                    " WHERE seq IN (SELECT seq FROM jobs WHERE webhook_state = 'pending' AND webhook_next_ms <= $2"
                    "  AND (webhook_lease_until IS NULL OR webhook_lease_until < now())"
                    "  ORDER BY webhook_next_ms LIMIT ") +
            std::to_string(kWebhooksPerClaim) + " FOR UPDATE SKIP LOCKED) RETURNING " + kJobColumns,
        {replica_, pg::param(now_ms), lease_ms});
    t.commit();
    for (int i = 0; i < r.rows(); ++i) out.push_back(read_job(r, i));
  });
  next_ms = next_webhook_look(conn_, "jobs", replica_, now_ms);
  if (out.size() == static_cast<size_t>(kWebhooksPerClaim)) next_ms = now_ms;  // more may be due
  return out;
}

int64_t PgJobStore::delete_finished_before(int64_t cutoff_s) {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t n = 0;
  pg::retrying([&] {
    pg::Transaction t(conn_);
    const pg::Result expired = conn_.exec(
        "SELECT seq FROM jobs j WHERE state IN ('completed', 'failed', 'cancelled') AND finished_at < $1 AND webhook_state <> 'pending'"
        " AND NOT EXISTS (SELECT 1 FROM job_items i WHERE i.job_seq = j.seq AND i.webhook_state = 'pending') ORDER BY seq FOR UPDATE",
        {pg::param(cutoff_s)});
    std::vector<int64_t> seqs;
    for (int i = 0; i < expired.rows(); ++i) seqs.push_back(expired.integer(i, 0));
    if (!seqs.empty()) {
      conn_.exec("DELETE FROM job_items WHERE job_seq = ANY($1::bigint[])", {pg::array(seqs)});
      conn_.exec("DELETE FROM jobs WHERE seq = ANY($1::bigint[])", {pg::array(seqs)});
    }
    t.commit();
    n = static_cast<int64_t>(seqs.size());
  });
  return n;
}

std::vector<ItemWebhook> PgJobStore::item_webhooks_due(int64_t now_ms, size_t limit, std::optional<int64_t>& next_ms) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::string lease_ms = std::to_string(lease_.count());
  std::vector<ItemWebhook> out;
  pg::retrying([&] {
    out.clear();
    pg::Transaction t(conn_);
    // As webhooks_due: due, unleased (or the lease expired), leased to this replica in one statement.
    const pg::Result r = conn_.exec(
        "UPDATE job_items i SET webhook_leased_by = $1, webhook_lease_until = now() + $3::bigint * interval '1 millisecond'"
        " FROM jobs j WHERE j.seq = i.job_seq AND (i.job_seq, i.idx) IN (SELECT job_seq, idx FROM job_items"
        "  WHERE webhook_state = 'pending' AND webhook_next_ms <= $2 AND (webhook_lease_until IS NULL OR webhook_lease_until < now())"
        "  ORDER BY webhook_next_ms LIMIT $4 FOR UPDATE SKIP LOCKED)"
        " RETURNING i.job_seq, i.idx, j.id, j.webhook_url, i.custom_id, i.status, i.response, i.webhook_attempts",
        {replica_, pg::param(now_ms), lease_ms, pg::param(static_cast<int64_t>(limit))});
    t.commit();
    for (int i = 0; i < r.rows(); ++i)
      out.push_back({r.integer(i, 0), r.integer(i, 1), r.text(i, 2), r.text(i, 3), r.text(i, 4), static_cast<int>(r.integer(i, 5)),
                     r.text(i, 6), r.integer(i, 7)});
  });
  next_ms = next_webhook_look(conn_, "job_items", replica_, now_ms);
  if (out.size() == limit) next_ms = now_ms;  // more may be due
  return out;
}

void PgJobStore::item_webhook_tried(int64_t job_seq, int64_t index, bool delivered, std::optional<int64_t> retry_ms) {
  std::lock_guard<std::mutex> lock(mutex_);
  conn_.exec(
      "UPDATE job_items SET webhook_attempts = webhook_attempts + 1, webhook_state = $3, webhook_next_ms = $4,"
      " webhook_leased_by = NULL, webhook_lease_until = NULL WHERE job_seq = $1 AND idx = $2",
      {pg::param(job_seq), pg::param(index), std::string(delivered ? "delivered" : retry_ms ? "pending" : "failed"),
       pg::param(retry_ms.value_or(0))});
}

void PgJobStore::webhook_tried(const std::string& id, bool delivered, std::optional<int64_t> retry_ms) {
  std::lock_guard<std::mutex> lock(mutex_);
  conn_.exec(
      "UPDATE jobs SET webhook_attempts = webhook_attempts + 1, webhook_state = $2, webhook_next_ms = $3,"
      " webhook_leased_by = NULL, webhook_lease_until = NULL WHERE id = $1",
      {id, std::string(delivered ? "delivered" : retry_ms ? "pending" : "failed"), pg::param(retry_ms.value_or(0))});
}

}  // namespace arbiter::api
