#include "runtime/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <fcntl.h>
#include <pcre2.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <queue>
#include <stdexcept>
#include <unordered_map>

#include "runtime/utf8.h"

namespace arbiter {

const char* const kO200kPattern =
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

std::vector<SpecialToken> harmony_special_tokens() {
  std::vector<SpecialToken> out;
  const std::pair<int32_t, const char*> named[] = {
      {199998, "<|startoftext|>"}, {199999, "<|endoftext|>"}, {200002, "<|return|>"},
      {200003, "<|constrain|>"},   {200005, "<|channel|>"},   {200006, "<|start|>"},
      {200007, "<|end|>"},         {200008, "<|message|>"},   {200012, "<|call|>"},
      {200018, "<|endofprompt|>"},
  };
  for (int32_t id = harmony_ids::kStartOfText; id < harmony_ids::kVocabSize; ++id) {
    std::string name = "<|reserved_" + std::to_string(id) + "|>";
    for (const auto& [nid, text] : named)
      if (nid == id) name = text;
    out.push_back({std::move(name), id});
  }
  return out;
}

namespace {

constexpr uint32_t kNoRank = std::numeric_limits<uint32_t>::max();

// ---------------------------------------------------------------------------------------------
// Hashing and the byte-string -> rank table.

inline uint64_t mix(uint64_t x) {
  x ^= x >> 32;
  x *= 0xd6e8feb86659fd93ull;
  x ^= x >> 32;
  return x;
}

inline uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xff51afd7ed558ccdull);
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
    p += 8;
    n -= 8;
  }
  if (n) {
    uint64_t w = 0;
    std::memcpy(&w, p, n);
    h = (h ^ w) * 0x94d049bb133111ebull;
  }
  return mix(h);
}

// Open addressing over the token bytes held in a shared arena.
class RankTable {
 public:
  void build(const std::string* arena, const std::vector<uint32_t>* offsets, uint32_t count) {
    arena_ = arena;
    offsets_ = offsets;
    size_t cap = 16;
    while (cap < static_cast<size_t>(count) * 2) cap <<= 1;
    slots_.assign(cap, 0);
    mask_ = cap - 1;
    for (uint32_t r = 0; r < count; ++r) {
      const uint32_t off = (*offsets)[r], len = (*offsets)[r + 1] - off;
      if (len == 0) continue;  // a gap in the ranks
      const char* p = arena->data() + off;
      const uint64_t h = hash_bytes(p, len);
      if (find(p, len, h) != kNoRank)
        throw std::runtime_error("tokenizer: two ranks for the same bytes (rank " + std::to_string(r) + ")");
      size_t i = h & mask_;
      while (slots_[i]) i = (i + 1) & mask_;
      slots_[i] = (h & 0xFFFFFFFF00000000ull) | (static_cast<uint64_t>(r) + 1);
    }
  }
  uint32_t find(const char* p, size_t n, uint64_t h) const {
    const uint64_t tag = h & 0xFFFFFFFF00000000ull;
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const uint64_t s = slots_[i];
      if (!s) return kNoRank;
      if ((s & 0xFFFFFFFF00000000ull) != tag) continue;
      const uint32_t r = static_cast<uint32_t>(s & 0xFFFFFFFFull) - 1;
      const uint32_t off = (*offsets_)[r];
      if ((*offsets_)[r + 1] - off == n && std::memcmp(arena_->data() + off, p, n) == 0) return r;
    }
  }
  uint32_t find(const char* p, size_t n) const { return find(p, n, hash_bytes(p, n)); }

 private:
  const std::string* arena_ = nullptr;
  const std::vector<uint32_t>* offsets_ = nullptr;
  std::vector<uint64_t> slots_;
  size_t mask_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Per-thread state: PCRE2 match data with a JIT stack, and a cache of recent pieces.

struct PcreDeleter {
  void operator()(pcre2_code* p) const { pcre2_code_free(p); }
  void operator()(pcre2_match_data* p) const { pcre2_match_data_free(p); }
  void operator()(pcre2_match_context* p) const { pcre2_match_context_free(p); }
  void operator()(pcre2_jit_stack* p) const { pcre2_jit_stack_free(p); }
};

