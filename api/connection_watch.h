// ConnectionWatch: tells a request's handler whether its client has gone away, so the work it asked
// for can be cancelled, without mistaking a half-closed connection for a closed one.
//
// A client that sends its request and then shuts down its write side (as some proxies and tools do)
// still waits for the answer; one that closed its socket does not. Both look the same to a reader:
// end of stream. So at the first end of stream the watch sends an interim `HTTP/1.1 102 Processing`
// (RFC 9110 §15.2: a client must accept 1xx responses before the final one): a closed socket answers
// it with a reset, which the next look sees as the connection in state CLOSE; a half-closed one
// reads and ignores it. Bytes waiting to be read (a pipelined next request) mean the client is there.
// HTTP/1.0 clients get no interim response, so for them end of stream is taken as half-close.
// Once a streamed reply has started, the probe is bytes the stream may carry without changing its
// meaning (an SSE comment), written through the stream itself (set_body_probe()).
//
// The descriptor must stay open while the watch is used, and nothing else may write to it until
// the reply starts (mark_replying()); after that the watch writes only through the body probe.
#pragma once

#include <atomic>
#include <functional>

namespace arbiter::api {

class ConnectionWatch {
 public:
  // An unwatched connection (closed() is always false).
  ConnectionWatch() = default;
  // fd: the connection's socket; interim_allowed: the request was HTTP/1.1 or later.
  ConnectionWatch(int fd, bool interim_allowed) : fd_(fd), interim_allowed_(interim_allowed) {}

  // The client closed (or reset) the connection. Cheap enough to call every few milliseconds.
  bool closed();
  // The reply's first bytes are about to be written: no interim response any more.
  void mark_replying() { replying_.store(true); }
  // For a streamed reply: writes harmless bytes into the stream; false when the write failed. Called
  // from closed(), so from the thread that writes the stream.
  void set_body_probe(std::function<bool()> probe) { body_probe_ = std::move(probe); }

 private:
  // After a probe: true (and remembered) when the client's reset arrives within a few milliseconds.
  bool answered_by_reset();

  int fd_ = -1;
  bool interim_allowed_ = false;
  bool probed_ = false;
  bool gone_ = false;
  std::atomic<bool> replying_{false};
  std::function<bool()> body_probe_;
};

}  // namespace arbiter::api
