#include "parallel/heartbeat.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "parallel/communicator.h"

namespace arbiter {
namespace {

using Clock = std::chrono::steady_clock;

// One heartbeat on the wire: magic, rank, token, completed steps; big-endian, 24 bytes.
constexpr uint32_t kBeat = 0x41524842;  // "ARHB"
constexpr uint32_t kBye = 0x41524259;   // "ARBY": the rank is leaving in order
constexpr size_t kFrame = 24;

struct Frame {
  uint32_t magic = 0;
  uint32_t rank = 0;
  uint64_t token = 0;
  uint64_t steps = 0;
};

void put_be(unsigned char* out, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i, v >>= 8) out[i] = static_cast<unsigned char>(v & 0xff);
}

uint64_t get_be(const unsigned char* in, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | in[i];
  return v;
}

std::string encode(const Frame& f) {
  unsigned char b[kFrame];
  put_be(b, f.magic, 4);
  put_be(b + 4, f.rank, 4);
  put_be(b + 8, f.token, 8);
  put_be(b + 16, f.steps, 8);
  return std::string(reinterpret_cast<const char*>(b), kFrame);
}

Frame decode(const char* data) {
  const auto* b = reinterpret_cast<const unsigned char*>(data);
  return {static_cast<uint32_t>(get_be(b, 4)), static_cast<uint32_t>(get_be(b + 4, 4)), get_be(b + 8, 8), get_be(b + 16, 8)};
}

std::string seconds_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f", s);
  return buf;
}

double seconds_between(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

void set_nonblocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK); }

std::string errno_text(const std::string& what) { return what + ": " + std::strerror(errno); }

}  // namespace

double HeartbeatOptions::effective_interval() const {
  if (interval > 0) return interval;
  return std::clamp(timeout / 10, 0.01, 0.2);
}

// ---------------------------------------------------------------------------------------------
// HeartbeatMonitor

struct HeartbeatMonitor::State {
  // What rank 0 knows of one worker.
  struct Peer {
    bool seen = false;     // a valid heartbeat arrived
    bool closed = false;   // its connection ended
    bool left = false;     // it said goodbye first
    Clock::time_point last{};
    uint64_t completed = 0;
    std::string how;       // how the connection ended
  };

  mutable std::mutex mutex;
  std::vector<Peer> peers;  // index = rank (0 unused)
  Clock::time_point started = Clock::now();
  uint64_t steps_started = 0;
  Clock::time_point step_at{};
  uint64_t token = 0;
  std::thread thread;
};

HeartbeatMonitor::HeartbeatMonitor(int world_size, uint64_t token, const HeartbeatOptions& options,
                                   const std::string& listen_host)
    : options_(options), state_(std::make_unique<State>()) {
  if (world_size < 2) throw std::invalid_argument("HeartbeatMonitor: no workers to watch");
  if (!(options_.timeout > 0)) throw std::invalid_argument("HeartbeatMonitor: the timeout must be positive");
  state_->peers.resize(static_cast<size_t>(world_size));
  state_->token = token;

  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = 0;  // any free port
  if (inet_pton(AF_INET, listen_host.c_str(), &addr.sin_addr) != 1)
    throw std::invalid_argument("HeartbeatMonitor: '" + listen_host + "' is not an IPv4 address");
  listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) throw std::runtime_error(errno_text("HeartbeatMonitor: socket"));
  const int one = 1;
  setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  socklen_t len = sizeof(addr);
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(listen_fd_, 256) != 0 ||
      getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const std::string error = errno_text("HeartbeatMonitor: cannot listen on " + listen_host);
    close(listen_fd_);
    throw std::runtime_error(error);
  }
  port_ = ntohs(addr.sin_port);
  set_nonblocking(listen_fd_);
  if (pipe2(wake_, O_CLOEXEC) != 0) {
    close(listen_fd_);
    throw std::runtime_error(errno_text("HeartbeatMonitor: pipe"));
  }
  state_->thread = std::thread([this] { watch(); });
}

HeartbeatMonitor::~HeartbeatMonitor() {
  const char byte = 0;
  if (write(wake_[1], &byte, 1) < 0) {
    // The pipe cannot be full (one byte, once); nothing else to do.
  }
  if (state_->thread.joinable()) state_->thread.join();
  close(wake_[0]);
  close(wake_[1]);
  close(listen_fd_);
}

void HeartbeatMonitor::step_started(uint64_t count) {
  std::lock_guard lock(state_->mutex);
  state_->steps_started = count;
  state_->step_at = Clock::now();
}

