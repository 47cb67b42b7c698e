#include "api/connection_watch.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>

namespace arbiter::api {
namespace {

// The TCP state of a socket (TCP_CLOSE once a reset arrived); -1 when it cannot be read.
int tcp_state(int fd) {
  tcp_info info{};
  socklen_t len = sizeof(info);
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return -1;
  return info.tcpi_state;
}

constexpr char kInterim[] = "HTTP/1.1 102 Processing\r\n\r\n";
constexpr int kResetWaitMs = 5;

}  // namespace

bool ConnectionWatch::closed() {
  if (fd_ < 0) return false;
  if (gone_) return true;
  const int state = tcp_state(fd_);
  if (state == TCP_CLOSE) return gone_ = true;
  char byte;
  const ssize_t n = recv(fd_, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n > 0) return false;  // the client is still sending (a pipelined request)
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return false;
    return gone_ = true;  // reset or another hard error
  }
  // End of stream: half-closed or closed. Probe once.
  if (probed_) return false;
  if (replying_.load()) {
    if (!body_probe_) return false;
    probed_ = true;
    if (!body_probe_()) return gone_ = true;
    return answered_by_reset();
  }
  if (!interim_allowed_) return false;
  probed_ = true;
  const ssize_t sent = send(fd_, kInterim, sizeof(kInterim) - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
  if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return gone_ = true;
  return answered_by_reset();
}

bool ConnectionWatch::answered_by_reset() {
  // A closed socket's reset takes one round trip; wait that long on a nearby client (the loopback,
  // a data-centre network) so the caller learns now, not at its next look.
  pollfd p{fd_, 0, 0};
  if (poll(&p, 1, kResetWaitMs) > 0 && (p.revents & (POLLERR | POLLHUP))) return gone_ = true;
  return gone_ = tcp_state(fd_) == TCP_CLOSE;
}

}  // namespace arbiter::api
