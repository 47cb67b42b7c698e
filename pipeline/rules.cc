// PolicyRules: PCRE2 (8-bit, UTF) patterns and exact-content SHA-256 lists compiled once per policy
// version and matched without locks (each match() call has its own match data).
#define PCRE2_CODE_UNIT_WIDTH 8
#include "pipeline/rules.h"

#include <pcre2.h>

#include <algorithm>
#include <set>
#include <stdexcept>
#include <unordered_set>

#include "pipeline/sha256.h"

namespace arbiter {

namespace {

struct CodeDeleter {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct MatchContextDeleter {
  void operator()(pcre2_match_context* context) const { pcre2_match_context_free(context); }
};
struct CompileContextDeleter {
  void operator()(pcre2_compile_context* context) const { pcre2_compile_context_free(context); }
};
struct MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};
using CodePtr = std::unique_ptr<pcre2_code, CodeDeleter>;
using MatchDataPtr = std::unique_ptr<pcre2_match_data, MatchDataDeleter>;

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  const int n = pcre2_get_error_message(code, buffer, sizeof(buffer));
  if (n < 0) return "PCRE2 error " + std::to_string(code);
  return std::string(reinterpret_cast<const char*>(buffer), static_cast<size_t>(n));
}

bool valid_rule_id(const std::string& id) {
  if (id.empty() || id.size() > kMaxRuleIdBytes) return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.';
  });
}

// 64 hex digits, returned lower-case; nullopt otherwise.
std::optional<std::string> normalized_sha256(const std::string& s) {
  if (s.size() != 64) return std::nullopt;
  std::string out = s;
  for (char& c : out) {
    if (c >= 'A' && c <= 'F') c = static_cast<char>(c - 'A' + 'a');
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return std::nullopt;
  }
  return out;
}

// A JSON value for messages, shortened so a huge value cannot flood them.
std::string shown(const nlohmann::json& v) {
  std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

// One compiled rule.
struct CompiledRule {
  std::string id;
  bool deny = false;
  std::string pattern;  // empty for a hash rule
  CodePtr code;
  std::vector<std::string> hashes;  // as compile() read them, lower-case
  std::unordered_set<std::string> hash_set;
  std::optional<std::string> label;
  nlohmann::json verdict;
};

}  // namespace

struct PolicyRules::Impl {
  std::vector<CompiledRule> rules;  // deny rules first, then allow rules, each list in its given order
  std::unique_ptr<pcre2_match_context, MatchContextDeleter> match_context;
  bool has_hashes = false;
};

