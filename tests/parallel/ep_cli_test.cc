// `arbiter logits|generate` as one logical model over thread ranks (--transport threads --ranks N)
// and over MPI processes (mpirun -np N arbiter ...), with placements from `arbiter placement`, and
// the launch errors, run as users run them.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "runtime/npy.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

using testing::run_command;
using Result = testing::RunResult;

// No ssh in CI containers: the empty agent lets Open MPI start local ranks without one.
std::string mpirun(int np) {
  return std::string("OMPI_MCA_plm_rsh_agent= OMPI_MCA_btl_vader_single_copy_mechanism=none ") + ARBITER_MPIEXEC +
         " --oversubscribe --allow-run-as-root -np " + std::to_string(np) + " ";
}
const std::string kArbiter = ARBITER_BINARY;

std::string join(const std::vector<int32_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

float max_rel_err(const NpyArray& got, const NpyArray& want) {
  EXPECT_EQ(got.shape, want.shape);
  if (got.data.size() != want.data.size()) return INFINITY;
  float err = 0, top = 0;
  for (size_t i = 0; i < want.data.size(); ++i) {
    err = std::max(err, std::fabs(got.data[i] - want.data[i]));
    top = std::max(top, std::fabs(want.data[i]));
  }
  return err / top;
}

TEST(EpCli, LogitsOverThreadsAndMpiMatchSingleRank) {
  const auto g = testing::load_golden_case("tiny-b");
  testing::TempDir tmp;
  const std::string args = " logits --device cpu --model " + g.dir + " --tokens " + join(g.tokens) + " --out ";
  Result r = run_command(kArbiter + args + tmp.file("single.npy"));
  ASSERT_EQ(r.status, 0) << r.output;
  const NpyArray single = read_npy_f32(tmp.file("single.npy")), golden = read_npy_f32(g.dir + "/logits.npy");
  EXPECT_LE(max_rel_err(single, golden), 2e-4f);

  r = run_command(kArbiter + args + tmp.file("threads.npy") + " --transport threads --ranks 3");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_LE(max_rel_err(read_npy_f32(tmp.file("threads.npy")), single), 1e-5f);

  r = run_command(mpirun(2) + kArbiter + args + tmp.file("mpi.npy"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_LE(max_rel_err(read_npy_f32(tmp.file("mpi.npy")), single), 1e-5f);
}

// A placement written by `arbiter placement` from statistics (per layer, scattered sets) loads over
// thread ranks and MPI processes and gives the single-rank logits.
TEST(EpCli, PlacementFromStatisticsGivesTheSameLogits) {
  const auto g = testing::load_golden_case("tiny-b");
  testing::TempDir tmp;
  const std::string config = g.dir + "/config.json";
  std::ifstream cfg(config);
  const auto c = nlohmann::json::parse(cfg);
  const int layers = c.at("num_hidden_layers").get<int>(), experts = c.at("num_local_experts").get<int>();
  // Skewed statistics: a different hot set in every layer.
  nlohmann::json rows = nlohmann::json::array();
  for (int l = 0; l < layers; ++l) {
    std::vector<int64_t> row;
    for (int e = 0; e < experts; ++e) row.push_back((e * 5 + l * 3) % experts == 0 ? 900 : 10 + (e * 7 + l) % 13);
    rows.push_back(row);
  }
  std::ofstream(tmp.file("stats.json")) << nlohmann::json{{"expert_load", {{"experts", experts}, {"layers", rows}}}}.dump();
  Result r = run_command(kArbiter + " placement --stats " + tmp.file("stats.json") + " --ranks 3 --out " + tmp.file("b.placement"));
  ASSERT_EQ(r.status, 0) << r.output;
  std::ifstream written(tmp.file("b.placement"));
  const std::string text((std::istreambuf_iterator<char>(written)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("layer " + std::to_string(layers - 1)), std::string::npos) << text;
  const std::string args = " logits --device cpu --model " + g.dir + " --tokens " + join(g.tokens) + " --out ";
  r = run_command(kArbiter + args + tmp.file("single.npy"));
  ASSERT_EQ(r.status, 0) << r.output;
  const NpyArray single = read_npy_f32(tmp.file("single.npy"));
  r = run_command(kArbiter + args + tmp.file("threads.npy") + " --transport threads --ranks 3 --placement " + tmp.file("b.placement"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_LE(max_rel_err(read_npy_f32(tmp.file("threads.npy")), single), 1e-5f);
  r = run_command(mpirun(3) + kArbiter + args + tmp.file("mpi.npy") + " --transport mpi --placement " + tmp.file("b.placement"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_LE(max_rel_err(read_npy_f32(tmp.file("mpi.npy")), single), 1e-5f);
}

TEST(EpCli, GenerateOverThreadsAndMpi) {
  const auto g = testing::load_golden_case("tiny-a");
  const std::string want = "{\"tokens\":[" + join(g.greedy) + "]}\n";
  const std::string args = " generate --device cpu --model " + g.dir + " --tokens " + join(g.tokens) +
                           " --max-new-tokens " + std::to_string(g.greedy.size());
  Result r = run_command(kArbiter + args + " --transport threads --ranks 2");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, want);
  r = run_command(mpirun(3) + kArbiter + args);  // 8 experts over 3 ranks: 3/3/2
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, want) << "only rank 0 writes";
  r = run_command(mpirun(2) + kArbiter + args + " --transport mpi --placement " + ARBITER_SOURCE_DIR +
            "/tests/parallel/data/tiny-a-7-1.placement");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, want);
}

TEST(EpCli, LaunchErrors) {
  const auto a = testing::load_golden_case("tiny-a"), b = testing::load_golden_case("tiny-b");
  testing::TempDir tmp;
  const std::string tail = " --tokens " + join(a.tokens) + " --out " + tmp.file("x.npy");
  // Ranks started with different models (MPMD launch): every rank refuses, none hangs.
  Result r = run_command(mpirun(1) + kArbiter + " logits --model " + a.dir + tail + " : -np 1 " + kArbiter +
                   " logits --model " + b.dir + tail);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("ranks disagree on the model"), std::string::npos) << r.output;

  r = run_command(kArbiter + " logits --model " + a.dir + tail + " --ranks 9");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("9 ranks but only 8 experts"), std::string::npos) << r.output;

  std::ofstream(tmp.file("bad.placement")) << "experts 8\nrank 0: 0-2\nrank 1: 4-7\n";
  r = run_command(kArbiter + " logits --model " + a.dir + tail + " --ranks 2 --placement " + tmp.file("bad.placement"));
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("no rank owns expert 3"), std::string::npos) << r.output;

  std::ofstream(tmp.file("two.placement")) << "experts 8\nrank 0: 0-3\nrank 1: 4-7\n";
  r = run_command(kArbiter + " logits --model " + a.dir + tail + " --ranks 3 --placement " + tmp.file("two.placement"));
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("is for 2 ranks but 3 are running"), std::string::npos) << r.output;

  // A rank that does not exist, and placements made for another model: errors naming the file,
  // before any weight is loaded.
  std::ofstream(tmp.file("three.placement")) << "experts 8\nrank 0: 0-2\nrank 1: 3-5\nrank 2: 6-7\n";
  r = run_command(kArbiter + " logits --model " + a.dir + tail + " --ranks 2 --placement " + tmp.file("three.placement"));
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find(tmp.file("three.placement") + " names rank 2, which does not exist"), std::string::npos) << r.output;
  std::ofstream(tmp.file("other.placement")) << "experts 12\nrank 0: 0-5\nrank 1: 6-11\n";
  r = run_command(kArbiter + " logits --model " + a.dir + tail + " --ranks 2 --placement " + tmp.file("other.placement"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("expert placement " + tmp.file("other.placement") + " is for 12 experts but the model has 8"),
            std::string::npos) << r.output;
  std::ofstream(tmp.file("deep.placement")) << "experts 8\nrank 0: 0-3\nrank 1: 4-7\nlayers 36\nlayer 35\nrank 0: 0 2\nrank 1: 1 3-7\n";
  r = run_command(kArbiter + " logits --model " + a.dir + tail + " --ranks 2 --placement " + tmp.file("deep.placement"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("expert placement " + tmp.file("deep.placement") + " is for 36 layers but the model has"),
            std::string::npos) << r.output;

  r = run_command(kArbiter + " logits --model " + a.dir + tail + " --transport carrier-pigeon");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("--transport must be"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace arbiter
