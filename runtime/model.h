// Model: the gpt-oss forward pass (DESIGN.md §1), written once against the Backend interface.
// One forward() call runs one step: any mix of prefill chunks and decode tokens from many
// sequences, reading and extending the paged KV cache through the block tables in the StepLayout.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "kernels/backend.h"
#include "runtime/config.h"
#include "runtime/kv_cache.h"
#include "runtime/weights.h"

namespace arbiter {

class Communicator;
class ExpertPlacement;
class MoeDispatcher;

struct ModelOptions {
  int max_step_rows = 512;   // tokens per forward step (the activation workspace is sized for it)
  int max_logit_rows = 64;   // rows per step whose logits can be requested
  KvCacheOptions kv;
  ExpertRange experts;       // experts this rank holds (all by default)
  // Expert parallelism (DESIGN.md §3, parallel/): with a communicator of more than one rank, this
  // rank loads only its placement's experts (`experts` is then ignored), every MoE layer runs through
  // parallel/'s dispatcher, construction and forward() are collective (every rank calls forward() once
  // per step, with zero tokens if it has none, or serve_peers() when it has no more steps), and the
  // ranks check at construction that they run the same config, weight files and placement.
  Communicator* comm = nullptr;                      // not owned; must outlive the Model
  std::shared_ptr<const ExpertPlacement> placement;  // default: contiguous blocks over comm->size()
  // The dispatcher's earlier host-staged path (MoeDispatcher::Path::kHostStaged) instead of the
  // backend's dispatch and combine operations; for comparisons and benchmarks.
  bool ep_host_staged = false;
  // The dispatcher's fixed-capacity exchange (MoeDispatcher::Exchange::kCapacity) is used for a step
  // when its most rows on any rank * ranks * hidden <= this; 0: never (every step counts rows first).
  int64_t ep_capacity_limit = int64_t{1} << 21;  // MoeDispatcher::kDefaultCapacityLimit
  // Expert-load statistics: per layer and expert, the tokens this rank routed there, counted on the
  // backend (one small operation per layer; under expert parallelism inside the dispatch's packing)
  // and read only by expert_load(). Off: nothing is counted.
  bool count_expert_load = false;
};

// Where a rank's forward time went (Model::set_profiling), seconds summed over steps.
struct ForwardPhaseTimes {
  double forward = 0;   // whole forward steps (run(), synchronized at the end)
  double dispatch = 0, experts = 0, combine = 0, wait = 0;  // the MoE phases (MoePhaseTimes), all layers
  uint64_t steps = 0;
  // forward minus the MoE phases: attention, dense projections, norms, router, lm_head.
  double dense() const { return forward - dispatch - experts - combine - wait; }
};

// YaRN (NTK-by-parts) inverse frequencies and concentration for a config (DESIGN.md §1, gpt-oss.md §4.3).
RopeParams yarn_rope_params(const ModelConfig& config);

// Per requested logit row, the k most likely tokens (largest first) and their log-probabilities:
// row r's entries are ids[r * k + j], logprobs[r * k + j].
struct TopLogprobs {
  int k = 0;
  std::vector<int32_t> ids;
  std::vector<float> logprobs;
  // forward_top with candidate tokens: per requested row, the log-probabilities of that row's
  // candidates, in their order (empty for a row that asked for none).
  std::vector<std::vector<float>> candidate_logprobs;
};

class Model {
 public:
  static constexpr int kMaxTopLogprobs = 64;
  // The most candidate tokens one requested row may ask forward_top for.
  static constexpr int kMaxCandidateTokens = 256;

  Model(const ModelConfig& config, const Checkpoint& checkpoint, Backend& backend, const ModelOptions& options = {});
  ~Model();

