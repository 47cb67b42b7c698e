// Pending<T>: a value that another thread delivers once (a scheduler callback hands a result to
// the HTTP thread waiting for it). Shared by both sides through a shared_ptr, so a handler that
// gives up waiting leaves nothing dangling.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>

namespace arbiter::api {

template <class T>
class Pending {
 public:
  void set(T value) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      value_ = std::move(value);
    }
    ready_.notify_all();
  }
  // true once the value is there (waits at most `timeout`).
  bool wait_for(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    return ready_.wait_for(lock, timeout, [&] { return value_.has_value(); });
  }
  bool ready() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return value_.has_value();
  }
  // The value; only after wait_for() returned true.
  T take() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::move(*value_);
  }

 private:
  mutable std::mutex mutex_;
  std::condition_variable ready_;
  std::optional<T> value_;
};

}  // namespace arbiter::api
