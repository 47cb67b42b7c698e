#include "api/classify_api.h"

#include <algorithm>

#include "api/json_io.h"

namespace arbiter::api {

namespace {

nlohmann::json integral_json(const google::protobuf::Value& v) {
  switch (v.kind_case()) {
    case google::protobuf::Value::kNumberValue: {
      const double d = v.number_value();
      if (d == static_cast<double>(static_cast<int64_t>(d)) && d > -9.0e15 && d < 9.0e15) return static_cast<int64_t>(d);
      return d;
    }
    case google::protobuf::Value::kStructValue: return struct_json(v.struct_value());
    case google::protobuf::Value::kListValue: {
      nlohmann::json a = nlohmann::json::array();
      for (const auto& e : v.list_value().values()) a.push_back(integral_json(e));
      return a;
    }
    default: return from_value(v);
  }
}

}  // namespace

nlohmann::json struct_json(const google::protobuf::Struct& s) {
  nlohmann::json o = nlohmann::json::object();
  for (const auto& [key, value] : s.fields()) o[key] = integral_json(value);
  return o;
}

std::shared_ptr<const PolicyRules> RulesCache::get(const nlohmann::json& rules, const std::vector<std::string>& labels,
                                                   const std::vector<std::string>& violating_labels) {
  const std::string key = nlohmann::json::array({rules, labels, violating_labels}).dump();
  {
    std::lock_guard lock(mutex_);
    if (const auto it = compiled_.find(key); it != compiled_.end()) return it->second;
  }
  auto compiled = PolicyRules::compile(rules, labels, violating_labels);
  std::lock_guard lock(mutex_);
  if (compiled_.size() >= 256) compiled_.clear();  // many distinct rule sets: start over
  compiled_.emplace(key, compiled);
  return compiled;
}

CascadeConfig policy_cascade(const nlohmann::json& cascade, bool has_rules, bool allow_model, const std::string& param) {
  CascadeConfig base;
  if (has_rules) base.stages.insert(base.stages.begin(), Stage::kRules);
  if (cascade.is_null()) return base;
  CascadeConfig c;
  try {
    c = parse_cascade(cascade, base, allow_model);
  } catch (const std::invalid_argument& e) {
    throw bad_request(std::string("Invalid cascade: ") + e.what() + ".", param, "invalid_cascade");
  }
  if (c.has(Stage::kRules) && !has_rules)
    throw bad_request("The cascade has a \"rules\" stage but the policy has no rules.", param, "invalid_cascade");
  return c;
}

std::shared_ptr<const PolicyRules> policy_rules(const nlohmann::json& rules, const std::vector<std::string>& labels,
                                                const std::vector<std::string>& violating_labels, RulesCache* cache,
                                                const std::string& param) {
  if (rules.is_null()) return nullptr;
  try {
    return cache ? cache->get(rules, labels, violating_labels) : PolicyRules::compile(rules, labels, violating_labels);
  } catch (const std::invalid_argument& e) {
    throw bad_request(std::string("Invalid rules: ") + e.what() + ".", param, "invalid_rules");
  }
}

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
                                  const ClassifyLimits& limits, RulesCache* rules_cache) {
  ResolvedClassify out;
  ClassifyRequest& r = out.request;
  if (body.content().empty()) throw bad_request("'content' must be a non-empty string.", "content", "empty_content");
  if (body.policies().empty()) throw bad_request("'policies' must name at least one policy.", "policies", "no_policies");
  if (body.policies_size() > limits.max_policies)
    throw bad_request("At most " + std::to_string(limits.max_policies) + " policies per request (got " +
                          std::to_string(body.policies_size()) + ").", "policies", "too_many_policies");
  r.content = body.content();
  out.cascade = body.reasoning_effort() == "auto";
  if (const std::string& e = body.reasoning_effort(); !e.empty() && e != "low" && e != "medium" && e != "high" && !out.cascade)
    throw bad_request("Invalid value for 'reasoning_effort': '" + printable(e) +
                          "'; supported values are 'low', 'medium', 'high' and 'auto' (the cascade).",
                      "reasoning_effort", "invalid_value");
  r.effort = out.cascade ? ReasoningEffort::kLow : effort_field(body.reasoning_effort(), limits.default_effort, "reasoning_effort");
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
  if (out.cascade && r.mode == ClassifyMode::kScore)
    throw bad_request("'mode' \"score\" is one stage of the cascade: with 'reasoning_effort' \"auto\" the cascade picks the "
                      "stages (name them in 'cascade.stages').", "mode", "invalid_value");
  if (out.cascade && body.has_max_tokens())
    throw bad_request("'max_tokens' does not apply with 'reasoning_effort' \"auto\": set the reasoning stages' budgets in "
                      "'cascade.budgets'.", "max_tokens", "invalid_value");
  if (!out.cascade && body.has_cascade())
    throw bad_request("'cascade' applies with 'reasoning_effort' \"auto\" only.", "cascade", "invalid_value");
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
    nlohmann::json rules, cascade;  // the policy's own (inline or registered)
    if (!out.cascade && (in.has_rules() || in.has_cascade()))
      throw bad_request("A policy's 'rules' and 'cascade' apply with 'reasoning_effort' \"auto\" only.", param,
                        "invalid_value");
    if (in.has_text()) {
      if (in.text().empty()) throw bad_request("A policy's 'text' must not be empty.", param + ".text", "empty_policy");
      p.id = in.id().empty() ? std::to_string(i) : in.id();
      p.text = in.text();
      p.labels.assign(in.labels().begin(), in.labels().end());
      p.violating_labels.assign(in.violating_labels().begin(), in.violating_labels().end());
      if (in.has_rules()) rules = struct_json(in.rules());
      if (in.has_cascade()) cascade = struct_json(in.cascade());
    } else {
      if (in.has_rules())
        throw bad_request("A registered policy's rules are registered with it; 'rules' is for inline policies.",
                          param + ".rules", "invalid_value");
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
      rules = stored->draft.rules;
      cascade = stored->draft.cascade;
    }
    check_labels(p.labels, p.violating_labels, param);
    if (out.cascade) {
      out.rules.push_back(policy_rules(rules, p.labels, p.violating_labels, rules_cache, param + ".rules"));
      // The policy's cascade (registered models allowed: it was checked when registered), then the
      // overrides: the policy input's (inline: its own cascade), then the request's.
      CascadeConfig config = policy_cascade(in.has_text() ? nlohmann::json() : cascade, !rules.is_null(), true, param);
      try {
        if (in.has_text() && in.has_cascade()) config = parse_cascade(cascade, config, false);
        if (!in.has_text() && in.has_cascade()) config = parse_cascade(struct_json(in.cascade()), config, false);
        if (body.has_cascade()) config = parse_cascade(struct_json(body.cascade()), config, false);
      } catch (const std::invalid_argument& e) {
        throw bad_request(std::string("Invalid cascade: ") + e.what() + ".", param + ".cascade", "invalid_cascade");
      }
      if (config.has(Stage::kRules) && rules.is_null())
        throw bad_request("The cascade has a \"rules\" stage but the policy has no rules.", param + ".cascade", "invalid_cascade");
      out.cascades.push_back(config);
    }
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

void add_cascade_results(const CascadeResult& result, wire::ClassifyResponse& response) {
  for (size_t i = 0; i < result.policies.size() && i < static_cast<size_t>(response.results_size()); ++i) {
    const CascadePolicyResult& p = result.policies[i];
    wire::PolicyResult& w = *response.mutable_results(static_cast<int>(i));
    if (p.decided_by) w.set_decided_by(to_string(*p.decided_by));
    for (const StageOutcome& o : p.stages) {
      wire::StageResult& s = *w.add_stages();
      s.set_stage(to_string(o.stage));
      *s.mutable_verdict() = to_value(o.verdict);
      if (o.confidence) s.mutable_confidence()->set_number_value(*o.confidence);
      else s.mutable_confidence()->set_null_value(google::protobuf::NULL_VALUE);
      s.set_violation(o.violation);
      s.set_reason(printable(o.reason));
      if (is_model_stage(o.stage)) fill_usage(o.usage, *s.mutable_usage());
      s.set_seconds(o.seconds);
      s.set_finish_reason(finish_reason_name(o.finish));
      if (!o.error.empty()) s.set_error(printable(o.error));
    }
  }
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
