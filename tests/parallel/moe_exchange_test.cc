// MoeExchange (dispatch/combine without a backend) over thread ranks: each token reaches each owning
// rank once, ranks with no tokens and ranks that receive nothing take part, partial sums add up.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <mutex>
#include <cmath>
#include <random>
#include <set>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/forwarding_backend.h"
#include "parallel/moe_dispatch.h"
#include "parallel/thread_comm.h"

namespace arbiter {
namespace {

struct Tokens {
  std::vector<int32_t> ids;
  std::vector<float> weights, hidden;
};

// Rank r has 3*r tokens (rank 0 none); experts are drawn from [0, max_expert] so the ranks owning
// higher experts receive nothing.
Tokens make_tokens(int rank, int K, int H, int max_expert) {
  Tokens t;
  std::mt19937 rng(static_cast<uint32_t>(rank * 977 + 5));
  const int rows = 3 * rank;
  for (int r = 0; r < rows; ++r) {
    std::set<int32_t> chosen;
    while (static_cast<int>(chosen.size()) < K) chosen.insert(static_cast<int32_t>(rng() % static_cast<uint32_t>(max_expert + 1)));
    for (int32_t e : chosen) {
      t.ids.push_back(e);
      t.weights.push_back(0.1f + static_cast<float>(rng() % 100) / 100.0f);
    }
    for (int c = 0; c < H; ++c) t.hidden.push_back(static_cast<float>(rank) + 0.25f * static_cast<float>(r) + 0.0625f * static_cast<float>(c % 7));
  }
  return t;
}

// The stand-in expert e multiplies its input by (e + 1).
void fake_experts(const MoeExchange& ex, int rank, const MoeExchange::Received& got, std::vector<float>& out) {
  const int K = ex.top_k(), H = ex.hidden();
  out.assign(static_cast<size_t>(got.rows * H), 0.0f);
  std::vector<float> gathered(static_cast<size_t>(got.rows * H));
  got.gather_hidden(gathered.data(), sizeof(float) * static_cast<size_t>(H));
  const float* x = gathered.data();
  for (int64_t i = 0; i < got.rows; ++i) {
    float scale = 0;
    for (int j = 0; j < K; ++j) {
      const int32_t local = got.expert_ids[i * K + j];
      if (local >= 0) scale += got.weights[i * K + j] * static_cast<float>(ex.placement().experts_of(rank)[static_cast<size_t>(local)] + 1);
    }
    for (int c = 0; c < H; ++c) out[static_cast<size_t>(i * H + c)] = scale * x[i * H + c];
  }
}

TEST(MoeExchange, DispatchCombineOncePerRank) {
  const int N = 4, E = 12, K = 4, H = 40;
  const auto placement = ExpertPlacement::contiguous(E, N);  // 3 experts per rank
  std::atomic<uint64_t> sent = 0, all_gather = 0;
  run_thread_ranks(N, [&](Communicator& comm) {
    const int me = comm.rank();
    MoeExchange ex(comm, placement, K, H, DType::kF32);
    for (int rep = 0; rep < 2; ++rep) {
      const Tokens t = make_tokens(me, K, H, 8);  // experts 0..8: rank 3 (9..11) receives nothing
      const int64_t rows = static_cast<int64_t>(t.ids.size() / K);
      const auto got = ex.dispatch(t.ids.data(), t.weights.data(), t.hidden.data(), rows);
      // Expected rows: every (token, owner) pair once, over all source ranks.
      int64_t expected = 0;
      for (int src = 0; src < N; ++src) {
        const Tokens s = make_tokens(src, K, H, 8);
        for (size_t r = 0; r < s.ids.size() / K; ++r) {
          bool here = false;
          for (int j = 0; j < K; ++j) here |= placement.owner(s.ids[r * K + static_cast<size_t>(j)]) == me;
          expected += here;
        }
      }
      EXPECT_EQ(got.rows, expected) << "rank " << me;
      if (me == 3) {
        EXPECT_EQ(got.rows, 0);
      }
      std::vector<float> expert_out, out(static_cast<size_t>(rows * H), -1.0f);
      fake_experts(ex, me, got, expert_out);
      ex.combine(expert_out.data(), out.data());
      for (int64_t r = 0; r < rows; ++r) {
        float scale = 0;
        for (int j = 0; j < K; ++j) scale += t.weights[static_cast<size_t>(r * K + j)] * static_cast<float>(t.ids[static_cast<size_t>(r * K + j)] + 1);
        for (int c = 0; c < H; ++c) {
          const float want = scale * t.hidden[static_cast<size_t>(r * H + c)];
          ASSERT_NEAR(out[static_cast<size_t>(r * H + c)], want, 1e-5f * std::fabs(want) + 1e-6f) << "rank " << me << " row " << r;
        }
      }
    }
    sent += ex.traffic().to_peers;
    all_gather += ex.traffic().all_gather_design;
  });
  // Deduplication: fewer bytes than replicating every token on every other rank and back.
  EXPECT_LT(sent.load(), all_gather.load());
}

TEST(MoeExchange, AllExpertsOnOneRankSendTheRowOnce) {
  const int N = 2, E = 8, K = 4, H = 32;
  const auto placement = ExpertPlacement::contiguous(E, N);
  run_thread_ranks(N, [&](Communicator& comm) {
    MoeExchange ex(comm, placement, K, H, DType::kBF16);
    // Both ranks: one token whose 4 experts all live on rank 1.
    const std::vector<int32_t> ids = {4, 5, 6, 7};
    const std::vector<float> w = {0.25f, 0.25f, 0.25f, 0.25f};
    std::vector<uint16_t> hidden(H);
    for (int c = 0; c < H; ++c) hidden[static_cast<size_t>(c)] = f32_to_bf16(static_cast<float>(c) - 8.0f);
    const auto got = ex.dispatch(ids.data(), w.data(), hidden.data(), 1);
    EXPECT_EQ(got.rows, comm.rank() == 1 ? 2 : 0);
    if (comm.rank() == 1) {
      for (int64_t i = 0; i < got.rows; ++i)
        for (int j = 0; j < K; ++j) EXPECT_EQ(got.expert_ids[i * K + j], j);
    }
    EXPECT_EQ(ex.traffic().to_peers + ex.traffic().to_self,
              static_cast<uint64_t>(H * 2 + K * 8));  // one record, to rank 1
    std::vector<uint16_t> out(H);
    std::vector<uint16_t> back(static_cast<size_t>(got.rows * H));
    got.gather_hidden(back.data(), 2 * H);
    ex.combine(back.data(), out.data());  // the identity "expert"
    for (int c = 0; c < H; ++c) EXPECT_EQ(out[static_cast<size_t>(c)], hidden[static_cast<size_t>(c)]);
  });
}


// Stand-in experts on a CPU backend: out[r] = sum_j w[r, j] * (global id + 1) * x[r] + j-th id's
// offset, so every row's result depends on which rank's experts it met and with what weights.
class FakeExperts : public ForwardingBackend {
 public:
  FakeExperts(Backend& inner, std::vector<int> global_ids) : ForwardingBackend(inner), global_(std::move(global_ids)) {}
  // The global ids of this rank's experts in the next moe() (a per-layer placement's layer).
  void use_experts(std::vector<int> global_ids) { global_ = std::move(global_ids); }
  void moe_experts(const Tensor& x, const Tensor& ids, const Tensor& w, const ExpertWeights&, float,
                   const Tensor& out) override {
    const int64_t rows = x.rows(), H = x.row_elements(), K = ids.row_elements();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < H; ++c) {
        float acc = 0;
        for (int64_t j = 0; j < K; ++j) {
          const int32_t e = ids.as<const int32_t>()[r * K + j];
          if (e < 0) continue;
          const float g = static_cast<float>(global_[static_cast<size_t>(e)] + 1);
          acc += w.as<const float>()[r * K + j] * (g * x.as<const float>()[r * H + c] + 0.01f * g);
        }
        out.as<float>()[r * H + c] = acc;
      }
  }

