// RAII helpers over libpq (the PostgreSQL C API), shared by the PostgreSQL stores: a connection
// that reconnects when it was lost, a query result, parameterized exec(), a transaction, and the
// schema migrations every store runs on open (api/pg_schema.cc). Failures throw pg::Error (with the
// SQLSTATE), or StorageUnavailable (api/errors.h) when the server cannot be reached, so that a
// request is answered 503 with Retry-After instead of 500.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "api/errors.h"

struct pg_conn;
struct pg_result;

namespace arbiter::api::pg {

// Whether a --db value names a PostgreSQL database (postgres:// or postgresql://) rather than an
// SQLite file.
bool is_url(const std::string& db);
// The URL with its password (if any) replaced by "***", for logs and error messages.
std::string masked(const std::string& url);

// A failed statement: the server's message and its SQLSTATE ("" when it sent none).
class Error : public std::runtime_error {
 public:
  Error(const std::string& what, std::string sqlstate) : std::runtime_error(what), sqlstate_(std::move(sqlstate)) {}
  const std::string& sqlstate() const { return sqlstate_; }
  // A deadlock or serialization failure: the transaction may simply be run again.
  bool retryable() const { return sqlstate_ == "40P01" || sqlstate_ == "40001"; }

 private:
  std::string sqlstate_;
};

// One statement parameter as text (PostgreSQL converts it to the column's type); nullopt is NULL.
using Param = std::optional<std::string>;
inline Param param(int64_t v) { return std::to_string(v); }
inline Param param(const std::string& v) { return v; }
Param param(double v);  // exact (17 significant digits)
// A text[] / bigint[] literal ('{"a","b"}') for one parameter: many rows in one statement.
std::string array(const std::vector<std::string>& values);
std::string array(const std::vector<std::optional<std::string>>& values);  // nullopt: a NULL element
std::string array(const std::vector<int64_t>& values);

// A query's rows, cleared with the object.
class Result {
 public:
  explicit Result(pg_result* r) : r_(r) {}
  ~Result();
  Result(Result&& o) noexcept : r_(o.r_) { o.r_ = nullptr; }
  Result& operator=(Result&&) = delete;
  Result(const Result&) = delete;
  int rows() const;
  int64_t affected() const;  // rows an INSERT / UPDATE / DELETE changed
  bool null(int row, int col) const;
  std::string text(int row, int col) const;
  std::optional<std::string> opt_text(int row, int col) const;
  int64_t integer(int row, int col) const;
  double real(int row, int col) const;
  bool boolean(int row, int col) const;  // 't' / 'f'

 private:
  pg_result* r_;
};

// One connection to the server. Not thread-safe: each store guards its connection with a mutex.
// A connection found broken is re-established before the next statement outside a transaction.
class Connection {
 public:
  // Connects (5 s timeout); throws StorageUnavailable when the server cannot be reached, naming
  // `what` (e.g. "job db") and the URL without its password.
  Connection(std::string url, std::string what);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Runs one statement with $1.. parameters (text format). Throws pg::Error, or
  // StorageUnavailable when the connection is lost.
  Result exec(const std::string& sql, const std::vector<Param>& params = {});
  // Several statements without parameters or results (migrations).
  void exec_script(const std::string& sql);
  const std::string& what() const { return what_; }
  bool in_transaction() const { return in_transaction_; }

 private:
  friend class Transaction;
  void ensure();  // reconnects when the connection was lost (outside a transaction)
  [[noreturn]] void fail(pg_result* r);
  std::string url_, what_;
  pg_conn* conn_ = nullptr;
  bool in_transaction_ = false;
};

// A transaction: BEGIN now, ROLLBACK unless commit() was called.
class Transaction {
 public:
  explicit Transaction(Connection& c);
  ~Transaction();
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  void commit();

 private:
  Connection& c_;
  bool done_ = false;
};

// A connection that LISTENs on one channel and waits for its notifications (NOTIFY): how a replica
// hears at once that another one stored work, instead of finding it at its next poll. Not
// thread-safe (one thread waits on it).
class Listener {
 public:
  // Connects and listens; throws StorageUnavailable when the server cannot be reached.
  Listener(std::string url, std::string channel);
  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  // Waits up to `timeout_ms` for a notification on the channel; true when one or more came, or
  // when the connection had to be made again (a notification may have been missed meanwhile).
  // Throws StorageUnavailable when the connection is lost and cannot be made again.
  bool wait(int timeout_ms);

 private:
  void listen();
  bool drain();  // reads what arrived; true when it held a notification
  std::string url_, channel_;
  pg_conn* conn_ = nullptr;
};

// Runs `body` (which opens its own Transaction) again when it failed with a deadlock or a
// serialization failure, up to 5 times.
void retrying(const std::function<void()>& body);

// Brings the database's schema to this arbiter's version (api/pg_schema.cc): creates the tables on
// an empty database, applies the migrations a database of an older version lacks, and refuses one
// of a newer version. Serialized across processes with an advisory lock, so replicas starting
// together do not race.
void migrate(Connection& c);
// The schema version this arbiter writes.
int schema_version();

}  // namespace arbiter::api::pg
