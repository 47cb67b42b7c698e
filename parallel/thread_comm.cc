#include "parallel/thread_comm.h"

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

namespace arbiter {

// The state every rank of one group shares. Each collective is: post (publish pointers), sync,
// copy from the peers' posted buffers, sync (so no rank leaves while others still read its buffers).
class ThreadGroup {
 public:
  struct Post {
    const char* op = nullptr;
    const void* send = nullptr;
    const Communicator::Part* parts = nullptr;  // all_to_all_v(_parts): the parts
    size_t num_parts = 0;
    const size_t* send_offsets = nullptr;  // [part * size + peer]: byte offset of the peer's segment
    size_t bytes = 0;                      // all_gather / broadcast
    int root = 0;
  };

  ThreadGroup(int size, double timeout_s) : size_(size), timeout_s_(timeout_s), posts_(static_cast<size_t>(size)) {}

  int size() const { return size_; }
  double timeout() const {
    std::lock_guard lk(mu_);
    return timeout_s_;
  }
  void set_timeout(double s) {
    std::lock_guard lk(mu_);
    timeout_s_ = s;
  }
  Post& post(int rank) { return posts_[static_cast<size_t>(rank)]; }
  const Post& post(int rank) const { return posts_[static_cast<size_t>(rank)]; }

  // Waits until every rank has called sync the same number of times.
  void sync(int rank, const char* op) {
    std::unique_lock lk(mu_);
    if (aborted_) throw CommError(abort_reason_);
    const uint64_t gen = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    const auto limit = std::chrono::duration<double>(timeout_s_);
    if (!cv_.wait_for(lk, limit, [&] { return generation_ != gen || aborted_; })) {
      const int missing = size_ - arrived_;
      abort_locked("ThreadComm: rank " + std::to_string(rank) + " timed out after " + std::to_string(timeout_s_) +
                   " s in " + op + " waiting for " + std::to_string(missing) + " of " + std::to_string(size_) +
                   " ranks (a rank died, hangs, or called a different collective)");
      throw CommError(abort_reason_);
    }
    if (generation_ == gen) throw CommError(abort_reason_);
  }

  void abort(const std::string& reason) {
    std::lock_guard lk(mu_);
    abort_locked(reason);
  }

  // A rank found the collective's arguments inconsistent while reading the others' posts. The error is
  // recorded and raised on every rank only after the closing sync (raise_recorded), so that no rank
  // returns and frees buffers another rank is still reading.
  void record_error(const std::string& reason) {
    std::lock_guard lk(mu_);
    if (error_.empty()) error_ = reason;
  }
  void raise_recorded() {
    std::lock_guard lk(mu_);
    if (error_.empty()) return;
    abort_locked(error_);
    throw CommError(error_);
  }

  // All ranks must be in the same collective: called after the first sync.
  void check_same_op(int rank, const char* op) {
    for (int p = 0; p < size_; ++p)
      if (std::strcmp(post(p).op, op) != 0) {
        const std::string reason = "ThreadComm: rank " + std::to_string(rank) + " is in " + op + " but rank " +
                                   std::to_string(p) + " is in " + post(p).op;
        abort(reason);
        throw CommError(reason);
      }
  }

 private:
  void abort_locked(const std::string& reason) {
    if (!aborted_) {
      aborted_ = true;
      abort_reason_ = reason;
    }
    cv_.notify_all();
  }

