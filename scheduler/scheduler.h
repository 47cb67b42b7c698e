// Scheduler: the central scheduler on rank 0 (DESIGN.md §3; scheduler/README.md). It owns every decision:
// the request queue, continuous batching with chunked prefill under a per-step token budget, KV
// block allocation for every rank, prefix caching (scheduler/prefix_cache.h), routing of new
// sequences to the rank that caches their prefix (balanced against load), preemption when a rank
// runs out of blocks (the sequence is recomputed later), cancellation, deadlines and stop rules.
// Each step it produces one proto::StepPlan per rank and consumes their proto::StepResults.
//
// Each step, per rank: every running sequence with one token to feed decodes (in placement order),
// then prefill chunks first come first served (a prompt, forced closing tokens, or a recompute after
// preemption), within max_step_tokens / max_step_samples / max_prefill_chunk. Waiting sequences are
// placed, first come first served, on the rank with the least estimated work (uncached tokens there
// plus that rank's queued prompt work and running sequences), among ranks that can hold all their
// tokens now; a sequence waits instead when a rank is computing more of its prefix right now (a
// burst under a new policy computes the policy once per rank). One block table per sequence serves
// every layer. When a sequence needs a block and the
// rank has none (after evicting unreferenced cached blocks), the most recently placed sequence not
// yet in the step is preempted: its blocks are released (the cached ones stay cached) and it goes
// back to the front of the queue to recompute prompt + generated tokens, with the same output.
//
// Threading: submit(), cancel(), warm() and stats() are thread-safe (the HTTP threads call them);
// plan_step() / complete_step() are called by one thread, the step loop (scheduler/step_loop.h).
// Callbacks run on the step-loop thread, outside the scheduler's lock (they may call submit() or
// cancel()), and must not block; an exception thrown by one is swallowed.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "runtime/step_plan.pb.h"
#include "runtime/verdict_grammar.h"

