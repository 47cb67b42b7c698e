// The PostgreSQL schema of `arbiter serve --db postgres://...` and its migrations. Version N of the
// schema is migration 1..N applied in order; table arbiter_schema holds the version a database is
// at. Every store runs migrate() when it opens; the first to take the advisory lock does the work,
// the others then find the database current.
#include <string>
#include <vector>

#include "api/pg_util.h"

namespace arbiter::api::pg {
namespace {

// Key of the advisory lock that serializes migrations across processes ("arbiter" in ASCII).
constexpr const char* kMigrationLock = "7022083946370402";

// Migration i + 1 (never edit one that has shipped: add the next).
const std::vector<std::string>& migrations() {
  static const std::vector<std::string> all = {
      // 1: policies, the decision log, jobs.
      // Policies: every version ever stored (deleted ones kept so numbers are never reused);
      // `change` is taken from arbiter_policy_changes on every insert and delete, so a replica
      // reads only what changed since it last looked.
      "CREATE SEQUENCE arbiter_policy_changes;"
      "CREATE TABLE policies ("
      " id TEXT NOT NULL, version INTEGER NOT NULL, text TEXT NOT NULL, labels TEXT NOT NULL,"
      " violating_labels TEXT NOT NULL, description TEXT NOT NULL, created BIGINT NOT NULL,"
      " deleted BOOLEAN NOT NULL DEFAULT false, pipeline TEXT NOT NULL DEFAULT '{}',"
      " change BIGINT NOT NULL DEFAULT nextval('arbiter_policy_changes'), PRIMARY KEY (id, version));"
      "CREATE INDEX policies_by_change ON policies (change);"
      // The decision log (as in SQLite: the latest feedback beside the decision, all of it in
      // decision_feedback).
      "CREATE TABLE decisions ("
      " id TEXT PRIMARY KEY, created_ms BIGINT NOT NULL, api_key_id TEXT NOT NULL, request_id TEXT NOT NULL,"
      " model TEXT NOT NULL, policy_id TEXT NOT NULL, policy_version INTEGER, policy_sha256 TEXT NOT NULL,"
      " effort TEXT NOT NULL, mode TEXT NOT NULL, verdict TEXT NOT NULL, verdict_key TEXT, violation SMALLINT NOT NULL,"
      " confidence DOUBLE PRECISION, final TEXT NOT NULL, reasoning TEXT, content TEXT, content_sha256 TEXT,"
      " finish_reason TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,"
      " reasoning_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, latency_ms DOUBLE PRECISION NOT NULL,"
      " feedback_label TEXT, feedback_label_json TEXT, feedback_reviewer TEXT, feedback_note TEXT,"
      " feedback_key_id TEXT, feedback_ms BIGINT, feedback_count INTEGER NOT NULL DEFAULT 0);"
      "CREATE INDEX decisions_by_key ON decisions (api_key_id, id);"
      "CREATE INDEX decisions_by_policy ON decisions (policy_id, id);"
      "CREATE INDEX decisions_by_time ON decisions (created_ms);"
      "CREATE TABLE decision_feedback ("
      " seq BIGSERIAL PRIMARY KEY, decision_id TEXT NOT NULL, created_ms BIGINT NOT NULL,"
      " label TEXT NOT NULL, label_json TEXT NOT NULL, reviewer TEXT NOT NULL, note TEXT NOT NULL,"
      " api_key_id TEXT NOT NULL);"
      "CREATE INDEX decision_feedback_by_decision ON decision_feedback (decision_id);"
      // Jobs: as in SQLite, plus leases. An item (and a finished job's webhook) is worked on by the
      // replica that holds its lease (leased_by) until lease_until; an expired lease (its replica
      // died) may be taken by another. Leases are compared with the database's clock only.
      "CREATE TABLE jobs ("
      " seq BIGSERIAL PRIMARY KEY, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,"
      " idempotency_key TEXT, webhook_url TEXT, request_sha256 TEXT NOT NULL, state TEXT NOT NULL,"
      " total BIGINT NOT NULL, completed BIGINT NOT NULL DEFAULT 0, failed BIGINT NOT NULL DEFAULT 0,"
      " created_at BIGINT NOT NULL, started_at BIGINT, finished_at BIGINT,"
      " webhook_state TEXT NOT NULL DEFAULT 'none', webhook_attempts BIGINT NOT NULL DEFAULT 0,"
      " webhook_next_ms BIGINT NOT NULL DEFAULT 0, webhook_leased_by TEXT, webhook_lease_until TIMESTAMPTZ);"
      "CREATE UNIQUE INDEX jobs_by_idempotency_key ON jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;"
      "CREATE INDEX jobs_by_owner ON jobs (owner, seq);"
      "CREATE INDEX jobs_webhooks ON jobs (webhook_next_ms) WHERE webhook_state = 'pending';"
      // state: 0 pending, 1 done (result stored), 2 dropped (its job was cancelled first).
      "CREATE TABLE job_items ("
      " job_seq BIGINT NOT NULL REFERENCES jobs (seq), idx BIGINT NOT NULL, custom_id TEXT NOT NULL, body TEXT NOT NULL,"
      " state SMALLINT NOT NULL DEFAULT 0, status INTEGER, response TEXT, finished_ms BIGINT,"
      " leased_by TEXT, lease_until TIMESTAMPTZ, PRIMARY KEY (job_seq, idx));"
      "CREATE INDEX job_items_pending ON job_items (job_seq, idx) WHERE state = 0;"
      "CREATE INDEX job_items_leased ON job_items (leased_by) WHERE state = 0;",
      // 2: the endpoint a job item runs (/v1/classify or /v1/chat/completions).
      "ALTER TABLE job_items ADD COLUMN url TEXT NOT NULL DEFAULT '/v1/classify';",
      // 3: per-item webhooks (a job's webhook_items), each item's delivery leased like a job's.
      "ALTER TABLE jobs ADD COLUMN webhook_items BOOLEAN NOT NULL DEFAULT false;"
      "ALTER TABLE job_items ADD COLUMN webhook_state TEXT NOT NULL DEFAULT 'none',"
      " ADD COLUMN webhook_attempts BIGINT NOT NULL DEFAULT 0, ADD COLUMN webhook_next_ms BIGINT NOT NULL DEFAULT 0,"
      " ADD COLUMN webhook_leased_by TEXT, ADD COLUMN webhook_lease_until TIMESTAMPTZ;"
      "CREATE INDEX job_items_webhooks ON job_items (webhook_next_ms) WHERE webhook_state = 'pending';",
  };
  return all;
}

}  // namespace

int schema_version() { return static_cast<int>(migrations().size()); }

void migrate(Connection& c) {
  retrying([&] {
    Transaction t(c);
    c.exec(std::string("SELECT pg_advisory_xact_lock(") + kMigrationLock + ")");
    c.exec_script("CREATE TABLE IF NOT EXISTS arbiter_schema (version INTEGER NOT NULL)");
    const Result r = c.exec("SELECT max(version) FROM arbiter_schema");
    const int at = r.null(0, 0) ? 0 : static_cast<int>(r.integer(0, 0));
    if (at > schema_version())
      throw std::runtime_error(c.what() + ": the database has schema version " + std::to_string(at) + ", newer than this arbiter's (" +
                               std::to_string(schema_version()) + "); run a newer arbiter");
    for (int v = at; v < schema_version(); ++v) c.exec_script(migrations()[static_cast<size_t>(v)]);
    if (at < schema_version()) {
      c.exec("DELETE FROM arbiter_schema");
      c.exec("INSERT INTO arbiter_schema (version) VALUES ($1)", {param(static_cast<int64_t>(schema_version()))});
    }
    t.commit();
  });
}

}  // namespace arbiter::api::pg
