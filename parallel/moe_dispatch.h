// Expert-parallel MoE (DESIGN.md §3): each rank routes its tokens, sends every token's hidden row
// once to each rank that owns at least one of its top-k experts (dispatch, all-to-all-v), the owners
// run their experts on what they received, and the weighted partial sums come back (combine,
// all-to-all-v) to be added up per token. Ranks with no tokens still take part.
//
// MoeExchange is the host-side part (plan, pack, exchange, sum) and needs no backend: the
// benchmark drives it directly. MoeDispatcher wraps it around a Backend for the model.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <vector>

#include "kernels/backend.h"
#include "parallel/communicator.h"
#include "parallel/expert_placement.h"

namespace arbiter {

class MoeExchange {
 public:
  // `dtype`: activation rows are F32 or BF16, `hidden` elements each.
  MoeExchange(Communicator& comm, ExpertPlacement placement, int top_k, int hidden, DType dtype);

  // Rows received from one source rank: contiguous [rows, hidden], rows [first_row, first_row + rows)
  // of the received order.
  struct Segment {
    const void* hidden = nullptr;
    int64_t first_row = 0;
    int64_t rows = 0;
  };
  struct Received {
    int64_t rows = 0;
    std::span<const Segment> segments;    // one per source rank that sent rows, in rank order
    const int32_t* expert_ids = nullptr;  // [rows, top_k]: this rank's local expert ids, -1 elsewhere
    const float* weights = nullptr;       // [rows, top_k]: router weights (of all k experts)
    // Copies every received row into dst [rows, hidden] (`row_bytes` each).
    void gather_hidden(void* dst, size_t row_bytes) const;
  };
  // Collective. expert_ids/weights [rows, top_k] (global ids from router_topk; negative ids are
  // skipped), hidden [rows, hidden], routed by the placement of MoE layer `layer`. The result stays
  // valid until the next dispatch.
  Received dispatch(const int32_t* expert_ids, const float* weights, const void* hidden, int64_t rows, int layer = 0);
  // Collective. expert_out [received rows, hidden]: for each received row, in Received order, the
  // weighted sum of this rank's experts. Writes out [rows, hidden] of the last dispatch: per token,
  // the sum over the ranks it went to (a token no rank took gets zeros).
  void combine(const void* expert_out, void* out);

  // Bytes this rank sent, summed over every dispatch/combine so far.
  struct Traffic {
    uint64_t to_peers = 0;        // dispatch + combine payload to other ranks (counts exchange excluded)
    uint64_t to_self = 0;         // the part addressed to this rank itself (a local copy)
    uint64_t all_gather_design = 0;  // what replicating every token on every other rank would send:
                                     // hidden rows to each peer and a result row back from each
  };
  const Traffic& traffic() const { return traffic_; }
  void reset_traffic() { traffic_ = {}; }

  Communicator& comm() { return comm_; }
  const Communicator& comm() const { return comm_; }
  const ExpertPlacement& placement() const { return placement_; }
  int top_k() const { return top_k_; }
  int hidden() const { return hidden_; }
  DType dtype() const { return dtype_; }

 private:
  Communicator& comm_;
  ExpertPlacement placement_;
  int top_k_, hidden_;
  DType dtype_;
  size_t row_bytes_, record_bytes_;
  int64_t rows_ = 0;
  std::vector<std::vector<int32_t>> dest_rows_;  // per destination rank: tokens sent there, in order
  std::vector<int32_t> mark_;
  std::vector<size_t> send_counts_, recv_counts_, back_send_, back_recv_;
  std::vector<int64_t> recv_rows_from_;
  std::vector<uint8_t> send_buf_, recv_buf_, back_buf_;
  std::vector<Segment> segments_;
  std::vector<int32_t> ids_recv_;
  std::vector<float> w_recv_, acc_;
  Traffic traffic_;
};

// Where a rank's MoE time went (MoeDispatcher::set_profiling), seconds summed over layers and steps.
struct MoePhaseTimes {
  double dispatch = 0;  // packing, the dispatch exchange (rows out) and, on staged paths, its copies
  double experts = 0;   // this rank's experts on the rows it received
  double combine = 0;   // the results' exchange back and the per-token sums
  double wait = 0;      // the row-count exchange and the step handshake: mostly waiting for the slowest peer
  uint64_t layers = 0;  // moe() calls timed
};

class MoeDispatcher {
 public:
  // How a layer's rows travel.
  //  kBackendOps: the backend packs (Backend::moe_dispatch_pack) and sums (Backend::moe_combine)
  //    where its data lives; the communicator exchanges the backend's buffers directly when it can
  //    (host memory with any transport, device memory with NCCL), else through host copies. The host
  //    sees only the rows per destination rank.
  //  kHostStaged: the earlier path, kept for comparison: download router ids, weights and rows,
  //    MoeExchange on the host, upload the received rows and later the sums.
  enum class Path { kBackendOps, kHostStaged };

