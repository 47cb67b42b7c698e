#include "parallel/moe_dispatch.h"

#include <algorithm>
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
                                            int64_t rows, int layer) {
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
      const size_t d = static_cast<size_t>(placement_.owner(layer, e));
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
        const int32_t local = (e >= 0 && placement_.owner(layer, e) == d) ? placement_.local_index(layer, e) : -1;
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

// One buffer the dispatcher allocates up front: dtype, rows (in units of max_step_rows) and columns.
struct BufferShape {
  DType dtype;
  int64_t rows;
  int64_t cols;
  bool always = false;  // allocated whatever max_step_rows is (the expert maps)
};
// kHostStaged: x, ids, weights and y for rows from every rank. kBackendOps: the owner and local
// maps; the send side (x, ids, weights) for rows * min(ranks, k) rows and the slots [rows, ranks];
// the receive side (x, ids, weights, y) for rows from every rank. The send side also holds a
// kCapacity step's ranks * capacity rows (capacity <= max_rows and within the limit).
std::vector<BufferShape> buffer_shapes(MoeDispatcher::Path path, int ranks, int64_t max_rows, int hidden, int top_k,
                                       DType act, int experts, int map_layers, int64_t capacity_limit) {
  const int64_t recv = max_rows * ranks;
  if (path == MoeDispatcher::Path::kHostStaged)
    return {{act, recv, hidden}, {DType::kI32, recv, top_k}, {DType::kF32, recv, top_k}, {act, recv, hidden}};
  const int64_t most_capacity = std::min<int64_t>(max_rows, capacity_limit / (int64_t{ranks} * hidden));
  const int64_t send = std::max(max_rows * std::min(ranks, top_k), ranks * most_capacity);
  return {{DType::kI32, map_layers, experts, true}, {DType::kI32, map_layers, experts, true}, {act, send, hidden},
          {DType::kI32, send, top_k},   {DType::kF32, send, top_k},  {DType::kI32, max_rows, ranks},
          {act, recv, hidden},          {DType::kI32, recv, top_k},  {DType::kF32, recv, top_k},
          {act, recv, hidden}};
}

}  // namespace

MoeDispatcher::MoeDispatcher(Communicator& comm, ExpertPlacement placement, Backend& backend, int hidden, int top_k,
                             int64_t max_step_rows, Path path, int64_t capacity_limit)
    : exchange_(comm, std::move(placement), top_k, hidden, backend.activation_dtype()),
      backend_(backend),
      path_(path),
      capacity_limit_(std::max<int64_t>(capacity_limit, 0)) {
  const int n = comm.size();
  const ExpertPlacement& pl = exchange_.placement();
  const int experts = pl.num_experts();
  if (path == Path::kBackendOps) {
    const int map_layers = std::max(pl.num_layers(), 1);
    std::vector<int32_t> owner, local;
    for (int l = 0; l < map_layers; ++l)
      for (int e = 0; e < experts; ++e) {
        owner.push_back(pl.owner(l, e));
        local.push_back(pl.local_index(l, e));
      }
    backend_.upload(owner.data(), staging(owner_, DType::kI32, map_layers, experts));
    backend_.upload(local.data(), staging(local_, DType::kI32, map_layers, experts));
    sent_rows_.resize(static_cast<size_t>(n));
    send_rows_.resize(static_cast<size_t>(n));
    recv_rows_.resize(static_cast<size_t>(n));
  }
  if (max_step_rows <= 0) return;
  const auto shapes = buffer_shapes(path, n, max_step_rows, hidden, top_k, backend.activation_dtype(), experts,
                                    std::max(pl.num_layers(), 1), capacity_limit_);
  if (path == Path::kHostStaged) {
    DeviceBuffer* buffers[] = {&d_x_, &d_ids_, &d_w_, &d_y_};
    for (size_t i = 0; i < shapes.size(); ++i) staging(*buffers[i], shapes[i].dtype, shapes[i].rows, shapes[i].cols);
  } else {
    DeviceBuffer* buffers[] = {&s_x_, &s_ids_, &s_w_, &slots_, &r_x_, &r_ids_, &r_w_, &r_y_};
    for (size_t i = 2; i < shapes.size(); ++i)
      staging(*buffers[i - 2], shapes[i].dtype, shapes[i].rows, shapes[i].cols);
  }
}

