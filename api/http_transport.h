// HttpTransport: HTTP/1.1 for the API (api/server.h) on Boost.Beast and Asio. Sockets are served by
// a few event-loop threads, so idle, slow and waiting connections hold no thread; complete requests
// go to a fixed pool of handler threads (a handler may wait minutes for the model).
//
// What a client can count on:
// - keep-alive costs nothing extra: TCP_NODELAY, each reply leaves in one write;
// - pipelined requests are answered in order, one after another;
// - a request followed by a half-close (shutdown of the client's write side) is answered;
// - the request head must arrive within `header_timeout` of its first byte and the body within
//   `body_timeout` after the head, however the bytes trickle; an idle keep-alive connection is closed
//   after `idle_timeout`;
// - limits answer instead of waiting unseen: more than `max_connections` open connections get 503,
//   more than `max_waiting` requests waiting for a handler thread get 429, a body over
//   `max_body_bytes` 413 (as soon as its Content-Length says so), each with Retry-After where a retry
//   can help; a malformed request gets 400 and the connection is closed;
// - `Expect: 100-continue` is honoured; HEAD gets the headers of GET without the body;
// - GET /health, /ready, /metrics and the web console (/, /console/...) are answered on the event loop, never
//   queued behind model work.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "api/metrics.h"
#include "api/server.h"

namespace arbiter::api {

struct HttpTransportOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                 // 0: any free port
  size_t max_body_bytes = 4u << 20;
  int handler_threads = 256;       // requests handled at once
  int max_waiting = 1024;          // complete requests waiting for a handler thread before 429
  int max_connections = 4096;      // open connections before 503 (also capped by the descriptor limit)
  int io_threads = 2;              // event-loop threads
  double header_timeout = 10;      // seconds for a request head, from its first byte
  double body_timeout = 60;        // seconds for a body, after its head
  double idle_timeout = 5;         // seconds a keep-alive connection may wait for its next request
  double write_timeout = 60;       // seconds for writing one reply (or one chunk of a stream)
  int retry_after_seconds = 1;
};

class HttpTransport {
 public:
  using Handler = std::function<HttpReply(const HttpRequest&)>;

  // `handler` answers every request (from handler threads, or the event loop for health and
  // metrics); `metrics` receives the transport's own counters and gauges.
  HttpTransport(HttpTransportOptions options, Handler handler, MetricsRegistry& metrics);
  ~HttpTransport();  // stop()
  HttpTransport(const HttpTransport&) = delete;
  HttpTransport& operator=(const HttpTransport&) = delete;

  int bind();    // listens; returns the port (throws std::runtime_error when it cannot)
  void start();  // serves on background threads
  // Stops accepting, closes idle connections, lets replies being written finish (at most
  // `write_timeout`), then joins every thread.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace arbiter::api
