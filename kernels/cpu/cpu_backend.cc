#include "kernels/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/reference.h"
#include "kernels/moe_pack.h"

namespace arbiter {
namespace {

class CpuStepContext final : public StepContext {
 public:
  explicit CpuStepContext(const StepLayout& layout) : layout_(layout) {
    positions_.assign(layout.tokens.size(), 0);
    for (const auto& s : layout.sequences)
      for (int32_t i = 0; i < s.num_new; ++i) positions_.at(static_cast<size_t>(s.first_row + i)) = s.num_cached + i;
  }
  const StepLayout& layout() const override { return layout_; }
  const std::vector<int32_t>& positions() const { return positions_; }

 private:
  StepLayout layout_;
  std::vector<int32_t> positions_;
};

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("CpuBackend: ") + what);
}

// Weight vectors (norms, sinks) may be bf16 or f32 in checkpoints.
std::vector<float> to_f32(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.elements()));
  if (t.dtype == DType::kF32) {
    std::memcpy(v.data(), t.data, v.size() * 4);
  } else {
    require(t.dtype == DType::kBF16, "weight vector must be bf16 or f32");
    const auto* p = t.as<const uint16_t>();
    for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_to_f32(p[i]);
  }
  return v;
}

}  // namespace

CpuBackend::CpuBackend(int threads) : pool_(std::make_unique<cpu::ThreadPool>(threads)) {
  if (const char* env = std::getenv("ARBITER_CPU_COPY_WEIGHTS"); env && *env) copy_weights_ = std::strcmp(env, "0") != 0;
  if (const char* env = std::getenv("ARBITER_CPU_MXFP4"); env && *env) {
    const std::string mode = env;
    if (mode == "int8") expert_activations_ = cpu::Mxfp4Activations::kInt8;
    else if (mode != "exact") throw std::invalid_argument("ARBITER_CPU_MXFP4 must be exact or int8 (not '" + mode + "')");
  }
}

std::string CpuBackend::name() const {
  std::string n = std::string("cpu (") + cpu::isa_name(cpu::active_isa()) + ", " + std::to_string(pool_->size()) + " threads";
  if (expert_activations_ == cpu::Mxfp4Activations::kInt8)
    n += cpu::vnni_active() && cpu::active_isa() == cpu::Isa::kAvx512 ? ", int8 expert activations (vnni)"
                                                                       : ", int8 expert activations";
  return n + ")";
}

DeviceBuffer CpuBackend::allocate(size_t bytes) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded);
  if (!p) throw std::bad_alloc();
  return DeviceBuffer(p, bytes, [](void* q) { std::free(q); });
}

Tensor CpuBackend::import_weight(const Tensor& host) {
  if (!copy_weights_ || !host.data || host.bytes() == 0) return host;
  // A view imported again (the same mapped bytes) reuses its copy; the content is compared, since a
  // host buffer freed and reallocated at the same address may hold other weights. Copies are never
  // replaced: an earlier model may still use them.
  const auto key = std::make_pair(static_cast<const void*>(host.data), host.bytes());
  auto [first, last] = weight_copies_.equal_range(key);
  auto it = std::find_if(first, last, [&](const auto& c) { return std::memcmp(c.second, host.data, host.bytes()) == 0; });
  if (it == last) {
    void* copy = weight_arena_.allocate(host.bytes());
    std::memcpy(copy, host.data, host.bytes());
    it = weight_copies_.emplace(key, copy);
  }
  Tensor t = host;
  t.data = it->second;
  return t;
}

void CpuBackend::upload(const void* host, const Tensor& dst) { std::memcpy(dst.data, host, dst.bytes()); }
void CpuBackend::download(const Tensor& src, void* host) { std::memcpy(host, src.data, src.bytes()); }
void CpuBackend::fill_zero(const Tensor& dst) { std::memset(dst.data, 0, dst.bytes()); }

std::unique_ptr<StepContext> CpuBackend::prepare_step(const StepLayout& layout) {
  return std::make_unique<CpuStepContext>(layout);
}

