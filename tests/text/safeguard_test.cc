// Safeguard verdicts: the parsers on every format (including malformed JSON and unexpected
// labels, reported and never guessed), randomized inputs, joint multi-policy prompts and answers,
// confidence from token probabilities, and the locating of the deciding token.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "runtime/safeguard.h"
#include "tests/text/text_test_util.h"

namespace arbiter {
namespace {

using text_testing::tokenizer;
using Ids = std::vector<int32_t>;

TEST(Verdict, Binary) {
  for (const char* t : {"1", " 1\n", "\n\n1"}) {
    const Verdict v = parse_binary_verdict(t);
    EXPECT_TRUE(v.ok()) << t;
    EXPECT_EQ(v.violation, 1);
  }
  EXPECT_EQ(parse_binary_verdict("0").violation, 0);
  for (const char* t : {"2", "yes", "10", "1.", "0 or 1", "{\"violation\": 1}", "١"}) {
    const Verdict v = parse_binary_verdict(t);
    EXPECT_EQ(v.status, VerdictStatus::kMalformed) << t;
    EXPECT_FALSE(v.violation) << t;
    EXPECT_FALSE(v.error.empty());
  }
  EXPECT_EQ(parse_binary_verdict("  ").status, VerdictStatus::kEmpty);
}

TEST(Verdict, JsonWithEveryFieldAndExtras) {
  const Verdict v = parse_json_verdict(
      R"({"violation": 1, "policy_category": "H2.f", "rule_ids": ["H2.d", "H2.f"], "confidence": "high",
          "rationale": "Targets a protected group.", "severity": 3, "notes": {"a": [1]}})");
  ASSERT_TRUE(v.ok()) << v.error;
  EXPECT_EQ(v.violation, 1);
  EXPECT_EQ(v.policy_category, "H2.f");
  EXPECT_EQ(v.rule_ids, (std::vector<std::string>{"H2.d", "H2.f"}));
  EXPECT_EQ(v.confidence, "high");
  EXPECT_EQ(v.rationale, "Targets a protected group.");
  EXPECT_EQ(v.extra.at("severity"), 3);
  EXPECT_EQ(v.extra.at("notes").at("a").at(0), 1);
  const auto j = v.to_json();
  EXPECT_EQ(j.at("status"), "ok");
  EXPECT_EQ(j.at("extra").at("severity"), 3);

