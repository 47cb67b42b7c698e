#include "api/pg_util.h"

#include <libpq-fe.h>
#include <poll.h>

#include <cstdio>
#include <cstdlib>
#include <thread>

namespace arbiter::api::pg {

bool is_url(const std::string& db) { return db.rfind("postgres://", 0) == 0 || db.rfind("postgresql://", 0) == 0; }

std::string masked(const std::string& url) {
  // scheme://[user[:password]@]host...: the password is between the first ':' after the scheme and
  // the last '@' of the authority.
  const size_t scheme = url.find("://");
  if (scheme == std::string::npos) return url;
  const size_t start = scheme + 3;
  const size_t end = url.find_first_of("/?", start);
  const std::string authority = url.substr(start, end == std::string::npos ? std::string::npos : end - start);
  const size_t at = authority.rfind('@');
  std::string out = url;
  if (at != std::string::npos) {
    const size_t colon = authority.find(':');
    if (colon != std::string::npos && colon < at) out = url.substr(0, start + colon + 1) + "***" + url.substr(start + at);
  }
  // A password given as a query parameter (?password=...) is masked too.
  for (size_t p = out.find("password="); p != std::string::npos; p = out.find("password=", p + 1)) {
    const size_t value = p + 9;
    const size_t stop = out.find('&', value);
    out = out.substr(0, value) + "***" + (stop == std::string::npos ? "" : out.substr(stop));
  }
  return out;
}

Param param(double v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return std::string(buf);
}

std::string array(const std::vector<std::string>& values) {
  std::vector<std::optional<std::string>> all(values.begin(), values.end());
  return array(all);
}

std::string array(const std::vector<std::optional<std::string>>& values) {
  std::string out = "{";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) out += ',';
    if (!values[i]) {
      out += "NULL";
      continue;
    }
    out += '"';
    for (const char c : *values[i]) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    out += '"';
  }
  return out + "}";
}

std::string array(const std::vector<int64_t>& values) {
  std::string out = "{";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? "," : "") + std::to_string(values[i]);
  return out + "}";
}

Result::~Result() { PQclear(r_); }
int Result::rows() const { return PQntuples(r_); }
int64_t Result::affected() const {
  const char* n = PQcmdTuples(r_);
  return n && *n ? std::strtoll(n, nullptr, 10) : 0;
}
bool Result::null(int row, int col) const { return PQgetisnull(r_, row, col) != 0; }
std::string Result::text(int row, int col) const {
  return std::string(PQgetvalue(r_, row, col), static_cast<size_t>(PQgetlength(r_, row, col)));
}
std::optional<std::string> Result::opt_text(int row, int col) const {
  return null(row, col) ? std::nullopt : std::optional<std::string>(text(row, col));
}
int64_t Result::integer(int row, int col) const { return std::strtoll(PQgetvalue(r_, row, col), nullptr, 10); }
double Result::real(int row, int col) const { return std::strtod(PQgetvalue(r_, row, col), nullptr); }
bool Result::boolean(int row, int col) const { return PQgetvalue(r_, row, col)[0] == 't'; }

namespace {
// Connects to `url` with a bounded wait; the connection even when it failed (the caller checks).
pg_conn* connect(const std::string& url) {
  const char* keys[] = {"dbname", "connect_timeout", "application_name", nullptr};
  const char* values[] = {url.c_str(), "5", "arbiter", nullptr};
  return PQconnectdbParams(keys, values, 1);
}

// A connection to `url`, or StorageUnavailable naming `what`.
pg_conn* connect_or_throw(const std::string& url, const std::string& what) {
  pg_conn* conn = connect(url);
  if (PQstatus(conn) != CONNECTION_OK) {
    const std::string why = conn ? PQerrorMessage(conn) : "out of memory";
    PQfinish(conn);
    throw StorageUnavailable("cannot connect the " + what + " to " + masked(url) + ": " + why);
  }
  PQsetNoticeProcessor(conn, [](void*, const char*) {}, nullptr);  // NOTICEs (e.g. "already exists") are not errors
  return conn;
}
}  // namespace

Connection::Connection(std::string url, std::string what) : url_(std::move(url)), what_(std::move(what)) {
  conn_ = connect_or_throw(url_, what_);
}

Connection::~Connection() { PQfinish(conn_); }