void CpuBackend::embedding(const Tensor& table, const StepContext& step, const Tensor& out) {
  const auto& tokens = step.layout().tokens;
  const int64_t dim = table.shape[1];
  require(out.rows() >= static_cast<int64_t>(tokens.size()) && out.row_elements() == dim, "embedding shape");
  for (const int32_t id : tokens)
    if (id < 0 || id >= table.shape[0]) throw std::out_of_range("token id " + std::to_string(id) + " outside the vocabulary");
  pool_->parallel_for(static_cast<int64_t>(tokens.size()), 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t id = tokens[static_cast<size_t>(r)];
      float* o = out.as<float>() + r * dim;
      if (table.dtype == DType::kBF16) cpu::bf16_to_f32(table.as<const uint16_t>() + id * dim, dim, o);
      else std::memcpy(o, table.as<const float>() + id * dim, static_cast<size_t>(dim) * 4);
    }
  });
}

void CpuBackend::rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) {
  const std::vector<float> w = to_f32(weight);
  const int64_t dim = x.row_elements();
  require(static_cast<int64_t>(w.size()) == dim && out.row_elements() == dim, "rms_norm: shapes");
  cpu::rms_norm(*pool_, x.as<const float>(), x.rows(), dim, w.data(), eps, out.as<float>());
}

void CpuBackend::add_rms_norm(const Tensor& residual, const Tensor& delta, const Tensor& weight, float eps,
                              const Tensor& out) {
  add(residual, delta);
  rms_norm(residual, weight, eps, out);
}

void CpuBackend::linear(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& out) {
  require(x.dtype == DType::kF32 && out.dtype == DType::kF32, "linear: activations must be f32");
  require(weight.dtype == DType::kBF16 && weight.shape.rank == 2, "linear: weight must be bf16 [out, in]");
  const int64_t in = weight.shape[1], out_features = weight.shape[0];
  require(x.row_elements() == in && out.row_elements() == out_features && out.rows() == x.rows(), "linear: shapes");
  require(!bias.data || (bias.dtype == DType::kBF16 && bias.elements() == out_features), "linear: bias");
  cpu::linear_bf16(*pool_, x.as<const float>(), x.rows(), in, weight.as<const uint16_t>(), out_features,
                   bias.data ? bias.as<const uint16_t>() : nullptr, out.as<float>());
}

void CpuBackend::linear_group(const Tensor& x, std::span<const LinearTerm> terms) {
  require(x.dtype == DType::kF32, "linear: activations must be f32");
  std::vector<cpu::Bf16Problem> problems;
  for (const LinearTerm& t : terms) {
    require(t.weight.dtype == DType::kBF16 && t.weight.shape.rank == 2, "linear: weight must be bf16 [out, in]");
    const int64_t out_features = t.weight.shape[0];
    require(t.weight.shape[1] == x.row_elements() && t.out.dtype == DType::kF32 &&
                t.out.row_elements() == out_features && t.out.rows() == x.rows(),
            "linear: shapes");
    require(!t.bias.data || (t.bias.dtype == DType::kBF16 && t.bias.elements() == out_features), "linear: bias");
    problems.push_back({t.weight.as<const uint16_t>(), out_features,
                        t.bias.data ? t.bias.as<const uint16_t>() : nullptr, t.out.as<float>()});
  }
  cpu::linear_bf16_multi(*pool_, x.as<const float>(), x.rows(), x.row_elements(), problems.data(),
                         static_cast<int64_t>(problems.size()));
}

