// PostgreSQL for tests: the server scripts/start-postgres.sh started (ARBITER_TEST_PG, set by
// scripts/test.sh); without it the tests skip, saying so. PgTestDatabase is a database of its own
// (a random name, dropped with the object), so tests never see each other's rows.
#pragma once

#include <gtest/gtest.h>
#include <libpq-fe.h>

#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>

// Skips the test (visibly) when no PostgreSQL server was given.
#define ARBITER_REQUIRE_PG()                                                                                       \
  if (!std::getenv("ARBITER_TEST_PG") || !*std::getenv("ARBITER_TEST_PG"))                                        \
  GTEST_SKIP() << "ARBITER_TEST_PG is not set, so there is no PostgreSQL server to test against (scripts/test.sh " \
                  "starts one; by hand: eval \"$(bash scripts/start-postgres.sh)\")"

namespace arbiter::testing {

class PgTestDatabase {
 public:
  PgTestDatabase() : server_(std::getenv("ARBITER_TEST_PG")) {
    std::mt19937_64 rng{std::random_device{}()};
    char buf[17];
    std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(rng()));
    name_ = std::string("arbiter_test_") + buf;
    admin("CREATE DATABASE " + name_);
    const size_t slash = server_.find('/', server_.find("://") + 3);
    url_ = server_.substr(0, slash) + "/" + name_;
  }
  ~PgTestDatabase() {
    try {
      admin("DROP DATABASE IF EXISTS " + name_ + " WITH (FORCE)");
    } catch (const std::exception&) {
    }
  }
  PgTestDatabase(const PgTestDatabase&) = delete;
  PgTestDatabase& operator=(const PgTestDatabase&) = delete;

  const std::string& url() const { return url_; }
  const std::string& name() const { return name_; }
  // The first value of `sql` run in this database ("" for no rows; throws on an error).
  std::string value(const std::string& sql) const { return run(url_, sql); }
  // Runs `sql` on the server's maintenance database (e.g. to refuse or end connections).
  void admin(const std::string& sql) const { run(server_, sql); }
  // The first value of `sql` run in the database at `url`.
  static std::string run(const std::string& url, const std::string& sql) {
    PGconn* c = PQconnectdb(url.c_str());
    if (PQstatus(c) != CONNECTION_OK) {
      const std::string why = PQerrorMessage(c);
      PQfinish(c);
      throw std::runtime_error("test database: " + why);
    }
    PGresult* r = PQexec(c, sql.c_str());
    const ExecStatusType status = PQresultStatus(r);
    std::string out;
    if (status == PGRES_TUPLES_OK && PQntuples(r) > 0) out = PQgetvalue(r, 0, 0);
    const std::string why = PQerrorMessage(c);
    PQclear(r);
    PQfinish(c);
    if (status != PGRES_TUPLES_OK && status != PGRES_COMMAND_OK) throw std::runtime_error("test database: " + sql + ": " + why);
    return out;
  }

 private:
  std::string server_, name_, url_;
};

}  // namespace arbiter::testing