size_t MoeDispatcher::reserve_bytes(int ranks, int64_t max_step_rows, int hidden, int top_k, DType act, int experts,
                                    Path path, int map_layers, int64_t capacity_limit) {
  size_t total = 0;
  for (const BufferShape& s : buffer_shapes(path, ranks, std::max<int64_t>(max_step_rows, 0), hidden, top_k, act,
                                            experts, std::max(map_layers, 1), std::max<int64_t>(capacity_limit, 0))) {
    if (max_step_rows <= 0 && !s.always) continue;  // grown on demand
    total += device_arena_bytes(static_cast<size_t>(s.rows * s.cols) * dtype_size(s.dtype));
  }
  return total;
}

Tensor MoeDispatcher::staging(DeviceBuffer& buffer, DType dtype, int64_t rows, int64_t cols) {
  const size_t need = static_cast<size_t>(rows * cols) * dtype_size(dtype);
  if (buffer.bytes() < need) buffer = backend_.allocate(std::max(need, 2 * buffer.bytes()));
  return buffer.view(dtype, {rows, cols});
}

MoeExchange::Traffic MoeDispatcher::traffic() const {
  return path_ == Path::kHostStaged ? exchange_.traffic() : traffic_;
}

double MoeDispatcher::lap() {
  if (!profiling_) return 0;
  if (!backend_.host_memory()) backend_.synchronize();
  const auto now = std::chrono::steady_clock::now();
  const double s = std::chrono::duration<double>(now - mark_).count();
  mark_ = now;
  return s;
}

void MoeDispatcher::moe(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                        const ExpertWeights& local, float swiglu_limit, const Tensor& out, int layer,
                        const Tensor& expert_load) {
  const int rank = exchange_.comm().rank();
  const ExpertPlacement& pl = exchange_.placement();
  if (layer < 0 || (pl.per_layer() && layer >= pl.num_layers()))
    throw std::out_of_range("MoeDispatcher: layer " + std::to_string(layer) + " outside the placement's layers");
  if (local.num_experts() != static_cast<int>(pl.experts_of(layer, rank).size()))
    throw std::invalid_argument("MoeDispatcher: rank " + std::to_string(rank) + " holds " +
                                std::to_string(local.num_experts()) + " experts of layer " + std::to_string(layer) +
                                " but its placement lists " + std::to_string(pl.experts_of(layer, rank).size()));
  if (step_capacity_ > 0 && x.shape.rank != 0 && x.rows() > step_capacity_)
    throw std::logic_error("MoeDispatcher: a step of " + std::to_string(x.rows()) + " rows after begin_step announced " +
                           "at most " + std::to_string(step_capacity_));
  if (profiling_) {
    lap();
    ++times_.layers;
  }
  if (path_ == Path::kHostStaged) {
    if (expert_load.data && x.shape.rank != 0 && x.rows() > 0) backend_.count_expert_load(expert_ids, expert_load);
    moe_host_staged(x, expert_ids, expert_weights, local, swiglu_limit, out, layer);
  } else {
    moe_backend_ops(x, expert_ids, expert_weights, local, swiglu_limit, out, layer, expert_load);
  }
}

void MoeDispatcher::moe_host_staged(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                                    const ExpertWeights& local, float swiglu_limit, const Tensor& out, int layer) {
  const int64_t rows = x.shape.rank == 0 ? 0 : x.rows();
  const int K = exchange_.top_k(), H = exchange_.hidden();
  const DType act = exchange_.dtype();
  const size_t row_bytes = static_cast<size_t>(H) * dtype_size(act);
  h_x_.resize(static_cast<size_t>(rows) * row_bytes);
  h_ids_.resize(static_cast<size_t>(rows * K));
  h_w_.resize(static_cast<size_t>(rows * K));
  if (rows > 0) {
    backend_.download(x, h_x_.data());
    backend_.download(expert_ids, h_ids_.data());
    backend_.download(expert_weights, h_w_.data());
  }
  const auto got = exchange_.dispatch(h_ids_.data(), h_w_.data(), h_x_.data(), rows, layer);
  h_out_.resize(static_cast<size_t>(got.rows) * row_bytes);
  if (got.rows > 0) {
    const Tensor dx = staging(d_x_, act, got.rows, H), dids = staging(d_ids_, DType::kI32, got.rows, K),
                 dw = staging(d_w_, DType::kF32, got.rows, K), dy = staging(d_y_, act, got.rows, H);
    for (const auto& seg : got.segments) backend_.upload(seg.hidden, dx.slice_rows(seg.first_row, seg.rows));
    backend_.upload(got.expert_ids, dids);
    backend_.upload(got.weights, dw);
    times_.dispatch += lap();
    backend_.moe_experts(dx, dids, dw, local, swiglu_limit, dy);
    times_.experts += lap();
    backend_.download(dy, h_out_.data());
  } else {
    times_.dispatch += lap();
  }
  h_x_.resize(static_cast<size_t>(rows) * row_bytes);
  exchange_.combine(h_out_.data(), h_x_.data());
  if (rows > 0) backend_.upload(h_x_.data(), out);
  times_.combine += lap();
}