void CpuBackend::rope(const Tensor& q, const Tensor& k, int head_dim, const RopeParams& rope, const StepContext& step) {
  const auto& positions = static_cast<const CpuStepContext&>(step).positions();
  const int q_heads = static_cast<int>(q.row_elements() / head_dim);
  const int k_heads = static_cast<int>(k.row_elements() / head_dim);
  const int half = head_dim / 2;
  require(static_cast<int>(rope.inv_freq.size()) == half, "rope: inv_freq size");
  const bool has_table = rope.table.data != nullptr;
  if (has_table)
    require(rope.table.dtype == DType::kF32 && rope.table.row_elements() == head_dim, "rope: table must be F32 [positions, head_dim]");
  const int64_t table_rows = has_table ? rope.table.rows() : 0;
  pool_->parallel_for(static_cast<int64_t>(positions.size()), 4, [&](int64_t b, int64_t e) {
    // cos/sin once per row for all heads: the table's row, or computed the same way (rope_cos_sin).
    std::vector<float> computed(static_cast<size_t>(2 * half));
    for (int64_t r = b; r < e; ++r) {
      const int64_t pos = positions[static_cast<size_t>(r)];
      const float* cs = computed.data();
      if (pos >= 0 && pos < table_rows) cs = rope.table.as<const float>() + pos * head_dim;
      else rope_cos_sin(rope, pos, computed.data());
      cpu::rope_row(q.as<float>() + r * q.row_elements(), q_heads, head_dim, cs, cs + half);
      cpu::rope_row(k.as<float>() + r * k.row_elements(), k_heads, head_dim, cs, cs + half);
    }
  });
}

namespace {

// Where key position `pos` of a sequence lives in the cache of a layer.
const float* cached_row(const Tensor& pool, const SequenceStep& seq, int64_t pos, bool sliding, int block_size,
                        int64_t row_elements) {
  int64_t block, slot;
  if (sliding) {
    const int64_t ring = static_cast<int64_t>(seq.sliding_blocks.size()) * block_size;
    const int64_t s = pos % ring;
    block = seq.sliding_blocks[static_cast<size_t>(s / block_size)];
    slot = s % block_size;
  } else {
    block = seq.full_blocks.at(static_cast<size_t>(pos / block_size));
    slot = pos % block_size;
  }
  return pool.as<const float>() + (block * block_size + slot) * row_elements;
}

}  // namespace