  // How a step's exchanges are sized; begin_step picks one per step, the same on every rank.
  //  kExact: each layer exchanges the row counts first (a host synchronization), then exactly the
  //    rows each rank sends. Any step size.
  //  kCapacity: no count exchange. Every rank sends every peer a fixed slot of `capacity` rows, the
  //    most rows any rank has in the step (a token reaches a rank at most once, so a slot never
  //    overflows); the rows a rank does not fill are padding with expert ids -1, which the receiver's
  //    experts skip and no sum reads, so on the CPU the results are exact mode's bits (a GPU kernel
  //    that picks its product path by row count may round differently). Every exchange size is
  //    known before the step and nothing in a layer waits on the host, so a device step can be
  //    recorded (a CUDA graph) when the transport enqueues on the stream (NCCL).
  // The rule: kCapacity when capacity * ranks * hidden <= capacity_limit (decode-sized steps) on the
  // kBackendOps path; kExact otherwise (prefill, large steps, kHostStaged).
  enum class Exchange { kExact, kCapacity };
  // capacity * ranks * hidden elements: 2M (4 MiB of bf16 rows per rank and exchange).
  static constexpr int64_t kDefaultCapacityLimit = int64_t{1} << 21;

  // `comm` must outlive the dispatcher. max_step_rows > 0: the most rows any rank's step has; the
  // buffers are then allocated here for the most rows this rank can send and receive, so that steps
  // allocate nothing. 0: they grow on demand. capacity_limit: the bound of the kCapacity rule (0:
  // always kExact).
  MoeDispatcher(Communicator& comm, ExpertPlacement placement, Backend& backend, int hidden, int top_k,
                int64_t max_step_rows = 0, Path path = Path::kBackendOps,
                int64_t capacity_limit = kDefaultCapacityLimit);
  // The bytes the constructor allocates for these arguments (rounded as arena allocations), for
  // Backend::reserve.
  // map_layers: the rows of the expert maps (the placement's layers, or 1 when it is the same for every layer).
  static size_t reserve_bytes(int ranks, int64_t max_step_rows, int hidden, int top_k, DType activation_dtype,
                              int experts, Path path = Path::kBackendOps, int map_layers = 1,
                              int64_t capacity_limit = kDefaultCapacityLimit);

  // Collective; the expert-parallel form of backend.moe_experts(x, ids, weights, experts, ...) for
  // MoE layer `layer`: x [rows, hidden], expert_ids/weights [rows, top_k] from router_topk (global
  // expert ids), `local` this rank's experts of that layer (placement.experts_of(layer, rank)), out
  // [rows, hidden]. rows may be 0. expert_load (I32 [experts], optional): += the tokens this rank
  // routed to each expert.
  void moe(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights, const ExpertWeights& local,
           float swiglu_limit, const Tensor& out, int layer = 0, const Tensor& expert_load = Tensor{});