void MoeDispatcher::exchange_tensors(std::span<const TensorPart> parts) {
  Communicator& comm = exchange_.comm();
  const size_t n = static_cast<size_t>(comm.size());
  byte_send_.resize(parts.size() * n);
  byte_recv_.resize(parts.size() * n);
  std::vector<Communicator::Part> cp(parts.size());
  const bool host = backend_.host_memory(), device = !host && comm.takes_device_buffers();
  if (!host && !device) {
    h_send_.resize(parts.size());
    h_recv_.resize(parts.size());
  }
  for (size_t i = 0; i < parts.size(); ++i) {
    const TensorPart& tp = parts[i];
    const size_t row = static_cast<size_t>(tp.send.shape[1]) * dtype_size(tp.send.dtype);  // [rows, cols]
    for (size_t d = 0; d < n; ++d) {
      byte_send_[i * n + d] = tp.send_rows[d] * row;
      byte_recv_[i * n + d] = tp.recv_rows[d] * row;
    }
    cp[i] = {tp.send.data, std::span<const size_t>(byte_send_).subspan(i * n, n), tp.recv.data,
             std::span<const size_t>(byte_recv_).subspan(i * n, n)};
    if (!host && !device) {  // a device backend over a host transport: stage through host memory
      h_send_[i].resize(tp.send.bytes());
      h_recv_[i].resize(tp.recv.bytes());
      if (tp.send.bytes()) backend_.download(tp.send, h_send_[i].data());
      cp[i].send = h_send_[i].data();
      cp[i].recv = h_recv_[i].data();
    }
  }
  if (device && step_capacity_ > 0 && comm.enqueues_device_exchanges()) {
    comm.enqueue_all_to_all_v_parts_device(cp, backend_.native_stream());  // finish_step waits
    return;
  }
  if (device) {
    comm.all_to_all_v_parts_device(cp, backend_.native_stream());
    return;
  }
  comm.all_to_all_v_parts(cp);
  if (!host)
    for (size_t i = 0; i < parts.size(); ++i)
      if (parts[i].recv.bytes()) backend_.upload(h_recv_[i].data(), parts[i].recv);
}

void MoeDispatcher::moe_backend_ops(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                                    const ExpertWeights& local, float swiglu_limit, const Tensor& out, int layer,
                                    const Tensor& expert_load) {
  Communicator& comm = exchange_.comm();
  const int n = comm.size(), K = exchange_.top_k(), H = exchange_.hidden();
  const DType act = exchange_.dtype();
  const int64_t rows = x.shape.rank == 0 ? 0 : x.rows();
  // Pack on the backend; the host learns only how many rows go to each rank (kExact), or nothing
  // (kCapacity: rank d's rows fill the first part of a slot of C rows at d * C, padding after them).
  const int64_t C = step_capacity_;
  const int64_t most = C > 0 ? n * C : rows * std::min(n, K);
  const Tensor sx = staging(s_x_, act, most, H), sids = staging(s_ids_, DType::kI32, most, K),
               sw = staging(s_w_, DType::kF32, most, K), slots = staging(slots_, DType::kI32, rows, n);
  const ExpertPlacement& pl = exchange_.placement();
  const int64_t E = pl.num_experts(), map_row = pl.per_layer() ? layer : 0;
  const Tensor owner = owner_.view(DType::kI32, {std::max(pl.num_layers(), 1), E}).slice_rows(map_row, 1).reshaped({E}),
               local_ids = local_.view(DType::kI32, {std::max(pl.num_layers(), 1), E}).slice_rows(map_row, 1).reshaped({E});
  backend_.moe_dispatch_pack(x, expert_ids, expert_weights, owner, local_ids, {sx, sids, sw, slots, C}, sent_rows_,
                             expert_load);
  times_.dispatch += lap();
  int64_t sent = 0, received = 0;
  if (C > 0) {
    std::fill(send_rows_.begin(), send_rows_.end(), static_cast<size_t>(C));
    recv_rows_ = send_rows_;
    sent = received = n * C;
  } else {
    for (int d = 0; d < n; ++d) {
      send_rows_[static_cast<size_t>(d)] = static_cast<size_t>(sent_rows_[static_cast<size_t>(d)]);
      sent += sent_rows_[static_cast<size_t>(d)];
    }
    recv_rows_ = exchange_counts(comm, send_rows_);
    times_.wait += lap();
    for (size_t c : recv_rows_) received += static_cast<int64_t>(c);
  }
  // Dispatch: rows, local ids and weights in one collective; they land contiguous in source-rank
  // order, ready for moe_experts as they are.
  const Tensor rx = staging(r_x_, act, received, H), rids = staging(r_ids_, DType::kI32, received, K),
               rw = staging(r_w_, DType::kF32, received, K), ry = staging(r_y_, act, received, H);
  // (Views of the first rows rather than slice_rows, which cannot slice a tensor of zero rows.)
  const TensorPart dispatch[] = {{s_x_.view(act, {sent, H}), rx, send_rows_, recv_rows_},
                                 {s_ids_.view(DType::kI32, {sent, K}), rids, send_rows_, recv_rows_},
                                 {s_w_.view(DType::kF32, {sent, K}), rw, send_rows_, recv_rows_}};
  exchange_tensors(dispatch);
  if (C > 0) ++step_layers_;  // (finish_step counts the traffic: a replayed step runs no host code)
  else add_traffic(send_rows_, recv_rows_, rows, 1);
  times_.dispatch += lap();
  if (received > 0) backend_.moe_experts(rx, rids, rw, local, swiglu_limit, ry);
  times_.experts += lap();
  // Combine: each result row goes back to where its token came from, into the send rows (free
  // again), and the backend sums each token's rows into out.
  const Tensor back = s_x_.view(act, {sent, H});
  const TensorPart combine[] = {{ry, back, recv_rows_, send_rows_}};
  exchange_tensors(combine);
  if (rows > 0) backend_.moe_combine(back, slots, out);
  times_.combine += lap();
}

