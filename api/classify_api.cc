#include "api/classify_api.h"

#include <algorithm>

#include "api/json_io.h"

namespace arbiter::api {

ReasoningEffort effort_field(const std::string& text, ReasoningEffort fallback, const std::string& param) {
  if (text.empty()) return fallback;
  if (text == "low") return ReasoningEffort::kLow;
  if (text == "medium") return ReasoningEffort::kMedium;
  if (text == "high") return ReasoningEffort::kHigh;
  throw bad_request("Invalid value for '" + param + "': '" + printable(text) + "'; supported values are 'low', 'medium' and 'high'.",
                    param, "invalid_value");
}

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kDeadline: return "timeout";
    case FinishReason::kError: return "error";
  }
  return "error";
}

namespace {

void check_labels(const std::vector<std::string>& labels, const std::vector<std::string>& violating, const std::string& param) {
  for (size_t i = 0; i < labels.size(); ++i)
    if (labels[i].empty())
      throw bad_request("Labels must not be empty.", param + ".labels[" + std::to_string(i) + "]", "invalid_value");
  for (size_t i = 0; i < violating.size(); ++i)
    if (std::find(labels.begin(), labels.end(), violating[i]) == labels.end())
      throw bad_request("Violating label '" + violating[i] + "' is not one of the policy's labels.",
                        param + ".violating_labels[" + std::to_string(i) + "]", "invalid_value");
}

// PolicyInput.answer_format; "labels" needs labels.
AnswerFormat answer_format_field(const std::string& text, const std::vector<std::string>& labels, const std::string& param) {
  AnswerFormat format;
  if (text.empty() || text == "auto") format = AnswerFormat::kAuto;
  else if (text == "binary") format = AnswerFormat::kBinary;
  else if (text == "labels") format = AnswerFormat::kLabels;
  else if (text == "json") format = AnswerFormat::kJson;
  else throw bad_request("Invalid value for '" + param + "': '" + printable(text) +
                             "'; supported values are 'auto', 'binary', 'labels' and 'json'.", param, "invalid_value");
  if (format == AnswerFormat::kLabels && labels.empty())
    throw bad_request("The 'labels' answer format needs the policy's labels.", param, "invalid_value");
  return format;
}

}  // namespace

ResolvedClassify resolve_classify(const wire::ClassifyRequest& body, const PolicyRegistry& registry,
                                  const ClassifyLimits& limits) {
  ResolvedClassify out;
  ClassifyRequest& r = out.request;
  if (body.content().empty()) throw bad_request("'content' must be a non-empty string.", "content", "empty_content");
  if (body.policies().empty()) throw bad_request("'policies' must name at least one policy.", "policies", "no_policies");
  if (body.policies_size() > limits.max_policies)
    throw bad_request("At most " + std::to_string(limits.max_policies) + " policies per request (got " +
                          std::to_string(body.policies_size()) + ").", "policies", "too_many_policies");
  r.content = body.content();
  r.effort = effort_field(body.reasoning_effort(), limits.default_effort, "reasoning_effort");
  r.return_reasoning = !body.has_return_reasoning() || body.return_reasoning();
  r.constrain = !body.has_constrain() || body.constrain();
  if (body.mode().empty() || body.mode() == "reason") r.mode = ClassifyMode::kReason;
  else if (body.mode() == "score") r.mode = ClassifyMode::kScore;
  else throw bad_request("Invalid value for 'mode': '" + printable(body.mode()) + "'; supported values are 'reason' and 'score'.",
                         "mode", "invalid_value");
  if (body.score_prefix().empty() || body.score_prefix() == "empty_analysis") r.score_prefix = ScorePrefix::kEmptyAnalysis;
  else if (body.score_prefix() == "direct") r.score_prefix = ScorePrefix::kDirect;
  else throw bad_request("Invalid value for 'score_prefix': '" + printable(body.score_prefix()) +
                             "'; supported values are 'empty_analysis' and 'direct'.", "score_prefix", "invalid_value");
  if (body.has_max_tokens()) {
    if (body.max_tokens() < 1) throw bad_request("'max_tokens' must be at least 1.", "max_tokens", "invalid_value");
    if (limits.max_context > 0 && body.max_tokens() >= limits.max_context)
      throw bad_request("'max_tokens' (" + std::to_string(body.max_tokens()) + ") must be below the context length (" +
                            std::to_string(limits.max_context) + ").", "max_tokens", "invalid_value");
    r.max_tokens = body.max_tokens();
  }
  if (body.has_timeout()) {
    if (!(body.timeout() > 0)) throw bad_request("'timeout' must be a positive number of seconds.", "timeout", "invalid_value");
    out.timeout = body.timeout();
  }
  std::vector<std::string> seen_ids;
  for (int i = 0; i < body.policies_size(); ++i) {
    const wire::PolicyInput& in = body.policies(i);
    const std::string param = "policies[" + std::to_string(i) + "]";
    ClassifyPolicy p;
    std::optional<int> version;
    if (in.has_text()) {
      if (in.text().empty()) throw bad_request("A policy's 'text' must not be empty.", param + ".text", "empty_policy");
      p.id = in.id().empty() ? std::to_string(i) : in.id();
      p.text = in.text();
      p.labels.assign(in.labels().begin(), in.labels().end());
      p.violating_labels.assign(in.violating_labels().begin(), in.violating_labels().end());
    } else {
      if (in.id().empty())
        throw bad_request("A policy needs either 'text' or the 'id' of a registered policy.", param, "missing_policy");
      const auto ref = PolicyRegistry::parse_ref(in.id());
      if (!ref) throw bad_request("Malformed policy reference '" + printable(in.id()) + "' (expected 'id' or 'id@version').",
                                  param + ".id", "invalid_value");
      const auto stored = registry.get(*ref);
      if (!stored)
        throw ApiException({404, "No policy '" + printable(in.id()) + "' is registered.", "not_found_error", param + ".id",
                            "policy_not_found", 0});
      p.id = in.id();
      p.text = stored->draft.text;
      p.labels = stored->draft.labels;
      p.violating_labels = stored->draft.violating_labels;
      if (!in.labels().empty()) p.labels.assign(in.labels().begin(), in.labels().end());
      if (!in.violating_labels().empty()) p.violating_labels.assign(in.violating_labels().begin(), in.violating_labels().end());
      version = stored->version;
    }
    check_labels(p.labels, p.violating_labels, param);
    p.format = answer_format_field(in.answer_format(), p.labels, param + ".answer_format");
    if (std::find(seen_ids.begin(), seen_ids.end(), p.id) != seen_ids.end())
      throw bad_request("Policy id '" + printable(p.id) + "' appears twice in the request.", param + ".id", "duplicate_policy");
    seen_ids.push_back(p.id);
    // Score mode weighs every label at one position at most: a bounded number of them.
    if (r.mode == ClassifyMode::kScore && p.labels.size() > static_cast<size_t>(kMaxCandidateTokens))
      throw bad_request("Score mode weighs at most " + std::to_string(kMaxCandidateTokens) + " labels per policy (got " +
                            std::to_string(p.labels.size()) + ").", param + ".labels", "invalid_value");
    r.policies.push_back(std::move(p));
    out.versions.push_back(version);
  }
  return out;
}

