// ThreadPool: a fixed set of worker threads that split index ranges among themselves
// (parallel_for). The CPU backend owns one; kernels receive it to use every core. Between calls a
// worker spins briefly before it sleeps, and the caller spins briefly before it sleeps on the
// workers: a decode step hands work to the pool ~30 times in quick succession, and waking a sleeping
// thread (a halted vCPU on a VM) costs ~25 us each way, against ~3 us spinning.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace arbiter::cpu {

class ThreadPool {
 public:
  // threads <= 0: one per hardware thread.
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // Calls body(begin, end) over disjoint chunks covering [0, n), each at least `grain` long
  // (except possibly the last), on all threads including the caller. Returns when all are done.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

 private:
  void worker_loop(int index);
  void run_chunks();

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable start_cv_;
  std::condition_variable done_cv_;
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t total_ = 0;
  int64_t chunk_ = 0;
  int64_t next_ = 0;  // guarded by mutex_
  uint64_t generation_ = 0;
  int busy_ = 0;
  bool stop_ = false;
  // Copies of generation_ / busy_ / stop_ (written under mutex_) that threads poll while spinning;
  // the decisions themselves are taken again under mutex_.
  std::atomic<uint64_t> generation_seen_{0};
  std::atomic<int> busy_seen_{0};
  std::atomic<bool> stop_seen_{false};
  std::mutex call_mutex_;  // one parallel_for at a time
};

}  // namespace arbiter::cpu
