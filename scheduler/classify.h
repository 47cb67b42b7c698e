// Classification on top of the scheduler: one content judged against one or more policies,
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
#include "runtime/verdict_grammar.h"
#include "scheduler/scheduler.h"

namespace arbiter {

// Reasoning-token budget per effort (the analysis channel is closed when it runs out). Each must
// leave room for a prompt in the context together with the closing and answer tokens
// (check_classifier_options): with the default answer tokens, high needs a context above 4358.
struct ReasoningBudgets {
  int low = 256;
  int medium = 1024;
  int high = 4096;
  int for_effort(ReasoningEffort effort) const;
};

// Verdict-only scoring (ClassifyRequest::mode kScore): which answers a policy's verdict is chosen
// from. kAuto: kLabels when the policy declares labels, else kJson when its text names the JSON
// verdict's "violation" key, else kBinary.
enum class AnswerFormat { kAuto, kBinary, kLabels, kJson };
const char* to_string(AnswerFormat format);

// One policy of a request: the text the model judges against and how its answer is read.
struct ClassifyPolicy {
  std::string id;                   // reported back as policy_id
  std::string text;                 // the policy (developer message)
  std::vector<std::string> labels;  // optional: the labels the policy asks for (label verdicts)
  std::vector<std::string> violating_labels;
  AnswerFormat format = AnswerFormat::kAuto;  // score mode only
};

// How a request is answered. kReason: the model reasons in the analysis channel, then answers
// (one generation per policy). kScore: no reasoning; the final channel is opened by forced tokens
// and the verdict is read off the next-token distribution at that point (one forward position per
// policy; more only where allowed answers share their first tokens).
enum class ClassifyMode { kReason, kScore };
// Score mode: the forced tokens after the prompt's <|start|>assistant. kEmptyAnalysis: an empty
// analysis message, then the final header (<|channel|>analysis<|message|><|end|><|start|>assistant
// <|channel|>final<|message|>), the shape of a reasoned answer; kDirect: the final header only
// (<|channel|>final<|message|>).
enum class ScorePrefix { kEmptyAnalysis, kDirect };
const char* to_string(ClassifyMode mode);
const char* to_string(ScorePrefix prefix);

// One content judged against one or more policies (one sequence per policy).
struct ClassifyRequest {
  std::string id;  // request id (unique among live requests)
  std::string content;
  std::vector<ClassifyPolicy> policies;
  ReasoningEffort effort = ReasoningEffort::kMedium;
  int max_tokens = 0;             // 0: the budget for `effort` plus room for the answer
  int reasoning_budget = 0;       // reasoning tokens before the analysis is closed; 0: the effort's budget
  bool return_reasoning = true;
  ClassifyMode mode = ClassifyMode::kReason;  // kScore ignores max_tokens and return_reasoning
  ScorePrefix score_prefix = ScorePrefix::kEmptyAnalysis;
  std::optional<std::chrono::steady_clock::time_point> deadline;
  // Optional: polled while the prompts are rendered (Classifier::prepare); true stops the work
  // (the client is gone).
  std::function<bool()> cancelled;
  // Constrained final answers (Classifier::final_grammar): each policy's final-channel content is
  // decoded under a mask that admits only well-formed answers of its format, so a generation that
  // finishes normally always has a verdict. false: the model answers freely.
  bool constrain = true;
  // Work that was admitted before (a cascade's next stage): not refused for a full queue
  // (RequestSpec::continuation).
  bool continuation = false;
  // Background work (a job item): placed after waiting foreground work (RequestSpec::background).
  bool background = false;
};

// Token counts of one policy's sequence (or their sums over a request).
struct ClassifyUsage {
  int prompt_tokens = 0;
  int cached_tokens = 0;
  int reasoning_tokens = 0;
  int completion_tokens = 0;
  // Score mode: tokens appended after the prompt without being generated (the forced final-channel
  // header, and the shared start of answers that must be told apart further on); counted in the
  // total. completion_tokens is then the number of positions whose distribution was read.
  int forced_tokens = 0;
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
  // Score mode: every allowed answer's probability ("0"/"1", or each label), renormalised over the
  // allowed answers; the verdict is the most probable one and confidence its probability.
  std::map<std::string, double> scores;
  std::string final_text;
  std::string reasoning;             // empty unless return_reasoning
  bool reasoning_truncated = false;  // the reasoning budget ran out: the scheduler closed the analysis
  FinishReason finish = FinishReason::kStop;
  std::string error;
  ClassifyUsage usage;
  bool violation() const;            // verdict says violation (1, or a violating label)
};

// How bad a finish is, for a request's overall finish (the worst of its policies'):
// error > deadline > cancelled > length > stop.
int finish_severity(FinishReason reason);

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
  // Score mode: evaluate the lm_head on the allowed answers' rows only (SequenceSpec::candidates_only)
  // where a step holds nothing else to sample; false: always the whole lm_head (for comparisons).
  bool score_restricted_lm_head = true;
  SafeguardPromptOptions prompt;   // effort is taken from each request
  // Prompt + generated tokens of one sequence (the scheduler's context). A request's prompts must
  // leave room for its whole generation (Classifier::prepare). 0: not checked here (the scheduler
  // still refuses a prompt that leaves no room at all).
  int max_context = 0;
};

