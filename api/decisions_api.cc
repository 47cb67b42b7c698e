#include "api/decisions_api.h"

#include <cmath>
#include <cstdio>
#include <ctime>
#include <map>

#include "api/json_io.h"
#include "api/percent_decode.h"
#include "pipeline/sha256.h"

namespace arbiter::api {
namespace {

std::optional<bool> parse_bool(const std::string& v) {
  if (v == "true") return true;
  if (v == "false") return false;
  return std::nullopt;
}

}  // namespace

std::optional<std::string> verdict_key(const nlohmann::json& verdict) {
  if (verdict.is_null()) return std::nullopt;
  if (verdict.is_string()) return verdict.get<std::string>();
  if (verdict.is_number_float()) {
    const double d = verdict.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 1e15) return std::to_string(static_cast<long long>(d));
  }
  return verdict.dump();
}

std::optional<int64_t> parse_time_ms(const std::string& text) {
  if (text.empty() || text.size() > 40) return std::nullopt;
  // Unix seconds, with an optional fraction.
  if (text.find_first_not_of("0123456789.") == std::string::npos) {
    if (text.front() == '.' || text.back() == '.' || text.find('.') != text.rfind('.') || text.size() > 20) return std::nullopt;
    const double seconds = std::stod(text);
    if (seconds > 253402300799.0) return std::nullopt;  // year 9999
    return static_cast<int64_t>(std::llround(seconds * 1000.0));
  }
  // RFC 3339: YYYY-MM-DDTHH:MM:SS[.fff][Z|+HH:MM|-HH:MM]
  int year, month, day, hour, minute, second, used = 0;
  if (std::sscanf(text.c_str(), "%4d-%2d-%2d%*1[Tt ]%2d:%2d:%2d%n", &year, &month, &day, &hour, &minute, &second, &used) != 6 ||
      used != 19)
    return std::nullopt;
  if (month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || second > 60) return std::nullopt;
  size_t i = static_cast<size_t>(used);
  int64_t millis = 0;
  if (i < text.size() && text[i] == '.') {
    ++i;
    const size_t start = i;
    int64_t scale = 100;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
      millis += scale * (text[i] - '0');
      scale /= 10;
      ++i;
    }
    if (i == start) return std::nullopt;
  }
  int64_t offset_s = 0;
  if (i < text.size() && (text[i] == 'Z' || text[i] == 'z')) ++i;
  else if (i < text.size() && (text[i] == '+' || text[i] == '-')) {
    int oh, om, n = 0;
    if (std::sscanf(text.c_str() + i + 1, "%2d:%2d%n", &oh, &om, &n) != 2 || n != 5 || oh > 23 || om > 59) return std::nullopt;
    offset_s = (text[i] == '+' ? 1 : -1) * (oh * 3600 + om * 60);
    i += 6;
  } else {
    return std::nullopt;
  }
  if (i != text.size()) return std::nullopt;
  std::tm tm{};
  tm.tm_year = year - 1900;
  tm.tm_mon = month - 1;
  tm.tm_mday = day;
  tm.tm_hour = hour;
  tm.tm_min = minute;
  tm.tm_sec = second;
  const time_t t = timegm(&tm);
  return (static_cast<int64_t>(t) - offset_s) * 1000 + millis;
}

