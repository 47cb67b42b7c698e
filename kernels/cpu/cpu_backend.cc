#include "kernels/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/reference.h"

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

float weight_at(const Tensor& t, int64_t i) {
  return t.dtype == DType::kF32 ? t.as<const float>()[i] : bf16_to_f32(t.as<const uint16_t>()[i]);
}

}  // namespace

CpuBackend::CpuBackend(int threads) : pool_(std::make_unique<cpu::ThreadPool>(threads)) {}

std::string CpuBackend::name() const {
  return std::string("cpu (") + cpu::isa_name(cpu::active_isa()) + ", " + std::to_string(pool_->size()) + " threads)";
}

DeviceBuffer CpuBackend::allocate(size_t bytes) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded);
  if (!p) throw std::bad_alloc();
  return DeviceBuffer(p, bytes, [](void* q) { std::free(q); });
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
  for (size_t r = 0; r < tokens.size(); ++r) {
    const int64_t id = tokens[r];
    if (id < 0 || id >= table.shape[0]) throw std::out_of_range("token id " + std::to_string(id) + " outside the vocabulary");
    float* o = out.as<float>() + static_cast<int64_t>(r) * dim;
    if (table.dtype == DType::kBF16) {
      const uint16_t* src = table.as<const uint16_t>() + id * dim;
      for (int64_t i = 0; i < dim; ++i) o[i] = bf16_to_f32(src[i]);
    } else {
      std::memcpy(o, table.as<const float>() + id * dim, static_cast<size_t>(dim) * 4);
    }
  }
}

