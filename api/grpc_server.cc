#include "api/grpc_server.h"

#include <google/protobuf/empty.pb.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/ext/health_check_service_server_builder_option.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/resource_quota.h>
#include <grpcpp/support/method_handler.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "api/api.pb.h"
#include "api/grpc.grpc.pb.h"
#include "api/grpc.pb.h"

namespace arbiter::api {
namespace {

using SystemClock = std::chrono::system_clock;
constexpr auto kPoll = std::chrono::milliseconds(50);

// The service's methods and the HTTP requests they stand for.
enum class Kind { kClassify, kClassifyStream, kCreatePolicy, kListPolicies, kGetPolicy, kDeletePolicy, kListModels, kHealth, kReady };

struct MethodInfo {
  const char* name;
  Kind kind;
};

constexpr MethodInfo kMethods[] = {
    {"Classify", Kind::kClassify},         {"ClassifyStream", Kind::kClassifyStream}, {"CreatePolicy", Kind::kCreatePolicy},
    {"ListPolicies", Kind::kListPolicies}, {"GetPolicy", Kind::kGetPolicy},           {"DeletePolicy", Kind::kDeletePolicy},
    {"ListModels", Kind::kListModels},     {"Health", Kind::kHealth},                 {"Ready", Kind::kReady},
};

const char* code_name(grpc::StatusCode code) {
  static const char* kNames[] = {"OK",        "CANCELLED",         "UNKNOWN",           "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                 "NOT_FOUND", "ALREADY_EXISTS",    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                 "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",      "UNIMPLEMENTED",     "INTERNAL",
                                 "UNAVAILABLE", "DATA_LOSS",       "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < static_cast<int>(std::size(kNames)) ? kNames[i] : "UNKNOWN";
}

// Metadata values must be printable ASCII.
std::string metadata_value(std::string_view text) {
  std::string out(text);
  for (char& c : out)
    if (c < 0x20 || c > 0x7e) c = '?';
  return out;
}

// The request message in `in`; false when the bytes are not one.
bool read_message(const grpc::ByteBuffer& in, google::protobuf::Message& out) {
  std::vector<grpc::Slice> slices;
  if (!in.Dump(&slices).ok()) return false;
  std::string bytes;
  for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out.ParseFromString(bytes);
}

grpc::ByteBuffer to_buffer(const google::protobuf::Message& message) {
  const std::string bytes = message.SerializeAsString();
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

// The request body: the fields that are set, by their proto names (what an HTTP client would send).
bool request_json(const google::protobuf::Message& message, std::string& out) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  return google::protobuf::util::MessageToJsonString(message, &out, options).ok();
}

bool reply_message(const std::string& body, google::protobuf::Message& out) {
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  return google::protobuf::util::JsonStringToMessage(body, &out, options).ok();
}

// The status of a failure the gRPC layer finds itself (before ApiServer sees the call), with the
// same trailing metadata as the errors that come from it.
grpc::Status local_error(grpc::ServerContext* ctx, grpc::StatusCode code, const std::string& message, const std::string& error_code,
                         const std::string& type) {
  ctx->AddTrailingMetadata("arbiter-error-code", error_code);
  ctx->AddTrailingMetadata("arbiter-error-type", type);
  return grpc::Status(code, message);
}

// An error reply of ApiServer::handle() as a gRPC status, its details in trailing metadata.
grpc::Status error_status(grpc::ServerContext* ctx, const HttpReply& reply, Kind kind) {
  const auto code = static_cast<grpc::StatusCode>(grpc_status_for(reply.status));
  for (const auto& [name, value] : reply.headers)
    if (name == "Retry-After") ctx->AddTrailingMetadata("retry-after", metadata_value(value));
  wire::ErrorResponse error;
  if (reply_message(reply.body, error) && error.has_error()) {
    const wire::ErrorDetail& e = error.error();
    if (e.code().has_string_value()) ctx->AddTrailingMetadata("arbiter-error-code", metadata_value(e.code().string_value()));
    if (e.param().has_string_value()) ctx->AddTrailingMetadata("arbiter-error-param", metadata_value(e.param().string_value()));
    if (!e.type().empty()) ctx->AddTrailingMetadata("arbiter-error-type", metadata_value(e.type()));
    return grpc::Status(code, e.message());
  }
  wire::HealthResponse health;
  if (kind == Kind::kReady && reply_message(reply.body, health)) {  // /ready's 503 is a health body
    ctx->AddTrailingMetadata("arbiter-status", metadata_value(health.status()));
    return grpc::Status(code, "The server is not ready (" + health.status() + ").");
  }
  return grpc::Status(code, "HTTP status " + std::to_string(reply.status) + ".");
}

// A call's deadline as the timeout of its classify request: the server's timeout, the request's
// and the client's, whichever ends first. false when the deadline has already passed.
bool apply_deadline(SystemClock::time_point deadline, wire::ClassifyRequest& request) {
  if (deadline == SystemClock::time_point::max()) return true;  // none
  const double left = std::chrono::duration<double>(deadline - SystemClock::now()).count();
  if (left <= 0) return false;
  if (left > 1e8) return true;  // years: as good as none
  // A timeout that is not a positive number stays as it is: ApiServer answers it 400.
  if (!request.has_timeout() || (request.timeout() > 0 && request.timeout() > left)) request.set_timeout(left);
  return true;
}

// What one streaming classify shares between its handler thread (writes), the thread that runs
// ApiServer::handle() and the step-loop thread (per-policy results).
struct StreamState {
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<std::pair<size_t, std::string>> results;  // (index, PolicyResult JSON) not yet written
  std::optional<HttpReply> reply;
  std::atomic<bool> gone{false};  // the client cancelled (or its writes fail)
};

}  // namespace

int grpc_status_for(int http_status) {
  using grpc::StatusCode;
  StatusCode code = StatusCode::UNKNOWN;
  switch (http_status) {
    case 400: code = StatusCode::INVALID_ARGUMENT; break;
    case 401: code = StatusCode::UNAUTHENTICATED; break;
    case 403: code = StatusCode::PERMISSION_DENIED; break;
    case 404: code = StatusCode::NOT_FOUND; break;
    case 405: code = StatusCode::UNIMPLEMENTED; break;
    // A body over the limit: gRPC itself answers a message over the receive limit so.
    case 413: code = StatusCode::RESOURCE_EXHAUSTED; break;
    case 429: code = StatusCode::RESOURCE_EXHAUSTED; break;
    case 499: code = StatusCode::CANCELLED; break;
    case 500: code = StatusCode::INTERNAL; break;
    case 501: code = StatusCode::UNIMPLEMENTED; break;
    case 503: code = StatusCode::UNAVAILABLE; break;
    case 504: code = StatusCode::DEADLINE_EXCEEDED; break;
    default:
      if (http_status >= 200 && http_status < 300) code = StatusCode::OK;
      else if (http_status >= 400 && http_status < 500) code = StatusCode::FAILED_PRECONDITION;
      else if (http_status >= 500) code = StatusCode::INTERNAL;
  }
  return static_cast<int>(code);
}

// The service, registered method by method on raw bytes, so that a request that is not a valid
// message is answered INVALID_ARGUMENT like a malformed HTTP body (generated handlers would answer
// INTERNAL), and the handlers decide how each message becomes a request.
struct GrpcServer::Impl : grpc::Service {
  Impl(ApiServer& api, const ApiOptions& options, int port) : api(api), options(options), port(port) {
    const std::string service = wire::Arbiter::service_full_name();
    for (const MethodInfo& m : kMethods) paths.push_back("/" + service + "/" + m.name);
    for (size_t i = 0; i < std::size(kMethods); ++i) {
      const MethodInfo m = kMethods[i];
      const char* path = paths[i].c_str();  // kept in `paths`, which no longer changes
      if (m.kind == Kind::kClassifyStream) {
        AddMethod(new grpc::internal::RpcServiceMethod(
            path, grpc::internal::RpcMethod::SERVER_STREAMING,
            new grpc::internal::ServerStreamingHandler<Impl, grpc::ByteBuffer, grpc::ByteBuffer>(
                [m](Impl* self, grpc::ServerContext* ctx, const grpc::ByteBuffer* in, grpc::ServerWriter<grpc::ByteBuffer>* out) {
                  return self->counted(m, self->classify_stream(ctx, *in, *out));
                },
                this)));
      } else {
        AddMethod(new grpc::internal::RpcServiceMethod(
            path, grpc::internal::RpcMethod::NORMAL_RPC,
            new grpc::internal::RpcMethodHandler<Impl, grpc::ByteBuffer, grpc::ByteBuffer>(
                [m](Impl* self, grpc::ServerContext* ctx, const grpc::ByteBuffer* in, grpc::ByteBuffer* out) {
                  return self->counted(m, self->unary(m.kind, ctx, *in, *out));
                },
                this)));
      }
    }
  }

