#include "api/jobs.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <random>
#include <set>
#include <sstream>

#include "api/json_io.h"
#include "api/sqlite_util.h"

namespace arbiter::api {
namespace {

constexpr const char* kWhat = "job db";
constexpr size_t kMaxCustomId = 512;
constexpr size_t kMaxIdempotencyKey = 256;
constexpr size_t kMaxWebhookUrl = 2048;
// How long the runner's writer gathers finished items before it commits them.
constexpr auto kWriteInterval = std::chrono::milliseconds(50);

int64_t unix_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string random_hex(size_t digits) {
  static thread_local std::mt19937_64 rng{std::random_device{}() ^ (static_cast<uint64_t>(std::random_device{}()) << 32)};
  std::string out;
  while (out.size() < digits) {
    char buf[17];
    std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(rng()));
    out += buf;
  }
  out.resize(digits);
  return out;
}

// One item's envelope checked, its body validated by `check`; the error (if any) recorded.
void take_item(const nlohmann::json& item, size_t line, bool jsonl,
               const std::function<void(const std::string&, const std::string&)>& check,
               std::set<std::string>& seen, JobSubmission& out, std::vector<JobItemError>& errors) {
  JobItemError bad;
  bad.line = line;
  try {
    if (!item.is_object()) throw bad_request("An item must be a JSON object.", "", "invalid_type");
    const auto cid = item.find("custom_id");
    if (cid == item.end() || !cid->is_string() || cid->get<std::string>().empty())
      throw bad_request("An item needs a non-empty string custom_id.", "custom_id", "missing_custom_id");
    bad.custom_id = printable(cid->get<std::string>());
    if (cid->get<std::string>().size() > kMaxCustomId)
      throw bad_request("custom_id is longer than " + std::to_string(kMaxCustomId) + " bytes.", "custom_id", "invalid_value");
    if (jsonl) {
      const auto method = item.find("method");
      if (method != item.end() && !(method->is_string() && method->get<std::string>() == "POST"))
        throw bad_request("method must be \"POST\".", "method", "invalid_value");
    }
    // The endpoint: required in batch-file lines, "/v1/classify" by default in a JSON body.
    std::string url_text = kClassifyUrl;
    const auto url = item.find("url");
    if (url == item.end() && jsonl)
      throw bad_request("An item needs a url (\"/v1/classify\" or \"/v1/chat/completions\").", "url", "missing_url");
    if (url != item.end()) {
      if (!url->is_string()) throw bad_request("url must be a string.", "url", "invalid_type");
      url_text = url->get<std::string>();
      if (url_text != kClassifyUrl && url_text != kChatUrl)
        throw bad_request("url must be \"/v1/classify\" or \"/v1/chat/completions\" (got '" + printable(url_text) + "').",
                          "url", "unsupported_url");
    }
    const auto body = item.find("body");
    if (body == item.end() || !body->is_object())
      throw bad_request("An item needs a body: a " + url_text + " request object.", "body", "missing_body");
    if (!seen.insert(cid->get<std::string>()).second)
      throw bad_request("custom_id '" + bad.custom_id + "' is used by an earlier item; custom_ids must be unique in a job.",
                                    "custom_id", "duplicate_custom_id");
    std::string text = body->dump();
    try {
      check(url_text, text);
    } catch (ApiException& e) {
      ApiError error = e.error();
      error.param = error.param.empty() ? "body" : "body." + error.param;
      throw ApiException(error);
    }
    out.items.push_back({cid->get<std::string>(), std::move(text), url_text});
  } catch (const ApiException& e) {
    bad.error = e.error();
    errors.push_back(std::move(bad));
  }
}

std::optional<std::string> optional_string(const nlohmann::json& object, const char* name, size_t max) {
  const auto it = object.find(name);
  if (it == object.end() || it->is_null()) return std::nullopt;
  if (!it->is_string() || it->get<std::string>().empty())
    throw bad_request(std::string(name) + " must be a non-empty string.", name, "invalid_type");
  if (it->get<std::string>().size() > max)
    throw bad_request(std::string(name) + " is longer than " + std::to_string(max) + " bytes.", name, "invalid_value");
  return it->get<std::string>();
}

}  // namespace