// Checks that the options do not contradict themselves: every effort's generation (its reasoning
// budget + the tokens that close the reasoning + answer_tokens) must leave room in max_context for
// the smallest prompt (a one-character policy and content), else no request at that effort could
// ever reach its answer. Throws std::invalid_argument naming the effort and the numbers. No-op
// when max_context is 0.
void check_classifier_options(const Tokenizer& tokenizer, const ClassifierOptions& options);

// Whether a policy's prompt leaves room in the context for content and an answer: its prompt
// without content (the policy prefix and the suffix after the content) + 1 content token + the
// generation (reasoning budget + closing tokens + answer tokens, or a request's max_tokens) must
// not exceed the context.
struct PolicyFit {
  bool fits = true;
  // prompt_tokens is exact; false: tokenizing stopped once the prompt could not fit, and it takes
  // at least prompt_tokens.
  bool exact = true;
  int prompt_tokens = 0;
  int generation_tokens = 0;
  int max_context = 0;             // 0: unchecked
  ReasoningEffort effort = ReasoningEffort::kMedium;
  // "The policy's prompt takes N tokens; ... the context is M tokens." (for errors and logs)
  std::string describe() const;
};

// Why a request's prompts could not be built (Classifier::prepare).
enum class PromptStatus {
  kOk,
  kPolicyTooLong,   // a policy's prompt leaves no room for content and the generation
  kContentTooLong,  // the content does not fit next to one of the policies
  kDeadline,        // the request's deadline passed while rendering
  kCancelled,       // request.cancelled said so
};
const char* to_string(PromptStatus status);

// A request's prompts, rendered once: each policy's cached prefix + the content's tokens (encoded
// once for all policies) + the suffix, exactly render() of each policy.
struct ClassifyPrompts {
  PromptStatus status = PromptStatus::kOk;
  std::string why;                      // not kOk: what happened, with the numbers
  int policy = -1;                      // kPolicyTooLong / kContentTooLong: the policy's index
  int content_tokens = 0;               // kOk: tokens of the content
  std::vector<SequenceSpec> sequences;  // kOk: one per policy, in order (score mode: see below)
  // Score mode: policy i runs sequences [first_sequence[i], first_sequence[i + 1]) (one per point
  // where its answers part ways, ScorePlan::nodes); empty in reason mode.
  std::vector<size_t> first_sequence;
  bool ok() const { return status == PromptStatus::kOk; }
};

