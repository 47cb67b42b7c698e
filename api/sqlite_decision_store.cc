#include "api/sqlite_decision_store.h"

#include <sqlite3.h>

#include <filesystem>
#include <stdexcept>
#include <variant>

#include "api/sqlite_util.h"

namespace arbiter::api {
namespace {

constexpr const char* kWhat = "decision db";

// The shared SQLite helpers (api/sqlite_util.h), naming this database in their errors.
class Statement : public sqlite::Statement {
 public:
  Statement(sqlite3* db, const std::string& sql) : sqlite::Statement(db, sql, kWhat) {}
};
class Transaction : public sqlite::Transaction {
 public:
  explicit Transaction(sqlite3* db) : sqlite::Transaction(db, kWhat) {}
};
void exec(sqlite3* db, const std::string& sql) { sqlite::exec(db, sql, kWhat); }

constexpr const char* kColumns =
    "id, created_ms, api_key_id, request_id, model, policy_id, policy_version, policy_sha256, effort, mode, verdict, "
    "verdict_key, violation, confidence, final, reasoning, content, content_sha256, finish_reason, prompt_tokens, "
    "cached_tokens, reasoning_tokens, completion_tokens, latency_ms, feedback_label, feedback_label_json, "
    "feedback_reviewer, feedback_note, feedback_key_id, feedback_ms, feedback_count";

DecisionRecord read_record(const Statement& s) {
  DecisionRecord r;
  r.id = s.text(0);
  r.created_ms = s.integer(1);
  r.api_key_id = s.text(2);
  r.request_id = s.text(3);
  r.model = s.text(4);
  r.policy_id = s.text(5);
  if (!s.null(6)) r.policy_version = static_cast<int>(s.integer(6));
  r.policy_sha256 = s.text(7);
  r.effort = s.text(8);
  r.mode = s.text(9);
  r.verdict_json = s.text(10);
  r.verdict_key = s.opt_text(11);
  r.violation = s.integer(12) != 0;
  if (!s.null(13)) r.confidence = s.real(13);
  r.final_text = s.text(14);
  r.reasoning = s.opt_text(15);
  r.content = s.opt_text(16);
  r.content_sha256 = s.opt_text(17);
  r.finish_reason = s.text(18);
  r.prompt_tokens = static_cast<int>(s.integer(19));
  r.cached_tokens = static_cast<int>(s.integer(20));
  r.reasoning_tokens = static_cast<int>(s.integer(21));
  r.completion_tokens = static_cast<int>(s.integer(22));
  r.latency_ms = s.real(23);
  if (!s.null(24)) {
    DecisionFeedback f;
    f.label = s.text(24);
    f.label_json = s.text(25);
    f.reviewer = s.text(26);
    f.note = s.text(27);
    f.api_key_id = s.text(28);
    f.created_ms = s.integer(29);
    r.feedback = f;
  }
  r.feedback_count = static_cast<int>(s.integer(30));
  return r;
}

using BindValue = std::variant<std::string, int64_t>;

}  // namespace

void SqliteDecisionStore::Closer::operator()(sqlite3* db) const { sqlite3_close(db); }

std::unique_ptr<sqlite3, SqliteDecisionStore::Closer> SqliteDecisionStore::open(bool read_only) const {
  sqlite3* raw = nullptr;
  const int flags = (read_only ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) | SQLITE_OPEN_FULLMUTEX;
  const int rc = sqlite3_open_v2(path_.c_str(), &raw, flags, nullptr);
  std::unique_ptr<sqlite3, Closer> db(raw);
  if (rc != SQLITE_OK)
    throw std::runtime_error("cannot open the decision db " + path_ + ": " + (raw ? sqlite3_errmsg(raw) : "out of memory") +
                             (read_only ? "" : " (the file, or its folder for a new file, must be writable)"));
  sqlite3_busy_timeout(db.get(), 10000);
  return db;
}

SqliteDecisionStore::SqliteDecisionStore(const std::string& path, bool read_only) : path_(path), read_only_(read_only) {
  std::error_code ec;
  if (read_only && !std::filesystem::exists(path, ec)) throw std::runtime_error("the decision db " + path + " does not exist");
  if (!read_only) {
    writer_ = open(false);
    if (sqlite3_db_readonly(writer_.get(), "main") == 1)
      throw std::runtime_error("the decision db " + path + " is read-only: decisions could not be stored. Make the file and its "
                               "folder writable, or turn the decision log off (--no-decision-log)");
    // WAL: one fsync per commit (a rollback journal takes several, ~5x the time here), and readers
    // never wait for the writer. synchronous=FULL: a commit is on disk before it returns.
    try {
      exec(writer_.get(), "PRAGMA journal_mode=WAL");
      exec(writer_.get(), "PRAGMA synchronous=FULL");
    } catch (const std::runtime_error& e) {
      throw std::runtime_error("the decision db " + path + " cannot be written (" + e.what() + ")");
    }
    try {
      Transaction t(writer_.get());
      exec(writer_.get(),
           "CREATE TABLE IF NOT EXISTS arbiter_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL);"
           "CREATE TABLE IF NOT EXISTS decisions ("
           " id TEXT PRIMARY KEY, created_ms INTEGER NOT NULL, api_key_id TEXT NOT NULL, request_id TEXT NOT NULL,"
           " model TEXT NOT NULL, policy_id TEXT NOT NULL, policy_version INTEGER, policy_sha256 TEXT NOT NULL,"
           " effort TEXT NOT NULL, mode TEXT NOT NULL, verdict TEXT NOT NULL, verdict_key TEXT, violation INTEGER NOT NULL,"
           " confidence REAL, final TEXT NOT NULL, reasoning TEXT, content TEXT, content_sha256 TEXT,"
           " finish_reason TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,"
           " reasoning_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, latency_ms REAL NOT NULL,"
           " feedback_label TEXT, feedback_label_json TEXT, feedback_reviewer TEXT, feedback_note TEXT,"
           " feedback_key_id TEXT, feedback_ms INTEGER, feedback_count INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;"
           "CREATE INDEX IF NOT EXISTS decisions_by_key ON decisions (api_key_id, id);"
           "CREATE INDEX IF NOT EXISTS decisions_by_policy ON decisions (policy_id, id);"
           "CREATE INDEX IF NOT EXISTS decisions_by_time ON decisions (created_ms);"
           "CREATE TABLE IF NOT EXISTS decision_feedback ("
           " seq INTEGER PRIMARY KEY AUTOINCREMENT, decision_id TEXT NOT NULL, created_ms INTEGER NOT NULL,"
           " label TEXT NOT NULL, label_json TEXT NOT NULL, reviewer TEXT NOT NULL, note TEXT NOT NULL,"
           " api_key_id TEXT NOT NULL);"
           "CREATE INDEX IF NOT EXISTS decision_feedback_by_decision ON decision_feedback (decision_id);"
           "INSERT OR IGNORE INTO arbiter_schema (component, version) VALUES ('decisions', 1);");
      t.commit();
    } catch (const std::runtime_error& e) {
      throw std::runtime_error("the decision db " + path + " cannot be written (" + e.what() +
                               "). Make the file and its folder (where SQLite keeps its journal) writable");
    }
  }
  reader_ = open(read_only);
  try {
    Statement s(reader_.get(), "SELECT version FROM arbiter_schema WHERE component = 'decisions'");
    if (!s.step()) throw std::runtime_error("no decisions schema");
    if (s.integer(0) > kSchemaVersion)
      throw std::runtime_error("the decision db " + path + " has decisions schema version " + std::to_string(s.integer(0)) +
                               ", newer than this arbiter's (" + std::to_string(kSchemaVersion) + ")");
  } catch (const std::runtime_error& e) {
    if (std::string(e.what()).find("newer") != std::string::npos) throw;
    throw std::runtime_error("the decision db " + path + " holds no decision log (" + e.what() + ")");
  }
}

SqliteDecisionStore::~SqliteDecisionStore() = default;

void SqliteDecisionStore::append(const std::vector<DecisionRecord>& records) {
  if (read_only_) throw std::logic_error("the decision db is open read-only");
  if (records.empty()) return;
  std::lock_guard<std::mutex> lock(write_mutex_);
  Transaction t(writer_.get());
  Statement s(writer_.get(),
              "INSERT INTO decisions (id, created_ms, api_key_id, request_id, model, policy_id, policy_version, policy_sha256,"
              " effort, mode, verdict, verdict_key, violation, confidence, final, reasoning, content, content_sha256,"
              " finish_reason, prompt_tokens, cached_tokens, reasoning_tokens, completion_tokens, latency_ms)"
              " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
  for (const DecisionRecord& r : records) {
    s.bind(1, r.id);
    s.bind(2, r.created_ms);
    s.bind(3, r.api_key_id);
    s.bind(4, r.request_id);
    s.bind(5, r.model);
    s.bind(6, r.policy_id);
    if (r.policy_version) s.bind(7, static_cast<int64_t>(*r.policy_version));
    else s.bind_null(7);
    s.bind(8, r.policy_sha256);
    s.bind(9, r.effort);
    s.bind(10, r.mode);
    s.bind(11, r.verdict_json);
    s.bind(12, r.verdict_key);
    s.bind(13, static_cast<int64_t>(r.violation));
    s.bind(14, r.confidence);
    s.bind(15, r.final_text);
    s.bind(16, r.reasoning);
    s.bind(17, r.content);
    s.bind(18, r.content_sha256);
    s.bind(19, r.finish_reason);
    s.bind(20, static_cast<int64_t>(r.prompt_tokens));
    s.bind(21, static_cast<int64_t>(r.cached_tokens));
    s.bind(22, static_cast<int64_t>(r.reasoning_tokens));
    s.bind(23, static_cast<int64_t>(r.completion_tokens));
    s.bind(24, r.latency_ms);
    s.step();
    s.reset();
  }
  t.commit();
}

std::optional<DecisionRecord> SqliteDecisionStore::get(const std::string& id, const std::optional<std::string>& scope) const {
  std::lock_guard<std::mutex> lock(read_mutex_);
  Statement s(reader_.get(), std::string("SELECT ") + kColumns + " FROM decisions WHERE id = ?" +
                                 (scope ? " AND api_key_id = ?" : ""));
  s.bind(1, id);
  if (scope) s.bind(2, *scope);
  if (!s.step()) return std::nullopt;
  return read_record(s);
}

void SqliteDecisionStore::query(const DecisionQuery& q, bool paged, const std::function<bool(const DecisionRecord&)>& each) const {
  std::string where;
  std::vector<BindValue> binds;
  auto clause = [&](const std::string& c) { where += (where.empty() ? " WHERE " : " AND ") + c; };
  auto with = [&](const std::string& c, BindValue v) {
    clause(c);
    binds.push_back(std::move(v));
  };
  for (const DecisionCondition& c : decision_conditions(q)) {
    if (c.text) with(c.sql, *c.text);
    else if (c.number) with(c.sql, *c.number);
    else clause(c.sql);
  }
  if (q.after) with(q.oldest_first ? "id > ?" : "id < ?", *q.after);
  std::string sql = std::string("SELECT ") + kColumns + " FROM decisions" + where + " ORDER BY id" + (q.oldest_first ? "" : " DESC");
  if (paged) sql += " LIMIT " + std::to_string(q.limit + 1);
  std::lock_guard<std::mutex> lock(read_mutex_);
  Statement s(reader_.get(), sql);
  for (size_t i = 0; i < binds.size(); ++i) {
    const int index = static_cast<int>(i) + 1;
    if (const auto* text = std::get_if<std::string>(&binds[i])) s.bind(index, *text);
    else s.bind(index, std::get<int64_t>(binds[i]));
  }
  while (s.step())
    if (!each(read_record(s))) break;
}

bool SqliteDecisionStore::add_feedback(const std::string& decision_id, const std::optional<std::string>& scope,
                                       const DecisionFeedback& f) {
  if (read_only_) throw std::logic_error("the decision db is open read-only");
  std::lock_guard<std::mutex> lock(write_mutex_);
  Transaction t(writer_.get());
  {
    Statement u(writer_.get(), std::string("UPDATE decisions SET feedback_label = ?, feedback_label_json = ?, feedback_reviewer = ?,"
                                           " feedback_note = ?, feedback_key_id = ?, feedback_ms = ?, feedback_count = feedback_count + 1"
                                           " WHERE id = ?") + (scope ? " AND api_key_id = ?" : ""));
    u.bind(1, f.label);
    u.bind(2, f.label_json);
    u.bind(3, f.reviewer);
    u.bind(4, f.note);
    u.bind(5, f.api_key_id);
    u.bind(6, f.created_ms);
    u.bind(7, decision_id);
    if (scope) u.bind(8, *scope);
    u.step();
    if (sqlite3_changes(writer_.get()) == 0) return false;
  }
  Statement s(writer_.get(),
              "INSERT INTO decision_feedback (decision_id, created_ms, label, label_json, reviewer, note, api_key_id)"
              " VALUES (?, ?, ?, ?, ?, ?, ?)");
  s.bind(1, decision_id);
  s.bind(2, f.created_ms);
  s.bind(3, f.label);
  s.bind(4, f.label_json);
  s.bind(5, f.reviewer);
  s.bind(6, f.note);
  s.bind(7, f.api_key_id);
  s.step();
  t.commit();
  return true;
}

int64_t SqliteDecisionStore::delete_before(int64_t cutoff_ms) {
  if (read_only_) throw std::logic_error("the decision db is open read-only");
  std::lock_guard<std::mutex> lock(write_mutex_);
  Transaction t(writer_.get());
  {
    Statement f(writer_.get(),
                "DELETE FROM decision_feedback WHERE decision_id IN (SELECT id FROM decisions WHERE created_ms < ?)");
    f.bind(1, cutoff_ms);
    f.step();
  }
  Statement d(writer_.get(), "DELETE FROM decisions WHERE created_ms < ?");
  d.bind(1, cutoff_ms);
  d.step();
  const int64_t deleted = sqlite3_changes(writer_.get());
  t.commit();
  return deleted;
}

int64_t SqliteDecisionStore::count() const {
  std::lock_guard<std::mutex> lock(read_mutex_);
  Statement s(reader_.get(), "SELECT COUNT(*) FROM decisions");
  s.step();
  return s.integer(0);
}

}  // namespace arbiter::api