std::string JobItemsInvalid::body() const {
  nlohmann::json list = nlohmann::json::array();
  for (const JobItemError& e : errors_) {
    nlohmann::json one = {{"line", e.line},
                          {"message", e.error.message},
                          {"type", e.error.type},
                          {"param", e.error.param.empty() ? nlohmann::json() : nlohmann::json(e.error.param)},
                          {"code", e.error.code.empty() ? nlohmann::json() : nlohmann::json(e.error.code)}};
    one["custom_id"] = e.custom_id.empty() ? nlohmann::json() : nlohmann::json(e.custom_id);
    list.push_back(std::move(one));
  }
  nlohmann::json out = {{"error",
                         {{"message", std::to_string(errors_.size()) + " of " + std::to_string(items_) +
                                          " items are invalid; the job was not created (see errors)."},
                          {"type", "invalid_request_error"},
                          {"param", "items"},
                          {"code", "invalid_items"},
                          {"errors", std::move(list)}}}};
  return out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

JobSubmission parse_job_submission(const std::string& body, bool jsonl, size_t max_items,
                                   const std::function<void(const std::string&, const std::string&)>& check) {
  JobSubmission out;
  std::vector<JobItemError> errors;
  std::set<std::string> seen;
  size_t count = 0;
  auto too_many = [&] {
    return bad_request("A job takes at most " + std::to_string(max_items) + " items.", "items", "too_many_items");
  };
  if (jsonl) {
    size_t line_no = 0, start = 0;
    while (start < body.size()) {
      size_t end = body.find('\n', start);
      if (end == std::string::npos) end = body.size();
      std::string line = body.substr(start, end - start);
      start = end + 1;
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
      if (++count > max_items) throw too_many();
      const nlohmann::json item = nlohmann::json::parse(line, nullptr, false);
      if (item.is_discarded()) {
        errors.push_back({line_no, "", bad_request("Line " + std::to_string(line_no) + " is not valid JSON.", "", "invalid_json").error()});
        continue;
      }
      take_item(item, line_no, true, check, seen, out, errors);
    }
  } else {
    const nlohmann::json root = nlohmann::json::parse(body, nullptr, false);
    if (root.is_discarded() || !root.is_object())
      throw bad_request("The body must be a JSON object {\"items\": [...]} (or JSONL with Content-Type application/jsonl).", "",
                        "invalid_json");
    const auto items = root.find("items");
    if (items == root.end() || !items->is_array()) throw bad_request("items must be an array of {custom_id, body}.", "items", "invalid_type");
    if (items->size() > max_items) throw too_many();
    out.idempotency_key = optional_string(root, "idempotency_key", kMaxIdempotencyKey);
    out.webhook_url = optional_string(root, "webhook_url", kMaxWebhookUrl);
    if (const auto w = root.find("webhook_items"); w != root.end() && !w->is_null()) {
      if (!w->is_boolean()) throw bad_request("webhook_items must be true or false.", "webhook_items", "invalid_type");
      out.webhook_items = w->get<bool>();
    }
    count = items->size();
    for (size_t i = 0; i < items->size(); ++i) take_item((*items)[i], i + 1, false, check, seen, out, errors);
  }
  if (count == 0) throw bad_request("A job needs at least one item.", "items", "no_items");
  if (!errors.empty()) throw JobItemsInvalid(std::move(errors), count);
  return out;
}

std::string new_job_id() { return "job_" + random_hex(24); }

nlohmann::json job_json(const JobInfo& j) {
  auto opt = [](const auto& v) { return v ? nlohmann::json(*v) : nlohmann::json(); };
  const int64_t done = j.completed + j.failed;
  nlohmann::json out = {{"id", j.id},
                        {"object", "job"},
                        {"state", j.state},
                        {"counts", {{"total", j.total}, {"completed", j.completed}, {"failed", j.failed}}},
                        {"progress", j.total ? static_cast<double>(done) / static_cast<double>(j.total) : 0.0},
                        {"created_at", j.created_at},
                        {"started_at", opt(j.started_at)},
                        {"finished_at", opt(j.finished_at)},
                        {"idempotency_key", opt(j.idempotency_key)},
                        {"webhook_url", opt(j.webhook_url)}};
  if (j.webhook_url) out["webhook"] = {{"state", j.webhook_state}, {"attempts", j.webhook_attempts}, {"items", j.webhook_items}};
  return out;
}

nlohmann::json job_result_line(const std::string& custom_id, int status, const std::string& body) {
  nlohmann::json response = nlohmann::json::parse(body, nullptr, false);
  if (response.is_discarded()) response = body;
  nlohmann::json line = {{"custom_id", custom_id}, {"response", {{"status_code", status}, {"body", response}}}, {"error", nullptr}};
  if (status != 200 && response.is_object() && response.contains("error"))
    line["error"] = {{"code", response["error"].value("code", nlohmann::json())}, {"message", response["error"].value("message", "")}};
  return line;
}

std::string item_webhook_body(const ItemWebhook& item) {
  nlohmann::json body = {{"object", "job.item"}, {"job_id", item.job_id}};
  body.update(job_result_line(item.custom_id, item.status, item.response));
  return body.dump();
}

std::string webhook_body(const JobInfo& j) {
  return nlohmann::json({{"id", j.id},
                         {"object", "job.finished"},
                         {"state", j.state},
                         {"counts", {{"total", j.total}, {"completed", j.completed}, {"failed", j.failed}}},
                         {"finished_at", j.finished_at ? nlohmann::json(*j.finished_at) : nlohmann::json()}})
      .dump();
}

// ---------------------------------------------------------------------------------------------
// SqliteJobStore

namespace {
constexpr const char* kJobColumns =
    "seq, id, owner, idempotency_key, webhook_url, request_sha256, state, total, completed, failed, created_at, started_at, "
    "finished_at, webhook_state, webhook_attempts, webhook_next_ms, webhook_items";

JobInfo read_job(sqlite::Statement& s) {
  JobInfo j;
  j.seq = s.integer(0);
  j.id = s.text(1);
  j.owner = s.text(2);
  j.idempotency_key = s.opt_text(3);
  j.webhook_url = s.opt_text(4);
  j.request_sha256 = s.text(5);
  j.state = s.text(6);
  j.total = s.integer(7);
  j.completed = s.integer(8);
  j.failed = s.integer(9);
  j.created_at = s.integer(10);
  if (!s.null(11)) j.started_at = s.integer(11);
  if (!s.null(12)) j.finished_at = s.integer(12);
  j.webhook_state = s.text(13);
  j.webhook_attempts = s.integer(14);
  j.webhook_next_ms = s.integer(15);
  j.webhook_items = s.integer(16) != 0;
  return j;
}

// Adds `column` (with its declaration) to `table` of a file made before the column existed.
void add_column_if_missing(sqlite3* db, const std::string& table, const std::string& column, const std::string& declaration) {
  bool has = false;
  {
    sqlite::Statement columns(db, "SELECT name FROM pragma_table_info('" + table + "')", kWhat);
    while (columns.step()) has = has || columns.text(0) == column;
  }
  if (!has) sqlite::exec(db, "ALTER TABLE " + table + " ADD COLUMN " + column + " " + declaration, kWhat);
}

std::optional<JobInfo> job_where(sqlite3* db, const std::string& where, const std::function<void(sqlite::Statement&)>& bind) {
  sqlite::Statement s(db, std::string("SELECT ") + kJobColumns + " FROM jobs WHERE " + where, kWhat);
  bind(s);
  if (!s.step()) return std::nullopt;
  return read_job(s);
}
}  // namespace

SqliteJobStore::SqliteJobStore(const std::string& path) {
  const int rc = sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    const std::string why = db_ ? sqlite3_errmsg(db_) : "out of memory";
    sqlite3_close(db_);
    throw std::runtime_error("cannot open the job db " + path + ": " + why);
  }
  try {
    sqlite3_busy_timeout(db_, 10000);
    sqlite::exec(db_, "PRAGMA journal_mode=WAL", kWhat);
    sqlite::exec(db_, "PRAGMA synchronous=FULL", kWhat);
    sqlite::Transaction t(db_, kWhat);
    sqlite::exec(db_,
                 "CREATE TABLE IF NOT EXISTS jobs ("
                 " seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,"
                 " idempotency_key TEXT, webhook_url TEXT, request_sha256 TEXT NOT NULL, state TEXT NOT NULL,"
                 " total INTEGER NOT NULL, completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,"
                 " created_at INTEGER NOT NULL, started_at INTEGER, finished_at INTEGER,"
                 " webhook_state TEXT NOT NULL DEFAULT 'none', webhook_attempts INTEGER NOT NULL DEFAULT 0,"
                 " webhook_next_ms INTEGER NOT NULL DEFAULT 0);"
                 "CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_idempotency_key ON jobs (owner, idempotency_key)"
                 " WHERE idempotency_key IS NOT NULL;"
                 "CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, seq);"
                 "CREATE INDEX IF NOT EXISTS jobs_webhooks ON jobs (webhook_state, webhook_next_ms);"
                 // state: 0 pending, 1 done (result stored), 2 dropped (its job was cancelled first).
                 "CREATE TABLE IF NOT EXISTS job_items ("
                 " job_seq INTEGER NOT NULL, idx INTEGER NOT NULL, custom_id TEXT NOT NULL, body TEXT NOT NULL,"
                 " state INTEGER NOT NULL DEFAULT 0, status INTEGER, response TEXT, finished_ms INTEGER,"
                 " PRIMARY KEY (job_seq, idx)) WITHOUT ROWID;"
                 "CREATE INDEX IF NOT EXISTS job_items_pending ON job_items (state, job_seq, idx);",
                 kWhat);
    // Columns newer than the tables of older files: the endpoint an item runs (files from before
    // chat items hold classify items only), and per-item webhooks.
    add_column_if_missing(db_, "job_items", "url", "TEXT NOT NULL DEFAULT '/v1/classify'");
    add_column_if_missing(db_, "jobs", "webhook_items", "INTEGER NOT NULL DEFAULT 0");
    add_column_if_missing(db_, "job_items", "webhook_state", "TEXT NOT NULL DEFAULT 'none'");
    add_column_if_missing(db_, "job_items", "webhook_attempts", "INTEGER NOT NULL DEFAULT 0");
    add_column_if_missing(db_, "job_items", "webhook_next_ms", "INTEGER NOT NULL DEFAULT 0");
    sqlite::exec(db_, "CREATE INDEX IF NOT EXISTS job_items_webhooks ON job_items (webhook_state, webhook_next_ms)", kWhat);
    t.commit();
  } catch (...) {
    sqlite3_close(db_);
    throw;
  }
}

