// PolicyRules (pipeline/rules.h): deny/allow order, labels, hash rules, every compile error, the
// canonical round trip, bounded backtracking, and random rules objects that must compile or throw
// std::invalid_argument, never crash.
#include "pipeline/rules.h"

#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>

#include "pipeline/sha256.h"

namespace arbiter {
namespace {

using nlohmann::json;

const std::vector<std::string> kLabels = {"VALID", "INVALID", "INVALID + ESCALATE"};
const std::vector<std::string> kViolating = {"INVALID", "INVALID + ESCALATE"};

// The message of the std::invalid_argument that compile throws ("" when it compiles).
std::string compile_error(const json& rules, const std::vector<std::string>& labels = {},
                          const std::vector<std::string>& violating = {}) {
  try {
    PolicyRules::compile(rules, labels, violating);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

TEST(PolicyRulesTest, DenyRulesComeFirstThenAllowInOrder) {
  const auto rules = PolicyRules::compile(json::parse(R"({
    "allow": [{"id": "A1", "pattern": "order"}, {"id": "A2", "pattern": "shipped"}],
    "deny":  [{"id": "D1", "pattern": "(?i)free\\s+crypto"}, {"id": "D2", "pattern": "crypto"}]})"));
  EXPECT_EQ(rules->size(), 4u);
  auto m = rules->match("order shipped: FREE   crypto inside");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->rule_id, "D1");
  EXPECT_TRUE(m->deny);
  EXPECT_TRUE(m->violation);
  EXPECT_EQ(m->verdict, json(1));
  m = rules->match("crypto order");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->rule_id, "D2");
  m = rules->match("your order has shipped");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->rule_id, "A1");
  EXPECT_FALSE(m->deny);
  EXPECT_FALSE(m->violation);
  EXPECT_EQ(m->verdict, json(0));
  m = rules->match("it shipped");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->rule_id, "A2");
  EXPECT_FALSE(rules->match("nothing here"));
  EXPECT_FALSE(rules->match(""));
}

TEST(PolicyRulesTest, EmptyRulesMatchNothing) {
  for (const char* text : {"{}", R"({"deny": [], "allow": []})", R"({"deny": null})"}) {
    const auto rules = PolicyRules::compile(json::parse(text));
    EXPECT_EQ(rules->size(), 0u);
    EXPECT_FALSE(rules->match("anything"));
  }
}

TEST(PolicyRulesTest, PatternsAreUtf8AndInvalidUtf8ContentDoesNotBreakMatching) {
  const auto rules = PolicyRules::compile(json::parse(R"({"deny": [{"id": "D", "pattern": "^caf.$"}]})"));
  EXPECT_TRUE(rules->match("caf\xc3\xa9"));       // é is one character in UTF mode
  EXPECT_FALSE(rules->match("caf\xc3\xa9\xc3\xa9"));
  EXPECT_FALSE(rules->match("caf\xff"));          // invalid UTF-8: no match, no error
  const auto anywhere = PolicyRules::compile(json::parse(R"({"deny": [{"id": "D", "pattern": "spam"}]})"));
  EXPECT_TRUE(anywhere->match(std::string("\xff\xfe spam \xc3", 9)));
  EXPECT_TRUE(anywhere->match(std::string("a\0spam", 6)));  // content with a NUL byte
}

TEST(PolicyRulesTest, LabelSetPoliciesAnswerWithTheRulesLabels) {
  const auto rules = PolicyRules::compile(json::parse(R"({
    "deny":  [{"id": "D1", "pattern": "buy now", "label": "INVALID + ESCALATE"}],
    "allow": [{"id": "A1", "pattern": "^order #\\d+ shipped$", "label": "VALID"}]})"),
                                          kLabels, kViolating);
  auto m = rules->match("buy now!!!");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->verdict, json("INVALID + ESCALATE"));
  EXPECT_TRUE(m->violation);
  m = rules->match("order #123 shipped");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->verdict, json("VALID"));
  EXPECT_FALSE(m->violation);
  EXPECT_FALSE(rules->match("order #12x shipped"));
}