void CpuBackend::rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) {
  const std::vector<float> w = to_f32(weight);
  const int64_t dim = x.row_elements();
  pool_->parallel_for(x.rows(), 4, [&](int64_t b, int64_t e) {
    cpu::ref::rms_norm(x.as<const float>() + b * dim, e - b, dim, w.data(), eps, out.as<float>() + b * dim);
  });
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

void CpuBackend::rope(const Tensor& q, const Tensor& k, int head_dim, const RopeParams& rope, const StepContext& step) {
  const auto& positions = static_cast<const CpuStepContext&>(step).positions();
  const int q_heads = static_cast<int>(q.row_elements() / head_dim);
  const int k_heads = static_cast<int>(k.row_elements() / head_dim);
  pool_->parallel_for(static_cast<int64_t>(positions.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t pos = positions[static_cast<size_t>(r)];
      cpu::ref::rope_row(q.as<float>() + r * q.row_elements(), q_heads, head_dim, pos, rope.inv_freq.data(),
                         rope.concentration);
      cpu::ref::rope_row(k.as<float>() + r * k.row_elements(), k_heads, head_dim, pos, rope.inv_freq.data(),
                         rope.concentration);
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
  const int group = p.num_q_heads / p.num_kv_heads;
  const int64_t kv_row = static_cast<int64_t>(p.num_kv_heads) * d;
  const int64_t q_row = static_cast<int64_t>(p.num_q_heads) * d;
  const bool sliding = p.window > 0;
  // Work items: (row, q head).
  std::vector<std::pair<int32_t, int32_t>> row_seq;  // row -> (sequence, index within new tokens)
  row_seq.resize(layout.tokens.size());
  for (size_t s = 0; s < layout.sequences.size(); ++s)
    for (int32_t i = 0; i < layout.sequences[s].num_new; ++i)
      row_seq[static_cast<size_t>(layout.sequences[s].first_row + i)] = {static_cast<int32_t>(s), i};
  const int64_t items = static_cast<int64_t>(layout.tokens.size()) * p.num_q_heads;
  pool_->parallel_for(items, 4, [&](int64_t b, int64_t e) {
    std::vector<float> scores;
    std::vector<float> acc(static_cast<size_t>(d));
    for (int64_t item = b; item < e; ++item) {
      const int64_t row = item / p.num_q_heads;
      const int h = static_cast<int>(item % p.num_q_heads);
      const int kvh = h / group;
      const auto [si, idx] = row_seq[static_cast<size_t>(row)];
      const SequenceStep& seq = layout.sequences[static_cast<size_t>(si)];
      const int64_t pos = seq.num_cached + idx;
      const int64_t first = sliding ? std::max<int64_t>(0, pos - p.window + 1) : 0;
      const float* qh = q.as<const float>() + row * q_row + h * d;
      scores.resize(static_cast<size_t>(pos - first + 1));
      const float sink = weight_at(sinks, h);
      float max = sink;
      auto key_of = [&](int64_t j, const Tensor& fresh, const Tensor& pool_tensor) -> const float* {
        if (j >= seq.num_cached) return fresh.as<const float>() + (seq.first_row + (j - seq.num_cached)) * kv_row + kvh * d;
        return cached_row(pool_tensor, seq, j, sliding, bs, kv_row) + kvh * d;
      };
      for (int64_t j = first; j <= pos; ++j) {
        const float* kj = key_of(j, k, cache.k);
        float dot = 0;
        for (int i = 0; i < d; ++i) dot += qh[i] * kj[i];
        const float s = dot * p.scale;
        scores[static_cast<size_t>(j - first)] = s;
        max = std::max(max, s);
      }
      float denom = std::exp(sink - max);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = first; j <= pos; ++j) {
        const float w = std::exp(scores[static_cast<size_t>(j - first)] - max);
        denom += w;
        const float* vj = key_of(j, v, cache.v);
        for (int i = 0; i < d; ++i) acc[static_cast<size_t>(i)] += w * vj[i];
      }
      float* o = out.as<float>() + row * q_row + h * d;
      for (int i = 0; i < d; ++i) o[i] = acc[static_cast<size_t>(i)] / denom;
    }
  });
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
      require(ring >= p.window, "kv_store: sliding ring smaller than the window");
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
  std::vector<float> xs, u, act, y;
  const int64_t gu_block_stride = 2 * inter * (hidden / 32);
  const int64_t down_block_stride = hidden * (inter / 32);
  for (int e = 0; e < num_experts; ++e) {
    const auto& members = by_expert[static_cast<size_t>(e)];
    if (members.empty()) continue;
    const int64_t m = static_cast<int64_t>(members.size());
    xs.resize(static_cast<size_t>(m * hidden));
    for (int64_t i = 0; i < m; ++i)
      std::memcpy(&xs[static_cast<size_t>(i * hidden)], x.as<const float>() + members[static_cast<size_t>(i)].first * hidden,
                  static_cast<size_t>(hidden) * 4);
    u.resize(static_cast<size_t>(m * 2 * inter));
    cpu::linear_mxfp4(*pool_, xs.data(), m, hidden, ex.gate_up_blocks.as<const uint8_t>() + e * gu_block_stride * 16,
                      ex.gate_up_scales.as<const uint8_t>() + e * gu_block_stride, 2 * inter,
                      ex.gate_up_bias.as<const uint16_t>() + e * 2 * inter, u.data());
    act.resize(static_cast<size_t>(m * inter));
    for (int64_t i = 0; i < m; ++i)
      cpu::ref::swiglu(&u[static_cast<size_t>(i * 2 * inter)], inter, swiglu_limit, &act[static_cast<size_t>(i * inter)]);
    y.resize(static_cast<size_t>(m * hidden));
    cpu::linear_mxfp4(*pool_, act.data(), m, inter, ex.down_blocks.as<const uint8_t>() + e * down_block_stride * 16,
                      ex.down_scales.as<const uint8_t>() + e * down_block_stride, hidden,
                      ex.down_bias.as<const uint16_t>() + e * hidden, y.data());
    for (int64_t i = 0; i < m; ++i) {
      const auto [row, w] = members[static_cast<size_t>(i)];
      float* o = out.as<float>() + row * hidden;
      const float* yi = &y[static_cast<size_t>(i * hidden)];
      for (int64_t c = 0; c < hidden; ++c) o[c] += w * yi[c];
    }
  }
}

void CpuBackend::add(const Tensor& x, const Tensor& y) {
  require(x.elements() == y.elements(), "add: sizes differ");
  float* a = x.as<float>();
  const float* b = y.as<const float>();
  pool_->parallel_for(x.elements(), 4096, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) a[i] += b[i];
  });
}

void CpuBackend::gather_logit_rows(const Tensor& x, const StepContext& step, const Tensor& out) {
  const auto& rows = step.layout().logit_rows;
  const int64_t n = x.row_elements();
  for (size_t i = 0; i < rows.size(); ++i)
    std::memcpy(out.as<float>() + static_cast<int64_t>(i) * n, x.as<const float>() + rows[i] * n, static_cast<size_t>(n) * 4);
}

void CpuBackend::argmax(const Tensor& logits, const Tensor& out) {
  const int64_t n = logits.row_elements();
  for (int64_t r = 0; r < logits.rows(); ++r) {
    const float* l = logits.as<const float>() + r * n;
    out.as<int32_t>()[r] = static_cast<int32_t>(std::max_element(l, l + n) - l);
  }
}

}  // namespace arbiter
