#include "scheduler/serving.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>

#include "kernels/backend.h"
#include "parallel/communicator.h"
#include "parallel/expert_placement.h"

namespace arbiter {
namespace {

std::string find_tokenizer(const ServingOptions& options) {
  namespace fs = std::filesystem;
  std::vector<fs::path> candidates;
  if (!options.tokenizer_dir.empty()) candidates.push_back(fs::path(options.tokenizer_dir) / "tokenizer.json");
  candidates.push_back(fs::path(options.model_dir) / "tokenizer.json");
  if (const char* env = std::getenv("ARBITER_TOKENIZER_DIR")) candidates.push_back(fs::path(env) / "tokenizer.json");
  for (const fs::path& p : candidates)
    if (fs::exists(p)) return p.string();
  std::string tried;
  for (const fs::path& p : candidates) tried += (tried.empty() ? "" : ", ") + p.string();
  throw std::runtime_error("no tokenizer.json found (tried " + tried + ")");
}

void check_options(const ServingOptions& o) {
  auto positive = [](int value, const char* what) {
    if (value <= 0) throw std::invalid_argument(std::string(what) + " must be positive (got " + std::to_string(value) + ")");
  };
  positive(o.block_size, "block size");
  positive(o.max_context, "max context");
  positive(o.max_step_tokens, "max step tokens");
  positive(o.max_step_samples, "max step samples");
  positive(o.max_queued_requests, "max queued requests");
  if (o.kv_blocks < 0) throw std::invalid_argument("kv blocks must not be negative");
  if (o.max_step_samples > 64) throw std::invalid_argument("at most 64 sequences can be sampled per step");
}

}  // namespace

ServingRank::ServingRank(const ServingOptions& options, Communicator* comm,
                         std::shared_ptr<const ExpertPlacement> placement)
    : options_(options), comm_(comm) {
  check_options(options_);
  if (options_.model_dir.empty()) throw std::invalid_argument("no model folder given");
  config_ = load_model_config((std::filesystem::path(options_.model_dir) / "config.json").string());
  // The classifier's requests must fit the context the scheduler enforces.
  options_.classifier.max_context = std::min(options_.max_context, config_.max_position_embeddings);
  // Tokenizer first (rank 0): a missing tokenizer, or reasoning budgets that leave no room for a
  // prompt in the context, should fail before minutes of weight loading.
  if (leads()) {
    tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::load(find_tokenizer(options_)));
    check_classifier_options(*tokenizer_, options_.classifier);
  }
  const int blocks_per_sequence = (options_.max_context + options_.block_size - 1) / options_.block_size;
  if (options_.kv_blocks == 0) options_.kv_blocks = std::max(2048, 2 * blocks_per_sequence + 1);
  if (options_.kv_blocks < blocks_per_sequence + 1)
    throw std::invalid_argument("kv blocks (" + std::to_string(options_.kv_blocks) + ") cannot hold one sequence of the " +
                                "max context (" + std::to_string(blocks_per_sequence + 1) + " needed)");

  checkpoint_ = std::make_unique<Checkpoint>(options_.model_dir);
  backend_ = make_backend(options_.device);
  ModelOptions mo;
  mo.max_step_rows = options_.max_step_tokens;
  mo.max_logit_rows = options_.max_step_samples;
  mo.kv.block_size = options_.block_size;
  mo.kv.full_blocks = options_.kv_blocks;
  mo.kv.sliding_blocks = options_.kv_blocks;  // serving: one block table for every layer
  mo.comm = comm_;
  mo.placement = std::move(placement);
  mo.count_expert_load = options_.count_expert_load;
  mo.ep_host_staged = options_.ep_host_staged;
  model_ = std::make_unique<Model>(config_, *checkpoint_, *backend_, mo);
  engine_ = std::make_unique<Engine>(*model_);
  exchange_ = std::make_unique<StepExchange>(comm_);
  // Thread ranks share this process (one cannot die alone); one rank has nobody to watch.
  if (comm_ && comm_->size() > 1 && comm_->name() != "threads" && options_.heartbeat_timeout > 0) {
    HeartbeatOptions ho;
    ho.timeout = options_.heartbeat_timeout;
    ho.step_timeout = options_.step_timeout;
    heartbeat_ = start_heartbeat(*comm_, ho);
    if (HeartbeatMonitor* monitor = heartbeat_.monitor.get())
      exchange_->set_step_observer([monitor](uint64_t steps) { monitor->step_started(steps); });
    if (HeartbeatSender* sender = heartbeat_.sender.get())
      exchange_->set_step_observer([sender](uint64_t steps) { sender->set_completed_steps(steps); });
  }
  if (!leads()) return;

  SchedulerOptions so;
  so.num_ranks = world_size();
  so.blocks_per_rank = options_.kv_blocks;
  so.block_size = options_.block_size;
  so.max_step_tokens = options_.max_step_tokens;
  so.max_step_samples = options_.max_step_samples;
  so.max_prefill_chunk = options_.max_step_tokens;
  so.max_context = std::min(options_.max_context, config_.max_position_embeddings);
  so.max_queued_requests = options_.max_queued_requests;
  so.prefix_caching = options_.prefix_caching;
  scheduler_ = std::make_unique<Scheduler>(so);
  loop_ = std::make_unique<StepLoop>(*scheduler_, *engine_, *exchange_);
  classifier_ = std::make_unique<Classifier>(*tokenizer_, *scheduler_, options_.classifier);
}

ServingRank::~ServingRank() {
  // The loop stops (and tells the workers) before the scheduler and the model go away.
  if (loop_) loop_->stop(false);
}

bool ServingRank::leads() const { return !comm_ || comm_->rank() == 0; }
int ServingRank::world_size() const { return comm_ ? comm_->size() : 1; }

std::string ServingRank::model_name() const {
  std::filesystem::path p(options_.model_dir);
  if (!p.has_filename()) p = p.parent_path();
  return p.filename().string();
}

namespace {
void require_lead(bool leads, const char* what) {
  if (!leads) throw std::logic_error(std::string("ServingRank::") + what + " exists on rank 0 only");
}
}  // namespace

const Tokenizer& ServingRank::tokenizer() const {
  require_lead(leads(), "tokenizer");
  return *tokenizer_;
}
Scheduler& ServingRank::scheduler() {
  require_lead(leads(), "scheduler");
  return *scheduler_;
}
StepLoop& ServingRank::loop() {
  require_lead(leads(), "loop");
  return *loop_;
}
Classifier& ServingRank::classifier() {
  require_lead(leads(), "classifier");
  return *classifier_;
}

void ServingRank::serve_workers() {
  if (leads()) return;
  exchange_->serve(*engine_);
}

std::optional<RankFault> ServingRank::rank_fault() const {
  if (loop_)
    if (auto failure = loop_->failure()) return RankFault{-1, true, *failure};
  if (heartbeat_.monitor) return heartbeat_.monitor->fault();
  return std::nullopt;
}

}  // namespace arbiter
