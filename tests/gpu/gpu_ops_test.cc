// Every CUDA backend operation against the CPU backend on random inputs: ragged batches, windows
// shorter and longer than the sequences, block tables in random order and of exact length, sliding
// rings shorter than a prefill chunk, ties in top-k and argmax. Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <numeric>

#include "runtime/config.h"
#include "runtime/model.h"
#include "tests/gpu/gpu_test_util.h"

namespace arbiter {
namespace {

using namespace gpu_testing;

class GpuOps : public ::testing::Test {
 protected:
  void SetUp() override {
    ARBITER_SKIP_WITHOUT_GPU();
    gpu_ = make_backend("cuda");
  }
  // A host bf16 weight imported into both backends (the CPU one keeps a view: keep the host copy alive).
  std::pair<Tensor, Tensor> weight(const std::vector<float>& values, Shape shape) {
    host_bf16_.push_back(std::make_unique<std::vector<uint16_t>>(to_bf16(values)));
    Tensor host{host_bf16_.back()->data(), DType::kBF16, shape};
    return {cpu_.import_weight(host), gpu_->import_weight(host)};
  }
  std::pair<Tensor, Tensor> weight_f32(const std::vector<float>& values, Shape shape) {
    host_f32_.push_back(std::make_unique<std::vector<float>>(values));
    Tensor host{host_f32_.back()->data(), DType::kF32, shape};
    return {cpu_.import_weight(host), gpu_->import_weight(host)};
  }
  std::pair<Tensor, Tensor> weight_u8(const std::vector<uint8_t>& values, Shape shape) {
    host_u8_.push_back(std::make_unique<std::vector<uint8_t>>(values));
    Tensor host{host_u8_.back()->data(), DType::kU8, shape};
    return {cpu_.import_weight(host), gpu_->import_weight(host)};
  }
  Pair out_pair(Shape shape, DType gpu_dtype = DType::kBF16) {
    return paired(cpu_, *gpu_, shape, std::vector<float>(static_cast<size_t>(shape.elements()), 0.0f), gpu_dtype);
  }

