// ApiServer: Arbiter's HTTP API on rank 0 (DESIGN.md §3, issue 6). Endpoints:
//   POST /v1/classify                       content x policies -> verdicts (api/classify_api.h)
//   POST|GET /v1/policies, GET|DELETE /v1/policies/{id}[@version]   versioned named policies
//   POST /v1/chat/completions               OpenAI-compatible, with SSE streaming (api/chat_api.h)
//   GET /v1/models, GET /health, GET /ready, GET /metrics (Prometheus)
// Bodies follow api/api.proto. Every failure is an OpenAI-style error body with its status (400
// bad input, 401 bad key, 404 unknown policy/path, 413 body too large, 429 queue full with
// Retry-After, 503 loading/draining, 504 deadline). A client that disconnects has its work
// cancelled.
//
// Request handling is transport-independent (handle(HttpRequest) -> HttpReply, what the unit tests
// drive); cpp-httplib carries it over HTTP/1.1. The server can listen before the model is loaded:
// model endpoints answer 503 until attach().
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "api/auth.h"
#include "api/metrics.h"
#include "api/policy_registry.h"
#include "runtime/harmony.h"

namespace arbiter {
class Classifier;
class Scheduler;
class StepLoop;
class Tokenizer;
}  // namespace arbiter

namespace arbiter::api {

// How the server listens and what it allows (set from `arbiter serve` options).
struct ApiOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                      // 0: any free port (bind() says which)
  ApiKeys keys;                         // none: no authentication
  size_t max_body_bytes = 4u << 20;
  double request_timeout = 600;         // seconds per request (0: none); a request's `timeout` may shorten it
  int http_threads = 128;               // concurrent connections served
  ReasoningEffort default_effort = ReasoningEffort::kMedium;
  // Registered policies are computed into the prefix cache once per effort listed here (the effort
  // is in the system message, ahead of the policy, so each effort has its own prefix).
  std::vector<ReasoningEffort> warm_efforts = {ReasoningEffort::kLow, ReasoningEffort::kMedium, ReasoningEffort::kHigh};
  std::string policy_db;                // SQLite file for policies ("" : memory only)
  bool policy_db_readonly = false;      // serve the db's policies without changes (POST/DELETE: 403)
  int retry_after_seconds = 1;          // Retry-After of 429 / 503 replies
  int max_policies_per_request = 32;
};

// What the model endpoints run on (ServingRank's pieces on rank 0), handed over once loaded.
struct ServingHandles {
  Classifier* classifier = nullptr;
  Scheduler* scheduler = nullptr;
  const StepLoop* loop = nullptr;       // optional: step metrics
  const Tokenizer* tokenizer = nullptr;
  std::string model_name;
  int max_context = 0;
  int world_size = 1;
};

// One HTTP request as the handlers see it.
struct HttpRequest {
  std::string method;                   // GET | POST | DELETE | ...
  std::string path;                     // without the query string
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
  std::function<bool()> client_gone;   // optional: the client closed the connection
};

// The reply: a whole body, or a stream of chunks (server-sent events).
struct HttpReply {
  int status = 200;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  // Streaming replies: writes every chunk through `write` (false: the client is gone) and returns
  // when the stream is over.
  std::function<void(const std::function<bool(std::string_view)>& write)> stream;
};

// The API: request handling (handle) and its HTTP transport (bind/start/stop).
class ApiServer {
 public:
  explicit ApiServer(ApiOptions options);
  ~ApiServer();  // stop()
  ApiServer(const ApiServer&) = delete;
  ApiServer& operator=(const ApiServer&) = delete;

  // Serves one request (any thread; many at once).
  HttpReply handle(const HttpRequest& request);

  // The model is loaded and every rank is up: model endpoints open, /ready says so, and every
  // registered policy's prefix is computed into the prefix cache.
  void attach(const ServingHandles& handles);
  // Shutting down: /ready fails and new model requests get 503; requests in flight go on. Returns
  // once every request admitted before has been submitted to the scheduler (so stopping the
  // scheduler's intake afterwards refuses none of them).
  void drain();
  // Waits until no request is being handled (streams included); false on timeout.
  bool wait_idle(std::chrono::milliseconds timeout);

  // HTTP: binds host:port and returns the port; start() serves on a background thread; stop()
  // stops listening and returns once every connection is done.
  int bind();
  void start();
  void stop();

  MetricsRegistry& metrics();
  PolicyRegistry& policies();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace arbiter::api
