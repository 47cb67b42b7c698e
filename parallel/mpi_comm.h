// MpiComm: ranks are processes started by mpirun (Open MPI); buffers are host memory (callers stage
// device data through the host). Every collective is nonblocking underneath and polled against a
// deadline, so a peer that died or hangs gives CommError rather than a hang. Also the transport for
// ranks that share one GPU or sit on partitions of one (MIG), and NCCL's bootstrap.
#pragma once

#include <memory>

#include "parallel/communicator.h"

namespace arbiter {

class MpiComm final : public Communicator {
 public:
  // Initializes MPI on first use (works without mpirun too: a world of one) and duplicates
  // MPI_COMM_WORLD. MPI is finalized when the last MpiComm goes away, if MpiComm initialized it;
  // it cannot be initialized again in the same process afterwards.
  explicit MpiComm(double timeout_s = default_comm_timeout());
  ~MpiComm() override;
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;

  // True when this process was started by mpirun/mpiexec (Open MPI, PMIx or PMI environment).
  static bool launched_by_mpirun();

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }
  void all_to_all_v(const void* send, std::span<const size_t> send_counts, void* recv,
                    std::span<const size_t> recv_counts) override;
  void all_to_all_v_parts(std::span<const Part> parts) override;
  void all_gather(const void* send, size_t bytes, void* recv) override;
  void broadcast(void* data, size_t bytes, int root) override;
  void barrier() override;
  // MPI_Abort: ends every rank of the job with `code`.
  void abort(const std::string& reason, int code = 1) noexcept override;
  void set_timeout(double seconds) override { timeout_s_ = seconds; }
  double timeout() const override { return timeout_s_; }

  // Node-local rank (OMPI_COMM_WORLD_LOCAL_RANK or a shared-memory split), e.g. to pick a GPU.
  int local_rank() const { return local_rank_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, size_ = 1, local_rank_ = 0;
  double timeout_s_;
};

}  // namespace arbiter
