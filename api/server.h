// ApiServer: Arbiter's HTTP API on rank 0 (DESIGN.md §3; api/README.md). Endpoints:
//   POST /v1/classify                       content x policies -> verdicts (api/classify_api.h)
//   POST|GET /v1/policies, GET|DELETE /v1/policies/{id}[@version]   versioned named policies
//   POST /v1/chat/completions               OpenAI-compatible, with SSE streaming (api/chat_api.h)
//   GET /v1/models, GET /health, GET /ready, GET /metrics (Prometheus)
//   GET /v1/decisions[/{id}], POST /v1/decisions/{id}/feedback   the decision log (docs/decisions.md)
//   GET /, GET /console/{file}              the web console (api/console.h; docs/console.md)
//   POST|GET /v1/jobs, GET /v1/jobs/{id}[/results], POST /v1/jobs/{id}/cancel   durable batch jobs (docs/jobs.md)
// Bodies follow api/api.proto. Every failure is an OpenAI-style error body with its status (400
// bad input, 401 bad key, 404 unknown policy/path, 413 body too large, 429 queue full with
// Retry-After, 503 loading/draining/a rank at fault, 504 deadline). A client that disconnects has
// its work cancelled.
//
// Request handling is transport-independent (handle(HttpRequest) -> HttpReply, what the unit tests
// drive); api/http_transport.h carries it over HTTP/1.1. The server can listen before the model is loaded:
// model endpoints answer 503 until attach().
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "api/auth.h"
#include "api/errors.h"
#include "api/decision_log.h"
#include "api/jobs.h"
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
  int http_threads = 256;               // requests handled at once (each may wait for the model)
  int max_waiting = 1024;               // complete requests waiting for a handler thread before 429
  int max_connections = 4096;           // open connections before 503
  double header_timeout = 10;           // seconds for a request head, from its first byte
  double body_timeout = 60;             // seconds for a request body, after its head
  double idle_timeout = 5;              // seconds a keep-alive connection may stay idle
  ReasoningEffort default_effort = ReasoningEffort::kMedium;
  // Registered policies are computed into the prefix cache once per effort listed here (the effort
  // is in the system message, ahead of the policy, so each effort has its own prefix).
  std::vector<ReasoningEffort> warm_efforts = {ReasoningEffort::kLow, ReasoningEffort::kMedium, ReasoningEffort::kHigh};
  std::string policy_db;                // SQLite file for policies ("" : memory only)
  // Folder of the fastText triage models policies' cascades may name (pipeline/triage.h); "" : none.
  std::string triage_dir;
  // The categories POST /v1/moderations answers (api/moderation_api.h); "" : no moderations endpoint.
  std::string moderation_config;
  bool policy_db_readonly = false;      // serve the db's policies without changes (POST/DELETE: 403)
  int retry_after_seconds = 1;          // Retry-After of 429 / 503 replies
  int max_policies_per_request = 32;
  DecisionLogSettings decision_log;     // db empty: no decision log
  JobOptions jobs;                      // db empty: no jobs (api/jobs.h)
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
  // Optional: why the ranks cannot serve right now (e.g. "rank 1 died (...)"), nullopt while they
  // can. While it says something, /ready answers 503 (status "rank_fault"), new model requests get
  // 503 `rank_unavailable`, and requests waiting for the model fail at once with the same error (their
  // work is cancelled). Called often (every poll of every waiting request): must be cheap.
  std::function<std::optional<std::string>()> rank_fault;
};

// One HTTP request as the handlers see it.
struct HttpRequest {
  std::string method;                   // GET | POST | DELETE | ...
  std::string path;                     // without the query string
  std::string query;                    // the query string as sent (after '?'; not decoded)
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
  std::function<bool()> client_gone;   // optional: the client closed the connection
  // Optional, POST /v1/classify only: called with each policy's result (an api.proto PolicyResult
  // as JSON, and its index in the request's policies) as soon as that policy's generation ends
  // normally, before the reply. Runs on the scheduler's thread: it must not block.
  std::function<void(size_t index, const std::string& policy_result_json)> on_policy_result;
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
  // Bytes a stream may carry anywhere without changing its meaning (an SSE comment): the transport
  // writes them to find out whether a client that stopped sending is still reading.
  std::string stream_probe;
};

// The reply for an error: its OpenAI-style JSON body, Retry-After when a retry can help, and
// WWW-Authenticate on 401. Used by the handlers and by the transport's own answers.
HttpReply error_reply(const ApiError& error);

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
