#include "parallel/moe_dispatch.h"

#include <array>
#include <cstring>
#include <numeric>
#include <stdexcept>

#include "kernels/device_arena.h"

namespace arbiter {

MoeExchange::MoeExchange(Communicator& comm, ExpertPlacement placement, int top_k, int hidden, DType dtype)
    : comm_(comm), placement_(std::move(placement)), top_k_(top_k), hidden_(hidden), dtype_(dtype) {
  if (dtype != DType::kF32 && dtype != DType::kBF16)
    throw std::invalid_argument("MoeExchange: activations must be F32 or BF16");
  if (top_k <= 0 || hidden <= 0) throw std::invalid_argument("MoeExchange: top_k and hidden must be positive");
  if (placement_.num_ranks() != comm.size())
    throw std::invalid_argument("MoeExchange: placement is for " + std::to_string(placement_.num_ranks()) +
                                " ranks, communicator has " + std::to_string(comm.size()));
  row_bytes_ = static_cast<size_t>(hidden) * dtype_size(dtype);
  record_bytes_ = row_bytes_ + static_cast<size_t>(top_k) * (sizeof(int32_t) + sizeof(float));
  const size_t n = static_cast<size_t>(comm.size());
  dest_rows_.resize(n);
  mark_.resize(n);
  send_counts_.resize(n);
  back_send_.resize(n);
  back_recv_.resize(n);
  recv_rows_from_.resize(n);
}

MoeExchange::Received MoeExchange::dispatch(const int32_t* ids, const float* weights, const void* hidden,
                                            int64_t rows) {
  const int n = comm_.size(), me = comm_.rank(), K = top_k_;
  const int E = placement_.num_experts();
  rows_ = rows;
  // Plan: the ranks each token goes to, each at most once.
  for (auto& d : dest_rows_) d.clear();
  std::fill(mark_.begin(), mark_.end(), -1);
  for (int64_t t = 0; t < rows; ++t)
    for (int j = 0; j < K; ++j) {
      const int32_t e = ids[t * K + j];
      if (e < 0) continue;
      if (e >= E) throw std::out_of_range("MoeExchange: expert id " + std::to_string(e) + " outside the placement");
      const size_t d = static_cast<size_t>(placement_.owner(e));
      if (mark_[d] != t) {
        mark_[d] = static_cast<int32_t>(t);
        dest_rows_[d].push_back(static_cast<int32_t>(t));
      }
    }
  // Pack per destination: its tokens' hidden rows, then their local expert ids (-1: not there),
  // then their router weights, so the receiver gets each source's rows contiguous.
  size_t total = 0;
  for (int d = 0; d < n; ++d) {
    send_counts_[static_cast<size_t>(d)] = dest_rows_[static_cast<size_t>(d)].size() * record_bytes_;
    total += send_counts_[static_cast<size_t>(d)];
  }
  send_buf_.resize(total);
  uint8_t* p = send_buf_.data();
  const auto* src = static_cast<const uint8_t*>(hidden);
  const size_t meta = sizeof(int32_t) * static_cast<size_t>(K);
  for (int d = 0; d < n; ++d) {
    const auto& list = dest_rows_[static_cast<size_t>(d)];
    uint8_t* ids_out = p + list.size() * row_bytes_;
    uint8_t* w_out = ids_out + list.size() * meta;
    for (int32_t t : list) {
      std::memcpy(p, src + static_cast<size_t>(t) * row_bytes_, row_bytes_);
      p += row_bytes_;
      for (int j = 0; j < K; ++j) {
        const int32_t e = ids[t * K + j];
        const int32_t local = (e >= 0 && placement_.owner(e) == d) ? placement_.local_index(e) : -1;
        std::memcpy(ids_out, &local, sizeof local);
        ids_out += sizeof local;
      }
      std::memcpy(w_out, weights + static_cast<int64_t>(t) * K, meta);
      w_out += meta;
    }
    p = w_out;
  }
  recv_counts_ = exchange_counts(comm_, send_counts_);
  const size_t recv_total = std::accumulate(recv_counts_.begin(), recv_counts_.end(), size_t{0});
  recv_buf_.resize(recv_total);
  comm_.all_to_all_v(send_buf_.data(), send_counts_, recv_buf_.data(), recv_counts_);
  for (int d = 0; d < n; ++d) {
    const uint64_t bytes = send_counts_[static_cast<size_t>(d)];
    (d == me ? traffic_.to_self : traffic_.to_peers) += bytes;
  }
  traffic_.all_gather_design += 2ull * static_cast<uint64_t>(rows) * row_bytes_ * static_cast<uint64_t>(n - 1);
  // The hidden rows stay where they arrived (one contiguous segment per source); the small
  // per-row ids and weights are gathered into contiguous arrays.
  int64_t received = 0;
  for (int s = 0; s < n; ++s) {
    const size_t c = recv_counts_[static_cast<size_t>(s)];
    if (c % record_bytes_) throw CommError("MoeExchange: rank " + std::to_string(s) + " sent a partial record");
    recv_rows_from_[static_cast<size_t>(s)] = static_cast<int64_t>(c / record_bytes_);
    received += static_cast<int64_t>(c / record_bytes_);
  }
  ids_recv_.resize(static_cast<size_t>(received * K));
  w_recv_.resize(static_cast<size_t>(received * K));
  segments_.clear();
  const uint8_t* q = recv_buf_.data();
  int64_t row = 0;
  for (int s = 0; s < n; ++s) {
    const int64_t m = recv_rows_from_[static_cast<size_t>(s)];
    if (m == 0) continue;
    segments_.push_back({q, row, m});
    q += static_cast<size_t>(m) * row_bytes_;
    std::memcpy(ids_recv_.data() + row * K, q, static_cast<size_t>(m) * meta);
    q += static_cast<size_t>(m) * meta;
    std::memcpy(w_recv_.data() + row * K, q, static_cast<size_t>(m) * meta);
    q += static_cast<size_t>(m) * meta;
    row += m;
  }
  return {received, segments_, ids_recv_.data(), w_recv_.data()};
}

void MoeExchange::Received::gather_hidden(void* dst, size_t row_bytes) const {
  for (const Segment& s : segments)
    std::memcpy(static_cast<uint8_t*>(dst) + static_cast<size_t>(s.first_row) * row_bytes, s.hidden,
                static_cast<size_t>(s.rows) * row_bytes);
}

void MoeExchange::combine(const void* expert_out, void* out) {
  const int n = comm_.size(), me = comm_.rank();
  size_t back_total = 0;
  for (int d = 0; d < n; ++d) {
    back_send_[static_cast<size_t>(d)] = static_cast<size_t>(recv_rows_from_[static_cast<size_t>(d)]) * row_bytes_;
    back_recv_[static_cast<size_t>(d)] = dest_rows_[static_cast<size_t>(d)].size() * row_bytes_;
    back_total += back_recv_[static_cast<size_t>(d)];
    (d == me ? traffic_.to_self : traffic_.to_peers) += back_send_[static_cast<size_t>(d)];
  }
  back_buf_.resize(back_total);
  comm_.all_to_all_v(expert_out, back_send_, back_buf_.data(), back_recv_);
  if (rows_ == 0) return;
  // Sum each token's partial results in destination-rank order.
  const size_t H = static_cast<size_t>(hidden_);
  float* acc;
  if (dtype_ == DType::kF32) {
    acc = static_cast<float*>(out);
  } else {
    acc_.resize(static_cast<size_t>(rows_) * H);
    acc = acc_.data();
  }
  std::memset(acc, 0, static_cast<size_t>(rows_) * H * sizeof(float));
  const uint8_t* q = back_buf_.data();
  for (int d = 0; d < n; ++d)
    for (int32_t t : dest_rows_[static_cast<size_t>(d)]) {
      float* a = acc + static_cast<size_t>(t) * H;
      if (dtype_ == DType::kF32) {
        const auto* y = reinterpret_cast<const float*>(q);
        for (size_t c = 0; c < H; ++c) a[c] += y[c];
      } else {
        const auto* y = reinterpret_cast<const uint16_t*>(q);
        for (size_t c = 0; c < H; ++c) a[c] += bf16_to_f32(y[c]);
      }
      q += row_bytes_;
    }
  if (dtype_ == DType::kBF16) {
    auto* o = static_cast<uint16_t*>(out);
    for (size_t i = 0; i < static_cast<size_t>(rows_) * H; ++i) o[i] = f32_to_bf16(acc[i]);
  }
}

namespace {

// The four staging buffers (x, ids, weights, y) for `rows` received rows: dtype and columns.
struct StagingShape {
  DType dtype;
  int64_t cols;
};
std::array<StagingShape, 4> staging_shapes(int hidden, int top_k, DType act) {
  return {{{act, hidden}, {DType::kI32, top_k}, {DType::kF32, top_k}, {act, hidden}}};
}

}  // namespace

MoeDispatcher::MoeDispatcher(Communicator& comm, ExpertPlacement placement, Backend& backend, int hidden, int top_k,
                             int64_t max_step_rows)
    : exchange_(comm, std::move(placement), top_k, hidden, backend.activation_dtype()), backend_(backend) {
  if (max_step_rows <= 0) return;
  const int64_t rows = max_step_rows * comm.size();
  const auto shapes = staging_shapes(hidden, top_k, backend.activation_dtype());
  DeviceBuffer* buffers[] = {&d_x_, &d_ids_, &d_w_, &d_y_};
  for (size_t i = 0; i < shapes.size(); ++i) staging(*buffers[i], shapes[i].dtype, rows, shapes[i].cols);
}

size_t MoeDispatcher::reserve_bytes(int ranks, int64_t max_step_rows, int hidden, int top_k, DType act) {
  if (max_step_rows <= 0) return 0;
  size_t total = 0;
  for (const StagingShape& s : staging_shapes(hidden, top_k, act))
    total += device_arena_bytes(static_cast<size_t>(max_step_rows * ranks * s.cols) * dtype_size(s.dtype));
  return total;
}

Tensor MoeDispatcher::staging(DeviceBuffer& buffer, DType dtype, int64_t rows, int64_t cols) {
  const size_t need = static_cast<size_t>(rows * cols) * dtype_size(dtype);
  if (buffer.bytes() < need) buffer = backend_.allocate(std::max(need, 2 * buffer.bytes()));
  return buffer.view(dtype, {rows, cols});
}

void MoeDispatcher::moe(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                        const ExpertWeights& local, float swiglu_limit, const Tensor& out) {
  const int64_t rows = x.shape.rank == 0 ? 0 : x.rows();
  const int K = exchange_.top_k(), H = exchange_.hidden();
  const DType act = exchange_.dtype();
  const size_t row_bytes = static_cast<size_t>(H) * dtype_size(act);
  const int rank = exchange_.comm().rank();
  if (local.num_experts() != static_cast<int>(exchange_.placement().experts_of(rank).size()))
    throw std::invalid_argument("MoeDispatcher: rank " + std::to_string(rank) + " holds " +
                                std::to_string(local.num_experts()) + " experts but its placement lists " +
                                std::to_string(exchange_.placement().experts_of(rank).size()));
  h_x_.resize(static_cast<size_t>(rows) * row_bytes);
  h_ids_.resize(static_cast<size_t>(rows * K));
  h_w_.resize(static_cast<size_t>(rows * K));
  if (rows > 0) {
    backend_.download(x, h_x_.data());
    backend_.download(expert_ids, h_ids_.data());
    backend_.download(expert_weights, h_w_.data());
  }
  const auto got = exchange_.dispatch(h_ids_.data(), h_w_.data(), h_x_.data(), rows);
  h_out_.resize(static_cast<size_t>(got.rows) * row_bytes);
  if (got.rows > 0) {
    const Tensor dx = staging(d_x_, act, got.rows, H), dids = staging(d_ids_, DType::kI32, got.rows, K),
                 dw = staging(d_w_, DType::kF32, got.rows, K), dy = staging(d_y_, act, got.rows, H);
    for (const auto& seg : got.segments) backend_.upload(seg.hidden, dx.slice_rows(seg.first_row, seg.rows));
    backend_.upload(got.expert_ids, dids);
    backend_.upload(got.weights, dw);
    backend_.moe_experts(dx, dids, dw, local, swiglu_limit, dy);
    backend_.download(dy, h_out_.data());
  }
  h_x_.resize(static_cast<size_t>(rows) * row_bytes);
  exchange_.combine(h_out_.data(), h_x_.data());
  if (rows > 0) backend_.upload(h_x_.data(), out);
}

bool MoeDispatcher::begin_step(bool has_step) {
  Communicator& comm = exchange_.comm();
  const int32_t mine = has_step ? 1 : 0;
  std::vector<int32_t> all(static_cast<size_t>(comm.size()));
  comm.all_gather(&mine, sizeof mine, all.data());
  for (int32_t v : all)
    if (v) return true;
  return false;
}

}  // namespace arbiter