  grpc::Status counted(const MethodInfo& m, grpc::Status status) {
    api.metrics()
        .counter("arbiter_grpc_requests_total", "gRPC calls answered, by method and status code.",
                 {{"method", m.name}, {"code", code_name(status.error_code())}})
        .inc();
    return status;
  }

  // The HTTP request a call stands for; a status instead when the message is unusable.
  std::optional<grpc::Status> translate(Kind kind, grpc::ServerContext* ctx, const grpc::ByteBuffer& in, HttpRequest& http) {
    const auto& metadata = ctx->client_metadata();
    if (const auto it = metadata.find("authorization"); it != metadata.end())
      http.headers.emplace("authorization", std::string(it->second.data(), it->second.size()));
    auto message_error = [&] {
      return local_error(ctx, grpc::StatusCode::INVALID_ARGUMENT, "The request is not a valid message of the method's type.",
                         "invalid_message", "invalid_request_error");
    };
    std::unique_ptr<google::protobuf::Message> body;
    switch (kind) {
      case Kind::kClassify:
      case Kind::kClassifyStream: {
        auto request = std::make_unique<wire::ClassifyRequest>();
        if (!read_message(in, *request)) return message_error();
        if (!apply_deadline(ctx->deadline(), *request))
          return local_error(ctx, grpc::StatusCode::DEADLINE_EXCEEDED, "The request did not finish before its deadline.", "timeout",
                             "timeout_error");
        http.method = "POST";
        http.path = "/v1/classify";
        body = std::move(request);
        break;
      }
      case Kind::kCreatePolicy: {
        auto request = std::make_unique<wire::PolicyCreateRequest>();
        if (!read_message(in, *request)) return message_error();
        http.method = "POST";
        http.path = "/v1/policies";
        body = std::move(request);
        break;
      }
      case Kind::kGetPolicy:
      case Kind::kDeletePolicy: {
        wire::PolicyRef ref;
        if (!read_message(in, ref)) return message_error();
        http.method = kind == Kind::kGetPolicy ? "GET" : "DELETE";
        http.path = "/v1/policies/" + ref.id();
        break;
      }
      case Kind::kListPolicies:
      case Kind::kListModels:
      case Kind::kHealth:
      case Kind::kReady: {
        google::protobuf::Empty empty;
        if (!read_message(in, empty)) return message_error();
        http.method = "GET";
        http.path = kind == Kind::kListPolicies ? "/v1/policies"
                    : kind == Kind::kListModels ? "/v1/models"
                    : kind == Kind::kHealth     ? "/health"
                                                : "/ready";
        break;
      }
    }
    if (body && !request_json(*body, http.body)) return message_error();  // e.g. a string that is not UTF-8
    return std::nullopt;
  }