 private:
  std::vector<int> global_;
};

// The Backend's default (host) dispatch and combine on top of the CPU backend, and a memory kind the
// transports cannot read: the dispatcher then stages every exchange through host copies, as for a
// device backend over threads or MPI.
class DefaultOpsDevice final : public FakeExperts {
 public:
  using FakeExperts::FakeExperts;
  bool host_memory() const override { return false; }
  void moe_dispatch_pack(const Tensor& x, const Tensor& ids, const Tensor& w, const Tensor& owner, const Tensor& local,
                         const MoeSendBuffers& send, std::span<int64_t> rows_per_rank, const Tensor& load) override {
    Backend::moe_dispatch_pack(x, ids, w, owner, local, send, rows_per_rank, load);
  }
  void moe_combine(const Tensor& back, const Tensor& slots, const Tensor& out) override {
    Backend::moe_combine(back, slots, out);
  }
};

// Buffers a transport can only take as device buffers (the CPU backend's operations in place, with
// a stream of its own): the dispatcher hands them to all_to_all_v_parts_device.
char kFakeStream = 0;
class DeviceLike final : public FakeExperts {
 public:
  using FakeExperts::FakeExperts;
  bool host_memory() const override { return false; }
  void* native_stream() override { return &kFakeStream; }
};

// The Backend's default expert-load count on top of the CPU backend.
class DefaultCounting final : public ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  void count_expert_load(const Tensor& ids, const Tensor& load) override { Backend::count_expert_load(ids, load); }
};

