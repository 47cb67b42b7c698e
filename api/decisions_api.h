// The decision log's HTTP side (docs/decisions.md): classify results -> DecisionRecords (what is
// kept follows the deployment's DecisionLogSettings), the query string of GET /v1/decisions ->
// DecisionQuery (every parameter checked, 400 naming it), DecisionRecord -> api.proto Decision,
// and the feedback body -> DecisionFeedback.
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "api/api.pb.h"
#include "api/auth.h"
#include "api/classify_api.h"
#include "api/decision_log.h"

namespace arbiter::api {

// Largest page of GET /v1/decisions (and the default).
inline constexpr int kMaxDecisionPage = 100;
inline constexpr int kDefaultDecisionPage = 20;

// One record per policy result of an answered classify request; their ids are also written into
// `response` (PolicyResult.decision_id).
std::vector<DecisionRecord> decision_records(const ClassifyResult& result, const ResolvedClassify& request,
                                             const DecisionLogSettings& settings, const ApiKeyIdentity& who,
                                             double latency_ms, int64_t now_ms, wire::ClassifyResponse& response);

// One policy's result as a decision record: a new id, the time, the policy (id, text hash), the
// verdict, final text, tokens and finish; the content and reasoning as `settings` keeps them
// (`content_sha256`: the content's hash, computed once per request). The caller sets who asked, the
// request id, model, policy version, effort, mode and latency.
DecisionRecord decision_record(const PolicyResult& result, const ClassifyPolicy& policy, const std::string& content,
                               const std::optional<std::string>& content_sha256, const DecisionLogSettings& settings, int64_t now_ms);

// The query string of GET /v1/decisions (without '?') -> a query (scope not set); ApiException 400
// with `param` for an unknown, repeated or malformed parameter.
DecisionQuery parse_decision_query(const std::string& query_string);

// The decision as the API shows it.
wire::Decision decision_wire(const DecisionRecord& record);

// A checked feedback body (label, reviewer, note) from `who`, at `now_ms`.
DecisionFeedback parse_feedback(const std::string& body, const ApiKeyIdentity& who, int64_t now_ms);

// How filters and feedback compare a verdict or a label: a number's JSON text, a string's text;
// nullopt for null.
std::optional<std::string> verdict_key(const nlohmann::json& verdict);

// "2026-01-02T03:04:05Z" (an RFC 3339 time, with an optional fraction and offset) or unix seconds
// -> unix milliseconds; nullopt when malformed.
std::optional<int64_t> parse_time_ms(const std::string& text);

}  // namespace arbiter::api

namespace arbiter::api {

// The bodies of the decision endpoints (ApiExceptions for bad input and unknown or out-of-scope
// decisions, 404). A non-admin key sees only the decisions it created.
std::string decision_get_json(const DecisionStore& store, const std::string& id, const ApiKeyIdentity& who);
std::string decision_list_json(const DecisionStore& store, const std::string& query_string, const ApiKeyIdentity& who);
std::string decision_feedback_json(DecisionLog& log, const std::string& id, const std::string& body, const ApiKeyIdentity& who);

}  // namespace arbiter::api
