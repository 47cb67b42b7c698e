// Engine: one rank's executor of step plans (DESIGN.md §3, issue 6). The central scheduler decides
// admission, batching, block allocation and prefix reuse; the engine turns a StepPlan into one
// Model::forward step over its rank's KV cache, samples the tokens the plan asks for and returns
// them with their log-probabilities. It keeps nothing between steps except the KV cache contents.
//
// StepExchange carries plans and results between rank 0 and the workers over a Communicator as
// serialized protobuf messages; with no communicator (one rank) it just runs the local engine.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/model.h"
#include "runtime/step_plan.pb.h"

namespace arbiter {

class Communicator;

// The draw for one sampled position: temperature/top-p sampling over `top` candidates (ids and
// log-probabilities, largest first), seeded by (seed, position) so that a sequence's tokens do not
// depend on what else is in the batch. temperature <= 0 returns top[0].
int32_t sample_token(const proto::Sampling& sampling, int64_t position, const int32_t* top_ids,
                     const float* top_logprobs, int count);

class Engine {
 public:
  // Candidates kept per sampled row for temperature/top-p sampling (and the most top_logprobs reported).
  static constexpr int kSampleCandidates = Model::kMaxTopLogprobs;

  explicit Engine(Model& model);

  // Runs one step. Under expert parallelism this is collective: every rank calls run() once per step,
  // with an empty plan when it has no sequences. Throws std::invalid_argument for a malformed plan
  // (bad token ids, block table too short, too many rows) before touching the cache.
  proto::StepResult run(const proto::StepPlan& plan);

  Model& model() { return model_; }
  int block_size() const;
  int num_blocks() const;       // KV blocks per layer on this rank (block 0 included)
  int max_step_tokens() const;  // rows per step
  int max_step_samples() const; // sampled sequences per step

 private:
  Model& model_;
};

class StepExchange {
 public:
  // comm == nullptr (or a communicator of size 1): a single rank.
  explicit StepExchange(Communicator* comm);

  int rank() const;
  int world_size() const;

  // Rank 0: sends plans[r] to every rank r, runs plans[0] on `local`, and returns every rank's result
  // (index = rank). A rank whose step failed returns a result with `error` set.
  std::vector<proto::StepResult> run_step(Engine& local, const std::vector<proto::StepPlan>& plans);
  // Rank 0: tells the workers to leave serve().
  void shutdown();
  // Workers: receives plans and runs them until rank 0 calls shutdown().
  void serve(Engine& local);

 private:
  Communicator* comm_;
};

}  // namespace arbiter
