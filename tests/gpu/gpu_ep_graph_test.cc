// Expert parallelism over NCCL with recorded decode steps (CUDA graphs). Run under mpirun -np 2 with a
// GPU per rank (ctest: gpu_ep_graph_test_np2, label gpu): decode steps under expert parallelism use
// the fixed-capacity exchange, so they are recorded and replayed like single-rank ones, with no host
// synchronization inside (recorded under cudaStreamCaptureModeGlobal), and give the bits of the same
// steps run directly; a peer that stops inside a replayed step makes the other rank fail with a
// CommError within the communication timeout. Every test skips, visibly, without two GPUs, NCCL
// or mpirun -np 2.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <thread>

#include "kernels/cuda/cuda_testing.h"
#include "parallel/mpi_comm.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/test_util.h"
#if ARBITER_WITH_NCCL
#include "parallel/nccl_comm.h"
#endif

namespace arbiter {
namespace {

std::unique_ptr<MpiComm> g_mpi;

#define ARBITER_SKIP_WITHOUT_TWO_GPU_RANKS()                                                            \
  do {                                                                                                  \
    ARBITER_SKIP_WITHOUT_GPU();                                                                         \
    if (!ARBITER_WITH_NCCL) GTEST_SKIP() << "built without NCCL: GPU test skipped";                     \
    if (gpu_count() < 2) GTEST_SKIP() << "fewer than two GPUs visible: GPU test skipped";               \
    if (g_mpi->size() != 2) GTEST_SKIP() << "run under mpirun -np 2 (one GPU per rank): test skipped";  \
  } while (0)

#if ARBITER_WITH_NCCL
// A CUDA backend on this rank's GPU, made with `env` (name=value pairs) set while it reads them.
std::unique_ptr<Backend> rank_backend(const std::vector<std::pair<std::string, std::string>>& env) {
  for (const auto& [name, value] : env) setenv(name.c_str(), value.c_str(), 1);
  auto backend = make_backend("cuda:" + std::to_string(g_mpi->rank()));
  for (const auto& [name, value] : env) unsetenv(name.c_str());
  return backend;
}

// Steps of one row (max_step_rows 1): every step decode-shaped, so the backend may record it.
ModelOptions one_row_steps(Communicator* comm) {
  ModelOptions o = testing::small_model_options(1, 1);
  o.comm = comm;
  return o;
}

// Each rank its own sequence of the same length (lockstep), every step one row: direct (graphs off)
// and recorded (graphs on, global capture) give the same bits, and the second run recorded its steps
// and replayed them without a failed recording.
TEST(GpuEpGraphs, RecordedDecodeStepsReplayEqualToDirect) {
  ARBITER_SKIP_WITHOUT_TWO_GPU_RANKS();
  for (const auto& g : gpu_testing::golden_cases()) {
    SCOPED_TRACE(g.name);
    const ModelConfig config = load_model_config(g.dir + "/config.json");
    Checkpoint ck(g.dir);
    NcclComm nccl(*g_mpi, g_mpi->rank());
    std::vector<int32_t> mine = g.tokens;
    std::rotate(mine.begin(), mine.begin() + g_mpi->rank() * 3, mine.end());
    std::vector<float> direct, recorded;
    {
      auto gpu = rank_backend({{"ARBITER_CUDA_GRAPHS", "0"}});
      Model model(config, ck, *gpu, one_row_steps(&nccl));
      direct = compute_all_logits(model, mine);
      model.serve_peers();
    }
    auto gpu = rank_backend({{"ARBITER_CUDA_CAPTURE", "global"}});
    {
      Model model(config, ck, *gpu, one_row_steps(&nccl));
      recorded = compute_all_logits(model, mine);
      model.serve_peers();
    }
    EXPECT_EQ(recorded, direct) << "rank " << g_mpi->rank();
    const CudaGraphStats stats = cuda_graph_stats(*gpu);
    EXPECT_EQ(stats.failed, 0u) << "a host synchronization (or another uncapturable call) inside a recorded EP step";
    EXPECT_GE(stats.recorded, 1u);
    EXPECT_GE(stats.replayed, mine.size() - 2) << "every step after the first two replays the recording";
  }
}

// Rank 1 stops answering after a few replayed steps (it passes the step handshake, then never runs
// the step's exchanges): rank 0, inside a replayed step, fails with a CommError naming the timeout
// within the communication timeout (plus polling slack), not a hang.
TEST(GpuEpGraphs, PeerStoppingInsideARecordedStepFailsWithinTheTimeout) {
  ARBITER_SKIP_WITHOUT_TWO_GPU_RANKS();
  const auto g = gpu_testing::golden_cases().front();
  const ModelConfig config = load_model_config(g.dir + "/config.json");
  Checkpoint ck(g.dir);
  const double timeout_s = 5.0;
  // Forwards to NcclComm; rank 1 stops after the `stop_after`-th step handshake (all_gather).
  class StopsAfterHandshakes final : public Communicator {
   public:
    StopsAfterHandshakes(NcclComm& inner, int stop_after) : inner_(inner), stop_after_(stop_after) {}
    int rank() const override { return inner_.rank(); }
    int size() const override { return inner_.size(); }
    std::string name() const override { return "stops"; }
    void all_to_all_v(const void* s, std::span<const size_t> sc, void* r, std::span<const size_t> rc) override {
      inner_.all_to_all_v(s, sc, r, rc);
    }
    bool takes_device_buffers() const override { return true; }
    bool enqueues_device_exchanges() const override { return true; }
    void all_to_all_v_parts_device(std::span<const Part> parts, void* stream) override {
      inner_.all_to_all_v_parts_device(parts, stream);
    }
    void enqueue_all_to_all_v_parts_device(std::span<const Part> parts, void* stream) override {
      inner_.enqueue_all_to_all_v_parts_device(parts, stream);
    }
    void wait_device_exchanges(void* stream) override { inner_.wait_device_exchanges(stream); }
    void all_gather(const void* s, size_t b, void* r) override {
      inner_.all_gather(s, b, r);
      if (++handshakes_ == stop_after_) {
        std::this_thread::sleep_for(std::chrono::duration<double>(3 * inner_.timeout()));
        throw std::runtime_error("rank " + std::to_string(rank()) + " stopped");
      }
    }
    void broadcast(void* d, size_t b, int root) override { inner_.broadcast(d, b, root); }
    void barrier() override { inner_.barrier(); }
    void abort(const std::string&, int) noexcept override {}  // the test ends each rank itself
    void set_timeout(double s) override { inner_.set_timeout(s); }
    double timeout() const override { return inner_.timeout(); }

   private:
    NcclComm& inner_;
    int stop_after_, handshakes_ = 0;
  };
  NcclComm nccl(*g_mpi, g_mpi->rank(), timeout_s);
  // The model's own collectives at construction (fingerprint) are all_gathers too: count from there.
  StopsAfterHandshakes comm(nccl, g_mpi->rank() == 1 ? 8 : -1);
  auto gpu = rank_backend({});
  std::unique_ptr<Model> model;
  try {
    model = std::make_unique<Model>(config, ck, *gpu, one_row_steps(&comm));
    const auto start = std::chrono::steady_clock::now();
    try {
      compute_all_logits(*model, g.tokens);
      ADD_FAILURE() << "rank " << g_mpi->rank() << ": expected an error";
    } catch (const CommError& e) {
      EXPECT_EQ(g_mpi->rank(), 0) << e.what();
      EXPECT_NE(std::string(e.what()).find("timed out"), std::string::npos) << e.what();
      EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::duration<double>(timeout_s + 5.0));
    }
    EXPECT_GE(cuda_graph_stats(*gpu).replayed, 1u) << "the peer must stop inside a replayed step";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(g_mpi->rank(), 1) << e.what();
    EXPECT_NE(std::string(e.what()).find("stopped"), std::string::npos) << e.what();
  }
  // The NCCL communicator of rank 0 is aborted; the ranks meet again over MPI only.
  g_mpi->barrier();
}
#else
TEST(GpuEpGraphs, RecordedDecodeStepsReplayEqualToDirect) { ARBITER_SKIP_WITHOUT_TWO_GPU_RANKS(); }
#endif

}  // namespace
}  // namespace arbiter

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  arbiter::g_mpi = std::make_unique<arbiter::MpiComm>(120.0);
  const bool runnable = ARBITER_WITH_NCCL && arbiter::cuda_available() && arbiter::gpu_count() >= 2 && arbiter::g_mpi->size() == 2;
  const int rc = RUN_ALL_TESTS();
  arbiter::g_mpi.reset();
  return rc == 0 && !runnable ? 77 : rc;  // 77: every test skipped (ctest shows it as skipped)
}
