// The o200k_harmony tokenizer: reference vectors, special-token injection, invalid UTF-8,
// the streaming decoder on split multi-byte characters, long pieces, the tiktoken rank-file
// loader, thread safety, and the bounded encode (token limit, stop predicate) against the plain one.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <random>
#include <thread>

#include "runtime/tokenizer.h"
#include "runtime/utf8.h"
#include "tests/text/text_test_util.h"

namespace arbiter {
namespace {

using text_testing::tokenizer;
using Ids = std::vector<int32_t>;

// The id of the one-byte token for byte b.
int32_t byte_token(uint8_t b) {
  static const auto table = [] {
    std::array<int32_t, 256> t{};
    t.fill(-1);
    const Tokenizer& tok = tokenizer();
    for (int32_t id = 0; id < tok.num_ranks(); ++id) {
      const auto bytes = tok.token_bytes(id);
      if (bytes && bytes->size() == 1) t[static_cast<uint8_t>((*bytes)[0])] = id;
    }
    return t;
  }();
  return table[b];
}

TEST(Tokenizer, LoadsTheGptOssVocabulary) {
  const Tokenizer& tok = tokenizer();
  EXPECT_EQ(tok.num_ranks(), 199998);
  EXPECT_EQ(tok.vocab_size(), harmony_ids::kVocabSize);
  EXPECT_EQ(tok.special_id("<|start|>"), harmony_ids::kStart);
  EXPECT_EQ(tok.special_id("<|end|>"), harmony_ids::kEnd);
  EXPECT_EQ(tok.special_id("<|message|>"), harmony_ids::kMessage);
  EXPECT_EQ(tok.special_id("<|channel|>"), harmony_ids::kChannel);
  EXPECT_EQ(tok.special_id("<|constrain|>"), harmony_ids::kConstrain);
  EXPECT_EQ(tok.special_id("<|return|>"), harmony_ids::kReturn);
  EXPECT_EQ(tok.special_id("<|call|>"), harmony_ids::kCall);
  EXPECT_EQ(tok.special_id("<|startoftext|>"), 199998);
  EXPECT_EQ(tok.special_id("<|endoftext|>"), 199999);
  EXPECT_EQ(tok.special_id("<|endofprompt|>"), 200018);
  EXPECT_EQ(tok.special_id("<|reserved_200000|>"), 200000);
  EXPECT_EQ(tok.special_id("<|reserved_201087|>"), 201087);
  EXPECT_FALSE(tok.special_id("<|refusal|>"));
  EXPECT_TRUE(tok.is_special(200006));
  EXPECT_FALSE(tok.is_special(13225));
  EXPECT_FALSE(tok.contains(201088));
  EXPECT_FALSE(tok.contains(-1));
  for (int b = 0; b < 256; ++b) EXPECT_GE(byte_token(static_cast<uint8_t>(b)), 0) << b;
}

TEST(Tokenizer, ReferenceVectors) {
  const Tokenizer& tok = tokenizer();
  const std::vector<std::pair<std::string, Ids>> cases = {
      {"Hello world", {13225, 2375}},
      {"DON'T STOP, he's here. I'M fine", {134882, 51532, 82926, 11, 19016, 2105, 13, 3413, 44, 8975}},
      {"12345678", {7633, 19354, 4388}},
      {"1990's", {3204, 15, 885}},
      {"  leading   and trailing   ", {220, 8117, 256, 326, 57985, 271}},
      {"a  \n b", {64, 4066, 287}},
      {"hello\n\n  world", {24912, 279, 220, 2375}},
      {"a\u00a0b", {64, 5310, 65}},
      {"a\u3000\u3000\u3000b", {64, 4577, 1397, 65}},
      {"a\x1c\x1c\x1c" "b", {64, 216, 216, 216, 65}},
      {"a\u180e\u180e\u180e" "b", {64, 157, 254, 236, 157, 254, 236, 157, 254, 236, 65}},
      {"", {}},
  };
  for (const auto& [text, ids] : cases) {
    EXPECT_EQ(tok.encode(text), ids) << text;
    EXPECT_EQ(tok.decode(ids), text);
  }
  EXPECT_EQ(tok.encode_with_specials("<|startoftext|><|start|><|message|>Hello World<|end|><|endoftext|>"),
            (Ids{199998, 200006, 200008, 13225, 5922, 200007, 199999}));
}

TEST(Tokenizer, PreTokenizerSplits) {
  const Tokenizer& tok = tokenizer();
  using V = std::vector<std::string_view>;
  EXPECT_EQ(tok.split("  world"), (V{" ", " world"}));
  EXPECT_EQ(tok.split("12345678"), (V{"123", "456", "78"}));
  EXPECT_EQ(tok.split("we\u2019re"), (V{"we", "\u2019re"}));
  EXPECT_EQ(tok.split("DON'T"), (V{"DON'T"}));
}

TEST(Tokenizer, ContentModeCannotInjectSpecialTokens) {
  const Tokenizer& tok = tokenizer();
  // Every special name, alone, glued together and inside text.
  std::string all;
  for (const auto& s : tok.specials()) {
    const std::string text = "x" + s.text + " " + s.text;
    for (const int32_t id : tok.encode(text)) ASSERT_LT(id, tok.num_ranks()) << s.text;
    if (s.id < 200030) all += s.text;
  }
  const Ids ids = tok.encode(all);
  for (const int32_t id : ids) ASSERT_LT(id, tok.num_ranks());
  EXPECT_EQ(tok.decode(ids), all);
  // Trusted mode does turn them into specials.
  const Ids trusted = tok.encode_with_specials(all);
  for (const int32_t id : trusted) EXPECT_GE(id, 199998);

  // Random mixtures of special-name fragments, never a special id in content mode.
  std::mt19937 rng(7);
  const std::vector<std::string> frags = {"<|", "|>", "<", "|", ">", "start", "end", "message", "channel",
                                          "<|start|>", "<|end|>", "<|return|>", "<|call|>", "<|endoftext|>",
                                          " ", "\n", "é", "😀", "assistant", "<|constrain|>", "<|reserved_200100|>"};
  for (int i = 0; i < 2000; ++i) {
    std::string s;
    const int n = 1 + static_cast<int>(rng() % 12);
    for (int j = 0; j < n; ++j) s += frags[rng() % frags.size()];
    const Ids got = tok.encode(s);
    for (const int32_t id : got) ASSERT_LT(id, tok.num_ranks()) << s;
    ASSERT_EQ(tok.decode(got), s);
    // Trusted mode: decoding gives the text back too.
    ASSERT_EQ(tok.decode(tok.encode_with_specials(s)), s);
  }
}

TEST(Tokenizer, InvalidUtf8IsReplacedOrRejectedNeverACrash) {
  const Tokenizer& tok = tokenizer();
  const std::string bad = std::string("ok \xff\xfe then \xe2\x82 cut and \xed\xa0\x80 surrogate \xc0\xaf overlong") + "\xf0\x9f";
  const std::string repaired = utf8::repair(bad);
  EXPECT_TRUE(utf8::is_valid(repaired));
  EXPECT_EQ(tok.encode(bad), tok.encode(repaired));
  EXPECT_EQ(tok.decode(tok.encode(bad)), repaired);
  try {
    tok.encode(bad, InvalidUtf8::kError);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "invalid UTF-8 at byte 3");
  }
  EXPECT_THROW(tok.encode_with_specials("\x80<|start|>", InvalidUtf8::kError), std::invalid_argument);
  EXPECT_EQ(tok.encode_with_specials("\x80<|start|>"), (Ids{tok.encode("\xef\xbf\xbd")[0], 200006}));
  // Random bytes: always the encoding of the repaired text.
  std::mt19937 rng(11);
  for (int i = 0; i < 3000; ++i) {
    std::string s(rng() % 40, '\0');
    for (auto& c : s) c = static_cast<char>(rng() % 4 ? rng() % 256 : 0x80 + rng() % 0x40);
    const Ids ids = tok.encode(s);
    ASSERT_EQ(tok.decode(ids), utf8::repair(s));
  }
}

TEST(Tokenizer, Utf8RepairFollowsMaximalSubparts) {
  // U+FFFD per maximal subpart (Unicode 15 §3.9, Table 3-8 examples).
  EXPECT_EQ(utf8::repair("\xe2\x82"), "\xef\xbf\xbd");
  EXPECT_EQ(utf8::repair("a\xe2\x82" "b"), "a\xef\xbf\xbd" "b");
  EXPECT_EQ(utf8::repair("\xc0\xaf"), "\xef\xbf\xbd\xef\xbf\xbd");
  EXPECT_EQ(utf8::repair("\xed\xa0\x80"), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
  const std::string r = "\xef\xbf\xbd";
  EXPECT_EQ(utf8::repair("\xf4\x90\x80\x80"), r + r + r + r);  // above U+10FFFF
  EXPECT_EQ(utf8::repair("\xf0\x9f\x98"), "\xef\xbf\xbd");
  EXPECT_EQ(utf8::repair("\xf0\x9f\x98\x80"), "\xf0\x9f\x98\x80");
}

TEST(StreamDecoder, HoldsSplitMultiByteCharacters) {
  const Tokenizer& tok = tokenizer();
  // é = C3 A9 as two byte tokens.
  StreamDecoder d(tok);
  EXPECT_EQ(d.push(byte_token(0xC3)), "");
  EXPECT_TRUE(d.has_pending());
  EXPECT_EQ(d.push(byte_token(0xA9)), "é");
  EXPECT_FALSE(d.has_pending());
  // 😀 = F0 9F 98 80 one byte at a time, then text.
  EXPECT_EQ(d.push(byte_token(0xF0)), "");
  EXPECT_EQ(d.push(byte_token(0x9F)), "");
  EXPECT_EQ(d.push(byte_token(0x98)), "");
  EXPECT_EQ(d.push(byte_token(0x80)), "😀");
  // A truly invalid byte is replaced at once; a broken sequence when the next byte shows it.
  EXPECT_EQ(d.push(byte_token(0xFF)), "\xef\xbf\xbd");
  EXPECT_EQ(d.push(byte_token(0xE2)), "");
  EXPECT_EQ(d.push(tok.encode("a")[0]), "\xef\xbf\xbd" "a");
  // An incomplete tail at the end of the stream becomes U+FFFD.
  EXPECT_EQ(d.push(byte_token(0xE2)), "");
  EXPECT_EQ(d.push(byte_token(0x82)), "");
  EXPECT_EQ(d.flush(), "\xef\xbf\xbd");
  EXPECT_EQ(d.flush(), "");
  // Specials are names (or skipped).
  EXPECT_EQ(d.push(harmony_ids::kEnd), "<|end|>");
  StreamDecoder quiet(tok, /*skip_special=*/true);
  EXPECT_EQ(quiet.push(harmony_ids::kEnd), "");
  EXPECT_THROW(d.push(201088), std::out_of_range);
  EXPECT_THROW(d.push(-5), std::out_of_range);
}

TEST(StreamDecoder, TokenByTokenEqualsWholeDecode) {
  const Tokenizer& tok = tokenizer();
  const std::vector<std::string> texts = {
      "𐌰𐌱𐌲 gothic 👨‍👩‍👧‍👦 family ꦗꦮ 🫠🫠 ᚠᛇᚻ runes", "日本語のテキスト、ひらがなとカタカナ", "a\u0301\u0302\u0303",
      "mixed ASCII, ελληνικά, עברית, हिन्दी, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"};
  for (const auto& text : texts) {
    StreamDecoder d(tok);
    std::string out;
    bool any_partial = false;
    for (const int32_t id : tok.encode(text)) {
      const std::string piece = d.push(id);
      ASSERT_TRUE(utf8::is_valid(piece));
      any_partial |= d.has_pending();
      out += piece;
    }
    out += d.flush();
    EXPECT_EQ(out, text);
    if (text.rfind("𐌰", 0) == 0) {
      EXPECT_TRUE(any_partial) << "expected a character split across tokens";
    }
  }
}

TEST(Tokenizer, LongPiecesAreFast) {
  const Tokenizer& tok = tokenizer();
  // 1 MB pieces: one letter run, one run of a rare character, one run of spaces.
  const std::vector<std::string> texts = {std::string(1 << 20, 'a'), [] {
                                            std::string s;
                                            while (s.size() < (1 << 20)) s += "ꦗ";
                                            return s;
                                          }(),
                                          std::string(1 << 20, ' ') + "x"};
  for (const auto& text : texts) {
    const auto t0 = std::chrono::steady_clock::now();
    const Ids ids = tok.encode(text);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(tok.decode(ids), text);
    EXPECT_LT(s, 5.0) << "a 1 MB piece took " << s << " s: the merge loop is not O(n log n)";
  }
  // Around the switch from the array merge loop to the heap (128 bytes); exact ids for long
  // runs are checked against tiktoken in TiktokenAgreement.
  for (size_t n = 100; n < 300; n += 7) {
    const std::string s(n, 'z');
    EXPECT_EQ(tok.decode(tok.encode(s)), s);
  }
}

TEST(Tokenizer, TiktokenRankFileGivesTheSameTokenizer) {
  const Tokenizer& hf = tokenizer();
  text_testing::TempDir dir;
  const std::string ranks = dir.file("o200k_base.tiktoken");
  text_testing::run_oracle("ranks", ranks);
  const Tokenizer tt = Tokenizer::from_tiktoken(ranks, harmony_special_tokens());
  ASSERT_EQ(tt.num_ranks(), hf.num_ranks());
  ASSERT_EQ(tt.vocab_size(), hf.vocab_size());
  for (int32_t id = 0; id < hf.vocab_size(); ++id) ASSERT_EQ(tt.token_bytes(id), hf.token_bytes(id)) << id;
  const Tokenizer loaded = Tokenizer::load(ranks);
  const std::string text = "Policy: <|start|> spam? 12345 — naïve café 😀\r\n\tend";
  EXPECT_EQ(loaded.encode(text), hf.encode(text));
  EXPECT_EQ(loaded.encode_with_specials(text), hf.encode_with_specials(text));
}

TEST(Tokenizer, BadFilesFailWithAClearError) {
  text_testing::TempDir dir;
  {
    std::ofstream(dir.file("bad.tiktoken")) << "IQ== 0\nnot-a-line\n";
  }
  EXPECT_THROW(Tokenizer::from_tiktoken(dir.file("bad.tiktoken"), {}), std::runtime_error);
  {
    std::ofstream(dir.file("tokenizer.json")) << "{\"model\": {\"type\": \"Unigram\", \"vocab\": {}}}";
  }
  EXPECT_THROW(Tokenizer::from_hf_json(dir.file("tokenizer.json")), std::runtime_error);
  {
    std::ofstream(dir.file("broken.json")) << "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": ";
  }
  EXPECT_THROW(Tokenizer::from_hf_json(dir.file("broken.json")), std::runtime_error);
  EXPECT_THROW(Tokenizer::load(dir.file("missing.json")), std::runtime_error);
}

TEST(Tokenizer, ConcurrentEncodeIsConsistent) {
  const Tokenizer& tok = tokenizer();
  std::vector<std::string> texts;
  std::mt19937 rng(3);
  const std::vector<std::string> words = {"policy ", "spam ", "naïve ", "東京 ", "12345 ", "don't ", "😀", "\n"};
  for (int i = 0; i < 200; ++i) {
    std::string s;
    for (int j = 0; j < 50; ++j) s += words[rng() % words.size()];
    texts.push_back(s);
  }
  std::vector<Ids> expected;
  for (const auto& t : texts) expected.push_back(tok.encode(t));
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 5; ++rep)
        for (size_t i = 0; i < texts.size(); ++i)
          if (tok.encode(texts[(i + static_cast<size_t>(t) * 17) % texts.size()]) !=
              expected[(i + static_cast<size_t>(t) * 17) % texts.size()])
            ++bad;
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

// A random text from pieces that exercise the pre-tokenizer (words, digits, whitespace runs,
// punctuation, multi-byte characters, special-token names, invalid bytes, long single pieces).
std::string random_text(std::mt19937& rng) {
  static const std::vector<std::string> parts = {
      "policy", " spam", " Free", "CRUISE", "don't", " 12345", "\n\n", "   ", "\t", "!!!", "é", "東京", "😀", "<|end|>",
      "\r\n", " ", "a", "{\"violation\": 1}", "\xff", "\xe2\x82", "naïve", "ꦗꦗꦗ"};
  std::string s;
  const int n = static_cast<int>(rng() % 60);
  for (int i = 0; i < n; ++i) {
    if (rng() % 40 == 0) s += std::string(200 + rng() % 2000, "a z"[rng() % 3]);  // a long piece
    else s += parts[rng() % parts.size()];
  }
  return s;
}

TEST(TokenizerBounded, UnboundedEqualsThePlainEncode) {
  const Tokenizer& tok = tokenizer();
  std::mt19937 rng(11);
  for (int trial = 0; trial < 300; ++trial) {
    const std::string text = random_text(rng);
    Ids out = {7, 8};  // appends after what is there
    ASSERT_EQ(tok.encode_bounded(text, out, {}), EncodeEnd::kComplete);
    Ids expected = {7, 8};
    tok.encode_append(text, expected);
    EXPECT_EQ(out, expected) << text;
  }
}

TEST(TokenizerBounded, RandomLimitsGiveThePlainIdsOrAPrefixOverTheLimit) {
  const Tokenizer& tok = tokenizer();
  std::mt19937 rng(12);
  int over = 0, complete = 0;
  for (int trial = 0; trial < 600; ++trial) {
    const std::string text = random_text(rng);
    const Ids plain = tok.encode(text);
    // Limits around the true count, and anywhere below it.
    const size_t limit = rng() % 2 ? plain.size() + (rng() % 5) - std::min<size_t>(plain.size(), 2) : rng() % (plain.size() + 1);
    EncodeBounds bounds;
    bounds.max_tokens = limit;
    bounds.poll_bytes = 1 + rng() % 64;
    Ids out;
    const EncodeEnd end = tok.encode_bounded(text, out, bounds);
    if (plain.size() <= limit) {
      ASSERT_EQ(end, EncodeEnd::kComplete) << "limit " << limit << ", " << plain.size() << " tokens: " << text;
      EXPECT_EQ(out, plain) << text;
      ++complete;
    } else {
      ASSERT_EQ(end, EncodeEnd::kOverLimit) << "limit " << limit << ", " << plain.size() << " tokens: " << text;
      ASSERT_LE(out.size(), plain.size());
      EXPECT_TRUE(std::equal(out.begin(), out.end(), plain.begin())) << "not a prefix of the plain ids: " << text;
      ++over;
    }
  }
  EXPECT_GT(over, 100);
  EXPECT_GT(complete, 100);
}

TEST(TokenizerBounded, StopPredicateEndsTheEncodeAndIsPolledByBytes) {
  const Tokenizer& tok = tokenizer();
  std::mt19937 rng(13);
  for (int trial = 0; trial < 300; ++trial) {
    const std::string text = random_text(rng);
    const Ids plain = tok.encode(text);
    int polls = 0;
    const int stop_at = static_cast<int>(rng() % 6);
    EncodeBounds bounds;
    bounds.poll_bytes = 1 + rng() % 32;
    bounds.stop = [&] { return polls++ == stop_at; };
    Ids out;
    const EncodeEnd end = tok.encode_bounded(text, out, bounds);
    if (end == EncodeEnd::kComplete) {
      EXPECT_EQ(out, plain) << text;
      EXPECT_LE(polls, stop_at + 1);
    } else {
      ASSERT_EQ(end, EncodeEnd::kStopped);
      EXPECT_EQ(polls, stop_at + 1);
      ASSERT_LE(out.size(), plain.size());
      EXPECT_TRUE(std::equal(out.begin(), out.end(), plain.begin())) << text;
    }
  }
  // Polled before anything is encoded, and about every poll_bytes bytes after that.
  const std::string words = [] {
    std::string s;
    for (int i = 0; i < 10000; ++i) s += " word" + std::to_string(i % 10);
    return s;
  }();
  int polls = 0;
  EncodeBounds every_kb;
  every_kb.poll_bytes = 1024;
  every_kb.stop = [&] { return ++polls < 0; };
  Ids out;
  ASSERT_EQ(tok.encode_bounded(words, out, every_kb), EncodeEnd::kComplete);
  EXPECT_EQ(out, tok.encode(words));
  EXPECT_GE(polls, static_cast<int>(words.size() / 1024));
  EXPECT_LE(polls, static_cast<int>(words.size() / 1024) + 3);
  polls = 0;
  EncodeBounds at_once;
  at_once.stop = [&] { return ++polls > 0; };
  out.clear();
  EXPECT_EQ(tok.encode_bounded(words, out, at_once), EncodeEnd::kStopped);
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(polls, 1);
}

TEST(TokenizerBounded, LongPiecesEndEarly) {
  const Tokenizer& tok = tokenizer();
  EXPECT_GE(tok.max_token_bytes(), 16u);
  auto seconds_since = [](std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  // 4 MB of one letter is one piece. The plain encode merges it whole; the bounded one, over a
  // small limit, does not merge it at all (what remains is finding the piece). Compared in the same
  // run, so the machine's load cancels out.
  const std::string run(4 << 20, 'a');
  Ids out;
  auto t0 = std::chrono::steady_clock::now();
  tok.encode_append(run, out);
  const double plain = seconds_since(t0);
  EncodeBounds limit;
  limit.max_tokens = 8192;
  out.clear();
  t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(tok.encode_bounded(run, out, limit), EncodeEnd::kOverLimit);
  EXPECT_LT(seconds_since(t0), plain / 3) << "the bounded encode merged the piece (plain: " << plain << " s)";
  // Without a limit, a stop predicate ends the merging of the piece itself.
  int polls = 0;
  EncodeBounds stop;
  stop.stop = [&] { return ++polls > 1; };  // false before the piece, true inside its merge (the next poll)
  out.clear();
  t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(tok.encode_bounded(run, out, stop), EncodeEnd::kStopped);
  EXPECT_LT(seconds_since(t0), plain / 3) << "the stop predicate did not end the merge (plain: " << plain << " s)";
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(polls, 2);
}

}  // namespace
}  // namespace arbiter
