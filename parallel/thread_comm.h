// ThreadComm: N ranks as threads of one process, exchanging through shared memory. It makes every
// expert-parallel test a plain unit test and lets several ranks share one device in one process.
// Waits are condition-variable waits with a timeout: a rank that never arrives (it threw, hangs, or
// called another collective) makes the others throw CommError instead of hanging.
#pragma once

#include <functional>
#include <memory>

#include "parallel/communicator.h"

namespace arbiter {

class ThreadGroup;

class ThreadComm final : public Communicator {
 public:
  // One communicator per rank of a new group of `size` ranks; hand element r to the thread of rank r.
  static std::vector<std::unique_ptr<ThreadComm>> create_group(int size, double timeout_s = default_comm_timeout());

  ThreadComm(std::shared_ptr<ThreadGroup> group, int rank);
  int rank() const override { return rank_; }
  int size() const override;
  std::string name() const override { return "threads"; }
  void all_to_all_v(const void* send, std::span<const size_t> send_counts, void* recv,
                    std::span<const size_t> recv_counts) override;
  void all_to_all_v_parts(std::span<const Part> parts) override;
  void all_gather(const void* send, size_t bytes, void* recv) override;
  void broadcast(void* data, size_t bytes, int root) override;
  void barrier() override;
  void abort(const std::string& reason, int code = 1) noexcept override;
  void set_timeout(double seconds) override;
  double timeout() const override;

 private:
  std::shared_ptr<ThreadGroup> group_;
  int rank_;
};

// Runs body(comm) on `size` threads, one per rank, and waits for all of them. When a rank throws, the
// group is aborted so the other ranks fail fast, and the first error (the cause, not the aborts it
// triggered) is rethrown here.
void run_thread_ranks(int size, const std::function<void(Communicator&)>& body,
                      double timeout_s = default_comm_timeout());

}  // namespace arbiter
