// Dispatch + combine of one MoE layer of the real gpt-oss shape (hidden 2880, top-4; 32 and 128
// experts) for 1, 64 and 1024 tokens per rank: over 2 and 4 thread ranks in one process, or over
// the processes of `mpirun -np N` (then N is the world size). The experts themselves are not run
// (each rank returns a preallocated buffer as their output), so the time is routing, packing, the three
// all-to-all-v exchanges, unpacking and summing. Routing is uniform random top-4 (no expert skew:
// the worst case for deduplication).
//
// "dispatcher" runs the same layer through MoeDispatcher on a CPU backend (one thread per rank), the
// way the model does, with path 0 (host-staged: download, MoeExchange on the host, upload) or path 1
// (the backend's moe_dispatch_pack / moe_combine on its own buffers, which the transport reads and
// writes directly); its experts are a no-op as well. On path 1, capacity 0 sizes every exchange
// exactly (row counts exchanged first, MoeDispatcher::Exchange::kExact) and capacity 1 uses the
// fixed-capacity exchange (every peer a slot of `tokens` rows, padding included; no count exchange),
// whatever the step size.
//
// Counters: moved_GBps is the payload through the transport (every rank's dispatch and combine
// bytes, self-addressed part included) per second; vs_memcpy divides it by one thread's memcpy of
// the same byte count measured in the same run; sent_vs_allgather is the bytes that crossed between
// ranks over what an all-gather design (every token to every other rank, one result row back from
// each) would send.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <thread>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/forwarding_backend.h"
#include "parallel/moe_dispatch.h"
#include "parallel/mpi_comm.h"
#include "parallel/thread_comm.h"