  CpuBackend cpu_;
  std::unique_ptr<Backend> gpu_;
  std::mt19937 rng_{1234};
  std::vector<std::unique_ptr<std::vector<uint16_t>>> host_bf16_;
  std::vector<std::unique_ptr<std::vector<float>>> host_f32_;
  std::vector<std::unique_ptr<std::vector<uint8_t>>> host_u8_;
};

struct SeqSpec {
  int cached, fresh;
};

// Sequences with block tables drawn in random order from the pools; `extra_full` adds one spare block.
StepLayout make_layout(const std::vector<SeqSpec>& specs, int block_size, int ring_blocks, int full_pool, int ring_pool,
                       std::mt19937& rng, bool extra_full = false) {
  std::vector<int32_t> full(static_cast<size_t>(full_pool)), ring(static_cast<size_t>(ring_pool));
  std::iota(full.begin(), full.end(), 0);
  std::iota(ring.begin(), ring.end(), 0);
  std::shuffle(full.begin(), full.end(), rng);
  std::shuffle(ring.begin(), ring.end(), rng);
  size_t fi = 0, ri = 0;
  StepLayout layout;
  layout.block_size = block_size;
  for (const auto& sp : specs) {
    SequenceStep s;
    s.first_row = static_cast<int32_t>(layout.tokens.size());
    s.num_new = sp.fresh;
    s.num_cached = sp.cached;
    const int blocks = (sp.cached + sp.fresh + block_size - 1) / block_size + (extra_full ? 1 : 0);
    for (int b = 0; b < blocks; ++b) s.full_blocks.push_back(full.at(fi++));
    for (int b = 0; b < ring_blocks; ++b) s.sliding_blocks.push_back(ring.at(ri++));
    for (int i = 0; i < sp.fresh; ++i) layout.tokens.push_back(static_cast<int32_t>(rng() % 1000));
    if (sp.fresh > 0) layout.logit_rows.push_back(s.first_row + sp.fresh - 1);
    layout.sequences.push_back(s);
  }
  return layout;
}

TEST_F(GpuOps, Embedding) {
  const int V = 300, D = 96;
  auto [ct, gt] = weight(random_values(V * D, rng_), {V, D});
  StepLayout layout = make_layout({{0, 5}, {3, 2}}, 16, 1, 8, 8, rng_);
  for (auto& t : layout.tokens) t %= V;
  layout.tokens.back() = V - 1;
  const auto cs = cpu_.prepare_step(layout);
  const auto gs = gpu_->prepare_step(layout);
  Pair out = out_pair({7, D});
  cpu_.embedding(ct, *cs, out.cpu);
  gpu_->embedding(gt, *gs, out.gpu);
  EXPECT_EQ(read_f32(*gpu_, out.gpu), read_f32(cpu_, out.cpu));
}

TEST_F(GpuOps, RmsNormAndAddRmsNorm) {
  for (const int dim : {64, 2880}) {
    for (const bool f32_weight : {false, true}) {
      SCOPED_TRACE("dim " + std::to_string(dim) + (f32_weight ? " f32 weight" : " bf16 weight"));
      const int rows = 7;
      const auto wv = random_values(static_cast<size_t>(dim), rng_, 0.5f, 1.0f);
      auto [cw, gw] = f32_weight ? weight_f32(wv, {dim}) : weight(wv, {dim});
      Pair x = paired(cpu_, *gpu_, {rows, dim}, random_values(static_cast<size_t>(rows * dim), rng_, 3.0f));
      Pair d = paired(cpu_, *gpu_, {rows, dim}, random_values(static_cast<size_t>(rows * dim), rng_));
      Pair out = out_pair({rows, dim});
      cpu_.rms_norm(x.cpu, cw, 1e-5f, out.cpu);
      gpu_->rms_norm(x.gpu, gw, 1e-5f, out.gpu);
      EXPECT_LE(rel_max_error(read_f32(*gpu_, out.gpu), read_f32(cpu_, out.cpu)), 1e-2);
      // In place, as the model does for the final norm.
      gpu_->rms_norm(x.gpu, gw, 1e-5f, x.gpu);
      EXPECT_LE(rel_max_error(read_f32(*gpu_, x.gpu), read_f32(cpu_, out.cpu)), 1e-2);
      Pair r = paired(cpu_, *gpu_, {rows, dim}, random_values(static_cast<size_t>(rows * dim), rng_, 3.0f));
      cpu_.add_rms_norm(r.cpu, d.cpu, cw, 1e-5f, out.cpu);
      gpu_->add_rms_norm(r.gpu, d.gpu, gw, 1e-5f, out.gpu);
      EXPECT_LE(rel_max_error(read_f32(*gpu_, r.gpu), read_f32(cpu_, r.cpu)), 1e-2);
      EXPECT_LE(rel_max_error(read_f32(*gpu_, out.gpu), read_f32(cpu_, out.cpu)), 1e-2);
    }
  }
}

TEST_F(GpuOps, Add) {
  Pair x = paired(cpu_, *gpu_, {5, 72}, random_values(360, rng_));
  Pair y = paired(cpu_, *gpu_, {5, 72}, random_values(360, rng_));
  cpu_.add(x.cpu, y.cpu);
  gpu_->add(x.gpu, y.gpu);
  EXPECT_LE(rel_max_error(read_f32(*gpu_, x.gpu), read_f32(cpu_, x.cpu)), 1e-2);
}

TEST_F(GpuOps, Linear) {
  struct Case {
    int m, k, n;
    bool bias;
    DType out;
  };
  for (const Case c : {Case{1, 64, 96, true, DType::kBF16}, Case{7, 128, 200, false, DType::kBF16},
                       Case{33, 2880, 512, true, DType::kBF16}, Case{5, 96, 8, true, DType::kF32},
                       Case{3, 128, 1024, false, DType::kF32}, Case{130, 256, 4096, true, DType::kBF16},
                       Case{1, 2880, 4096, true, DType::kBF16}, Case{2, 2880, 32, true, DType::kF32},
                       Case{8, 2880, 513, true, DType::kBF16}, Case{9, 64, 40, true, DType::kBF16},
                       Case{1, 100, 24, false, DType::kF32}}) {
    SCOPED_TRACE(std::to_string(c.m) + "x" + std::to_string(c.k) + "x" + std::to_string(c.n));
    auto [cw, gw] = weight(random_values(static_cast<size_t>(c.n) * c.k, rng_, 0.05f), {c.n, c.k});
    Tensor cb, gb;
    if (c.bias) std::tie(cb, gb) = weight(random_values(static_cast<size_t>(c.n), rng_), {c.n});
    Pair x = paired(cpu_, *gpu_, {c.m, c.k}, random_values(static_cast<size_t>(c.m) * c.k, rng_));
    Pair out = out_pair({c.m, c.n}, c.out);
    cpu_.linear(x.cpu, cw, cb, out.cpu);
    gpu_->linear(x.gpu, gw, gb, out.gpu);
    EXPECT_LE(rel_max_error(read_f32(*gpu_, out.gpu), read_f32(cpu_, out.cpu)), c.out == DType::kF32 ? 2e-3 : 1e-2);
  }
  // Row slices (the model runs steps on the first rows of its buffers).
  auto [cw, gw] = weight(random_values(64 * 64, rng_, 0.1f), {64, 64});
  Pair x = paired(cpu_, *gpu_, {9, 64}, random_values(9 * 64, rng_));
  Pair out = out_pair({9, 64});
  cpu_.linear(x.cpu.slice_rows(0, 4), cw, Tensor{}, out.cpu.slice_rows(0, 4));
  gpu_->linear(x.gpu.slice_rows(0, 4), gw, Tensor{}, out.gpu.slice_rows(0, 4));
  EXPECT_LE(rel_max_error(read_f32(*gpu_, out.gpu), read_f32(cpu_, out.cpu)), 1e-2);
}

// q, k and v as one launch: each product equal to its own linear() to the bit (the grouped GEMV runs
// the same blocks), and to the CPU within bf16 tolerance; shapes the GEMV does not take (9 rows, a
// width not a multiple of 8) fall back to separate products.
TEST_F(GpuOps, LinearGroup) {
  struct Case {
    int m, k;
    std::vector<int> n;
    DType out;
  };
  for (const Case& c : {Case{1, 2880, {4096, 512, 512}, DType::kBF16}, Case{2, 128, {70, 16, 16}, DType::kBF16},
                        Case{3, 64, {8, 200}, DType::kF32}, Case{8, 256, {33, 1, 64, 5}, DType::kBF16},
                        Case{9, 64, {40, 24, 24}, DType::kBF16}, Case{1, 100, {24, 8}, DType::kF32}}) {
    SCOPED_TRACE(std::to_string(c.m) + " rows, k " + std::to_string(c.k));
    Pair x = paired(cpu_, *gpu_, {c.m, c.k}, random_values(static_cast<size_t>(c.m) * c.k, rng_));
    std::vector<LinearTerm> cpu_terms, gpu_terms;
    std::vector<Pair> outs, singles;
    for (size_t j = 0; j < c.n.size(); ++j) {
      const int n = c.n[j];
      auto [cw, gw] = weight(random_values(static_cast<size_t>(n) * c.k, rng_, 0.05f), {n, c.k});
      Tensor cb, gb;
      if (j % 2 == 0) std::tie(cb, gb) = weight(random_values(static_cast<size_t>(n), rng_), {n});
      outs.push_back(out_pair({c.m, n}, c.out));
      singles.push_back(out_pair({c.m, n}, c.out));
      cpu_terms.push_back({cw, cb, outs.back().cpu});
      gpu_terms.push_back({gw, gb, outs.back().gpu});
      gpu_->linear(x.gpu, gw, gb, singles.back().gpu);
    }
    cpu_.linear_group(x.cpu, cpu_terms);
    gpu_->linear_group(x.gpu, gpu_terms);
    for (size_t j = 0; j < c.n.size(); ++j) {
      SCOPED_TRACE("term " + std::to_string(j));
      const auto got = read_f32(*gpu_, outs[j].gpu);
      EXPECT_EQ(got, read_f32(*gpu_, singles[j].gpu));
      EXPECT_LE(rel_max_error(got, read_f32(cpu_, outs[j].cpu)), c.out == DType::kF32 ? 2e-3 : 1e-2);
    }
  }
}

TEST_F(GpuOps, Rope) {
  const RopeParams rope = yarn_rope_params(preset_config("20b-shape"));
  const int d = 64, hq = 8, hk = 2;
  const StepLayout layout = make_layout({{0, 6}, {99990, 2}, {4095, 3}, {17, 1}}, 16, 1, 7000, 8, rng_);
  const int rows = static_cast<int>(layout.tokens.size());
  Pair q = paired(cpu_, *gpu_, {rows, hq * d}, random_values(static_cast<size_t>(rows * hq * d), rng_));
  Pair k = paired(cpu_, *gpu_, {rows, hk * d}, random_values(static_cast<size_t>(rows * hk * d), rng_));
  const auto cs = cpu_.prepare_step(layout);
  const auto gs = gpu_->prepare_step(layout);
  cpu_.rope(q.cpu, k.cpu, d, rope, *cs);
  gpu_->rope(q.gpu, k.gpu, d, rope, *gs);
  EXPECT_LE(rel_max_error(read_f32(*gpu_, q.gpu), read_f32(cpu_, q.cpu)), 1e-2);
  EXPECT_LE(rel_max_error(read_f32(*gpu_, k.gpu), read_f32(cpu_, k.cpu)), 1e-2);
}

// The o projection with the residual add + RMSNorm in its last block (Backend::linear_add_rms_norm):
// delta, the updated residual and the normed rows equal linear then add_rms_norm to the bit (twice in a
// row: the block counter is reset), for 1-8 rows and a 9-row fallback, bf16 and f32 norm weights; and
// the CPU backend within bf16 tolerance.
TEST_F(GpuOps, LinearAddRmsNorm) {
  struct Case {
    int m, k, n;
    bool f32_norm;
  };
  for (const Case& c : {Case{1, 4096, 2880, false}, Case{2, 64, 200, true}, Case{3, 128, 64, false},
                        Case{5, 256, 2880, true}, Case{8, 64, 96, false}, Case{9, 64, 64, false}}) {
    SCOPED_TRACE(std::to_string(c.m) + " rows, n " + std::to_string(c.n));
    Pair x = paired(cpu_, *gpu_, {c.m, c.k}, random_values(static_cast<size_t>(c.m) * c.k, rng_));
    auto [cw, gw] = weight(random_values(static_cast<size_t>(c.n) * c.k, rng_, 0.05f), {c.n, c.k});
    auto [cb, gb] = weight(random_values(static_cast<size_t>(c.n), rng_), {c.n});
    const auto norm_values = random_values(static_cast<size_t>(c.n), rng_, 0.5f, 1.0f);
    auto [cn, gn] = c.f32_norm ? weight_f32(norm_values, {c.n}) : weight(norm_values, {c.n});
    const auto residual0 = random_values(static_cast<size_t>(c.m) * c.n, rng_, 2.0f);
    Pair r1 = paired(cpu_, *gpu_, {c.m, c.n}, residual0), r2 = paired(cpu_, *gpu_, {c.m, c.n}, residual0);
    Pair d1 = out_pair({c.m, c.n}), d2 = out_pair({c.m, c.n}), o1 = out_pair({c.m, c.n}), o2 = out_pair({c.m, c.n});
    for (int round = 0; round < 2; ++round) {
      SCOPED_TRACE("round " + std::to_string(round));
      gpu_->linear_add_rms_norm(x.gpu, gw, gb, d1.gpu, r1.gpu, gn, 1e-5f, o1.gpu);
      gpu_->linear(x.gpu, gw, gb, d2.gpu);
      gpu_->add_rms_norm(r2.gpu, d2.gpu, gn, 1e-5f, o2.gpu);
      EXPECT_EQ(read_f32(*gpu_, d1.gpu), read_f32(*gpu_, d2.gpu));
      EXPECT_EQ(read_f32(*gpu_, r1.gpu), read_f32(*gpu_, r2.gpu));
      EXPECT_EQ(read_f32(*gpu_, o1.gpu), read_f32(*gpu_, o2.gpu));
    }
    cpu_.linear_add_rms_norm(x.cpu, cw, cb, d1.cpu, r1.cpu, cn, 1e-5f, o1.cpu);
    cpu_.linear_add_rms_norm(x.cpu, cw, cb, d1.cpu, r1.cpu, cn, 1e-5f, o1.cpu);
    EXPECT_LE(rel_max_error(read_f32(*gpu_, r1.gpu), read_f32(cpu_, r1.cpu)), 2e-2);
    EXPECT_LE(rel_max_error(read_f32(*gpu_, o1.gpu), read_f32(cpu_, o1.cpu)), 3e-2);
  }
}

// q, k, v and RoPE in one launch (Backend::linear_group_rope): the bits of linear_group then rope on the
// same GPU, for 1-8 rows (both GEMV block shapes), head_dim 64 and 128, positions inside and past the
// RoPE table and without a table; 9 rows fall back to the two operations. Within bf16 tolerance of
// the CPU backend doing the same.
TEST_F(GpuOps, LinearGroupRope) {
  struct Case {
    int m, k, d, q_heads, kv_heads;
    bool table;
  };
  for (const Case& c : {Case{1, 2880, 64, 64, 8, true}, Case{2, 256, 64, 4, 2, true}, Case{3, 128, 128, 4, 1, false},
                        Case{5, 256, 64, 8, 2, true}, Case{8, 64, 64, 2, 1, true}, Case{9, 64, 64, 2, 2, true}}) {
    SCOPED_TRACE(std::to_string(c.m) + " rows, head_dim " + std::to_string(c.d));
    const int nq = c.q_heads * c.d, nkv = c.kv_heads * c.d;
    std::vector<SeqSpec> seqs;
    for (int r = 0; r < c.m; ++r) seqs.push_back({r % 2 == 0 ? 4000 + 40 * r : 17 * r, 1});  // some past 4096
    const StepLayout layout = make_layout(seqs, 16, 1, 4200, 16, rng_);
    const auto cs = cpu_.prepare_step(layout);
    const auto gs = gpu_->prepare_step(layout);
    RopeParams rope;
    for (int i = 0; i < c.d / 2; ++i) rope.inv_freq.push_back(std::pow(150000.0f, -2.0f * i / c.d));
    rope.concentration = 1.2f;
    RopeParams cpu_rope = rope, gpu_rope = rope;
    if (c.table) std::tie(cpu_rope.table, gpu_rope.table) = weight_f32(rope_table(rope, 4096), {4096, c.d});
    Pair x = paired(cpu_, *gpu_, {c.m, c.k}, random_values(static_cast<size_t>(c.m) * c.k, rng_));
    std::vector<LinearTerm> cpu_terms, gpu_terms, gpu_separate;
    std::vector<Pair> fused, separate;
    for (const int n : {nq, nkv, nkv}) {
      auto [cw, gw] = weight(random_values(static_cast<size_t>(n) * c.k, rng_, 0.05f), {n, c.k});
      auto [cb, gb] = weight(random_values(static_cast<size_t>(n), rng_), {n});
      fused.push_back(out_pair({c.m, n}));
      separate.push_back(out_pair({c.m, n}));
      cpu_terms.push_back({cw, cb, fused.back().cpu});
      gpu_terms.push_back({gw, gb, fused.back().gpu});
      gpu_separate.push_back({gw, gb, separate.back().gpu});
    }
    cpu_.linear_group_rope(x.cpu, cpu_terms, c.d, cpu_rope, *cs);
    gpu_->linear_group_rope(x.gpu, gpu_terms, c.d, gpu_rope, *gs);
    gpu_->linear_group(x.gpu, gpu_separate);
    gpu_->rope(separate[0].gpu, separate[1].gpu, c.d, gpu_rope, *gs);
    for (size_t j = 0; j < 3; ++j) {
      SCOPED_TRACE("term " + std::to_string(j));
      const auto got = read_f32(*gpu_, fused[j].gpu);
      EXPECT_EQ(got, read_f32(*gpu_, separate[j].gpu));
      EXPECT_LE(rel_max_error(got, read_f32(cpu_, fused[j].cpu)), 2e-2);
    }
  }
}

// The position of row r of a step.
int layout_position(const StepLayout& layout, int r) {
  for (const SequenceStep& s : layout.sequences)
    if (r >= s.first_row && r < s.first_row + s.num_new) return s.num_cached + (r - s.first_row);
  return -1;
}

// RopeParams::table (the model's precomputed cos/sin): the rows inside it are read on the device (an
// identity table leaves them unrotated, to the bit), positions past it (99990, 99991) are computed
// as without a table, and the real table agrees with the CPU backend reading the same table.
TEST_F(GpuOps, RopeTable) {
  const RopeParams computed = yarn_rope_params(preset_config("20b-shape"));
  const int d = 64, hq = 8, hk = 2, positions = 4096;
  const StepLayout layout = make_layout({{0, 6}, {99990, 2}, {4095, 1}, {17, 1}}, 16, 1, 7000, 8, rng_);
  const int rows = static_cast<int>(layout.tokens.size());
  const auto q0 = random_values(static_cast<size_t>(rows * hq * d), rng_);
  const auto k0 = random_values(static_cast<size_t>(rows * hk * d), rng_);
  const auto cs = cpu_.prepare_step(layout);
  const auto gs = gpu_->prepare_step(layout);
  auto run_gpu = [&](const RopeParams& rope) {
    Pair q = paired(cpu_, *gpu_, {rows, hq * d}, q0), k = paired(cpu_, *gpu_, {rows, hk * d}, k0);
    gpu_->rope(q.gpu, k.gpu, d, rope, *gs);
    return std::make_pair(read_f32(*gpu_, q.gpu), read_f32(*gpu_, k.gpu));
  };
  const auto [q_computed, k_computed] = run_gpu(computed);
  const auto [q_in, k_in] = [&] {
    Pair q = paired(cpu_, *gpu_, {rows, hq * d}, q0), k = paired(cpu_, *gpu_, {rows, hk * d}, k0);
    return std::make_pair(read_f32(*gpu_, q.gpu), read_f32(*gpu_, k.gpu));
  }();

  RopeParams with_table = computed;
  std::tie(std::ignore, with_table.table) = weight_f32(rope_table(computed, positions), {positions, d});
  RopeParams cpu_table = computed;
  std::tie(cpu_table.table, std::ignore) = weight_f32(rope_table(computed, positions), {positions, d});
  const auto [q_table, k_table] = run_gpu(with_table);
  Pair q = paired(cpu_, *gpu_, {rows, hq * d}, q0), k = paired(cpu_, *gpu_, {rows, hk * d}, k0);
  cpu_.rope(q.cpu, k.cpu, d, cpu_table, *cs);
  EXPECT_LE(rel_max_error(q_table, read_f32(cpu_, q.cpu)), 1e-2);
  EXPECT_LE(rel_max_error(k_table, read_f32(cpu_, k.cpu)), 1e-2);

  std::vector<float> identity(static_cast<size_t>(positions * d));
  for (size_t i = 0; i < identity.size(); ++i) identity[i] = static_cast<int>(i % d) < d / 2 ? 1.0f : 0.0f;
  RopeParams doctored = computed;
  std::tie(std::ignore, doctored.table) = weight_f32(identity, {positions, d});
  const auto [q_id, k_id] = run_gpu(doctored);
  for (int r = 0; r < rows; ++r) {
    const bool in_table = layout_position(layout, r) < positions;
    for (int j = 0; j < hq * d; ++j) {
      const size_t i = static_cast<size_t>(r * hq * d + j);
      ASSERT_EQ(q_id[i], in_table ? q_in[i] : q_computed[i]) << "q row " << r;
      if (in_table) continue;
      ASSERT_EQ(q_table[i], q_computed[i]) << "q row " << r;
    }
    for (int j = 0; j < hk * d; ++j) {
      const size_t i = static_cast<size_t>(r * hk * d + j);
      ASSERT_EQ(k_id[i], in_table ? k_in[i] : k_computed[i]) << "k row " << r;
    }
  }
}

struct AttnCase {
  std::string name;
  int q_heads, kv_heads, head_dim, window, block_size, ring_extra;
  std::vector<SeqSpec> seqs;
  bool extra_full = false;
};

void PrintTo(const AttnCase& c, std::ostream* os) { *os << c.name; }

class GpuAttention : public GpuOps, public ::testing::WithParamInterface<AttnCase> {};

TEST_P(GpuAttention, MatchesCpuAndStoresTheSameCache) {
  const AttnCase& c = GetParam();
  const int bs = c.block_size, d = c.head_dim;
  const int ring_blocks = c.window > 0 ? (c.window + bs - 1) / bs + c.ring_extra : 1;
  int full_needed = 0;
  for (const auto& s : c.seqs) full_needed += (s.cached + s.fresh + bs - 1) / bs + 1;
  const int full_pool = full_needed + 3;
  const int ring_pool = ring_blocks * static_cast<int>(c.seqs.size()) + 2;
  const StepLayout layout = make_layout(c.seqs, bs, ring_blocks, full_pool, ring_pool, rng_, c.extra_full);
  const int rows = static_cast<int>(layout.tokens.size());
  const int kv_row = c.kv_heads * d;
  const int pool_blocks = c.window > 0 ? ring_pool : full_pool;
  Pair q = paired(cpu_, *gpu_, {rows, c.q_heads * d}, random_values(static_cast<size_t>(rows * c.q_heads * d), rng_));
  Pair k = paired(cpu_, *gpu_, {rows, kv_row}, random_values(static_cast<size_t>(rows * kv_row), rng_));
  Pair v = paired(cpu_, *gpu_, {rows, kv_row}, random_values(static_cast<size_t>(rows * kv_row), rng_));
  const Shape pool_shape{pool_blocks, bs, c.kv_heads, d};
  const size_t pool_n = static_cast<size_t>(pool_shape.elements());
  Pair ck = paired(cpu_, *gpu_, pool_shape, random_values(pool_n, rng_));
  Pair cv = paired(cpu_, *gpu_, pool_shape, random_values(pool_n, rng_));
  auto [csink, gsink] = weight(random_values(static_cast<size_t>(c.q_heads), rng_), {c.q_heads});
  AttentionParams p;
  p.num_q_heads = c.q_heads;
  p.num_kv_heads = c.kv_heads;
  p.head_dim = d;
  p.window = c.window;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  Pair out = out_pair({rows, c.q_heads * d});
  const auto cs = cpu_.prepare_step(layout);
  const auto gs = gpu_->prepare_step(layout);
  const KvLayer cl{ck.cpu, cv.cpu}, gl{ck.gpu, cv.gpu};
  cpu_.attention(q.cpu, k.cpu, v.cpu, cl, csink, p, *cs, out.cpu);
  const auto co = read_f32(cpu_, out.cpu);
  // Every kernel: split over keys (decode default), one block per q head, tensor-core prefill (the
  // default when a sequence has >= 16 new tokens; forced here on every case it supports).
  for (const char* path : {"split", "head", "mma"}) {
    SCOPED_TRACE(std::string("attention path ") + path);
    setenv("ARBITER_CUDA_ATTENTION", path, 1);
    auto gpu = make_backend("cuda");
    unsetenv("ARBITER_CUDA_ATTENTION");
    const auto ps = gpu->prepare_step(layout);
    gpu->fill_zero(out.gpu);
    gpu->attention(q.gpu, k.gpu, v.gpu, gl, gsink, p, *ps, out.gpu);
    const auto go = read_f32(*gpu, out.gpu);
    EXPECT_LE(rel_max_error(go, co), 1.5e-2);
    // Deterministic: the same bits again (the split kernel's workspace counters were left clean).
    gpu->attention(q.gpu, k.gpu, v.gpu, gl, gsink, p, *ps, out.gpu);
    EXPECT_EQ(read_f32(*gpu, out.gpu), go);
  }
  gpu_->attention(q.gpu, k.gpu, v.gpu, gl, gsink, p, *gs, out.gpu);
  const auto batch = read_f32(*gpu_, out.gpu);
  EXPECT_LE(rel_max_error(batch, co), 1.5e-2);
  // Each sequence alone (default kernel choice) gives its rows of the batch: the kernel is chosen per
  // sequence (>= 16 new tokens: tensor cores; else split / per head), so the same kernel runs alone and
  // in any batch. To the bit where the kernel's work does not depend on the step's shape (prefill
  // kernel; split kernel when the row's keys fit one 32-key span whatever the split count).
  const size_t row_elems = static_cast<size_t>(c.q_heads) * d;
  for (size_t si = 0; si < layout.sequences.size(); ++si) {
    const SequenceStep& seq = layout.sequences[si];
    if (seq.num_new == 0) continue;
    SCOPED_TRACE("sequence " + std::to_string(si) + " alone (" + std::to_string(seq.num_cached) + " cached, " +
                 std::to_string(seq.num_new) + " new)");
    StepLayout one;
    one.block_size = layout.block_size;
    SequenceStep s1 = seq;
    s1.first_row = 0;
    one.sequences.push_back(s1);
    one.tokens.assign(layout.tokens.begin() + seq.first_row, layout.tokens.begin() + seq.first_row + seq.num_new);
    one.logit_rows.push_back(seq.num_new - 1);
    const auto os = gpu_->prepare_step(one);
    const Tensor o1 = out.gpu.slice_rows(seq.first_row, seq.num_new);
    gpu_->fill_zero(o1);
    gpu_->attention(q.gpu.slice_rows(seq.first_row, seq.num_new), k.gpu.slice_rows(seq.first_row, seq.num_new),
                    v.gpu.slice_rows(seq.first_row, seq.num_new), gl, gsink, p, *os, o1);
    const auto alone = read_f32(*gpu_, o1);
    const std::vector<float> want(batch.begin() + static_cast<long>(seq.first_row * row_elems),
                                  batch.begin() + static_cast<long>((seq.first_row + seq.num_new) * row_elems));
    if (seq.num_new >= 16 || seq.num_cached + seq.num_new <= 32) EXPECT_EQ(alone, want);
    else EXPECT_LE(rel_max_error(alone, want), 1e-2);
  }
  // attention_store (the model's call) on a copy of the caches: the output of attention and the
  // caches of kv_store, to the bit (decode steps store inside the split kernel, others separately).
  Pair ck2 = paired(cpu_, *gpu_, pool_shape, read_f32(*gpu_, ck.gpu)), cv2 = paired(cpu_, *gpu_, pool_shape, read_f32(*gpu_, cv.gpu));
  const KvLayer gl2{ck2.gpu, cv2.gpu};
  Pair out2 = out_pair({rows, c.q_heads * d});
  gpu_->attention_store(q.gpu, k.gpu, v.gpu, gl2, gsink, p, *gs, out2.gpu);
  EXPECT_EQ(read_f32(*gpu_, out2.gpu), batch);
  cpu_.kv_store(k.cpu, v.cpu, cl, p, *cs);
  gpu_->kv_store(k.gpu, v.gpu, gl, p, *gs);
  EXPECT_EQ(read_f32(*gpu_, ck.gpu), read_f32(cpu_, ck.cpu));
  EXPECT_EQ(read_f32(*gpu_, cv.gpu), read_f32(cpu_, cv.cpu));
  EXPECT_EQ(read_f32(*gpu_, ck2.gpu), read_f32(*gpu_, ck.gpu));
  EXPECT_EQ(read_f32(*gpu_, cv2.gpu), read_f32(*gpu_, cv.gpu));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GpuAttention,
    ::testing::Values(
        AttnCase{"full_gqa2_ragged", 4, 2, 64, 0, 4, 0, {{0, 5}, {13, 1}, {7, 5}, {40, 3}, {8, 0}, {0, 1}}},
        AttnCase{"full_spare_blocks", 4, 2, 64, 0, 4, 0, {{3, 9}, {16, 4}}, true},
        AttnCase{"window3_shorter", 4, 2, 64, 3, 4, 0, {{0, 5}, {13, 1}, {7, 9}, {40, 3}}},
        AttnCase{"window3_ring_larger", 4, 2, 64, 3, 4, 2, {{0, 11}, {13, 1}, {22, 6}}},
        AttnCase{"window_longer_than_seq", 4, 2, 64, 1000, 16, 0, {{0, 5}, {13, 1}, {7, 9}, {40, 3}}},
        AttnCase{"mqa_d128_window5", 8, 1, 128, 5, 16, 0, {{0, 7}, {30, 1}, {3, 20}}},
        AttnCase{"d128_full", 4, 4, 128, 0, 16, 0, {{0, 33}, {70, 2}}},
        AttnCase{"decode_20b_heads", 64, 8, 64, 0, 16, 0, {{300, 1}, {1000, 1}, {64, 1}}},
        AttnCase{"prefill_longer_than_ring", 8, 2, 64, 128, 16, 0, {{0, 200}, {5, 150}}},
        AttnCase{"prefill_window_full", 8, 2, 64, 0, 16, 0, {{0, 200}, {37, 64}}},
        // Long contexts (the split kernel spreads a row's keys over up to 32 blocks).
        AttnCase{"decode_long_20b_heads", 64, 8, 64, 0, 16, 0, {{5000, 1}, {3071, 1}, {17, 1}, {0, 1}}},
        AttnCase{"decode_long_sliding_20b", 64, 8, 64, 128, 16, 0, {{6000, 1}, {100, 1}, {127, 1}, {128, 1}}},
        AttnCase{"decode_long_d128_window", 64, 8, 128, 1000, 16, 1, {{4000, 1}, {999, 1}, {1000, 2}}},
        AttnCase{"decode_batch_ragged", 64, 8, 64, 0, 16, 0,
                 {{513, 1}, {1, 1}, {2047, 1}, {128, 1}, {129, 1}, {700, 1}, {33, 1}, {4096, 1}}},
        // Serving: a sliding layer whose table covers every position (slot p mod ring = p).
        AttnCase{"sliding_table_covers_all", 64, 8, 64, 128, 16, 40, {{700, 1}, {500, 3}}},
        // GQA groups of 16: the per-head kernel (the split one takes groups of at most 8).
        AttnCase{"gqa16_per_head_fallback", 16, 1, 64, 0, 16, 0, {{300, 1}, {0, 4}}},
        // Prefill shapes for the tensor-core kernel: chunks after a cached prefix, ragged tails,
        // windows cutting tiles, groups of 8 (20b) and 16 (two blocks per kv head), head_dim 128.
        AttnCase{"prefill_20b_heads_chunked", 64, 8, 64, 0, 16, 0, {{0, 130}, {300, 77}, {1000, 16}, {5, 1}}},
        AttnCase{"prefill_20b_sliding", 64, 8, 64, 128, 16, 0, {{0, 300}, {200, 90}, {700, 17}}},
        AttnCase{"prefill_gqa16_window", 32, 2, 64, 40, 16, 0, {{0, 100}, {60, 33}}},
        AttnCase{"prefill_d128_gqa4", 16, 4, 128, 0, 16, 0, {{0, 70}, {129, 64}}},
        AttnCase{"prefill_d128_window_gqa8", 16, 2, 128, 50, 16, 1, {{10, 90}, {0, 16}}},
        // Prefill steps mixing sequences shorter and longer than the 16-row MMA tile (gpu_model_test
        // BatchOfDifferentLengthsEqualsEachAlone: 3, 17, 9 and 1 new tokens in one step): with and
        // without cached prefixes, full and sliding, the model tests' shape (4 q / 2 kv heads, window 5,
        // blocks of 4) and the 20b's (64 / 8), head_dim 128, a GQA-16 group.
        AttnCase{"mixed_model_shape_3_17_9_1", 4, 2, 64, 0, 4, 0, {{0, 3}, {0, 17}, {0, 9}, {0, 1}}},
        AttnCase{"mixed_model_shape_sliding", 4, 2, 64, 5, 4, 0, {{0, 3}, {0, 17}, {0, 9}, {0, 1}}},
        AttnCase{"mixed_lengths_full", 4, 2, 64, 0, 4, 0,
                 {{0, 1}, {0, 2}, {0, 3}, {0, 9}, {0, 15}, {0, 16}, {0, 17}, {0, 33}}},
        AttnCase{"mixed_lengths_sliding", 4, 2, 64, 5, 4, 1,
                 {{0, 33}, {0, 1}, {0, 17}, {0, 2}, {0, 16}, {0, 3}, {0, 15}, {0, 9}}},
        AttnCase{"mixed_cached_full", 4, 2, 64, 0, 4, 0,
                 {{5, 1}, {20, 2}, {3, 3}, {40, 9}, {16, 15}, {7, 16}, {100, 17}, {33, 33}}},
        AttnCase{"mixed_cached_sliding", 4, 2, 64, 5, 4, 0,
                 {{5, 1}, {20, 2}, {3, 3}, {40, 9}, {16, 15}, {7, 16}, {100, 17}, {33, 33}}},
        AttnCase{"mixed_20b_full", 64, 8, 64, 0, 16, 0,
                 {{300, 1}, {0, 2}, {0, 3}, {70, 9}, {0, 15}, {0, 16}, {500, 17}, {0, 33}}},
        AttnCase{"mixed_20b_sliding", 64, 8, 64, 128, 16, 0,
                 {{0, 1}, {200, 2}, {0, 3}, {0, 9}, {130, 15}, {0, 16}, {0, 17}, {90, 33}}},
        AttnCase{"mixed_d128_gqa4", 16, 4, 128, 0, 16, 0, {{0, 1}, {40, 2}, {0, 15}, {0, 16}, {64, 17}, {0, 33}}},
        AttnCase{"mixed_gqa16_window", 32, 2, 64, 40, 16, 0, {{0, 1}, {60, 3}, {0, 9}, {0, 17}, {10, 33}}}),
    [](const ::testing::TestParamInfo<AttnCase>& info) { return info.param.name; });

TEST_F(GpuOps, RouterTopk) {
  for (const int E : {6, 32, 128}) {
    SCOPED_TRACE("experts " + std::to_string(E));
    const int rows = 9, k = 4;
    auto values = random_values(static_cast<size_t>(rows * E), rng_, 2.0f);
    for (auto& x : values) x = std::round(x * 2.0f) / 2.0f;  // many ties: lowest index must win
    Pair logits = paired(cpu_, *gpu_, {rows, E}, values, DType::kF32);
    Pair ids = raw_paired(cpu_, *gpu_, DType::kI32, {rows, k}, std::vector<int32_t>(static_cast<size_t>(rows * k), -7));
    Pair w = out_pair({rows, k}, DType::kF32);
    cpu_.router_topk(logits.cpu, k, ids.cpu, w.cpu);
    gpu_->router_topk(logits.gpu, k, ids.gpu, w.gpu);
    EXPECT_EQ(read_raw<int32_t>(*gpu_, ids.gpu), read_raw<int32_t>(cpu_, ids.cpu));
    EXPECT_LE(rel_max_error(read_f32(*gpu_, w.gpu), read_f32(cpu_, w.cpu)), 1e-5);
  }
}

// The router in one launch (GEMV + top-k in its last block) against the two operations on the
// GPU (same bits: the same GEMV and the same per-row top-k code) and the CPU's ids; twice in a row
// (the block counter must be left at zero); shapes the fused kernel does not take (9 rows) fall
// back to the two operations.
TEST_F(GpuOps, RouteEqualsLinearThenTopk) {
  for (const int rows : {1, 2, 3, 8, 9}) {
    for (const int E : {32, 128}) {
      SCOPED_TRACE(std::to_string(rows) + " rows, " + std::to_string(E) + " experts");
      const int H = 256, k = 4;
      auto [cw, gw] = weight(random_values(static_cast<size_t>(E) * H, rng_, 0.05f), {E, H});
      auto [cb, gb] = weight(random_values(static_cast<size_t>(E), rng_), {E});
      Pair x = paired(cpu_, *gpu_, {rows, H}, random_values(static_cast<size_t>(rows) * H, rng_));
      Pair logits = out_pair({rows, E}, DType::kF32), logits2 = out_pair({rows, E}, DType::kF32);
      const std::vector<int32_t> init(static_cast<size_t>(rows * k), -7);
      Pair ids = raw_paired(cpu_, *gpu_, DType::kI32, {rows, k}, init);
      Pair ids2 = raw_paired(cpu_, *gpu_, DType::kI32, {rows, k}, init);
      Pair w = out_pair({rows, k}, DType::kF32), w2 = out_pair({rows, k}, DType::kF32);
      gpu_->linear(x.gpu, gw, gb, logits2.gpu);
      gpu_->router_topk(logits2.gpu, k, ids2.gpu, w2.gpu);
      for (int rep = 0; rep < 2; ++rep) {
        gpu_->route(x.gpu, gw, gb, k, logits.gpu, ids.gpu, w.gpu);
        EXPECT_EQ(read_f32(*gpu_, logits.gpu), read_f32(*gpu_, logits2.gpu));
        EXPECT_EQ(read_raw<int32_t>(*gpu_, ids.gpu), read_raw<int32_t>(*gpu_, ids2.gpu));
        EXPECT_EQ(read_f32(*gpu_, w.gpu), read_f32(*gpu_, w2.gpu));
      }
      cpu_.route(x.cpu, cw, cb, k, logits.cpu, ids.cpu, w.cpu);
      EXPECT_LE(rel_max_error(read_f32(*gpu_, logits.gpu), read_f32(cpu_, logits.cpu)), 1e-2);
      // Ids (in order) may differ only where two of the CPU's k + 1 largest logits are a near-tie.
      const auto cl = read_f32(cpu_, logits.cpu);
      const auto cid = read_raw<int32_t>(cpu_, ids.cpu), gid = read_raw<int32_t>(*gpu_, ids.gpu);
      for (int r = 0; r < rows; ++r) {
        std::vector<float> row(cl.begin() + r * E, cl.begin() + (r + 1) * E);
        std::sort(row.begin(), row.end(), std::greater<float>());
        bool near_tie = false;
        for (int j = 0; j < k; ++j) near_tie = near_tie || row[static_cast<size_t>(j)] - row[static_cast<size_t>(j + 1)] < 0.05f;
        if (near_tie) continue;
        for (int j = 0; j < k; ++j) EXPECT_EQ(gid[static_cast<size_t>(r * k + j)], cid[static_cast<size_t>(r * k + j)]) << "row " << r;
      }
    }
  }
}

TEST_F(GpuOps, ArgmaxAndGather) {
  for (const int n : {1000, 201088}) {
    const int rows = 3;
    auto values = random_values(static_cast<size_t>(rows) * n, rng_);
    for (auto& x : values) x = std::round(x * 4.0f) / 4.0f;  // ties
    Pair logits = paired(cpu_, *gpu_, {rows, n}, values, DType::kF32);
    Pair out = raw_paired(cpu_, *gpu_, DType::kI32, {rows}, std::vector<int32_t>(rows, -1));
    cpu_.argmax(logits.cpu, out.cpu);
    gpu_->argmax(logits.gpu, out.gpu);
    EXPECT_EQ(read_raw<int32_t>(*gpu_, out.gpu), read_raw<int32_t>(cpu_, out.cpu)) << "vocab " << n;
  }
  StepLayout layout = make_layout({{0, 4}, {2, 3}}, 16, 1, 8, 8, rng_);
  layout.logit_rows = {3, 0, 3, 6};
  Pair x = paired(cpu_, *gpu_, {7, 96}, random_values(7 * 96, rng_));
  Pair out = out_pair({4, 96});
  const auto cs = cpu_.prepare_step(layout);
  const auto gs = gpu_->prepare_step(layout);
  cpu_.gather_logit_rows(x.cpu, *cs, out.cpu);
  gpu_->gather_logit_rows(x.gpu, *gs, out.gpu);
  EXPECT_EQ(read_f32(*gpu_, out.gpu), read_f32(cpu_, out.cpu));
}

// The device top_logprobs against the CPU reference: many ties (values on a 1/4 grid, -0 and +0
// among them), masked (-inf) entries, k from 1 to 64, vocabularies from one block to the 201088 of
// gpt-oss, and more rows than one launch covers.
TEST_F(GpuOps, TopLogprobs) {
  struct Case {
    int rows, vocab, k;
  };
  for (const Case c : {Case{3, 100, 64}, Case{2, 64, 64}, Case{3, 1000, 1}, Case{3, 5000, 20}, Case{4, 201088, 64},
                       Case{2, 201088, 1}, Case{130, 3000, 5}, Case{2, 4097, 64}, Case{2, 8192, 33}}) {
    SCOPED_TRACE("rows " + std::to_string(c.rows) + " vocab " + std::to_string(c.vocab) + " k " + std::to_string(c.k));
    const size_t n = static_cast<size_t>(c.rows) * c.vocab;
    auto values = random_values(n, rng_, 3.0f);
    for (auto& x : values) x = std::round(x * 4.0f) / 4.0f;
    for (size_t i = 0; i < n; i += 7) values[i] = -INFINITY;
    if (c.vocab > 100) values[static_cast<size_t>(c.vocab) + 17] = 40.0f;  // row 1: one dominant entry
    Pair logits = paired(cpu_, *gpu_, {c.rows, c.vocab}, values, DType::kF32);
    Pair ids = raw_paired(cpu_, *gpu_, DType::kI32, {c.rows, c.k}, std::vector<int32_t>(static_cast<size_t>(c.rows * c.k), -7));
    Pair lp = out_pair({c.rows, c.k}, DType::kF32);
    cpu_.top_logprobs(logits.cpu, c.k, ids.cpu, lp.cpu);
    gpu_->top_logprobs(logits.gpu, c.k, ids.gpu, lp.gpu);
    const auto gi = read_raw<int32_t>(*gpu_, ids.gpu), ci = read_raw<int32_t>(cpu_, ids.cpu);
    EXPECT_EQ(gi, ci);
    const auto gl = read_f32(*gpu_, lp.gpu), cl = read_f32(cpu_, lp.cpu);
    double worst = 0;
    for (size_t i = 0; i < cl.size(); ++i)  // equal (-inf included) or close
      worst = std::max(worst, gl[i] == cl[i] ? 0.0 : static_cast<double>(std::fabs(gl[i] - cl[i])));
    EXPECT_LE(worst, 1e-4);
    // ids[r, 0] is the argmax.
    Pair am = raw_paired(cpu_, *gpu_, DType::kI32, {c.rows}, std::vector<int32_t>(static_cast<size_t>(c.rows), -1));
    gpu_->argmax(logits.gpu, am.gpu);
    const auto ga = read_raw<int32_t>(*gpu_, am.gpu);
    for (int r = 0; r < c.rows; ++r) EXPECT_EQ(ga[static_cast<size_t>(r)], gi[static_cast<size_t>(r) * c.k]) << "row " << r;
  }
  // Twice in a row on a row slice (the workspace counters must be left clean).
  auto values = random_values(5 * 201088, rng_);
  Pair logits = paired(cpu_, *gpu_, {5, 201088}, values, DType::kF32);
  Pair ids = raw_paired(cpu_, *gpu_, DType::kI32, {2, 8}, std::vector<int32_t>(16, -7));
  Pair lp = out_pair({2, 8}, DType::kF32);
  cpu_.top_logprobs(logits.cpu.slice_rows(3, 2), 8, ids.cpu, lp.cpu);
  for (int i = 0; i < 2; ++i) {
    gpu_->top_logprobs(logits.gpu.slice_rows(3, 2), 8, ids.gpu, lp.gpu);
    EXPECT_EQ(read_raw<int32_t>(*gpu_, ids.gpu), read_raw<int32_t>(cpu_, ids.cpu));
    EXPECT_LE(rel_max_error(read_f32(*gpu_, lp.gpu), read_f32(cpu_, lp.cpu)), 1e-5);
  }
}

// A small top_logprobs (several blocks per row, ties at the k-th value) for the race checker.
TEST_F(GpuOps, TopLogprobsSmall) {
  const int rows = 2, vocab = 9000, k = 64;
  auto values = random_values(static_cast<size_t>(rows) * vocab, rng_, 2.0f);
  for (auto& x : values) x = std::round(x * 2.0f) / 2.0f;
  Pair logits = paired(cpu_, *gpu_, {rows, vocab}, values, DType::kF32);
  Pair ids = raw_paired(cpu_, *gpu_, DType::kI32, {rows, k}, std::vector<int32_t>(rows * k, -7));
  Pair lp = out_pair({rows, k}, DType::kF32);
  cpu_.top_logprobs(logits.cpu, k, ids.cpu, lp.cpu);
  gpu_->top_logprobs(logits.gpu, k, ids.gpu, lp.gpu);
  EXPECT_EQ(read_raw<int32_t>(*gpu_, ids.gpu), read_raw<int32_t>(cpu_, ids.cpu));
  EXPECT_LE(rel_max_error(read_f32(*gpu_, lp.gpu), read_f32(cpu_, lp.cpu)), 1e-5);
}

TEST_F(GpuOps, ArgmaxManyRows) {
  // More rows than one launch covers, rows shorter than one block, and a row that is all -inf.
  for (const int n : {1, 37, 2049}) {
    const int rows = 300;
    auto values = random_values(static_cast<size_t>(rows) * n, rng_);
    for (auto& x : values) x = std::round(x * 2.0f) / 2.0f;
    for (int i = 0; i < n; ++i) values[static_cast<size_t>(5 * n + i)] = -INFINITY;
    Pair logits = paired(cpu_, *gpu_, {rows, n}, values, DType::kF32);
    Pair out = raw_paired(cpu_, *gpu_, DType::kI32, {rows}, std::vector<int32_t>(rows, -1));
    cpu_.argmax(logits.cpu, out.cpu);
    gpu_->argmax(logits.gpu, out.gpu);
    EXPECT_EQ(read_raw<int32_t>(*gpu_, out.gpu), read_raw<int32_t>(cpu_, out.cpu)) << "vocab " << n;
  }
}

struct MoeCase {
  std::string name;
  int experts, hidden, inter, rows, k;
  int scale_spread = 1;  // E8M0 scales drawn from centre +- spread
};

void PrintTo(const MoeCase& c, std::ostream* os) { *os << c.name; }

class GpuMoe : public GpuOps, public ::testing::WithParamInterface<MoeCase> {};

TEST_P(GpuMoe, MatchesCpuOnEveryPath) {
  const MoeCase& c = GetParam();
  const int E = c.experts, H = c.hidden, I = c.inter;
  std::uniform_int_distribution<int> byte(0, 255);
  auto scale_centre = [](int fan_in) {
    return 127 - static_cast<int>(std::lround(std::log2(std::sqrt(8.56 * fan_in))));
  };
  auto blocks = [&](int out, int in) {
    std::vector<uint8_t> b(static_cast<size_t>(E) * out * (in / 32) * 16);
    for (auto& x : b) x = static_cast<uint8_t>(byte(rng_));
    return b;
  };
  auto scales = [&](int out, int in) {
    std::vector<uint8_t> s(static_cast<size_t>(E) * out * (in / 32));
    const int centre = scale_centre(in);
    for (auto& x : s) x = static_cast<uint8_t>(centre - c.scale_spread + byte(rng_) % (2 * c.scale_spread + 1));
    return s;
  };
  const auto gu_blocks = blocks(2 * I, H), gu_scales = scales(2 * I, H), dn_blocks = blocks(H, I), dn_scales = scales(H, I);
  const auto gu_bias = to_bf16(random_values(static_cast<size_t>(E) * 2 * I, rng_));
  const auto dn_bias = to_bf16(random_values(static_cast<size_t>(E) * H, rng_));
  auto import_all = [&](Backend& b) {
    ExpertWeights ex;
    ex.gate_up_blocks = b.import_weight({const_cast<uint8_t*>(gu_blocks.data()), DType::kU8, {E, 2 * I, H / 32, 16}});
    ex.gate_up_scales = b.import_weight({const_cast<uint8_t*>(gu_scales.data()), DType::kU8, {E, 2 * I, H / 32}});
    ex.gate_up_bias = b.import_weight({const_cast<uint16_t*>(gu_bias.data()), DType::kBF16, {E, 2 * I}});
    ex.down_blocks = b.import_weight({const_cast<uint8_t*>(dn_blocks.data()), DType::kU8, {E, H, I / 32, 16}});
    ex.down_scales = b.import_weight({const_cast<uint8_t*>(dn_scales.data()), DType::kU8, {E, H, I / 32}});
    ex.down_bias = b.import_weight({const_cast<uint16_t*>(dn_bias.data()), DType::kBF16, {E, H}});
    return ex;
  };
  // Distinct experts per row, some slots empty (-1).
  std::vector<int32_t> ids;
  std::vector<float> weights;
  for (int r = 0; r < c.rows; ++r) {
    std::vector<int32_t> perm(static_cast<size_t>(E));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng_);
    for (int j = 0; j < c.k; ++j) {
      ids.push_back((r % 5 == 3 && j == 1) ? -1 : perm[static_cast<size_t>(j)]);
      weights.push_back(std::uniform_real_distribution<float>(0.05f, 1.0f)(rng_));
    }
  }
  const auto xv = random_values(static_cast<size_t>(c.rows) * H, rng_);
  const ExpertWeights ce = import_all(cpu_);
  DeviceBuffer cx = cpu_.allocate(xv.size() * 4), cid = cpu_.allocate(ids.size() * 4), cw = cpu_.allocate(weights.size() * 4),
               cout = cpu_.allocate(xv.size() * 4);
  const Tensor tx = cx.view(DType::kF32, {c.rows, H}), tid = cid.view(DType::kI32, {c.rows, c.k}),
               tw = cw.view(DType::kF32, {c.rows, c.k}), tout = cout.view(DType::kF32, {c.rows, H});
  cpu_.upload(xv.data(), tx);
  cpu_.upload(ids.data(), tid);
  cpu_.upload(weights.data(), tw);
  cpu_.moe_experts(tx, tid, tw, ce, 7.0f, tout);
  const auto co = read_f32(cpu_, tout);
  // The vector path's variants, which must give the bits of "gemv" (8-token tasks, weights loaded into
  // registers, gate_up blocks of 8 warps): "gemv16" routed tasks of 16 tokens
  // (ARBITER_CUDA_MOE_GROUPS=2), "pipe" the weights through the shared-memory ring
  // (ARBITER_CUDA_MOE_PIPE=1), "pipe16" both with gate_up blocks of 4 warps, "warps4" gate_up blocks of 4
  // warps (ARBITER_CUDA_MOE_WARPS=4). The tensor-core path's tiles of 64 and 32 tokens
  // (ARBITER_CUDA_MOE_TILE) and its deeper pipeline (ARBITER_CUDA_MOE_DEEP=1, "deep", "deep32") must
  // give the bits of its 128-token tiles ("mma").
  struct PathEnv {
    std::string name, moe, groups, pipe, warps, tile, deep = "0";
  };
  const PathEnv paths[] = {{"auto", "auto", "1", "0", "8", "128"},   {"gemv", "gemv", "1", "0", "8", "128"},
                           {"gemv16", "gemv", "2", "0", "8", "128"}, {"pipe", "gemv", "1", "1", "8", "128"},
                           {"pipe16", "gemv", "2", "1", "4", "128"}, {"warps4", "gemv", "1", "0", "4", "128"},
                           {"mma", "mma", "1", "0", "8", "128"},     {"mma64", "mma", "1", "0", "8", "64"},
                           {"mma32", "mma", "1", "0", "8", "32"},    {"deep", "mma", "1", "0", "8", "128", "1"},
                           {"deep32", "mma", "1", "0", "8", "32", "1"}};
  std::vector<float> gemv_out, mma_out;
  for (const PathEnv& env : paths) {
    const std::string& path = env.name;
    SCOPED_TRACE("path " + path);
    setenv("ARBITER_CUDA_MOE", env.moe.c_str(), 1);
    setenv("ARBITER_CUDA_MOE_GROUPS", env.groups.c_str(), 1);
    setenv("ARBITER_CUDA_MOE_PIPE", env.pipe.c_str(), 1);
    setenv("ARBITER_CUDA_MOE_WARPS", env.warps.c_str(), 1);
    setenv("ARBITER_CUDA_MOE_TILE", env.tile.c_str(), 1);
    setenv("ARBITER_CUDA_MOE_DEEP", env.deep.c_str(), 1);
    auto gpu = make_backend("cuda");
    for (const char* name : {"ARBITER_CUDA_MOE", "ARBITER_CUDA_MOE_GROUPS", "ARBITER_CUDA_MOE_PIPE", "ARBITER_CUDA_MOE_WARPS",
                             "ARBITER_CUDA_MOE_TILE", "ARBITER_CUDA_MOE_DEEP"})
      unsetenv(name);
    const ExpertWeights ge = import_all(*gpu);
    DeviceBuffer gx = gpu->allocate(xv.size() * 2), gid = gpu->allocate(ids.size() * 4),
                 gw = gpu->allocate(weights.size() * 4), gout = gpu->allocate(xv.size() * 2);
    const Tensor x = gx.view(DType::kBF16, {c.rows, H}), id = gid.view(DType::kI32, {c.rows, c.k}),
                 w = gw.view(DType::kF32, {c.rows, c.k}), out = gout.view(DType::kBF16, {c.rows, H});
    const auto xb = to_bf16(xv);
    gpu->upload(xb.data(), x);
    gpu->upload(ids.data(), id);
    gpu->upload(weights.data(), w);
    gpu->fill_zero(out);
    gpu->moe_experts(x, id, w, ge, 7.0f, out);
    const auto go = read_f32(*gpu, out);
    EXPECT_LE(rel_max_error(go, co), 2e-2);
    if (path == "gemv") gemv_out = go;
    if (path == "mma") mma_out = go;
    if (path != "gemv" && env.moe == "gemv") {
      EXPECT_EQ(go, gemv_out);
    }
    if (path != "mma" && env.moe == "mma") {
      EXPECT_EQ(go, mma_out);
    }
    // Again (the workspace is reused) on a row slice: the same result for those rows, to the bit on a
    // fixed path (auto may pick the other path for fewer rows).
    const int part = std::max(1, c.rows / 2);
    gpu->moe_experts(x.slice_rows(0, part), id.slice_rows(0, part), w.slice_rows(0, part), ge, 7.0f,
                     out.slice_rows(0, part));
    if (path == "auto") {
      EXPECT_LE(rel_max_error(read_f32(*gpu, out), go), 2e-2);
    } else {
      EXPECT_EQ(read_f32(*gpu, out), go);
    }
    // A single row alone (decode: no routing on the vector path) gives that row's bits of the batch.
    const int last = c.rows - 1;
    if (env.moe == "gemv") {
      gpu->moe_experts(x.slice_rows(last, 1), id.slice_rows(last, 1), w.slice_rows(last, 1), ge, 7.0f,
                       out.slice_rows(last, 1));
      EXPECT_EQ(read_f32(*gpu, out), go);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuMoe,
                         ::testing::Values(MoeCase{"tiny_one_row", 6, 64, 64, 1, 4},
                                           MoeCase{"tiny_rows5", 6, 64, 64, 5, 4},
                                           MoeCase{"many_tokens_per_expert", 6, 64, 96, 40, 4},
                                           MoeCase{"golden_b_shape", 16, 128, 96, 13, 4},
                                           MoeCase{"hidden2880_decode", 4, 2880, 2880, 1, 4},
                                           MoeCase{"hidden2880_batch", 8, 2880, 2880, 24, 4},
                                           MoeCase{"hidden2880_prefill", 8, 2880, 2880, 70, 4},
                                           MoeCase{"top1", 3, 96, 64, 17, 1},
                                           MoeCase{"wide_scales", 4, 128, 96, 6, 3, 14},
                                           MoeCase{"many_slots_per_row", 12, 64, 64, 3, 9}),
                         [](const ::testing::TestParamInfo<MoeCase>& info) { return info.param.name; });

}  // namespace
}  // namespace arbiter
