// Classification on top of the scheduler (issue 6): one content judged against one or more policies,
// one sequence per policy (harmony prompt: policy as the developer message, content as the user
// message, runtime/safeguard.h), and each policy's generation turned into a verdict with its
// confidence, the final text and the reasoning. Shared by the HTTP API and `arbiter classify`.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "runtime/harmony.h"
#include "runtime/safeguard.h"
#include "runtime/tokenizer.h"
#include "scheduler/scheduler.h"

namespace arbiter {

// Reasoning-token budget per effort (the analysis channel is closed when it runs out).
struct ReasoningBudgets {
  int low = 256;
  int medium = 1024;
  int high = 4096;
  int for_effort(ReasoningEffort effort) const;
};

struct ClassifyPolicy {
  std::string id;                   // reported back as policy_id
  std::string text;                 // the policy (developer message)
  std::vector<std::string> labels;  // optional: the labels the policy asks for (label verdicts)
  std::vector<std::string> violating_labels;
};

struct ClassifyRequest {
  std::string id;  // request id (unique among live requests)
  std::string content;
  std::vector<ClassifyPolicy> policies;
  ReasoningEffort effort = ReasoningEffort::kMedium;
  int max_tokens = 0;             // 0: the budget for `effort` plus room for the answer
  bool return_reasoning = true;
  std::optional<std::chrono::steady_clock::time_point> deadline;
};

struct ClassifyUsage {
  int prompt_tokens = 0;
  int cached_tokens = 0;
  int reasoning_tokens = 0;
  int completion_tokens = 0;
  ClassifyUsage& operator+=(const ClassifyUsage& other);
};

struct PolicyResult {
  std::string policy_id;
  // 0 / 1 (violation), a label string, or null when the answer could not be parsed (see final_text,
  // verdict_error). A JSON answer contributes its violation value; its object is in verdict_details.
  nlohmann::json verdict;
  nlohmann::json verdict_details = nlohmann::json::object();  // Verdict::to_json()
  std::string verdict_error;
  std::optional<double> confidence;  // probability of the verdict's deciding token
  std::string final_text;
  std::string reasoning;             // empty unless return_reasoning
  FinishReason finish = FinishReason::kStop;
  std::string error;
  ClassifyUsage usage;
  bool violation() const;            // verdict says violation (1, or a violating label)
};

struct ClassifyResult {
  std::string id;
  std::vector<PolicyResult> results;  // in the order of the request's policies
  bool flagged = false;               // any violation
  ClassifyUsage usage;                // sums
  // The worst finish over the policies: kDeadline / kCancelled / kError when any policy ended so.
  FinishReason finish = FinishReason::kStop;
};

struct ClassifierOptions {
  ReasoningBudgets budgets;
  int answer_tokens = 256;         // room for the final answer after the reasoning budget
  int top_logprobs = 20;           // alternatives kept per token, for confidence
  SafeguardPromptOptions prompt;   // effort is taken from each request
};

class Classifier {
 public:
  Classifier(const Tokenizer& tokenizer, Scheduler& scheduler, const ClassifierOptions& options = {});

  // The rendered prompt of one policy (what the scheduler will run).
  std::vector<int32_t> render(const ClassifyPolicy& policy, const std::string& content, ReasoningEffort effort) const;
  // The token prefix every request under `policy_text` shares (system + developer message + the start
  // of the user message), for Scheduler::warm.
  std::vector<int32_t> policy_prefix(const std::string& policy_text, ReasoningEffort effort) const;

  // Submits the request; `done` is called once (from the step-loop thread) with the result. Returns
  // the scheduler's verdict on admission (`done` is not called unless kAccepted).
  SubmitStatus submit(const ClassifyRequest& request, std::function<void(ClassifyResult)> done,
                      std::string* why = nullptr);
  // Turns one policy's generation into its result (exposed for tests and the CLI).
  PolicyResult interpret(const ClassifyPolicy& policy, const SequenceResult& generated, bool return_reasoning) const;

  const Tokenizer& tokenizer() const { return tokenizer_; }
  Scheduler& scheduler() { return scheduler_; }

 private:
  const Tokenizer& tokenizer_;
  Scheduler& scheduler_;
  ClassifierOptions options_;
};

}  // namespace arbiter