struct DispatchCase {
  int ranks, experts, rows;
  std::string placement;  // empty: contiguous
  int max_expert;         // routing draws experts from [0, max_expert] (the owners of higher ones receive nothing)
};

// One rank's router output and rows for a test step: ids [rows, K] drawn from [0, max_expert] (a
// skipped slot now and then), weights, and hidden rows x [rows, H].
struct Routing {
  std::vector<int32_t> ids;
  std::vector<float> w, x;
};
Routing random_routing(uint32_t seed, int64_t rows, int K, int H, int max_expert) {
  std::mt19937 rng(seed);
  Routing g;
  g.x.resize(static_cast<size_t>(rows * H));
  for (int64_t r = 0; r < rows; ++r) {
    std::set<int32_t> chosen;
    while (static_cast<int>(chosen.size()) < K) chosen.insert(static_cast<int32_t>(rng() % static_cast<uint32_t>(max_expert + 1)));
    int j = 0;
    for (int32_t e : chosen) {
      g.ids.push_back(r % 5 == 3 && j == 2 ? -1 : e);
      g.w.push_back(static_cast<float>(rng() % 1000) / 997.0f);
      ++j;
    }
  }
  for (float& v : g.x) v = static_cast<float>(static_cast<int>(rng() % 20001) - 10000) / 3001.0f;
  return g;
}