SqliteJobStore::~SqliteJobStore() { sqlite3_close(db_); }

JobInfo SqliteJobStore::create(const std::string& owner, const JobSubmission& sub, const std::string& request_sha256, bool& created) {
  std::lock_guard<std::mutex> lock(mutex_);
  sqlite::Transaction t(db_, kWhat);
  if (sub.idempotency_key) {
    auto existing = job_where(db_, "owner = ?1 AND idempotency_key = ?2", [&](sqlite::Statement& s) {
      s.bind(1, owner).bind(2, *sub.idempotency_key);
    });
    if (existing) {
      created = false;
      return *existing;
    }
  }
  const std::string id = new_job_id();
  sqlite::Statement insert(db_,
                           "INSERT INTO jobs (id, owner, idempotency_key, webhook_url, request_sha256, state, total, created_at, webhook_items)"
                           " VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7, ?8)",
                           kWhat);
  insert.bind(1, id).bind(2, owner).bind(3, sub.idempotency_key).bind(4, sub.webhook_url).bind(5, request_sha256);
  insert.bind(6, static_cast<int64_t>(sub.items.size())).bind(7, unix_ms() / 1000).bind(8, static_cast<int64_t>(sub.webhook_items && sub.webhook_url));
  insert.step();
  const int64_t seq = sqlite3_last_insert_rowid(db_);
  sqlite::Statement item(db_, "INSERT INTO job_items (job_seq, idx, custom_id, body, url) VALUES (?1, ?2, ?3, ?4, ?5)", kWhat);
  for (size_t i = 0; i < sub.items.size(); ++i) {
    item.reset();
    item.bind(1, seq).bind(2, static_cast<int64_t>(i)).bind(3, sub.items[i].custom_id).bind(4, sub.items[i].body);
    item.bind(5, sub.items[i].url);
    item.step();
  }
  auto job = job_where(db_, "seq = ?1", [&](sqlite::Statement& s) { s.bind(1, seq); });
  t.commit();
  created = true;
  return *job;
}

