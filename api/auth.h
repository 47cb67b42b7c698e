// ApiKeys: bearer-token authentication for /v1/*. Keys come from a file, one per line (blank
// lines and lines starting with '#' are skipped, surrounding whitespace trimmed). With no keys
// configured every request is let in.
#pragma once

#include <string>
#include <vector>

namespace arbiter::api {

// The configured keys and the check of a request's Authorization header.
class ApiKeys {
 public:
  ApiKeys() = default;
  explicit ApiKeys(std::vector<std::string> keys);
  // Throws std::runtime_error when the file cannot be read or holds no key.
  static ApiKeys load(const std::string& path);

  bool enabled() const { return !keys_.empty(); }
  // The value of an Authorization header: "Bearer <key>" with a configured key (compared in time
  // independent of where they differ).
  bool accepts(const std::string& authorization) const;

 private:
  std::vector<std::string> keys_;
};

}  // namespace arbiter::api
