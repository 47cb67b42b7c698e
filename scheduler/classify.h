// Classification on top of the scheduler (issue 6): one content judged against one or more policies,
// one sequence per policy (harmony prompt: policy as the developer message, content as the user
// message, runtime/safeguard.h), and each policy's generation turned into a verdict with its
// confidence, the final text and the reasoning. Shared by the HTTP API and `arbiter classify`.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
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

// One policy of a request: the text the model judges against and how its answer is read.
struct ClassifyPolicy {
  std::string id;                   // reported back as policy_id
  std::string text;                 // the policy (developer message)
  std::vector<std::string> labels;  // optional: the labels the policy asks for (label verdicts)
  std::vector<std::string> violating_labels;
};

// One content judged against one or more policies (one sequence per policy).
struct ClassifyRequest {
  std::string id;  // request id (unique among live requests)
  std::string content;
  std::vector<ClassifyPolicy> policies;
  ReasoningEffort effort = ReasoningEffort::kMedium;
  int max_tokens = 0;             // 0: the budget for `effort` plus room for the answer
  bool return_reasoning = true;
  std::optional<std::chrono::steady_clock::time_point> deadline;
};

// Token counts of one policy's sequence (or their sums over a request).
struct ClassifyUsage {
  int prompt_tokens = 0;
  int cached_tokens = 0;
  int reasoning_tokens = 0;
  int completion_tokens = 0;
  ClassifyUsage& operator+=(const ClassifyUsage& other);
};

// What one policy's generation said: the verdict, how sure the model was, and what it cost.
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
  bool reasoning_truncated = false;  // the reasoning budget ran out: the scheduler closed the analysis
  FinishReason finish = FinishReason::kStop;
  std::string error;
  ClassifyUsage usage;
  bool violation() const;            // verdict says violation (1, or a violating label)
};

// The answer to one ClassifyRequest.
struct ClassifyResult {
  std::string id;
  std::vector<PolicyResult> results;  // in the order of the request's policies
  bool flagged = false;               // any violation
  ClassifyUsage usage;                // sums
  // The worst finish over the policies: kDeadline / kCancelled / kError when any policy ended so.
  FinishReason finish = FinishReason::kStop;
};

// How the Classifier turns requests into sequences.
struct ClassifierOptions {
  ReasoningBudgets budgets;
  int answer_tokens = 256;         // room for the final answer after the reasoning budget
  int top_logprobs = 20;           // alternatives kept per token, for confidence
  SafeguardPromptOptions prompt;   // effort is taken from each request
};

// JSON form of results, in api/api.proto's ClassifyResponse / PolicyResult / ClassifyUsage field
// names (what `arbiter classify` prints).
nlohmann::json to_json(const ClassifyUsage& usage);
nlohmann::json to_json(const PolicyResult& result);
nlohmann::json to_json(const ClassifyResult& result);

// Classifier: builds one SequenceSpec per policy (prompt, reasoning budget and its closing tokens,
// top logprobs), submits them to the Scheduler as one request, and turns the generations into a
// ClassifyResult. Thread-safe: submit() may be called from several threads at once.
class Classifier {
 public:
  Classifier(const Tokenizer& tokenizer, Scheduler& scheduler, const ClassifierOptions& options = {});

  // The rendered prompt of one policy (what the scheduler will run): equal to
  // render_safeguard_prompt(policy, content) with the request's effort; the policy part is tokenized
  // once per (policy, effort) and kept (a bounded cache).
  std::vector<int32_t> render(const ClassifyPolicy& policy, const std::string& content, ReasoningEffort effort) const;
  // The token prefix every request under `policy_text` shares (system + developer message + the start
  // of the user message, up to its <|message|>), for Scheduler::warm.
  std::vector<int32_t> policy_prefix(const std::string& policy_text, ReasoningEffort effort) const;
  // The tokens the scheduler forces when the reasoning budget runs out:
  // <|end|><|start|>assistant<|channel|>final<|message|>.
  const std::vector<int32_t>& close_reasoning() const { return close_reasoning_; }
  // The sequence one policy of `request` runs as.
  SequenceSpec sequence(const ClassifyRequest& request, const ClassifyPolicy& policy) const;

  // Submits the request; `done` is called once (from the step-loop thread) with the result. Returns
  // the scheduler's verdict on admission (`done` is not called unless kAccepted). Optional
  // `on_policy` is called (same thread, must not block) with each policy's result as soon as its
  // sequence ends, whatever the reason (PolicyResult::finish), every call before `done`.
  SubmitStatus submit(const ClassifyRequest& request, std::function<void(ClassifyResult)> done,
                      std::string* why = nullptr,
                      std::function<void(size_t index, const PolicyResult& result)> on_policy = {});
  // Turns one policy's generation into its result (exposed for tests and the CLI).
  PolicyResult interpret(const ClassifyPolicy& policy, const SequenceResult& generated, bool return_reasoning) const;
  // Puts the per-policy results of `request` together (flagged, usage sums, worst finish).
  ClassifyResult assemble(const ClassifyRequest& request, const std::vector<SequenceResult>& generated) const;

  const Tokenizer& tokenizer() const { return tokenizer_; }
  Scheduler& scheduler() { return scheduler_; }

 private:
  std::vector<int32_t> cached_prefix(const std::string& policy_text, ReasoningEffort effort) const;

  const Tokenizer& tokenizer_;
  Scheduler& scheduler_;
  ClassifierOptions options_;
  std::vector<int32_t> close_reasoning_;
  std::vector<int32_t> prompt_suffix_;  // <|end|><|start|>assistant after the content
  mutable std::mutex prefix_mutex_;
  mutable std::map<std::pair<int, std::string>, std::vector<int32_t>> prefixes_;  // (effort, policy)
};

}  // namespace arbiter