namespace {

void fill_usage(const ClassifyUsage& u, wire::ClassifyUsage& out) {
  out.set_prompt_tokens(u.prompt_tokens);
  out.set_cached_tokens(u.cached_tokens);
  out.set_reasoning_tokens(u.reasoning_tokens);
  out.set_completion_tokens(u.completion_tokens);
  out.set_forced_tokens(u.forced_tokens);
  out.set_total_tokens(u.prompt_tokens + u.forced_tokens + u.completion_tokens);
}

}  // namespace

wire::PolicyResult policy_result_wire(const PolicyResult& pr, const ResolvedClassify& request, size_t index) {
  wire::PolicyResult w;
  w.set_policy_id(pr.policy_id);
  if (index < request.versions.size() && request.versions[index]) w.set_policy_version(*request.versions[index]);
  *w.mutable_verdict() = to_value(pr.verdict);
  if (pr.confidence) w.mutable_confidence()->set_number_value(*pr.confidence);
  else w.mutable_confidence()->set_null_value(google::protobuf::NULL_VALUE);
  w.set_final(printable(pr.final_text));
  if (request.request.return_reasoning) w.set_reasoning(printable(pr.reasoning));
  if (pr.verdict_details.is_object() && !pr.verdict_details.empty()) *w.mutable_details() = to_struct(pr.verdict_details);
  if (!pr.verdict_error.empty()) w.set_verdict_error(printable(pr.verdict_error));
  w.set_violation(pr.violation());
  w.set_finish_reason(finish_reason_name(pr.finish));
  w.set_reasoning_truncated(pr.reasoning_truncated);
  for (const auto& [answer, p] : pr.scores) (*w.mutable_scores())[printable(answer)] = p;
  fill_usage(pr.usage, *w.mutable_usage());
  return w;
}

wire::ClassifyResponse classify_response(const ClassifyResult& result, const ResolvedClassify& request,
                                         const std::string& model, uint32_t created) {
  wire::ClassifyResponse out;
  out.set_id(result.id);
  out.set_object("classification");
  out.set_created(created);
  out.set_model(model);
  for (size_t i = 0; i < result.results.size(); ++i) *out.add_results() = policy_result_wire(result.results[i], request, i);
  out.set_flagged(result.flagged);
  fill_usage(result.usage, *out.mutable_usage());
  return out;
}

}  // namespace arbiter::api
