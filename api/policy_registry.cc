#include "api/policy_registry.h"

#include <sqlite3.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "api/pg_util.h"
#include "api/sqlite_util.h"

namespace arbiter::api {
namespace {

// The shared SQLite statement (api/sqlite_util.h), naming this database in its errors.
class Statement : public sqlite::Statement {
 public:
  Statement(sqlite3* db, const std::string& sql) : sqlite::Statement(db, sql, "policy db") {}
};

std::string to_json_array(const std::vector<std::string>& v) { return nlohmann::json(v).dump(); }

// A stored JSON array of strings; nullopt when the text is anything else.
std::optional<std::vector<std::string>> from_json_array(const std::string& text) {
  const auto j = nlohmann::json::parse(text, nullptr, false);
  if (!j.is_array()) return std::nullopt;
  std::vector<std::string> out;
  for (const auto& e : j) {
    if (!e.is_string()) return std::nullopt;
    out.push_back(e.get<std::string>());
  }
  return out;
}

// Text for a message: control bytes and quotes escaped, cut at 80 bytes.
std::string shown(const std::string& text) {
  std::string out;
  for (const char c : text.substr(0, 80)) {
    if (static_cast<unsigned char>(c) < 0x20 || c == '\'' || c == '\\') {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", static_cast<unsigned char>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return text.size() > 80 ? out + "..." : out;
}

int64_t now_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

void PolicyRegistry::DbCloser::operator()(sqlite3* db) const { sqlite3_close(db); }

PolicyRegistry::PolicyRegistry(const std::string& db_path, bool read_only) : db_path_(db_path), read_only_(read_only) {
  if (db_path.empty()) {
    if (read_only) throw std::invalid_argument("a read-only policy db needs a policy db file");
    return;
  }
  if (pg::is_url(db_path)) {
    pg_ = std::make_unique<pg::Connection>(db_path, "policy db");
    if (!read_only) pg::migrate(*pg_);
    std::lock_guard<std::mutex> lock(mutex_);
    pg_sync();
    return;
  }
  std::error_code ec;
  if (read_only && !std::filesystem::exists(db_path, ec))
    throw std::runtime_error("policy db " + db_path + " does not exist (read-only mode serves an existing file)");
  sqlite3* raw = nullptr;
  const int flags = (read_only ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) | SQLITE_OPEN_FULLMUTEX;
  const int rc = sqlite3_open_v2(db_path.c_str(), &raw, flags, nullptr);
  db_.reset(raw);  // closed by the holder even when opening failed
  if (rc != SQLITE_OK)
    throw std::runtime_error("cannot open policy db " + db_path + ": " + (raw ? sqlite3_errmsg(raw) : "out of memory") +
                             (read_only ? "" : " (the file, or its folder for a new file, must be writable)"));
  sqlite3_busy_timeout(db_.get(), 5000);
  if (!read_only) {
    check_writable();
    exec(
        "CREATE TABLE IF NOT EXISTS policies ("
        " id TEXT NOT NULL, version INTEGER NOT NULL, text TEXT NOT NULL, labels TEXT NOT NULL,"
        " violating_labels TEXT NOT NULL, description TEXT NOT NULL, created INTEGER NOT NULL,"
        " deleted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (id, version))");
  }
  {
    Statement columns(db_.get(), "SELECT name FROM pragma_table_info('policies')");
    while (columns.step())
      if (columns.text(0) == "pipeline") pipeline_column_ = true;
  }
  if (!pipeline_column_ && !read_only) {
    exec("ALTER TABLE policies ADD COLUMN pipeline TEXT NOT NULL DEFAULT '{}'");
    pipeline_column_ = true;
  }
  load();
}

void PolicyRegistry::check_writable() {
  const std::string fix = ": registered policies could not be saved. Make the file and its folder (where SQLite "
                          "keeps its journal) writable, or serve it read-only (--policy-db-readonly)";
  // SQLite opens a file it may not write read-only without a word.
  if (sqlite3_db_readonly(db_.get(), "main") == 1)
    throw std::runtime_error("policy db " + db_path_ + " is read-only" + fix);
  // A write that is rolled back: creates the file when new and needs the journal next to it.
  char* error = nullptr;
  const int rc = sqlite3_exec(db_.get(), "BEGIN IMMEDIATE; CREATE TABLE arbiter_write_probe (x INTEGER); ROLLBACK;", nullptr,
                              nullptr, &error);
  if (rc != SQLITE_OK) {
    const std::string why = error ? error : sqlite3_errmsg(db_.get());
    sqlite3_free(error);
    sqlite3_exec(db_.get(), "ROLLBACK", nullptr, nullptr, nullptr);
    throw std::runtime_error("policy db " + db_path_ + " cannot be written (" + why + ")" + fix);
  }
}

PolicyRegistry::~PolicyRegistry() = default;

void PolicyRegistry::exec(const std::string& sql) const { sqlite::exec(db_.get(), sql, "policy db"); }

void PolicyRegistry::load() {
  std::unique_ptr<Statement> s;
  try {
    s = std::make_unique<Statement>(db_.get(),
                                    std::string("SELECT id, version, text, labels, violating_labels, description, created, deleted, ") +
                                        (pipeline_column_ ? "pipeline" : "'{}'") + " FROM policies ORDER BY id, version");
  } catch (const std::runtime_error& e) {
    throw std::runtime_error("policy db " + db_path_ + " has no readable policies table (" + e.what() + ")");
  }
  while (s->step()) {
    Entry e = checked_row(s->text(0), s->integer(1), s->text(2), s->text(3), s->text(4), s->text(5), s->integer(6), s->integer(7) != 0,
                          s->text(8));
    policies_[e.policy.draft.id].push_back(std::move(e));
  }
}

PolicyRegistry::Entry PolicyRegistry::checked_row(const std::string& id, int64_t version, const std::string& text,
                                                  const std::string& labels_text, const std::string& violating_text,
                                                  const std::string& description, int64_t created, bool deleted,
                                                  const std::string& pipeline_text) const {
  Entry e;
  e.policy.draft.id = id;
  e.policy.draft.text = text;
  const auto labels = from_json_array(labels_text);
  const auto violating = from_json_array(violating_text);
  e.policy.draft.description = description;
  e.policy.created = created;
  e.deleted = deleted;
  const nlohmann::json pipeline = nlohmann::json::parse(pipeline_text, nullptr, false);
  // Only rows the API could have stored: anything else could not be addressed or served.
  std::string problem;
  if (!valid_id(e.policy.draft.id)) problem = "the id is not 1-128 letters, digits, '_', '-' or '.'";
  else if (version < 1 || version > std::numeric_limits<int32_t>::max()) problem = "the version is not in 1..2147483647";
  else if (!labels) problem = "'labels' is not a JSON array of strings";
  else if (!violating) problem = "'violating_labels' is not a JSON array of strings";
  else if (!e.deleted && e.policy.draft.text.empty()) problem = "the text is empty";
  else if (!pipeline.is_object() || (pipeline.contains("rules") && !pipeline["rules"].is_object()) ||
           (pipeline.contains("cascade") && !pipeline["cascade"].is_object()))
    problem = "'pipeline' is not a JSON object with optional \"rules\" and \"cascade\" objects";
  else {
    for (const auto& l : *labels)
      if (l.empty()) problem = "a label is empty";
    for (const auto& v : *violating)
      if (std::find(labels->begin(), labels->end(), v) == labels->end())
        problem = "the violating label '" + shown(v) + "' is not one of its labels";
  }
  if (!problem.empty())
    throw std::runtime_error("policy db " + (pg_ ? pg::masked(db_path_) : db_path_) + ": the row with id '" + shown(e.policy.draft.id) +
                             "' and version " + std::to_string(version) + " cannot be served: " + problem +
                             ". Correct or delete the row (rows are never skipped: that would lose policies silently)");
  e.policy.version = static_cast<int>(version);
  e.policy.draft.labels = *labels;
  e.policy.draft.violating_labels = *violating;
  if (pipeline.contains("rules")) e.policy.draft.rules = pipeline["rules"];
  if (pipeline.contains("cascade")) e.policy.draft.cascade = pipeline["cascade"];
  return e;
}

void PolicyRegistry::pg_sync() const {
  if (!pg_) return;
  const pg::Result r = pg_->exec(
      "SELECT id, version, text, labels, violating_labels, description, created, deleted, pipeline, change FROM policies"
      " WHERE change > $1 ORDER BY change",
      {pg::param(pg_change_)});
  for (int i = 0; i < r.rows(); ++i) {
    Entry e = checked_row(r.text(i, 0), r.integer(i, 1), r.text(i, 2), r.text(i, 3), r.text(i, 4), r.text(i, 5), r.integer(i, 6),
                          r.boolean(i, 7), r.text(i, 8));
    auto& versions = policies_[e.policy.draft.id];
    const auto at = std::lower_bound(versions.begin(), versions.end(), e.policy.version,
                                     [](const Entry& x, int v) { return x.policy.version < v; });
    if (at != versions.end() && at->policy.version == e.policy.version) *at = std::move(e);
    else versions.insert(at, std::move(e));
    pg_change_ = std::max(pg_change_, r.integer(i, 9));
  }
}

bool PolicyRegistry::valid_id(const std::string& id) {
  if (id.empty() || id.size() > 128) return false;
  for (char c : id)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.'))
      return false;
  return true;
}

std::optional<PolicyRef> PolicyRegistry::parse_ref(const std::string& text) {
  PolicyRef ref;
  const size_t at = text.find('@');
  ref.id = text.substr(0, at);
  if (!valid_id(ref.id)) return std::nullopt;
  if (at == std::string::npos) return ref;
  const std::string number = text.substr(at + 1);
  if (number.empty() || number.size() > 9 || number[0] == '0') return std::nullopt;
  for (char c : number)
    if (c < '0' || c > '9') return std::nullopt;
  ref.version = std::stoi(number);
  return ref;
}

StoredPolicy PolicyRegistry::put(const PolicyDraft& draft, bool* created) {
  if (read_only_) throw std::logic_error("the policy registry is read-only");
  if (!valid_id(draft.id))
    throw std::invalid_argument("policy id must be 1-128 letters, digits, '_', '-' or '.' (got '" + draft.id + "')");
  if (draft.text.empty()) throw std::invalid_argument("policy text must not be empty");
  std::lock_guard<std::mutex> lock(mutex_);
  if (pg_) {
    Entry e;
    bool made = false;
    pg_put(draft, e, made);
    if (created) *created = made;
    return e.policy;
  }
  auto& versions = policies_[draft.id];
  for (auto it = versions.rbegin(); it != versions.rend(); ++it) {
    if (it->deleted) continue;
    if (it->policy.draft == draft) {
      if (created) *created = false;
      return it->policy;
    }
    break;
  }
  if (!versions.empty() && versions.back().policy.version == std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("policy '" + draft.id + "' has no version numbers left");
  Entry e;
  e.policy.draft = draft;
  e.policy.version = versions.empty() ? 1 : versions.back().policy.version + 1;
  e.policy.created = now_seconds();
  if (db_) {
    Statement s(db_.get(),
                "INSERT INTO policies (id, version, text, labels, violating_labels, description, created, deleted, pipeline) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)");
    s.bind(1, draft.id).bind(2, static_cast<int64_t>(e.policy.version)).bind(3, draft.text);
    s.bind(4, to_json_array(draft.labels)).bind(5, to_json_array(draft.violating_labels)).bind(6, draft.description);
    s.bind(7, e.policy.created);
    nlohmann::json pipeline = nlohmann::json::object();
    if (!draft.rules.is_null()) pipeline["rules"] = draft.rules;
    if (!draft.cascade.is_null()) pipeline["cascade"] = draft.cascade;
    s.bind(8, pipeline.dump());
    s.step();
  }
  versions.push_back(e);
  if (created) *created = true;
  return e.policy;
}

void PolicyRegistry::pg_put(const PolicyDraft& draft, Entry& e, bool& created) {
  pg::retrying([&] {
    pg::Transaction t(*pg_);
    // One writer of policies at a time across replicas: version numbers are unique, and changes
    // commit in the order of their change numbers (so pg_sync never skips one committed late).
    pg_->exec("SELECT pg_advisory_xact_lock(7022083946370403)");
    pg_sync();
    auto& versions = policies_[draft.id];
    for (auto it = versions.rbegin(); it != versions.rend(); ++it) {
      if (it->deleted) continue;
      if (it->policy.draft == draft) {
        t.commit();
        e = *it;
        created = false;
        return;
      }
      break;
    }
    if (!versions.empty() && versions.back().policy.version == std::numeric_limits<int32_t>::max())
      throw std::invalid_argument("policy '" + draft.id + "' has no version numbers left");
    nlohmann::json pipeline = nlohmann::json::object();
    if (!draft.rules.is_null()) pipeline["rules"] = draft.rules;
    if (!draft.cascade.is_null()) pipeline["cascade"] = draft.cascade;
    const int version = versions.empty() ? 1 : versions.back().policy.version + 1;
    pg_->exec("INSERT INTO policies (id, version, text, labels, violating_labels, description, created, deleted, pipeline)"
              " VALUES ($1, $2, $3, $4, $5, $6, $7, false, $8)",
              {draft.id, pg::param(static_cast<int64_t>(version)), draft.text, to_json_array(draft.labels),
               to_json_array(draft.violating_labels), draft.description, pg::param(now_seconds()), pipeline.dump()});
    t.commit();
    pg_sync();
    // Ours by its number: another replica may have stored a later version since the commit.
    for (const Entry& stored : policies_[draft.id])
      if (stored.policy.version == version) e = stored;
    created = true;
  });
}

std::optional<StoredPolicy> PolicyRegistry::get(const PolicyRef& ref) const {
  std::lock_guard<std::mutex> lock(mutex_);
  pg_sync();
  const auto it = policies_.find(ref.id);
  if (it == policies_.end()) return std::nullopt;
  for (auto e = it->second.rbegin(); e != it->second.rend(); ++e) {
    if (e->deleted) continue;
    if (!ref.version || *ref.version == e->policy.version) return e->policy;
  }
  return std::nullopt;
}

std::vector<int> PolicyRegistry::versions(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  pg_sync();
  std::vector<int> out;
  if (const auto it = policies_.find(id); it != policies_.end())
    for (const Entry& e : it->second)
      if (!e.deleted) out.push_back(e.policy.version);
  return out;
}

std::vector<StoredPolicy> PolicyRegistry::list() const {
  std::lock_guard<std::mutex> lock(mutex_);
  pg_sync();
  std::vector<StoredPolicy> out;
  for (const auto& [id, versions] : policies_)
    for (auto e = versions.rbegin(); e != versions.rend(); ++e)
      if (!e->deleted) {
        out.push_back(e->policy);
        break;
      }
  return out;
}

std::vector<int> PolicyRegistry::remove(const PolicyRef& ref) {
  if (read_only_) throw std::logic_error("the policy registry is read-only");
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int> removed;
  if (pg_) {
    pg::retrying([&] {
      removed.clear();
      pg::Transaction t(*pg_);
      pg_->exec("SELECT pg_advisory_xact_lock(7022083946370403)");
      const pg::Result r = pg_->exec(
          "UPDATE policies SET deleted = true, change = nextval('arbiter_policy_changes')"
          " WHERE id = $1 AND ($2::integer IS NULL OR version = $2) AND NOT deleted RETURNING version",
          {ref.id, ref.version ? pg::param(static_cast<int64_t>(*ref.version)) : std::nullopt});
      for (int i = 0; i < r.rows(); ++i) removed.push_back(static_cast<int>(r.integer(i, 0)));
      t.commit();
    });
    std::sort(removed.begin(), removed.end());
    pg_sync();
    return removed;
  }
  const auto it = policies_.find(ref.id);
  if (it == policies_.end()) return removed;
  for (Entry& e : it->second) {
    if (e.deleted || (ref.version && *ref.version != e.policy.version)) continue;
    if (db_) {
      Statement s(db_.get(), "UPDATE policies SET deleted = 1 WHERE id = ? AND version = ?");
      s.bind(1, ref.id).bind(2, static_cast<int64_t>(e.policy.version));
      s.step();
    }
    e.deleted = true;
    removed.push_back(e.policy.version);
  }
  return removed;
}

}  // namespace arbiter::api
