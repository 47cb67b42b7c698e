// The CUDA backend's expert-parallel dispatch and combine (moe_dispatch_pack, moe_combine) against
// the CPU backend's: the same counts, slots, receive-side ids and weights, packed rows and sums, to
// the bit (the rows are bf16 values on both; the sums run in fp32 in the same order). And NcclComm's
// device-buffer exchange with one rank, and thread ranks that share one GPU (device-to-device
// exchange, and the model split over them against one rank). The fixed-capacity pack against the
// CPU's, and a capacity-mode dispatcher step recorded as a CUDA graph (under global capture, so any
// host synchronization inside it fails the recording) replaying equal to a direct one. Every test
// skips, visibly, without a GPU.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <set>

#include "kernels/cuda/cuda_testing.h"
#include "parallel/moe_dispatch.h"
#include "parallel/mpi_comm.h"
#include "parallel/thread_comm.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/test_util.h"
#if ARBITER_WITH_NCCL
#include <cuda_runtime.h>

#include "parallel/nccl_comm.h"
#endif

namespace arbiter {
namespace {

using gpu_testing::paired;
using gpu_testing::raw_paired;
using gpu_testing::read_f32;
using gpu_testing::cosine;
using gpu_testing::golden_cases;
using gpu_testing::golden_dir;
using gpu_testing::read_raw;

struct Case {
  int ranks, experts, k, rows, hidden;
};

TEST(GpuDispatch, PackAndCombineEqualCpu) {
  ARBITER_SKIP_WITHOUT_GPU();
  CpuBackend cpu(2);
  auto gpu = make_backend("cuda");
  // Rows past 1024 cross the plan kernel's chunk; 64 ranks is its limit; hidden 2880 is the models'.
  const Case cases[] = {{1, 4, 4, 7, 64},     {2, 32, 4, 1, 2880},  {3, 8, 4, 7, 96},    {4, 16, 4, 300, 2880},
                        {8, 128, 4, 2100, 64}, {64, 128, 4, 33, 32}, {4, 6, 2, 300, 40}};
  for (const Case& c : cases) {
    SCOPED_TRACE(std::to_string(c.ranks) + " ranks, " + std::to_string(c.rows) + " rows, hidden " + std::to_string(c.hidden));
    std::mt19937 rng(static_cast<uint32_t>(c.ranks * 1000 + c.rows));
    // Uneven placement: rank r gets a run of experts; the last ones own the rest.
    std::vector<int32_t> owner(static_cast<size_t>(c.experts)), local(static_cast<size_t>(c.experts));
    std::vector<int> held(static_cast<size_t>(c.ranks), 0);
    for (int e = 0; e < c.experts; ++e) {
      const int r = std::min(c.ranks - 1, e * c.ranks / c.experts + (e % 5 == 1 ? 1 : 0));
      owner[static_cast<size_t>(e)] = r;
      local[static_cast<size_t>(e)] = held[static_cast<size_t>(r)]++;
    }
    std::vector<int32_t> ids;
    std::vector<float> w;
    for (int t = 0; t < c.rows; ++t) {
      std::set<int32_t> chosen;
      while (static_cast<int>(chosen.size()) < c.k) chosen.insert(static_cast<int32_t>(rng() % static_cast<uint32_t>(c.experts)));
      for (int32_t e : chosen) {
        ids.push_back(t % 7 == 3 && ids.size() % static_cast<size_t>(c.k) == 0 ? -1 : e);
        w.push_back(static_cast<float>(rng() % 1000) / 1000.0f);
      }
    }
    const int64_t rows = c.rows, most = rows * std::min(c.ranks, c.k);
    const auto x = paired(cpu, *gpu, {rows, c.hidden}, gpu_testing::random_values(static_cast<size_t>(rows * c.hidden), rng));
    const auto tid = raw_paired(cpu, *gpu, DType::kI32, {rows, c.k}, ids);
    const auto tw = raw_paired(cpu, *gpu, DType::kF32, {rows, c.k}, w);
    const auto tow = raw_paired(cpu, *gpu, DType::kI32, {c.experts}, owner);
    const auto tloc = raw_paired(cpu, *gpu, DType::kI32, {c.experts}, local);
    const auto load = raw_paired(cpu, *gpu, DType::kI32, {c.experts}, std::vector<int32_t>(static_cast<size_t>(c.experts), 3));
    const auto sx = paired(cpu, *gpu, {most, c.hidden}, std::vector<float>(static_cast<size_t>(most * c.hidden), 0.0f));
    const auto sids = raw_paired(cpu, *gpu, DType::kI32, {most, c.k}, std::vector<int32_t>(static_cast<size_t>(most * c.k)));
    const auto sw = raw_paired(cpu, *gpu, DType::kF32, {most, c.k}, std::vector<float>(static_cast<size_t>(most * c.k)));
    const auto slots = raw_paired(cpu, *gpu, DType::kI32, {rows, c.ranks}, std::vector<int32_t>(static_cast<size_t>(rows * c.ranks)));
    std::vector<int64_t> want(static_cast<size_t>(c.ranks)), got(static_cast<size_t>(c.ranks));
    cpu.moe_dispatch_pack(x.cpu, tid.cpu, tw.cpu, tow.cpu, tloc.cpu, {sx.cpu, sids.cpu, sw.cpu, slots.cpu}, want, load.cpu);
    gpu->moe_dispatch_pack(x.gpu, tid.gpu, tw.gpu, tow.gpu, tloc.gpu, {sx.gpu, sids.gpu, sw.gpu, slots.gpu}, got, load.gpu);
    ASSERT_EQ(got, want);
    int64_t sent = 0;
    for (int64_t v : want) sent += v;
    EXPECT_EQ(read_raw<int32_t>(*gpu, slots.gpu), read_raw<int32_t>(cpu, slots.cpu));
    EXPECT_EQ(read_raw<int32_t>(*gpu, load.gpu), read_raw<int32_t>(cpu, load.cpu));
    if (sent > 0) {
      EXPECT_EQ(read_raw<int32_t>(*gpu, sids.gpu.slice_rows(0, sent)), read_raw<int32_t>(cpu, sids.cpu.slice_rows(0, sent)));
      EXPECT_EQ(read_raw<float>(*gpu, sw.gpu.slice_rows(0, sent)), read_raw<float>(cpu, sw.cpu.slice_rows(0, sent)));
      EXPECT_EQ(read_f32(*gpu, sx.gpu.slice_rows(0, sent)), read_f32(cpu, sx.cpu.slice_rows(0, sent)));
    }
    // Combine: bf16 results back, summed per token in rank order.
    const int64_t back_rows = std::max<int64_t>(sent, 1);
    const auto back = paired(cpu, *gpu, {back_rows, c.hidden},
                             gpu_testing::random_values(static_cast<size_t>(back_rows * c.hidden), rng));
    const auto out = paired(cpu, *gpu, {rows, c.hidden}, std::vector<float>(static_cast<size_t>(rows * c.hidden), -1.0f));
    cpu.moe_combine(back.cpu, slots.cpu, out.cpu);
    gpu->moe_combine(back.gpu, slots.gpu, out.gpu);
    std::vector<float> cpu_out = read_f32(cpu, out.cpu);
    for (float& v : cpu_out) v = gpu_testing::bf16_round(v);
    EXPECT_EQ(read_f32(*gpu, out.gpu), cpu_out);
  }
}

// The fixed-capacity pack: destination d's rows at d * capacity, the rest padding (ids -1, weights
// 0), the same slots, ids, weights and rows as the CPU backend's, no counts needed on the host; a
// rank without rows sends only padding.
TEST(GpuDispatch, CapacityPackEqualsCpu) {
  ARBITER_SKIP_WITHOUT_GPU();
  CpuBackend cpu(2);
  auto gpu = make_backend("cuda");
  struct CapacityCase {
    int ranks, experts, k, rows, hidden, capacity;
  };
  const CapacityCase cases[] = {{2, 32, 4, 1, 2880, 1}, {3, 8, 4, 7, 96, 9}, {4, 16, 4, 300, 64, 300}, {4, 16, 4, 0, 64, 5}};
  for (const CapacityCase& c : cases) {
    SCOPED_TRACE(std::to_string(c.ranks) + " ranks, " + std::to_string(c.rows) + " rows, capacity " + std::to_string(c.capacity));
    std::mt19937 rng(static_cast<uint32_t>(c.ranks * 1000 + c.rows + 17));
    std::vector<int32_t> owner(static_cast<size_t>(c.experts)), local(static_cast<size_t>(c.experts));
    std::vector<int> held(static_cast<size_t>(c.ranks), 0);
    for (int e = 0; e < c.experts; ++e) {
      const int r = (e * 7 + 3) % c.ranks;  // scattered sets
      owner[static_cast<size_t>(e)] = r;
      local[static_cast<size_t>(e)] = held[static_cast<size_t>(r)]++;
    }
    std::vector<int32_t> ids;
    std::vector<float> w;
    for (int t = 0; t < c.rows; ++t) {
      std::set<int32_t> chosen;
      while (static_cast<int>(chosen.size()) < c.k) chosen.insert(static_cast<int32_t>(rng() % static_cast<uint32_t>(c.experts)));
      for (int32_t e : chosen) {
        ids.push_back(t % 7 == 3 && ids.size() % static_cast<size_t>(c.k) == 0 ? -1 : e);
        w.push_back(static_cast<float>(rng() % 1000) / 1000.0f);
      }
    }
    const int64_t rows = c.rows, slots_rows = static_cast<int64_t>(c.ranks) * c.capacity, row_count = std::max<int64_t>(rows, 1);
    const auto x = paired(cpu, *gpu, {row_count, c.hidden}, gpu_testing::random_values(static_cast<size_t>(row_count * c.hidden), rng));
    ids.resize(static_cast<size_t>(row_count * c.k), -1);
    w.resize(ids.size(), 0.0f);
    const auto tid = raw_paired(cpu, *gpu, DType::kI32, {row_count, c.k}, ids);
    const auto tw = raw_paired(cpu, *gpu, DType::kF32, {row_count, c.k}, w);
    const auto tow = raw_paired(cpu, *gpu, DType::kI32, {c.experts}, owner);
    const auto tloc = raw_paired(cpu, *gpu, DType::kI32, {c.experts}, local);
    // Stale values in the send buffers: the pack must overwrite every id and weight.
    const auto sx = paired(cpu, *gpu, {slots_rows, c.hidden}, std::vector<float>(static_cast<size_t>(slots_rows * c.hidden), 0.0f));
    const auto sids = raw_paired(cpu, *gpu, DType::kI32, {slots_rows, c.k}, std::vector<int32_t>(static_cast<size_t>(slots_rows * c.k), 5));
    const auto sw = raw_paired(cpu, *gpu, DType::kF32, {slots_rows, c.k}, std::vector<float>(static_cast<size_t>(slots_rows * c.k), 2.0f));
    const auto slots = raw_paired(cpu, *gpu, DType::kI32, {row_count, c.ranks}, std::vector<int32_t>(static_cast<size_t>(row_count * c.ranks)));
    std::vector<int64_t> counts(static_cast<size_t>(c.ranks));
    const Tensor cx = x.cpu_buf.view(DType::kF32, {rows, c.hidden}), gx = x.gpu_buf.view(DType::kBF16, {rows, c.hidden});
    cpu.moe_dispatch_pack(cx, tid.cpu, tw.cpu, tow.cpu, tloc.cpu, {sx.cpu, sids.cpu, sw.cpu, slots.cpu, c.capacity}, counts, Tensor{});
    gpu->moe_dispatch_pack(gx, tid.gpu, tw.gpu, tow.gpu, tloc.gpu, {sx.gpu, sids.gpu, sw.gpu, slots.gpu, c.capacity}, counts, Tensor{});
    const auto want_ids = read_raw<int32_t>(cpu, sids.cpu);
    EXPECT_EQ(read_raw<int32_t>(*gpu, sids.gpu), want_ids);
    EXPECT_EQ(read_raw<float>(*gpu, sw.gpu), read_raw<float>(cpu, sw.cpu));
    EXPECT_EQ(read_f32(*gpu, sx.gpu), read_f32(cpu, sx.cpu));
    if (rows) {
      EXPECT_EQ(read_raw<int32_t>(*gpu, slots.gpu), read_raw<int32_t>(cpu, slots.cpu));
    }
    // Padding rows (no token) carry no expert.
    if (rows == 0) {
      for (int32_t v : want_ids) {
        ASSERT_EQ(v, -1);
      }
    }
  }
}

// One rank whose device exchanges are copies enqueued on the stream with no host wait (as NcclComm's
// enqueue), so that a dispatcher step can be recorded on one GPU; waits only in wait_device_exchanges.
class LoopbackDeviceComm final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return "loopback"; }
  void all_to_all_v(const void* send, std::span<const size_t> sc, void* recv, std::span<const size_t>) override {
    if (sc[0]) std::memcpy(recv, send, sc[0]);
  }
  bool takes_device_buffers() const override { return true; }
  bool enqueues_device_exchanges() const override { return true; }
  void all_to_all_v_parts_device(std::span<const Part> parts, void* stream) override {
    enqueue_all_to_all_v_parts_device(parts, stream);
    wait_device_exchanges(stream);
  }
  void enqueue_all_to_all_v_parts_device(std::span<const Part> parts, void* stream) override {
    for (const Part& p : parts)
      if (p.send_counts[0]) device_copy_on_stream(p.recv, p.send, p.send_counts[0], stream);
    ++enqueued;
  }
  void wait_device_exchanges(void* stream) override { device_wait_stream(stream); }
  void all_gather(const void* send, size_t bytes, void* recv) override { std::memcpy(recv, send, bytes); }
  void broadcast(void*, size_t, int) override {}
  void barrier() override {}
  void abort(const std::string&, int) noexcept override {}
  void set_timeout(double) override {}
  double timeout() const override { return 1.0; }
  int enqueued = 0;
};