namespace arbiter {
namespace {

constexpr int kHidden = 2880, kTopK = 4;

struct RankInput {
  std::vector<int32_t> ids;
  std::vector<float> weights, hidden;
};

RankInput make_input(int rank, int tokens, int experts) {
  RankInput in;
  std::mt19937 rng(static_cast<uint32_t>(rank * 7919 + tokens * 31 + experts));
  for (int t = 0; t < tokens; ++t) {
    std::set<int32_t> chosen;
    while (static_cast<int>(chosen.size()) < kTopK) chosen.insert(static_cast<int32_t>(rng() % static_cast<uint32_t>(experts)));
    for (int32_t e : chosen) {
      in.ids.push_back(e);
      in.weights.push_back(0.25f);
    }
  }
  in.hidden.assign(static_cast<size_t>(tokens) * kHidden, 0.5f);
  return in;
}

// One layer's dispatch and combine; the "experts" return whatever `expert_out` holds.
void one_layer(MoeExchange& ex, const RankInput& in, int tokens, std::vector<float>& expert_out, std::vector<float>& out) {
  const auto got = ex.dispatch(in.ids.data(), in.weights.data(), in.hidden.data(), tokens);
  if (expert_out.size() < static_cast<size_t>(got.rows) * kHidden) expert_out.resize(static_cast<size_t>(got.rows) * kHidden);
  ex.combine(expert_out.data(), out.data());
}

// Seconds for one memcpy of `bytes` (best of a few, so page faults are not counted).
double memcpy_seconds(size_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    benchmark::DoNotOptimize(b.data());
    benchmark::ClobberMemory();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// Fixed iteration counts keep the ranks in lockstep (Google Benchmark cannot size the loop on each
// rank independently without deadlocking the collectives).
int64_t iterations_for(int ranks, int tokens) {
  const double bytes = 2.0 * ranks * tokens * kHidden * 4 * 2.5;
  return std::clamp<int64_t>(static_cast<int64_t>(4e8 / bytes), 5, 3000);
}

void set_counters(benchmark::State& state, double moved, double crossed, double all_gather, double seconds_per_iter) {
  const double mc = memcpy_seconds(static_cast<size_t>(moved));
  state.counters["moved_MB"] = moved / 1e6;
  state.counters["moved_GBps"] = moved / seconds_per_iter / 1e9;
  state.counters["memcpy_GBps"] = moved / mc / 1e9;
  state.counters["vs_memcpy"] = mc / seconds_per_iter;
  state.counters["sent_vs_allgather"] = all_gather > 0 ? crossed / all_gather : 0;
}

void BM_ThreadRanks(benchmark::State& state) {
  const int ranks = static_cast<int>(state.range(0)), experts = static_cast<int>(state.range(1)),
            tokens = static_cast<int>(state.range(2));
  const int64_t iters = state.max_iterations;
  auto comms = ThreadComm::create_group(ranks);
  const auto placement = ExpertPlacement::contiguous(experts, ranks);
  std::vector<std::unique_ptr<MoeExchange>> ex;
  std::vector<RankInput> inputs;
  std::vector<std::vector<float>> outs, expert_outs(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    ex.push_back(std::make_unique<MoeExchange>(*comms[static_cast<size_t>(r)], placement, kTopK, kHidden, DType::kF32));
    inputs.push_back(make_input(r, tokens, experts));
    outs.emplace_back(static_cast<size_t>(tokens) * kHidden);
  }
  // Ranks 1.. run on their own threads, rank 0 on the benchmark's; one warm-up layer each.
  std::vector<std::thread> workers;
  for (int r = 1; r < ranks; ++r)
    workers.emplace_back([&, r] {
      const size_t k = static_cast<size_t>(r);
      for (int64_t i = 0; i <= iters; ++i) one_layer(*ex[k], inputs[k], tokens, expert_outs[k], outs[k]);
    });
  one_layer(*ex[0], inputs[0], tokens, expert_outs[0], outs[0]);
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) one_layer(*ex[0], inputs[0], tokens, expert_outs[0], outs[0]);
  const double per_iter = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(iters);
  for (auto& w : workers) w.join();
  double moved = 0, crossed = 0, all_gather = 0;
  for (auto& e : ex) {
    moved += static_cast<double>(e->traffic().to_peers + e->traffic().to_self);
    crossed += static_cast<double>(e->traffic().to_peers);
    all_gather += static_cast<double>(e->traffic().all_gather_design);
  }
  const double layers = static_cast<double>(iters + 1);
  set_counters(state, moved / layers, crossed / layers, all_gather / layers, per_iter);
}

// A CPU backend whose experts do nothing (their output buffer keeps what it holds).
class NoExperts final : public ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  void moe_experts(const Tensor&, const Tensor&, const Tensor&, const ExpertWeights&, float, const Tensor&) override {}
};

void BM_Dispatcher(benchmark::State& state) {
  const int ranks = static_cast<int>(state.range(0)), experts = static_cast<int>(state.range(1)),
            tokens = static_cast<int>(state.range(2));
  const auto path = state.range(3) ? MoeDispatcher::Path::kBackendOps : MoeDispatcher::Path::kHostStaged;
  const int64_t capacity_limit = state.range(4) ? std::numeric_limits<int64_t>::max() : 0;
  const int64_t iters = state.max_iterations;
  auto comms = ThreadComm::create_group(ranks);
  const auto placement = ExpertPlacement::contiguous(experts, ranks);
  struct Rank {
    std::unique_ptr<CpuBackend> cpu;
    std::unique_ptr<NoExperts> backend;
    std::unique_ptr<MoeDispatcher> dispatcher;
    DeviceBuffer x, ids, w, out;
    Tensor tx, tids, tw, tout;
    ExpertWeights local;
  };
  std::vector<Rank> rs(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    Rank& k = rs[static_cast<size_t>(r)];
    k.cpu = std::make_unique<CpuBackend>(1);
    k.backend = std::make_unique<NoExperts>(*k.cpu);
    k.dispatcher = std::make_unique<MoeDispatcher>(*comms[static_cast<size_t>(r)], placement, *k.backend, kHidden, kTopK,
                                                   tokens, path, capacity_limit);
    const RankInput in = make_input(r, tokens, experts);
    k.x = k.cpu->allocate(in.hidden.size() * 4);
    k.ids = k.cpu->allocate(in.ids.size() * 4);
    k.w = k.cpu->allocate(in.weights.size() * 4);
    k.out = k.cpu->allocate(in.hidden.size() * 4);
    k.tx = k.x.view(DType::kF32, {tokens, kHidden});
    k.tids = k.ids.view(DType::kI32, {tokens, kTopK});
    k.tw = k.w.view(DType::kF32, {tokens, kTopK});
    k.tout = k.out.view(DType::kF32, {tokens, kHidden});
    k.cpu->upload(in.hidden.data(), k.tx);
    k.cpu->upload(in.ids.data(), k.tids);
    k.cpu->upload(in.weights.data(), k.tw);
    k.local.gate_up_blocks.shape = {static_cast<int64_t>(placement.experts_of(r).size()), 1, 1, 16};
  }
  auto layer = [&](Rank& k) { k.dispatcher->moe(k.tx, k.tids, k.tw, k.local, 7.0f, k.tout); };
  // One step handshake (it picks the exchange mode), then every layer of the run in that step.
  auto begin = [&](Rank& k) { k.dispatcher->begin_step(true, tokens); };
  std::vector<std::thread> workers;
  for (int r = 1; r < ranks; ++r)
    workers.emplace_back([&, r] {
      begin(rs[static_cast<size_t>(r)]);
      for (int64_t i = 0; i <= iters; ++i) layer(rs[static_cast<size_t>(r)]);
      rs[static_cast<size_t>(r)].dispatcher->finish_step();
    });
  begin(rs[0]);
  layer(rs[0]);
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) layer(rs[0]);
  const double per_iter = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(iters);
  rs[0].dispatcher->finish_step();
  for (auto& w : workers) w.join();
  double moved = 0, crossed = 0, all_gather = 0;
  for (auto& k : rs) {
    const auto t = k.dispatcher->traffic();
    moved += static_cast<double>(t.to_peers + t.to_self);
    crossed += static_cast<double>(t.to_peers);
    all_gather += static_cast<double>(t.all_gather_design);
  }
  const double layers = static_cast<double>(iters + 1);
  set_counters(state, moved / layers, crossed / layers, all_gather / layers, per_iter);
}

