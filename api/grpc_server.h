// GrpcServer: Arbiter's gRPC API (api/grpc.proto, service arbiter.api.wire.Arbiter), served beside
// the HTTP API by `arbiter serve --grpc-port P`. It exists so that gRPC clients (typed stubs,
// HTTP/2 load balancers, deadlines and cancellation built in) get the HTTP API's operations with
// the same semantics: every call is turned into the HTTP request it stands for (the request message
// printed through protobuf's JSON mapping, `authorization` metadata as the Authorization header, the
// call's deadline as the request's timeout) and answered by ApiServer::handle(), so checks, limits,
// defaults, metrics and errors cannot drift apart. The reply body is parsed back into the response
// message; an error reply becomes a gRPC status (grpc_status_for: 400 INVALID_ARGUMENT, 401
// UNAUTHENTICATED, 404 NOT_FOUND, 413 and 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, 504
// DEADLINE_EXCEEDED, ...) with the error's code, param, type and Retry-After in trailing metadata.
// A call the client cancels (or abandons) cancels its generation.
//
// ClassifyStream sends each policy's result as soon as its generation ends, then the whole response.
// The standard grpc.health.v1 service is on too: serving once set_serving(true) (the model is
// loaded) until set_serving(false) or stop().
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "api/server.h"

namespace arbiter::api {

// The gRPC status code (grpc::StatusCode's value) for an HTTP status of ApiServer::handle().
int grpc_status_for(int http_status);

class GrpcServer {
 public:
  // Serves `api` on options.host:port (0: any free port), with the limits in `options`
  // (max_body_bytes is the largest request message accepted; http_threads calls run at once).
  GrpcServer(ApiServer& api, const ApiOptions& options, int port);
  ~GrpcServer();  // stop()
  GrpcServer(const GrpcServer&) = delete;
  GrpcServer& operator=(const GrpcServer&) = delete;

  // Binds and starts serving on background threads; returns the port. Throws when it cannot listen.
  int start();
  // The grpc.health.v1 status of the server ("") and of the Arbiter service.
  void set_serving(bool serving);
  // Stops accepting calls, gives those in flight up to `grace` to finish (then cancels them), and
  // returns once every handler has returned.
  void stop(std::chrono::milliseconds grace = std::chrono::seconds(5));

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace arbiter::api
