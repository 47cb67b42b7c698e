// POST /v1/moderations (OpenAI-compatible) without the transport: the deployment's moderation
// config (which policies answer for which categories, read from --moderation-config), the request
// check, and the response built from the policies' results. Each input is classified against every
// category's policy as one request, by verdict-only scoring unless the config asks for reasoning.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "api/api.pb.h"
#include "api/policy_registry.h"
#include "scheduler/classify.h"

namespace arbiter::api {

// One category: a registered policy (`policy`: "id" or "id@version", looked up per request) or a
// policy of its own (text, labels).
struct ModerationCategory {
  std::string name;
  std::optional<PolicyRef> registered;
  ClassifyPolicy policy;  // inline policies (id = the category name)
};

struct ModerationConfig {
  std::vector<ModerationCategory> categories;  // in the config's order
  ClassifyMode mode = ClassifyMode::kScore;
  ReasoningEffort effort = ReasoningEffort::kLow;
  // A category is flagged when its violation probability (score mode: the violating answers' share;
  // reasoning: 1 for a violating verdict, else 0) reaches this.
  double threshold = 0.5;
  int max_inputs = 32;  // inputs per request
};

// Reads the JSON config file (format in configs/moderation/example.json); text files named by
// "text_file" are read relative to it. Throws std::invalid_argument naming the file and the field.
ModerationConfig load_moderation_config(const std::string& path);

// The checked inputs of a request body: 400 (ApiException) for a missing, empty or over-long input
// list or an input that is not a non-empty string.
std::vector<std::string> moderation_inputs(const wire::ModerationRequest& body, const ModerationConfig& config);

// The policies every input is classified against, in category order: 404-style ApiException (500)
// when a category names a policy that is not registered.
std::vector<ClassifyPolicy> moderation_policies(const ModerationConfig& config, const PolicyRegistry& registry);

// One input's result from its classification against `policies` (moderation_policies', in category order).
wire::ModerationResult moderation_result(const ModerationConfig& config, const std::vector<ClassifyPolicy>& policies,
                                         const ClassifyResult& result);

}  // namespace arbiter::api
