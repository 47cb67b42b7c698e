// MpiComm and the expert-parallel model over MPI processes. Run under mpirun (ctest runs it with
// -np 2 and -np 3); every rank runs every test, rank 0 reports.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <thread>

#include "kernels/cpu/cpu_backend.h"
#include "parallel/mpi_comm.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

std::unique_ptr<MpiComm> g_comm;

size_t count_for(int from, int to, size_t scale) { return ((from * 7 + to * 3) % 5) * scale; }
uint8_t byte_for(int from, int to, size_t i) { return static_cast<uint8_t>(from * 31 + to * 17 + i * 13); }

void check_all_to_all(Communicator& c, size_t scale) {
  const int n = c.size(), me = c.rank();
  std::vector<size_t> sc(static_cast<size_t>(n)), rc(static_cast<size_t>(n));
  std::vector<uint8_t> send;
  for (int p = 0; p < n; ++p) {
    sc[static_cast<size_t>(p)] = count_for(me, p, scale);
    rc[static_cast<size_t>(p)] = count_for(p, me, scale);
    for (size_t i = 0; i < sc[static_cast<size_t>(p)]; ++i) send.push_back(byte_for(me, p, i));
  }
  EXPECT_EQ(exchange_counts(c, sc), rc);
  std::vector<uint8_t> recv(std::accumulate(rc.begin(), rc.end(), size_t{0}));
  c.all_to_all_v(send.data(), sc, recv.data(), rc);
  size_t at = 0;
  for (int p = 0; p < n; ++p)
    for (size_t i = 0; i < rc[static_cast<size_t>(p)]; ++i, ++at)
      ASSERT_EQ(recv[at], byte_for(p, me, i)) << "rank " << me << " from " << p << " byte " << i;
}

TEST(MpiComm, AllToAllV) {
  Communicator& c = *g_comm;
  ASSERT_GE(c.size(), 2) << "run under mpirun -np 2 or more";
  const std::vector<size_t> zeros(static_cast<size_t>(c.size()), 0);
  c.all_to_all_v(nullptr, zeros, nullptr, zeros);
  check_all_to_all(c, 1);
  check_all_to_all(c, 1000);
  check_all_to_all(c, size_t{4} << 20);  // up to 16 MiB per peer
}

TEST(MpiComm, AllGatherBroadcastBarrier) {
  Communicator& c = *g_comm;
  std::vector<int64_t> all(static_cast<size_t>(c.size()));
  const int64_t mine = 10 * c.rank() + 1;
  c.all_gather(&mine, sizeof mine, all.data());
  for (int p = 0; p < c.size(); ++p) EXPECT_EQ(all[static_cast<size_t>(p)], 10 * p + 1);
  for (int root = 0; root < c.size(); ++root) {
    std::vector<int> v(1 << 16, c.rank() == root ? root + 7 : 0);
    c.broadcast(v.data(), v.size() * sizeof(int), root);
    EXPECT_EQ(v, std::vector<int>(1 << 16, root + 7));
  }
  c.barrier();
  EXPECT_NO_THROW(check_same_fingerprint(c, 99, "the test"));
  EXPECT_THROW(check_same_fingerprint(c, c.rank() == 1 ? 5 : 99, "the test"), std::runtime_error);
}

ModelOptions options(Communicator* comm, bool host_staged = false) {
  ModelOptions o;
  o.ep_host_staged = host_staged;
  o.max_step_rows = 64;
  o.max_logit_rows = 64;
  o.kv.block_size = 4;
  o.kv.full_blocks = 64;
  o.kv.sliding_blocks = 32;
  o.comm = comm;
  return o;
}

float max_rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return INFINITY;
  float max_err = 0, max_logit = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    max_err = std::max(max_err, std::fabs(got[i] - want[i]));
    max_logit = std::max(max_logit, std::fabs(want[i]));
  }
  return max_err / max_logit;
}

class MpiGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(MpiGolden, LogitsAndGreedyMatchSingleRank) {
  const auto g = testing::load_golden_case(GetParam());
  const ModelConfig config = load_model_config(g.dir + "/config.json");
  Checkpoint ck(g.dir);
  CpuBackend backend(1);
  std::vector<float> single;
  {
    Model alone(config, ck, backend, options(nullptr));
    single = compute_all_logits(alone, g.tokens);
  }
  Model model(config, ck, backend, options(g_comm.get()));
  if (g_comm->rank() == 0) {
    EXPECT_LE(max_rel_err(compute_all_logits(model, g.tokens), single), 1e-5f);
    EXPECT_EQ(greedy_generate(model, g.tokens, static_cast<int>(g.greedy.size())), g.greedy);
  }
  model.serve_peers();
  // Every rank its own sequence, in lockstep.
  const int r = g_comm->rank();
  const std::vector<int32_t> mine(g.tokens.begin() + r * 2, g.tokens.end() - r * 3);
  std::vector<float> mine_single;
  {
    Model alone(config, ck, backend, options(nullptr));
    mine_single = compute_all_logits(alone, mine);
  }
  EXPECT_LE(max_rel_err(compute_all_logits(model, mine), mine_single), 1e-5f) << "rank " << r;
}

