#include "api/auth.h"

#include <cctype>
#include <fstream>
#include <stdexcept>

#include "pipeline/sha256.h"

namespace arbiter::api {
namespace {

std::string trim(const std::string& s) {
  const char* space = " \t\r\n\v\f";
  const size_t b = s.find_first_not_of(space);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(space) - b + 1);
}

// Equal keys, compared without an early exit (the length is not a secret worth hiding).
bool same(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

}  // namespace

ApiKeys::ApiKeys(std::vector<std::string> keys, std::vector<std::string> admin_keys) {
  for (auto& k : keys)
    if (!trim(k).empty()) {
      keys_.push_back(trim(k));
      admin_.push_back(false);
    }
  for (auto& k : admin_keys)
    if (!trim(k).empty()) {
      keys_.push_back(trim(k));
      admin_.push_back(true);
    }
}

std::string ApiKeys::key_id(const std::string& key) { return "key_" + sha256_hex(key).substr(0, 16); }

ApiKeys ApiKeys::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read the API key file " + path);
  std::vector<std::string> keys, admins;
  const std::string admin = "admin:";
  for (std::string line; std::getline(in, line);) {
    line = trim(line);
    if (line.empty() || line[0] == '#') continue;
    if (line.rfind(admin, 0) == 0) {
      const std::string key = trim(line.substr(admin.size()));
      if (key.empty()) throw std::runtime_error("the API key file " + path + " has an 'admin:' line without a key");
      admins.push_back(key);
    } else {
      keys.push_back(line);
    }
  }
  if (keys.empty() && admins.empty()) throw std::runtime_error("the API key file " + path + " holds no key");
  return ApiKeys(std::move(keys), std::move(admins));
}

bool ApiKeys::accepts(const std::string& authorization) const { return identify(authorization).has_value(); }

std::optional<ApiKeyIdentity> ApiKeys::identify(const std::string& authorization) const {
  if (keys_.empty()) return ApiKeyIdentity{"", true};
  const std::string value = trim(authorization);
  const std::string scheme = "bearer ";
  if (value.size() <= scheme.size()) return std::nullopt;
  for (size_t i = 0; i < scheme.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(value[i])) != scheme[i]) return std::nullopt;
  const std::string key = trim(value.substr(scheme.size()));
  std::optional<size_t> match;
  for (size_t i = 0; i < keys_.size(); ++i)  // every key compared, whichever matches
    if (same(key, keys_[i]) && !match) match = i;
  if (!match) return std::nullopt;
  return ApiKeyIdentity{key_id(keys_[*match]), admin_[*match]};
}

}  // namespace arbiter::api
