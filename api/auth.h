// ApiKeys: bearer-token authentication for /v1/*. Keys come from a file, one per line (blank
// lines and lines starting with '#' are skipped, surrounding whitespace trimmed); a line
// `admin:KEY` makes KEY an admin key (it reads every key's decisions). With no keys configured
// every request is let in. Each key has a stable, non-secret id (ApiKeyIdentity::id) that the
// decision log records instead of the key.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace arbiter::api {

// Who sent a request: the id of its key ("key_" + the first 16 hex digits of the key's SHA-256; ""
// when no keys are configured) and whether it is an admin key.
struct ApiKeyIdentity {
  std::string id;
  bool admin = false;
};

// The configured keys and the check of a request's Authorization header.
class ApiKeys {
 public:
  ApiKeys() = default;
  explicit ApiKeys(std::vector<std::string> keys, std::vector<std::string> admin_keys = {});
  // Throws std::runtime_error when the file cannot be read or holds no key.
  static ApiKeys load(const std::string& path);

  bool enabled() const { return !keys_.empty(); }
  // The value of an Authorization header: "Bearer <key>" with a configured key (compared in time
  // independent of where they differ).
  bool accepts(const std::string& authorization) const;
  // The identity behind an accepted Authorization header; nullopt when it is not accepted. Without
  // keys: an anonymous admin (id "").
  std::optional<ApiKeyIdentity> identify(const std::string& authorization) const;
  // The id recorded for `key`.
  static std::string key_id(const std::string& key);

 private:
  std::vector<std::string> keys_;
  std::vector<bool> admin_;  // per key
};

}  // namespace arbiter::api