// A capacity-mode dispatcher step (pack, exchange, experts, combine) as a recorded decode step: the
// first runs directly, the second is recorded under cudaStreamCaptureModeGlobal (a host
// synchronization anywhere in it would fail the recording) and later ones replay; every replay gives
// the direct step's bits, also after new inputs are written in place.
TEST(GpuDispatch, RecordedCapacityStepReplaysEqualToDirect) {
  ARBITER_SKIP_WITHOUT_GPU();
  setenv("ARBITER_CUDA_CAPTURE", "global", 1);
  auto gpu = make_backend("cuda:0");
  unsetenv("ARBITER_CUDA_CAPTURE");
  const int E = 8, H = 64, I = 64, K = 4, rows = 3;
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> byte(0, 255);
  auto bytes = [&](size_t n, int lo, int hi) {
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = static_cast<uint8_t>(lo + byte(rng) % (hi - lo + 1));
    return v;
  };
  const auto gu_blocks = bytes(static_cast<size_t>(E) * 2 * I * (H / 32) * 16, 0, 255),
             gu_scales = bytes(static_cast<size_t>(E) * 2 * I * (H / 32), 121, 125),
             dn_blocks = bytes(static_cast<size_t>(E) * H * (I / 32) * 16, 0, 255),
             dn_scales = bytes(static_cast<size_t>(E) * H * (I / 32), 121, 125);
  const auto gu_bias = gpu_testing::to_bf16(gpu_testing::random_values(static_cast<size_t>(E) * 2 * I, rng));
  const auto dn_bias = gpu_testing::to_bf16(gpu_testing::random_values(static_cast<size_t>(E) * H, rng));
  ExpertWeights ex;
  ex.gate_up_blocks = gpu->import_weight({const_cast<uint8_t*>(gu_blocks.data()), DType::kU8, {E, 2 * I, H / 32, 16}});
  ex.gate_up_scales = gpu->import_weight({const_cast<uint8_t*>(gu_scales.data()), DType::kU8, {E, 2 * I, H / 32}});
  ex.gate_up_bias = gpu->import_weight({const_cast<uint16_t*>(gu_bias.data()), DType::kBF16, {E, 2 * I}});
  ex.down_blocks = gpu->import_weight({const_cast<uint8_t*>(dn_blocks.data()), DType::kU8, {E, H, I / 32, 16}});
  ex.down_scales = gpu->import_weight({const_cast<uint8_t*>(dn_scales.data()), DType::kU8, {E, H, I / 32}});
  ex.down_bias = gpu->import_weight({const_cast<uint16_t*>(dn_bias.data()), DType::kBF16, {E, H}});
  const std::vector<int32_t> ids = {0, 3, 5, 7, 1, 2, -1, 6, 4, 5, 6, 7};
  const std::vector<float> w = {0.4f, 0.3f, 0.2f, 0.1f, 0.5f, 0.25f, 0.0f, 0.25f, 0.1f, 0.2f, 0.3f, 0.4f};
  const auto xs = gpu_testing::to_bf16(gpu_testing::random_values(static_cast<size_t>(rows) * H, rng));
  const auto xs2 = gpu_testing::to_bf16(gpu_testing::random_values(static_cast<size_t>(rows) * H, rng));
  DeviceBuffer bx = gpu->allocate(xs.size() * 2), bi = gpu->allocate(ids.size() * 4), bw = gpu->allocate(w.size() * 4),
               bo = gpu->allocate(xs.size() * 2);
  const Tensor x = bx.view(DType::kBF16, {rows, H}), ti = bi.view(DType::kI32, {rows, K}), tw = bw.view(DType::kF32, {rows, K}),
               out = bo.view(DType::kBF16, {rows, H});
  gpu->upload(xs.data(), x);
  gpu->upload(ids.data(), ti);
  gpu->upload(w.data(), tw);
  LoopbackDeviceComm comm;
  MoeDispatcher d(comm, ExpertPlacement::contiguous(E, 1), *gpu, H, K, rows);
  // A decode-shaped step (one new token per sequence) of `rows` sequences.
  StepLayout layout;
  layout.block_size = 4;
  for (int r = 0; r < rows; ++r) {
    layout.tokens.push_back(r);
    SequenceStep s;
    s.first_row = r;
    s.num_new = 1;
    s.full_blocks = {r};
    s.sliding_blocks = {r};
    layout.sequences.push_back(s);
  }
  layout.exchange_capacity = rows;
  const int owner = 0;
  std::vector<std::vector<float>> outs;
  for (int step = 0; step < 6; ++step) {
    if (step == 4) gpu->upload(xs2.data(), x);  // new inputs in place: the replay reads them
    ASSERT_TRUE(d.begin_step(true, rows));
    ASSERT_EQ(d.step_exchange(), MoeDispatcher::Exchange::kCapacity);
    ASSERT_TRUE(d.step_recordable());
    gpu->fill_zero(out);
    const auto ctx = gpu->prepare_step(layout);
    auto body = [&] { d.moe(x, ti, tw, ex, 7.0f, out); };
    if (step == 5) body();  // directly, to compare with step 4's replay
    else gpu->run_step(&owner, *ctx, body);
    d.finish_step();
    outs.push_back(read_f32(*gpu, out));
  }
  const CudaGraphStats stats = cuda_graph_stats(*gpu);
  EXPECT_EQ(stats.failed, 0u) << "a host synchronization (or another uncapturable call) inside the recorded step";
  EXPECT_EQ(stats.recorded, 1u);
  EXPECT_EQ(stats.replayed, 3u);  // steps 2, 3 and 4
  for (int step = 1; step < 4; ++step) EXPECT_EQ(outs[static_cast<size_t>(step)], outs[0]) << "step " << step;
  EXPECT_EQ(outs[4], outs[5]) << "replay with new inputs against a direct step";
  EXPECT_NE(outs[4], outs[0]);
  EXPECT_GT(comm.enqueued, 0);
  gpu->forget_steps(&owner);
}

