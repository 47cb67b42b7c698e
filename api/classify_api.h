// POST /v1/classify without the transport: checks a parsed request body (api.proto
// ClassifyRequest), resolves the policies it names in the PolicyRegistry, and builds the
// Classifier's request; turns the ClassifyResult back into the response body. Problems with the
// request become ApiExceptions (400, 404 for an unknown policy).
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "api/api.pb.h"
#include "api/policy_registry.h"
#include "pipeline/cascade.h"
#include "pipeline/rules.h"
#include "scheduler/classify.h"

namespace arbiter::api {

// Server-side defaults and limits for classify requests.
struct ClassifyLimits {
  ReasoningEffort default_effort = ReasoningEffort::kMedium;
  int max_policies = 32;
  int max_context = 0;  // 0: unchecked here (the scheduler still checks)
};

// Compiled rules by their JSON (a bounded cache), so that a registered policy's patterns are
// compiled once and not per request. Thread-safe.
class RulesCache {
 public:
  // PolicyRules::compile of `rules` (throws its std::invalid_argument), or the copy compiled before.
  std::shared_ptr<const PolicyRules> get(const nlohmann::json& rules, const std::vector<std::string>& labels,
                                         const std::vector<std::string>& violating_labels);

 private:
  std::mutex mutex_;
  std::map<std::string, std::shared_ptr<const PolicyRules>> compiled_;
};

// A checked request, ready for Classifier::submit (its id still to be set).
struct ResolvedClassify {
  ClassifyRequest request;
  std::vector<std::optional<int>> versions;  // per policy: the registered version, if any
  std::optional<double> timeout;             // seconds, as the request asked
  // reasoning_effort "auto" (pipeline/cascade.h): per policy, its cascade (the request's overrides
  // applied) and compiled rules (null where it has none). request.effort is then low.
  bool cascade = false;
  std::vector<CascadeConfig> cascades;
  std::vector<std::shared_ptr<const PolicyRules>> rules;
  std::vector<std::string> decided_by;       // filled once the cascade has run (the decision log's mode)
};

// A policy's cascade from its stored or inline form: `cascade` (null: the default, score -> low ->
// high) with the rules stage first when the policy has rules and the config names no stages.
// Throws ApiException 400 naming `param` for a bad cascade or a rules stage without rules.
CascadeConfig policy_cascade(const nlohmann::json& cascade, bool has_rules, bool allow_model, const std::string& param);
// A stored or inline rules object, compiled (through `cache` when given); 400 naming `param` when it does not compile.
std::shared_ptr<const PolicyRules> policy_rules(const nlohmann::json& rules, const std::vector<std::string>& labels,
                                                const std::vector<std::string>& violating_labels, RulesCache* cache,
                                                const std::string& param);
// A protobuf Struct as JSON, integral numbers as integers (budgets, labels 0/1).
nlohmann::json struct_json(const google::protobuf::Struct& s);

// "low" | "medium" | "high" (empty: `fallback`); 400 naming `param` otherwise.
ReasoningEffort effort_field(const std::string& text, ReasoningEffort fallback, const std::string& param);

ResolvedClassify resolve_classify(const wire::ClassifyRequest& body, const PolicyRegistry& registry,
                                  const ClassifyLimits& limits, RulesCache* rules_cache = nullptr);
// The cascade's per-policy stages and deciding stage into the response's results.
void add_cascade_results(const CascadeResult& result, wire::ClassifyResponse& response);

// One policy's result as in the response (`index`: the policy's place in the request).
wire::PolicyResult policy_result_wire(const PolicyResult& result, const ResolvedClassify& request, size_t index);

wire::ClassifyResponse classify_response(const ClassifyResult& result, const ResolvedClassify& request,
                                         const std::string& model, uint32_t created);

const char* finish_reason_name(FinishReason reason);

}  // namespace arbiter::api