std::optional<RankFault> HeartbeatMonitor::fault() const {
  std::lock_guard lock(state_->mutex);
  const auto now = Clock::now();
  const auto& peers = state_->peers;
  for (size_t r = 1; r < peers.size(); ++r)
    if (peers[r].closed && !peers[r].left)
      return RankFault{static_cast<int>(r), true, "rank " + std::to_string(r) + " died (" + peers[r].how + ")"};
  for (size_t r = 1; r < peers.size(); ++r) {
    const State::Peer& p = peers[r];
    if (p.left) continue;
    const std::string rank = "rank " + std::to_string(r);
    const double silent = seconds_between(p.seen ? p.last : state_->started, now);
    if (silent > options_.timeout)
      return RankFault{static_cast<int>(r), false,
                       rank + (p.seen ? " stalls: no heartbeat for " : " stalls: no heartbeat since start-up, ") + seconds_text(silent) +
                           " s (limit " + seconds_text(options_.timeout) + " s)"};
    const double step_age = seconds_between(state_->step_at, now);
    if (options_.step_timeout > 0 && p.completed < state_->steps_started && step_age > options_.step_timeout)
      return RankFault{static_cast<int>(r), false,
                       rank + " stalls: step " + std::to_string(state_->steps_started) + " started " + seconds_text(step_age) +
                           " s ago is not complete there (limit " + seconds_text(options_.step_timeout) + " s)"};
  }
  return std::nullopt;
}

void HeartbeatMonitor::watch() {
  // Connections, owned by this thread; rank -1 until their first valid heartbeat.
  struct Conn {
    int fd = -1;
    int rank = -1;
    std::string buffer;
  };
  std::vector<Conn> conns;
  auto end_connection = [&](Conn& c, const std::string& how) {
    if (c.rank > 0) {
      std::lock_guard lock(state_->mutex);
      State::Peer& p = state_->peers[static_cast<size_t>(c.rank)];
      p.closed = true;
      p.how = how;
    }
    close(c.fd);
    c.fd = -1;
  };
  // Applies the whole frames in c.buffer; false when the peer broke the protocol.
  auto take_frames = [&](Conn& c) {
    size_t at = 0;
    for (; at + kFrame <= c.buffer.size(); at += kFrame) {
      const Frame f = decode(c.buffer.data() + at);
      const int rank = static_cast<int>(f.rank);
      if ((f.magic != kBeat && f.magic != kBye) || f.token != state_->token || rank < 1 ||
          rank >= static_cast<int>(state_->peers.size()) || (c.rank > 0 && rank != c.rank))
        return false;
      std::lock_guard lock(state_->mutex);
      State::Peer& p = state_->peers[static_cast<size_t>(rank)];
      if (c.rank < 0) {
        if (p.seen) return false;  // a second connection for a rank already heard from
        c.rank = rank;
      }
      p.seen = true;
      p.last = Clock::now();
      p.completed = std::max(p.completed, f.steps);
      if (f.magic == kBye) p.left = true;
    }
    c.buffer.erase(0, at);
    return true;
  };

  for (;;) {
    std::vector<pollfd> fds = {{wake_[0], POLLIN, 0}, {listen_fd_, POLLIN, 0}};
    for (const Conn& c : conns) fds.push_back({c.fd, POLLIN, 0});
    if (poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (fds[0].revents) break;
    if (fds[1].revents & POLLIN) {
      for (;;) {
        const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) break;
        conns.push_back({fd, -1, {}});
      }
    }
    for (size_t i = 0; i < conns.size(); ++i) {
      const short revents = fds[i + 2].revents;
      Conn& c = conns[i];
      if (!revents) continue;
      char buf[4096];
      const ssize_t n = recv(c.fd, buf, sizeof(buf), 0);
      if (n > 0) {
        c.buffer.append(buf, static_cast<size_t>(n));
        if (!take_frames(c)) end_connection(c, "its heartbeat connection sent malformed data");
      } else if (n == 0) {
        end_connection(c, "its heartbeat connection to rank 0 closed");
      } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        end_connection(c, std::string("its heartbeat connection to rank 0 failed: ") + std::strerror(errno));
      }
    }
    conns.erase(std::remove_if(conns.begin(), conns.end(), [](const Conn& c) { return c.fd < 0; }), conns.end());
  }
  for (Conn& c : conns) close(c.fd);
}

// ---------------------------------------------------------------------------------------------
// HeartbeatSender

struct HeartbeatSender::State {
  int fd = -1;
  int rank = 0;
  uint64_t token = 0;
  std::chrono::duration<double> interval{0.1};
  std::atomic<uint64_t> completed{0};
  std::string unsent;  // the rest of a frame the socket did not take at once
  std::mutex mutex;
  std::condition_variable wake;
  bool stop = false;
  std::thread thread;

