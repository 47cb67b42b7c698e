// StepLoop: the thread on rank 0 that drives serving (DESIGN.md §3): it asks the Scheduler for a
// step plan per rank, runs the step on every rank through the StepExchange (rank 0's own Engine
// included), and hands the results back to the Scheduler, for as long as there is work (while idle it
// keeps the workers' wait for the next plan from timing out: StepExchange::keep_alive). It also
// measures where the time goes: planning and result handling (scheduler), the plan/result exchange,
// and the forward step itself.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "runtime/engine.h"
#include "scheduler/scheduler.h"

namespace arbiter {

struct StepLoopStats {
  uint64_t steps = 0;
  double scheduler_seconds = 0;  // plan_step + complete_step
  double exchange_seconds = 0;   // run_step wall time minus the slowest rank's forward time
  double forward_seconds = 0;    // the slowest rank's forward time, summed over steps
  double step_seconds = 0;       // whole steps, wall clock
  // Step latency histogram (wall clock): counts of steps with latency <= kStepBuckets[i] seconds; the
  // last count is +Inf.
  static constexpr double kStepBuckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
  std::vector<uint64_t> step_histogram = std::vector<uint64_t>(std::size(kStepBuckets) + 1, 0);
};

// Expert-load statistics summed over the ranks (StepLoop::expert_load).
struct ExpertLoadSnapshot {
  std::vector<std::vector<int64_t>> load;  // [layer][expert] tokens routed since start; empty: none yet
  std::vector<int64_t> rank_tokens;        // per rank, the tokens its experts processed (all layers)
  std::vector<double> rank_imbalance;      // per layer: the most loaded rank's tokens over the mean
  std::vector<double> expert_imbalance;    // per layer: the most loaded expert's tokens over the mean
};

class StepLoop {
 public:
  StepLoop(Scheduler& scheduler, Engine& local, StepExchange& exchange);
  ~StepLoop();  // stop(false)
  StepLoop(const StepLoop&) = delete;
  StepLoop& operator=(const StepLoop&) = delete;

  void start();
  // drain = true: stops accepting requests and returns once every in-flight request finished;
  // drain = false: fails what is in flight. Either way the workers are shut down.
  void stop(bool drain);
  // Runs steps on the calling thread until the scheduler has no work (offline batch use), or the
  // exchange with the other ranks broke (failure()).
  void run_until_idle();

  StepLoopStats stats() const;  // thread-safe
  // Thread-safe: the last snapshot of the expert-load counters of every rank (empty before the
  // first), and a request for a fresh one: the next step that runs at least a second after the last
  // snapshot collects every rank's counters with its results (they are read rarely, not per step).
  ExpertLoadSnapshot expert_load() const;
  // Why the loop stopped stepping for good: the exchange with the other ranks broke (CommError, e.g.
  // a rank died or stalled past the communicator's timeout); nullopt while it runs. Thread-safe.
  std::optional<std::string> failure() const;

 private:
  // Plans, runs and completes one step; false when the plan had nothing to run. A step that throws
  // fails what was in flight (Scheduler::fail_all) and the loop goes on, unless the communicator broke:
  // then the loop records failure() and stops stepping (the workers cannot take part any more).
  bool step_once();
  // Sums the ranks' expert-load counters of a step's results into expert_load_.
  void update_expert_load(const std::vector<proto::StepResult>& results);
  void thread_main();
  void set_failure(const std::string& why);

  Scheduler& scheduler_;
  Engine& local_;
  StepExchange& exchange_;
  std::atomic<bool> running_{false};
  std::thread thread_;
  mutable std::mutex stats_mutex_;
  StepLoopStats stats_;
  std::optional<std::string> failure_;  // under stats_mutex_
  bool workers_shut_down_ = false;
  mutable std::atomic<bool> want_expert_load_{false};
  std::chrono::steady_clock::time_point last_expert_load_{};
  ExpertLoadSnapshot expert_load_;  // under stats_mutex_
};

}  // namespace arbiter