// Thread ranks that share one GPU exchange device buffers by device-to-device copies on their own
// streams (ThreadComm with a DeviceCopy): a two-part exchange lands where all_to_all_v puts it.
TEST(GpuDispatch, ThreadRanksOnOneGpuExchangeDeviceBuffers) {
  ARBITER_SKIP_WITHOUT_GPU();
  for (const int n : {2, 3}) {
    run_thread_ranks(
        n,
        [&](Communicator& comm) {
          ASSERT_TRUE(comm.takes_device_buffers());
          auto gpu = make_backend("cuda:0");
          const int me = comm.rank();
          // Rank r sends r + p + 1 ints to rank p, each r * 100 + p; and one int r to every rank.
          std::vector<int32_t> a, b;
          std::vector<size_t> sa, ra, sb(static_cast<size_t>(n), 4), rb(static_cast<size_t>(n), 4);
          for (int p = 0; p < n; ++p) {
            sa.push_back(static_cast<size_t>(me + p + 1) * 4);
            ra.push_back(static_cast<size_t>(p + me + 1) * 4);
            for (int i = 0; i < me + p + 1; ++i) a.push_back(me * 100 + p);
            b.push_back(me);
          }
          const auto da = raw_paired(*gpu, *gpu, DType::kI32, {static_cast<int64_t>(a.size())}, a);
          const auto db = raw_paired(*gpu, *gpu, DType::kI32, {n}, b);
          size_t recv_a = 0;
          for (const size_t c : ra) recv_a += c;
          DeviceBuffer xa = gpu->allocate(recv_a), xb = gpu->allocate(static_cast<size_t>(n) * 4);
          const Communicator::Part parts[] = {{da.gpu.data, sa, xa.data(), ra}, {db.gpu.data, sb, xb.data(), rb}};
          comm.all_to_all_v_parts_device(parts, gpu->native_stream());
          std::vector<int32_t> want_a, want_b;
          for (int p = 0; p < n; ++p) {
            for (int i = 0; i < p + me + 1; ++i) want_a.push_back(p * 100 + me);
            want_b.push_back(p);
          }
          EXPECT_EQ(read_raw<int32_t>(*gpu, xa.view(DType::kI32, {static_cast<int64_t>(recv_a / 4)})), want_a);
          EXPECT_EQ(read_raw<int32_t>(*gpu, xb.view(DType::kI32, {n})), want_b);
        },
        default_comm_timeout(), DeviceCopy{device_copy_on_stream, device_wait_stream});
  }
}