// The backend-operation path (CPU backend in place; the Backend defaults staged through the host;
// device buffers exchanged by thread ranks that share a device) gives the host-staged path's bits:
// same rows, same order of additions. Rank 1 has no tokens.
TEST(MoeDispatcher, BackendOpsEqualHostStagedBitForBit) {
  const int K = 4, H = 24;
  const std::vector<DispatchCase> cases = {
      {2, 8, 1, "", 7},        {2, 8, 7, "", 3},     {2, 8, 300, "", 7},
      {3, 8, 1, "experts 8\nrank 0: 0-5\nrank 1: 6\nrank 2: 7\n", 7},
      {3, 8, 7, "experts 8\nrank 0: 0-5\nrank 1: 6\nrank 2: 7\n", 5},  // ranks 1, 2 receive nothing
      {3, 12, 300, "", 11},
      {4, 16, 1, "experts 16\nrank 0: 0\nrank 1: 1-2\nrank 2: 3-12\nrank 3: 13-15\n", 15},
      {4, 16, 7, "", 9},       {4, 16, 300, "experts 16\nrank 0: 0\nrank 1: 1-2\nrank 2: 3-12\nrank 3: 13-15\n", 15},
  };
  for (const DispatchCase& c : cases) {
    const auto placement = c.placement.empty() ? ExpertPlacement::contiguous(c.experts, c.ranks)
                                               : ExpertPlacement::parse(c.placement, "test placement");
    std::mutex mu;
    std::vector<std::string> failures;
    // Device buffers shared by thread ranks (as on one GPU), here host memory moved by memcpy: the
    // dispatcher's device path (buffers exchanged where they are, on the backend's stream).
    std::atomic<int> device_copies{0}, wrong_streams{0};
    DeviceCopy memcpy_copy{[&](void* dst, const void* src, size_t bytes, void* stream) {
                             if (stream != &kFakeStream) ++wrong_streams;
                             ++device_copies;
                             std::memcpy(dst, src, bytes);
                           },
                           [&](void* stream) {
                             if (stream != &kFakeStream) ++wrong_streams;
                           }};
    for (const bool device_group : {false, true})
    run_thread_ranks(c.ranks, [&](Communicator& comm) {
      const int me = comm.rank();
      const int64_t rows = me == 1 ? 0 : c.rows + me % 2;  // uneven, and rank 1 empty
      const Routing routing = random_routing(static_cast<uint32_t>(c.ranks * 131 + c.rows * 7 + me), rows, K, H, c.max_expert);
      const std::vector<int32_t>& ids = routing.ids;
      const std::vector<float>&w = routing.w, &x = routing.x;
      CpuBackend cpu(1);
      std::vector<int> mine = placement.experts_of(me);
      FakeExperts direct(cpu, mine);
      DefaultOpsDevice staged(cpu, mine);
      ExpertWeights local;
      local.gate_up_blocks.shape = {static_cast<int64_t>(mine.size()), 1, 1, 16};
      auto run = [&](Backend& backend, MoeDispatcher::Path path, int64_t max_rows) {
        MoeDispatcher d(comm, placement, backend, H, K, max_rows, path);
        std::vector<float> out;
        for (int rep = 0; rep < 2; ++rep) {  // twice: buffers reused
          DeviceBuffer bx = cpu.allocate(x.size() * 4 + 4), bi = cpu.allocate(ids.size() * 4 + 4),
                       bw = cpu.allocate(w.size() * 4 + 4), bo = cpu.allocate(x.size() * 4 + 4);
          const Tensor tx = bx.view(DType::kF32, {rows, H}), ti = bi.view(DType::kI32, {rows, K}),
                       tw = bw.view(DType::kF32, {rows, K}), to = bo.view(DType::kF32, {rows, H});
          if (rows) {
            cpu.upload(x.data(), tx);
            cpu.upload(ids.data(), ti);
            cpu.upload(w.data(), tw);
            std::memset(to.data, 0xff, to.bytes());  // NaNs: every element must be written
          }
          d.moe(tx, ti, tw, local, 7.0f, to);
          out.assign(static_cast<size_t>(rows * H), 0.0f);
          if (rows) cpu.download(to, out.data());
        }
        return std::make_pair(out, d.traffic());
      };
      const auto [want, want_traffic] = run(direct, MoeDispatcher::Path::kHostStaged, c.rows + 1);
      auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
        return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
      };
      std::string why;
      if (device_group) {
        DeviceLike device_like(cpu, mine);
        if (!same(run(device_like, MoeDispatcher::Path::kBackendOps, c.rows + 1).first, want))
          why += " device-buffer exchange differs;";
        if (!why.empty()) {
          std::lock_guard lk(mu);
          failures.push_back("rank " + std::to_string(me) + ":" + why);
        }
        return;
      }
      const auto [ops, ops_traffic] = run(direct, MoeDispatcher::Path::kBackendOps, c.rows + 1);
      const auto [grown, grown_traffic] = run(direct, MoeDispatcher::Path::kBackendOps, 0);
      const auto [dflt, dflt_traffic] = run(staged, MoeDispatcher::Path::kBackendOps, c.rows + 1);
      if (!same(ops, want)) why += " cpu ops differ;";
      if (!same(grown, want)) why += " cpu ops (grown buffers) differ;";
      if (!same(dflt, want)) why += " default ops staged differ;";
      for (float v : want)
        if (std::isnan(v)) {
          why += " NaN in output;";
          break;
        }
      if (ops_traffic.to_peers != want_traffic.to_peers || ops_traffic.to_self != want_traffic.to_self ||
          ops_traffic.all_gather_design != want_traffic.all_gather_design)
        why += " traffic differs;";
      if (!why.empty()) {
        std::lock_guard lk(mu);
        failures.push_back("rank " + std::to_string(me) + ":" + why);
      }
    }, default_comm_timeout(), device_group ? std::optional<DeviceCopy>(memcpy_copy) : std::nullopt);
    EXPECT_TRUE(failures.empty()) << c.ranks << " ranks, " << c.rows << " rows, placement '" << c.placement
                                  << "': " << ::testing::PrintToString(failures);
    EXPECT_GT(device_copies.load(), 0) << "the device-buffer run must exchange through the DeviceCopy";
    EXPECT_EQ(wrong_streams.load(), 0) << "copies and waits go on the backend's stream";
  }
}