void CpuBackend::attention(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& cache,
                           const Tensor& sinks, const AttentionParams& p, const StepContext& step, const Tensor& out) {
  const StepLayout& layout = step.layout();
  const int bs = layout.block_size;
  const int d = p.head_dim;
  require(p.num_kv_heads > 0 && p.num_q_heads % p.num_kv_heads == 0, "attention: heads");
  const int group = p.num_q_heads / p.num_kv_heads;
  const int64_t kv_row = static_cast<int64_t>(p.num_kv_heads) * d;
  const int64_t q_row = static_cast<int64_t>(p.num_q_heads) * d;
  const bool sliding = p.window > 0;
  const std::vector<float> sink = to_f32(sinks);
  require(static_cast<int>(sink.size()) == p.num_q_heads, "attention: sinks");

  // Per sequence: row pointers of every key it can see, from the cache (positions < num_cached)
  // or from this step's own k/v rows.
  struct SeqKeys {
    int64_t base = 0;
    size_t offset = 0;  // into key_ptrs / value_ptrs
  };
  std::vector<SeqKeys> seq_keys(layout.sequences.size());
  std::vector<const float*> key_ptrs, value_ptrs;
  for (size_t s = 0; s < layout.sequences.size(); ++s) {
    const SequenceStep& seq = layout.sequences[s];
    if (seq.num_new <= 0) continue;
    const int64_t last = seq.num_cached + seq.num_new - 1;
    const int64_t base = sliding ? std::max<int64_t>(0, seq.num_cached - p.window + 1) : 0;
    seq_keys[s] = {base, key_ptrs.size()};
    for (int64_t pos = base; pos <= last; ++pos) {
      if (pos >= seq.num_cached) {
        const int64_t row = seq.first_row + (pos - seq.num_cached);
        key_ptrs.push_back(k.as<const float>() + row * kv_row);
        value_ptrs.push_back(v.as<const float>() + row * kv_row);
      } else {
        key_ptrs.push_back(cached_row(cache.k, seq, pos, sliding, bs, kv_row));
        value_ptrs.push_back(cached_row(cache.v, seq, pos, sliding, bs, kv_row));
      }
    }
  }

  // Tasks: (kv head, sequence, tile of rows); the q heads of one kv head share its keys. Ordered
  // head-major so that contiguous chunks of tasks carry similar work.
  const int heads_per_task = std::min(group, cpu::isa::kAttnMaxQueries);
  const int rows_per_task = std::max(1, 32 / heads_per_task);
  std::vector<cpu::AttentionTask> tasks;
  std::vector<const float*> qp;
  std::vector<float*> op;
  std::vector<int64_t> qpos;
  std::vector<float> qsink;
  const size_t total = layout.tokens.size() * static_cast<size_t>(p.num_q_heads);
  qp.reserve(total);
  op.reserve(total);
  qpos.reserve(total);
  qsink.reserve(total);
  struct Range {
    size_t first, count;
  };
  std::vector<Range> ranges;
  for (int kvh = 0; kvh < p.num_kv_heads; ++kvh)
    for (int h0 = 0; h0 < group; h0 += heads_per_task) {
      const int nh = std::min(heads_per_task, group - h0);
      for (size_t s = 0; s < layout.sequences.size(); ++s) {
        const SequenceStep& seq = layout.sequences[s];
        for (int32_t i0 = 0; i0 < seq.num_new; i0 += rows_per_task) {
          const int32_t ni = std::min(rows_per_task, seq.num_new - i0);
          cpu::AttentionTask t;
          t.head_dim = d;
          t.window = p.window;
          t.scale = p.scale;
          t.key_base = seq_keys[s].base;
          t.head_offset = static_cast<int64_t>(kvh) * d;
          const size_t first = qp.size();
          for (int32_t i = i0; i < i0 + ni; ++i) {
            const int64_t row = seq.first_row + i;
            for (int hh = 0; hh < nh; ++hh) {
              const int h = kvh * group + h0 + hh;
              qp.push_back(q.as<const float>() + row * q_row + h * d);
              op.push_back(out.as<float>() + row * q_row + h * d);
              qpos.push_back(seq.num_cached + i);
              qsink.push_back(sink[static_cast<size_t>(h)]);
            }
          }
          t.num_queries = static_cast<int>(qp.size() - first);
          t.keys = key_ptrs.data() + seq_keys[s].offset;
          t.values = value_ptrs.data() + seq_keys[s].offset;
          tasks.push_back(t);
          ranges.push_back({first, qp.size() - first});
        }
      }
    }
  for (size_t i = 0; i < tasks.size(); ++i) {
    tasks[i].q = qp.data() + ranges[i].first;
    tasks[i].out = op.data() + ranges[i].first;
    tasks[i].q_pos = qpos.data() + ranges[i].first;
    tasks[i].sinks = qsink.data() + ranges[i].first;
  }
  cpu::attention(*pool_, tasks.data(), static_cast<int64_t>(tasks.size()));
}

void CpuBackend::kv_store(const Tensor& k, const Tensor& v, const KvLayer& cache, const AttentionParams& p,
                          const StepContext& step) {
  const StepLayout& layout = step.layout();
  const int bs = layout.block_size;
  const int64_t kv_row = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  const bool sliding = p.window > 0;
  for (const SequenceStep& seq : layout.sequences) {
    int32_t begin = 0;
    if (sliding) {
      const int64_t ring = static_cast<int64_t>(seq.sliding_blocks.size()) * bs;
      // A ring shorter than the window is fine while it still covers every position (no wrap yet).
      require(ring >= std::min<int64_t>(p.window, seq.num_cached + seq.num_new),
              "kv_store: sliding ring smaller than the window");
      begin = static_cast<int32_t>(std::max<int64_t>(0, seq.num_new - ring));
    }
    for (int32_t i = begin; i < seq.num_new; ++i) {
      const int64_t pos = seq.num_cached + i;
      float* kd = const_cast<float*>(cached_row(cache.k, seq, pos, sliding, bs, kv_row));
      float* vd = const_cast<float*>(cached_row(cache.v, seq, pos, sliding, bs, kv_row));
      std::memcpy(kd, k.as<const float>() + (seq.first_row + i) * kv_row, static_cast<size_t>(kv_row) * 4);
      std::memcpy(vd, v.as<const float>() + (seq.first_row + i) * kv_row, static_cast<size_t>(kv_row) * 4);
    }
  }
}

