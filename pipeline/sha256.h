// SHA-256 as lower-case hex (OpenSSL's libcrypto): content and policy fingerprints in the decision
// log, exact-content hash rules, and the non-secret ids of API keys.
#pragma once

#include <string>
#include <string_view>

namespace arbiter {

// The SHA-256 of `data`, 64 lower-case hex digits.
std::string sha256_hex(std::string_view data);

}  // namespace arbiter