  // Sends one frame without blocking (a rank 0 that stopped reading must not stop this rank); a
  // frame the socket takes only in part is finished before the next one starts.
  void send_frame(uint32_t magic) {
    if (unsent.empty()) unsent = encode({magic, static_cast<uint32_t>(rank), token, completed.load()});
    const ssize_t n = ::send(fd, unsent.data(), unsent.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) unsent.erase(0, static_cast<size_t>(n));
  }
};

HeartbeatSender::HeartbeatSender(const std::string& host, int port, int rank, uint64_t token, double interval_s)
    : state_(std::make_unique<State>()) {
  state_->rank = rank;
  state_->token = token;
  state_->interval = std::chrono::duration<double>(interval_s);
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const std::string where = host + ":" + std::to_string(port);
  if (const int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found); rc != 0)
    throw std::runtime_error("heartbeat: cannot resolve rank 0's address " + where + ": " + gai_strerror(rc));
  std::string error = "no address";
  const auto give_up = Clock::now() + std::chrono::seconds(10);
  for (addrinfo* a = found; a && state_->fd < 0; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      error = std::strerror(errno);
      close(fd);
      continue;
    }
    pollfd p{fd, POLLOUT, 0};
    const int wait_ms = static_cast<int>(std::max<int64_t>(
        0, std::chrono::duration_cast<std::chrono::milliseconds>(give_up - Clock::now()).count()));
    int so_error = 0;
    socklen_t len = sizeof(so_error);
    if (poll(&p, 1, wait_ms) != 1 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &len) != 0 || so_error != 0) {
      error = so_error ? std::strerror(so_error) : "timed out";
      close(fd);
      continue;
    }
    state_->fd = fd;
  }
  freeaddrinfo(found);
  if (state_->fd < 0) throw std::runtime_error("heartbeat: rank " + std::to_string(rank) + " cannot reach rank 0 at " + where + ": " + error);
  state_->send_frame(kBeat);
  State* s = state_.get();
  s->thread = std::thread([s] {
    std::unique_lock lock(s->mutex);
    while (!s->wake.wait_for(lock, s->interval, [s] { return s->stop; })) s->send_frame(kBeat);
  });
}

HeartbeatSender::~HeartbeatSender() {
  {
    std::lock_guard lock(state_->mutex);
    state_->stop = true;
  }
  state_->wake.notify_all();
  if (state_->thread.joinable()) state_->thread.join();
  state_->send_frame(kBye);
  if (!state_->unsent.empty()) state_->send_frame(kBye);  // the rest of a beat, then the goodbye
  close(state_->fd);
}

void HeartbeatSender::set_completed_steps(uint64_t count) { state_->completed.store(count); }

// ---------------------------------------------------------------------------------------------
// start_heartbeat

Heartbeat start_heartbeat(Communicator& comm, const HeartbeatOptions& options) {
  constexpr size_t kHost = 256;
  const size_t n = static_cast<size_t>(comm.size());
  if (n < 2) throw std::invalid_argument("start_heartbeat: one rank has no peer to watch");
  char own[kHost] = {};
  gethostname(own, kHost - 1);
  std::vector<char> hosts(n * kHost);
  comm.all_gather(own, kHost, hosts.data());
  const std::string host0(hosts.data());
  bool one_host = true;
  for (size_t r = 1; r < n; ++r) one_host = one_host && std::string(hosts.data() + r * kHost) == host0;

  Heartbeat hb;
  // Rank 0's port and the token every heartbeat must carry (so a stranger reaching the port cannot
  // pose as a rank).
  unsigned char hello[16] = {};
  if (comm.rank() == 0) {
    std::random_device rd;
    const uint64_t token = (uint64_t{rd()} << 32) | rd();
    hb.monitor = std::make_unique<HeartbeatMonitor>(comm.size(), token, options, one_host ? "127.0.0.1" : "0.0.0.0");
    put_be(hello, static_cast<uint64_t>(hb.monitor->port()), 8);
    put_be(hello + 8, token, 8);
  }
  comm.broadcast(hello, sizeof(hello), 0);
  if (comm.rank() != 0) {
    const int port = static_cast<int>(get_be(hello, 8));
    const uint64_t token = get_be(hello + 8, 8);
    const std::string host = std::string(own) == host0 ? "127.0.0.1" : host0;
    hb.sender = std::make_unique<HeartbeatSender>(host, port, comm.rank(), token, options.effective_interval());
  }
  comm.barrier();
  return hb;
}

}  // namespace arbiter