void CpuBackend::router_topk(const Tensor& logits, int k, const Tensor& expert_ids, const Tensor& expert_weights) {
  const int64_t n = logits.row_elements();
  require(k > 0 && k <= n, "router_topk: k out of range");
  for (int64_t r = 0; r < logits.rows(); ++r)
    cpu::ref::topk_softmax(logits.as<const float>() + r * n, n, k, expert_ids.as<int32_t>() + r * k,
                           expert_weights.as<float>() + r * k);
}

void CpuBackend::moe_experts(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                             const ExpertWeights& ex, float swiglu_limit, const Tensor& out) {
  const int64_t rows = x.rows(), hidden = ex.hidden(), inter = ex.intermediate();
  const int k = static_cast<int>(expert_ids.row_elements());
  const int num_experts = ex.num_experts();
  require(x.row_elements() == hidden && out.row_elements() == hidden, "moe_experts: hidden size");
  // Group (row, slot) pairs by expert so each expert's weights are read once per step.
  std::vector<std::vector<std::pair<int64_t, float>>> by_expert(static_cast<size_t>(num_experts));
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < k; ++j) {
      const int32_t e = expert_ids.as<const int32_t>()[r * k + j];
      if (e < 0) continue;
      if (e >= num_experts) throw std::out_of_range("moe_experts: expert id out of range");
      by_expert[static_cast<size_t>(e)].push_back({r, expert_weights.as<const float>()[r * k + j]});
    }
  std::memset(out.data, 0, out.bytes());
  // Each expert's rows gathered contiguously; all experts then go through gate_up, SwiGLU and down
  // together (one parallel pass per matrix kind instead of one per expert).
  std::vector<int64_t> first(static_cast<size_t>(num_experts) + 1, 0);
  for (int e = 0; e < num_experts; ++e)
    first[static_cast<size_t>(e) + 1] = first[static_cast<size_t>(e)] + static_cast<int64_t>(by_expert[static_cast<size_t>(e)].size());
  const int64_t total = first.back();
  if (total == 0) return;
  auto grow = [](std::vector<float>& v, int64_t n) -> std::vector<float>& {
    if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
    return v;
  };
  std::vector<float>& xs = grow(moe_xs_, total * hidden);
  std::vector<float>& u = grow(moe_u_, total * 2 * inter);
  std::vector<float>& act = grow(moe_act_, total * inter);
  std::vector<float>& y = grow(moe_y_, total * hidden);
  // pos[r * k + j]: where (row r, slot j) sits in the expert-grouped rows (-1: not held here).
  std::vector<int64_t> pos(static_cast<size_t>(rows * k), -1), src(static_cast<size_t>(total));
  for (int e = 0; e < num_experts; ++e) {
    const auto& members = by_expert[static_cast<size_t>(e)];
    for (size_t i = 0; i < members.size(); ++i) src[static_cast<size_t>(first[static_cast<size_t>(e)]) + i] = members[i].first;
  }
  {
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t r = 0; r < rows; ++r)
      for (int j = 0; j < k; ++j) {
        const int32_t e = expert_ids.as<const int32_t>()[r * k + j];
        if (e >= 0) pos[static_cast<size_t>(r * k + j)] = next[static_cast<size_t>(e)]++;
      }
  }
  pool_->parallel_for(total, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      std::memcpy(&xs[static_cast<size_t>(i * hidden)], x.as<const float>() + src[static_cast<size_t>(i)] * hidden,
                  static_cast<size_t>(hidden) * 4);
  });
  const int64_t gu_block_stride = 2 * inter * (hidden / 32);
  const int64_t down_block_stride = hidden * (inter / 32);
  std::vector<cpu::Mxfp4Problem> gate_up, down;
  for (int e = 0; e < num_experts; ++e) {
    const int64_t m = first[static_cast<size_t>(e) + 1] - first[static_cast<size_t>(e)];
    if (m == 0) continue;
    const int64_t r0 = first[static_cast<size_t>(e)];
    cpu::Mxfp4Problem g;
    g.x = &xs[static_cast<size_t>(r0 * hidden)];
    g.rows = m;
    g.blocks = ex.gate_up_blocks.as<const uint8_t>() + e * gu_block_stride * 16;
    g.scales = ex.gate_up_scales.as<const uint8_t>() + e * gu_block_stride;
    g.bias = ex.gate_up_bias.as<const uint16_t>() + e * 2 * inter;
    g.y = &u[static_cast<size_t>(r0 * 2 * inter)];
    gate_up.push_back(g);
    cpu::Mxfp4Problem d;
    d.x = &act[static_cast<size_t>(r0 * inter)];
    d.rows = m;
    d.blocks = ex.down_blocks.as<const uint8_t>() + e * down_block_stride * 16;
    d.scales = ex.down_scales.as<const uint8_t>() + e * down_block_stride;
    d.bias = ex.down_bias.as<const uint16_t>() + e * hidden;
    d.y = &y[static_cast<size_t>(r0 * hidden)];
    down.push_back(d);
  }
  cpu::linear_mxfp4_multi(*pool_, hidden, 2 * inter, gate_up.data(), static_cast<int64_t>(gate_up.size()),
                          expert_activations_);
  cpu::swiglu(*pool_, u.data(), total, inter, swiglu_limit, act.data());
  cpu::linear_mxfp4_multi(*pool_, inter, hidden, down.data(), static_cast<int64_t>(down.size()), expert_activations_);
  // Each output row sums its own slots in slot order (independent of what else is in the batch).
  pool_->parallel_for(rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int j = 0; j < k; ++j) {
        const int64_t p = pos[static_cast<size_t>(r * k + j)];
        if (p >= 0)
          cpu::axpy(out.as<float>() + r * hidden, expert_weights.as<const float>()[r * k + j],
                    &y[static_cast<size_t>(p * hidden)], hidden);
      }
  });
}

