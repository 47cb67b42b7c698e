#include "scheduler/step_loop.h"

#include <algorithm>
#include <exception>
#include <string>

#include "parallel/communicator.h"

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

bool StepLoop::step_once() {
  const auto t0 = Clock::now();
  bool ran = false;
  try {
    const std::vector<proto::StepPlan> plans = scheduler_.plan_step();
    const auto t1 = Clock::now();
    std::vector<proto::StepResult> results;
    ran = has_sequences(plans);
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
