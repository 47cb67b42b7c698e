#include "api/auth.h"

#include <cctype>
#include <fstream>
#include <stdexcept>

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

ApiKeys::ApiKeys(std::vector<std::string> keys) {
  for (auto& k : keys)
    if (!trim(k).empty()) keys_.push_back(trim(k));
}

ApiKeys ApiKeys::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read the API key file " + path);
  std::vector<std::string> keys;
  for (std::string line; std::getline(in, line);) {
    line = trim(line);
    if (!line.empty() && line[0] != '#') keys.push_back(line);
  }
  if (keys.empty()) throw std::runtime_error("the API key file " + path + " holds no key");
  return ApiKeys(std::move(keys));
}

bool ApiKeys::accepts(const std::string& authorization) const {
  if (keys_.empty()) return true;
  const std::string value = trim(authorization);
  const std::string scheme = "bearer ";
  if (value.size() <= scheme.size()) return false;
  for (size_t i = 0; i < scheme.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(value[i])) != scheme[i]) return false;
  const std::string key = trim(value.substr(scheme.size()));
  bool ok = false;
  for (const std::string& k : keys_) ok |= same(key, k);
  return ok;
}

}  // namespace arbiter::api
