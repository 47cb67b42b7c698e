#include "kernels/backend.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/reference.h"
#include "kernels/moe_pack.h"
#if ARBITER_WITH_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace arbiter {

void rope_cos_sin(const RopeParams& rope, int64_t position, float* cos_sin) {
  const size_t half = rope.inv_freq.size();
  for (size_t i = 0; i < half; ++i) {
    const float angle = static_cast<float>(position) * rope.inv_freq[i];
    cos_sin[i] = std::cos(angle) * rope.concentration;
    cos_sin[half + i] = std::sin(angle) * rope.concentration;
  }
}

std::vector<float> rope_table(const RopeParams& rope, int64_t positions) {
  if (positions < 0) throw std::invalid_argument("rope_table: negative position count");
  const size_t row = 2 * rope.inv_freq.size();
  std::vector<float> table(static_cast<size_t>(positions) * row);
  for (int64_t p = 0; p < positions; ++p) rope_cos_sin(rope, p, table.data() + static_cast<size_t>(p) * row);
  return table;
}

void Backend::top_logprobs(const Tensor& logits, int k, const Tensor& ids, const Tensor& logprobs) {
  const int64_t rows = logits.rows(), vocab = logits.row_elements();
  if (logits.dtype != DType::kF32 || ids.dtype != DType::kI32 || logprobs.dtype != DType::kF32)
    throw std::invalid_argument("top_logprobs: logits and log-probabilities must be F32, ids I32");
  if (k < 1 || k > 64 || k > vocab || ids.rows() != rows || logprobs.rows() != rows || ids.row_elements() != k ||
      logprobs.row_elements() != k)
    throw std::invalid_argument("top_logprobs: k = " + std::to_string(k) + " does not fit the tensors");
  if (rows == 0) return;
  std::vector<float> host(static_cast<size_t>(rows * vocab));
  download(logits, host.data());
  std::vector<int32_t> top_ids(static_cast<size_t>(rows * k));
  std::vector<float> top_lp(static_cast<size_t>(rows * k));
  for (int64_t r = 0; r < rows; ++r)
    cpu::ref::top_logprobs(host.data() + r * vocab, vocab, k, top_ids.data() + r * k, top_lp.data() + r * k);
  upload(top_ids.data(), ids);
  upload(top_lp.data(), logprobs);
}

void Backend::token_logprobs(const Tensor& logits, const Tensor& ids, const Tensor& logprobs) {
  const int64_t rows = logits.rows(), vocab = logits.row_elements();
  if (logits.dtype != DType::kF32 || ids.dtype != DType::kI32 || logprobs.dtype != DType::kF32)
    throw std::invalid_argument("token_logprobs: logits and log-probabilities must be F32, ids I32");
  if (ids.rows() != rows || logprobs.rows() != rows || ids.row_elements() != logprobs.row_elements())
    throw std::invalid_argument("token_logprobs: the id and log-probability tensors do not match the logits");
  const int64_t m = ids.row_elements();
  if (rows == 0 || m == 0) return;
  std::vector<float> host(static_cast<size_t>(rows * vocab));
  download(logits, host.data());
  std::vector<int32_t> wanted(static_cast<size_t>(rows * m));
  download(ids, wanted.data());
  std::vector<float> out(static_cast<size_t>(rows * m));
  for (int64_t r = 0; r < rows; ++r)
    cpu::ref::token_logprobs(host.data() + r * vocab, vocab, wanted.data() + r * m, m, out.data() + r * m);
  upload(out.data(), logprobs);
}