DecisionRecord decision_record(const PolicyResult& pr, const ClassifyPolicy& policy, const std::string& content,
                               const std::optional<std::string>& content_sha256, const DecisionLogSettings& settings, int64_t now_ms) {
  DecisionRecord d;
  d.id = new_decision_id(now_ms);
  d.created_ms = now_ms;
  d.policy_id = policy.id;
  d.policy_sha256 = sha256_hex(policy.text);
  d.verdict_json = pr.verdict.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  d.verdict_key = verdict_key(pr.verdict);
  d.violation = pr.violation();
  d.confidence = pr.confidence;
  d.final_text = printable(pr.final_text);
  if (settings.store_reasoning) d.reasoning = printable(pr.reasoning);
  if (settings.content == ContentStorage::kFull) d.content = content;
  if (settings.content != ContentStorage::kNone) d.content_sha256 = content_sha256 ? *content_sha256 : sha256_hex(content);
  d.finish_reason = finish_reason_name(pr.finish);
  d.prompt_tokens = pr.usage.prompt_tokens;
  d.cached_tokens = pr.usage.cached_tokens;
  d.reasoning_tokens = pr.usage.reasoning_tokens;
  d.completion_tokens = pr.usage.completion_tokens;
  return d;
}

std::vector<DecisionRecord> decision_records(const ClassifyResult& result, const ResolvedClassify& request,
                                             const DecisionLogSettings& settings, const ApiKeyIdentity& who,
                                             double latency_ms, int64_t now_ms, wire::ClassifyResponse& response) {
  std::vector<DecisionRecord> out;
  const ClassifyRequest& r = request.request;
  std::optional<std::string> content_hash;
  if (settings.content != ContentStorage::kNone) content_hash = sha256_hex(r.content);
  for (size_t i = 0; i < result.results.size() && i < r.policies.size(); ++i) {
    const ClassifyPolicy& policy = r.policies[i];
    DecisionRecord d = decision_record(result.results[i], policy, r.content, content_hash, settings, now_ms);
    d.api_key_id = who.id;
    d.request_id = result.id;
    d.model = response.model();
    if (i < request.versions.size() && request.versions[i]) {
      d.policy_version = request.versions[i];
      if (const size_t at = policy.id.find('@'); at != std::string::npos) d.policy_id = policy.id.substr(0, at);
    }
    // How the verdict was reached: the cascade's deciding stage, verdict-only scoring, or reasoning.
    d.effort = request.cascade ? "auto" : to_string(r.effort);
    if (request.cascade) d.mode = i < request.decided_by.size() ? request.decided_by[i] : "none";
    else d.mode = r.mode == ClassifyMode::kScore ? "score" : "reasoning";
    d.latency_ms = latency_ms;
    if (static_cast<int>(i) < response.results_size()) response.mutable_results(static_cast<int>(i))->set_decision_id(d.id);
    out.push_back(std::move(d));
  }
  return out;
}