  const int size_;
  double timeout_s_;
  std::vector<Post> posts_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool aborted_ = false;
  std::string abort_reason_;
  std::string error_;  // record_error
};

std::vector<std::unique_ptr<ThreadComm>> ThreadComm::create_group(int size, double timeout_s, std::optional<DeviceCopy> device) {
  if (size <= 0) throw std::invalid_argument("ThreadComm: group size must be positive");
  if (device && (!device->copy || !device->wait)) throw std::invalid_argument("ThreadComm: a DeviceCopy needs copy and wait");
  auto group = std::make_shared<ThreadGroup>(size, timeout_s);
  std::shared_ptr<const DeviceCopy> shared;
  if (device) shared = std::make_shared<const DeviceCopy>(std::move(*device));
  std::vector<std::unique_ptr<ThreadComm>> comms;
  for (int r = 0; r < size; ++r) comms.push_back(std::make_unique<ThreadComm>(group, r, shared));
  return comms;
}

ThreadComm::ThreadComm(std::shared_ptr<ThreadGroup> group, int rank, std::shared_ptr<const DeviceCopy> device)
    : group_(std::move(group)), rank_(rank), device_(std::move(device)) {
  if (rank < 0 || rank >= group_->size()) throw std::invalid_argument("ThreadComm: rank outside the group");
}

int ThreadComm::size() const { return group_->size(); }
void ThreadComm::set_timeout(double seconds) { group_->set_timeout(seconds); }
double ThreadComm::timeout() const { return group_->timeout(); }
void ThreadComm::abort(const std::string& reason, int) noexcept {
  try {
    group_->abort("ThreadComm: rank " + std::to_string(rank_) + " aborted: " + reason);
  } catch (...) {
  }
}

void ThreadComm::all_to_all_v(const void* send, std::span<const size_t> send_counts, void* recv,
                              std::span<const size_t> recv_counts) {
  const Part part{send, send_counts, recv, recv_counts};
  all_to_all_v_parts({&part, 1});
}

void ThreadComm::all_to_all_v_parts(std::span<const Part> parts) {
  exchange(parts, [](void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }, [] {});
}

void ThreadComm::all_to_all_v_parts_device(std::span<const Part> parts, void* stream) {
  if (!device_) return Communicator::all_to_all_v_parts_device(parts, stream);  // throws: host buffers only
  device_->wait(stream);  // this rank's send buffers are written before its peers read them
  exchange(
      parts, [&](void* dst, const void* src, size_t bytes) { device_->copy(dst, src, bytes, stream); },
      [&] { device_->wait(stream); });
}

void ThreadComm::exchange(std::span<const Part> parts, const std::function<void(void*, const void*, size_t)>& copy,
                          const std::function<void()>& before_leaving) {
  const size_t n = static_cast<size_t>(size());
  for (const Part& p : parts)
    if (p.send_counts.size() != n || p.recv_counts.size() != n)
      throw std::invalid_argument("all_to_all_v: one count per rank expected");
  std::vector<size_t> offsets(parts.size() * n);
  for (size_t i = 0; i < parts.size(); ++i)
    for (size_t p = 1; p < n; ++p) offsets[i * n + p] = offsets[i * n + p - 1] + parts[i].send_counts[p - 1];
  auto& me = group_->post(rank_);
  me = {"all_to_all_v", nullptr, parts.data(), parts.size(), offsets.data(), 0, 0};
  group_->sync(rank_, "all_to_all_v");
  group_->check_same_op(rank_, "all_to_all_v");
  std::string mismatch;
  for (size_t p = 0; p < n && mismatch.empty(); ++p)
    if (group_->post(static_cast<int>(p)).num_parts != parts.size())
      mismatch = "all_to_all_v: rank " + std::to_string(p) + " exchanges " +
                 std::to_string(group_->post(static_cast<int>(p)).num_parts) + " parts, rank " + std::to_string(rank_) +
                 " " + std::to_string(parts.size());
  for (size_t i = 0; i < parts.size() && mismatch.empty(); ++i) {
    size_t at = 0;
    for (size_t p = 0; p < n; ++p) {
      const auto& peer = group_->post(static_cast<int>(p));
      const Part& from = peer.parts[i];
      const size_t count = from.send_counts[static_cast<size_t>(rank_)];
      if (count != parts[i].recv_counts[p]) {
        mismatch = "all_to_all_v: rank " + std::to_string(p) + " sends " + std::to_string(count) + " bytes to rank " +
                   std::to_string(rank_) + ", which expects " + std::to_string(parts[i].recv_counts[p]);
        break;
      }
      if (count)
        copy(static_cast<char*>(parts[i].recv) + at,
             static_cast<const char*>(from.send) + peer.send_offsets[i * n + static_cast<size_t>(rank_)], count);
      at += count;
    }
  }
  if (!mismatch.empty()) group_->record_error(mismatch);
  try {
    before_leaving();  // the copies have read the peers' buffers
  } catch (const std::exception& e) {
    group_->record_error(std::string("all_to_all_v: ") + e.what());
  }
  group_->sync(rank_, "all_to_all_v (done)");
  group_->raise_recorded();
}

void ThreadComm::all_gather(const void* send, size_t bytes, void* recv) {
  auto& me = group_->post(rank_);
  me = {"all_gather", send, nullptr, 0, nullptr, bytes, 0};
  group_->sync(rank_, "all_gather");
  group_->check_same_op(rank_, "all_gather");
  for (int p = 0; p < size(); ++p) {
    const auto& peer = group_->post(p);
    if (peer.bytes != bytes) {
      group_->record_error("all_gather: ranks disagree on the size (" + std::to_string(peer.bytes) + " vs " +
                           std::to_string(bytes) + " bytes)");
      break;
    }
    if (bytes) std::memcpy(static_cast<char*>(recv) + static_cast<size_t>(p) * bytes, peer.send, bytes);
  }
  group_->sync(rank_, "all_gather (done)");
  group_->raise_recorded();
}

void ThreadComm::broadcast(void* data, size_t bytes, int root) {
  if (root < 0 || root >= size()) throw std::invalid_argument("broadcast: root outside the group");
  auto& me = group_->post(rank_);
  me = {"broadcast", data, nullptr, 0, nullptr, bytes, root};
  group_->sync(rank_, "broadcast");
  group_->check_same_op(rank_, "broadcast");
  const auto& src = group_->post(root);
  if (src.bytes != bytes || src.root != root) group_->record_error("broadcast: ranks disagree on the size or root");
  else if (rank_ != root && bytes) std::memcpy(data, src.send, bytes);
  group_->sync(rank_, "broadcast (done)");
  group_->raise_recorded();
}

void ThreadComm::barrier() {
  group_->post(rank_) = {"barrier", nullptr, nullptr, 0, nullptr, 0, 0};
  group_->sync(rank_, "barrier");
  group_->check_same_op(rank_, "barrier");
  // A second sync so a fast rank cannot overwrite its post before a slow one checked it.
  group_->sync(rank_, "barrier (done)");
}

void run_thread_ranks(int size, const std::function<void(Communicator&)>& body, double timeout_s,
                      std::optional<DeviceCopy> device) {
  auto comms = ThreadComm::create_group(size, timeout_s, std::move(device));
  std::mutex mu;
  std::exception_ptr first;
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r)
    threads.emplace_back([&, r] {
      ThreadComm& comm = *comms[static_cast<size_t>(r)];
      try {
        body(comm);
      } catch (const std::exception& e) {
        {
          std::lock_guard lk(mu);
          if (!first) first = std::current_exception();
        }
        comm.abort(e.what());
      } catch (...) {
        {
          std::lock_guard lk(mu);
          if (!first) first = std::current_exception();
        }
        comm.abort("unknown exception");
      }
    });
  for (auto& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

}  // namespace arbiter
