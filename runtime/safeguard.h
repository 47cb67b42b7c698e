// gpt-oss-safeguard classification on top of harmony: policy + content + reasoning effort ->
// prompt ids (one policy, or several in a joint prompt answered by one JSON object keyed by
// policy id); generated ids -> reasoning, final text and a verdict; verdict parsers for the
// formats policies ask for (0/1, a JSON object, a label from a declared set), which report
// malformed or unexpected answers instead of guessing; and a verdict's confidence from the
// token probabilities at the position where its deciding token was sampled.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/harmony.h"
#include "runtime/tokenizer.h"

namespace arbiter {

struct SafeguardPromptOptions {
  ReasoningEffort effort = ReasoningEffort::kMedium;
  std::optional<std::string> current_date;  // omitted by default: stable policy prefixes
  std::string model_identity = SystemOptions{}.model_identity;
  std::string knowledge_cutoff = SystemOptions{}.knowledge_cutoff;
  // The Hugging Face chat template's developer message ends "{policy}\n\n"; the harmony crate
  // and vLLM add nothing (default).
  bool hf_template_newlines = false;
};

SystemOptions safeguard_system_options(const SafeguardPromptOptions& options);

// system + developer("# Instructions\n\n" + policy) + user(content) + "<|start|>assistant".
// The policy and content are encoded in content mode: special-token text in them stays text.
std::vector<int32_t> render_safeguard_prompt(const Tokenizer& tokenizer, std::string_view policy,
                                             std::string_view content, const SafeguardPromptOptions& options = {});

// Several policies in one prompt, answered with one JSON object keyed by policy id.
struct PolicyRef {
  std::string id;    // e.g. "SP"; letters, digits, '_', '-', '.'
  std::string text;  // the policy
};
// The developer instructions of a joint prompt (throws std::invalid_argument for bad/duplicate ids).
std::string joint_policy_instructions(const std::vector<PolicyRef>& policies);
std::vector<int32_t> render_joint_prompt(const Tokenizer& tokenizer, const std::vector<PolicyRef>& policies,
                                         std::string_view content, const SafeguardPromptOptions& options = {});

// What the model generated, split into channels.
struct SafeguardOutput {
  std::string reasoning;   // analysis messages, joined by "\n"
  std::string final_text;  // the final message's content ("" when there is none)
  bool has_final = false;
  bool finished = false;   // ended with <|return|> (or <|call|>/<|endoftext|>)
  std::vector<int32_t> final_tokens;
  int64_t final_first_index = -1;  // index into the generated ids of final_tokens[0]
  std::vector<ParsedMessage> messages;
  std::vector<std::string> errors;  // parser complaints (malformed or cut-off output)
};
// `generated`: the ids sampled after a prompt that ended with <|start|>assistant.
SafeguardOutput parse_safeguard_output(const Tokenizer& tokenizer, std::span<const int32_t> generated);

// ---------------------------------------------------------------------------------------------
// Verdicts.

enum class VerdictStatus {
  kOk,
  kEmpty,            // no final answer at all
  kMalformed,        // not in the requested format (bad JSON, "maybe", missing field, ...)
  kUnexpectedLabel,  // a label outside the declared set
  kMissing,          // joint answer without this policy
};
const char* to_string(VerdictStatus status);

struct Verdict {
  VerdictStatus status = VerdictStatus::kEmpty;
  std::string error;                    // why, when not kOk
  std::optional<int> violation;         // 0 / 1
  std::optional<std::string> label;     // label format: the label
  std::optional<std::string> policy_category;
  std::vector<std::string> rule_ids;
  nlohmann::json confidence;            // as the model wrote it ("high", 0.9) or null
  std::optional<std::string> rationale;
  nlohmann::json extra = nlohmann::json::object();  // fields we do not interpret, kept
  bool ok() const { return status == VerdictStatus::kOk; }
  nlohmann::json to_json() const;
};

struct VerdictFormat {
  enum class Kind { kBinary, kJson, kLabel } kind = Kind::kBinary;
  // kLabel: the declared labels; `violating` (optional) marks which of them count as violation=1.
  std::vector<std::string> labels;
  std::vector<std::string> violating;
};

// Exactly "0" or "1" (surrounding whitespace ignored).
Verdict parse_binary_verdict(std::string_view text);
// One JSON object (optionally in a ```json fence): violation (0/1 or bool) required;
// policy_category (string|null), rule_ids (array of strings), confidence (string|number),
// rationale (string) checked when present; every other field kept in `extra`.
Verdict parse_json_verdict(std::string_view text);
// The whole answer (trimmed) must equal one of `labels`, case-sensitively.
Verdict parse_label_verdict(std::string_view text, const std::vector<std::string>& labels,
                            const std::vector<std::string>& violating = {});
Verdict parse_verdict(std::string_view text, const VerdictFormat& format);

// A joint answer {"<policy id>": verdict, ...}; each value is a JSON verdict object or 0/1.
// Ids not in the answer get kMissing; unknown ids in the answer are reported in *problem.
std::map<std::string, Verdict> parse_joint_verdict(std::string_view text, const std::vector<std::string>& policy_ids,
                                                   std::string* problem = nullptr);

// ---------------------------------------------------------------------------------------------
// Confidence from token probabilities.

struct LabelProbability {
  std::string label;
  int32_t token = -1;  // the label's first token
  double probability = 0;
};

struct Confidence {
  bool ok = false;
  std::string error;
  // P(chosen) / sum over the declared alternatives' first tokens.
  double probability = 0;
  // Probability mass of all alternatives in the whole distribution (1 when the model put all
  // its mass on the declared labels); only meaningful for log-probabilities, not raw logits.
  double coverage = 0;
  // Labels that share their first token cannot be told apart at this position.
  bool ambiguous = false;
  std::vector<LabelProbability> alternatives;
};

// `scores`: log-probabilities or logits over the whole vocabulary at the position where the
// verdict's deciding token was sampled. `chosen` must be one of `labels`.
Confidence label_confidence(const Tokenizer& tokenizer, std::span<const float> scores,
                            const std::vector<std::string>& labels, std::string_view chosen);
// The same from a sparse top-k list of (token, log-probability); absent tokens count as 0.
Confidence label_confidence_top(const Tokenizer& tokenizer, const std::vector<std::pair<int32_t, float>>& top_logprobs,
                                const std::vector<std::string>& labels, std::string_view chosen);

// Index into `final_tokens` of the token where the value of a JSON key starts (the token that
// decides e.g. "violation": 1); `path` walks nested keys in order ({"SP", "violation"} in a joint
// answer). nullopt when not found.
std::optional<size_t> json_value_token(const Tokenizer& tokenizer, std::span<const int32_t> final_tokens,
                                       const std::vector<std::string>& path);

}  // namespace arbiter