  // The response message of a successful reply.
  static std::unique_ptr<google::protobuf::Message> response_of(Kind kind) {
    switch (kind) {
      case Kind::kClassify:
      case Kind::kClassifyStream: return std::make_unique<wire::ClassifyResponse>();
      case Kind::kCreatePolicy:
      case Kind::kGetPolicy: return std::make_unique<wire::Policy>();
      case Kind::kListPolicies: return std::make_unique<wire::PolicyList>();
      case Kind::kDeletePolicy: return std::make_unique<wire::PolicyDeleted>();
      case Kind::kListModels: return std::make_unique<wire::ModelList>();
      case Kind::kHealth:
      case Kind::kReady: return std::make_unique<wire::HealthResponse>();
    }
    return nullptr;
  }

  // `reply` as the response message, or its error status.
  grpc::Status answer(Kind kind, grpc::ServerContext* ctx, const HttpReply& reply, google::protobuf::Message& out) {
    if (reply.status < 200 || reply.status >= 300) return error_status(ctx, reply, kind);
    if (!reply_message(reply.body, out)) return local_error(ctx, grpc::StatusCode::INTERNAL, "The reply could not be converted.", "internal_error", "server_error");
    return grpc::Status::OK;
  }

  grpc::Status unary(Kind kind, grpc::ServerContext* ctx, const grpc::ByteBuffer& in, grpc::ByteBuffer& out) {
    HttpRequest http;
    if (auto failed = translate(kind, ctx, in, http)) return *failed;
    // Past its deadline the call is also cancelled; the request's own deadline (the same) ends it.
    const SystemClock::time_point deadline = ctx->deadline();
    http.client_gone = [ctx, deadline] { return ctx->IsCancelled() && SystemClock::now() < deadline; };
    const HttpReply reply = api.handle(http);
    const auto response = response_of(kind);
    const grpc::Status status = answer(kind, ctx, reply, *response);
    if (status.ok()) out = to_buffer(*response);
    return status;
  }