// The backend's dispatch/combine operations (default) and the host-staged path give the same bits:
// every rank its own sequence, rank 1 none.
TEST_P(MpiGolden, BackendOpsEqualHostStagedBitForBit) {
  const auto g = testing::load_golden_case(GetParam());
  const ModelConfig config = load_model_config(g.dir + "/config.json");
  Checkpoint ck(g.dir);
  CpuBackend backend(1);
  const int r = g_comm->rank();
  const std::vector<int32_t> mine(g.tokens.begin() + r * 2, g.tokens.end() - r * 3);
  std::vector<float> got[2];
  for (int staged = 0; staged < 2; ++staged) {
    Model model(config, ck, backend, options(g_comm.get(), staged == 1));
    if (r != 1) got[staged] = compute_all_logits(model, mine);
    model.serve_peers();
  }
  ASSERT_EQ(got[0].size(), got[1].size());
  EXPECT_TRUE(got[0].empty() || std::memcmp(got[0].data(), got[1].data(), got[0].size() * sizeof(float)) == 0)
      << "rank " << r;
}

// The fixed-capacity exchange and exact mode (row counts first) give the same bits over MPI: every
// rank its own sequence (rank 1 none), prefill steps of 300, 7 and each rank's own rows and decode
// steps of one row; exact mode for all steps, capacity mode for all, and the default rule under a
// limit of 100 rows per peer (the 300-row step exact, the others capacity).
TEST_P(MpiGolden, CapacityEqualsExactBitForBit) {
  const auto g = testing::load_golden_case(GetParam());
  const ModelConfig config = load_model_config(g.dir + "/config.json");
  Checkpoint ck(g.dir);
  CpuBackend backend(1);
  const int r = g_comm->rank();
  const std::vector<int32_t> mine(g.tokens.begin() + r * 2, g.tokens.end() - r * 3);
  std::vector<int32_t> long_prompt;
  while (long_prompt.size() < 300) long_prompt.push_back(g.tokens[long_prompt.size() % g.tokens.size()]);
  const int64_t limits[] = {0, std::numeric_limits<int64_t>::max(), int64_t{100} * g_comm->size() * config.hidden_size};
  std::vector<float> got[3];
  std::vector<int32_t> greedy[3];
  for (int i = 0; i < 3; ++i) {
    ModelOptions o = options(g_comm.get());
    o.ep_capacity_limit = limits[i];
    o.max_step_rows = o.max_logit_rows = 320;
    o.kv.full_blocks = 96;
    Model model(config, ck, backend, o);
    if (r != 1) {
      const std::vector<int32_t> seven(mine.begin(), mine.begin() + 7);
      const std::vector<int32_t>* const prompts[] = {&long_prompt, &seven};
      for (const std::vector<int32_t>* tokens : prompts) {
        const auto l = compute_all_logits(model, *tokens);
        got[i].insert(got[i].end(), l.begin(), l.end());
      }
      greedy[i] = greedy_generate(model, mine, 4);
    }
    model.serve_peers();
  }
  for (int i = 1; i < 3; ++i) {
    ASSERT_EQ(got[i].size(), got[0].size());
    EXPECT_TRUE(got[0].empty() || std::memcmp(got[i].data(), got[0].data(), got[0].size() * sizeof(float)) == 0)
        << "rank " << r << ", limit " << limits[i];
    EXPECT_EQ(greedy[i], greedy[0]) << "rank " << r << ", limit " << limits[i];
  }
  if (r != 1) {
    EXPECT_FALSE(got[0].empty());
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, MpiGolden, ::testing::ValuesIn(testing::golden_case_names()));

TEST(MpiModel, DifferentModelsAreRefused) {
  const std::string dir = testing::load_golden_case(g_comm->rank() == 1 ? "tiny-b" : "tiny-a").dir;
  const ModelConfig config = load_model_config(dir + "/config.json");
  Checkpoint ck(dir);
  CpuBackend backend(1);
  try {
    Model model(config, ck, backend, options(g_comm.get()));
    ADD_FAILURE() << "expected the fingerprint check to fail";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("ranks disagree on the model"), std::string::npos) << e.what();
  }
}

// Last: the late ranks enter the barrier after rank 0 gave up, completing the request it left
// behind, then all ranks meet in a second barrier.
TEST(MpiComm, LateRankTimesOut) {
  Communicator& c = *g_comm;
  const double saved = c.timeout();
  if (c.rank() == 0) {
    c.set_timeout(0.2);
    const auto start = std::chrono::steady_clock::now();
    EXPECT_THROW(c.barrier(), CommError);
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
    c.set_timeout(saved);
  } else {
    std::this_thread::sleep_for(std::chrono::milliseconds(1000));
    c.barrier();
  }
  c.barrier();
}

}  // namespace
}  // namespace arbiter

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  arbiter::g_comm = std::make_unique<arbiter::MpiComm>(60.0);
  const int rc = RUN_ALL_TESTS();
  arbiter::g_comm.reset();
  return rc;
}