// The fixed-capacity exchange (MoeDispatcher::Exchange::kCapacity) gives exact mode's bits: the same
// rows reach the same experts in the same order, and padding rows are never summed. Uneven and
// per-layer placements, a rank without tokens (it only serves: begin_step(false, 0)), ranks that
// receive nothing, steps of 1, 7 and 300 rows; the CPU backend in place, the Backend defaults and a
// device-like backend staged through the host, and device buffers moved by thread ranks. Under a
// limit of 100 rows per peer the 300-row steps run in exact mode and the others in capacity mode.
TEST(MoeDispatcher, CapacityEqualsExactBitForBit) {
  const int K = 4, H = 24;
  const std::string uneven4 = "experts 16\nrank 0: 0\nrank 1: 1-2\nrank 2: 3-12\nrank 3: 13-15\n";
  const std::string per_layer3 =
      "experts 8\nrank 0: 0-5\nrank 1: 6\nrank 2: 7\nlayers 2\nlayer 1\nrank 0: 7\nrank 1: 0 2 4 6\nrank 2: 1 3 5\n";
  const std::string per_layer4 = "experts 16\nrank 0: 0-3\nrank 1: 4-7\nrank 2: 8-11\nrank 3: 12-15\nlayers 2\n"
                                 "layer 1\nrank 0: 15\nrank 1: 0-2 9\nrank 2: 3-8 10-13\nrank 3: 14\n";
  const std::vector<DispatchCase> cases = {
      {2, 8, 1, "", 7},           {2, 8, 7, "", 3},           {2, 8, 300, "", 7},
      {3, 8, 1, per_layer3, 7},   {3, 8, 7, per_layer3, 5},   {3, 12, 300, "", 11},  // 3 ranks, 7 rows: layer 0's ranks 1, 2 receive nothing
      {4, 16, 1, uneven4, 15},    {4, 16, 7, per_layer4, 9},  {4, 16, 300, per_layer4, 15},
  };
  using Exchange = MoeDispatcher::Exchange;
  for (const DispatchCase& c : cases) {
    const auto placement = c.placement.empty() ? ExpertPlacement::contiguous(c.experts, c.ranks)
                                               : ExpertPlacement::parse(c.placement, "test placement");
    const int layers = std::max(placement.num_layers(), 1);
    auto rows_of = [&](int rank) -> int64_t { return rank == 1 ? 0 : c.rows + rank % 2; };  // uneven, rank 1 empty
    int64_t most = 0;
    for (int r = 0; r < c.ranks; ++r) most = std::max(most, rows_of(r));
    std::mutex mu;
    std::vector<std::string> failures;
    std::atomic<int> device_copies{0};
    DeviceCopy memcpy_copy{[&](void* dst, const void* src, size_t bytes, void*) {
                             ++device_copies;
                             std::memcpy(dst, src, bytes);
                           },
                           [](void*) {}};
    for (const bool device_group : {false, true})
    run_thread_ranks(c.ranks, [&](Communicator& comm) {
      const int me = comm.rank();
      const int64_t rows = rows_of(me);
      std::vector<Routing> routing;
      for (int l = 0; l < layers; ++l)
        routing.push_back(random_routing(static_cast<uint32_t>(c.ranks * 131 + c.rows * 7 + me + 1000 * l), rows, K, H, c.max_expert));
      CpuBackend cpu(1);
      FakeExperts direct(cpu, {});
      DefaultOpsDevice staged(cpu, {});
      DeviceLike device_like(cpu, {});
      std::string why;
      // Two steps of every layer (buffers reused); the outputs of all of them, concatenated.
      auto run = [&](FakeExperts& backend, int64_t limit, const char* what) {
        MoeDispatcher d(comm, placement, backend, H, K, c.rows + 1, MoeDispatcher::Path::kBackendOps, limit);
        const Exchange want = limit >= most * c.ranks * H ? Exchange::kCapacity : Exchange::kExact;
        std::vector<float> all;
        for (int rep = 0; rep < 2; ++rep)
          for (int l = 0; l < layers; ++l) {
            const Routing& g = routing[static_cast<size_t>(l)];
            const std::vector<int> mine = placement.experts_of(l, me);
            backend.use_experts(mine);
            ExpertWeights local;
            local.gate_up_blocks.shape = {static_cast<int64_t>(mine.size()), 1, 1, 16};
            if (!d.begin_step(me != 1, rows)) why += std::string(" ") + what + ": begin_step saw no step;";
            if (d.step_exchange() != want || d.step_capacity() != (want == Exchange::kCapacity ? most : 0))
              why += std::string(" ") + what + ": wrong exchange mode or capacity " + std::to_string(d.step_capacity()) + ";";
            DeviceBuffer bx = cpu.allocate(g.x.size() * 4 + 4), bi = cpu.allocate(g.ids.size() * 4 + 4),
                         bw = cpu.allocate(g.w.size() * 4 + 4), bo = cpu.allocate(g.x.size() * 4 + 4);
            const Tensor tx = bx.view(DType::kF32, {rows, H}), ti = bi.view(DType::kI32, {rows, K}),
                         tw = bw.view(DType::kF32, {rows, K}), to = bo.view(DType::kF32, {rows, H});
            if (rows) {
              cpu.upload(g.x.data(), tx);
              cpu.upload(g.ids.data(), ti);
              cpu.upload(g.w.data(), tw);
              std::memset(to.data, 0xff, to.bytes());  // NaNs: every element must be written
            }
            d.moe(tx, ti, tw, local, 7.0f, to, l);
            d.finish_step();
            std::vector<float> out(static_cast<size_t>(rows * H));
            if (rows) cpu.download(to, out.data());
            all.insert(all.end(), out.begin(), out.end());
          }
        return std::make_pair(all, d.traffic());
      };
      auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
        return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
      };
      const int64_t always = std::numeric_limits<int64_t>::max(), hundred_rows = 100 * c.ranks * H;
      const auto [exact, exact_traffic] = run(direct, 0, "exact");
      for (float v : exact)
        if (std::isnan(v)) {
          why += " NaN in output;";
          break;
        }
      if (device_group) {
        if (!same(run(device_like, always, "device capacity").first, exact)) why += " device-buffer capacity differs;";
        if (!same(run(device_like, hundred_rows, "device chosen").first, exact)) why += " device-buffer chosen differs;";
      } else {
        const auto [capacity, capacity_traffic] = run(direct, always, "capacity");
        if (!same(capacity, exact)) why += " cpu capacity differs;";
        if (!same(run(direct, hundred_rows, "chosen").first, exact)) why += " cpu chosen differs;";
        if (!same(run(staged, always, "default ops capacity").first, exact)) why += " default ops capacity differs;";
        if (!same(run(device_like, always, "staged capacity").first, exact)) why += " staged capacity differs;";
        // Every peer gets a full slot of `most` rows (row + ids + weights) and returns as many rows.
        const uint64_t row = H * 4, per_peer = static_cast<uint64_t>(most) * (row + K * 8 + row);
        if (capacity_traffic.to_peers != 2ull * static_cast<uint64_t>(layers * (c.ranks - 1)) * per_peer)
          why += " capacity traffic " + std::to_string(capacity_traffic.to_peers) + " is not the padded size;";
        if (capacity_traffic.all_gather_design != exact_traffic.all_gather_design) why += " all-gather design differs;";
      }
      if (!why.empty()) {
        std::lock_guard lk(mu);
        failures.push_back("rank " + std::to_string(me) + (device_group ? " (device group):" : ":") + why);
      }
    }, default_comm_timeout(), device_group ? std::optional<DeviceCopy>(memcpy_copy) : std::nullopt);
    EXPECT_TRUE(failures.empty()) << c.ranks << " ranks, " << c.rows << " rows, placement '" << c.placement
                                  << "': " << ::testing::PrintToString(failures);
    EXPECT_GT(device_copies.load(), 0) << "the device-buffer runs must exchange through the DeviceCopy";
  }
}