void MoeDispatcher::add_traffic(std::span<const size_t> sent_rows, std::span<const size_t> received_rows, int64_t rows,
                                uint64_t layers) {
  const int n = exchange_.comm().size(), me = exchange_.comm().rank(), K = exchange_.top_k();
  const uint64_t row_bytes = static_cast<uint64_t>(exchange_.hidden()) * dtype_size(exchange_.dtype());
  const uint64_t record = row_bytes + static_cast<uint64_t>(K) * (sizeof(int32_t) + sizeof(float));
  for (int d = 0; d < n; ++d) {
    const uint64_t there = sent_rows[static_cast<size_t>(d)] * record + received_rows[static_cast<size_t>(d)] * row_bytes;
    (d == me ? traffic_.to_self : traffic_.to_peers) += there * layers;
  }
  traffic_.all_gather_design += 2ull * static_cast<uint64_t>(rows) * row_bytes * static_cast<uint64_t>(n - 1) * layers;
}

bool MoeDispatcher::begin_step(bool has_step, int64_t rows) {
  if (rows < 0 || (!has_step && rows > 0)) throw std::invalid_argument("MoeDispatcher::begin_step: bad row count");
  Communicator& comm = exchange_.comm();
  const int64_t mine = has_step ? rows : -1;  // -1: no step
  std::vector<int64_t> all(static_cast<size_t>(comm.size()));
  comm.all_gather(&mine, sizeof mine, all.data());
  const int64_t most = std::max<int64_t>(*std::max_element(all.begin(), all.end()), 0);
  const bool fits = most * comm.size() * exchange_.hidden() <= capacity_limit_;
  step_capacity_ = path_ == Path::kBackendOps && most > 0 && fits ? most : 0;
  step_rows_ = rows;
  step_layers_ = 0;
  return *std::max_element(all.begin(), all.end()) >= 0;
}

bool MoeDispatcher::step_recordable() const {
  return step_capacity_ > 0 && !profiling_ &&
         (backend_.host_memory() || exchange_.comm().enqueues_device_exchanges());
}

void MoeDispatcher::finish_step() {
  if (step_capacity_ == 0) return;
  // Every layer's exchanges had ranks * capacity rows. A replayed recording ran none of moe()'s host
  // code: it did what the step it was recorded on did.
  const uint64_t layers = step_layers_ > 0 ? step_layers_ : recorded_layers_;
  recorded_layers_ = layers;
  step_layers_ = 0;
  const std::vector<size_t> slots(static_cast<size_t>(exchange_.comm().size()), static_cast<size_t>(step_capacity_));
  add_traffic(slots, slots, step_rows_, layers);
  if (!backend_.host_memory() && exchange_.comm().enqueues_device_exchanges())
    exchange_.comm().wait_device_exchanges(backend_.native_stream());
}

}  // namespace arbiter