void CpuBackend::moe_dispatch_pack(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                                   const Tensor& expert_owner, const Tensor& expert_local, const MoeSendBuffers& send,
                                   std::span<int64_t> rows_per_rank, const Tensor& expert_load) {
  const int64_t rows = x.shape.rank == 0 ? 0 : x.rows();
  const int ranks = static_cast<int>(rows_per_rank.size());
  const int64_t capacity = send.capacity;
  require(capacity == 0 || (rows <= capacity && send.ids.rows() >= ranks * capacity &&
                            send.weights.rows() >= ranks * capacity && send.ids.dtype == DType::kI32 &&
                            send.weights.dtype == DType::kF32),
          "moe_dispatch_pack: rows over the capacity, or send ids / weights under ranks * capacity rows");
  if (rows == 0) {  // (row_elements() of an empty tensor is undefined)
    std::fill(rows_per_rank.begin(), rows_per_rank.end(), int64_t{0});
    if (capacity > 0) {  // every row is padding
      std::fill(send.ids.as<int32_t>(), send.ids.as<int32_t>() + ranks * capacity * send.ids.row_elements(), -1);
      std::fill(send.weights.as<float>(), send.weights.as<float>() + ranks * capacity * send.weights.row_elements(), 0.0f);
    }
    return;
  }
  const int k = static_cast<int>(expert_ids.row_elements());
  require(expert_ids.dtype == DType::kI32 && expert_weights.dtype == DType::kF32 && send.slots.dtype == DType::kI32 &&
              expert_owner.dtype == DType::kI32 && expert_local.dtype == DType::kI32 && send.x.dtype == x.dtype,
          "moe_dispatch_pack: dtypes");
  const int64_t most = capacity > 0 ? ranks * capacity : rows * std::min(ranks, k);
  require(rows == 0 || (send.slots.rows() >= rows && send.slots.row_elements() == ranks &&
                        send.x.rows() >= most && send.x.row_elements() == x.row_elements() &&
                        send.ids.row_elements() == k && send.weights.row_elements() == k &&
                        send.ids.rows() >= send.x.rows() && send.weights.rows() >= send.x.rows()),
          "moe_dispatch_pack: send buffers too small or misshapen");
  require(!expert_load.data || (expert_load.dtype == DType::kI32 && expert_load.elements() == expert_owner.elements()),
          "moe_dispatch_pack: expert_load must be I32 [experts]");
  // The plan is serial and small (k ids per token); the row copies, the bulk, go over the pool.
  moe_pack::plan(expert_ids.as<const int32_t>(), expert_weights.as<const float>(), rows, k,
                 expert_owner.as<const int32_t>(), expert_local.as<const int32_t>(),
                 static_cast<int>(expert_owner.elements()), ranks, send.slots.as<int32_t>(), send.ids.as<int32_t>(),
                 send.weights.as<float>(), rows_per_rank.data(), expert_load.as<int32_t>(), capacity);
  const size_t row_bytes = static_cast<size_t>(x.row_elements()) * dtype_size(x.dtype);
  pool_->parallel_for(rows, 8, [&](int64_t b, int64_t e) {
    moe_pack::copy_rows(x.data, row_bytes, send.slots.as<const int32_t>(), ranks, b, e, send.x.data);
  });
}