// The model with its experts split over 2 and 3 thread ranks on one GPU (device-resident exchange)
// gives the one-rank logits on every golden case (every row's cosine >= 0.999).
TEST(GpuDispatch, ThreadRanksOnOneGpuEqualOneRank) {
  ARBITER_SKIP_WITHOUT_GPU();
  const auto cases = golden_cases();
  ASSERT_FALSE(cases.empty()) << "no golden cases under " << golden_dir();
  for (const auto& g : cases) {
    SCOPED_TRACE(g.name);
    const ModelConfig config = load_model_config(g.dir + "/config.json");
    const size_t V = static_cast<size_t>(config.vocab_size);
    Checkpoint ck(g.dir);
    std::vector<float> one;
    {
      auto gpu = make_backend("cuda:0");
      Model model(config, ck, *gpu, testing::small_model_options());
      one = compute_all_logits(model, g.tokens);
    }
    for (const int ranks : {2, 3}) {
      std::vector<float> split;
      run_thread_ranks(
          ranks,
          [&](Communicator& comm) {
            auto gpu = make_backend("cuda:0");
            ModelOptions o = testing::small_model_options();
            o.comm = &comm;
            Model model(config, ck, *gpu, o);
            if (comm.rank() == 0) split = compute_all_logits(model, g.tokens);
            model.serve_peers();
          },
          default_comm_timeout(), DeviceCopy{device_copy_on_stream, device_wait_stream});
      ASSERT_EQ(split.size(), one.size());
      for (size_t row = 0; row < one.size() / V; ++row)
        EXPECT_GE(cosine(split.data() + row * V, one.data() + row * V, V), 0.999) << ranks << " ranks, row " << row;
    }
  }
}

