#include "runtime/safeguard.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <set>
#include <stdexcept>

namespace arbiter {

SystemOptions safeguard_system_options(const SafeguardPromptOptions& o) {
  SystemOptions s;
  s.model_identity = o.model_identity;
  s.knowledge_cutoff = o.knowledge_cutoff;
  s.current_date = o.current_date;
  s.effort = o.effort;
  return s;
}

namespace {

std::vector<int32_t> render_prompt(const Tokenizer& tokenizer, const std::string& instructions,
                                   std::string_view content, const SafeguardPromptOptions& options) {
  const HarmonyRenderer r(tokenizer);
  std::vector<int32_t> out;
  out.reserve(256 + instructions.size() / 3 + content.size() / 3);
  r.render_system(safeguard_system_options(options), out);
  std::string developer;
  if (!instructions.empty())
    developer = "# Instructions\n\n" + instructions + (options.hf_template_newlines ? "\n\n" : "");
  r.render_message({"developer", "", "", "", developer}, out);
  r.render_message({"user", "", "", "", std::string(content)}, out);
  r.render_generation_prefix(out);
  return out;
}

}  // namespace

std::vector<int32_t> render_safeguard_prompt(const Tokenizer& tokenizer, std::string_view policy,
                                             std::string_view content, const SafeguardPromptOptions& options) {
  return render_prompt(tokenizer, std::string(policy), content, options);
}

std::string joint_policy_instructions(const std::vector<PolicyRef>& policies) {
  if (policies.empty()) throw std::invalid_argument("joint prompt needs at least one policy");
  std::set<std::string> seen;
  for (const auto& p : policies) {
    if (p.id.empty()) throw std::invalid_argument("policy id is empty");
    for (const char c : p.id)
      if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.'))
        throw std::invalid_argument("policy id '" + p.id + "' may only hold letters, digits, '_', '-', '.'");
    if (!seen.insert(p.id).second) throw std::invalid_argument("policy id '" + p.id + "' given twice");
  }
  std::string ids, example;
  for (size_t i = 0; i < policies.size(); ++i) {
    ids += (i ? ", " : "") + policies[i].id;
    example += std::string(i ? ", " : "") + "\"" + policies[i].id +
               "\": {\"violation\": 0 or 1, \"policy_category\": \"<rule id>\" or null, \"rationale\": \"<one sentence>\"}";
  }
  std::string text =
      "Classify the content against each of the " + std::to_string(policies.size()) +
      " policies below (" + ids +
      "). Judge each policy independently, using only its own definitions and rules.\n"
      "Answer with exactly one JSON object keyed by policy id and nothing else:\n{" +
      example + "}";
  for (const auto& p : policies) text += "\n\n# Policy " + p.id + "\n\n" + p.text;
  return text;
}

std::vector<int32_t> render_joint_prompt(const Tokenizer& tokenizer, const std::vector<PolicyRef>& policies,
                                         std::string_view content, const SafeguardPromptOptions& options) {
  return render_prompt(tokenizer, joint_policy_instructions(policies), content, options);
}

SafeguardOutput parse_safeguard_output(const Tokenizer& tokenizer, std::span<const int32_t> generated) {
  HarmonyParser parser(tokenizer, "assistant");
  for (const int32_t t : generated) parser.push(t);
  parser.finish();
  SafeguardOutput out;
  out.finished = parser.stopped();
  out.messages = parser.messages();
  out.errors = parser.errors();
  bool first = true;
  for (const auto& m : out.messages) {
    if (m.channel == "analysis") {
      out.reasoning += (first ? "" : "\n") + m.content;
      first = false;
    } else if (m.channel == "final") {  // the last final message wins
      out.has_final = true;
      out.final_text = m.content;
      out.final_tokens = m.content_tokens;
      out.final_first_index = m.content_tokens.empty() ? -1 : static_cast<int64_t>(m.first_content_index);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

const char* to_string(VerdictStatus status) {
  switch (status) {
    case VerdictStatus::kOk:
      return "ok";
    case VerdictStatus::kEmpty:
      return "empty";
    case VerdictStatus::kMalformed:
      return "malformed";
    case VerdictStatus::kUnexpectedLabel:
      return "unexpected_label";
    case VerdictStatus::kMissing:
      return "missing";
  }
  return "malformed";
}

nlohmann::json Verdict::to_json() const {
  nlohmann::json j;
  j["status"] = to_string(status);
  if (!error.empty()) j["error"] = error;
  j["violation"] = violation ? nlohmann::json(*violation) : nlohmann::json(nullptr);
  if (label) j["label"] = *label;
  if (policy_category) j["policy_category"] = *policy_category;
  if (!rule_ids.empty()) j["rule_ids"] = rule_ids;
  if (!confidence.is_null()) j["confidence"] = confidence;
  if (rationale) j["rationale"] = *rationale;
  if (!extra.empty()) j["extra"] = extra;
  return j;
}

namespace {

std::string_view trim(std::string_view s) {
  auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return s;
}

Verdict failed(VerdictStatus status, std::string why) {
  Verdict v;
  v.status = status;
  v.error = std::move(why);
  return v;
}

std::string excerpt(std::string_view s) {
  std::string e(s.substr(0, 80));
  if (s.size() > 80) e += "...";
  return e;
}

// Removes a surrounding ``` / ```json fence.
std::string_view strip_fence(std::string_view s) {
  s = trim(s);
  if (s.size() >= 6 && s.substr(0, 3) == "```" && s.substr(s.size() - 3) == "```") {
    const size_t eol = s.find('\n');
    if (eol != std::string_view::npos && eol < s.size() - 3) return trim(s.substr(eol + 1, s.size() - 3 - eol - 1));
  }
  return s;
}

Verdict verdict_from_object(const nlohmann::json& j) {
  if (!j.is_object()) return failed(VerdictStatus::kMalformed, "expected a JSON object, got " + std::string(j.type_name()));
  Verdict v;
  v.status = VerdictStatus::kOk;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const auto& val = it.value();
    if (key == "violation") {
      if (val.is_boolean()) {
        v.violation = val.get<bool>() ? 1 : 0;
      } else if (val.is_number_integer() && (val.get<int64_t>() == 0 || val.get<int64_t>() == 1)) {
        v.violation = static_cast<int>(val.get<int64_t>());
      } else {
        return failed(VerdictStatus::kMalformed, "\"violation\" must be 0 or 1, got " + val.dump());
      }
    } else if (key == "policy_category") {
      if (val.is_string())
        v.policy_category = val.get<std::string>();
      else if (!val.is_null())
        return failed(VerdictStatus::kMalformed, "\"policy_category\" must be a string or null, got " + val.dump());
    } else if (key == "rule_ids") {
      if (val.is_array()) {
        for (const auto& r : val) {
          if (!r.is_string()) return failed(VerdictStatus::kMalformed, "\"rule_ids\" must hold strings, got " + r.dump());
          v.rule_ids.push_back(r.get<std::string>());
        }
      } else if (!val.is_null()) {
        return failed(VerdictStatus::kMalformed, "\"rule_ids\" must be an array, got " + val.dump());
      }
    } else if (key == "confidence") {
      if (!(val.is_string() || val.is_number() || val.is_null()))
        return failed(VerdictStatus::kMalformed, "\"confidence\" must be a string or number, got " + val.dump());
      v.confidence = val;
    } else if (key == "rationale") {
      if (val.is_string())
        v.rationale = val.get<std::string>();
      else if (!val.is_null())
        return failed(VerdictStatus::kMalformed, "\"rationale\" must be a string, got " + val.dump());
    } else {
      v.extra[key] = val;
    }
  }
  if (!v.violation) return failed(VerdictStatus::kMalformed, "no \"violation\" field");
  return v;
}

bool parse_json_text(std::string_view text, nlohmann::json* out, std::string* why) {
  try {
    *out = nlohmann::json::parse(text.begin(), text.end());
    return true;
  } catch (const nlohmann::json::exception& e) {
    *why = std::string("not valid JSON: ") + e.what();
    return false;
  }
}

}  // namespace

Verdict parse_binary_verdict(std::string_view text) {
  const std::string_view t = trim(text);
  if (t.empty()) return failed(VerdictStatus::kEmpty, "empty answer");
  if (t == "0" || t == "1") {
    Verdict v;
    v.status = VerdictStatus::kOk;
    v.violation = t == "1" ? 1 : 0;
    v.label = std::string(t);
    return v;
  }
  return failed(VerdictStatus::kMalformed, "expected 0 or 1, got '" + excerpt(t) + "'");
}

Verdict parse_json_verdict(std::string_view text) {
  const std::string_view t = strip_fence(text);
  if (t.empty()) return failed(VerdictStatus::kEmpty, "empty answer");
  nlohmann::json j;
  std::string why;
  if (!parse_json_text(t, &j, &why)) return failed(VerdictStatus::kMalformed, why);
  return verdict_from_object(j);
}

Verdict parse_label_verdict(std::string_view text, const std::vector<std::string>& labels,
                            const std::vector<std::string>& violating) {
  const std::string_view t = trim(text);
  if (t.empty()) return failed(VerdictStatus::kEmpty, "empty answer");
  for (const auto& label : labels) {
    if (t != label) continue;
    Verdict v;
    v.status = VerdictStatus::kOk;
    v.label = label;
    if (!violating.empty())
      v.violation = std::find(violating.begin(), violating.end(), label) != violating.end() ? 1 : 0;
    return v;
  }
  std::string declared;
  for (const auto& l : labels) declared += (declared.empty() ? "" : ", ") + l;
  Verdict v = failed(VerdictStatus::kUnexpectedLabel, "'" + excerpt(t) + "' is not one of: " + declared);
  v.label = std::string(t);
  return v;
}

Verdict parse_verdict(std::string_view text, const VerdictFormat& format) {
  switch (format.kind) {
    case VerdictFormat::Kind::kBinary:
      return parse_binary_verdict(text);
    case VerdictFormat::Kind::kJson:
      return parse_json_verdict(text);
    case VerdictFormat::Kind::kLabel:
      return parse_label_verdict(text, format.labels, format.violating);
  }
  return failed(VerdictStatus::kMalformed, "unknown verdict format");
}

std::map<std::string, Verdict> parse_joint_verdict(std::string_view text, const std::vector<std::string>& policy_ids,
                                                   std::string* problem) {
  std::map<std::string, Verdict> out;
  std::string why;
  const std::string_view t = strip_fence(text);
  nlohmann::json j;
  std::optional<Verdict> whole;  // set when the answer as a whole is unusable
  if (t.empty()) {
    whole = failed(VerdictStatus::kEmpty, "empty answer");
  } else if (!parse_json_text(t, &j, &why)) {
    whole = failed(VerdictStatus::kMalformed, why);
  } else if (!j.is_object()) {
    whole = failed(VerdictStatus::kMalformed, "expected a JSON object keyed by policy id");
  }
  if (whole) {
    for (const auto& id : policy_ids) out[id] = *whole;
    if (problem) *problem = whole->error;
    return out;
  }
  for (const auto& id : policy_ids) {
    const auto it = j.find(id);
    if (it == j.end()) {
      out[id] = failed(VerdictStatus::kMissing, "no answer for policy " + id);
    } else if (it->is_number_integer() || it->is_boolean()) {
      out[id] = verdict_from_object(nlohmann::json{{"violation", *it}});
    } else {
      out[id] = verdict_from_object(*it);
    }
  }
  std::string unknown;
  for (auto it = j.begin(); it != j.end(); ++it)
    if (std::find(policy_ids.begin(), policy_ids.end(), it.key()) == policy_ids.end())
      unknown += (unknown.empty() ? "" : ", ") + it.key();
  if (problem) *problem = unknown.empty() ? "" : "answer has unknown policy ids: " + unknown;
  return out;
}

// ---------------------------------------------------------------------------------------------

namespace {

// Fills alternatives (first token per label) and checks `chosen`; returns its index or an error.
bool label_tokens(const Tokenizer& tokenizer, const std::vector<std::string>& labels, std::string_view chosen,
                  Confidence& c, size_t* chosen_index) {
  *chosen_index = labels.size();
  for (size_t i = 0; i < labels.size(); ++i) {
    const auto ids = tokenizer.encode(labels[i]);
    if (ids.empty()) {
      c.error = "empty label";
      return false;
    }
    c.alternatives.push_back({labels[i], ids[0], 0});
    if (labels[i] == chosen) *chosen_index = i;
  }
  if (*chosen_index == labels.size()) {
    c.error = "'" + std::string(chosen) + "' is not one of the labels";
    return false;
  }
  for (size_t i = 0; i < labels.size(); ++i)
    if (i != *chosen_index && c.alternatives[i].token == c.alternatives[*chosen_index].token) c.ambiguous = true;
  return true;
}

// From per-token log scores (absent = -inf) and, when known, the log normalizer of the whole
// distribution.
void finish_confidence(Confidence& c, size_t chosen, const std::vector<double>& score, double log_total) {
  double max = -std::numeric_limits<double>::infinity();
  for (const double s : score) max = std::max(max, s);
  if (!std::isfinite(max)) {
    c.error = "no probability for any of the labels";
    return;
  }
  std::set<int32_t> counted;
  double sum = 0, mass = 0;
  for (size_t i = 0; i < score.size(); ++i) {
    if (!counted.insert(c.alternatives[i].token).second) continue;
    sum += std::exp(score[i] - max);
    mass += std::exp(score[i] - log_total);
  }
  for (size_t i = 0; i < score.size(); ++i) c.alternatives[i].probability = std::exp(score[i] - max) / sum;
  c.probability = c.alternatives[chosen].probability;
  c.coverage = std::min(1.0, mass);
  c.ok = true;
}

}  // namespace

Confidence label_confidence(const Tokenizer& tokenizer, std::span<const float> scores,
                            const std::vector<std::string>& labels, std::string_view chosen) {
  Confidence c;
  size_t chosen_index;
  if (!label_tokens(tokenizer, labels, chosen, c, &chosen_index)) return c;
  std::vector<double> score;
  for (const auto& a : c.alternatives) {
    if (a.token < 0 || static_cast<size_t>(a.token) >= scores.size()) {
      c.error = "scores have no entry for token " + std::to_string(a.token);
      return c;
    }
    score.push_back(scores[a.token]);
  }
  double max = -std::numeric_limits<double>::infinity();
  for (const float s : scores) max = std::max(max, static_cast<double>(s));
  double total = 0;
  for (const float s : scores) total += std::exp(static_cast<double>(s) - max);
  finish_confidence(c, chosen_index, score, max + std::log(total));
  return c;
}

Confidence label_confidence_top(const Tokenizer& tokenizer, const std::vector<std::pair<int32_t, float>>& top_logprobs,
                                const std::vector<std::string>& labels, std::string_view chosen) {
  Confidence c;
  size_t chosen_index;
  if (!label_tokens(tokenizer, labels, chosen, c, &chosen_index)) return c;
  std::vector<double> score;
  for (const auto& a : c.alternatives) {
    double s = -std::numeric_limits<double>::infinity();
    for (const auto& [tok, lp] : top_logprobs)
      if (tok == a.token) s = lp;
    score.push_back(s);
  }
  finish_confidence(c, chosen_index, score, 0.0);
  return c;
}

std::optional<size_t> json_value_token(const Tokenizer& tokenizer, std::span<const int32_t> final_tokens,
                                       const std::vector<std::string>& path) {
  std::string text;
  std::vector<size_t> start;  // byte offset of each token
  for (const int32_t t : final_tokens) {
    start.push_back(text.size());
    const auto bytes = tokenizer.token_bytes(t);
    if (!bytes) return std::nullopt;
    text.append(*bytes);
  }
  size_t pos = 0;
  for (const auto& key : path) {
    const std::string quoted = "\"" + key + "\"";
    for (;;) {
      const size_t at = text.find(quoted, pos);
      if (at == std::string::npos) return std::nullopt;
      size_t p = at + quoted.size();
      while (p < text.size() && (text[p] == ' ' || text[p] == '\t' || text[p] == '\n' || text[p] == '\r')) ++p;
      pos = p + 1;
      if (p < text.size() && text[p] == ':') break;  // a key, not a string value
    }
  }
  while (pos < text.size() && (text[pos] == ' ' || text[pos] == '\t' || text[pos] == '\n' || text[pos] == '\r')) ++pos;
  if (pos >= text.size()) return std::nullopt;
  const auto it = std::upper_bound(start.begin(), start.end(), pos);
  return static_cast<size_t>(it - start.begin()) - 1;
}

}  // namespace arbiter
