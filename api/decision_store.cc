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
