// Per-policy rules that decide without the model: PCRE2 patterns and lists of exact-content SHA-256
// hashes, each rule with an id reported as the reason. Deny rules give a violation, allow rules
// a non-violation; deny rules are tried first. Compiled once per policy version.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace arbiter {

// A rule that matched.
struct RuleMatch {
  std::string rule_id;
  bool deny = false;
  nlohmann::json verdict;  // 1 / 0, or the rule's label for a label-set policy
  bool violation = false;
};

// Bounds on one policy's rules, checked by compile().
inline constexpr size_t kMaxRules = 256;
inline constexpr size_t kMaxPatternBytes = 4096;
inline constexpr size_t kMaxRuleHashes = 100000;  // over all of a policy's sha256 rules
inline constexpr size_t kMaxRuleIdBytes = 128;
// Backtracking bounds of one pattern match (pcre2_set_match_limit / pcre2_set_depth_limit), so a
// pathological pattern cannot hang a request: a match that reaches them counts as no match.
inline constexpr uint32_t kRuleMatchLimit = 1000000;
inline constexpr uint32_t kRuleDepthLimit = 250000;

// The compiled rules of one policy.
class PolicyRules {
 public:
  // Compiles a rules object (both lists optional; each rule has an `id`, exactly one of `pattern`
  // and `sha256`, and `label` where the policy has labels; no other keys):
  //   {"deny":  [{"id": "R1", "pattern": "(?i)free\\s+crypto"}, {"id": "H1", "sha256": ["<64 hex>", ...]}],
  //    "allow": [{"id": "A1", "pattern": "^order #\\d+ shipped$", "label": "VALID"}]}
  // `labels` / `violating_labels`: the policy's label set (empty for 0/1 policies); for a label-set
  // policy every rule names its `label`, deny rules a violating one, allow rules a non-violating one.
  // Rule ids are 1..128 of letters, digits, `_`, `-`, `.` and unique over both lists. Patterns are
  // PCRE2 in UTF mode (JIT-compiled where available); `sha256` lists the lower- or upper-case hex
  // SHA-256 of whole contents (their bytes, as sent). For a 0/1 policy a deny rule gives verdict 1
  // and an allow rule 0, and `label` is refused.
  // Throws std::invalid_argument with a message naming the rule, and for a bad pattern PCRE2's error
  // text and the offset in the pattern.
  static std::shared_ptr<const PolicyRules> compile(const nlohmann::json& rules, const std::vector<std::string>& labels = {},
                                                    const std::vector<std::string>& violating_labels = {});
  ~PolicyRules();
  // The first deny rule that matches, else the first allow rule; nullopt when none does. Thread-safe.
  std::optional<RuleMatch> match(std::string_view content) const;
  // The canonical rules object (compile reads it back).
  nlohmann::json to_json() const;
  size_t size() const;

 private:
  struct Impl;
  explicit PolicyRules(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace arbiter
