#include "api/decision_log.h"

#include <iostream>

namespace arbiter::api {

DecisionLog::DecisionLog(std::unique_ptr<DecisionStore> store, DecisionLogOptions options)
    : store_(std::move(store)), options_(std::move(options)) {
  if (!options_.now_ms)
    options_.now_ms = [] {
      return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
    };
  sweep();  // at start, before anything new is stored
  writer_ = std::thread([this] { run(); });
}

DecisionLog::~DecisionLog() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  queued_.notify_all();
  writer_.join();
}

void DecisionLog::record(std::vector<DecisionRecord> records) {
  if (records.empty()) return;
  auto batch = std::make_shared<Batch>();
  const size_t n = records.size();
  batch->records = std::move(records);
  std::unique_lock<std::mutex> lock(mutex_);
  if (stopping_ || queued_records_ + n > options_.max_queued) {
    stats_.refused += n;
    throw DecisionLogUnavailable("the decision log's write queue is full", true);
  }
  queue_.push_back(batch);
  queued_records_ += n;
  queued_.notify_one();
  stored_.wait(lock, [&] { return batch->done; });
  if (batch->error) {
    try {
      std::rethrow_exception(batch->error);
    } catch (const std::exception& e) {
      throw DecisionLogUnavailable(std::string("the decisions could not be stored: ") + e.what(), false);
    }
  }
}

int64_t DecisionLog::sweep() {
  if (!(options_.retention_days > 0)) return 0;
  const int64_t cutoff = options_.now_ms() - static_cast<int64_t>(options_.retention_days * 86400.0 * 1000.0);
  const int64_t deleted = store_->delete_before(cutoff);
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.swept += static_cast<uint64_t>(deleted);
  return deleted;
}

DecisionLog::Stats DecisionLog::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void DecisionLog::run() {
  auto next_sweep = std::chrono::steady_clock::now() + options_.retention_interval;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    queued_.wait_until(lock, next_sweep, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) {
      if (stopping_) return;
      lock.unlock();
      try {
        sweep();
      } catch (const std::exception& e) {
        std::cerr << "arbiter serve: decision log retention sweep failed: " << e.what() << std::endl;
      }
      lock.lock();
      next_sweep = std::chrono::steady_clock::now() + options_.retention_interval;
      continue;
    }
    // Everything queued so far (up to max_batch decisions) goes into one transaction.
    std::vector<std::shared_ptr<Batch>> taken;
    std::vector<DecisionRecord> records;
    while (!queue_.empty() && (records.empty() || records.size() + queue_.front()->records.size() <= options_.max_batch)) {
      auto b = queue_.front();
      queue_.pop_front();
      queued_records_ -= b->records.size();
      records.insert(records.end(), b->records.begin(), b->records.end());
      taken.push_back(std::move(b));
    }
    lock.unlock();
    std::exception_ptr error;
    try {
      store_->append(records);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    if (error) stats_.failed += records.size();
    else {
      stats_.stored += records.size();
      ++stats_.commits;
    }
    for (auto& b : taken) {
      b->error = error;
      b->done = true;
    }
    stored_.notify_all();
  }
}

}  // namespace arbiter::api
