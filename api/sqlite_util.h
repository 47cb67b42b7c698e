// RAII helpers over the SQLite C API, shared by the policy registry and the decision store: a
// prepared statement, exec(), and a write transaction. Every failure throws std::runtime_error whose
// message starts with the caller's name for its database (`what`, e.g. "policy db").
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

namespace arbiter::api::sqlite {

// Runs `sql` (one or more statements without results).
inline void exec(sqlite3* db, const std::string& sql, const char* what) {
  char* error = nullptr;
  if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error) != SQLITE_OK) {
    const std::string why = error ? error : sqlite3_errmsg(db);
    sqlite3_free(error);
    throw std::runtime_error(std::string(what) + ": " + why);
  }
}

// A prepared statement, finalized with the object. bind() returns the statement, so binds chain.
class Statement {
 public:
  Statement(sqlite3* db, const std::string& sql, const char* what) : db_(db), what_(what) {
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt_, nullptr) != SQLITE_OK) fail();
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  Statement& bind(int i, const std::string& v) {
    return check(sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT));
  }
  Statement& bind(int i, int64_t v) { return check(sqlite3_bind_int64(stmt_, i, v)); }
  Statement& bind(int i, double v) { return check(sqlite3_bind_double(stmt_, i, v)); }
  Statement& bind_null(int i) { return check(sqlite3_bind_null(stmt_, i)); }
  template <typename T>
  Statement& bind(int i, const std::optional<T>& v) {
    return v ? bind(i, *v) : bind_null(i);
  }
  // true: a row is ready; false: done.
  bool step() {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    fail();
  }
  void reset() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }
  bool null(int c) const { return sqlite3_column_type(stmt_, c) == SQLITE_NULL; }
  std::string text(int c) const {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, c));
    return p ? std::string(p, static_cast<size_t>(sqlite3_column_bytes(stmt_, c))) : std::string();
  }
  std::optional<std::string> opt_text(int c) const { return null(c) ? std::nullopt : std::optional<std::string>(text(c)); }
  int64_t integer(int c) const { return sqlite3_column_int64(stmt_, c); }
  double real(int c) const { return sqlite3_column_double(stmt_, c); }

 private:
  [[noreturn]] void fail() const { throw std::runtime_error(std::string(what_) + ": " + sqlite3_errmsg(db_)); }
  Statement& check(int rc) {
    if (rc != SQLITE_OK) fail();
    return *this;
  }
  sqlite3* db_;
  const char* what_;
  sqlite3_stmt* stmt_ = nullptr;
};

// A write transaction: BEGIN IMMEDIATE now, ROLLBACK unless commit() was called.
class Transaction {
 public:
  Transaction(sqlite3* db, const char* what) : db_(db), what_(what) { exec(db_, "BEGIN IMMEDIATE", what_); }
  ~Transaction() {
    if (!done_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  void commit() {
    exec(db_, "COMMIT", what_);
    done_ = true;
  }

 private:
  sqlite3* db_;
  const char* what_;
  bool done_ = false;
};

}  // namespace arbiter::api::sqlite