void Backend::linear_rows(const Tensor& x, const Tensor& weight, const Tensor& ids, const Tensor& out) {
  const int64_t rows = x.rows(), in = x.row_elements(), m = ids.row_elements();
  if (weight.dtype != DType::kBF16 || ids.dtype != DType::kI32 || out.dtype != DType::kF32 ||
      (x.dtype != DType::kF32 && x.dtype != DType::kBF16))
    throw std::invalid_argument("linear_rows: x must be F32 or BF16, the weight BF16, ids I32, out F32");
  if (weight.row_elements() != in || ids.rows() != rows || out.rows() != rows || out.row_elements() != m)
    throw std::invalid_argument("linear_rows: the tensors' shapes do not match");
  if (rows == 0 || m == 0) return;
  std::vector<float> xs(static_cast<size_t>(rows * in));
  if (x.dtype == DType::kF32) {
    download(x, xs.data());
  } else {
    std::vector<uint16_t> raw(xs.size());
    download(x, raw.data());
    for (size_t i = 0; i < raw.size(); ++i) xs[i] = bf16_to_f32(raw[i]);
  }
  std::vector<int32_t> wanted(static_cast<size_t>(rows * m));
  download(ids, wanted.data());
  std::vector<float> result(wanted.size(), -std::numeric_limits<float>::infinity());
  std::vector<uint16_t> row(static_cast<size_t>(in));
  std::vector<float> w(static_cast<size_t>(in));
  for (size_t e = 0; e < wanted.size(); ++e) {
    const int32_t id = wanted[e];
    if (id < 0 || id >= weight.rows()) continue;
    download(weight.slice_rows(id, 1), row.data());
    const float* xr = xs.data() + (e / static_cast<size_t>(m)) * static_cast<size_t>(in);
    double dot = 0;
    for (int64_t i = 0; i < in; ++i) dot += static_cast<double>(xr[i]) * bf16_to_f32(row[static_cast<size_t>(i)]);
    result[e] = static_cast<float>(dot);
  }
  upload(result.data(), out);
}

void Backend::linear_group(const Tensor& x, std::span<const LinearTerm> terms) {
  for (const LinearTerm& t : terms) linear(x, t.weight, t.bias, t.out);
}

void Backend::linear_group_rope(const Tensor& x, std::span<const LinearTerm> terms, int head_dim, const RopeParams& rope,
                                const StepContext& step) {
  if (terms.size() < 2) throw std::invalid_argument("linear_group_rope: needs the q and k terms first");
  linear_group(x, terms);
  this->rope(terms[0].out, terms[1].out, head_dim, rope, step);
}

void Backend::attention_store(const Tensor& q, const Tensor& k, const Tensor& v, const KvLayer& cache,
                              const Tensor& sinks, const AttentionParams& params, const StepContext& step,
                              const Tensor& out) {
  attention(q, k, v, cache, sinks, params, step, out);
  kv_store(k, v, cache, params, step);
}

void Backend::linear_add_rms_norm(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& delta,
                                  const Tensor& residual, const Tensor& norm_weight, float eps, const Tensor& out) {
  linear(x, w, bias, delta);
  add_rms_norm(residual, delta, norm_weight, eps, out);
}

void Backend::route(const Tensor& x, const Tensor& weight, const Tensor& bias, int k, const Tensor& logits,
                    const Tensor& expert_ids, const Tensor& expert_weights) {
  linear(x, weight, bias, logits);
  router_topk(logits, k, expert_ids, expert_weights);
}

int gpu_count() {
#if ARBITER_WITH_CUDA
  return cuda_device_count();
#else
  return 0;
#endif
}

bool cuda_available() { return gpu_count() > 0; }

void device_copy_on_stream(void* dst, const void* src, size_t bytes, void* stream) {
#if ARBITER_WITH_CUDA
  cuda_copy_on_stream(dst, src, bytes, stream);
#else
  (void)dst, (void)src, (void)bytes, (void)stream;
  throw std::runtime_error("device_copy_on_stream: this build has no CUDA");
#endif
}

void device_wait_stream(void* stream) {
#if ARBITER_WITH_CUDA
  cuda_wait_stream(stream);
#else
  (void)stream;
  throw std::runtime_error("device_wait_stream: this build has no CUDA");
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return std::make_unique<CpuBackend>();
  if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
#if ARBITER_WITH_CUDA
    int index = 0;
    if (device.size() > 5) {
      try {
        index = std::stoi(device.substr(5));
      } catch (const std::exception&) {
        throw std::runtime_error("bad device '" + device + "': expected cuda:N");
      }
    }
    if (cuda_device_count() <= index)
      throw std::runtime_error("device '" + device + "': no such GPU (" + std::to_string(cuda_device_count()) +
                               " visible)");
    return make_cuda_backend(index);
#else
    throw std::runtime_error("device '" + device + "': this build has no CUDA support (configure with nvcc present)");
#endif
  }
  if (device == "auto") return make_backend(cuda_available() ? "cuda" : "cpu");
  throw std::runtime_error("unknown device '" + device + "' (expected auto, cpu, cuda or cuda:N)");
}

}  // namespace arbiter

