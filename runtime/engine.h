// Engine: one rank's executor of step plans (DESIGN.md §3; docs/architecture.md). The central scheduler decides
// admission, batching, block allocation and prefix reuse; the engine turns a StepPlan into one
// Model::forward step over its rank's KV cache, samples the tokens the plan asks for and returns
// them with their log-probabilities. It keeps nothing between steps except the KV cache contents.
//
// StepExchange carries plans and results between rank 0 and the workers over a Communicator as
// serialized protobuf messages; with no communicator (one rank) it just runs the local engine.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "runtime/model.h"
#include "runtime/step_plan.pb.h"

namespace arbiter {

class Communicator;

// The draw for one sampled position: temperature/top-p sampling over `count` candidates (ids and
// log-probabilities, largest first), seeded by (seed, position) so that a sequence's tokens do not
// depend on what else is in the batch. temperature <= 0 returns top_ids[0]. Otherwise each candidate
// weighs exp(logprob / temperature); with 0 < top_p < 1 only the smallest leading run of candidates
// holding at least top_p of that weight (at least one) stays; one draw of a counter-based generator
// keyed by (seed, position) picks among them. The engine passes the position the new token takes.
int32_t sample_token(const proto::Sampling& sampling, int64_t position, const int32_t* top_ids,
                     const float* top_logprobs, int count);

// One rank's executor of step plans over its Model and KV cache.
class Engine {
 public:
  // Candidates kept per sampled row for temperature/top-p sampling (and the most top_logprobs reported).
  static constexpr int kSampleCandidates = Model::kMaxTopLogprobs;
  // The most alternatives a sequence may ask for (SequenceWork.top_logprobs).
  static constexpr int kMaxReportedLogprobs = 20;

  explicit Engine(Model& model);

  // Runs one step. Under expert parallelism this is collective: every rank calls run() once per step,
  // with an empty plan when it has no sequences. Throws std::invalid_argument for a malformed plan
  // (bad token ids, block table too short, too many rows...) before touching the cache; under expert
  // parallelism the rank still takes part in the step (with no tokens) before throwing, so the
  // other ranks' steps go on. A failure inside the forward step itself under expert parallelism
  // leaves the collectives out of step: the engine aborts the communicator and rethrows.
  //
  // Each SequenceWork becomes one sequence of the step with the plan's block table as both its
  // full-attention and its sliding-window table (serving mode: the table covers every position).
  // Samples come back in plan order for the sequences with sample = true.
  proto::StepResult run(const proto::StepPlan& plan);

  Model& model() { return model_; }
  int block_size() const;
  int num_blocks() const;       // KV blocks per layer on this rank (block 0 included; the smaller
                                // pool when full and sliding pools differ)
  int max_step_tokens() const;  // rows per step
  int max_step_samples() const; // sampled sequences per step

 private:
  proto::StepResult run_plan(const proto::StepPlan& plan);

  Model& model_;
};

// Carries step plans from rank 0 to every rank and step results back, over the same Communicator
// the model uses (the exchange's collectives and the model's interleave in the same order on every
// rank). Plans travel as one all-to-all-v from rank 0, results as one all-to-all-v to rank 0.
class StepExchange {
 public:
  // comm == nullptr (or a communicator of size 1): a single rank.
  explicit StepExchange(Communicator* comm);

  int rank() const;
  int world_size() const;

  // Rank 0: sends plans[r] to every rank r, runs plans[0] on `local`, and returns every rank's result
  // (index = rank). A rank whose step failed returns a result with `error` set (rank 0 included);
  // a broken communicator (CommError) is thrown. std::invalid_argument when plans.size() differs
  // from world_size() or a plan asks for shutdown; std::logic_error on a worker or after shutdown().
  std::vector<proto::StepResult> run_step(Engine& local, const std::vector<proto::StepPlan>& plans);
  // Rank 0: tells the workers to leave serve(). Later calls (and a single rank) do nothing.
  void shutdown();
  // Workers: receives plans and runs them until rank 0 calls shutdown(). std::logic_error on rank 0.
  void serve(Engine& local);
  // Rank 0, while there is no work: the workers wait for the next plan inside a collective whose
  // timeout would end an idle job, so once the ranks have not exchanged anything for a quarter of the
  // communicator's timeout this runs one empty step. Does nothing on a single rank.
  void keep_alive(Engine& local);

  // Called with a running count of steps: on rank 0 each time one is sent to the workers (before
  // they run it), on a worker each time it has completed one. For liveness checks (heartbeats).
  // Set before the first step.
  void set_step_observer(std::function<void(uint64_t steps)> observer) { observer_ = std::move(observer); }

 private:
  bool distributed() const;

  Communicator* comm_;
  bool shut_down_ = false;
  uint64_t steps_ = 0;  // rank 0: steps sent; workers: steps completed
  std::function<void(uint64_t)> observer_;
  std::chrono::steady_clock::time_point last_exchange_ = std::chrono::steady_clock::now();
};

}  // namespace arbiter