std::optional<JobInfo> SqliteJobStore::get(const std::string& id) {
  std::lock_guard<std::mutex> lock(mutex_);
  return job_where(db_, "id = ?1", [&](sqlite::Statement& s) { s.bind(1, id); });
}

std::vector<JobInfo> SqliteJobStore::list(const std::optional<std::string>& owner, int64_t before_seq, size_t limit) {
  std::lock_guard<std::mutex> lock(mutex_);
  sqlite::Statement s(db_,
                      std::string("SELECT ") + kJobColumns +
                          " FROM jobs WHERE (?1 IS NULL OR owner = ?1) AND (?2 <= 0 OR seq < ?2) ORDER BY seq DESC LIMIT ?3",
                      kWhat);
  s.bind(1, owner).bind(2, before_seq).bind(3, static_cast<int64_t>(limit));
  std::vector<JobInfo> out;
  while (s.step()) out.push_back(read_job(s));
  return out;
}

std::optional<JobInfo> SqliteJobStore::cancel(const std::string& id, bool& changed) {
  std::lock_guard<std::mutex> lock(mutex_);
  sqlite::Transaction t(db_, kWhat);
  auto job = job_where(db_, "id = ?1", [&](sqlite::Statement& s) { s.bind(1, id); });
  if (!job) return std::nullopt;
  changed = !job->finished();
  if (changed) {
    sqlite::Statement drop(db_, "UPDATE job_items SET state = 2 WHERE job_seq = ?1 AND state = 0", kWhat);
    drop.bind(1, job->seq).step();
    sqlite::Statement mark(db_,
                           "UPDATE jobs SET state = 'cancelled', finished_at = ?2,"
                           " webhook_state = CASE WHEN webhook_url IS NULL THEN 'none' ELSE 'pending' END,"
                           " webhook_next_ms = 0 WHERE seq = ?1",
                           kWhat);
    mark.bind(1, job->seq).bind(2, unix_ms() / 1000).step();
    job = job_where(db_, "seq = ?1", [&](sqlite::Statement& s) { s.bind(1, job->seq); });
  }
  t.commit();
  return job;
}