struct MatchState {
  std::unique_ptr<pcre2_match_data, PcreDeleter> data{pcre2_match_data_create(1, nullptr)};
  std::unique_ptr<pcre2_jit_stack, PcreDeleter> stack{pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, nullptr)};
  std::unique_ptr<pcre2_match_context, PcreDeleter> context{pcre2_match_context_create(nullptr)};
  MatchState() {
    if (!data || !stack || !context) throw std::bad_alloc();
    pcre2_jit_stack_assign(context.get(), nullptr, stack.get());
  }
};

MatchState& match_state() {
  thread_local MatchState state;
  return state;
}

// Direct-mapped cache of pieces that are not single tokens: bytes -> ids.
constexpr size_t kCacheKeyMax = 32;
constexpr size_t kCacheEntries = 4096;
struct CacheEntry {
  uint64_t hash = 0;
  uint8_t len = 0;  // 0: empty
  uint8_t count = 0;
  char key[kCacheKeyMax];
  int32_t ids[kCacheKeyMax];
};
struct PieceCache {
  uint64_t owner = 0;
  std::vector<CacheEntry> entries;
};

PieceCache& piece_cache(uint64_t owner) {
  thread_local PieceCache cache;
  if (cache.owner != owner) {
    cache.entries.assign(kCacheEntries, CacheEntry{});
    cache.owner = owner;
  }
  return cache;
}

std::atomic<uint64_t> g_next_instance{1};

// Lets the special-token table be searched with a string_view (no allocation per lookup).
struct ViewHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return static_cast<size_t>(hash_bytes(s.data(), s.size())); }
};

// ---------------------------------------------------------------------------------------------
// Pattern preparation: `\s` and `\S` become explicit Unicode White_Space classes, because PCRE2
// also counts U+180E as a space while OpenAI's tokenizer (Rust regex, White_Space) does not.

constexpr const char* kWhiteSpace =
    "\\x{9}-\\x{d}\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}";

std::string explicit_white_space(const std::string& pattern) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[i + 1];
      if (e == 's') {
        out += in_class ? std::string(kWhiteSpace) : "[" + std::string(kWhiteSpace) + "]";
      } else if (e == 'S') {
        if (in_class) throw std::runtime_error("tokenizer: \\S inside a character class is not supported");
        out += "[^" + std::string(kWhiteSpace) + "]";
      } else {
        out += c;
        out += e;
      }
      ++i;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];  // literal ']' first
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

// GPT-2's byte <-> printable code point map used by byte-level BPE vocabularies.
std::array<int, 324> gpt2_unicode_to_byte() {
  std::array<int, 324> table;
  table.fill(-1);
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    if (printable)
      table[b] = b;
    else
      table[256 + extra++] = b;
  }
  return table;
}

std::string gpt2_decode(const std::string& token) {
  static const std::array<int, 324> table = gpt2_unicode_to_byte();
  std::string out;
  size_t i = 0;
  while (i < token.size()) {
    bool invalid, incomplete;
    const size_t len = utf8::sequence(std::string_view(token).substr(i), &invalid, &incomplete);
    if (invalid) throw std::runtime_error("tokenizer.json: vocab entry is not UTF-8");
    const auto* p = reinterpret_cast<const unsigned char*>(token.data() + i);
    uint32_t cp = len == 1 ? p[0] : len == 2 ? ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu)
                                              : 0x110000;  // byte-level code points are < 0x800
    if (cp >= table.size() || table[cp] < 0)
      throw std::runtime_error("tokenizer.json: vocab entry '" + token + "' is not byte-level BPE");
    out.push_back(static_cast<char>(table[cp]));
    i += len;
  }
  return out;
}