// Backend::count_expert_load: the CPU backend's and the default (download, count, upload) agree
// with a direct count on random ids, skipping negative and out-of-range ids and adding to what is there.
TEST(MoeDispatchOps, CountExpertLoad) {
  CpuBackend cpu(1);
  DefaultCounting staged(cpu);
  std::mt19937 rng(9);
  for (int round = 0; round < 50; ++round) {
    const int E = 1 + static_cast<int>(rng() % 16), rows = static_cast<int>(rng() % 40), K = 1 + static_cast<int>(rng() % 4);
    std::vector<int32_t> ids(static_cast<size_t>(rows * K));
    for (auto& id : ids) id = static_cast<int32_t>(rng() % static_cast<unsigned>(E + 3)) - 1;  // -1 .. E+1
    std::vector<int32_t> want(static_cast<size_t>(E));
    for (auto& v : want) v = static_cast<int32_t>(rng() % 5);
    std::vector<int32_t> a = want, b = want;
    for (int32_t id : ids)
      if (id >= 0 && id < E) ++want[static_cast<size_t>(id)];
    const Tensor t_ids{ids.data(), DType::kI32, {rows, K}};
    cpu.count_expert_load(t_ids, Tensor{a.data(), DType::kI32, {E}});
    staged.count_expert_load(t_ids, Tensor{b.data(), DType::kI32, {E}});
    EXPECT_EQ(a, want) << round;
    EXPECT_EQ(b, want) << round;
  }
}

