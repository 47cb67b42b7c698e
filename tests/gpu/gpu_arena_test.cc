// The CUDA backend's device arena (Backend::reserve): a model's weights, KV pools, activation
// buffers and the MoE workspace all come out of the region the model reserved (no allocation
// overflows it, and it is used to the byte: the model's count cannot drift from what it allocates),
// a second model on the same backend gets a second region, and the results still equal the CPU
// backend's. Skips without a GPU.
#include <gtest/gtest.h>

#include "kernels/cuda/cuda_testing.h"
#include "kernels/device_arena.h"
#include "runtime/generate.h"
#include "runtime/make_model.h"
#include "runtime/model.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

using namespace gpu_testing;

#define ARBITER_SKIP_WITHOUT_ARENA()                                                                    \
  do {                                                                                                 \
    if (const char* env = std::getenv("ARBITER_CUDA_ARENA"); env && std::string(env) == "0")          \
      GTEST_SKIP() << "ARBITER_CUDA_ARENA=0: the arena is off";                                       \
  } while (0)

void expect_close(const std::vector<float>& got, const std::vector<float>& ref, size_t vocab, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double min_cos = 1;
  for (size_t r = 0; r < got.size() / vocab; ++r)
    min_cos = std::min(min_cos, cosine(got.data() + r * vocab, ref.data() + r * vocab, vocab));
  EXPECT_GE(min_cos, 0.999) << what;
  EXPECT_LE(rel_max_error(got, ref), 3e-2) << what;
}

TEST(GpuArena, ModelsAllocateOnlyFromTheirReservation) {
  ARBITER_SKIP_WITHOUT_GPU();
  ARBITER_SKIP_WITHOUT_ARENA();
  testing::TempDir dir;
  const ModelConfig config = testing::small_config();
  MakeModelOptions mo;
  mo.seed = 11;
  make_random_model(config, dir.path(), mo);
  Checkpoint ck(dir.path());
  auto gpu = make_backend("cuda");
  EXPECT_EQ(cuda_arena_stats(*gpu).regions, 0u);
  std::vector<int32_t> tokens;
  for (int i = 0; i < 19; ++i) tokens.push_back((i * 53 + 7) % config.vocab_size);
  const size_t V = static_cast<size_t>(config.vocab_size);
  {
    Model prefill(config, ck, *gpu, testing::small_model_options(64, 64));
    CudaArenaStats s = cuda_arena_stats(*gpu);
    EXPECT_EQ(s.regions, 1u);
    EXPECT_EQ(s.arena_overflow_allocations, 0u);
    EXPECT_GT(s.live_allocations, 0u);
    // Everything reserved is in use: weights, KV pools, buffers and the MoE workspace.
    EXPECT_EQ(s.bytes_in_use, s.capacity);
    const auto whole = compute_all_logits(prefill, tokens);

    Model decode(config, ck, *gpu, testing::small_model_options(1, 1));  // a second reservation on the same backend
    s = cuda_arena_stats(*gpu);
    EXPECT_EQ(s.regions, 2u);
    EXPECT_EQ(s.arena_overflow_allocations, 0u);
    EXPECT_EQ(s.bytes_in_use, s.capacity);
    const auto stepwise = compute_all_logits(decode, tokens);  // decode steps (recorded and replayed)
    s = cuda_arena_stats(*gpu);
    EXPECT_EQ(s.arena_overflow_allocations, 0u) << "a step allocated outside the arena";
    EXPECT_EQ(s.bytes_in_use, s.capacity) << "a step allocated or moved device memory";

    CpuBackend cpu;
    Model reference(config, ck, cpu, testing::small_model_options(64, 64));
    const auto cpu_logits = compute_all_logits(reference, tokens);
    expect_close(whole, cpu_logits, V, "prefill on the arena vs CPU");
    expect_close(stepwise, cpu_logits, V, "token-by-token decode on the arena vs CPU");
  }
  // Only the backend's MoE workspace is left in the arena.
  const CudaArenaStats s = cuda_arena_stats(*gpu);
  EXPECT_LE(s.live_allocations, 1u);
  EXPECT_EQ(s.arena_overflow_allocations, 0u);
}

// Allocations beyond a reservation still work (their own cudaMalloc) and are counted.
TEST(GpuArena, OverflowIsCountedAndUsable) {
  ARBITER_SKIP_WITHOUT_GPU();
  ARBITER_SKIP_WITHOUT_ARENA();
  auto gpu = make_backend("cuda");
  gpu->reserve(device_arena_bytes(1000));
  DeviceBuffer inside = gpu->allocate(1000);
  EXPECT_EQ(cuda_arena_stats(*gpu).arena_overflow_allocations, 0u);
  DeviceBuffer outside = gpu->allocate(1000);
  EXPECT_EQ(cuda_arena_stats(*gpu).arena_overflow_allocations, 1u);
  ASSERT_NE(outside.data(), nullptr);
  const std::vector<int32_t> host(250, 7);
  std::vector<int32_t> back(250, 0);
  const Tensor t = outside.view(DType::kI32, {250});
  gpu->upload(host.data(), t);
  gpu->download(t, back.data());
  EXPECT_EQ(back, host);
  inside = DeviceBuffer();
  EXPECT_EQ(cuda_arena_stats(*gpu).live_allocations, 0u);
  DeviceBuffer again = gpu->allocate(1);  // the freed range is handed out again
  EXPECT_EQ(cuda_arena_stats(*gpu).live_allocations, 1u);
  EXPECT_EQ(cuda_arena_stats(*gpu).arena_overflow_allocations, 1u);
}

}  // namespace
}  // namespace arbiter
