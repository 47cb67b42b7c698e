// ThreadComm: N ranks as threads of one process, exchanging through shared memory. It makes every
// expert-parallel test a plain unit test and lets several ranks share one device in one process.
// Given a DeviceCopy (ranks on one GPU), it also exchanges device buffers where they are: each rank
// copies its peers' segments into its own buffers on its stream (device to device), with no host
// staging, which is the device-resident expert-parallel path a one-GPU machine can run.
// Waits are condition-variable waits with a timeout: a rank that never arrives (it threw, hangs, or
// called another collective) makes the others throw CommError instead of hanging.
#pragma once

#include <functional>
#include <memory>
#include <optional>

#include "parallel/communicator.h"

namespace arbiter {

class ThreadGroup;

// How thread ranks that share one device move its buffers: `copy` enqueues a copy of `bytes` bytes
// between two buffers of that device on `stream` (a rank's backend stream); `wait` returns once
// everything enqueued on `stream` has finished. CUDA: cudaMemcpyAsync device to device and
// cudaStreamSynchronize (kernels/cuda/device_copy.h).
struct DeviceCopy {
  std::function<void(void* dst, const void* src, size_t bytes, void* stream)> copy;
  std::function<void(void* stream)> wait;
};

class ThreadComm final : public Communicator {
 public:
  // One communicator per rank of a new group of `size` ranks; hand element r to the thread of rank r.
  // With `device`, all_to_all_v_parts_device takes buffers of the one device the ranks share.
  static std::vector<std::unique_ptr<ThreadComm>> create_group(int size, double timeout_s = default_comm_timeout(),
                                                               std::optional<DeviceCopy> device = std::nullopt);

  ThreadComm(std::shared_ptr<ThreadGroup> group, int rank, std::shared_ptr<const DeviceCopy> device = nullptr);
  int rank() const override { return rank_; }
  int size() const override;
  std::string name() const override { return "threads"; }
  void all_to_all_v(const void* send, std::span<const size_t> send_counts, void* recv,
                    std::span<const size_t> recv_counts) override;
  void all_to_all_v_parts(std::span<const Part> parts) override;
  bool takes_device_buffers() const override { return device_ != nullptr; }
  // Each rank waits for its own stream (its send buffers are written), then copies what its peers
  // send it on `stream`, waits for those copies, and leaves once every rank has (so no peer reuses a
  // send buffer that is still being read).
  void all_to_all_v_parts_device(std::span<const Part> parts, void* stream) override;
  void all_gather(const void* send, size_t bytes, void* recv) override;
  void broadcast(void* data, size_t bytes, int root) override;
  void barrier() override;
  void abort(const std::string& reason, int code = 1) noexcept override;
  void set_timeout(double seconds) override;
  double timeout() const override;

 private:
  // The exchange of all_to_all_v_parts with `copy` moving each segment (dst, src, bytes).
  void exchange(std::span<const Part> parts, const std::function<void(void*, const void*, size_t)>& copy,
                const std::function<void()>& before_leaving);

  std::shared_ptr<ThreadGroup> group_;
  int rank_;
  std::shared_ptr<const DeviceCopy> device_;
};

// Runs body(comm) on `size` threads, one per rank, and waits for all of them. When a rank throws, the
// group is aborted so the other ranks fail fast, and the first error (the cause, not the aborts it
// triggered) is rethrown here.
void run_thread_ranks(int size, const std::function<void(Communicator&)>& body,
                      double timeout_s = default_comm_timeout(), std::optional<DeviceCopy> device = std::nullopt);

}  // namespace arbiter
