#include "scheduler/step_loop.h"

#include <algorithm>
#include <exception>
#include <string>

#include "parallel/communicator.h"
#include "parallel/expert_placement.h"

namespace arbiter {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

bool has_sequences(const std::vector<proto::StepPlan>& plans) {
  return std::any_of(plans.begin(), plans.end(), [](const proto::StepPlan& p) { return p.sequences_size() > 0; });
}

}  // namespace

StepLoop::StepLoop(Scheduler& scheduler, Engine& local, StepExchange& exchange)
    : scheduler_(scheduler), local_(local), exchange_(exchange) {}

StepLoop::~StepLoop() {
  try {
    stop(false);
  } catch (...) {
    // A destructor must not throw; the workers may already be gone.
  }
}

void StepLoop::start() {
  if (running_.exchange(true)) return;
  thread_ = std::thread([this] { thread_main(); });
}

void StepLoop::stop(bool drain) {
  if (drain) {
    scheduler_.stop_accepting();
    if (thread_.joinable()) {
      while (scheduler_.has_work() && running_) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    } else {
      run_until_idle();
    }
  }
  running_ = false;
  if (thread_.joinable()) thread_.join();
  if (!drain) scheduler_.fail_all("the server is stopping");
  if (failure()) workers_shut_down_ = true;  // the exchange is broken: the workers cannot be reached
  if (!workers_shut_down_) {
    workers_shut_down_ = true;
    exchange_.shutdown();
  }
}

void StepLoop::run_until_idle() {
  while (scheduler_.has_work() && !failure()) {
    if (!step_once()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

StepLoopStats StepLoop::stats() const {
  std::lock_guard lock(stats_mutex_);
  return stats_;
}

std::optional<std::string> StepLoop::failure() const {
  std::lock_guard lock(stats_mutex_);
  return failure_;
}

void StepLoop::set_failure(const std::string& why) {
  {
    std::lock_guard lock(stats_mutex_);
    if (!failure_) failure_ = why;
  }
  running_ = false;  // no more steps: a drain waiting on the loop returns
}

void StepLoop::thread_main() {
  while (running_) {
    if (!scheduler_.wait_for_work(std::chrono::milliseconds(50))) {
      try {
        exchange_.keep_alive(local_);
      } catch (const CommError& e) {
        set_failure(std::string("the exchange with the other ranks failed: ") + e.what());
      } catch (const std::exception&) {
        // An empty step that failed on a rank serves nobody: the next one will tell.
      }
      continue;
    }
    // A step with nothing to run (e.g. every sequence waits for blocks) waits a little instead of spinning.
    if (!step_once()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

ExpertLoadSnapshot StepLoop::expert_load() const {
  want_expert_load_ = true;
  std::lock_guard lock(stats_mutex_);
  return expert_load_;
}

void StepLoop::update_expert_load(const std::vector<proto::StepResult>& results) {
  const Model& model = local_.model();
  const ModelConfig& c = model.config();
  const size_t L = static_cast<size_t>(c.num_hidden_layers), E = static_cast<size_t>(c.num_local_experts);
  ExpertLoadSnapshot snap;
  snap.load.assign(L, std::vector<int64_t>(E, 0));
  for (const auto& r : results) {
    if (static_cast<size_t>(r.expert_load_size()) != L * E) return;  // a rank that does not count
    for (size_t i = 0; i < L * E; ++i) snap.load[i / E][i % E] += r.expert_load(static_cast<int>(i));
  }
  const int ranks = static_cast<int>(results.size());
  const ExpertPlacement placement = model.options().placement && ranks > 1
                                        ? *model.options().placement
                                        : ExpertPlacement::contiguous(static_cast<int>(E), std::max(ranks, 1));
  snap.rank_tokens.assign(static_cast<size_t>(ranks), 0);
  for (size_t l = 0; l < L; ++l) {
    std::vector<int64_t> per_rank(static_cast<size_t>(ranks), 0);
    int64_t total = 0, most = 0;
    for (size_t e = 0; e < E; ++e) {
      per_rank[static_cast<size_t>(placement.owner(static_cast<int>(l), static_cast<int>(e)))] += snap.load[l][e];
      total += snap.load[l][e];
      most = std::max(most, snap.load[l][e]);
    }
    for (int r = 0; r < ranks; ++r) snap.rank_tokens[static_cast<size_t>(r)] += per_rank[static_cast<size_t>(r)];
    const int64_t rank_most = *std::max_element(per_rank.begin(), per_rank.end());
    snap.rank_imbalance.push_back(total ? static_cast<double>(rank_most) * ranks / static_cast<double>(total) : 1.0);
    snap.expert_imbalance.push_back(total ? static_cast<double>(most) * static_cast<double>(E) / static_cast<double>(total) : 1.0);
  }
  std::lock_guard lock(stats_mutex_);
  expert_load_ = std::move(snap);
}

bool StepLoop::step_once() {
  const auto t0 = Clock::now();
  bool ran = false;
  try {
    std::vector<proto::StepPlan> plans = scheduler_.plan_step();
    const auto t1 = Clock::now();
    std::vector<proto::StepResult> results;
    ran = has_sequences(plans);
    const bool collect_load = ran && want_expert_load_.load() && t0 - last_expert_load_ >= std::chrono::seconds(1);
    if (collect_load)
      for (auto& plan : plans) plan.set_report_expert_load(true);
    if (ran) {
      results = exchange_.run_step(local_, plans);
    } else {
      // Nothing to compute: skip the exchange, but let the scheduler see deadlines and cancellations.
      results.resize(plans.size());
      for (size_t r = 0; r < plans.size(); ++r) {
        results[r].set_step(plans[r].step());
        results[r].set_rank(static_cast<int32_t>(r));
      }
    }
    const auto t2 = Clock::now();
    if (collect_load) {
      want_expert_load_ = false;
      last_expert_load_ = t0;
      update_expert_load(results);
    }
    scheduler_.complete_step(results);
    const auto t3 = Clock::now();

    double forward = 0;
    for (const auto& result : results) forward = std::max(forward, result.forward_seconds());
    const double step = seconds(t3 - t0);
    std::lock_guard lock(stats_mutex_);
    if (ran) {
      ++stats_.steps;
      stats_.forward_seconds += forward;
      stats_.exchange_seconds += std::max(0.0, seconds(t2 - t1) - forward);
      stats_.step_seconds += step;
      const auto bucket = std::lower_bound(std::begin(StepLoopStats::kStepBuckets), std::end(StepLoopStats::kStepBuckets), step);
      ++stats_.step_histogram[static_cast<size_t>(bucket - std::begin(StepLoopStats::kStepBuckets))];
    }
    stats_.scheduler_seconds += seconds(t1 - t0) + seconds(t3 - t2);
  } catch (const CommError& e) {
    // The collectives are out of step with the other ranks for good: no later step can run.
    set_failure(std::string("the exchange with the other ranks failed: ") + e.what());
    scheduler_.fail_all(*failure());
  } catch (const std::exception& e) {
    // The step is lost; what was in flight fails, the loop goes on with new requests.
    scheduler_.fail_all(std::string("step failed: ") + e.what());
  } catch (...) {
    scheduler_.fail_all("step failed");
  }
  return ran;
}

}  // namespace arbiter
