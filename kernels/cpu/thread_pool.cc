#include "kernels/cpu/thread_pool.h"

#include <algorithm>
#include <chrono>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace arbiter::cpu {
namespace {

// How long a worker polls for the next call, and a caller for its workers, before sleeping.
constexpr auto kWorkerSpin = std::chrono::microseconds(200);
constexpr auto kCallerSpin = std::chrono::microseconds(100);

// Polls `done` (cheaply) until it holds or `limit` has passed; true if it held.
template <typename Done>
bool spin_until(const Done& done, std::chrono::microseconds limit) {
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0;; ++i) {
    if (done()) return true;
#if defined(__x86_64__)
    _mm_pause();
#endif
    if ((i & 63) == 63 && std::chrono::steady_clock::now() - start > limit) return false;
  }
}

}  // namespace

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    stop_seen_.store(true, std::memory_order_release);
  }
  start_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_chunks() {
  for (;;) {
    int64_t begin;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (next_ >= total_) return;
      begin = next_;
      next_ += chunk_;
    }
    (*body_)(begin, std::min(total_, begin + chunk_));
  }
}

void ThreadPool::worker_loop(int /*index*/) {
  uint64_t seen = 0;
  for (;;) {
    spin_until([&] {
      return stop_seen_.load(std::memory_order_acquire) || generation_seen_.load(std::memory_order_acquire) != seen;
    }, kWorkerSpin);
    {
      std::unique_lock<std::mutex> lock(mutex_);
      start_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      busy_seen_.store(++busy_, std::memory_order_release);
    }
    run_chunks();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      busy_seen_.store(--busy_, std::memory_order_release);
      if (busy_ == 0) done_cv_.notify_all();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (workers_.empty() || n <= grain) {
    body(0, n);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mutex_);
  const int64_t threads = size();
  // A few chunks per thread balances uneven work without much locking.
  int64_t chunk = std::max(grain, (n + threads * 4 - 1) / (threads * 4));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    body_ = &body;
    total_ = n;
    chunk_ = chunk;
    next_ = 0;
    ++generation_;
    generation_seen_.store(generation_, std::memory_order_release);
  }
  start_cv_.notify_all();
  run_chunks();
  // Every chunk is claimed now; wait for the workers still running one (a worker that has not woken
  // up yet will find nothing left and is not waited for).
  spin_until([&] { return busy_seen_.load(std::memory_order_acquire) == 0; }, kCallerSpin);
  std::unique_lock<std::mutex> lock(mutex_);
  done_cv_.wait(lock, [&] { return busy_ == 0 && next_ >= total_; });
  body_ = nullptr;
}

}  // namespace arbiter::cpu