std::vector<ClaimedItem> SqliteJobStore::claim(size_t n, const std::set<std::pair<int64_t, int64_t>>& busy) {
  std::lock_guard<std::mutex> lock(mutex_);
  // A read (no write lock: it does not wait for the decision log's commits); the write below only
  // when a job starts. Only this object writes job rows, under mutex_, so what is read stays true.
  // Pending items of cancelled jobs are dropped at cancellation, so every pending item belongs to a
  // queued or running job.
  sqlite::Statement s(db_,
                      "SELECT i.job_seq, i.idx, i.custom_id, i.body, j.id, j.owner, j.state, i.url FROM job_items i"
                      " JOIN jobs j ON j.seq = i.job_seq WHERE i.state = 0 ORDER BY i.job_seq, i.idx LIMIT ?1",
                      kWhat);
  s.bind(1, static_cast<int64_t>(n + busy.size()));
  std::vector<ClaimedItem> out;
  std::set<int64_t> queued;
  while (out.size() < n && s.step()) {
    if (busy.count({s.integer(0), s.integer(1)})) continue;
    out.push_back({s.integer(0), s.integer(1), s.text(4), s.text(5), s.text(2), s.text(3), s.text(7)});
    if (s.text(6) == "queued") queued.insert(s.integer(0));
  }
  s.reset();
  if (!queued.empty()) {
    sqlite::Transaction t(db_, kWhat);
    for (int64_t seq : queued) {
      sqlite::Statement mark(db_, "UPDATE jobs SET state = 'running', started_at = ?2 WHERE seq = ?1 AND state = 'queued'", kWhat);
      mark.bind(1, seq).bind(2, unix_ms() / 1000).step();
    }
    t.commit();
  }
  return out;
}

std::vector<JobInfo> SqliteJobStore::finish_items(const std::vector<ItemResult>& results) {
  std::lock_guard<std::mutex> lock(mutex_);
  sqlite::Transaction t(db_, kWhat);
  sqlite::Statement done(db_,
                         "UPDATE job_items SET state = 1, status = ?3, response = ?4, finished_ms = ?5,"
                         " webhook_state = CASE WHEN (SELECT webhook_items FROM jobs WHERE seq = ?1) THEN 'pending' ELSE 'none' END"
                         " WHERE job_seq = ?1 AND idx = ?2 AND state = 0",
                         kWhat);
  sqlite::Statement completed(db_, "UPDATE jobs SET completed = completed + 1 WHERE seq = ?1", kWhat);
  sqlite::Statement failed(db_, "UPDATE jobs SET failed = failed + 1 WHERE seq = ?1", kWhat);
  // The last item finishes its job: failed when every item failed, else completed.
  sqlite::Statement finish(db_,
                           "UPDATE jobs SET state = CASE WHEN failed = total THEN 'failed' ELSE 'completed' END, finished_at = ?2,"
                           " webhook_state = CASE WHEN webhook_url IS NULL THEN 'none' ELSE 'pending' END, webhook_next_ms = 0"
                           " WHERE seq = ?1 AND completed + failed = total AND state IN ('queued', 'running')",
                           kWhat);
  std::vector<int64_t> finished;
  for (const ItemResult& r : results) {
    done.reset();
    done.bind(1, r.job_seq).bind(2, r.index).bind(3, static_cast<int64_t>(r.status)).bind(4, r.response).bind(5, unix_ms());
    done.step();
    if (sqlite3_changes(db_) == 0) continue;  // done already, or dropped by a cancellation
    sqlite::Statement& count = r.status == 200 ? completed : failed;
    count.reset();
    count.bind(1, r.job_seq).step();
    finish.reset();
    finish.bind(1, r.job_seq).bind(2, unix_ms() / 1000).step();
    if (sqlite3_changes(db_) > 0) finished.push_back(r.job_seq);
  }
  std::vector<JobInfo> jobs;
  for (int64_t seq : finished)
    if (auto job = job_where(db_, "seq = ?1", [&](sqlite::Statement& s) { s.bind(1, seq); })) jobs.push_back(std::move(*job));
  t.commit();
  return jobs;
}

size_t SqliteJobStore::results(int64_t job_seq, int64_t after_index, size_t limit,
                         const std::function<void(int64_t, const std::string&, int, const std::string&)>& row) {
  std::lock_guard<std::mutex> lock(mutex_);
  sqlite::Statement s(db_,
                      "SELECT idx, custom_id, status, response FROM job_items WHERE job_seq = ?1 AND state = 1 AND idx > ?2"
                      " ORDER BY idx LIMIT ?3",
                      kWhat);
  s.bind(1, job_seq).bind(2, after_index).bind(3, static_cast<int64_t>(limit));
  size_t n = 0;
  for (; s.step(); ++n) row(s.integer(0), s.text(1), static_cast<int>(s.integer(2)), s.text(3));
  return n;
}