MpiComm* g_mpi = nullptr;

void BM_MpiRanks(benchmark::State& state) {
  const int experts = static_cast<int>(state.range(0)), tokens = static_cast<int>(state.range(1));
  MpiComm& comm = *g_mpi;
  const int64_t iters = state.max_iterations;
  MoeExchange ex(comm, ExpertPlacement::contiguous(experts, comm.size()), kTopK, kHidden, DType::kF32);
  const RankInput in = make_input(comm.rank(), tokens, experts);
  std::vector<float> out(static_cast<size_t>(tokens) * kHidden), expert_out;
  one_layer(ex, in, tokens, expert_out, out);
  comm.barrier();
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) one_layer(ex, in, tokens, expert_out, out);
  const double per_iter = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(iters);
  double mine[3] = {static_cast<double>(ex.traffic().to_peers + ex.traffic().to_self),
                    static_cast<double>(ex.traffic().to_peers), static_cast<double>(ex.traffic().all_gather_design)};
  std::vector<double> all(3 * static_cast<size_t>(comm.size()));
  comm.all_gather(mine, sizeof mine, all.data());
  double sum[3] = {0, 0, 0};
  for (size_t i = 0; i < all.size(); ++i) sum[i % 3] += all[i];
  const double layers = static_cast<double>(iters + 1);
  comm.barrier();  // the others wait (mostly asleep) while rank 0 measures memcpy
  set_counters(state, sum[0] / layers, sum[1] / layers, sum[2] / layers, per_iter);
  comm.barrier();
}

class SilentReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace
}  // namespace arbiter

int main(int argc, char** argv) {
  using namespace arbiter;
  benchmark::Initialize(&argc, argv);
  std::unique_ptr<MpiComm> mpi;
  if (MpiComm::launched_by_mpirun()) {
    mpi = std::make_unique<MpiComm>();
    g_mpi = mpi.get();
    for (int experts : {32, 128})
      for (int tokens : {1, 64, 1024})
        benchmark::RegisterBenchmark(("mpi/ranks:" + std::to_string(mpi->size())).c_str(), BM_MpiRanks)
            ->ArgNames({"experts", "tokens"})
            ->Args({experts, tokens})
            ->Iterations(iterations_for(mpi->size(), tokens))
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
  } else {
    for (int ranks : {2, 4})
      for (int tokens : {1, 64, 1024})
        for (int path : {0, 1})
          for (int capacity = 0; capacity <= path; ++capacity)  // (the host-staged path has no capacity mode)
            benchmark::RegisterBenchmark("dispatcher", BM_Dispatcher)
                ->ArgNames({"ranks", "experts", "tokens", "path", "capacity"})
                ->Args({ranks, 128, tokens, path, capacity})
                ->Iterations(iterations_for(ranks, tokens))
                ->Unit(benchmark::kMicrosecond)
                ->UseRealTime();
    for (int ranks : {2, 4})
      for (int experts : {32, 128})
        for (int tokens : {1, 64, 1024})
          benchmark::RegisterBenchmark("threads", BM_ThreadRanks)
              ->ArgNames({"ranks", "experts", "tokens"})
              ->Args({ranks, experts, tokens})
              ->Iterations(iterations_for(ranks, tokens))
              ->Unit(benchmark::kMicrosecond)
              ->UseRealTime();
  }
  if (mpi && mpi->rank() != 0) {
    SilentReporter silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  } else {
    benchmark::RunSpecifiedBenchmarks();
  }
  benchmark::Shutdown();
  return 0;
}