#if ARBITER_WITH_NCCL
// NcclComm over one rank (MPI world of one): a two-part exchange of device buffers on a stream of
// the caller's lands where all_to_all_v would put it.
TEST(GpuDispatch, NcclDeviceBuffersOneRank) {
  ARBITER_SKIP_WITHOUT_GPU();
  MpiComm mpi;
  if (mpi.size() != 1) GTEST_SKIP() << "run without mpirun";
  NcclComm nccl(mpi, 0);
  auto gpu = make_backend("cuda:0");
  const std::vector<int32_t> a = {1, 2, 3, 4, 5}, b = {9, 8};
  const auto da = raw_paired(*gpu, *gpu, DType::kI32, {5}, a), db = raw_paired(*gpu, *gpu, DType::kI32, {2}, b);
  DeviceBuffer ra = gpu->allocate(20), rb = gpu->allocate(8);
  const std::vector<size_t> ca = {20}, cb = {8};
  const Communicator::Part parts[] = {{da.gpu.data, ca, ra.data(), ca}, {db.gpu.data, cb, rb.data(), cb}};
  ASSERT_TRUE(nccl.takes_device_buffers());
  nccl.all_to_all_v_parts_device(parts, gpu->native_stream());
  EXPECT_EQ(read_raw<int32_t>(*gpu, ra.view(DType::kI32, {5})), a);
  EXPECT_EQ(read_raw<int32_t>(*gpu, rb.view(DType::kI32, {2})), b);
}
#endif

}  // namespace
}  // namespace arbiter