namespace arbiter {

// Harmony stop tokens (DESIGN.md §2): generation ends on <|return|> or <|call|>.
inline constexpr int32_t kTokenReturn = 200002;
inline constexpr int32_t kTokenCall = 200012;
inline constexpr int32_t kTokenEndOfText = 199999;
inline constexpr int32_t kTokenEnd = 200007;  // <|end|>: closes a message (the analysis one)
// The most candidate tokens a sequence may ask for (Model::kMaxCandidateTokens, what the engine scores).
inline constexpr int kMaxCandidateTokens = 256;

// One generation: a prompt and how to continue it.
struct SequenceSpec {
  std::vector<int32_t> prompt;
  int max_new_tokens = 1024;  // generated tokens, forced ones included
  // Analysis-channel budget: once this many tokens were generated while the sequence is still in its
  // first message (before the first <|end|>), the scheduler closes it by feeding `close_reasoning`
  // (the Classifier renders `<|end|><|start|>assistant<|channel|>final<|message|>`) as forced tokens,
  // so the model must answer. -1 or an empty close_reasoning: no budget.
  int max_reasoning_tokens = -1;
  std::vector<int32_t> close_reasoning;
  proto::Sampling sampling;   // default: greedy
  int top_logprobs = 0;       // alternatives reported per generated token (0..20)
  // Tokens whose log-probabilities are reported with every sampled token, whether or not they are
  // among the top ones (verdict-only scoring weighs the allowed answers with them); at most
  // kMaxCandidateTokens.
  std::vector<int32_t> candidate_tokens;
  // Only the candidates matter (proto::SequenceWork::candidates_only): the generated token is the
  // most likely candidate and the candidates' log-probabilities are renormalised over them; steps
  // made only of such sequences evaluate the lm_head on the candidates' rows alone.
  bool candidates_only = false;
  std::vector<int32_t> stop_tokens = {kTokenReturn, kTokenCall, kTokenEndOfText};
  // Optional: a constrained final answer. Once the generation enters the final channel's content
  // (after `<|channel|>final ...<|message|>`, sampled or forced), every token the scheduler asks a
  // rank to sample carries the grammar's allowed ids for that position (SequenceWork.allowed_tokens),
  // so the answer is one of the grammar's and ends with its stop token. The analysis channel and
  // everything before the final content stay free. The prompt must end with `<|start|>assistant`
  // (the generation begins in the assistant message's header). Null: never constrained.
  std::shared_ptr<const VerdictGrammar> final_grammar;
};

struct GeneratedToken {
  int32_t token = 0;
  float logprob = 0;                          // 0 for forced tokens
  std::vector<proto::TokenLogprob> top;       // empty for forced tokens
  bool forced = false;                        // fed by the scheduler (reasoning budget), not sampled
  std::vector<proto::TokenLogprob> candidates = {};  // SequenceSpec::candidate_tokens' log-probabilities, in order
};

enum class FinishReason { kStop, kLength, kCancelled, kDeadline, kError };
const char* to_string(FinishReason reason);

struct SequenceResult {
  std::vector<GeneratedToken> tokens;  // everything after the prompt (the stop token included)
  FinishReason finish = FinishReason::kStop;
  std::string error;                   // kError: why
  int prompt_tokens = 0;
  int cached_tokens = 0;               // prompt tokens taken from the prefix cache on first admission
  int reasoning_tokens = 0;            // generated while still in the analysis message
  int preemptions = 0;
  int rank = -1;                       // where it ran (last)
};

// A group of sequences that share an id, a deadline and a cancellation (one classify request fans
// out into one sequence per policy).
struct RequestSpec {
  std::string id;                      // unique among live requests
  std::vector<SequenceSpec> sequences;
  std::optional<std::chrono::steady_clock::time_point> deadline;
  // The continuation of work admitted before (a cascade's next stage): never refused with kQueueFull,
  // so an admitted request cannot fail half-way for a queue that filled up after it.
  bool continuation = false;
  // Background work (a job item): its sequences are placed after the foreground ones waiting with
  // them, except that one in every SchedulerOptions::background_every placements is background
  // work while some waits (so jobs never starve), and they are preempted first.
  bool background = false;
  // Optional streaming: called after each step with each new token of sequence `index`.
  std::function<void(int index, const GeneratedToken& token)> on_token;
  // Optional: called once per sequence as soon as sequence `index` finishes (for any reason), with
  // the result on_done will also get; every call comes before on_done (a request's callers can act
  // on one policy's answer while its other sequences still run).
  std::function<void(int index, const SequenceResult& result)> on_sequence_done;
  // Called exactly once, when every sequence has finished (results in the order of `sequences`).
  std::function<void(std::vector<SequenceResult> results)> on_done;
};

enum class SubmitStatus { kAccepted, kQueueFull, kTooLong, kInvalid, kShuttingDown };
const char* to_string(SubmitStatus status);

struct SchedulerOptions {
  int num_ranks = 1;
  int blocks_per_rank = 1024;   // KV blocks per rank (block 0 is reserved, never handed out)
  int block_size = 16;
  int max_step_tokens = 512;    // input tokens per step per rank (the Model's max_step_rows)
  int max_step_samples = 64;    // sampled sequences per step per rank (the Model's max_logit_rows);
                                // also the most sequences placed on one rank at once
  int max_prefill_chunk = 512;  // prefill tokens of one sequence per step
  int max_context = 8192;       // prompt + generated tokens of one sequence (capped at what one
                                // rank's blocks hold: (blocks_per_rank - 1) * block_size)
  int max_queued_requests = 1024;  // requests with a sequence still waiting for a rank
  // While background sequences wait, at least one in this many placements is one of them.
  int background_every = 8;
  bool prefix_caching = true;
  // Routing: a new sequence goes to the rank with the least estimated work, counting the tokens it
  // must compute there (its prompt minus what that rank caches), the prompt tokens still to compute
  // of the sequences already placed there, and this many tokens per sequence running there.
  int route_load_tokens = 32;
};

struct RankStats {
  int running = 0;              // sequences placed on this rank
  int blocks_used = 0;          // referenced by running sequences
  int blocks_cached = 0;        // unreferenced but kept by the prefix cache (evictable)
  int blocks_total = 0;         // usable blocks (blocks_per_rank - 1: block 0 is reserved)
  uint64_t evictions = 0;       // cached blocks evicted to make room
};

struct SchedulerStats {
  int queued_requests = 0;
  int waiting_sequences = 0;    // admitted to the queue, not placed on a rank yet (or preempted)
  int running_sequences = 0;
  uint64_t steps = 0;
  uint64_t prefill_tokens = 0;  // prompt tokens computed
  uint64_t cached_tokens = 0;   // prompt tokens reused from the prefix cache
  uint64_t decode_tokens = 0;   // tokens sampled
  uint64_t prefix_lookups = 0;  // sequences admitted
  uint64_t prefix_hits = 0;     // of them, with at least one cached block
  uint64_t preemptions = 0;
  uint64_t finished[5] = {};    // by FinishReason
  int last_step_tokens = 0;     // input tokens of the last step, all ranks
  std::vector<RankStats> ranks;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerOptions& options);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Thread-safe. kTooLong: a prompt (+1) exceeds max_context or the rank's blocks; kInvalid: no
  // sequences, an empty prompt, max_new_tokens < 1, top_logprobs outside 0..20 or a duplicate live
  // id; kQueueFull: max_queued_requests requests are waiting for a rank; `why` (optional) says what.
  // A request's deadline is checked at every plan and completion (one that already passed finishes
  // with kDeadline at the next step).
  SubmitStatus submit(RequestSpec request, std::string* why = nullptr);
  // Thread-safe. Finishes the request's sequences with kCancelled (on_done is called). Unknown ids: no-op.
  void cancel(const std::string& request_id);
  // Thread-safe. Computes `prefix` into the prefix cache of `rank` (-1: every rank) ahead of traffic,
  // as a sequence that samples nothing. No-op when prefix caching is off.
  void warm(std::vector<int32_t> prefix, int rank = -1);
  // Thread-safe. No new requests are accepted (kShuttingDown); in-flight ones go on.
  void stop_accepting();
  SchedulerStats stats() const;

  // Step-loop thread.
  bool has_work() const;  // thread-safe
  // Blocks until there is work or `timeout` passes; returns has_work().
  bool wait_for_work(std::chrono::milliseconds timeout);
  // Plans one step: plans[r] for every rank r (possibly empty).
  std::vector<proto::StepPlan> plan_step();
  // Applies the ranks' results of the step just planned: appends tokens, applies stop rules,
  // budgets and deadlines, registers newly filled blocks in the prefix cache, finishes sequences.
  // A result with `error` finishes that rank's sequences of the step with kError.
  void complete_step(const std::vector<proto::StepResult>& results);
  // Finishes every live sequence with kError (`why`), e.g. when a rank died.
  void fail_all(const std::string& why);

  // Tests and debugging: checks the block accounting of every rank (reference counts equal the
  // block-table entries of live sequences, blocks being written are private, free + used + cached
  // blocks = all, prefix chains intact); returns the first violation, empty when consistent.
  std::string check_consistency() const;
  // Drops every unreferenced cached block on every rank (a cold prefix cache).
  void clear_prefix_cache();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace arbiter
