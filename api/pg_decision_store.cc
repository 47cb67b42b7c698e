#include "api/pg_decision_store.h"

namespace arbiter::api {
namespace {

constexpr const char* kColumns =
    "id, created_ms, api_key_id, request_id, model, policy_id, policy_version, policy_sha256, effort, mode, verdict, "
    "verdict_key, violation, confidence, final, reasoning, content, content_sha256, finish_reason, prompt_tokens, "
    "cached_tokens, reasoning_tokens, completion_tokens, latency_ms, feedback_label, feedback_label_json, "
    "feedback_reviewer, feedback_note, feedback_key_id, feedback_ms, feedback_count";
// Rows read per statement by for_each (export): memory stays bounded on a large log.
constexpr int kExportPage = 1000;

DecisionRecord read_record(const pg::Result& s, int row) {
  DecisionRecord r;
  r.id = s.text(row, 0);
  r.created_ms = s.integer(row, 1);
  r.api_key_id = s.text(row, 2);
  r.request_id = s.text(row, 3);
  r.model = s.text(row, 4);
  r.policy_id = s.text(row, 5);
  if (!s.null(row, 6)) r.policy_version = static_cast<int>(s.integer(row, 6));
  r.policy_sha256 = s.text(row, 7);
  r.effort = s.text(row, 8);
  r.mode = s.text(row, 9);
  r.verdict_json = s.text(row, 10);
  r.verdict_key = s.opt_text(row, 11);
  r.violation = s.integer(row, 12) != 0;
  if (!s.null(row, 13)) r.confidence = s.real(row, 13);
  r.final_text = s.text(row, 14);
  r.reasoning = s.opt_text(row, 15);
  r.content = s.opt_text(row, 16);
  r.content_sha256 = s.opt_text(row, 17);
  r.finish_reason = s.text(row, 18);
  r.prompt_tokens = static_cast<int>(s.integer(row, 19));
  r.cached_tokens = static_cast<int>(s.integer(row, 20));
  r.reasoning_tokens = static_cast<int>(s.integer(row, 21));
  r.completion_tokens = static_cast<int>(s.integer(row, 22));
  r.latency_ms = s.real(row, 23);
  if (!s.null(row, 24)) {
    DecisionFeedback f;
    f.label = s.text(row, 24);
    f.label_json = s.text(row, 25);
    f.reviewer = s.text(row, 26);
    f.note = s.text(row, 27);
    f.api_key_id = s.text(row, 28);
    f.created_ms = s.integer(row, 29);
    r.feedback = f;
  }
  r.feedback_count = static_cast<int>(s.integer(row, 30));
  return r;
}

pg::Param opt(const std::optional<std::string>& v) { return v; }

}  // namespace

PgDecisionStore::PgDecisionStore(const std::string& url) : writer_(url, "decision db"), reader_(url, "decision db") {
  pg::migrate(writer_);
}

PgDecisionStore::~PgDecisionStore() = default;

void PgDecisionStore::append(const std::vector<DecisionRecord>& records) {
  if (records.empty()) return;
  std::lock_guard<std::mutex> lock(write_mutex_);
  // Column by column as arrays: a batch is one statement, whatever its size.
  std::vector<std::vector<std::string>> text(19);
  std::vector<std::vector<int64_t>> ints(7);
  std::vector<std::string> confidence, latency;
  auto nullable = [](const std::optional<std::string>& v) { return v; };
  std::vector<std::vector<std::optional<std::string>>> optional_text(5);
  for (const DecisionRecord& r : records) {
    text[0].push_back(r.id);
    text[1].push_back(r.api_key_id);
    text[2].push_back(r.request_id);
    text[3].push_back(r.model);
    text[4].push_back(r.policy_id);
    text[5].push_back(r.policy_sha256);
    text[6].push_back(r.effort);
    text[7].push_back(r.mode);
    text[8].push_back(r.verdict_json);
    text[9].push_back(r.final_text);
    text[10].push_back(r.finish_reason);
    optional_text[0].push_back(nullable(r.verdict_key));
    optional_text[1].push_back(nullable(r.reasoning));
    optional_text[2].push_back(nullable(r.content));
    optional_text[3].push_back(nullable(r.content_sha256));
    optional_text[4].push_back(r.policy_version ? std::optional<std::string>(std::to_string(*r.policy_version)) : std::nullopt);
    ints[0].push_back(r.created_ms);
    ints[1].push_back(r.violation ? 1 : 0);
    ints[2].push_back(r.prompt_tokens);
    ints[3].push_back(r.cached_tokens);
    ints[4].push_back(r.reasoning_tokens);
    ints[5].push_back(r.completion_tokens);
    confidence.push_back(r.confidence ? *pg::param(*r.confidence) : "");
    latency.push_back(*pg::param(r.latency_ms));
  }
  std::vector<std::optional<std::string>> conf;
  for (size_t i = 0; i < records.size(); ++i)
    conf.push_back(records[i].confidence ? std::optional<std::string>(confidence[i]) : std::nullopt);
  pg::Transaction t(writer_);
  writer_.exec(
      "INSERT INTO decisions (id, created_ms, api_key_id, request_id, model, policy_id, policy_version, policy_sha256,"
      " effort, mode, verdict, verdict_key, violation, confidence, final, reasoning, content, content_sha256,"
      " finish_reason, prompt_tokens, cached_tokens, reasoning_tokens, completion_tokens, latency_ms)"
      " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::integer[], $8::text[],"
      " $9::text[], $10::text[], $11::text[], $12::text[], $13::smallint[], $14::double precision[], $15::text[], $16::text[],"
      " $17::text[], $18::text[], $19::text[], $20::integer[], $21::integer[], $22::integer[], $23::integer[],"
      " $24::double precision[])",
      {pg::array(text[0]), pg::array(ints[0]), pg::array(text[1]), pg::array(text[2]), pg::array(text[3]), pg::array(text[4]),
       pg::array(optional_text[4]), pg::array(text[5]), pg::array(text[6]), pg::array(text[7]), pg::array(text[8]),
       pg::array(optional_text[0]), pg::array(ints[1]), pg::array(conf), pg::array(text[9]), pg::array(optional_text[1]),
       pg::array(optional_text[2]), pg::array(optional_text[3]), pg::array(text[10]), pg::array(ints[2]), pg::array(ints[3]),
       pg::array(ints[4]), pg::array(ints[5]), pg::array(latency)});
  t.commit();
}

std::optional<DecisionRecord> PgDecisionStore::get(const std::string& id, const std::optional<std::string>& scope) const {
  std::lock_guard<std::mutex> lock(read_mutex_);
  const pg::Result r = reader_.exec(std::string("SELECT ") + kColumns + " FROM decisions WHERE id = $1 AND ($2::text IS NULL OR api_key_id = $2)",
                                    {id, opt(scope)});
  if (r.rows() == 0) return std::nullopt;
  return read_record(r, 0);
}

void PgDecisionStore::query(const DecisionQuery& q, bool paged, const std::function<bool(const DecisionRecord&)>& each) const {
  std::string where;
  std::vector<pg::Param> params;
  auto clause = [&](const std::string& c) { where += (where.empty() ? " WHERE " : " AND ") + c; };
  // `c` with its parameter as $N (the '?' in it).
  auto with = [&](const std::string& c, pg::Param v) {
    params.push_back(std::move(v));
    std::string filled = c;
    filled.replace(filled.find('?'), 1, "$" + std::to_string(params.size()));
    clause(filled);
  };
  for (const DecisionCondition& c : decision_conditions(q)) {
    if (c.text) with(c.sql, *c.text);
    else if (c.number) with(c.sql, pg::param(*c.number));  // the parameter's type is the column's
    else clause(c.sql);
  }
  // Ids compare byte by byte (as in SQLite), whatever the database's collation.
  const std::string order = std::string(" ORDER BY id COLLATE \"C\"") + (q.oldest_first ? "" : " DESC");
  const std::string base = std::string("SELECT ") + kColumns + " FROM decisions";
  if (paged) {
    if (q.after) with(q.oldest_first ? "id > ? COLLATE \"C\"" : "id < ? COLLATE \"C\"", *q.after);
    std::lock_guard<std::mutex> lock(read_mutex_);
    const pg::Result r = reader_.exec(base + where + order + " LIMIT " + std::to_string(q.limit + 1), params);
    for (int i = 0; i < r.rows(); ++i)
      if (!each(read_record(r, i))) return;
    return;
  }
  // Unpaged (export): pages of kExportPage rows, each after the last id read.
  std::optional<std::string> after = q.after;
  const std::string scoped = where;
  const std::vector<pg::Param> scoped_params = params;
  for (;;) {
    where = scoped;
    params = scoped_params;
    if (after) with(q.oldest_first ? "id > ? COLLATE \"C\"" : "id < ? COLLATE \"C\"", *after);
    std::vector<DecisionRecord> page;
    {
      std::lock_guard<std::mutex> lock(read_mutex_);
      const pg::Result r = reader_.exec(base + where + order + " LIMIT " + std::to_string(kExportPage), params);
      for (int i = 0; i < r.rows(); ++i) page.push_back(read_record(r, i));
    }
    for (const DecisionRecord& d : page)
      if (!each(d)) return;
    if (page.size() < static_cast<size_t>(kExportPage)) return;
    after = page.back().id;
  }
}

bool PgDecisionStore::add_feedback(const std::string& decision_id, const std::optional<std::string>& scope, const DecisionFeedback& f) {
  std::lock_guard<std::mutex> lock(write_mutex_);
  pg::Transaction t(writer_);
  const pg::Result u = writer_.exec(
      "UPDATE decisions SET feedback_label = $1, feedback_label_json = $2, feedback_reviewer = $3, feedback_note = $4,"
      " feedback_key_id = $5, feedback_ms = $6, feedback_count = feedback_count + 1"
      " WHERE id = $7 AND ($8::text IS NULL OR api_key_id = $8)",
      {f.label, f.label_json, f.reviewer, f.note, f.api_key_id, pg::param(f.created_ms), decision_id, opt(scope)});
  if (u.affected() == 0) return false;
  writer_.exec(
      "INSERT INTO decision_feedback (decision_id, created_ms, label, label_json, reviewer, note, api_key_id)"
      " VALUES ($1, $2, $3, $4, $5, $6, $7)",
      {decision_id, pg::param(f.created_ms), f.label, f.label_json, f.reviewer, f.note, f.api_key_id});
  t.commit();
  return true;
}

int64_t PgDecisionStore::delete_before(int64_t cutoff_ms) {
  std::lock_guard<std::mutex> lock(write_mutex_);
  pg::Transaction t(writer_);
  writer_.exec("DELETE FROM decision_feedback WHERE decision_id IN (SELECT id FROM decisions WHERE created_ms < $1)", {pg::param(cutoff_ms)});
  const pg::Result d = writer_.exec("DELETE FROM decisions WHERE created_ms < $1", {pg::param(cutoff_ms)});
  t.commit();
  return d.affected();
}

int64_t PgDecisionStore::count() const {
  std::lock_guard<std::mutex> lock(read_mutex_);
  return reader_.exec("SELECT count(*) FROM decisions").integer(0, 0);
}

}  // namespace arbiter::api
