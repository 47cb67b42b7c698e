// How a subcommand runs on the ranks the user asked for (DESIGN.md §3): this process alone,
// --ranks N thread ranks inside it (--transport threads), or one rank of `mpirun -np N` (MPI, or
// NCCL between GPUs). Shared by every subcommand that loads a model.
#pragma once

#include <functional>
#include <memory>

#include "parallel/communicator.h"
#include "parallel/expert_placement.h"
#include "tools/arbiter/cli_args.h"

namespace arbiter {

// Where this rank stands in an expert-parallel run; no communicator: a single rank.
struct RankContext {
  Communicator* comm = nullptr;
  std::shared_ptr<const ExpertPlacement> placement;
  bool leads() const { return !comm || comm->rank() == 0; }  // rank 0: runs the work and writes the output
};

// Runs body once per rank of the transport that --transport / --ranks / mpirun choose (options
// --transport auto|threads|mpi|nccl, --ranks N, --placement FILE are read here). Thread ranks run
// concurrently, each with its own copy of the options; under MPI an error on any rank ends the whole
// job instead of a hang.
void run_ranks(const CliArgs& args, const std::function<void(const CliArgs&, const RankContext&)>& body);

}  // namespace arbiter