PolicyRules::PolicyRules(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PolicyRules::~PolicyRules() = default;

std::shared_ptr<const PolicyRules> PolicyRules::compile(const nlohmann::json& rules, const std::vector<std::string>& labels,
                                                        const std::vector<std::string>& violating_labels) {
  if (!rules.is_object()) throw std::invalid_argument("rules must be an object with \"deny\" and/or \"allow\" lists");
  for (const auto& [key, value] : rules.items())
    if (key != "deny" && key != "allow")
      throw std::invalid_argument("rules: unknown key " + shown(key) + " (expected \"deny\" and \"allow\")");

  const bool label_set = !labels.empty();
  const std::set<std::string> known_labels(labels.begin(), labels.end());
  const std::set<std::string> violating(violating_labels.begin(), violating_labels.end());

  auto impl = std::make_unique<Impl>();
  impl->match_context.reset(pcre2_match_context_create(nullptr));
  if (!impl->match_context) throw std::bad_alloc();
  pcre2_set_match_limit(impl->match_context.get(), kRuleMatchLimit);
  pcre2_set_depth_limit(impl->match_context.get(), kRuleDepthLimit);
  const std::unique_ptr<pcre2_compile_context, CompileContextDeleter> compile_context(pcre2_compile_context_create(nullptr));
  if (!compile_context) throw std::bad_alloc();
  pcre2_set_max_pattern_length(compile_context.get(), kMaxPatternBytes);

  std::set<std::string> ids;
  size_t total_hashes = 0;
  for (const char* list : {"deny", "allow"}) {
    const auto it = rules.find(list);
    if (it == rules.end() || it->is_null()) continue;
    if (!it->is_array()) throw std::invalid_argument(std::string("rules: \"") + list + "\" must be a list of rules");
    const bool deny = std::string(list) == "deny";
    for (size_t i = 0; i < it->size(); ++i) {
      const nlohmann::json& r = (*it)[i];
      std::string where = std::string("rules: ") + list + "[" + std::to_string(i) + "]";
      if (impl->rules.size() >= kMaxRules)
        throw std::invalid_argument("rules: more than " + std::to_string(kMaxRules) + " rules");
      if (!r.is_object()) throw std::invalid_argument(where + " must be an object with \"id\" and \"pattern\" or \"sha256\"");
      const auto id = r.find("id");
      if (id == r.end()) throw std::invalid_argument(where + " has no \"id\"");
      if (!id->is_string() || !valid_rule_id(id->get<std::string>()))
        throw std::invalid_argument(where + ": \"id\" must be 1 to " + std::to_string(kMaxRuleIdBytes) +
                                    " letters, digits, '_', '-' or '.', got " + shown(*id));
      CompiledRule rule;
      rule.id = id->get<std::string>();
      rule.deny = deny;
      where = "rule \"" + rule.id + "\" (" + where.substr(7) + ")";
      if (!ids.insert(rule.id).second) throw std::invalid_argument(where + ": duplicate id");
      for (const auto& [key, value] : r.items())
        if (key != "id" && key != "pattern" && key != "sha256" && key != "label")
          throw std::invalid_argument(where + ": unknown key " + shown(key) + " (expected id, pattern, sha256, label)");

      const auto pattern = r.find("pattern");
      const auto sha = r.find("sha256");
      if ((pattern == r.end()) == (sha == r.end()))
        throw std::invalid_argument(where + ": needs exactly one of \"pattern\" and \"sha256\"");
      if (pattern != r.end()) {
        if (!pattern->is_string()) throw std::invalid_argument(where + ": \"pattern\" must be a string");
        rule.pattern = pattern->get<std::string>();
        if (rule.pattern.empty()) throw std::invalid_argument(where + ": \"pattern\" is empty");
        if (rule.pattern.size() > kMaxPatternBytes)
          throw std::invalid_argument(where + ": \"pattern\" is longer than " + std::to_string(kMaxPatternBytes) + " bytes");
        int error = 0;
        PCRE2_SIZE offset = 0;
        // UTF mode; \C (one code unit) is refused since it can split a character in UTF mode.
        // MATCH_INVALID_UTF: contents are matched as given, invalid UTF-8 simply cannot match.
        rule.code.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(rule.pattern.data()), rule.pattern.size(),
                                      PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | PCRE2_NEVER_BACKSLASH_C, &error, &offset,
                                      compile_context.get()));
        if (!rule.code)
          throw std::invalid_argument(where + ": bad pattern: " + pcre2_message(error) + " at offset " + std::to_string(offset));
        // JIT is an optimisation: without it (unsupported platform, out of executable memory)
        // the interpreter matches the same way.
        pcre2_jit_compile(rule.code.get(), PCRE2_JIT_COMPLETE);
      } else {
        if (!sha->is_array() || sha->empty())
          throw std::invalid_argument(where + ": \"sha256\" must be a non-empty list of 64-hex-digit hashes");
        total_hashes += sha->size();
        if (total_hashes > kMaxRuleHashes)
          throw std::invalid_argument(where + ": more than " + std::to_string(kMaxRuleHashes) + " sha256 hashes in all");
        for (size_t h = 0; h < sha->size(); ++h) {
          const auto& v = (*sha)[h];
          const auto hex = v.is_string() ? normalized_sha256(v.get<std::string>()) : std::nullopt;
          if (!hex)
            throw std::invalid_argument(where + ": sha256[" + std::to_string(h) + "] is not 64 hex digits: " + shown(v));
          rule.hashes.push_back(*hex);
          rule.hash_set.insert(*hex);
        }
        impl->has_hashes = true;
      }

      const auto label = r.find("label");
      if (!label_set) {
        if (label != r.end())
          throw std::invalid_argument(where + ": \"label\" is only for policies with labels (this one answers 0/1)");
        rule.verdict = deny ? 1 : 0;
      } else {
        if (label == r.end())
          throw std::invalid_argument(where + ": needs a \"label\" (the policy answers with labels)");
        if (!label->is_string() || !known_labels.count(label->get<std::string>()))
          throw std::invalid_argument(where + ": \"label\" " + shown(*label) + " is not one of the policy's labels");
        const std::string name = label->get<std::string>();
        if (deny && !violating.count(name))
          throw std::invalid_argument(where + ": a deny rule needs a violating label, \"" + name + "\" is not one");
        if (!deny && violating.count(name))
          throw std::invalid_argument(where + ": an allow rule needs a non-violating label, \"" + name + "\" is violating");
        rule.label = name;
        rule.verdict = name;
      }
      impl->rules.push_back(std::move(rule));
    }
  }
  return std::shared_ptr<const PolicyRules>(new PolicyRules(std::move(impl)));
}

std::optional<RuleMatch> PolicyRules::match(std::string_view content) const {
  // One ovector pair is enough: only whether a pattern matches counts, not where.
  MatchDataPtr data;
  std::optional<std::string> hash;
  for (const CompiledRule& rule : impl_->rules) {
    bool hit = false;
    if (rule.code) {
      if (!data) {
        data.reset(pcre2_match_data_create(1, nullptr));
        if (!data) throw std::bad_alloc();
      }
      int rc = pcre2_match(rule.code.get(), reinterpret_cast<PCRE2_SPTR>(content.data()), content.size(), 0, 0, data.get(),
                           impl_->match_context.get());
      // The JIT's own stack is small; the interpreter (bounded by the same limits) decides then.
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
        rc = pcre2_match(rule.code.get(), reinterpret_cast<PCRE2_SPTR>(content.data()), content.size(), 0, PCRE2_NO_JIT,
                         data.get(), impl_->match_context.get());
      // rc 0: matched, with more captures than the ovector holds. Negative: no match, or a limit
      // (match, depth, heap) reached, which counts as no match.
      hit = rc >= 0;
    } else {
      if (!hash) hash = sha256_hex(content);
      hit = rule.hash_set.count(*hash) != 0;
    }
    if (hit) return RuleMatch{rule.id, rule.deny, rule.verdict, rule.deny};
  }
  return std::nullopt;
}

nlohmann::json PolicyRules::to_json() const {
  nlohmann::json out = {{"deny", nlohmann::json::array()}, {"allow", nlohmann::json::array()}};
  for (const CompiledRule& rule : impl_->rules) {
    nlohmann::json r = {{"id", rule.id}};
    if (rule.code)
      r["pattern"] = rule.pattern;
    else
      r["sha256"] = rule.hashes;
    if (rule.label) r["label"] = *rule.label;
    out[rule.deny ? "deny" : "allow"].push_back(std::move(r));
  }
  return out;
}

size_t PolicyRules::size() const { return impl_->rules.size(); }

}  // namespace arbiter
