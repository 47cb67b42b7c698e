// Communicator: the one interface the expert-parallel code uses to talk to the other ranks
// (DESIGN.md §3). ThreadComm (ranks are threads of one process), MpiComm (processes under mpirun)
// and NcclComm (one GPU per process) implement it, so model code never knows which it has.
//
// Every operation is collective: all ranks call the same operations in the same order. Buffers are
// host memory (except all_to_all_v_parts_device's). A collective that cannot finish within the timeout (a peer died, hangs, or called a
// different collective) throws CommError instead of hanging; after a CommError the communicator is
// unusable and the job should end (abort()).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace arbiter {

class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Seconds a collective waits for its peers: $ARBITER_COMM_TIMEOUT if set, else 300.
double default_comm_timeout();

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "threads", "mpi", "nccl"

  // All-to-all with per-peer byte counts. `send` holds size() consecutive segments, segment p
  // (send_counts[p] bytes) going to rank p; the segment from rank p lands in `recv` at offset
  // recv_counts[0] + ... + recv_counts[p-1]. recv_counts[p] must equal rank p's send_counts[rank()].
  // Zero counts are fine (null buffers too when all counts are zero).
  virtual void all_to_all_v(const void* send, std::span<const size_t> send_counts, void* recv,
                            std::span<const size_t> recv_counts) = 0;
  // Several all-to-all-v exchanges as one collective: each part is an all_to_all_v of its own
  // buffers and counts (every rank passes the same number of parts). Transports do all parts in one
  // round (one synchronization); the default calls all_to_all_v once per part.
  struct Part {
    const void* send = nullptr;
    std::span<const size_t> send_counts;
    void* recv = nullptr;
    std::span<const size_t> recv_counts;
  };
  virtual void all_to_all_v_parts(std::span<const Part> parts);
  // Whether all_to_all_v_parts_device takes device buffers (NCCL): then a device backend's buffers
  // are exchanged where they are, with no host copies. Default: false (host buffers only).
  virtual bool takes_device_buffers() const { return false; }
  // all_to_all_v_parts on device buffers, enqueued on `stream` (the backend's native stream, or
  // nullptr for the transport's own) and waited for against the timeout. Default: throws.
  virtual void all_to_all_v_parts_device(std::span<const Part> parts, void* stream);
  // Whether enqueue_all_to_all_v_parts_device is available: a device exchange enqueued on the stream
  // with no host wait, so that a recorded step (a CUDA graph) may contain it. NCCL: true.
  virtual bool enqueues_device_exchanges() const { return false; }
  // all_to_all_v_parts_device without its wait: returns once the exchange is enqueued on `stream`.
  // Every rank must wait_device_exchanges(stream) before the host reads anything the exchange or the
  // operations after it wrote. Default: throws.
  virtual void enqueue_all_to_all_v_parts_device(std::span<const Part> parts, void* stream);
  // Waits, against the timeout, until everything enqueued on `stream` has finished; a peer that died
  // mid-exchange gives CommError here. Default: nothing was enqueued, returns at once.
  virtual void wait_device_exchanges(void* stream) { (void)stream; }
  // Every rank contributes `bytes` bytes; `recv` (size() * bytes) gets rank p's at p * bytes.
  virtual void all_gather(const void* send, size_t bytes, void* recv) = 0;
  // Copies `bytes` bytes of `data` on `root` into `data` on every rank.
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // Makes every rank fail fast: pending and later collectives of the other ranks throw (threads),
  // or the whole job ends with `code` (MPI, NCCL). Safe to call from an error handler.
  virtual void abort(const std::string& reason, int code = 1) noexcept = 0;
  virtual void set_timeout(double seconds) = 0;
  virtual double timeout() const = 0;
};

// All-to-all of one count per peer: returns what every peer has for this rank.
std::vector<size_t> exchange_counts(Communicator& comm, std::span<const size_t> send_counts);

// 64-bit FNV-1a, chainable through `seed`: the fingerprint hash of config and weight files.
uint64_t fnv1a64(const void* data, size_t bytes, uint64_t seed = 0xcbf29ce484222325ull);
inline uint64_t fnv1a64(const std::string& s, uint64_t seed = 0xcbf29ce484222325ull) {
  return fnv1a64(s.data(), s.size(), seed);
}

// Collective: throws std::runtime_error on every rank when the ranks' fingerprints differ, naming the
// ranks that disagree with rank 0 and `what` was fingerprinted.
void check_same_fingerprint(Communicator& comm, uint64_t fingerprint, const std::string& what);

}  // namespace arbiter
