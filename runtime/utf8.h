// UTF-8 helpers for the tokenizer and the output decoders: validation, repair of invalid input
// (each maximal invalid subpart becomes U+FFFD, as the Unicode standard and WHATWG TextDecoder
// recommend), and detection of an incomplete sequence at the end of a byte stream.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace arbiter::utf8 {

inline constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Length of the longest prefix of `s` that is well-formed UTF-8 (== s.size() when all of it is).
size_t valid_prefix(std::string_view s);
inline bool is_valid(std::string_view s) { return valid_prefix(s) == s.size(); }

// Examines the sequence starting at s[0]. Returns its length if it is a complete well-formed
// sequence; otherwise sets `*incomplete` to true when the bytes so far are a prefix of some valid
// sequence that runs past the end of `s` (more bytes could complete it), and returns the length of
// the maximal invalid subpart (>= 1) to replace by one U+FFFD. `s` must not be empty.
size_t sequence(std::string_view s, bool* invalid, bool* incomplete);

// `s` with every maximal invalid subpart replaced by U+FFFD (a truncated sequence at the end too).
std::string repair(std::string_view s);

// Appends the UTF-8 encoding of code point `cp` (must be a scalar value) to `out`.
void append(std::string& out, char32_t cp);

}  // namespace arbiter::utf8