// A read-only view of a whole file (mmap; no copy, no zero-filled buffer).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error("tokenizer: cannot open " + path);
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      ::close(fd_);
      throw std::runtime_error("tokenizer: cannot stat " + path);
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd_, 0);
      if (p == MAP_FAILED) {
        ::close(fd_);
        throw std::runtime_error("tokenizer: cannot map " + path);
      }
      data_ = static_cast<const char*>(p);
    }
  }
  ~MappedFile() {
    if (data_) ::munmap(const_cast<char*>(data_), size_);
    ::close(fd_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  std::string_view view() const { return data_ ? std::string_view(data_, size_) : std::string_view(); }

 private:
  int fd_ = -1;
  const char* data_ = nullptr;
  size_t size_ = 0;
};

std::string base64_decode(std::string_view s) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (const char c : s) {
    if (c == '=') break;
    const int v = value(c);
    if (v < 0) throw std::runtime_error("tiktoken file: bad base64 '" + std::string(s) + "'");
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return out;
}

// Streams tokenizer.json, keeping only what the tokenizer needs (the merges are skipped).
class HfJsonReader : public nlohmann::json_sax<nlohmann::json> {
 public:
  std::vector<std::pair<std::string, uint64_t>> vocab;
  std::vector<SpecialToken> added;
  std::string model_type, pattern, normalizer_type;
  bool byte_fallback = false;

  bool null() override { return true; }
  bool boolean(bool v) override {
    if (at({"model", "byte_fallback"})) byte_fallback = v;
    return true;
  }
  bool number_integer(number_integer_t v) override { return number(v < 0 ? ~0ull : static_cast<uint64_t>(v)); }
  bool number_unsigned(number_unsigned_t v) override { return number(v); }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t& v) override {
    if (at({"model", "type"})) model_type = v;
    if (frames_.size() >= 2 && frames_[0].key == "pre_tokenizer" && frames_.back().key == "Regex" && pattern.empty())
      pattern = v;
    if (at({"normalizer", "type"})) normalizer_type = v;
    if (in_added_token() && frames_.back().key == "content") token_.text = v;
    return true;
  }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    frames_.push_back({false, {}});
    return true;
  }
  bool key(string_t& k) override {
    frames_.back().key = std::move(k);
    return true;
  }
  bool end_object() override {
    if (frames_.size() == 3 && frames_[0].key == "added_tokens") {
      if (token_.text.empty()) throw std::runtime_error("tokenizer.json: added token without content");
      added.push_back(token_);
      token_ = {};
    }
    frames_.pop_back();
    return true;
  }
  bool start_array(std::size_t) override {
    frames_.push_back({true, {}});
    return true;
  }
  bool end_array() override {
    frames_.pop_back();
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& e) override {
    throw std::runtime_error("tokenizer.json: parse error at byte " + std::to_string(position) + ": " + e.what());
  }

 private:
  struct Frame {
    bool array;
    std::string key;
  };
  bool at(std::initializer_list<const char*> keys) const {
    if (frames_.size() != keys.size()) return false;
    size_t i = 0;
    for (const char* k : keys)
      if (frames_[i++].key != k) return false;
    return true;
  }
  bool in_added_token() const { return frames_.size() == 3 && frames_[0].key == "added_tokens"; }
  bool number(uint64_t v) {
    if (frames_.size() == 3 && frames_[0].key == "model" && frames_[1].key == "vocab") {
      vocab.emplace_back(frames_[2].key, v);
    } else if (in_added_token() && frames_.back().key == "id") {
      if (v > 0x7FFFFFFF) throw std::runtime_error("tokenizer.json: bad added token id");
      token_.id = static_cast<int32_t>(v);
    }
    return true;
  }
  std::vector<Frame> frames_;
  SpecialToken token_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  // Bytes of every id: arena[offsets[id], offsets[id+1]); kind 0 = no token, 1 = BPE, 2 = special.
  std::string arena;
  std::vector<uint32_t> offsets;
  std::vector<uint8_t> kind;
  uint32_t num_ranks = 0;
  size_t max_token_bytes = 1;  // the longest ordinary token
  RankTable ranks;
  std::array<int32_t, 256> byte_rank{};
  std::vector<SpecialToken> specials;
  std::unordered_map<std::string, int32_t, ViewHash, std::equal_to<>> special_ids;
  std::vector<size_t> special_lengths;  // distinct, longest first
  std::array<bool, 256> special_first{};
  std::string pattern;
  std::unique_ptr<pcre2_code, PcreDeleter> code;
  bool jit = false;
  uint64_t instance = g_next_instance.fetch_add(1);

  // `tokens[r]` = bytes of rank r (empty = gap), specials by id.
  void build(std::vector<std::string> tokens, const std::vector<SpecialToken>& special_list, std::string pat) {
    num_ranks = static_cast<uint32_t>(tokens.size());
    int32_t vocab = static_cast<int32_t>(tokens.size());
    for (const auto& s : special_list) {
      if (s.id < 0) throw std::runtime_error("tokenizer: negative special id");
      if (static_cast<uint32_t>(s.id) < num_ranks && !tokens[s.id].empty())
        throw std::runtime_error("tokenizer: special token " + s.text + " reuses BPE id " + std::to_string(s.id));
      vocab = std::max(vocab, s.id + 1);
    }
    std::vector<std::string> all(static_cast<size_t>(vocab));
    kind.assign(static_cast<size_t>(vocab), 0);
    for (uint32_t r = 0; r < num_ranks; ++r) {
      if (!tokens[r].empty()) kind[r] = 1;
      max_token_bytes = std::max(max_token_bytes, tokens[r].size());
      all[r] = std::move(tokens[r]);
    }
    for (const auto& s : special_list) {
      if (s.text.empty()) throw std::runtime_error("tokenizer: empty special token");
      if (kind[s.id] == 2) throw std::runtime_error("tokenizer: special id " + std::to_string(s.id) + " twice");
      if (!special_ids.emplace(s.text, s.id).second)
        throw std::runtime_error("tokenizer: special token " + s.text + " twice");
      kind[s.id] = 2;
      all[s.id] = s.text;
      specials.push_back(s);
      special_first[static_cast<unsigned char>(s.text[0])] = true;
      if (std::find(special_lengths.begin(), special_lengths.end(), s.text.size()) == special_lengths.end())
        special_lengths.push_back(s.text.size());
    }
    std::sort(special_lengths.rbegin(), special_lengths.rend());
    std::sort(specials.begin(), specials.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
    offsets.assign(all.size() + 1, 0);
    size_t total = 0;
    for (const auto& t : all) total += t.size();
    if (total > 0xFFFFFFF0u) throw std::runtime_error("tokenizer: vocabulary too large");
    arena.reserve(total);
    for (size_t i = 0; i < all.size(); ++i) {
      offsets[i] = static_cast<uint32_t>(arena.size());
      arena += all[i];
    }
    offsets[all.size()] = static_cast<uint32_t>(arena.size());
    ranks.build(&arena, &offsets, num_ranks);
    for (int b = 0; b < 256; ++b) {
      const char c = static_cast<char>(b);
      const uint32_t r = ranks.find(&c, 1);
      if (r == kNoRank) throw std::runtime_error("tokenizer: no token for byte " + std::to_string(b));
      byte_rank[b] = static_cast<int32_t>(r);
    }
    compile(std::move(pat));
  }

  void compile(std::string pat) {
    pattern = std::move(pat);
    const std::string prepared = explicit_white_space(pattern);
    int err = 0;
    PCRE2_SIZE offset = 0;
    code.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(prepared.data()), prepared.size(), PCRE2_UTF | PCRE2_UCP,
                             &err, &offset, nullptr));
    if (!code) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw std::runtime_error("tokenizer: pre-tokenizer regex does not compile at " + std::to_string(offset) + ": " +
                               reinterpret_cast<const char*>(msg));
    }
    jit = pcre2_jit_compile(code.get(), PCRE2_JIT_COMPLETE) == 0;
  }

  // Next match at or after `pos`: [start, end), false when none.
  bool next_piece(std::string_view text, size_t pos, size_t* start, size_t* end) const {
    MatchState& ms = match_state();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    const int rc = jit ? pcre2_jit_match(code.get(), subject, text.size(), pos, 0, ms.data.get(), ms.context.get())
                       : pcre2_match(code.get(), subject, text.size(), pos, PCRE2_NO_UTF_CHECK, ms.data.get(),
                                     ms.context.get());
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      throw std::runtime_error(std::string("tokenizer: pre-tokenizer match failed: ") +
                               reinterpret_cast<const char*>(msg));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(ms.data.get());
    *start = ov[0];
    *end = ov[1];
    return true;
  }

  uint32_t rank_of(const char* p, size_t n) const { return ranks.find(p, n); }

  // Byte-pair merges for pieces up to kSmall bytes: tiktoken's algorithm on fixed arrays.
  static constexpr size_t kSmall = 128;
  void merge_small(const char* p, size_t n, std::vector<int32_t>& out) const {
    uint32_t start[kSmall + 1], rank[kSmall + 1];
    size_t m = n + 1;
    for (size_t i = 0; i <= n; ++i) {
      start[i] = static_cast<uint32_t>(i);
      rank[i] = i + 2 <= n ? rank_of(p + i, 2) : kNoRank;
    }
    for (;;) {
      uint32_t best = kNoRank;
      size_t at = 0;
      for (size_t i = 0; i + 2 < m; ++i)
        if (rank[i] < best) {
          best = rank[i];
          at = i;
        }
      if (best == kNoRank) break;
      std::memmove(start + at + 1, start + at + 2, (m - at - 2) * sizeof(uint32_t));
      std::memmove(rank + at + 1, rank + at + 2, (m - at - 2) * sizeof(uint32_t));
      --m;
      rank[at] = at + 2 < m ? rank_of(p + start[at], start[at + 2] - start[at]) : kNoRank;
      if (at > 0) rank[at - 1] = rank_of(p + start[at - 1], start[at + 1] - start[at - 1]);
    }
    for (size_t i = 0; i + 1 < m; ++i)
      out.push_back(static_cast<int32_t>(rank_of(p + start[i], start[i + 1] - start[i])));
  }

  // The same merges in O(n log n) for long pieces: a linked list of parts and a min-heap of
  // (rank, position) with lazy deletion. Ties go to the leftmost pair, as in tiktoken. `stop`
  // (optional) is polled every kStopPollMerges bytes and merges: a piece of megabytes takes a
  // second; true abandons it and returns false with nothing appended.
  static constexpr uint32_t kStopPollMerges = 1u << 15;
  bool merge_large(const char* p, size_t n, std::vector<int32_t>& out, const std::function<bool()>* stop = nullptr) const {
    // Part i starts at byte i; next[i] is the start of the following part (n at the end).
    std::vector<uint32_t> next(n), prev(n), pair_rank(n, kNoRank);
    std::vector<uint8_t> alive(n, 1);
    using Entry = std::pair<uint32_t, uint32_t>;  // (rank, part)
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    auto rank_after = [&](uint32_t i) -> uint32_t {
      const uint32_t j = next[i];
      if (j >= n) return kNoRank;
      return rank_of(p + i, next[j] - i);
    };
    for (uint32_t i = 0; i < n; ++i) {
      next[i] = i + 1;
      prev[i] = i == 0 ? kNoRank : i - 1;
    }
    for (uint32_t i = 0; i + 1 < n; ++i) {
      if (stop && i % kStopPollMerges == kStopPollMerges - 1 && (*stop)()) return false;
      pair_rank[i] = rank_after(i);
      if (pair_rank[i] != kNoRank) heap.push({pair_rank[i], i});
    }
    uint32_t until_poll = kStopPollMerges;
    while (!heap.empty()) {
      if (stop && --until_poll == 0) {
        if ((*stop)()) return false;
        until_poll = kStopPollMerges;
      }
      const auto [r, i] = heap.top();
      heap.pop();
      if (!alive[i] || pair_rank[i] != r) continue;
      const uint32_t j = next[i];
      alive[j] = 0;
      next[i] = next[j];
      if (next[j] < n) prev[next[j]] = i;
      pair_rank[i] = rank_after(i);
      if (pair_rank[i] != kNoRank) heap.push({pair_rank[i], i});
      if (prev[i] != kNoRank) {
        const uint32_t h = prev[i];
        pair_rank[h] = rank_after(h);
        if (pair_rank[h] != kNoRank) heap.push({pair_rank[h], h});
      }
    }
    for (uint32_t i = 0; i < n; i = next[i]) out.push_back(static_cast<int32_t>(rank_of(p + i, next[i] - i)));
    return true;
  }

  // Appends the ids of one pre-tokenizer piece; false (nothing appended) when `stop` (optional)
  // ended the merging of a long piece.
  bool encode_piece(const char* p, size_t n, std::vector<int32_t>& out, PieceCache& cache,
                    const std::function<bool()>* stop = nullptr) const {
    if (n == 1) {
      out.push_back(byte_rank[static_cast<unsigned char>(p[0])]);
      return true;
    }
    const uint64_t h = hash_bytes(p, n);
    const uint32_t whole = ranks.find(p, n, h);
    if (whole != kNoRank) {
      out.push_back(static_cast<int32_t>(whole));
      return true;
    }
    if (n > kCacheKeyMax) {
      if (n <= kSmall) {
        merge_small(p, n, out);
        return true;
      }
      return merge_large(p, n, out, stop);
    }
    CacheEntry& e = cache.entries[(h >> 7) & (kCacheEntries - 1)];
    if (e.hash == h && e.len == n && std::memcmp(e.key, p, n) == 0) {
      out.insert(out.end(), e.ids, e.ids + e.count);
      return true;
    }
    const size_t before = out.size();
    merge_small(p, n, out);
    e.hash = h;
    e.len = static_cast<uint8_t>(n);
    e.count = static_cast<uint8_t>(out.size() - before);
    std::memcpy(e.key, p, n);
    std::copy(out.begin() + static_cast<std::ptrdiff_t>(before), out.end(), e.ids);
    return true;
  }

  // `text` is valid UTF-8.
  void encode_ordinary(std::string_view text, std::vector<int32_t>& out) const {
    PieceCache& cache = piece_cache(instance);
    size_t pos = 0, start = 0, end = 0;
    while (pos < text.size() && next_piece(text, pos, &start, &end)) {
      if (end == start) {  // cannot happen with the o200k pattern; never loop forever
        bool invalid, incomplete;
        end = start + utf8::sequence(text.substr(start), &invalid, &incomplete);
      }
      encode_piece(text.data() + start, end - start, out, cache);
      pos = end;
    }
  }

  // encode_ordinary under `bounds` (Tokenizer::encode_bounded). The pieces are the same matches
  // in the same order, so the ids appended are always a prefix of encode_ordinary's.
  EncodeEnd encode_ordinary_bounded(std::string_view text, std::vector<int32_t>& out, const EncodeBounds& bounds) const {
    PieceCache& cache = piece_cache(instance);
    const std::function<bool()>* stop = bounds.stop ? &bounds.stop : nullptr;
    const size_t base = out.size();
    const size_t poll_bytes = std::max<size_t>(bounds.poll_bytes, 1);
    size_t pos = 0, start = 0, end = 0, next_poll = poll_bytes;  // encode_bounded polled at 0
    while (pos < text.size() && next_piece(text, pos, &start, &end)) {
      if (end == start) {
        bool invalid, incomplete;
        end = start + utf8::sequence(text.substr(start), &invalid, &incomplete);
      }
      if (stop && start >= next_poll) {
        if ((*stop)()) return EncodeEnd::kStopped;
        next_poll = start + poll_bytes;
      }
      // A piece of n bytes takes at least n / max_token_bytes tokens: a long one that cannot fit
      // is not merged at all.
      const size_t n = end - start, at_least = (n + max_token_bytes - 1) / max_token_bytes;
      if (out.size() - base + at_least > bounds.max_tokens) return EncodeEnd::kOverLimit;
      if (!encode_piece(text.data() + start, n, out, cache, stop)) return EncodeEnd::kStopped;
      if (out.size() - base > bounds.max_tokens) return EncodeEnd::kOverLimit;
      pos = end;
    }
    return EncodeEnd::kComplete;
  }

  void encode_trusted(std::string_view text, std::vector<int32_t>& out) const {
    size_t plain = 0;  // start of the text not yet encoded
    for (size_t i = 0; i < text.size(); ++i) {
      if (!special_first[static_cast<unsigned char>(text[i])]) continue;
      for (const size_t len : special_lengths) {
        if (i + len > text.size()) continue;
        const auto it = special_ids.find(text.substr(i, len));
        if (it == special_ids.end()) continue;
        encode_ordinary(text.substr(plain, i - plain), out);
        out.push_back(it->second);
        i += len - 1;
        plain = i + 1;
        break;
      }
    }
    encode_ordinary(text.substr(plain), out);
  }

  template <typename F>
  void with_valid(std::string_view text, InvalidUtf8 invalid, F&& f) const {
    const size_t good = utf8::valid_prefix(text);
    if (good == text.size()) return f(text);
    if (invalid == InvalidUtf8::kError)
      throw std::invalid_argument("invalid UTF-8 at byte " + std::to_string(good));
    const std::string repaired = utf8::repair(text);
    f(std::string_view(repaired));
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_hf_json(const std::string& path) {
  HfJsonReader reader;
  reader.vocab.reserve(1 << 18);
  {
    const MappedFile file(path);
    const std::string_view data = file.view();
    nlohmann::json::sax_parse(data.begin(), data.end(), &reader);
  }
  if (reader.model_type != "BPE")
    throw std::runtime_error(path + ": model.type is '" + reader.model_type + "', expected BPE");
  if (!reader.normalizer_type.empty())
    throw std::runtime_error(path + ": normalizer '" + reader.normalizer_type + "' is not supported");
  if (reader.vocab.empty()) throw std::runtime_error(path + ": empty model.vocab");
  uint64_t max_rank = 0;
  for (const auto& [tok, id] : reader.vocab) max_rank = std::max(max_rank, id);
  if (max_rank > 10'000'000) throw std::runtime_error(path + ": vocab id too large");
  std::vector<std::string> tokens(max_rank + 1);
  for (auto& [tok, id] : reader.vocab) tokens[id] = gpt2_decode(tok);
  // Added tokens that are already BPE tokens (none in gpt-oss) are not specials.
  std::vector<SpecialToken> specials;
  bool harmony = false;
  for (const auto& a : reader.added) {
    if (static_cast<uint64_t>(a.id) <= max_rank) continue;
    specials.push_back(a);
    if (a.id == harmony_ids::kStart && a.text == "<|start|>") harmony = true;
  }
  if (harmony) {
    std::vector<bool> have(harmony_ids::kVocabSize, false);
    for (const auto& s : specials)
      if (s.id < harmony_ids::kVocabSize) have[s.id] = true;
    for (const auto& s : harmony_special_tokens())
      if (!have[s.id] && s.id > static_cast<int32_t>(max_rank)) specials.push_back(s);
  }
  auto impl = std::make_unique<Impl>();
  impl->build(std::move(tokens), specials, reader.pattern.empty() ? kO200kPattern : reader.pattern);
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_tiktoken(const std::string& path, const std::vector<SpecialToken>& specials,
                                   const std::string& pattern) {
  const MappedFile file(path);
  const std::string_view data = file.view();
  std::vector<std::string> tokens;
  size_t pos = 0, line_no = 0;
  while (pos < data.size()) {
    size_t eol = data.find('\n', pos);
    if (eol == std::string::npos) eol = data.size();
    std::string_view line(data.data() + pos, eol - pos);
    pos = eol + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    const size_t sp = line.find(' ');
    if (sp == std::string_view::npos)
      throw std::runtime_error(path + ":" + std::to_string(line_no) + ": expected 'base64 rank'");
    uint64_t rank = 0;
    const std::string_view num = line.substr(sp + 1);
    if (num.empty() || num.size() > 9) throw std::runtime_error(path + ":" + std::to_string(line_no) + ": bad rank");
    for (const char c : num) {
      if (c < '0' || c > '9') throw std::runtime_error(path + ":" + std::to_string(line_no) + ": bad rank");
      rank = rank * 10 + static_cast<uint64_t>(c - '0');
    }
    std::string bytes = base64_decode(line.substr(0, sp));
    if (bytes.empty()) throw std::runtime_error(path + ":" + std::to_string(line_no) + ": empty token");
    if (rank >= tokens.size()) tokens.resize(rank + 1);
    if (!tokens[rank].empty()) throw std::runtime_error(path + ": rank " + std::to_string(rank) + " twice");
    tokens[rank] = std::move(bytes);
  }
  if (tokens.empty()) throw std::runtime_error(path + ": no ranks");
  auto impl = std::make_unique<Impl>();
  impl->build(std::move(tokens), specials, pattern);
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::load(const std::string& path) {
  std::string p = path;
  std::error_code ec;
  if (std::filesystem::is_directory(p, ec)) {
    p += "/tokenizer.json";
    if (!std::filesystem::exists(p, ec)) throw std::runtime_error("tokenizer: " + p + " does not exist");
  }
  if (p.size() >= 5 && p.compare(p.size() - 5, 5, ".json") == 0) return from_hf_json(p);
  return from_tiktoken(p, harmony_special_tokens());
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, InvalidUtf8 invalid) const {
  std::vector<int32_t> out;
  encode_append(text, out, invalid);
  return out;
}

void Tokenizer::encode_append(std::string_view text, std::vector<int32_t>& out, InvalidUtf8 invalid) const {
  out.reserve(out.size() + text.size() / 4 + 1);
  impl_->with_valid(text, invalid, [&](std::string_view t) { impl_->encode_ordinary(t, out); });
}

EncodeEnd Tokenizer::encode_bounded(std::string_view text, std::vector<int32_t>& out, const EncodeBounds& bounds,
                                    InvalidUtf8 invalid) const {
  if (bounds.stop && bounds.stop()) return EncodeEnd::kStopped;  // before repairing a long invalid text
  EncodeEnd end = EncodeEnd::kComplete;
  impl_->with_valid(text, invalid, [&](std::string_view t) { end = impl_->encode_ordinary_bounded(t, out, bounds); });
  return end;
}

std::vector<int32_t> Tokenizer::encode_with_specials(std::string_view text, InvalidUtf8 invalid) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 4 + 1);
  impl_->with_valid(text, invalid, [&](std::string_view t) { impl_->encode_trusted(t, out); });
  return out;
}

std::optional<std::string_view> Tokenizer::token_bytes(int32_t id) const {
  if (!contains(id)) return std::nullopt;
  const uint32_t off = impl_->offsets[id];
  return std::string_view(impl_->arena).substr(off, impl_->offsets[id + 1] - off);
}

std::optional<int32_t> Tokenizer::token_of_bytes(std::string_view bytes) const {
  if (bytes.empty()) return std::nullopt;
  const uint32_t r = impl_->rank_of(bytes.data(), bytes.size());
  if (r == kNoRank) return std::nullopt;
  return static_cast<int32_t>(r);
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string out;
  for (const int32_t id : ids) {
    const auto bytes = token_bytes(id);
    if (!bytes) throw std::out_of_range("token id " + std::to_string(id) + " is not in the vocabulary");
    out.append(*bytes);
  }
  return out;
}

std::optional<int32_t> Tokenizer::special_id(std::string_view name) const {
  const auto it = impl_->special_ids.find(name);
  if (it == impl_->special_ids.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::is_special(int32_t id) const { return contains(id) && impl_->kind[id] == 2; }
bool Tokenizer::contains(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->kind.size() && impl_->kind[id] != 0;
}
int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->kind.size()); }
int32_t Tokenizer::num_ranks() const { return static_cast<int32_t>(impl_->num_ranks); }
size_t Tokenizer::max_token_bytes() const { return impl_->max_token_bytes; }
const std::string& Tokenizer::pattern() const { return impl_->pattern; }
const std::vector<SpecialToken>& Tokenizer::specials() const { return impl_->specials; }

std::vector<std::string_view> Tokenizer::split(std::string_view text) const {
  if (!utf8::is_valid(text)) throw std::invalid_argument("split: text is not valid UTF-8");
  std::vector<std::string_view> pieces;
  size_t pos = 0, start = 0, end = 0;
  while (pos < text.size() && impl_->next_piece(text, pos, &start, &end)) {
    if (end == start) break;
    pieces.push_back(text.substr(start, end - start));
    pos = end;
  }
  return pieces;
}

// ---------------------------------------------------------------------------------------------

std::string StreamDecoder::push(int32_t id) {
  const auto bytes = tokenizer_->token_bytes(id);
  if (!bytes) throw std::out_of_range("token id " + std::to_string(id) + " is not in the vocabulary");
  if (skip_special_ && tokenizer_->is_special(id)) return {};
  held_.append(*bytes);
  return drain(false);
}

std::string StreamDecoder::flush() { return drain(true); }

std::string StreamDecoder::drain(bool final) {
  std::string out;
  std::string_view rest(held_);
  while (!rest.empty()) {
    const size_t good = utf8::valid_prefix(rest);
    out.append(rest.substr(0, good));
    rest.remove_prefix(good);
    if (rest.empty()) break;
    bool invalid, incomplete;
    const size_t len = utf8::sequence(rest, &invalid, &incomplete);
    if (incomplete && !final) break;  // wait for the rest of the sequence
    out.append(utf8::kReplacement);
    rest.remove_prefix(len);
  }
  held_ = std::string(rest);
  return out;
}

}  // namespace arbiter
