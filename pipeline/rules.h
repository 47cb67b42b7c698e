// Per-policy rules that decide without the model: PCRE2 patterns and lists of exact-content SHA-256
// hashes, each rule with an id reported as the reason. Deny rules give a violation, allow rules
// a non-violation; deny rules are tried first. Compiled once per policy version.
#pragma once

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

// The compiled rules of one policy.
class PolicyRules {
 public:
  // Compiles a rules object:
  //   {"deny":  [{"id": "R1", "pattern": "(?i)free\\s+crypto"}, {"id": "H1", "sha256": ["<64 hex>", ...]}],
  //    "allow": [{"id": "A1", "pattern": "^order #\\d+ shipped$", "label": "VALID"}]}
  // `labels` / `violating_labels`: the policy's label set (empty for 0/1 policies); for a label-set
  // policy every rule names its `label`, deny rules a violating one, allow rules a non-violating one.
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
