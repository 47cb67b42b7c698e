// NcclComm: one GPU per process, collectives over NCCL (all-to-all-v as grouped ncclSend/ncclRecv).
// The NCCL unique id is created on rank 0 and broadcast over an MpiComm, which must outlive this
// object. The Communicator methods take host buffers (staged through device memory);
// all_to_all_v_device and all_to_all_v_parts_device take device buffers directly. Waits poll the
// stream against the timeout and abort the NCCL communicator on expiry, so a dead peer gives
// CommError. Built only when CUDA and NCCL are found (ARBITER_WITH_NCCL).
#pragma once

#include <memory>

#include "parallel/communicator.h"
#include "parallel/mpi_comm.h"

namespace arbiter {

class NcclComm final : public Communicator {
 public:
  // `device` < 0: the bootstrap's node-local rank modulo the visible GPU count.
  explicit NcclComm(MpiComm& bootstrap, int device = -1, double timeout_s = default_comm_timeout());
  ~NcclComm() override;
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const override;
  int size() const override;
  std::string name() const override { return "nccl"; }
  int device() const;
  void all_to_all_v(const void* send, std::span<const size_t> send_counts, void* recv,
                    std::span<const size_t> recv_counts) override;
  // Same on device buffers of this process's GPU.
  void all_to_all_v_device(const void* send, std::span<const size_t> send_counts, void* recv,
                           std::span<const size_t> recv_counts);
  // Device buffers: every part's ncclSend/ncclRecv in one NCCL group on `stream` (cudaStream_t; the
  // backend's, so the exchange is ordered after the kernels that filled the buffers and before the
  // ones that read them; nullptr: this communicator's own stream), then a wait on that stream polled
  // against the timeout. No host copies.
  bool takes_device_buffers() const override { return true; }
  void all_to_all_v_parts_device(std::span<const Part> parts, void* stream) override;
  // The same NCCL group without the wait (the fixed-capacity exchange; a recorded step may contain
  // it), and the wait: the stream polled against the timeout, the NCCL communicator aborted at the
  // deadline or on an asynchronous NCCL error, so a peer that died mid-exchange gives CommError here.
  bool enqueues_device_exchanges() const override { return true; }
  void enqueue_all_to_all_v_parts_device(std::span<const Part> parts, void* stream) override;
  void wait_device_exchanges(void* stream) override;
  void all_gather(const void* send, size_t bytes, void* recv) override;
  void broadcast(void* data, size_t bytes, int root) override;
  void barrier() override;
  void abort(const std::string& reason, int code = 1) noexcept override;
  void set_timeout(double seconds) override;
  double timeout() const override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace arbiter