  const Verdict safe = parse_json_verdict("```json\n{\"violation\": 0, \"policy_category\": null}\n```");
  ASSERT_TRUE(safe.ok()) << safe.error;
  EXPECT_EQ(safe.violation, 0);
  EXPECT_FALSE(safe.policy_category);
  EXPECT_EQ(parse_json_verdict(R"({"violation": true, "confidence": 0.93})").violation, 1);
  EXPECT_EQ(parse_json_verdict(R"({"violation": true, "confidence": 0.93})").confidence, 0.93);
  EXPECT_EQ(parse_json_verdict(R"({"violation": false})").violation, 0);
}

TEST(Verdict, MalformedJsonIsReported) {
  const std::vector<std::string> bad = {
      R"({"violation": 1)",                          // truncated
      R"({"violation": 1,})",                        // trailing comma
      R"({"policy_category": "SP2"})",               // no violation
      R"({"violation": 2})",                         // out of range
      R"({"violation": "1"})",                       // string
      R"({"violation": 0.5})",                       // fraction
      R"({"violation": 1, "rule_ids": "SP2.a"})",    // not an array
      R"({"violation": 1, "rule_ids": [1, 2]})",     // not strings
      R"({"violation": 1, "policy_category": 4})",   // not a string
      R"({"violation": 1, "rationale": ["a"]})",     // not a string
      R"({"violation": 1, "confidence": {"p": 1}})", // not a string or number
      R"([{"violation": 1}])",                       // not an object
      R"(violation: 1)",                             // not JSON
      R"({"violation": 1} and some words)",          // trailing text
      "1",                                           // binary answer to a JSON policy
  };
  for (const auto& t : bad) {
    const Verdict v = parse_json_verdict(t);
    EXPECT_EQ(v.status, VerdictStatus::kMalformed) << t;
    EXPECT_FALSE(v.error.empty()) << t;
    EXPECT_FALSE(v.violation) << t;
  }
  EXPECT_EQ(parse_json_verdict("").status, VerdictStatus::kEmpty);
}

TEST(Verdict, LabelsFromADeclaredSet) {
  const std::vector<std::string> labels = {"VALID", "INVALID", "INVALID + ESCALATE"};
  const std::vector<std::string> violating = {"INVALID", "INVALID + ESCALATE"};
  for (const auto& l : labels) {
    const Verdict v = parse_label_verdict(" " + l + "\n", labels, violating);
    ASSERT_TRUE(v.ok()) << l;
    EXPECT_EQ(v.label, l);
    EXPECT_EQ(v.violation, l == "VALID" ? 0 : 1);
  }
  for (const char* t : {"MAYBE", "valid", "INVALID+ESCALATE", "VALID.", "The answer is VALID"}) {
    const Verdict v = parse_label_verdict(t, labels, violating);
    EXPECT_EQ(v.status, VerdictStatus::kUnexpectedLabel) << t;
    EXPECT_EQ(v.label, std::string(t));  // what the model said, reported as is
    EXPECT_FALSE(v.violation);
  }
  const std::vector<std::string> sp = {"SP0", "SP2", "SP3", "SP4"};
  EXPECT_EQ(parse_verdict("SP4", {VerdictFormat::Kind::kLabel, sp, {"SP2", "SP3", "SP4"}}).violation, 1);
  EXPECT_EQ(parse_verdict("SP0", {VerdictFormat::Kind::kLabel, sp, {"SP2", "SP3", "SP4"}}).violation, 0);
  EXPECT_FALSE(parse_verdict("SP0", {VerdictFormat::Kind::kLabel, sp, {}}).violation);
  EXPECT_EQ(parse_verdict("SP1", {VerdictFormat::Kind::kLabel, sp, {}}).status, VerdictStatus::kUnexpectedLabel);
}

std::string random_text(std::mt19937& rng, size_t max_len) {
  static const std::string alphabet = "01{}[]\":, \n\tabcxyzVALIDINV+-.truefalsenull\\u00e9";
  std::string s;
  const size_t n = rng() % (max_len + 1);
  for (size_t i = 0; i < n; ++i) s += alphabet[rng() % alphabet.size()];
  return s;
}

TEST(Verdict, RandomizedParsersNeverThrowOrGuess) {
  std::mt19937 rng(99);
  const std::vector<std::string> labels = {"VALID", "INVALID"};
  for (int i = 0; i < 20000; ++i) {
    std::string t = random_text(rng, 30);
    if (i % 7 == 0) t += "\xff\xc3";  // invalid UTF-8 too
    const Verdict b = parse_binary_verdict(t);
    const auto trimmed = [&] {
      std::string s = t;
      while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
      while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.erase(s.begin());
      return s;
    }();
    ASSERT_EQ(b.ok(), trimmed == "0" || trimmed == "1") << t;
    const Verdict l = parse_label_verdict(t, labels);
    ASSERT_EQ(l.ok(), trimmed == "VALID" || trimmed == "INVALID") << t;
    const Verdict j = parse_json_verdict(t);
    if (j.ok()) {
      ASSERT_TRUE(j.violation == 0 || j.violation == 1) << t;
    } else {
      ASSERT_FALSE(j.violation);
    }
  }
  // Well-formed random objects round-trip; every single-character deletion either still parses
  // to the same violation or is reported.
  for (int i = 0; i < 2000; ++i) {
    nlohmann::json o;
    const int violation = static_cast<int>(rng() % 2);
    o["violation"] = violation;
    if (rng() % 2) o["policy_category"] = "SP" + std::to_string(rng() % 5);
    if (rng() % 2) o["rule_ids"] = {"SP" + std::to_string(rng() % 5) + ".a"};
    if (rng() % 2) o["confidence"] = rng() % 2 ? nlohmann::json("high") : nlohmann::json(0.5);
    if (rng() % 2) o["rationale"] = random_text(rng, 20);
    if (rng() % 2) o["extra_" + std::to_string(rng() % 100)] = rng() % 1000;
    const std::string text = o.dump(rng() % 2 ? 2 : -1);
    const Verdict v = parse_json_verdict(text);
    ASSERT_TRUE(v.ok()) << text << ": " << v.error;
    ASSERT_EQ(v.violation, violation);
    const size_t cut = rng() % text.size();
    const Verdict m = parse_json_verdict(text.substr(0, cut) + text.substr(cut + 1));
    if (m.ok()) {
      ASSERT_TRUE(m.violation == 0 || m.violation == 1);
    } else {
      ASSERT_FALSE(m.error.empty());
    }
  }
}

TEST(JointPolicies, RenderAndParse) {
  const Tokenizer& tok = tokenizer();
  const std::vector<PolicyRef> policies = {{"SP", "# Spam\nFlag unsolicited promotion."},
                                           {"HS", "# Hate\nFlag attacks on protected groups."}};
  const std::string instructions = joint_policy_instructions(policies);
  EXPECT_NE(instructions.find("# Policy SP\n\n# Spam"), std::string::npos);
  EXPECT_NE(instructions.find("# Policy HS\n\n# Hate"), std::string::npos);
  EXPECT_NE(instructions.find("\"SP\": {\"violation\""), std::string::npos);
  const Ids ids = render_joint_prompt(tok, policies, "Buy cheap pills at x.io", {});
  const std::string text = tok.decode(ids);
  EXPECT_NE(text.find("<|start|>developer<|message|># Instructions\n\n" + instructions + "<|end|>"), std::string::npos);
  EXPECT_THROW(joint_policy_instructions({{"SP", "a"}, {"SP", "b"}}), std::invalid_argument);
  EXPECT_THROW(joint_policy_instructions({{"S P", "a"}}), std::invalid_argument);
  EXPECT_THROW(joint_policy_instructions({}), std::invalid_argument);

  std::string problem;
  auto v = parse_joint_verdict(R"({"SP": {"violation": 1, "policy_category": "SP2.a", "rationale": "ad"}, "HS": 0})",
                               {"SP", "HS"}, &problem);
  EXPECT_TRUE(problem.empty());
  ASSERT_TRUE(v.at("SP").ok());
  EXPECT_EQ(v.at("SP").violation, 1);
  EXPECT_EQ(v.at("SP").policy_category, "SP2.a");
  ASSERT_TRUE(v.at("HS").ok());
  EXPECT_EQ(v.at("HS").violation, 0);

  v = parse_joint_verdict(R"({"SP": {"violation": 1}, "XX": {"violation": 1}})", {"SP", "HS"}, &problem);
  EXPECT_TRUE(v.at("SP").ok());
  EXPECT_EQ(v.at("HS").status, VerdictStatus::kMissing);
  EXPECT_NE(problem.find("XX"), std::string::npos);

  v = parse_joint_verdict(R"({"SP": {"violation": 1}, "HS": {"violation": "no"}})", {"SP", "HS"}, &problem);
  EXPECT_TRUE(v.at("SP").ok());
  EXPECT_EQ(v.at("HS").status, VerdictStatus::kMalformed);

  for (const char* bad : {"", "{\"SP\": ", "[1, 0]", "1"}) {
    v = parse_joint_verdict(bad, {"SP", "HS"}, &problem);
    EXPECT_FALSE(v.at("SP").ok()) << bad;
    EXPECT_FALSE(v.at("HS").ok()) << bad;
    EXPECT_FALSE(problem.empty()) << bad;
  }
}

std::vector<float> scores_with(const Tokenizer& tok, const std::vector<std::pair<int32_t, float>>& set, float rest) {
  std::vector<float> s(static_cast<size_t>(tok.vocab_size()), rest);
  for (const auto& [t, v] : set) s[static_cast<size_t>(t)] = v;
  return s;
}

TEST(Confidence, BinaryFromTheVerdictTokenPosition) {
  const Tokenizer& tok = tokenizer();
  // Logits at the verdict position: "1" (16) = 2, "0" (15) = 0, everything else far below.
  const auto scores = scores_with(tok, {{16, 2.0f}, {15, 0.0f}}, -40.0f);
  const Confidence c = label_confidence(tok, scores, {"0", "1"}, "1");
  ASSERT_TRUE(c.ok) << c.error;
  EXPECT_NEAR(c.probability, std::exp(2.0) / (std::exp(2.0) + 1.0), 1e-9);
  EXPECT_NEAR(c.coverage, 1.0, 1e-6);
  EXPECT_FALSE(c.ambiguous);
  ASSERT_EQ(c.alternatives.size(), 2u);
  EXPECT_EQ(c.alternatives[0].token, 15);
  EXPECT_EQ(c.alternatives[1].token, 16);
  EXPECT_NEAR(c.alternatives[0].probability + c.alternatives[1].probability, 1.0, 1e-12);
  // Log-probabilities give the same answer, and half the mass elsewhere shows in coverage.
  const double l1 = std::log(0.4), l0 = std::log(0.1);
  auto lp = scores_with(tok, {{16, static_cast<float>(l1)}, {15, static_cast<float>(l0)}, {100, std::log(0.5f)}}, -1e30f);
  const Confidence d = label_confidence(tok, lp, {"0", "1"}, "1");
  ASSERT_TRUE(d.ok);
  EXPECT_NEAR(d.probability, 0.8, 1e-6);
  EXPECT_NEAR(d.coverage, 0.5, 1e-6);
  // Sparse top-k logprobs.
  const Confidence e = label_confidence_top(tok, {{16, static_cast<float>(l1)}, {15, static_cast<float>(l0)}}, {"0", "1"}, "0");
  ASSERT_TRUE(e.ok);
  EXPECT_NEAR(e.probability, 0.2, 1e-6);
  EXPECT_NEAR(e.coverage, 0.5, 1e-6);
  EXPECT_FALSE(label_confidence_top(tok, {{100, -0.1f}}, {"0", "1"}, "1").ok);  // no label in the top-k
  EXPECT_FALSE(label_confidence(tok, scores, {"0", "1"}, "2").ok);        // chosen not declared
}

TEST(Confidence, LabelsSharingAFirstTokenAreAmbiguous) {
  const Tokenizer& tok = tokenizer();
  const std::vector<std::string> labels = {"VALID", "INVALID", "INVALID + ESCALATE"};
  const int32_t valid = tok.encode("VALID")[0], invalid = tok.encode("INVALID")[0];
  ASSERT_NE(valid, invalid);
  ASSERT_EQ(tok.encode("INVALID + ESCALATE")[0], invalid);
  const auto scores = scores_with(tok, {{valid, 0.0f}, {invalid, 1.0f}}, -50.0f);
  const Confidence c = label_confidence(tok, scores, labels, "INVALID");
  ASSERT_TRUE(c.ok);
  EXPECT_TRUE(c.ambiguous);
  EXPECT_NEAR(c.probability, std::exp(1.0) / (std::exp(1.0) + 1.0), 1e-9);
  const Confidence v = label_confidence(tok, scores, labels, "VALID");
  EXPECT_NEAR(v.probability, 1.0 / (std::exp(1.0) + 1.0), 1e-9);
}

TEST(Confidence, FindsTheDecidingTokenInJson) {
  const Tokenizer& tok = tokenizer();
  const std::string answer = R"({"violation": 1, "policy_category": "SP4.a", "rationale": "\"violation\": 0 is wrong"})";
  const Ids ids = tok.encode(answer);
  const auto at = json_value_token(tok, ids, {"violation"});
  ASSERT_TRUE(at);
  EXPECT_EQ(ids[*at], 16);  // "1"
  const auto cat = json_value_token(tok, ids, {"policy_category"});
  ASSERT_TRUE(cat);
  EXPECT_NE(tok.token_bytes(ids[*cat])->find('"'), std::string_view::npos);  // the string's opening quote
  const std::string joint = R"({"SP": {"violation": 0}, "HS": {"violation":1}})";
  const Ids jids = tok.encode(joint);
  const auto sp = json_value_token(tok, jids, {"SP", "violation"});
  const auto hs = json_value_token(tok, jids, {"HS", "violation"});
  ASSERT_TRUE(sp && hs);
  EXPECT_EQ(jids[*sp], 15);
  EXPECT_EQ(jids[*hs], 16);
  EXPECT_FALSE(json_value_token(tok, jids, {"XX"}));
  EXPECT_FALSE(json_value_token(tok, tok.encode("{\"violation\""), {"violation"}));
}

TEST(Safeguard, GoldenCompletionEndToEnd) {
  const Tokenizer& tok = tokenizer();
  const auto g = text_testing::golden_harmony();
  const Ids completion = g.at("completion_ids").get<Ids>();
  const SafeguardOutput out = parse_safeguard_output(tok, completion);
  const Verdict v = parse_binary_verdict(out.final_text);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v.violation, 1);
  // Pretend the model's distribution at the verdict position (index 27 of the completion).
  ASSERT_EQ(out.final_first_index, 27);
  const auto scores = scores_with(tok, {{16, 3.0f}, {15, 1.0f}}, -30.0f);
  const Confidence c = label_confidence(tok, scores, {"0", "1"}, out.final_text);
  ASSERT_TRUE(c.ok);
  EXPECT_NEAR(c.probability, 1.0 / (1.0 + std::exp(-2.0)), 1e-9);
}

}  // namespace
}  // namespace arbiter
