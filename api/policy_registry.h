// PolicyRegistry: the named policies behind /v1/policies. Every change to a policy is a new version
// (1, 2, ...); classify requests name a policy by `id` (its latest version) or `id@version`.
// Deleting removes a version (or all of an id's) for good: version numbers are never reused.
// Kept in memory, and, when given an SQLite file, written through to it and loaded from it at
// start, so policies survive a restart. Every row loaded must be one the API could have stored
// (an addressable id, a version in 1..INT32_MAX, a non-empty text, consistent labels, rules and
// cascade that are JSON objects): a bad row
// refuses start-up with the row named, rather than being dropped silently. A database that cannot
// be written refuses start-up too, unless it is opened read-only (then put/remove throw).
// Given a postgres:// URL instead, the policies live in PostgreSQL, shared by every replica on the
// database: each read first fetches the rows changed since this process last looked (one indexed
// query; usually none), so a version stored by another replica is served at once, and version
// numbers are taken under a database lock, so they are unique across replicas.
// Thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

struct sqlite3;

namespace arbiter::api {
namespace pg {
class Connection;
}

// What a client submits for a policy (a new version of `id`).
struct PolicyDraft {
  std::string id;
  std::string text;
  std::vector<std::string> labels;
  std::vector<std::string> violating_labels;
  std::string description;
  // The moderation pipeline (pipeline/): the rules object and the cascade object, as given (checked
  // by the API before they are stored); null when the policy has none.
  nlohmann::json rules = nullptr;
  nlohmann::json cascade = nullptr;
  bool operator==(const PolicyDraft&) const = default;
};

// One stored version of a policy.
struct StoredPolicy {
  PolicyDraft draft;
  int version = 0;
  int64_t created = 0;  // unix seconds
};

// "id" or "id@version", split.
struct PolicyRef {
  std::string id;
  std::optional<int> version;
};

// The store of named, versioned policies (see the top of this file).
class PolicyRegistry {
 public:
  // db_path empty: in memory only. A postgres:// or postgresql:// URL: PostgreSQL (see the top of
  // this file; throws StorageUnavailable when it cannot be reached). Otherwise opens (creating) the SQLite file and loads it; throws
  // std::runtime_error when the file cannot be used: not writable (the file or its folder, where
  // SQLite keeps its journal), or a row the API could not serve. read_only: the file must exist;
  // it is only read, and put/remove throw std::logic_error.
  explicit PolicyRegistry(const std::string& db_path = "", bool read_only = false);
  ~PolicyRegistry();
  PolicyRegistry(const PolicyRegistry&) = delete;
  PolicyRegistry& operator=(const PolicyRegistry&) = delete;

  // Letters, digits, '_', '-', '.'; 1..128 characters.
  static bool valid_id(const std::string& id);
  // Parses "id" / "id@N" (N >= 1); nullopt when malformed.
  static std::optional<PolicyRef> parse_ref(const std::string& text);

  // Stores `draft` as a new version of its id and returns it; when it equals the latest version,
  // nothing is stored and the latest is returned with *created = false. Throws std::invalid_argument
  // for a bad id or an empty text.
  StoredPolicy put(const PolicyDraft& draft, bool* created = nullptr);
  // The latest live version (no version in the ref) or that version; nullopt when unknown or deleted.
  std::optional<StoredPolicy> get(const PolicyRef& ref) const;
  // The live versions of `id`, ascending.
  std::vector<int> versions(const std::string& id) const;
  // The latest version of every policy, by id.
  std::vector<StoredPolicy> list() const;
  // Deletes one version or, without a version, all of them; returns the versions deleted.
  std::vector<int> remove(const PolicyRef& ref);

  bool persistent() const { return db_ != nullptr || pg_ != nullptr; }
  bool read_only() const { return read_only_; }

 private:
  // Every version ever stored under an id (deleted ones kept as tombstones so numbers stay unique).
  struct Entry {
    StoredPolicy policy;
    bool deleted = false;
  };
  // Closes the SQLite connection (the unique_ptr's deleter).
  struct DbCloser {
    void operator()(sqlite3* db) const;
  };
  void load();
  // A stored row checked (see the top of this file); throws naming the row when it is bad.
  Entry checked_row(const std::string& id, int64_t version, const std::string& text, const std::string& labels,
                    const std::string& violating_labels, const std::string& description, int64_t created, bool deleted,
                    const std::string& pipeline) const;
  // PostgreSQL: applies the rows changed since the last look to policies_ (mutex_ held).
  void pg_sync() const;
  void pg_put(const PolicyDraft& draft, Entry& e, bool& created);
  void exec(const std::string& sql) const;
  void check_writable();

  mutable std::mutex mutex_;
  mutable std::map<std::string, std::vector<Entry>> policies_;
  std::unique_ptr<pg::Connection> pg_;  // PostgreSQL (null: SQLite or memory)
  mutable int64_t pg_change_ = 0;       // the newest change applied from PostgreSQL
  std::unique_ptr<sqlite3, DbCloser> db_;
  std::string db_path_;
  bool read_only_ = false;
  bool pipeline_column_ = false;  // files written before policies had rules and cascades lack it
};

}  // namespace arbiter::api