  // Runs one step. Returns the logits of layout.logit_rows as float32 [logit_rows, vocab] on the host.
  std::vector<float> forward(const StepLayout& layout);
  // Same, but returns only the argmax of each requested row (no logits copied to the host).
  std::vector<int32_t> forward_argmax(const StepLayout& layout);
  // Same, but returns the top k (1..kMaxTopLogprobs) tokens of each requested row with their
  // log-probabilities (ids[r * k] is the argmax). Only these leave the device.
  TopLogprobs forward_top(const StepLayout& layout, int k);
  // Same, and for each requested row r the log-probabilities of the tokens candidates[r] (at most
  // kMaxCandidateTokens; `candidates` is empty or has one entry per requested row), whether or not
  // they are among the top k: the answers verdict-only scoring must weigh (Backend::token_logprobs).
  TopLogprobs forward_top(const StepLayout& layout, int k, const std::vector<std::vector<int32_t>>& candidates);
  // Runs one step with the lm_head restricted to each requested row's candidate tokens
  // (Backend::linear_rows): returns, per requested row, the logits of candidates[r] in their order
  // (not normalised: the rest of the vocabulary is never computed). Each row needs 1 to
  // kMaxCandidateTokens candidates. Such steps are never recorded (Backend::run_step): they run directly.
  std::vector<std::vector<float>> forward_candidates(const StepLayout& layout,
                                                     const std::vector<std::vector<int32_t>>& candidates);
  // After a forward step: the log-probabilities of tokens[i] in requested logit row rows[i] (index
  // into that step's logit_rows) under the row's whole softmax (Backend::token_logprobs). For
  // constrained sampling, whose allowed tokens need not be among the top k. Local to this rank.
  std::vector<float> step_logprobs(std::span<const int32_t> rows, std::span<const int32_t> tokens);
  // Expert parallelism: this rank has no (more) steps of its own; takes part in the other ranks'
  // steps with zero tokens until no rank has steps left. A no-op on a single rank.
  void serve_peers();

  // Expert-load statistics (options().count_expert_load; empty otherwise): [layer][expert] tokens
  // this rank routed to that expert since construction or the last reset (a download of the
  // counters: call it rarely, between steps, on the thread that runs the steps).
  std::vector<std::vector<int64_t>> expert_load();
  void reset_expert_load();
  // Phase timers (off by default); on one rank only forward, steps and (on a host-memory backend)
  // experts are filled.
  void set_profiling(bool on);
  // Expert parallelism: payload bytes this rank sent to other ranks so far (dispatch and combine);
  // 0 on a single rank.
  uint64_t bytes_sent_to_peers() const;
  ForwardPhaseTimes phase_times() const;
  void reset_phase_times();

  const ModelConfig& config() const { return config_; }
  const ModelOptions& options() const { return options_; }
  KvCache& kv_cache() { return kv_; }
  Backend& backend() { return backend_; }
  // The weights as the backend holds them (benchmarks read the very bytes the steps read).
  const ModelWeights& weights() const { return weights_; }

 private:
  // Log-probabilities of a [n, m] table of token ids (-1 padded) under the softmax of the last
  // step's first n logit rows, through the candidate buffers (n <= max_logit_rows, m <=
  // kMaxCandidateTokens).
  std::vector<float> score_table(const std::vector<int32_t>& table, int64_t n, int64_t m);
  // One activation / output buffer: the member that views it, its dtype and shape.
  struct BufferSpec {
    Tensor Model::*member;
    DType dtype;
    Shape shape;
  };
  static std::vector<BufferSpec> buffer_specs(const ModelConfig& config, const ModelOptions& options, DType act);
  // Backend::reserve for everything the model will allocate, then load_weights.
  static ModelWeights reserve_and_load_weights(const ModelConfig& config, const Checkpoint& checkpoint,
                                               Backend& backend, const ModelOptions& options);
  // Runs every layer and the final norm + lm_head into logits_ for the requested rows.
  // restricted: the lm_head over these candidate tokens per logit row only, into candidate_logprobs_
  // (Model::forward_candidates).
  void run(const StepLayout& layout, const std::vector<std::vector<int32_t>>* restricted = nullptr);
  void run_empty_step();  // expert parallelism: every layer's exchange with zero tokens of our own
  void run_timed(const StepLayout& layout, const std::vector<std::vector<int32_t>>* restricted);
  // The load counters of layer i (I32 [experts]), or an empty tensor when not counting.
  Tensor load_row(size_t layer) const;

  ModelConfig config_;
  ModelOptions options_;
  Backend& backend_;
  ModelWeights weights_;
  KvCache kv_;
  RopeParams rope_;
  std::vector<DeviceBuffer> buffers_;
  Tensor x_, normed_, q_, k_, v_, attn_, delta_, router_logits_, expert_ids_, expert_weights_, final_rows_, logits_,
      argmax_, top_ids_, top_logprobs_, candidate_ids_, candidate_logprobs_, rope_table_, expert_load_;
  bool profiling_ = false;
  ForwardPhaseTimes times_;
  std::unique_ptr<MoeDispatcher> dispatcher_;  // set when expert-parallel over more than one rank
};

}  // namespace arbiter
