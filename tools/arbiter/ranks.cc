#include "tools/arbiter/ranks.h"

#include <optional>
#include <stdexcept>
#include <string>

#include "kernels/backend.h"
#include "parallel/mpi_comm.h"
#include "parallel/thread_comm.h"
#if ARBITER_WITH_NCCL
#include "parallel/nccl_comm.h"
#endif

namespace arbiter {

void run_ranks(const CliArgs& args, const std::function<void(const CliArgs&, const RankContext&)>& body) {
  const std::string transport = args.get("transport", "auto");
  const int ranks = static_cast<int>(args.get_int("ranks", 1));
  const std::string placement_file = args.get("placement", "");
  if (transport != "auto" && transport != "threads" && transport != "mpi" && transport != "nccl")
    throw std::invalid_argument("--transport must be auto, threads, mpi or nccl (not '" + transport + "')");
  if (ranks < 1) throw std::invalid_argument("--ranks must be at least 1");
  RankContext base;
  if (!placement_file.empty()) base.placement = std::make_shared<const ExpertPlacement>(ExpertPlacement::load(placement_file));
  auto check_world = [&](int world) {
    if (!base.placement || base.placement->num_ranks() == world) return;
    if (base.placement->num_ranks() > world)
      throw std::invalid_argument("placement " + placement_file + " names rank " +
                                  std::to_string(base.placement->num_ranks() - 1) + ", which does not exist: it is for " +
                                  std::to_string(base.placement->num_ranks()) + " ranks but " + std::to_string(world) +
                                  " are running (ranks 0.." + std::to_string(world - 1) + ")");
    throw std::invalid_argument("placement " + placement_file + " is for " + std::to_string(base.placement->num_ranks()) +
                                " ranks but " + std::to_string(world) + " are running");
  };
  const bool mpi = transport == "mpi" || transport == "nccl" || (transport == "auto" && MpiComm::launched_by_mpirun());
  if (!mpi) {
    check_world(ranks);
    if (ranks == 1) return body(args, base);
    // Thread ranks on a GPU share it: they exchange device buffers by device-to-device copies.
    const std::string* device = args.peek("device");
    const bool on_gpu = device ? (*device == "cuda" || device->rfind("cuda:", 0) == 0 || (*device == "auto" && gpu_count() > 0))
                               : gpu_count() > 0;
    std::optional<DeviceCopy> copy;
    if (on_gpu) copy = DeviceCopy{device_copy_on_stream, device_wait_stream};
    return run_thread_ranks(
        ranks,
        [&](Communicator& comm) {
          const CliArgs own = args;
          RankContext rc = base;
          rc.comm = &comm;
          body(own, rc);
        },
        default_comm_timeout(), std::move(copy));
  }
  if (args.has("ranks")) throw std::invalid_argument("--ranks is for --transport threads; under mpirun use -np");
  MpiComm mpi_comm;
  RankContext rc = base;
  rc.comm = &mpi_comm;
#if ARBITER_WITH_NCCL
  std::unique_ptr<NcclComm> nccl;
  if (transport == "nccl") {
    nccl = std::make_unique<NcclComm>(mpi_comm);
    rc.comm = nccl.get();
  }
#else
  if (transport == "nccl") throw std::invalid_argument("--transport nccl: this build has no NCCL (CUDA and NCCL are needed at configure time)");
#endif
  // One GPU per process: a rank not given a GPU index takes its node-local rank's GPU (the one
  // NcclComm uses too), instead of every rank of the node landing on GPU 0.
  CliArgs own = args;
  const std::string* device = own.peek("device");
  const int gpus = gpu_count();
  if (gpus > 0 && (!device || *device == "auto" || *device == "cuda"))
    own.set("device", "cuda:" + std::to_string(mpi_comm.local_rank() % gpus));
  try {
    check_world(rc.comm->size());
    body(own, rc);
  } catch (const std::exception& e) {
    if (rc.comm->size() > 1) rc.comm->abort(e.what());
    throw;
  }
}

}  // namespace arbiter
