// ServingRank: everything one rank needs to serve (DESIGN.md §3), put together once for
// `arbiter serve`, `arbiter classify` and the load generator: the model on this rank's device with a
// KV cache sized for serving, its Engine and the StepExchange; on rank 0 also the tokenizer, the
// Scheduler, the StepLoop and the Classifier; under mpirun, if asked, worker heartbeats to rank 0.
// Worker ranks call serve_workers() and return when rank 0 shuts the loop down.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "parallel/heartbeat.h"
#include "runtime/config.h"
#include "runtime/engine.h"
#include "runtime/model.h"
#include "runtime/safetensors.h"
#include "runtime/tokenizer.h"
#include "scheduler/classify.h"
#include "scheduler/scheduler.h"
#include "scheduler/step_loop.h"

namespace arbiter {

class Communicator;
class ExpertPlacement;

struct ServingOptions {
  std::string model_dir;
  std::string device = "auto";          // cpu | cuda[:N] | auto
  std::string tokenizer_dir;            // default: model_dir (tokenizer.json), else $ARBITER_TOKENIZER_DIR
  int block_size = 16;
  int kv_blocks = 0;                    // KV blocks per rank; 0: max(2048, two sequences of max_context)
  // Prompt + generated tokens per sequence. 8192 leaves every effort's default reasoning budget
  // (high: 4096) room for a prompt; ServingRank refuses budgets that leave none (check_classifier_options).
  int max_context = 8192;
  int max_step_tokens = 256;            // input tokens per step per rank
  int max_step_samples = 64;            // sequences sampled per step per rank
  int max_queued_requests = 1024;
  bool prefix_caching = true;
  ClassifierOptions classifier;
  // Process ranks (mpirun, more than one): worker heartbeats to rank 0 (parallel/heartbeat.h), so
  // rank 0 sees a rank that died or stalls. heartbeat_timeout 0: none; step_timeout 0: no step limit.
  double heartbeat_timeout = 0;
  double step_timeout = 0;
  // Expert-load statistics (ModelOptions::count_expert_load): read by StepLoop::expert_load, /metrics
  // and GET /v1/stats/experts (`arbiter serve` and `arbiter bench` turn them on).
  bool count_expert_load = false;
  // The dispatcher's earlier host-staged path (ModelOptions::ep_host_staged).
  bool ep_host_staged = false;
};

class ServingRank {
 public:
  // comm: this rank's communicator (nullptr: a single rank). Collective across ranks.
  ServingRank(const ServingOptions& options, Communicator* comm = nullptr,
              std::shared_ptr<const ExpertPlacement> placement = nullptr);
  ~ServingRank();

  bool leads() const;  // rank 0
  int world_size() const;
  const ServingOptions& options() const { return options_; }
  const ModelConfig& config() const { return config_; }
  std::string model_name() const;       // the model folder's name

  // Rank 0 only (throw std::logic_error elsewhere).
  const Tokenizer& tokenizer() const;
  Scheduler& scheduler();
  StepLoop& loop();
  Classifier& classifier();

  // Workers: runs steps until rank 0's loop stops. Rank 0: returns at once.
  void serve_workers();

  // This rank's model (profiling, expert-load counters): touch it only while no step runs (before
  // the loop starts, after it stopped, or on the loop's thread).
  Model& model() { return *model_; }

  // Rank 0: why the ranks cannot serve right now, nullopt while they can: the step exchange broke
  // (fatal), a worker died (fatal) or a worker stalls (heartbeats; may end). Thread-safe; always
  // nullopt on other ranks and where there are no heartbeats (one rank, thread ranks).
  std::optional<RankFault> rank_fault() const;

 private:
  ServingOptions options_;
  Communicator* comm_;
  ModelConfig config_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<Engine> engine_;
  Heartbeat heartbeat_;  // before exchange_, whose step observer feeds it
  std::unique_ptr<StepExchange> exchange_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<StepLoop> loop_;
  std::unique_ptr<Classifier> classifier_;
};

}  // namespace arbiter