namespace arbiter {

namespace {

void check_moe_pack_args(const Tensor& x, const Tensor& ids, const Tensor& w, const Tensor& owner, const Tensor& local,
                         const Backend::MoeSendBuffers& send, std::span<int64_t> rows_per_rank, const Tensor& load) {
  const int64_t rows = x.shape.rank == 0 ? 0 : x.rows();
  const int64_t k = rows > 0 ? ids.row_elements() : 0, ranks = static_cast<int64_t>(rows_per_rank.size());
  auto fail = [](const std::string& what) { throw std::invalid_argument("moe_dispatch_pack: " + what); };
  if (ids.dtype != DType::kI32 || w.dtype != DType::kF32 || owner.dtype != DType::kI32 || local.dtype != DType::kI32 ||
      send.ids.dtype != DType::kI32 || send.weights.dtype != DType::kF32 || send.slots.dtype != DType::kI32 ||
      send.x.dtype != x.dtype)
    fail("dtypes (ids, owner, local, slots I32; weights F32; send.x as x)");
  if (ranks <= 0) fail("no ranks");
  if (rows > 0 && (ids.rows() != rows || w.rows() != rows || w.row_elements() != k)) fail("ids / weights do not match x");
  if (owner.elements() != local.elements()) fail("owner and local maps differ in length");
  if (send.capacity > 0 && rows > send.capacity)
    fail(std::to_string(rows) + " rows exceed the capacity of " + std::to_string(send.capacity));
  if (send.capacity > 0 && (send.ids.rows() < ranks * send.capacity || send.weights.rows() < ranks * send.capacity))
    fail("send ids and weights need ranks * capacity rows");
  if (rows == 0) return;
  if (send.slots.rows() < rows || send.slots.row_elements() != ranks) fail("slots must be [rows, ranks]");
  const int64_t most = send.capacity > 0 ? ranks * send.capacity : rows * std::min<int64_t>(ranks, k);
  if ((send.x.rows() < most || send.x.row_elements() != x.row_elements() || send.ids.rows() < most ||
                   send.weights.rows() < most || send.ids.row_elements() != k || send.weights.row_elements() != k))
    fail("send buffers need room for " + std::to_string(most) + " rows");
  if (load.data && (load.dtype != DType::kI32 || load.elements() != owner.elements()))
    fail("expert_load must be I32 [experts]");
}

}  // namespace

void Backend::moe_dispatch_pack(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                                const Tensor& expert_owner, const Tensor& expert_local, const MoeSendBuffers& send,
                                std::span<int64_t> rows_per_rank, const Tensor& expert_load) {
  check_moe_pack_args(x, expert_ids, expert_weights, expert_owner, expert_local, send, rows_per_rank, expert_load);
  const int64_t rows = x.shape.rank == 0 ? 0 : x.rows();
  std::fill(rows_per_rank.begin(), rows_per_rank.end(), int64_t{0});
  if (rows == 0) {
    if (send.capacity > 0) {  // every row is padding
      const std::vector<int32_t> none(static_cast<size_t>(send.ids.elements()), -1);
      const std::vector<float> zero(none.size(), 0.0f);
      upload(none.data(), send.ids);
      upload(zero.data(), send.weights);
    }
    return;
  }
  const int k = static_cast<int>(expert_ids.row_elements()), ranks = static_cast<int>(rows_per_rank.size());
  const int experts = static_cast<int>(expert_owner.elements());
  std::vector<int32_t> ids(static_cast<size_t>(rows * k)), owner(static_cast<size_t>(experts)),
      local(static_cast<size_t>(experts)), slots(static_cast<size_t>(rows * ranks)), load;
  std::vector<float> w(ids.size());
  download(expert_ids.slice_rows(0, rows), ids.data());
  download(expert_weights.slice_rows(0, rows), w.data());
  download(expert_owner, owner.data());
  download(expert_local, local.data());
  if (expert_load.data) {
    load.resize(static_cast<size_t>(experts));
    download(expert_load, load.data());
  }
  const int64_t most = send.capacity > 0 ? ranks * send.capacity : rows * std::min(ranks, k);
  std::vector<int32_t> send_ids(static_cast<size_t>(most * k));
  std::vector<float> send_w(send_ids.size());
  moe_pack::plan(ids.data(), w.data(), rows, k, owner.data(), local.data(), experts, ranks, slots.data(),
                 send_ids.data(), send_w.data(), rows_per_rank.data(), load.empty() ? nullptr : load.data(),
                 send.capacity);
  int64_t sent = 0;
  for (int64_t c : rows_per_rank) sent += c;
  if (send.capacity > 0) sent = most;  // the padding rows' ids and weights too (their x rows are never read)
  const size_t row_bytes = static_cast<size_t>(x.row_elements()) * dtype_size(x.dtype);
  std::vector<uint8_t> hx(static_cast<size_t>(rows) * row_bytes), sx(static_cast<size_t>(sent) * row_bytes);
  download(x.slice_rows(0, rows), hx.data());
  moe_pack::copy_rows(hx.data(), row_bytes, slots.data(), ranks, 0, rows, sx.data());
  upload(slots.data(), send.slots.slice_rows(0, rows));
  if (sent > 0) {
    upload(sx.data(), send.x.slice_rows(0, sent));
    upload(send_ids.data(), send.ids.slice_rows(0, sent));
    upload(send_w.data(), send.weights.slice_rows(0, sent));
  }
  if (!load.empty()) upload(load.data(), expert_load);
}

void Backend::count_expert_load(const Tensor& expert_ids, const Tensor& load) {
  if (expert_ids.dtype != DType::kI32 || load.dtype != DType::kI32)
    throw std::invalid_argument("count_expert_load: ids and load must be I32");
  if (expert_ids.shape.rank == 0 || expert_ids.elements() == 0) return;
  std::vector<int32_t> ids(static_cast<size_t>(expert_ids.elements())), counts(static_cast<size_t>(load.elements()));
  download(expert_ids, ids.data());
  download(load, counts.data());
  for (const int32_t e : ids)
    if (e >= 0 && e < static_cast<int32_t>(counts.size())) ++counts[static_cast<size_t>(e)];
  upload(counts.data(), load);
}

void Backend::moe_combine(const Tensor& back, const Tensor& slots, const Tensor& out) {
  const int64_t rows = out.shape.rank == 0 ? 0 : out.rows();
  if (rows == 0) return;
  const int ranks = static_cast<int>(slots.row_elements());
  const int64_t hidden = out.row_elements();
  if (slots.dtype != DType::kI32 || slots.rows() < rows || back.dtype != out.dtype ||
      (back.rows() > 0 && back.row_elements() != hidden))
    throw std::invalid_argument("moe_combine: slots must be I32 [rows, ranks], back and out of one dtype and width");
  std::vector<int32_t> hs(static_cast<size_t>(rows * ranks));
  download(slots.slice_rows(0, rows), hs.data());
  int64_t sent = 0;
  for (int32_t s : hs) sent = std::max<int64_t>(sent, s + 1);
  if (sent > back.rows()) throw std::invalid_argument("moe_combine: a slot lies past the rows of back");
  const size_t row_bytes = static_cast<size_t>(hidden) * dtype_size(out.dtype);
  std::vector<uint8_t> hb(static_cast<size_t>(sent) * row_bytes), ho(static_cast<size_t>(rows) * row_bytes);
  if (sent > 0) download(back.slice_rows(0, sent), hb.data());
  std::vector<float> scratch(static_cast<size_t>(hidden));
  moe_pack::sum_rows(hb.data(), out.dtype, hidden, hs.data(), ranks, 0, rows, ho.data(), scratch.data());
  upload(ho.data(), out.slice_rows(0, rows));
}

}  // namespace arbiter
