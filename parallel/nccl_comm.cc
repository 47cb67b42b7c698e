#include "parallel/nccl_comm.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <numeric>
#include <thread>

namespace arbiter {
namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw CommError(std::string("NcclComm: ") + what + ": " + cudaGetErrorString(e));
}
void nccl_check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw CommError(std::string("NcclComm: ") + what + ": " + ncclGetErrorString(r));
}

// Device memory owned by RAII, grown on demand.
struct DeviceScratch {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceScratch() = default;
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  ~DeviceScratch() {
    if (ptr) cudaFree(ptr);
  }
  void* reserve(size_t need) {
    if (need > bytes) {
      if (ptr) cudaFree(ptr);
      ptr = nullptr;
      bytes = 0;
      cuda_check(cudaMalloc(&ptr, need), "cudaMalloc");
      bytes = need;
    }
    return ptr;
  }
};

}  // namespace

struct NcclComm::Impl {
  MpiComm& bootstrap;
  int rank = 0, size = 1, device = 0;
  double timeout_s;
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  DeviceScratch send, recv;
  bool broken = false;

  Impl(MpiComm& b, double t) : bootstrap(b), timeout_s(t) {}

  // Polls the stream until the queued NCCL work is done; aborts the communicator at the deadline.
  void wait(const char* op) { wait_on(stream, op); }
  void wait_on(cudaStream_t on, const char* op) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    for (;;) {
      const cudaError_t q = cudaStreamQuery(on);
      if (q == cudaSuccess) break;
      if (q != cudaErrorNotReady) cuda_check(q, op);
      ncclResult_t async = ncclSuccess;
      nccl_check(ncclCommGetAsyncError(comm, &async), "ncclCommGetAsyncError");
      if (async != ncclSuccess && async != ncclInProgress) {
        broken = true;
        ncclCommAbort(comm);
        comm = nullptr;
        throw CommError(std::string("NcclComm: ") + op + ": " + ncclGetErrorString(async));
      }
      if (std::chrono::steady_clock::now() > deadline) {
        broken = true;
        ncclCommAbort(comm);
        comm = nullptr;
        throw CommError("NcclComm: rank " + std::to_string(rank) + " timed out after " + std::to_string(timeout_s) +
                        " s in " + op + " (a rank died, hangs, or called a different collective)");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
  void usable() const {
    if (broken || !comm) throw CommError("NcclComm: communicator aborted after an earlier error");
  }
};

NcclComm::NcclComm(MpiComm& bootstrap, int device, double timeout_s)
    : impl_(std::make_unique<Impl>(bootstrap, timeout_s)) {
  Impl& m = *impl_;
  m.rank = bootstrap.rank();
  m.size = bootstrap.size();
  int count = 0;
  cuda_check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (count == 0) throw CommError("NcclComm: no GPU visible");
  m.device = device >= 0 ? device : bootstrap.local_rank() % count;
  cuda_check(cudaSetDevice(m.device), "cudaSetDevice");
  ncclUniqueId id;
  if (m.rank == 0) nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  bootstrap.broadcast(&id, sizeof id, 0);
  cuda_check(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  nccl_check(ncclCommInitRank(&m.comm, m.size, id, m.rank), "ncclCommInitRank");
}

NcclComm::~NcclComm() {
  if (impl_->comm) ncclCommDestroy(impl_->comm);
  if (impl_->stream) cudaStreamDestroy(impl_->stream);
}

int NcclComm::rank() const { return impl_->rank; }
int NcclComm::size() const { return impl_->size; }
int NcclComm::device() const { return impl_->device; }
void NcclComm::set_timeout(double seconds) { impl_->timeout_s = seconds; }
double NcclComm::timeout() const { return impl_->timeout_s; }

void NcclComm::all_to_all_v_device(const void* send, std::span<const size_t> send_counts, void* recv,
                                   std::span<const size_t> recv_counts) {
  const Part part{send, send_counts, recv, recv_counts};
  all_to_all_v_parts_device({&part, 1}, nullptr);
}

void NcclComm::all_to_all_v_parts_device(std::span<const Part> parts, void* stream) {
  enqueue_all_to_all_v_parts_device(parts, stream);
  wait_device_exchanges(stream);
}

void NcclComm::wait_device_exchanges(void* stream) {
  Impl& m = *impl_;
  m.usable();
  cuda_check(cudaSetDevice(m.device), "cudaSetDevice");
  m.wait_on(stream ? static_cast<cudaStream_t>(stream) : m.stream, "all_to_all_v");
}

// No host wait and no host-side state that depends on the data, so a stream capture (a recorded
// step) may contain it; NCCL records its grouped sends and receives into the graph.
void NcclComm::enqueue_all_to_all_v_parts_device(std::span<const Part> parts, void* stream) {
  Impl& m = *impl_;
  m.usable();
  const size_t n = static_cast<size_t>(m.size);
  for (const Part& part : parts)
    if (part.send_counts.size() != n || part.recv_counts.size() != n)
      throw std::invalid_argument("all_to_all_v: one count per rank expected");
  cuda_check(cudaSetDevice(m.device), "cudaSetDevice");
  const cudaStream_t on = stream ? static_cast<cudaStream_t>(stream) : m.stream;
  nccl_check(ncclGroupStart(), "ncclGroupStart");
  for (const Part& part : parts) {
    size_t so = 0, ro = 0;
    for (size_t p = 0; p < n; ++p) {
      if (part.send_counts[p])
        nccl_check(ncclSend(static_cast<const char*>(part.send) + so, part.send_counts[p], ncclChar, static_cast<int>(p),
                            m.comm, on),
                   "ncclSend");
      if (part.recv_counts[p])
        nccl_check(ncclRecv(static_cast<char*>(part.recv) + ro, part.recv_counts[p], ncclChar, static_cast<int>(p), m.comm,
                            on),
                   "ncclRecv");
      so += part.send_counts[p];
      ro += part.recv_counts[p];
    }
  }
  nccl_check(ncclGroupEnd(), "ncclGroupEnd");
}

void NcclComm::all_to_all_v(const void* send, std::span<const size_t> send_counts, void* recv,
                            std::span<const size_t> recv_counts) {
  Impl& m = *impl_;
  const size_t st = std::accumulate(send_counts.begin(), send_counts.end(), size_t{0});
  const size_t rt = std::accumulate(recv_counts.begin(), recv_counts.end(), size_t{0});
  void* ds = m.send.reserve(std::max<size_t>(st, 1));
  void* dr = m.recv.reserve(std::max<size_t>(rt, 1));
  if (st) cuda_check(cudaMemcpyAsync(ds, send, st, cudaMemcpyHostToDevice, m.stream), "cudaMemcpyAsync");
  all_to_all_v_device(ds, send_counts, dr, recv_counts);
  if (rt) cuda_check(cudaMemcpyAsync(recv, dr, rt, cudaMemcpyDeviceToHost, m.stream), "cudaMemcpyAsync");
  m.wait("all_to_all_v (copy back)");
}

void NcclComm::all_gather(const void* send, size_t bytes, void* recv) {
  Impl& m = *impl_;
  m.usable();
  cuda_check(cudaSetDevice(m.device), "cudaSetDevice");
  void* ds = m.send.reserve(std::max<size_t>(bytes, 1));
  void* dr = m.recv.reserve(std::max<size_t>(bytes * static_cast<size_t>(m.size), 1));
  if (bytes) cuda_check(cudaMemcpyAsync(ds, send, bytes, cudaMemcpyHostToDevice, m.stream), "cudaMemcpyAsync");
  nccl_check(ncclAllGather(ds, dr, bytes, ncclChar, m.comm, m.stream), "ncclAllGather");
  if (bytes)
    cuda_check(cudaMemcpyAsync(recv, dr, bytes * static_cast<size_t>(m.size), cudaMemcpyDeviceToHost, m.stream),
               "cudaMemcpyAsync");
  m.wait("all_gather");
}

void NcclComm::broadcast(void* data, size_t bytes, int root) {
  Impl& m = *impl_;
  m.usable();
  if (root < 0 || root >= m.size) throw std::invalid_argument("broadcast: root outside the group");
  cuda_check(cudaSetDevice(m.device), "cudaSetDevice");
  void* d = m.send.reserve(std::max<size_t>(bytes, 1));
  if (bytes && m.rank == root)
    cuda_check(cudaMemcpyAsync(d, data, bytes, cudaMemcpyHostToDevice, m.stream), "cudaMemcpyAsync");
  nccl_check(ncclBroadcast(d, d, bytes, ncclChar, root, m.comm, m.stream), "ncclBroadcast");
  if (bytes && m.rank != root)
    cuda_check(cudaMemcpyAsync(data, d, bytes, cudaMemcpyDeviceToHost, m.stream), "cudaMemcpyAsync");
  m.wait("broadcast");
}

void NcclComm::barrier() {
  int32_t one = 1;
  std::vector<int32_t> all(static_cast<size_t>(impl_->size));
  all_gather(&one, sizeof one, all.data());
}

void NcclComm::abort(const std::string& reason, int code) noexcept {
  if (impl_->comm) {
    ncclCommAbort(impl_->comm);
    impl_->comm = nullptr;
  }
  impl_->broken = true;
  impl_->bootstrap.abort(reason, code);
}

}  // namespace arbiter