TEST(PolicyRulesTest, HashRulesMatchExactContent) {
  const std::string spam = "Win a FREE iPhone now: http://example.test/claim";
  std::string upper = sha256_hex(spam);
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  const auto rules = PolicyRules::compile(json{
      {"deny", json::array({json{{"id", "H1"}, {"sha256", json::array({sha256_hex("other"), upper})}}})},
      {"allow", json::array({json{{"id", "H2"}, {"sha256", json::array({sha256_hex("hello")})}}})}});
  auto m = rules->match(spam);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->rule_id, "H1");
  EXPECT_EQ(m->verdict, json(1));
  m = rules->match("hello");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->rule_id, "H2");
  EXPECT_FALSE(rules->match(spam + " "));  // exact content only
  EXPECT_FALSE(rules->match("Hello"));
  // Canonical form: lower-case hex.
  EXPECT_EQ(rules->to_json()["deny"][0]["sha256"][1], json(sha256_hex(spam)));
}

TEST(PolicyRulesTest, RoundTripsThroughToJson) {
  const json in = json::parse(R"({
    "deny":  [{"id": "R1", "pattern": "(?i)free\\s+crypto", "label": "INVALID"},
              {"id": "H.1", "sha256": ["0000000000000000000000000000000000000000000000000000000000000000"], "label": "INVALID + ESCALATE"}],
    "allow": [{"id": "a-2_x", "pattern": "^ok$", "label": "VALID"}]})");
  const auto rules = PolicyRules::compile(in, kLabels, kViolating);
  const json out = rules->to_json();
  EXPECT_EQ(out, in);
  const auto again = PolicyRules::compile(out, kLabels, kViolating);
  EXPECT_EQ(again->to_json(), out);
  EXPECT_EQ(again->size(), 3u);
  // 0/1 policy, lists filled in.
  const auto binary = PolicyRules::compile(json::parse(R"({"allow": [{"id": "A", "pattern": "x"}]})"));
  EXPECT_EQ(binary->to_json(), json::parse(R"({"deny": [], "allow": [{"id": "A", "pattern": "x"}]})"));
  EXPECT_EQ(PolicyRules::compile(binary->to_json())->to_json(), binary->to_json());
}

TEST(PolicyRulesTest, BadPatternNamesTheRuleThePcre2ErrorAndTheOffset) {
  const std::string e = compile_error(json::parse(R"({"deny": [{"id": "ok", "pattern": "a"}, {"id": "broken", "pattern": "ab(cd"}]})"));
  EXPECT_NE(e.find("\"broken\""), std::string::npos) << e;
  EXPECT_NE(e.find("missing closing parenthesis"), std::string::npos) << e;  // PCRE2's own text
  EXPECT_NE(e.find("offset 5"), std::string::npos) << e;
  const std::string e2 = compile_error(json::parse(R"({"allow": [{"id": "q", "pattern": "a**"}]})"));
  EXPECT_NE(e2.find("\"q\""), std::string::npos) << e2;
  EXPECT_NE(e2.find("offset 2"), std::string::npos) << e2;
  // \C is refused in UTF mode.
  EXPECT_NE(compile_error(json::parse(R"({"deny": [{"id": "c", "pattern": "a\\Cb"}]})")).find("\"c\""), std::string::npos);
}

TEST(PolicyRulesTest, StructuralErrors) {
  const auto has = [](const std::string& message, const std::string& part) {
    return message.find(part) != std::string::npos;
  };
  EXPECT_TRUE(has(compile_error(json::array()), "must be an object"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [], "block": []})")), "unknown key \"block\""));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": {"id": "x"}})")), "\"deny\" must be a list"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": ["x"]})")), "deny[0] must be an object"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"pattern": "x"}]})")), "deny[0] has no \"id\""));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"allow": [{"id": "", "pattern": "x"}]})")), "\"id\" must be"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"allow": [{"id": "a b", "pattern": "x"}]})")), "\"id\" must be"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"allow": [{"id": 7, "pattern": "x"}]})")), "\"id\" must be"));
  EXPECT_TRUE(has(compile_error(json{{"allow", {{{"id", std::string(129, 'a')}, {"pattern", "x"}}}}}), "\"id\" must be"));
  EXPECT_EQ(compile_error(json{{"allow", {{{"id", std::string(128, 'a')}, {"pattern", "x"}}}}}), "");
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "pattern": "a"}], "allow": [{"id": "x", "pattern": "b"}]})")),
                  "\"x\" (allow[0]): duplicate id"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "pattern": "a", "flags": "i"}]})")),
                  "unknown key \"flags\""));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x"}]})")), "exactly one of"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "pattern": "a", "sha256": []}]})")), "exactly one of"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "pattern": 3}]})")), "\"pattern\" must be a string"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "pattern": ""}]})")), "\"pattern\" is empty"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "sha256": []}]})")), "non-empty list"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "sha256": "00"}]})")), "non-empty list"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "sha256": ["abc"]}]})")), "sha256[0] is not 64 hex"));
  EXPECT_TRUE(has(compile_error(json{{"deny", {{{"id", "x"}, {"sha256", {std::string(63, 'a') + "g"}}}}}}), "sha256[0] is not 64 hex"));
}