DecisionQuery parse_decision_query(const std::string& query_string) {
  std::map<std::string, std::string> params;
  size_t start = 0;
  while (start <= query_string.size() && !query_string.empty()) {
    const size_t amp = std::min(query_string.find('&', start), query_string.size());
    const std::string item = query_string.substr(start, amp - start);
    start = amp + 1;
    if (item.empty()) {
      if (amp >= query_string.size()) break;
      continue;
    }
    const size_t eq = item.find('=');
    const auto name = percent_decode(item.substr(0, eq), true);
    const auto value = percent_decode(eq == std::string::npos ? "" : item.substr(eq + 1), true);
    if (!name || !value) throw bad_request("Malformed percent-escape in the query string.", name ? *name : "", "invalid_value");
    if (params.count(*name))
      throw bad_request("Query parameter '" + printable(*name) + "' is given twice.", printable(*name), "invalid_value");
    params[*name] = *value;
    if (amp >= query_string.size()) break;
  }
  DecisionQuery q;
  q.limit = kDefaultDecisionPage;
  for (const auto& [name, value] : params) {
    auto invalid = [&](const std::string& what) {
      return bad_request("Invalid value for '" + printable(name) + "': '" + printable(value.substr(0, 200)) + "'; " + what + ".", name,
                         "invalid_value");
    };
    if (name == "policy") {
      if (value.empty() || value.size() > 256) throw invalid("expected a policy id, or id@version");
      const auto ref = PolicyRegistry::parse_ref(value);
      if (ref && ref->version) {
        q.policy_id = ref->id;
        q.policy_version = ref->version;
      } else {
        q.policy_id = value;
      }
    } else if (name == "since" || name == "until") {
      const auto ms = parse_time_ms(value);
      if (!ms) throw invalid("expected unix seconds or an RFC 3339 time such as 2026-01-02T03:04:05Z");
      (name == "since" ? q.since_ms : q.until_ms) = *ms;
    } else if (name == "verdict") {
      if (value.empty() || value.size() > 256) throw invalid("expected a verdict such as 0, 1, a label, or null");
      q.verdict_key = value;
    } else if (name == "violation" || name == "disagreement" || name == "has_feedback") {
      const auto b = parse_bool(value);
      if (!b) throw invalid("expected true or false");
      (name == "violation" ? q.violation : name == "disagreement" ? q.disagreement : q.has_feedback) = *b;
    } else if (name == "limit") {
      int n = 0;
      size_t used = 0;
      try {
        n = std::stoi(value, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (value.empty() || used != value.size() || n < 1 || n > kMaxDecisionPage)
        throw invalid("expected an integer from 1 to " + std::to_string(kMaxDecisionPage));
      q.limit = n;
    } else if (name == "after") {
      if (!valid_decision_id(value)) throw invalid("expected the last_id of a previous page");
      q.after = value;
    } else {
      throw bad_request("Unknown query parameter '" + printable(name) +
                            "' (known: policy, since, until, verdict, violation, disagreement, has_feedback, limit, after).",
                        printable(name), "unknown_parameter");
    }
  }
  if (q.since_ms && q.until_ms && *q.until_ms <= *q.since_ms)
    throw bad_request("'until' must be later than 'since'.", "until", "invalid_value");
  return q;
}

wire::Decision decision_wire(const DecisionRecord& r) {
  wire::Decision w;
  w.set_id(r.id);
  w.set_object("decision");
  w.set_created(static_cast<uint32_t>(r.created_ms / 1000));
  w.set_request_id(r.request_id);
  w.set_api_key_id(r.api_key_id);
  w.set_model(r.model);
  w.set_policy_id(printable(r.policy_id));
  if (r.policy_version) w.set_policy_version(*r.policy_version);
  w.set_policy_sha256(r.policy_sha256);
  w.set_reasoning_effort(r.effort);
  w.set_mode(r.mode);
  *w.mutable_verdict() = to_value(nlohmann::json::parse(r.verdict_json, nullptr, false));
  w.set_violation(r.violation);
  if (r.confidence) w.mutable_confidence()->set_number_value(*r.confidence);
  else w.mutable_confidence()->set_null_value(google::protobuf::NULL_VALUE);
  w.set_final(r.final_text);
  if (r.reasoning) w.set_reasoning(*r.reasoning);
  if (r.content) w.set_content(printable(*r.content));
  if (r.content_sha256) w.set_content_sha256(*r.content_sha256);
  w.set_finish_reason(r.finish_reason);
  wire::ClassifyUsage* u = w.mutable_usage();
  u->set_prompt_tokens(r.prompt_tokens);
  u->set_cached_tokens(r.cached_tokens);
  u->set_reasoning_tokens(r.reasoning_tokens);
  u->set_completion_tokens(r.completion_tokens);
  u->set_total_tokens(r.prompt_tokens + r.completion_tokens);
  w.set_latency_ms(r.latency_ms);
  if (r.feedback) {
    wire::DecisionFeedback* f = w.mutable_feedback();
    *f->mutable_label() = to_value(nlohmann::json::parse(r.feedback->label_json, nullptr, false));
    f->set_reviewer(r.feedback->reviewer);
    f->set_note(r.feedback->note);
    f->set_api_key_id(r.feedback->api_key_id);
    f->set_created(static_cast<uint32_t>(r.feedback->created_ms / 1000));
  }
  w.set_feedback_count(r.feedback_count);
  return w;
}

DecisionFeedback parse_feedback(const std::string& body, const ApiKeyIdentity& who, int64_t now_ms) {
  wire::DecisionFeedbackRequest in;
  parse_json(body, in);
  DecisionFeedback f;
  if (!in.has_label()) throw bad_request("Missing required parameter: 'label'.", "label", "missing_required_parameter");
  const nlohmann::json label = from_value(in.label());
  if (label.is_string()) {
    const std::string text = label.get<std::string>();
    if (text.empty() || text.size() > 256) throw bad_request("'label' must be a non-empty string of at most 256 bytes, or a number.", "label", "invalid_value");
  } else if (label.is_number()) {
    const double d = label.get<double>();
    if (!std::isfinite(d) || d != std::floor(d) || std::fabs(d) > 1e15)
      throw bad_request("A numeric 'label' must be an integer (e.g. 0 or 1).", "label", "invalid_value");
  } else {
    throw bad_request("'label' must be a verdict: a number (0 or 1) or a label string.", "label", "invalid_type");
  }
  f.label = *verdict_key(label);
  f.label_json = label.is_number() ? f.label : label.dump();
  if (in.reviewer().empty()) throw bad_request("Missing required parameter: 'reviewer'.", "reviewer", "missing_required_parameter");
  if (in.reviewer().size() > 256) throw bad_request("'reviewer' may be at most 256 bytes.", "reviewer", "invalid_value");
  if (in.note().size() > 16384) throw bad_request("'note' may be at most 16384 bytes.", "note", "invalid_value");
  f.reviewer = in.reviewer();
  f.note = in.note();
  f.api_key_id = who.id;
  f.created_ms = now_ms;
  return f;
}

}  // namespace arbiter::api

namespace arbiter::api {
namespace {

std::optional<std::string> scope_of(const ApiKeyIdentity& who) {
  return who.admin ? std::nullopt : std::optional<std::string>(who.id);
}

void check_id(const std::string& id) {
  if (!valid_decision_id(id))
    throw bad_request("Malformed decision id '" + printable(id.substr(0, 100)) + "' (expected dec_ and 28 hex digits).", "id",
                      "invalid_value");
}

ApiException no_decision(const std::string& id) {
  return ApiException({404, "No decision '" + printable(id) + "' (or not one this key may read).", "not_found_error", "id",
                       "decision_not_found", 0});
}

}  // namespace

std::string decision_get_json(const DecisionStore& store, const std::string& id, const ApiKeyIdentity& who) {
  check_id(id);
  const auto record = store.get(id, scope_of(who));
  if (!record) throw no_decision(id);
  return print_json(decision_wire(*record));
}

std::string decision_list_json(const DecisionStore& store, const std::string& query_string, const ApiKeyIdentity& who) {
  DecisionQuery q = parse_decision_query(query_string);
  q.api_key_id = scope_of(who);
  const DecisionPage page = store.list(q);
  wire::DecisionList out;
  out.set_object("list");
  for (const DecisionRecord& r : page.decisions) *out.add_data() = decision_wire(r);
  if (!page.decisions.empty()) {
    out.set_first_id(page.decisions.front().id);
    out.set_last_id(page.decisions.back().id);
  }
  out.set_has_more(page.has_more);
  return print_json(out);
}

std::string decision_feedback_json(DecisionLog& log, const std::string& id, const std::string& body, const ApiKeyIdentity& who) {
  check_id(id);
  const DecisionFeedback f = parse_feedback(body, who, log.now_ms());
  bool found = false;
  try {
    found = log.store().add_feedback(id, scope_of(who), f);
  } catch (const std::runtime_error& e) {
    throw ApiException({503, std::string("The feedback could not be stored: ") + e.what(), "server_error", "",
                        "decision_log_unavailable", 1});
  }
  if (!found) throw no_decision(id);
  return decision_get_json(log.store(), id, who);
}

}  // namespace arbiter::api
