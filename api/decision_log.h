// DecisionLog: the write path of the decision log. Request threads hand it a request's decisions
// and wait until they are durably stored; one writer thread stores whatever has queued meanwhile in
// a single transaction (group commit: one commit per batch of concurrent requests, not per request),
// so a 200 is only sent for decisions that are on disk. The queue is bounded: over it, or when the
// store fails, record() throws and the request is answered 503 (nothing acknowledged that was not
// stored). The writer also runs the retention sweep (at start and every interval).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "api/decision_store.h"

namespace arbiter::api {

// How the log stores and keeps decisions (from `arbiter serve` options).
struct DecisionLogOptions {
  size_t max_queued = 8192;       // decisions waiting for the writer before record() refuses
  size_t max_batch = 1024;        // decisions per transaction
  double retention_days = 0;      // 0: keep forever
  std::chrono::milliseconds retention_interval{std::chrono::hours(1)};
  // Unix milliseconds now (tests replace it).
  std::function<int64_t()> now_ms;
};

// What the log keeps of a request's content.
enum class ContentStorage {
  kFull,  // the text (and its SHA-256)
  kHash,  // only its SHA-256
  kNone,  // nothing
};

// The decision log of `arbiter serve`: where, what is kept, for how long.
struct DecisionLogSettings {
  std::string db;                 // SQLite file; "" : no decision log
  ContentStorage content = ContentStorage::kHash;
  bool store_reasoning = true;
  DecisionLogOptions log;
};

// Why record() could not store decisions: `full` (the queue is over its bound) or the store failed.
class DecisionLogUnavailable : public std::runtime_error {
 public:
  DecisionLogUnavailable(const std::string& what, bool full) : std::runtime_error(what), full_(full) {}
  bool full() const { return full_; }

 private:
  bool full_;
};

// The writer thread and its queue over a DecisionStore (see the top of this file). Thread-safe.
class DecisionLog {
 public:
  DecisionLog(std::unique_ptr<DecisionStore> store, DecisionLogOptions options);
  ~DecisionLog();  // stores what is queued, then stops the writer
  DecisionLog(const DecisionLog&) = delete;
  DecisionLog& operator=(const DecisionLog&) = delete;

  // Stores the records (all or none) and returns once they are durable; throws
  // DecisionLogUnavailable when the queue is full or the store failed.
  void record(std::vector<DecisionRecord> records);
  DecisionStore& store() { return *store_; }
  int64_t now_ms() const { return options_.now_ms(); }
  // Deletes decisions older than the retention period now (no-op without one); returns how many.
  int64_t sweep();

  // Counters for /metrics.
  struct Stats {
    uint64_t stored = 0, commits = 0, refused = 0, failed = 0, swept = 0;
  };
  Stats stats() const;

 private:
  // One request's records and the answer its thread waits for.
  struct Batch {
    std::vector<DecisionRecord> records;
    bool done = false;
    std::exception_ptr error;
  };
  void run();

  std::unique_ptr<DecisionStore> store_;
  DecisionLogOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable queued_, stored_;
  std::deque<std::shared_ptr<Batch>> queue_;
  size_t queued_records_ = 0;
  bool stopping_ = false;
  Stats stats_;
  std::thread writer_;
};

}  // namespace arbiter::api