void CpuBackend::moe_combine(const Tensor& back, const Tensor& slots, const Tensor& out) {
  const int64_t rows = out.shape.rank == 0 ? 0 : out.rows();
  if (rows == 0) return;
  require(slots.dtype == DType::kI32 && back.dtype == out.dtype && slots.rows() >= rows,
          "moe_combine: slots I32 [rows, ranks], back and out of one dtype");
  const int ranks = static_cast<int>(slots.row_elements());
  const int64_t hidden = out.row_elements();
  pool_->parallel_for(rows, 8, [&](int64_t b, int64_t e) {
    std::vector<float> scratch(out.dtype == DType::kF32 ? 0 : static_cast<size_t>(hidden));
    moe_pack::sum_rows(back.data, out.dtype, hidden, slots.as<const int32_t>(), ranks, b, e, out.data, scratch.data());
  });
}

// A serial loop over rows * k ids: a few hundred increments per layer, far below the layer's cost.
void CpuBackend::count_expert_load(const Tensor& expert_ids, const Tensor& load) {
  require(expert_ids.dtype == DType::kI32 && load.dtype == DType::kI32, "count_expert_load: ids and load must be I32");
  if (expert_ids.shape.rank == 0) return;
  const int32_t* ids = expert_ids.as<const int32_t>();
  int32_t* counts = load.as<int32_t>();
  const int64_t n = expert_ids.elements(), experts = load.elements();
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] >= 0 && ids[i] < experts) ++counts[ids[i]];
}

void CpuBackend::add(const Tensor& x, const Tensor& y) {
  require(x.elements() == y.elements(), "add: sizes differ");
  cpu::add(*pool_, x.as<float>(), y.as<const float>(), x.elements());
}

void CpuBackend::gather_logit_rows(const Tensor& x, const StepContext& step, const Tensor& out) {
  const auto& rows = step.layout().logit_rows;
  const int64_t n = x.row_elements();
  for (size_t i = 0; i < rows.size(); ++i)
    std::memcpy(out.as<float>() + static_cast<int64_t>(i) * n, x.as<const float>() + rows[i] * n, static_cast<size_t>(n) * 4);
}

void CpuBackend::argmax(const Tensor& logits, const Tensor& out) {
  require(logits.dtype == DType::kF32 && out.dtype == DType::kI32, "argmax: dtypes");
  cpu::argmax_rows(*pool_, logits.as<const float>(), logits.rows(), logits.row_elements(), out.as<int32_t>());
}

}  // namespace arbiter
