// ConnectionWatch: tells whether the client of an HTTP request has gone away, so the work it asked
// for can be cancelled. cpp-httplib 0.11 does not hand handlers their socket, so the watch finds
// it among this process's descriptors by the connection's local and peer addresses, then peeks at
// it: end of stream or a reset means the client closed the connection.
#pragma once

#include <string>

namespace arbiter::api {

class ConnectionWatch {
 public:
  // An unwatched connection (closed() is always false).
  ConnectionWatch() = default;
  ConnectionWatch(const std::string& local_addr, int local_port, const std::string& remote_addr, int remote_port);

  bool watching() const { return fd_ >= 0; }
  // The client closed (or reset) the connection. Must only be called while the request's handler
  // runs (the descriptor is the server's until then).
  bool closed() const;

 private:
  int fd_ = -1;
};

}  // namespace arbiter::api
