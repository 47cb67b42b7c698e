#include "parallel/mpi_comm.h"

#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <thread>

namespace arbiter {
namespace {

// Process-wide MPI lifetime: initialized by the first MpiComm, finalized with the last one.
std::mutex g_mu;
int g_live = 0;
bool g_we_initialized = false;

std::string mpi_error(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return std::string(text, static_cast<size_t>(len));
}

void check(int code, const char* what) {
  if (code != MPI_SUCCESS) throw CommError(std::string("MpiComm: ") + what + ": " + mpi_error(code));
}

// Largest single message; larger ones are split (MPI counts are int).
constexpr size_t kChunk = size_t{1} << 30;
constexpr int kTag = 4242;

}  // namespace

struct MpiComm::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  std::vector<MPI_Request> requests;

  // Polls until every request completed, or throws CommError at the deadline.
  void wait_all(const char* op, int rank, double timeout_s) {
    if (requests.empty()) return;
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + std::chrono::duration<double>(timeout_s);
    for (;;) {
      int done = 0;
      check(MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE), op);
      if (done) {
        requests.clear();
        return;
      }
      const auto now = std::chrono::steady_clock::now();
      if (now > deadline) {
        // The requests stay pending (collectives cannot be cancelled): the communicator is unusable.
        requests.clear();
        throw CommError("MpiComm: rank " + std::to_string(rank) + " timed out after " + std::to_string(timeout_s) +
                        " s in " + op + " (a rank died, hangs, or called a different collective)");
      }
      // Poll (yielding, so oversubscribed ranks share the cores) while a transfer is likely in flight:
      // large messages need several progress calls. Then back off for peers that are still computing.
      const auto waited = now - start;
      if (waited < std::chrono::milliseconds(5)) std::this_thread::yield();
      else std::this_thread::sleep_for(std::min(waited / 50, std::chrono::steady_clock::duration(std::chrono::milliseconds(1))));
    }
  }
};

bool MpiComm::launched_by_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS"})
    if (std::getenv(v)) return true;
  return false;
}