// The pack on its own: slots, receive-side local ids, counts and the expert load, against a
// direct reading of the routing (3 ranks, uneven placement, a token all of whose experts sit on one rank).
TEST(MoeDispatchOps, PackPlanAndLoad) {
  CpuBackend cpu(1);
  const int K = 2, H = 3, N = 3;
  const auto placement = ExpertPlacement::parse("experts 6\nrank 0: 0-3\nrank 1: 4\nrank 2: 5\n", "t");
  const std::vector<int32_t> ids = {0, 1, 4, 5, 5, -1, 2, 4};
  const std::vector<float> w = {0.5f, 0.25f, 1, 2, 3, 4, 5, 6}, x = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  std::vector<int32_t> owner, local, load(6, 10);
  for (int e = 0; e < 6; ++e) {
    owner.push_back(placement.owner(e));
    local.push_back(placement.local_index(e));
  }
  std::vector<float> sx(8 * H, -1), sw(8 * K, -1);
  std::vector<int32_t> sids(8 * K, -7), slots(4 * N, -7);
  auto t = [](auto& v, DType d, int64_t r, int64_t c) { return Tensor{v.data(), d, {r, c}}; };
  std::vector<int32_t> ids_m = ids, owner_m = owner, local_m = local;
  std::vector<float> w_m = w, x_m = x;
  std::vector<int64_t> counts(N, -1);
  cpu.moe_dispatch_pack(t(x_m, DType::kF32, 4, H), t(ids_m, DType::kI32, 4, K), t(w_m, DType::kF32, 4, K),
                        Tensor{owner_m.data(), DType::kI32, {6}}, Tensor{local_m.data(), DType::kI32, {6}},
                        {t(sx, DType::kF32, 8, H), t(sids, DType::kI32, 8, K), t(sw, DType::kF32, 8, K), t(slots, DType::kI32, 4, N)},
                        counts, Tensor{load.data(), DType::kI32, {6}});
  // Tokens: 0 -> rank 0 only; 1 -> ranks 1, 2; 2 -> rank 2 (once); 3 -> ranks 0, 1.
  EXPECT_EQ(counts, (std::vector<int64_t>{2, 2, 2}));
  EXPECT_EQ(slots, (std::vector<int32_t>{0, -1, -1, -1, 2, 4, -1, -1, 5, 1, 3, -1}));
  EXPECT_EQ(std::vector<int32_t>(sids.begin(), sids.begin() + 12),
            (std::vector<int32_t>{0, 1, 2, -1, 0, -1, -1, 0, -1, 0, 0, -1}));
  EXPECT_EQ(std::vector<float>(sw.begin(), sw.begin() + 4), (std::vector<float>{0.5f, 0.25f, 5, 6}));
  EXPECT_EQ(std::vector<float>(sx.begin() + 3 * H, sx.begin() + 4 * H), (std::vector<float>{10, 11, 12}));
  EXPECT_EQ(load, (std::vector<int32_t>{11, 11, 11, 10, 12, 12}));
  // Combine: token 1 gets back rows 2 and 4 summed; a token sent nowhere would get zeros.
  std::vector<float> back(6 * H), out(4 * H, -1);
  for (size_t i = 0; i < back.size(); ++i) back[i] = static_cast<float>(i);
  cpu.moe_combine(t(back, DType::kF32, 6, H), t(slots, DType::kI32, 4, N), t(out, DType::kF32, 4, H));
  EXPECT_EQ(out, (std::vector<float>{0, 1, 2, 6 + 12, 7 + 13, 8 + 14, 15, 16, 17, 3 + 9, 4 + 10, 5 + 11}));
  EXPECT_THROW(cpu.moe_dispatch_pack(t(x_m, DType::kF32, 4, H), t(ids_m, DType::kI32, 4, K), t(w_m, DType::kF32, 4, K),
                                     Tensor{owner_m.data(), DType::kI32, {5}}, Tensor{local_m.data(), DType::kI32, {5}},
                                     {t(sx, DType::kF32, 8, H), t(sids, DType::kI32, 8, K), t(sw, DType::kF32, 8, K),
                                      t(slots, DType::kI32, 4, N)},
                                     counts, Tensor{}),
               std::out_of_range);  // expert 5 outside a map of 5
}

}  // namespace
}  // namespace arbiter
