// Heartbeats from the worker ranks to rank 0, so that rank 0 (which answers the clients) learns at
// once that a worker process died, and within a bounded time that one stalls (stopped, frozen host,
// lost network, a step that does not finish), instead of waiting in a collective until the
// communicator's timeout.
//
// Each worker keeps one TCP connection to rank 0 and sends on it, every interval, its rank and the
// number of steps it has completed; rank 0 watches all connections from one thread. The kernel closes
// a dead process's sockets, so end-of-file or a reset means the rank died (a rank that says goodbye
// first has left in order). No heartbeat for `timeout` seconds, or a worker that has not completed a
// step rank 0 started more than `step_timeout` seconds ago, means the rank stalls; a stall ends when
// the rank is heard from again and has caught up with the steps. For process ranks only (MPI, NCCL):
// thread ranks share one process and one rank has no peer.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace arbiter {

class Communicator;

struct HeartbeatOptions {
  double timeout = 3;        // seconds without a heartbeat after which a rank stalls
  double step_timeout = 30;  // seconds a worker may take to complete a step rank 0 started (0: no limit)
  double interval = 0;       // seconds between heartbeats (0: timeout / 10, within 10-200 ms)
  double effective_interval() const;
};

// What is wrong with a rank, as rank 0 sees it.
struct RankFault {
  int rank = -1;          // the rank at fault (-1: not one rank, e.g. the exchange with the ranks failed)
  bool fatal = false;     // the rank died (or the exchange broke): the job cannot serve again
  std::string message;    // for operators and clients, e.g. "rank 1 died (its heartbeat connection closed)"
};

// Rank 0: listens for the workers' heartbeats and says which rank, if any, is at fault.
class HeartbeatMonitor {
 public:
  // Listens on `listen_host` (an IPv4 address: "127.0.0.1" when every rank shares this host,
  // "0.0.0.0" otherwise) at a free port; expects ranks 1 .. world_size - 1, whose heartbeats must
  // carry `token` (others are dropped). A rank not heard from within `timeout` of construction stalls.
  HeartbeatMonitor(int world_size, uint64_t token, const HeartbeatOptions& options,
                   const std::string& listen_host = "127.0.0.1");
  ~HeartbeatMonitor();  // stops the watching thread and closes every socket
  HeartbeatMonitor(const HeartbeatMonitor&) = delete;
  HeartbeatMonitor& operator=(const HeartbeatMonitor&) = delete;

  int port() const { return port_; }
  const HeartbeatOptions& options() const { return options_; }

  // Rank 0 has sent the workers their `count`-th step (1, 2, ...): each must report it completed
  // within step_timeout. Thread-safe.
  void step_started(uint64_t count);
  // The rank at fault, nullopt while every rank is healthy: dead ranks first, then the lowest
  // stalled one. Thread-safe and cheap (evaluated against the clock on each call).
  std::optional<RankFault> fault() const;

 private:
  struct State;
  void watch();

  HeartbeatOptions options_;
  int port_ = 0;
  int listen_fd_ = -1;
  int wake_[2] = {-1, -1};  // a pipe that wakes the watching thread for shutdown
  std::unique_ptr<State> state_;
};

// A worker rank: connects to rank 0's monitor and sends a heartbeat every interval from a small
// thread; says goodbye and closes when destroyed (an orderly exit, not a death).
class HeartbeatSender {
 public:
  // Connects (waiting at most 10 s) and sends the first heartbeat; std::runtime_error when rank 0
  // cannot be reached.
  HeartbeatSender(const std::string& host, int port, int rank, uint64_t token, double interval_s);
  ~HeartbeatSender();
  HeartbeatSender(const HeartbeatSender&) = delete;
  HeartbeatSender& operator=(const HeartbeatSender&) = delete;

  // The number of steps this rank has completed (sent with the next heartbeat). Thread-safe.
  void set_completed_steps(uint64_t count);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Both ends over one communicator: rank 0 holds the monitor, every other rank a sender.
struct Heartbeat {
  std::unique_ptr<HeartbeatMonitor> monitor;
  std::unique_ptr<HeartbeatSender> sender;
};

// Collective over `comm` (process ranks, size > 1). Every rank sends its host name to rank 0; rank 0
// listens on loopback when all ranks share its host name, else on every interface, and broadcasts
// its port and a random token. Workers on rank 0's host connect over loopback, the others to rank
// 0's host name as their resolver sees it. Returns once every worker has connected.
Heartbeat start_heartbeat(Communicator& comm, const HeartbeatOptions& options);

}  // namespace arbiter