std::vector<JobInfo> SqliteJobStore::webhooks_due(int64_t now_ms, std::optional<int64_t>& next_ms) {
  std::lock_guard<std::mutex> lock(mutex_);
  sqlite::Statement s(db_, std::string("SELECT ") + kJobColumns + " FROM jobs WHERE webhook_state = 'pending' ORDER BY webhook_next_ms",
                      kWhat);
  std::vector<JobInfo> out;
  next_ms.reset();
  while (s.step()) {
    JobInfo j = read_job(s);
    if (j.webhook_next_ms <= now_ms) out.push_back(std::move(j));
    else if (!next_ms || j.webhook_next_ms < *next_ms) next_ms = j.webhook_next_ms;
  }
  return out;
}

int64_t SqliteJobStore::delete_finished_before(int64_t cutoff_s) {
  // Finished before the cutoff, and no webhook of the job or an item pending (an item deleted first
  // has none, so the jobs' statement sees the same set).
  const std::string expired =
      "SELECT seq FROM jobs j WHERE state IN ('completed', 'failed', 'cancelled') AND finished_at < ?1 AND webhook_state <> 'pending'"
      " AND NOT EXISTS (SELECT 1 FROM job_items i WHERE i.job_seq = j.seq AND i.webhook_state = 'pending')";
  std::lock_guard<std::mutex> lock(mutex_);
  sqlite::Transaction t(db_, kWhat);
  sqlite::Statement items(db_, "DELETE FROM job_items WHERE job_seq IN (" + expired + ")", kWhat);
  items.bind(1, cutoff_s).step();
  sqlite::Statement jobs(db_, "DELETE FROM jobs WHERE seq IN (" + expired + ")", kWhat);
  jobs.bind(1, cutoff_s).step();
  const int64_t n = sqlite3_changes(db_);
  t.commit();
  return n;
}

std::vector<ItemWebhook> SqliteJobStore::item_webhooks_due(int64_t now_ms, size_t limit, std::optional<int64_t>& next_ms) {
  std::lock_guard<std::mutex> lock(mutex_);
  sqlite::Statement s(db_,
                      "SELECT i.job_seq, i.idx, j.id, j.webhook_url, i.custom_id, i.status, i.response, i.webhook_attempts, i.webhook_next_ms"
                      " FROM job_items i JOIN jobs j ON j.seq = i.job_seq WHERE i.webhook_state = 'pending'"
                      " ORDER BY i.webhook_next_ms LIMIT ?1",
                      kWhat);
  s.bind(1, static_cast<int64_t>(limit + 1));
  std::vector<ItemWebhook> out;
  next_ms.reset();
  while (s.step()) {
    if (s.integer(8) > now_ms) {  // sorted: the rest are later
      next_ms = s.integer(8);
      break;
    }
    if (out.size() == limit) {  // more are due now
      next_ms = now_ms;
      break;
    }
    out.push_back({s.integer(0), s.integer(1), s.text(2), s.text(3), s.text(4), static_cast<int>(s.integer(5)), s.text(6), s.integer(7)});
  }
  return out;
}

void SqliteJobStore::item_webhook_tried(int64_t job_seq, int64_t index, bool delivered, std::optional<int64_t> retry_ms) {
  std::lock_guard<std::mutex> lock(mutex_);
  sqlite::Statement s(db_,
                      "UPDATE job_items SET webhook_attempts = webhook_attempts + 1, webhook_state = ?3, webhook_next_ms = ?4"
                      " WHERE job_seq = ?1 AND idx = ?2",
                      kWhat);
  s.bind(1, job_seq).bind(2, index).bind(3, std::string(delivered ? "delivered" : retry_ms ? "pending" : "failed")).bind(4, retry_ms.value_or(0));
  s.step();
}

void SqliteJobStore::webhook_tried(const std::string& id, bool delivered, std::optional<int64_t> retry_ms) {
  std::lock_guard<std::mutex> lock(mutex_);
  sqlite::Statement s(db_,
                      "UPDATE jobs SET webhook_attempts = webhook_attempts + 1, webhook_state = ?2, webhook_next_ms = ?3 WHERE id = ?1",
                      kWhat);
  s.bind(1, id).bind(2, std::string(delivered ? "delivered" : retry_ms ? "pending" : "failed")).bind(3, retry_ms.value_or(0));
  s.step();
}

// ---------------------------------------------------------------------------------------------
// JobRunner

JobRunner::JobRunner(JobStore& store, int concurrency, Run run, Finished finished, std::function<void()> stored)
    : store_(store), concurrency_(std::max(1, concurrency)), run_(std::move(run)), finished_(std::move(finished)), stored_(std::move(stored)) {}

JobRunner::~JobRunner() { stop(); }

void JobRunner::start() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!workers_.empty() || stopping_) return;
  for (int i = 0; i < concurrency_; ++i) workers_.emplace_back([this] { work(); });
  writer_ = std::thread([this] { write(); });
  // Jobs stored by other replicas are claimed when they arrive, not at the next poll.
  store_.on_work_elsewhere([this] { wake(); });
}