MpiComm::MpiComm(double timeout_s) : impl_(std::make_unique<Impl>()), timeout_s_(timeout_s) {
  {
    std::lock_guard lk(g_mu);
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (finalized) throw CommError("MpiComm: MPI was already finalized in this process");
    if (!initialized) {
      int provided = 0;
      check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided), "MPI_Init_thread");
      g_we_initialized = true;
    }
    ++g_live;
  }
  try {
    check(MPI_Comm_dup(MPI_COMM_WORLD, &impl_->comm), "MPI_Comm_dup");
    // Errors come back as codes (turned into CommError) instead of aborting inside MPI.
    check(MPI_Comm_set_errhandler(impl_->comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(impl_->comm, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(impl_->comm, &size_), "MPI_Comm_size");
    if (const char* lr = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")) {
      local_rank_ = std::atoi(lr);
    } else {
      MPI_Comm node = MPI_COMM_NULL;
      check(MPI_Comm_split_type(impl_->comm, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node), "split_type");
      MPI_Comm_rank(node, &local_rank_);
      MPI_Comm_free(&node);
    }
  } catch (...) {
    if (impl_->comm != MPI_COMM_NULL) MPI_Comm_free(&impl_->comm);
    std::lock_guard lk(g_mu);
    --g_live;
    throw;
  }
}

MpiComm::~MpiComm() {
  if (impl_->comm != MPI_COMM_NULL) MPI_Comm_free(&impl_->comm);
  std::lock_guard lk(g_mu);
  if (--g_live == 0 && g_we_initialized) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
}

void MpiComm::all_to_all_v(const void* send, std::span<const size_t> send_counts, void* recv,
                           std::span<const size_t> recv_counts) {
  const Part part{send, send_counts, recv, recv_counts};
  all_to_all_v_parts({&part, 1});
}

void MpiComm::all_to_all_v_parts(std::span<const Part> parts) {
  const size_t n = static_cast<size_t>(size_);
  for (const Part& part : parts)
    if (part.send_counts.size() != n || part.recv_counts.size() != n)
      throw std::invalid_argument("all_to_all_v: one count per rank expected");
  auto& reqs = impl_->requests;
  std::vector<size_t> send_off(n), recv_off(n);
  // Every part's messages are posted before one wait (part i under its own tag); receives first
  // (so sends find them posted), then sends; our own segment is a memcpy.
  for (size_t i = 0; i < parts.size(); ++i) {
    const Part& part = parts[i];
    const int tag = kTag + static_cast<int>(i);
    size_t send_at = 0, recv_at = 0;
    for (size_t p = 0; p < n; ++p) {
      send_off[p] = send_at;
      recv_off[p] = recv_at;
      send_at += part.send_counts[p];
      recv_at += part.recv_counts[p];
    }
    auto* out = static_cast<char*>(part.recv);
    const auto* in = static_cast<const char*>(part.send);
    for (size_t p = 0; p < n; ++p) {
      if (static_cast<int>(p) == rank_) continue;
      for (size_t at = 0; at < part.recv_counts[p]; at += kChunk) {
        const int count = static_cast<int>(std::min(kChunk, part.recv_counts[p] - at));
        MPI_Request r;
        check(MPI_Irecv(out + recv_off[p] + at, count, MPI_BYTE, static_cast<int>(p), tag, impl_->comm, &r), "MPI_Irecv");
        reqs.push_back(r);
      }
    }
    for (size_t p = 0; p < n; ++p) {
      if (static_cast<int>(p) == rank_) continue;
      for (size_t at = 0; at < part.send_counts[p]; at += kChunk) {
        const int count = static_cast<int>(std::min(kChunk, part.send_counts[p] - at));
        MPI_Request r;
        check(MPI_Isend(in + send_off[p] + at, count, MPI_BYTE, static_cast<int>(p), tag, impl_->comm, &r), "MPI_Isend");
        reqs.push_back(r);
      }
    }
    const size_t self = static_cast<size_t>(rank_);
    if (part.send_counts[self] != part.recv_counts[self])
      throw std::invalid_argument("all_to_all_v: this rank's send and receive counts for itself differ");
    if (part.send_counts[self]) std::memcpy(out + recv_off[self], in + send_off[self], part.send_counts[self]);
  }
  impl_->wait_all("all_to_all_v", rank_, timeout_s_);
}

void MpiComm::all_gather(const void* send, size_t bytes, void* recv) {
  if (bytes > static_cast<size_t>(INT_MAX)) throw std::invalid_argument("all_gather: more than 2 GiB per rank");
  MPI_Request r;
  check(MPI_Iallgather(send, static_cast<int>(bytes), MPI_BYTE, recv, static_cast<int>(bytes), MPI_BYTE, impl_->comm, &r),
        "MPI_Iallgather");
  impl_->requests.push_back(r);
  impl_->wait_all("all_gather", rank_, timeout_s_);
}

void MpiComm::broadcast(void* data, size_t bytes, int root) {
  if (root < 0 || root >= size_) throw std::invalid_argument("broadcast: root outside the group");
  for (size_t at = 0; at < bytes || at == 0; at += kChunk) {
    const int count = static_cast<int>(std::min(kChunk, bytes - at));
    MPI_Request r;
    check(MPI_Ibcast(static_cast<char*>(data) + at, count, MPI_BYTE, root, impl_->comm, &r), "MPI_Ibcast");
    impl_->requests.push_back(r);
    if (bytes == 0) break;
  }
  impl_->wait_all("broadcast", rank_, timeout_s_);
}

void MpiComm::barrier() {
  MPI_Request r;
  check(MPI_Ibarrier(impl_->comm, &r), "MPI_Ibarrier");
  impl_->requests.push_back(r);
  impl_->wait_all("barrier", rank_, timeout_s_);
}

void MpiComm::abort(const std::string& reason, int code) noexcept {
  std::cerr << "arbiter: rank " << rank_ << " of " << size_ << " aborting the job: " << reason << std::endl;
  MPI_Abort(impl_->comm != MPI_COMM_NULL ? impl_->comm : MPI_COMM_WORLD, code);
}

}  // namespace arbiter