  // ClassifyStream: ApiServer::handle() runs on a helper thread; this (the call's) thread writes
  // each policy's result as it comes, watches for cancellation, and writes the response last.
  grpc::Status classify_stream(grpc::ServerContext* ctx, const grpc::ByteBuffer& in, grpc::ServerWriter<grpc::ByteBuffer>& writer) {
    HttpRequest http;
    if (auto failed = translate(Kind::kClassifyStream, ctx, in, http)) return *failed;
    auto state = std::make_shared<StreamState>();
    http.client_gone = [state] { return state->gone.load(); };
    http.on_policy_result = [state](size_t index, const std::string& json) {
      {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->results.emplace_back(index, json);
      }
      state->changed.notify_all();
    };
    const SystemClock::time_point deadline = ctx->deadline();
    std::jthread handler([this, state, http = std::move(http)] {
      HttpReply reply = api.handle(http);
      {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->reply = std::move(reply);
      }
      state->changed.notify_all();
    });
    for (;;) {
      std::deque<std::pair<size_t, std::string>> fresh;
      bool done = false;
      {
        std::unique_lock<std::mutex> lock(state->mutex);
        state->changed.wait_for(lock, kPoll, [&] { return !state->results.empty() || state->reply.has_value(); });
        fresh.swap(state->results);
        done = state->reply.has_value();  // every per-policy result came before the reply
      }
      for (auto& [index, json] : fresh) {
        if (state->gone.load()) break;
        wire::ClassifyStreamEvent event;
        event.mutable_policy_result()->set_index(static_cast<int32_t>(index));
        if (!reply_message(json, *event.mutable_policy_result()->mutable_result())) continue;
        if (!writer.Write(to_buffer(event))) state->gone.store(true);
      }
      if (done) break;
      if (ctx->IsCancelled() && SystemClock::now() < deadline) state->gone.store(true);
    }
    handler.join();
    wire::ClassifyStreamEvent last;
    const grpc::Status status = answer(Kind::kClassifyStream, ctx, *state->reply, *last.mutable_response());
    if (status.ok() && !writer.Write(to_buffer(last))) return grpc::Status(grpc::StatusCode::CANCELLED, "The client went away.");
    return status;
  }

  ApiServer& api;
  ApiOptions options;
  int port;
  std::vector<std::string> paths;  // the methods' full names (RpcServiceMethod keeps the pointers)
  std::unique_ptr<grpc::Server> server;
};

GrpcServer::GrpcServer(ApiServer& api, const ApiOptions& options, int port) : impl_(std::make_unique<Impl>(api, options, port)) {}

GrpcServer::~GrpcServer() { stop(std::chrono::milliseconds(0)); }

int GrpcServer::start() {
  Impl& impl = *impl_;
  if (impl.server) throw std::logic_error("GrpcServer::start: already started");
  const std::string& host = impl.options.host;
  const std::string address =
      (host.find(':') != std::string::npos && host.front() != '[' ? "[" + host + "]" : host) + ":" + std::to_string(impl.port);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  // A port in use is an error, as for HTTP (gRPC would otherwise share it with SO_REUSEPORT).
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  int bound = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &bound);
  builder.RegisterService(&impl);
  builder.SetMaxReceiveMessageSize(static_cast<int>(std::min<size_t>(impl.options.max_body_bytes, INT32_MAX)));
  // Calls served at once, like --http-threads for HTTP (beyond that: RESOURCE_EXHAUSTED); a few
  // more threads poll for new calls.
  grpc::ResourceQuota quota("arbiter-grpc");
  quota.SetMaxThreads(std::max(1, impl.options.http_threads) + 4);
  builder.SetResourceQuota(quota);
  impl.server = builder.BuildAndStart();
  if (!impl.server || bound == 0) {
    impl.server.reset();
    throw std::runtime_error("cannot serve gRPC on " + address);
  }
  set_serving(false);  // until the model is loaded
  return bound;
}

void GrpcServer::set_serving(bool serving) {
  if (!impl_->server) return;
  if (grpc::HealthCheckServiceInterface* health = impl_->server->GetHealthCheckService()) {
    health->SetServingStatus("", serving);
    health->SetServingStatus(wire::Arbiter::service_full_name(), serving);
  }
}

void GrpcServer::stop(std::chrono::milliseconds grace) {
  if (!impl_->server) return;
  if (grpc::HealthCheckServiceInterface* health = impl_->server->GetHealthCheckService()) health->Shutdown();
  impl_->server->Shutdown(SystemClock::now() + grace);
  impl_->server->Wait();
  impl_->server.reset();
}

}  // namespace arbiter::api