  // Collective handshake at the start of every step: returns whether any rank runs a step
  // (has_step on at least one rank). Ranks whose steps are done keep calling begin_step(false, 0) and
  // run a zero-token step while it returns true. `rows`: the rows of this rank's step (at most that
  // many in each moe() until the next begin_step); every rank's rows choose the step's Exchange.
  // moe() calls outside a begin_step use kExact.
  bool begin_step(bool has_step, int64_t rows);
  Exchange step_exchange() const { return step_capacity_ > 0 ? Exchange::kCapacity : Exchange::kExact; }
  // kCapacity: the rows per peer of this step's exchanges; 0 under kExact.
  int64_t step_capacity() const { return step_capacity_; }
  // Whether this step's moe() calls may be recorded with the rest of the step (Backend::run_step):
  // kCapacity, profiling off, and the exchanges either on host memory or enqueued on the device
  // stream with no host wait (Communicator::enqueues_device_exchanges).
  bool step_recordable() const;
  // Collective, after a step's last moe(): under kCapacity, counts the step's traffic (also for a
  // replayed recording, which runs no host code) and waits (against the timeout) for the device
  // exchanges enqueued without a wait; a peer that died inside the step gives CommError here.
  void finish_step();

  // Phase timers (steady_clock around each phase; on a device backend each phase is synchronized
  // first, so profiling slows it). Off by default: no clock is read.
  void set_profiling(bool on) { profiling_ = on; }
  bool profiling() const { return profiling_; }
  const MoePhaseTimes& phase_times() const { return times_; }
  void reset_phase_times() { times_ = {}; }
  // Adds to the wait phase (the model's step handshake, timed by the caller).
  void add_wait(double seconds) { times_.wait += seconds; }

  Path path() const { return path_; }
  // Bytes this rank sent so far (either path; the same numbers for the same routing).
  MoeExchange::Traffic traffic() const;
  MoeExchange& exchange() { return exchange_; }

 private:
  Tensor staging(DeviceBuffer& buffer, DType dtype, int64_t rows, int64_t cols);
  void moe_host_staged(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                       const ExpertWeights& local, float swiglu_limit, const Tensor& out, int layer);
  void moe_backend_ops(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights,
                       const ExpertWeights& local, float swiglu_limit, const Tensor& out, int layer,
                       const Tensor& expert_load);
  // Profiling: the seconds since the last mark (the backend synchronized first), or 0 when off.
  double lap();
  // One collective exchange of backend tensors: part i sends send[i] (rows grouped by destination,
  // send_rows[i][d] rows of send[i].row bytes to rank d) into recv[i] likewise.
  struct TensorPart {
    Tensor send, recv;
    std::span<const size_t> send_rows, recv_rows;
  };
  void exchange_tensors(std::span<const TensorPart> parts);
  // Adds `layers` layers' bytes: sent_rows / received_rows per rank (records out, result rows back)
  // and the all-gather design's bytes for `rows` tokens.
  void add_traffic(std::span<const size_t> sent_rows, std::span<const size_t> received_rows, int64_t rows,
                   uint64_t layers);

  MoeExchange exchange_;
  Backend& backend_;
  Path path_;
  int64_t capacity_limit_;
  int64_t step_capacity_ = 0;   // begin_step's choice: > 0 for kCapacity
  int64_t step_rows_ = 0;        // this rank's rows announced in begin_step
  uint64_t step_layers_ = 0;     // kCapacity: moe() calls since begin_step (their traffic: finish_step)
  uint64_t recorded_layers_ = 0;  // the last step's: what a replayed step (no host code) did
  // kHostStaged
  std::vector<uint8_t> h_x_, h_out_;
  std::vector<int32_t> h_ids_;
  std::vector<float> h_w_;
  DeviceBuffer d_x_, d_ids_, d_w_, d_y_;
  bool profiling_ = false;
  MoePhaseTimes times_;
  std::chrono::steady_clock::time_point mark_;
  // kBackendOps: expert -> owner rank and local index (I32 [map layers, experts]: one row per layer
  // of a per-layer placement, else one); send side (x, ids, weights,
  // slots; x also takes the results back in the combine); receive side (x, ids, weights, expert output).
  DeviceBuffer owner_, local_;
  DeviceBuffer s_x_, s_ids_, s_w_, slots_;
  DeviceBuffer r_x_, r_ids_, r_w_, r_y_;
  std::vector<int64_t> sent_rows_;
  std::vector<size_t> send_rows_, recv_rows_, byte_send_, byte_recv_;
  std::vector<std::vector<uint8_t>> h_send_, h_recv_;  // staging for device buffers over a host transport
  MoeExchange::Traffic traffic_;
};

}  // namespace arbiter