void Connection::ensure() {
  if (conn_ && PQstatus(conn_) == CONNECTION_OK) return;
  if (in_transaction_) throw StorageUnavailable(what_ + ": the connection to the database was lost");
  PQreset(conn_);
  if (PQstatus(conn_) != CONNECTION_OK)
    throw StorageUnavailable(what_ + ": the database " + masked(url_) + " is unavailable: " + PQerrorMessage(conn_));
  PQsetNoticeProcessor(conn_, [](void*, const char*) {}, nullptr);
}

Listener::Listener(std::string url, std::string channel) : url_(std::move(url)), channel_(std::move(channel)) {
  conn_ = connect_or_throw(url_, "job listener");
  try {
    listen();
  } catch (...) {
    PQfinish(conn_);
    throw;
  }
}

Listener::~Listener() { PQfinish(conn_); }

void Listener::listen() {
  char* quoted = PQescapeIdentifier(conn_, channel_.data(), channel_.size());
  if (!quoted) throw StorageUnavailable("job listener: " + std::string(PQerrorMessage(conn_)));
  pg_result* r = PQexec(conn_, ("LISTEN " + std::string(quoted)).c_str());
  PQfreemem(quoted);
  const bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
  PQclear(r);
  if (!ok) throw StorageUnavailable("job listener: LISTEN failed: " + std::string(PQerrorMessage(conn_)));
}

bool Listener::drain() {
  bool any = false;
  while (PGnotify* n = PQnotifies(conn_)) {
    any = true;
    PQfreemem(n);
  }
  return any;
}

bool Listener::wait(int timeout_ms) {
  if (PQstatus(conn_) != CONNECTION_OK) {
    PQreset(conn_);
    if (PQstatus(conn_) != CONNECTION_OK)
      throw StorageUnavailable("job listener: the database " + masked(url_) + " is unavailable: " + PQerrorMessage(conn_));
    PQsetNoticeProcessor(conn_, [](void*, const char*) {}, nullptr);
    listen();
    return true;
  }
  if (drain()) return true;  // already read with an earlier message
  pollfd fd{PQsocket(conn_), POLLIN, 0};
  if (fd.fd < 0) throw StorageUnavailable("job listener: no connection to the database");
  if (::poll(&fd, 1, timeout_ms) <= 0) return false;
  if (PQconsumeInput(conn_) == 0) throw StorageUnavailable("job listener: " + std::string(PQerrorMessage(conn_)));
  return drain();
}

void Connection::fail(pg_result* r) {
  const char* state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : nullptr;
  std::string sqlstate = state ? state : "";
  std::string message = r ? PQresultErrorMessage(r) : "";
  if (message.empty()) message = PQerrorMessage(conn_);
  while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
  PQclear(r);
  // The server went away (08: connection exception; 57P01..3: shut down, crashed, starting up).
  if (PQstatus(conn_) != CONNECTION_OK || sqlstate.rfind("08", 0) == 0 || sqlstate.rfind("57P0", 0) == 0)
    throw StorageUnavailable(what_ + ": the database is unavailable: " + message);
  throw Error(what_ + ": " + message, sqlstate);
}

Result Connection::exec(const std::string& sql, const std::vector<Param>& params) {
  ensure();
  std::vector<const char*> values;
  values.reserve(params.size());
  for (const Param& p : params) values.push_back(p ? p->c_str() : nullptr);
  pg_result* r = PQexecParams(conn_, sql.c_str(), static_cast<int>(values.size()), nullptr, values.data(), nullptr, nullptr, 0);
  const ExecStatusType status = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) fail(r);
  return Result(r);
}

void Connection::exec_script(const std::string& sql) {
  ensure();
  pg_result* r = PQexec(conn_, sql.c_str());
  const ExecStatusType status = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) fail(r);
  PQclear(r);
}

Transaction::Transaction(Connection& c) : c_(c) {
  c_.exec("BEGIN");
  c_.in_transaction_ = true;
}

Transaction::~Transaction() {
  c_.in_transaction_ = false;
  if (!done_ && c_.conn_ && PQstatus(c_.conn_) == CONNECTION_OK) PQclear(PQexec(c_.conn_, "ROLLBACK"));
}

void Transaction::commit() {
  c_.exec("COMMIT");
  done_ = true;
  c_.in_transaction_ = false;
}

void retrying(const std::function<void()>& body) {
  for (int attempt = 1;; ++attempt) {
    try {
      body();
      return;
    } catch (const Error& e) {
      if (!e.retryable() || attempt >= 5) throw;
      std::this_thread::sleep_for(std::chrono::milliseconds(5 * attempt));
    }
  }
}

}  // namespace arbiter::api::pg