TEST(PolicyRulesTest, LabelErrors) {
  const auto has = [](const std::string& message, const std::string& part) {
    return message.find(part) != std::string::npos;
  };
  // A label on a 0/1 policy.
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "pattern": "a", "label": "INVALID"}]})")),
                  "only for policies with labels"));
  // A label-set policy: the label is required, known, violating for deny and not for allow.
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "pattern": "a"}]})"), kLabels, kViolating),
                  "needs a \"label\""));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "pattern": "a", "label": "SPAM"}]})"), kLabels, kViolating),
                  "not one of the policy's labels"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "pattern": "a", "label": 1}]})"), kLabels, kViolating),
                  "not one of the policy's labels"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"deny": [{"id": "x", "pattern": "a", "label": "VALID"}]})"), kLabels, kViolating),
                  "deny rule needs a violating label"));
  EXPECT_TRUE(has(compile_error(json::parse(R"({"allow": [{"id": "x", "pattern": "a", "label": "INVALID"}]})"), kLabels, kViolating),
                  "allow rule needs a non-violating label"));
}

TEST(PolicyRulesTest, Limits) {
  json many = {{"deny", json::array()}};
  for (size_t i = 0; i < kMaxRules; ++i) many["deny"].push_back({{"id", "r" + std::to_string(i)}, {"pattern", "x"}});
  EXPECT_EQ(compile_error(many), "");
  many["allow"] = json::array({json{{"id", "one-more"}, {"pattern", "x"}}});
  EXPECT_NE(compile_error(many).find("more than 256 rules"), std::string::npos);

  EXPECT_EQ(compile_error(json{{"deny", {{{"id", "p"}, {"pattern", std::string(kMaxPatternBytes, 'a')}}}}}), "");
  const std::string long_pattern = compile_error(json{{"deny", {{{"id", "p"}, {"pattern", std::string(kMaxPatternBytes + 1, 'a')}}}}});
  EXPECT_NE(long_pattern.find("longer than 4096 bytes"), std::string::npos) << long_pattern;
  EXPECT_NE(long_pattern.find("\"p\""), std::string::npos) << long_pattern;

  const std::string zero(64, '0');
  json hashes = json::array();
  for (size_t i = 0; i < kMaxRuleHashes / 2; ++i) hashes.push_back(zero);
  json two = {{"deny", {{{"id", "h1"}, {"sha256", hashes}}}}, {"allow", {{{"id", "h2"}, {"sha256", hashes}}}}};
  EXPECT_EQ(compile_error(two), "");
  two["allow"][0]["sha256"].push_back(zero);
  EXPECT_NE(compile_error(two).find("more than 100000 sha256 hashes"), std::string::npos);
}

TEST(PolicyRulesTest, CatastrophicBacktrackingReturnsPromptly) {
  // Exponential backtracking on near-misses (each content holds the pattern's required characters,
  // so only backtracking can tell): the match limit turns each into "no match" and the next rule is
  // still tried.
  const auto rules = PolicyRules::compile(json::parse(R"({
    "deny": [{"id": "evil", "pattern": "^(a+)+$"}, {"id": "evil2", "pattern": "(x+x+)+y"},
             {"id": "nested", "pattern": "^((a|aa)*)*b$"}],
    "allow": [{"id": "fallback", "pattern": "a"}]})"));
  const std::vector<std::string> contents = {std::string(5000, 'a') + "!" + std::string(3000, 'x') + "!y",
                                             std::string(40, 'a') + "!b", std::string(30, 'a') + "!"};
  const auto start = std::chrono::steady_clock::now();
  for (const std::string& content : contents) {
    const auto m = rules->match(content);
    ASSERT_TRUE(m);
    EXPECT_EQ(m->rule_id, "fallback");
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 10.0);  // unbounded, each would take longer than the universe has left
}

TEST(PolicyRulesTest, ConcurrentMatchesAgree) {
  const auto rules = PolicyRules::compile(json::parse(R"({
    "deny": [{"id": "D", "pattern": "(?i)\\bspam\\b"}], "allow": [{"id": "A", "pattern": "ham"}]})"));
  const std::vector<std::string> contents = {"SPAM here", "ham and eggs", "nothing", "spammy ham", "spam ham"};
  const auto expect_of = [&](const std::string& c) {
    const auto m = rules->match(c);
    return m ? m->rule_id : std::string();
  };
  std::vector<std::string> expected;
  for (const auto& c : contents) expected.push_back(expect_of(c));
  EXPECT_EQ(expected, (std::vector<std::string>{"D", "A", "", "A", "D"}));
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i)
        if (expect_of(contents[static_cast<size_t>(i) % contents.size()]) != expected[static_cast<size_t>(i) % contents.size()])
          ++mismatches[static_cast<size_t>(t)];
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