// Score mode: how one policy's allowed answers are weighed. Every answer is spelled in tokens as
// the model would write it right after the final header (labels and 0/1 followed by <|return|>, so
// that a label that is the start of another is told apart by the stop token); the answers form a
// token trie. A node is a point where answers that agreed so far part ways: one sequence (prompt +
// forced header + the node's path) reads the log-probabilities of the node's distinct next tokens.
// Tokens all remaining answers share are forced, not read. An answer's probability is the product,
// over the nodes on its way, of its token's probability renormalised over the node's candidates:
// for answers with distinct first tokens (0/1, most label sets), the softmax over the allowed first
// tokens at one position.
struct ScorePlan {
  AnswerFormat format = AnswerFormat::kBinary;  // resolved (never kAuto)
  std::vector<int32_t> forced;                  // the final-channel header (ScorePrefix)
  std::vector<std::string> answers;             // keys of PolicyResult::scores: "0"/"1" or the labels
  std::vector<std::vector<int32_t>> spelled;    // per answer, its tokens after the header
  struct Node {
    std::vector<int32_t> path;        // tokens after the header up to this point
    std::vector<int32_t> candidates;  // the distinct next tokens of the answers that reach it
  };
  std::vector<Node> nodes;            // nodes[0] is where all answers first part ways
  // Per answer, its way through the trie: (node, index into that node's candidates).
  std::vector<std::vector<std::pair<size_t, size_t>>> steps;
  // Tokens one sequence of this plan adds to the prompt at most (forced + longest path + 1 sampled).
  int generation_tokens() const;
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
  // of the user message, up to its <|message|>), for Scheduler::warm. Cached like render()'s.
  std::vector<int32_t> policy_prefix(const std::string& policy_text, ReasoningEffort effort) const;
  // policy_prefix under bounds: kOverLimit once the prefix is known to take more than
  // bounds.max_tokens tokens, kStopped when bounds.stop said so; `out` (replaced) holds the whole
  // prefix only on kComplete.
  EncodeEnd bounded_prefix(const std::string& policy_text, ReasoningEffort effort, const EncodeBounds& bounds,
                           std::vector<int32_t>& out) const;
  // Tokens a sequence may generate: `max_tokens` when positive, else the reasoning budget (the
  // effort's unless `reasoning_budget` is positive) + the closing tokens + the answer tokens.
  int generation_tokens(ReasoningEffort effort, int max_tokens = 0, int reasoning_budget = 0) const;
  // Tokens of the prompt after the content: <|end|><|start|>assistant.
  int suffix_tokens() const { return static_cast<int>(prompt_suffix_.size()); }
  // Whether `policy_text` fits the context at `effort` (PolicyFit). Tokenizes the policy only as
  // far as it can fit (and not at all when its prefix is cached). Always fits when max_context is 0.
  PolicyFit policy_fit(const std::string& policy_text, ReasoningEffort effort, int max_tokens = 0) const;
  // policy_fit at the effort that needs the least room for its generation (the smallest reasoning
  // budget): whether any request could use the policy.
  PolicyFit policy_fit_any(const std::string& policy_text) const;
  // Renders every policy's prompt for `request`, the content tokenized once and only as far as it
  // can fit next to every policy with room for the request's generation; checks request.deadline
  // and request.cancelled as it goes. Nothing is scheduled.
  ClassifyPrompts prepare(const ClassifyRequest& request) const;
  // The tokens the scheduler forces when the reasoning budget runs out:
  // <|end|><|start|>assistant<|channel|>final<|message|>.
  const std::vector<int32_t>& close_reasoning() const { return close_reasoning_; }
  // The sequence one policy of `request` runs as.
  SequenceSpec sequence(const ClassifyRequest& request, const ClassifyPolicy& policy) const;
  // The grammar a policy's final answer is decoded under: its labels (each, or after one space)
  // when it declares any, else "0" / "1" / the minimal JSON verdict {"violation": 0|1} (the two
  // readings Classifier::interpret gives an answer without labels); runtime/verdict_grammar.h.
  // Null when no label could ever be matched. Built once per label set and kept (a bounded cache).
  std::shared_ptr<const VerdictGrammar> final_grammar(const ClassifyPolicy& policy) const;

