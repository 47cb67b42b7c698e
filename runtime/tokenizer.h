// The o200k_harmony tokenizer (byte-level BPE) used by gpt-oss: loads a Hugging Face
// tokenizer.json or a tiktoken rank file, splits text with OpenAI's pre-tokenizer regex (PCRE2,
// JIT, Unicode properties), merges byte pairs by rank exactly like tiktoken, and decodes ids back
// to bytes (StreamDecoder: token by token, holding incomplete UTF-8).
//
// Two encode modes:
//   encode()               content mode: every byte is ordinary text, so a user typing
//                          "<|start|>" gets the tokens of those characters, never id 200006.
//   encode_with_specials() trusted text: special-token names become their ids.
// Invalid UTF-8 input is either replaced (each maximal invalid subpart becomes U+FFFD, what a
// JavaScript string or TextDecoder would hold) or rejected with std::invalid_argument naming the
// byte offset; see InvalidUtf8. All const methods are safe to call from several threads at once.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace arbiter {

// OpenAI's o200k pre-tokenizer pattern (o200k_base, o200k_harmony and gpt-oss tokenizer.json).
extern const char* const kO200kPattern;

// Well-known harmony special-token ids (o200k_harmony).
namespace harmony_ids {
inline constexpr int32_t kStartOfText = 199998;
inline constexpr int32_t kEndOfText = 199999;
inline constexpr int32_t kReturn = 200002;
inline constexpr int32_t kConstrain = 200003;
inline constexpr int32_t kChannel = 200005;
inline constexpr int32_t kStart = 200006;
inline constexpr int32_t kEnd = 200007;
inline constexpr int32_t kMessage = 200008;
inline constexpr int32_t kCall = 200012;
inline constexpr int32_t kEndOfPrompt = 200018;
inline constexpr int32_t kVocabSize = 201088;  // the model's vocabulary (ids 200019.. are reserved)
}  // namespace harmony_ids

struct SpecialToken {
  std::string text;
  int32_t id = 0;
};

// The o200k_harmony special tokens: 199998..200018 as in tokenizer.json, and
// <|reserved_N|> for every other id up to 201087.
std::vector<SpecialToken> harmony_special_tokens();

// Bounds on a content-mode encode (Tokenizer::encode_bounded): a token limit, so that a text
// known not to fit a context is not tokenized to its end, and a stop predicate, so that the work
// of a request whose client left or whose deadline passed ends early.
struct EncodeBounds {
  // Stop once the text is known to take more than this many tokens.
  size_t max_tokens = std::numeric_limits<size_t>::max();
  // Polled before the first piece, then about every `poll_bytes` bytes of text (also inside a
  // single long piece); true stops the encode. Optional.
  std::function<bool()> stop;
  size_t poll_bytes = 64 * 1024;
};

// How a bounded encode ended.
enum class EncodeEnd {
  kComplete,   // the whole text was encoded: exactly encode(text), at most max_tokens tokens
  kOverLimit,  // encode(text) has more than max_tokens tokens
  kStopped,    // the stop predicate said so
};

enum class InvalidUtf8 {
  kReplace,  // each maximal invalid subpart becomes U+FFFD (documented default)
  kError,    // throw std::invalid_argument("invalid UTF-8 at byte N")
};

class Tokenizer {
 public:
  // A Hugging Face tokenizer.json (model.type BPE, byte-level). Ranks are the vocab ids; merges
  // are not needed (tiktoken's rule "merge the adjacent pair whose concatenation has the lowest
  // rank" gives the same result and is what OpenAI's tokenizer does). When the file has the
  // harmony specials, ids up to 201087 are filled with <|reserved_N|> so that vocab_size() equals
  // the model's 201088.
  static Tokenizer from_hf_json(const std::string& path);
  // A tiktoken rank file: lines "base64(bytes) rank". `specials` name the special tokens.
  static Tokenizer from_tiktoken(const std::string& path, const std::vector<SpecialToken>& specials,
                                 const std::string& pattern = kO200kPattern);
  // By path: a directory (its tokenizer.json), a *.json file (HF) or else a tiktoken rank file
  // with the harmony special tokens.
  static Tokenizer load(const std::string& path);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Content mode (special-token names are plain text).
  std::vector<int32_t> encode(std::string_view text, InvalidUtf8 invalid = InvalidUtf8::kReplace) const;
  void encode_append(std::string_view text, std::vector<int32_t>& out,
                     InvalidUtf8 invalid = InvalidUtf8::kReplace) const;
  // Content mode with bounds, appending to `out`. kComplete: `out` got exactly what
  // encode_append() appends. kOverLimit / kStopped: `out` got a prefix (possibly empty, of no
  // particular length) of those ids, which callers should discard. A piece of the pre-tokenizer
  // that must take more than the remaining tokens (by its length over the longest token) ends the
  // encode before it is merged.
  EncodeEnd encode_bounded(std::string_view text, std::vector<int32_t>& out, const EncodeBounds& bounds,
                           InvalidUtf8 invalid = InvalidUtf8::kReplace) const;
  // Trusted mode: occurrences of special-token names become their ids.
  std::vector<int32_t> encode_with_specials(std::string_view text,
                                            InvalidUtf8 invalid = InvalidUtf8::kReplace) const;

  // Bytes of the tokens (special tokens as their names). Throws std::out_of_range for an id
  // that is not in the vocabulary.
  std::string decode(std::span<const int32_t> ids) const;
  // Bytes of one token; nullopt when the id is not in the vocabulary.
  std::optional<std::string_view> token_bytes(int32_t id) const;
  // The ordinary (BPE) token whose bytes are exactly `bytes`; nullopt when there is none (special
  // tokens are never returned).
  std::optional<int32_t> token_of_bytes(std::string_view bytes) const;

  std::optional<int32_t> special_id(std::string_view name) const;
  bool is_special(int32_t id) const;
  bool contains(int32_t id) const;  // id has a token
  // One past the largest id.
  int32_t vocab_size() const;
  // Number of ordinary (BPE) tokens: ids 0..num_ranks()-1.
  int32_t num_ranks() const;
  // Bytes of the longest ordinary token: a text of n bytes takes at least n / this many tokens.
  size_t max_token_bytes() const;
  const std::string& pattern() const;
  const std::vector<SpecialToken>& specials() const;

  // The pre-tokenizer pieces of `text` (must be valid UTF-8), for tests and debugging.
  std::vector<std::string_view> split(std::string_view text) const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Decodes generated tokens one at a time into text, holding a UTF-8 sequence that is split
// across tokens until it is complete. Returned text is always valid UTF-8: truly invalid bytes
// become U+FFFD, and so does an incomplete tail at flush().
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special = false)
      : tokenizer_(&tokenizer), skip_special_(skip_special) {}
  // Text completed by this token (may be empty). Throws std::out_of_range for an unknown id.
  std::string push(int32_t id);
  // Whatever is held back (an incomplete sequence becomes U+FFFD); the decoder is then empty.
  std::string flush();
  bool has_pending() const { return !held_.empty(); }

 private:
  std::string drain(bool final);
  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::string held_;
};

}  // namespace arbiter