// Random JSON values, biased towards the shape of a rules object.
json random_value(std::mt19937& rng, int depth);

std::string random_string(std::mt19937& rng) {
  static const std::string alphabet = "ab()[]{}*+?|\\^$.-_:#!<>=,0123456789 ixPpLu\xc3\xa9\xff";
  static const std::vector<std::string> pieces = {"(?<n>",  "(?i)", "\\d", "\\p{L}", "(*UTF)", "(?R)", "\\C", "[[:alpha:]]",
                                                  "(?=",    "{2,}", "\\",  "(?#",   "\\Q",    "\\E",  "(*LIMIT_MATCH=99999999)",
                                                  "\\x{1}", "\\k<", "(?|", "(*ACCEPT)", "\\g{-1}", "(?C1)"};
  std::string s;
  const int n = static_cast<int>(rng() % 24);
  for (int i = 0; i < n; ++i) {
    if (rng() % 5 == 0)
      s += pieces[rng() % pieces.size()];
    else
      s += alphabet[rng() % alphabet.size()];
  }
  return s;
}

json random_rule(std::mt19937& rng) {
  json r = json::object();
  if (rng() % 8) r["id"] = rng() % 10 ? json("r" + std::to_string(rng() % 12)) : random_value(rng, 1);
  switch (rng() % 6) {
    case 0: r["sha256"] = json::array({std::string(64, "0af"[rng() % 3])}); break;
    case 1: r["sha256"] = random_value(rng, 1); break;
    case 2: r["pattern"] = random_value(rng, 1); break;
    default: r["pattern"] = random_string(rng);
  }
  if (rng() % 4 == 0) r["label"] = rng() % 2 ? json(kLabels[rng() % kLabels.size()]) : random_value(rng, 1);
  if (rng() % 12 == 0) r[random_string(rng)] = 1;
  return r;
}

json random_value(std::mt19937& rng, int depth) {
  switch (rng() % (depth > 2 ? 5 : 7)) {
    case 0: return nullptr;
    case 1: return static_cast<int>(rng() % 3);
    case 2: return random_string(rng);
    case 3: return rng() % 2 == 0;
    case 4: return 0.5;
    case 5: {
      json a = json::array();
      for (unsigned i = rng() % 3; i > 0; --i) a.push_back(random_value(rng, depth + 1));
      return a;
    }
    default: {
      json o = json::object();
      for (unsigned i = rng() % 3; i > 0; --i) o[random_string(rng)] = random_value(rng, depth + 1);
      return o;
    }
  }
}

TEST(PolicyRulesTest, RandomRulesCompileOrThrowInvalidArgument) {
  std::mt19937 rng(20240601);
  int compiled = 0, refused = 0;
  for (int i = 0; i < 3000; ++i) {
    json rules;
    if (rng() % 10 == 0) {
      rules = random_value(rng, 0);
    } else {
      rules = json::object();
      for (const char* list : {"deny", "allow"}) {
        if (rng() % 4 == 0) continue;
        json a = json::array();
        for (unsigned n = rng() % 4; n > 0; --n) a.push_back(rng() % 20 ? random_rule(rng) : random_value(rng, 1));
        rules[list] = a;
      }
    }
    const bool with_labels = rng() % 2 == 0;
    try {
      const auto compiled_rules = PolicyRules::compile(rules, with_labels ? kLabels : std::vector<std::string>{},
                                                       with_labels ? kViolating : std::vector<std::string>{});
      ++compiled;
      // What compiled matches without error and reads back the same.
      compiled_rules->match("aaaa bbb (x) 0123 caf\xc3\xa9 \xff");
      EXPECT_EQ(PolicyRules::compile(compiled_rules->to_json(), with_labels ? kLabels : std::vector<std::string>{},
                                     with_labels ? kViolating : std::vector<std::string>{})
                    ->to_json(),
                compiled_rules->to_json());
    } catch (const std::invalid_argument&) {
      ++refused;
    }
  }
  // Both outcomes were exercised.
  EXPECT_GT(compiled, 100);
  EXPECT_GT(refused, 100);
}

}  // namespace
}  // namespace arbiter
