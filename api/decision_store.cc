#include "api/decision_store.h"

#include <cstdio>
#include <mutex>
#include <random>

namespace arbiter::api {

std::string new_decision_id(int64_t unix_ms) {
  static std::mutex mutex;
  static std::mt19937_64 rng{std::random_device{}() ^ (static_cast<uint64_t>(std::random_device{}()) << 32)};
  uint64_t random;
  {
    std::lock_guard<std::mutex> lock(mutex);
    random = rng();
  }
  char buf[40];
  std::snprintf(buf, sizeof(buf), "dec_%012llx%016llx", static_cast<unsigned long long>(unix_ms) & 0xffffffffffffULL,
                static_cast<unsigned long long>(random));
  return buf;
}

bool valid_decision_id(const std::string& id) {
  if (id.size() != 32 || id.rfind("dec_", 0) != 0) return false;
  for (size_t i = 4; i < id.size(); ++i)
    if (!((id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'f'))) return false;
  return true;
}

std::vector<DecisionCondition> decision_conditions(const DecisionQuery& q) {
  std::vector<DecisionCondition> out;
  auto text = [&](std::string sql, const std::string& v) { out.push_back({std::move(sql), v, std::nullopt}); };
  auto number = [&](std::string sql, int64_t v) { out.push_back({std::move(sql), std::nullopt, v}); };
  auto plain = [&](std::string sql) { out.push_back({std::move(sql), std::nullopt, std::nullopt}); };
  if (q.api_key_id) text("api_key_id = ?", *q.api_key_id);
  if (q.policy_id) text("policy_id = ?", *q.policy_id);
  if (q.policy_version) number("policy_version = ?", *q.policy_version);
  if (q.since_ms) number("created_ms >= ?", *q.since_ms);
  if (q.until_ms) number("created_ms < ?", *q.until_ms);
  if (q.verdict_key) {
    if (*q.verdict_key == "null") plain("verdict_key IS NULL");
    else text("verdict_key = ?", *q.verdict_key);
  }
  if (q.violation) plain(*q.violation ? "violation = 1" : "violation = 0");
  if (q.has_feedback) plain(*q.has_feedback ? "feedback_label IS NOT NULL" : "feedback_label IS NULL");
  if (q.disagreement)
    plain(*q.disagreement ? "feedback_label IS NOT NULL AND (verdict_key IS NULL OR feedback_label <> verdict_key)"
                          : "feedback_label IS NOT NULL AND feedback_label = verdict_key");
  return out;
}

DecisionPage DecisionStore::list(const DecisionQuery& q) const {
  DecisionPage page;
  query(q, true, [&](const DecisionRecord& r) {
    if (static_cast<int>(page.decisions.size()) == q.limit) {
      page.has_more = true;
      return false;
    }
    page.decisions.push_back(r);
    return true;
  });
  return page;
}

void DecisionStore::for_each(const DecisionQuery& query_in, const std::function<void(const DecisionRecord&)>& each) const {
  DecisionQuery q = query_in;
  q.oldest_first = true;
  query(q, false, [&](const DecisionRecord& r) {
    each(r);
    return true;
  });
}

}  // namespace arbiter::api