  // Submits the request; `done` is called once (from the step-loop thread) with the result. Returns
  // the scheduler's verdict on admission (`done` is not called unless kAccepted); prompts that
  // cannot be rendered (prepare) give kTooLong (too long) or kInvalid (deadline, cancelled).
  // Optional `on_policy` is called (same thread, must not block) with each policy's result as soon
  // as its sequence ends, whatever the reason (PolicyResult::finish), every call before `done`.
  SubmitStatus submit(const ClassifyRequest& request, std::function<void(ClassifyResult)> done,
                      std::string* why = nullptr,
                      std::function<void(size_t index, const PolicyResult& result)> on_policy = {});
  // The same with the prompts already prepared (`prompts` must be prepare(request), ok()).
  SubmitStatus submit(const ClassifyRequest& request, ClassifyPrompts prompts, std::function<void(ClassifyResult)> done,
                      std::string* why = nullptr,
                      std::function<void(size_t index, const PolicyResult& result)> on_policy = {});
  // Turns one policy's generation into its result (exposed for tests and the CLI).
  PolicyResult interpret(const ClassifyPolicy& policy, const SequenceResult& generated, bool return_reasoning) const;
  // Puts the per-policy results of `request` together (flagged, usage sums, worst finish).
  ClassifyResult assemble(const ClassifyRequest& request, const std::vector<SequenceResult>& generated) const;

  // --- score mode ---
  // The forced tokens of `prefix` (ScorePrefix).
  std::vector<int32_t> score_prefix_tokens(ScorePrefix prefix) const;
  // The answers of `policy` and the positions that weigh them. Throws std::invalid_argument for a
  // policy whose format cannot be scored (kLabels without labels, more than kMaxCandidateTokens labels).
  ScorePlan score_plan(const ClassifyPolicy& policy, ScorePrefix prefix) const;
  // Turns the generations of a plan's sequences (one per node, in order) into the policy's result.
  PolicyResult score_result(const ClassifyPolicy& policy, const ScorePlan& plan,
                            const std::vector<const SequenceResult*>& generated) const;

  const Tokenizer& tokenizer() const { return tokenizer_; }
  const ClassifierOptions& options() const { return options_; }
  Scheduler& scheduler() { return scheduler_; }

 private:
  std::vector<int32_t> cached_prefix(const std::string& policy_text, ReasoningEffort effort) const;
  SequenceSpec make_sequence(std::vector<int32_t> prompt, const ClassifyRequest& request, const ClassifyPolicy& policy) const;
  // Score mode: the largest ScorePlan::generation_tokens over the request's policies (for prepare's
  // fit checks); plans are filled per policy. Throws std::invalid_argument like score_plan.
  int score_generation(const ClassifyRequest& request, std::vector<ScorePlan>* plans) const;
  SubmitStatus submit_score(const ClassifyRequest& request, ClassifyPrompts prompts, std::function<void(ClassifyResult)> done,
                            std::string* why, std::function<void(size_t, const PolicyResult&)> on_policy);

  const Tokenizer& tokenizer_;
  Scheduler& scheduler_;
  ClassifierOptions options_;
  std::vector<int32_t> close_reasoning_;
  std::vector<int32_t> prompt_suffix_;  // <|end|><|start|>assistant after the content
  // The policy prefix around the policy text, per effort: the system message and
  // <|start|>developer<|message|> before it, <|end|><|start|>user<|message|> after it.
  std::vector<int32_t> prefix_head_[3];
  std::vector<int32_t> prefix_tail_;
  mutable std::mutex prefix_mutex_;
  mutable std::map<std::pair<int, std::string>, std::vector<int32_t>> prefixes_;  // (effort, policy)
  mutable std::mutex grammar_mutex_;
  mutable std::map<std::vector<std::string>, std::shared_ptr<const VerdictGrammar>> grammars_;  // by labels
};

}  // namespace arbiter
