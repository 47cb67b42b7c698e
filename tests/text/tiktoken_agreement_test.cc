// Exact agreement with OpenAI's tiktoken core (npm `tiktoken`, o200k_base ranks, run by
// tests/text/oracle.mjs at test time) on a generated corpus: many scripts, emoji and ZWJ
// sequences, combining marks, digit runs, code, URLs, every kind of whitespace, contractions,
// long runs and random Unicode strings; and, with the harmony special tokens allowed, on trusted
// text. js-tiktoken (JavaScript regex semantics) is reported alongside.
#include <gtest/gtest.h>

#include <fstream>

#include "runtime/tokenizer.h"
#include "tests/text/text_test_util.h"

namespace arbiter {
namespace {

using Ids = std::vector<int32_t>;

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

std::string show(const std::string& s) { return nlohmann::json(s).dump().substr(0, 200); }

TEST(TiktokenAgreement, ContentModeMatchesTiktokenExactly) {
  const Tokenizer& tok = text_testing::tokenizer();
  text_testing::TempDir dir;
  text_testing::run_oracle("cases", dir.file("cases.jsonl"));
  const auto cases = read_jsonl(dir.file("cases.jsonl"));
  ASSERT_GT(cases.size(), 700u);
  size_t mismatches = 0, js_differs = 0, tokens = 0;
  for (const auto& c : cases) {
    const std::string text = c.at("text").get<std::string>();
    const Ids want = c.at("ids").get<Ids>();
    const Ids got = tok.encode(text);
    tokens += want.size();
    if (got != want) {
      if (++mismatches <= 10)
        ADD_FAILURE() << "text " << show(text) << "\n got  " << nlohmann::json(got).dump().substr(0, 300)
                      << "\n want " << nlohmann::json(want).dump().substr(0, 300);
    }
    EXPECT_EQ(tok.decode(got), text);
    if (!c.at("js").is_null() && c.at("js").get<Ids>() != want) ++js_differs;
  }
  EXPECT_EQ(mismatches, 0u);
  // js-tiktoken uses JavaScript's \s (no U+0085, adds U+FEFF): it may differ on a few texts.
  std::cout << cases.size() << " texts, " << tokens << " tokens; js-tiktoken differs from tiktoken on "
            << js_differs << "\n";
  EXPECT_LT(js_differs, cases.size() / 20);
}

TEST(TiktokenAgreement, TrustedModeMatchesTiktokenWithHarmonySpecials) {
  const Tokenizer& tok = text_testing::tokenizer();
  text_testing::TempDir dir;
  text_testing::run_oracle("trusted", dir.file("trusted.jsonl"));
  const auto cases = read_jsonl(dir.file("trusted.jsonl"));
  ASSERT_GT(cases.size(), 10u);
  for (const auto& c : cases) {
    const std::string text = c.at("text").get<std::string>();
    EXPECT_EQ(tok.encode_with_specials(text), c.at("ids").get<Ids>()) << show(text);
  }
}

}  // namespace
}  // namespace arbiter