void JobRunner::wake() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    woken_ = true;
  }
  wake_.notify_all();
}

void JobRunner::stop() {
  store_.on_work_elsewhere({});
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& w : workers_)
    if (w.joinable()) w.join();
  workers_.clear();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    workers_done_ = true;  // the writer stores what the workers left, then ends
  }
  written_.notify_all();
  if (writer_.joinable()) writer_.join();
}

size_t JobRunner::in_flight() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return running_;
}

void JobRunner::work() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    if (claimed_.empty()) {
      // A few items per read of the database (they stay pending there until their results are stored).
      woken_ = false;
      std::vector<ClaimedItem> more;
      try {
        more = store_.claim(static_cast<size_t>(concurrency_) * 2, busy_);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "arbiter serve: jobs: %s\n", e.what());
      }
      for (ClaimedItem& item : more) {
        busy_.insert({item.job_seq, item.index});
        claimed_.push_back(std::move(item));
      }
      if (claimed_.size() > 1) wake_.notify_all();  // idle workers take the others
      if (claimed_.empty()) {
        // Woken by new work (here or, through the store, on another replica); the poll finds
        // what nobody announces (an item whose lease expired).
        wake_.wait_for(lock, std::chrono::seconds(1), [&] { return stopping_ || woken_ || !claimed_.empty(); });
        continue;
      }
    }
    const ClaimedItem item = std::move(claimed_.front());
    claimed_.pop_front();
    ++running_;
    lock.unlock();
    ItemOutcome outcome;
    try {
      outcome = run_(item);
    } catch (const std::exception& e) {
      outcome = {500, error_json({500, std::string("Internal error: ") + e.what(), "server_error", "", "internal_error", 0}), false};
    }
    lock.lock();
    --running_;
    if (outcome.retry) {
      // It could not run now (a full queue, a draining server): it stays pending, is released for a
      // later claim, and this worker pauses before its next item.
      busy_.erase({item.job_seq, item.index});
      wake_.wait_for(lock, std::chrono::milliseconds(200), [&] { return stopping_; });
      continue;
    }
    finished_items_.push_back({item.job_seq, item.index, outcome.status, std::move(outcome.body)});
    written_.notify_all();
  }
  // Claimed items not started stay pending in the database.
  for (const ClaimedItem& item : claimed_) busy_.erase({item.job_seq, item.index});
  claimed_.clear();
}

void JobRunner::set_retention(double days, std::chrono::milliseconds interval) {
  retention_days_ = days;
  retention_interval_ = interval;
}

void JobRunner::sweep() {
  if (!(retention_days_ > 0)) return;
  const int64_t cutoff_s = unix_ms() / 1000 - static_cast<int64_t>(retention_days_ * 86400.0);
  try {
    const int64_t n = store_.delete_finished_before(cutoff_s);
    if (n > 0) std::fprintf(stderr, "arbiter serve: jobs: deleted %lld finished jobs past the retention period\n", static_cast<long long>(n));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "arbiter serve: jobs: retention sweep failed: %s\n", e.what());
  }
}

void JobRunner::write() {
  sweep();
  auto next_sweep = std::chrono::steady_clock::now() + retention_interval_;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    written_.wait_until(lock, next_sweep, [&] { return !finished_items_.empty() || workers_done_; });
    if (std::chrono::steady_clock::now() >= next_sweep) {
      lock.unlock();
      sweep();
      lock.lock();
      next_sweep = std::chrono::steady_clock::now() + retention_interval_;
      continue;
    }
    if (finished_items_.empty()) return;  // workers done and nothing left
    // Results gather for a moment: one commit per interval, not per item, so that the job writer
    // seldom takes the database's write lock while the decision log (another connection to the same
    // file, whose commits synchronous requests wait for) wants it.
    written_.wait_for(lock, kWriteInterval, [&] { return workers_done_; });
    std::vector<JobStore::ItemResult> batch;
    batch.swap(finished_items_);
    lock.unlock();
    std::vector<JobInfo> jobs;
    try {
      jobs = store_.finish_items(batch);
    } catch (const std::exception& e) {  // they stay pending and run again
      std::fprintf(stderr, "arbiter serve: jobs: storing %zu results failed: %s\n", batch.size(), e.what());
    }
    for (const JobInfo& job : jobs) finished_(job);
    if (stored_) stored_();
    lock.lock();
    for (const auto& r : batch) busy_.erase({r.job_seq, r.index});
    woken_ = true;  // claim again: what was busy is stored
    wake_.notify_all();
  }
}

// ---------------------------------------------------------------------------------------------
// Webhooks

namespace {
// Item webhooks posted at once (each on its own connection).
constexpr int kParallelDeliveries = 8;
}  // namespace

