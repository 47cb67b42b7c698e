// Percent-decoding of URL paths and query strings (RFC 3986 %XX escapes), shared by the HTTP
// transport (paths) and the query-parameter parsers (where '+' also stands for a space).
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace arbiter::api {

// `text` with every %XX decoded (and '+' as a space when plus_is_space); nullopt when an escape is
// malformed (a '%' not followed by two hex digits).
std::optional<std::string> percent_decode(std::string_view text, bool plus_is_space);

}  // namespace arbiter::api
