// POST /v1/classify without the transport: checks a parsed request body (api.proto
// ClassifyRequest), resolves the policies it names in the PolicyRegistry, and builds the
// Classifier's request; turns the ClassifyResult back into the response body. Problems with the
// request become ApiExceptions (400, 404 for an unknown policy).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "api/api.pb.h"
#include "api/policy_registry.h"
#include "scheduler/classify.h"

namespace arbiter::api {

// Server-side defaults and limits for classify requests.
struct ClassifyLimits {
  ReasoningEffort default_effort = ReasoningEffort::kMedium;
  int max_policies = 32;
  int max_context = 0;  // 0: unchecked here (the scheduler still checks)
};

// A checked request, ready for Classifier::submit (its id still to be set).
struct ResolvedClassify {
  ClassifyRequest request;
  std::vector<std::optional<int>> versions;  // per policy: the registered version, if any
  std::optional<double> timeout;             // seconds, as the request asked
};

// "low" | "medium" | "high" (empty: `fallback`); 400 naming `param` otherwise.
ReasoningEffort effort_field(const std::string& text, ReasoningEffort fallback, const std::string& param);

ResolvedClassify resolve_classify(const wire::ClassifyRequest& body, const PolicyRegistry& registry,
                                  const ClassifyLimits& limits);

// One policy's result as in the response (`index`: the policy's place in the request).
wire::PolicyResult policy_result_wire(const PolicyResult& result, const ResolvedClassify& request, size_t index);

wire::ClassifyResponse classify_response(const ClassifyResult& result, const ResolvedClassify& request,
                                         const std::string& model, uint32_t created);

const char* finish_reason_name(FinishReason reason);

}  // namespace arbiter::api