std::string hmac_sha256_hex(const std::string& key, const std::string& body) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(body.data()), body.size(), mac,
       &length);
  std::string out;
  char buf[3];
  for (unsigned int i = 0; i < length; ++i) {
    std::snprintf(buf, sizeof(buf), "%02x", mac[i]);
    out += buf;
  }
  return out;
}

WebhookSender::WebhookSender(JobStore& store, const JobOptions& options, Delivered counted)
    : store_(store), options_(options), counted_(std::move(counted)) {
  for (int i = 0; i < kParallelDeliveries; ++i) clients_.push_back(std::make_unique<WebhookClient>(options.webhook_ca));
  thread_ = std::thread([this] { run(); });
}

WebhookSender::~WebhookSender() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void WebhookSender::wake() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    woken_ = true;
  }
  wake_.notify_all();
}

std::optional<int64_t> WebhookSender::deliver(WebhookClient& client, const std::string& what, const std::string& url, const std::string& body,
                                              int64_t attempts, bool item, bool& delivered) {
  const WebhookDelivery delivery =
      client.post(url, body, {{"X-Arbiter-Signature", "sha256=" + hmac_sha256_hex(options_.webhook_secret, body)}}, options_.webhook_timeout);
  delivered = delivery.status >= 200 && delivery.status < 300;
  if (!delivered)
    std::fprintf(stderr, "arbiter serve: webhook of %s to %s not delivered (attempt %lld): %s\n", what.c_str(), url.c_str(),
                 static_cast<long long>(attempts + 1),
                 delivery.status < 0 ? delivery.error.c_str() : ("HTTP " + std::to_string(delivery.status)).c_str());
  std::optional<int64_t> retry;
  if (!delivered && attempts + 1 < options_.webhook_attempts)
    retry = unix_ms() + (options_.webhook_backoff.count() << std::min<int64_t>(attempts, 20));
  if (counted_) counted_(item, delivered ? "delivered" : retry ? "retried" : "failed");
  return retry;
}

std::optional<int64_t> WebhookSender::deliver_items(const std::vector<ItemWebhook>& items) {
  std::mutex mutex;
  std::optional<int64_t> soonest;
  std::atomic<size_t> next{0};
  const auto work = [&](WebhookClient& client) {
    for (size_t i = next++; i < items.size(); i = next++) {
      const ItemWebhook& item = items[i];
      bool delivered = false;
      const std::optional<int64_t> retry =
          deliver(client, item.job_id + " item " + item.custom_id, item.url, item_webhook_body(item), item.attempts, true, delivered);
      try {
        store_.item_webhook_tried(item.job_seq, item.index, delivered, retry);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "arbiter serve: webhooks: %s\n", e.what());
      }
      std::lock_guard<std::mutex> lock(mutex);
      if (retry && (!soonest || *retry < *soonest)) soonest = retry;
    }
  };
  const size_t helpers = std::min(items.size(), clients_.size()) - 1;  // this thread delivers too
  std::vector<std::thread> threads;
  for (size_t t = 0; t < helpers; ++t) threads.emplace_back(work, std::ref(*clients_[t + 1]));
  work(*clients_[0]);
  for (std::thread& t : threads) t.join();
  return soonest;
}

void WebhookSender::run() {
  // Item webhooks are read a batch at a time, so that a large job's never sit in memory at once.
  constexpr size_t kItemsPerRead = 64;
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    woken_ = false;
    lock.unlock();
    std::optional<int64_t> next;
    const auto sooner = [&next](std::optional<int64_t> t) {
      if (t && (!next || *t < *next)) next = t;
    };
    std::vector<JobInfo> due;
    std::vector<ItemWebhook> items_due;
    try {
      std::optional<int64_t> next_job, next_item;
      due = store_.webhooks_due(unix_ms(), next_job);
      items_due = store_.item_webhooks_due(unix_ms(), kItemsPerRead, next_item);
      sooner(next_job);
      sooner(next_item);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "arbiter serve: webhooks: %s\n", e.what());
      sooner(unix_ms() + 1000);
    }
    if (!items_due.empty()) sooner(deliver_items(items_due));
    for (const JobInfo& job : due) {
      if (!job.webhook_url) continue;
      bool delivered = false;
      const std::optional<int64_t> retry =
          deliver(*clients_[0], job.id, *job.webhook_url, webhook_body(job), job.webhook_attempts, false, delivered);
      sooner(retry);
      try {
        store_.webhook_tried(job.id, delivered, retry);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "arbiter serve: webhooks: %s\n", e.what());
      }
    }
    lock.lock();
    if (stopping_ || woken_) continue;
    if (next) wake_.wait_for(lock, std::chrono::milliseconds(std::max<int64_t>(1, *next - unix_ms())), [&] { return stopping_ || woken_; });
    else wake_.wait(lock, [&] { return stopping_ || woken_; });
  }
}

}  // namespace arbiter::api
