// The gRPC API (api/grpc.proto) end to end: a C++ client against `arbiter serve --grpc-port 0` on a
// tiny random model. Unary classify answers as POST /v1/classify does; ClassifyStream sends each
// policy's result when its generation ends (the short policy before the long one) and then the
// whole response; policy create / list / get / delete; every error as its status code with code,
// param and retry-after in trailing metadata; client deadlines and cancellations reach the
// scheduler; random bytes and random field values always get a status and never take the server
// down; grpc.health.v1; SIGTERM drains and exits 0.
#include <google/protobuf/util/json_util.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "api/api.pb.h"
#include "api/grpc.grpc.pb.h"
#include "api/grpc.pb.h"
#include "tests/api/serve_process.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

namespace wire = api::wire;

constexpr const char* kKey = "key-one";
const std::string kService = "/arbiter.api.wire.Arbiter/";

// A server with HTTP and gRPC ports.
struct Endpoints {
  std::unique_ptr<ServeProcess> process;
  int http = 0;
  int grpc = 0;
};

Endpoints start_server(const std::vector<std::string>& args, const std::string& log) {
  Endpoints e;
  e.process = std::make_unique<ServeProcess>(args, log);
  e.http = e.process->port();
  // The gRPC address comes right after the HTTP one.
  const std::smatch m = e.process->wait_for_output(
      std::regex("listening on http://[0-9.]+:[0-9]+ \\(pid [0-9]+\\)\narbiter serve: gRPC on 127\\.0\\.0\\.1:([0-9]+)\n"), 30);
  e.grpc = std::stoi(m[1]);
  return e;
}

std::unique_ptr<wire::Arbiter::Stub> stub_for(int port) {
  return wire::Arbiter::NewStub(grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
}

// A client context with the key (unless empty) and a deadline.
std::unique_ptr<grpc::ClientContext> context(const std::string& key = kKey, double seconds = 120) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  if (!key.empty()) ctx->AddMetadata("authorization", "Bearer " + key);
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
  return ctx;
}

std::string trailer(const grpc::ClientContext& ctx, const std::string& name) {
  const auto& m = ctx.GetServerTrailingMetadata();
  const auto it = m.find(name);
  return it == m.end() ? "<absent>" : std::string(it->second.data(), it->second.size());
}

// An HTTP call (to compare with gRPC).
json http_post(int port, const std::string& path, const json& body, int* status = nullptr) {
  httplib::Client client("127.0.0.1", port);
  client.set_read_timeout(120, 0);
  const auto r = client.Post(path.c_str(), {{"Authorization", std::string("Bearer ") + kKey}}, body.dump(), "application/json");
  if (status) *status = r ? r->status : 0;
  return r ? json::parse(r->body, nullptr, false) : json();
}

std::string metrics_text(int port) {
  httplib::Client client("127.0.0.1", port);
  const auto r = client.Get("/metrics");
  return r ? r->body : "";
}

// Waits until `series` reaches `at_least`; its last value.
double wait_metric(int port, const std::string& series, double at_least, double seconds = 20) {
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  double v = metric(port, series);
  while (v < at_least && Clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    v = metric(port, series);
  }
  return v;
}

json to_json(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  std::string out;
  EXPECT_TRUE(google::protobuf::util::MessageToJsonString(m, &out, o).ok());
  return json::parse(out);
}

// What must be equal between two answers to the same greedy request.
json essence(const json& response) {
  json out = json::array();
  for (const auto& r : response["results"])
    out.push_back({r["policy_id"], r["verdict"], r["final"], r.value("reasoning", ""), r["finish_reason"], r["violation"],
                   r["usage"]["completion_tokens"], r["usage"]["reasoning_tokens"], r["usage"]["prompt_tokens"]});
  out.push_back(response["flagged"]);
  return out;
}

// A raw call through the generic stub: any bytes to any method.
struct RawResult {
  grpc::Status status;
  std::string body;
};

RawResult raw_call(grpc::GenericStub& stub, const std::string& method, const std::string& bytes, const std::string& key = kKey,
                   double seconds = 30) {
  auto ctx = context(key, seconds);
  grpc::Slice slice(bytes);
  const grpc::ByteBuffer request(&slice, 1);
  grpc::CompletionQueue cq;
  RawResult out;
  grpc::ByteBuffer response;
  auto call = stub.PrepareUnaryCall(ctx.get(), method, request, &cq);
  call->StartCall();
  call->Finish(&response, &out.status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  EXPECT_TRUE(cq.Next(&tag, &ok));
  std::vector<grpc::Slice> slices;
  if (out.status.ok() && response.Dump(&slices).ok())
    for (const auto& s : slices) out.body.append(reinterpret_cast<const char*>(s.begin()), s.size());
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return out;
}

class ApiGrpc : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = std::make_unique<testing::TempDir>();
    ASSERT_EQ(make_tiny_model(tmp_->file("model"), 5), "");
    std::ofstream(tmp_->file("keys")) << "key-one\nkey-two\n";
  }
  static void TearDownTestSuite() { tmp_.reset(); }
  static std::string file(const std::string& name) { return tmp_->file(name); }

  // With keys, a 64 KiB message limit and one queued request at most.
  static std::vector<std::string> args() {
    return {"--model", file("model"), "--port", "0", "--grpc-port", "0", "--device", "cpu", "--request-timeout", "120",
            "--api-key-file", file("keys"), "--max-body-bytes", "65536", "--max-queued", "1"};
  }

  static bool wait_ready(wire::Arbiter::Stub& stub, double seconds) {
    const auto until = Clock::now() + std::chrono::duration<double>(seconds);
    while (Clock::now() < until) {
      auto ctx = context("", 5);
      wire::HealthResponse h;
      if (stub.Ready(ctx.get(), {}, &h).ok() && h.status() == "ready") return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }

  static wire::ClassifyRequest classify_request(const std::string& content, int max_tokens = 6) {
    wire::ClassifyRequest r;
    r.set_content(content);
    for (const char* id : {"p0", "p1", "p2@1", "p3"}) r.add_policies()->set_id(id);
    r.set_reasoning_effort("low");
    r.set_max_tokens(max_tokens);
    return r;
  }

  static void register_policies(wire::Arbiter::Stub& stub) {
    for (int i = 0; i < 4; ++i) {
      wire::PolicyCreateRequest p;
      p.set_id("p" + std::to_string(i));
      p.set_text(kPolicyTexts[i]);
      if (i == 2) {
        p.add_labels("SAFE");
        p.add_labels("FRAUD");
        p.add_violating_labels("FRAUD");
      }
      auto ctx = context();
      wire::Policy out;
      const grpc::Status s = stub.CreatePolicy(ctx.get(), p, &out);
      ASSERT_TRUE(s.ok()) << s.error_message();
      EXPECT_EQ(out.id(), p.id());
      EXPECT_GE(out.version(), 1);
      EXPECT_GT(out.prompt_tokens(), 16);
    }
  }

  static inline std::unique_ptr<testing::TempDir> tmp_;
};

TEST_F(ApiGrpc, UnaryClassifyAnswersAsHttpDoes) {
  Endpoints server = start_server(args(), file("unary.log"));
  auto stub = stub_for(server.grpc);
  ASSERT_TRUE(wait_ready(*stub, 60)) << server.process->log();
  register_policies(*stub);

  const wire::ClassifyRequest request = classify_request("probe: win a free cruise");
  auto ctx = context();
  wire::ClassifyResponse response;
  const grpc::Status s = stub->Classify(ctx.get(), request, &response);
  ASSERT_TRUE(s.ok()) << s.error_message() << server.process->log();
  ASSERT_EQ(response.results_size(), 4);
  EXPECT_EQ(response.object(), "classification");
  EXPECT_EQ(response.results(2).policy_id(), "p2@1");
  EXPECT_EQ(response.results(2).policy_version(), 1);
  for (const auto& r : response.results()) EXPECT_GT(r.usage().completion_tokens(), 0);

  int status = 0;
  const json http = http_post(server.http, "/v1/classify",
                              {{"content", "probe: win a free cruise"},
                               {"policies", {{{"id", "p0"}}, {{"id", "p1"}}, {{"id", "p2@1"}}, {{"id", "p3"}}}},
                               {"reasoning_effort", "low"},
                               {"max_tokens", 6}},
                              &status);
  ASSERT_EQ(status, 200) << http.dump();
  EXPECT_EQ(essence(to_json(response)), essence(http)) << "gRPC and HTTP disagree on a greedy request";
  EXPECT_NE(response.id(), http["id"].get<std::string>());
  {  // Without a deadline: the server's timeout alone.
    grpc::ClientContext plain;
    plain.AddMetadata("authorization", std::string("Bearer ") + kKey);
    wire::ClassifyResponse again;
    const grpc::Status ps = stub->Classify(&plain, request, &again);
    ASSERT_TRUE(ps.ok()) << ps.error_message();
    EXPECT_EQ(essence(to_json(again)), essence(to_json(response)));
  }

  // Models, health, and the calls counted by method and code.
  auto mctx = context();
  wire::ModelList models;
  ASSERT_TRUE(stub->ListModels(mctx.get(), {}, &models).ok());
  ASSERT_EQ(models.data_size(), 1);
  EXPECT_EQ(models.data(0).id(), "model");
  auto hctx = context("");
  wire::HealthResponse health;
  ASSERT_TRUE(stub->Health(hctx.get(), {}, &health).ok());
  EXPECT_EQ(health.status(), "ok");
  EXPECT_EQ(health.ranks(), 1);
  EXPECT_EQ(metric(server.http, "arbiter_grpc_requests_total{method=\"Classify\",code=\"OK\"}"), 2) << metrics_text(server.http);

  // SIGTERM: readiness goes, the process drains and exits 0.
  kill(server.process->server_pid(), SIGTERM);
  EXPECT_EQ(server.process->wait_exit(30), 0) << server.process->log();
}

TEST_F(ApiGrpc, CommandLine) {
  const auto help = testing::run_command(std::string(ARBITER_BINARY) + " serve --help");
  EXPECT_EQ(help.status, 0) << help.output;
  EXPECT_NE(help.output.find("--grpc-port"), std::string::npos) << help.output;
  const auto bad = testing::run_command(std::string(ARBITER_BINARY) + " serve --port 0 --grpc-port 70000 --model " + file("model"));
  EXPECT_NE(bad.status, 0) << bad.output;
  EXPECT_NE(bad.output.find("--grpc-port"), std::string::npos) << bad.output;
  // A gRPC port in use: the command fails (no silent sharing of the port).
  Endpoints first = start_server(args(), file("first.log"));
  const auto taken = testing::run_command(std::string(ARBITER_BINARY) + " serve --port 0 --device cpu --grpc-port " +
                                          std::to_string(first.grpc) + " --model " + file("model"));
  EXPECT_EQ(taken.status, 1) << taken.output;
  EXPECT_NE(taken.output.find("cannot serve gRPC"), std::string::npos) << taken.output;
}

TEST_F(ApiGrpc, ClassifyStreamSendsEachPolicyWhenItEndsThenTheResponse) {
  // Two thread ranks and a small step budget: the long policy (first in the request) is prefilled
  // on one rank over many steps while the short one runs on the other and ends first.
  auto a = args();
  a.insert(a.end(), {"--ranks", "2", "--step-tokens", "8", "--warm-efforts", "none"});
  Endpoints server = start_server(a, file("stream.log"));
  auto stub = stub_for(server.grpc);
  ASSERT_TRUE(wait_ready(*stub, 60)) << server.process->log();

  std::string long_policy = "# Spam\n";
  for (int i = 0; i < 150; ++i) long_policy += "Rule " + std::to_string(i) + ": unsolicited offers violate. ";
  long_policy += "Return exactly one character: 0 or 1.";
  wire::ClassifyRequest request;
  request.set_content("win a free cruise now");
  request.set_reasoning_effort("low");
  request.set_max_tokens(8);
  auto* p0 = request.add_policies();
  p0->set_id("long");
  p0->set_text(long_policy);
  auto* p1 = request.add_policies();
  p1->set_id("short");
  p1->set_text("Answer 0 or 1.");

  auto ctx = context();
  auto reader = stub->ClassifyStream(ctx.get(), request);
  std::vector<wire::ClassifyStreamEvent> events;
  std::vector<Clock::time_point> arrived;
  double running_at_first = -1;
  for (wire::ClassifyStreamEvent e; reader->Read(&e);) {
    events.push_back(e);
    arrived.push_back(Clock::now());
    // The first result arrives while the long policy is still being computed.
    if (events.size() == 1) running_at_first = metric(server.http, "arbiter_running_sequences");
  }
  const grpc::Status s = reader->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message() << server.process->log();
  ASSERT_EQ(events.size(), 3u);
  ASSERT_TRUE(events[0].has_policy_result());
  ASSERT_TRUE(events[1].has_policy_result());
  ASSERT_TRUE(events[2].has_response());
  EXPECT_EQ(events[0].policy_result().index(), 1) << "the short policy ends first";
  EXPECT_EQ(events[0].policy_result().result().policy_id(), "short");
  EXPECT_EQ(events[1].policy_result().index(), 0);
  EXPECT_EQ(events[1].policy_result().result().policy_id(), "long");
  EXPECT_EQ(running_at_first, 1) << "the first result came only after every policy had ended";
  EXPECT_LT(arrived[0], arrived[1]);
  // Each early result is the one in the final response.
  const wire::ClassifyResponse& final_response = events[2].response();
  ASSERT_EQ(final_response.results_size(), 2);
  for (int i = 0; i < 2; ++i) {
    const auto& early = events[static_cast<size_t>(i)].policy_result();
    EXPECT_EQ(to_json(early.result()), to_json(final_response.results(early.index())));
  }
  EXPECT_EQ(final_response.usage().completion_tokens(),
            final_response.results(0).usage().completion_tokens() + final_response.results(1).usage().completion_tokens());

  // The stream's response is the unary answer (greedy).
  auto uctx = context();
  wire::ClassifyResponse unary;
  ASSERT_TRUE(stub->Classify(uctx.get(), request, &unary).ok());
  EXPECT_EQ(essence(to_json(unary)), essence(to_json(final_response)));

  // An error before any result ends the stream with the status and no message.
  request.mutable_policies(0)->clear_text();
  request.mutable_policies(0)->set_id("missing");
  auto ectx = context();
  auto failing = stub->ClassifyStream(ectx.get(), request);
  wire::ClassifyStreamEvent e;
  EXPECT_FALSE(failing->Read(&e));
  const grpc::Status fs = failing->Finish();
  EXPECT_EQ(fs.error_code(), grpc::StatusCode::NOT_FOUND) << fs.error_message();
  EXPECT_EQ(trailer(*ectx, "arbiter-error-code"), "policy_not_found");
}

TEST_F(ApiGrpc, PoliciesCreateListGetDelete) {
  Endpoints server = start_server(args(), file("policies.log"));
  auto stub = stub_for(server.grpc);
  ASSERT_TRUE(wait_ready(*stub, 60)) << server.process->log();
  auto create = [&](const std::string& text, wire::Policy* out) {
    wire::PolicyCreateRequest p;
    p.set_id("rules");
    p.set_text(text);
    p.set_description("test policy");
    auto ctx = context();
    return stub->CreatePolicy(ctx.get(), p, out);
  };
  wire::Policy v1, v2;
  ASSERT_TRUE(create("First version. Answer 0 or 1.", &v1).ok());
  ASSERT_TRUE(create("Second version. Answer 0 or 1.", &v2).ok());
  EXPECT_EQ(v1.version(), 1);
  EXPECT_EQ(v2.version(), 2);
  EXPECT_EQ(v2.object(), "policy");
  EXPECT_EQ(v2.description(), "test policy");

  auto get = [&](const std::string& id, wire::Policy* out, std::unique_ptr<grpc::ClientContext>* keep = nullptr) {
    wire::PolicyRef ref;
    ref.set_id(id);
    auto ctx = context();
    const grpc::Status s = stub->GetPolicy(ctx.get(), ref, out);
    if (keep) *keep = std::move(ctx);
    return s;
  };
  wire::Policy got;
  ASSERT_TRUE(get("rules", &got).ok());
  EXPECT_EQ(got.version(), 2);
  EXPECT_EQ(std::vector<int>(got.versions().begin(), got.versions().end()), (std::vector<int>{1, 2}));
  ASSERT_TRUE(get("rules@1", &got).ok());
  EXPECT_EQ(got.text(), "First version. Answer 0 or 1.");

  auto lctx = context();
  wire::PolicyList list;
  ASSERT_TRUE(stub->ListPolicies(lctx.get(), {}, &list).ok());
  ASSERT_EQ(list.data_size(), 1);
  EXPECT_EQ(list.data(0).id(), "rules");
  EXPECT_EQ(list.data(0).version(), 2);

  wire::PolicyRef ref;
  ref.set_id("rules@1");
  wire::PolicyDeleted deleted;
  auto dctx = context();
  ASSERT_TRUE(stub->DeletePolicy(dctx.get(), ref, &deleted).ok());
  EXPECT_TRUE(deleted.deleted());
  EXPECT_EQ(std::vector<int>(deleted.versions().begin(), deleted.versions().end()), (std::vector<int>{1}));
  std::unique_ptr<grpc::ClientContext> kept;
  grpc::Status s = get("rules@1", &got, &kept);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(trailer(*kept, "arbiter-error-code"), "policy_not_found");
  EXPECT_EQ(trailer(*kept, "arbiter-error-param"), "id");
  s = get("bad@ref@", &got, &kept);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(trailer(*kept, "arbiter-error-param"), "id");

  ref.set_id("rules");
  auto d2 = context();
  ASSERT_TRUE(stub->DeletePolicy(d2.get(), ref, &deleted).ok());
  EXPECT_EQ(std::vector<int>(deleted.versions().begin(), deleted.versions().end()), (std::vector<int>{2}));
  auto l2 = context();
  ASSERT_TRUE(stub->ListPolicies(l2.get(), {}, &list).ok());
  EXPECT_EQ(list.data_size(), 0);
  auto d3 = context();
  EXPECT_EQ(stub->DeletePolicy(d3.get(), ref, &deleted).error_code(), grpc::StatusCode::NOT_FOUND);

  // A bad policy: the param names the field.
  wire::PolicyCreateRequest bad;
  bad.set_id("has space");
  bad.set_text("x");
  auto bctx = context();
  EXPECT_EQ(stub->CreatePolicy(bctx.get(), bad, &got).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(trailer(*bctx, "arbiter-error-param"), "id");
  EXPECT_EQ(trailer(*bctx, "arbiter-error-code"), "invalid_value");
}

TEST_F(ApiGrpc, ErrorsBecomeStatusCodesWithMetadata) {
  Endpoints server = start_server(args(), file("errors.log"));
  auto stub = stub_for(server.grpc);
  ASSERT_TRUE(wait_ready(*stub, 60)) << server.process->log();
  wire::ClassifyRequest ok_request;
  ok_request.set_content("hi");
  ok_request.set_max_tokens(4);
  auto* inline_policy = ok_request.add_policies();
  inline_policy->set_id("a");
  inline_policy->set_text("Policy A. Answer 0 or 1.");
  auto classify = [&](const wire::ClassifyRequest& r, const std::string& key, std::unique_ptr<grpc::ClientContext>* keep = nullptr) {
    auto ctx = context(key);
    wire::ClassifyResponse out;
    const grpc::Status s = stub->Classify(ctx.get(), r, &out);
    if (keep) *keep = std::move(ctx);
    return s;
  };
  std::unique_ptr<grpc::ClientContext> ctx;
  EXPECT_TRUE(classify(ok_request, kKey).ok());
  EXPECT_TRUE(classify(ok_request, "key-two").ok());

  // Authentication.
  EXPECT_EQ(classify(ok_request, "", &ctx).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(trailer(*ctx, "arbiter-error-code"), "invalid_api_key");
  EXPECT_EQ(classify(ok_request, "key-three", &ctx).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  {
    auto pctx = context("");
    wire::PolicyList list;
    EXPECT_EQ(stub->ListPolicies(pctx.get(), {}, &list).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }

  // Bad input: INVALID_ARGUMENT, the field in arbiter-error-param.
  wire::ClassifyRequest bad = ok_request;
  bad.set_reasoning_effort("extreme");
  grpc::Status s = classify(bad, kKey, &ctx);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("extreme"), std::string::npos) << s.error_message();
  EXPECT_EQ(trailer(*ctx, "arbiter-error-param"), "reasoning_effort");
  EXPECT_EQ(trailer(*ctx, "arbiter-error-code"), "invalid_value");
  EXPECT_EQ(trailer(*ctx, "arbiter-error-type"), "invalid_request_error");
  bad = ok_request;
  bad.mutable_policies(0)->set_text("");
  EXPECT_EQ(classify(bad, kKey, &ctx).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(trailer(*ctx, "arbiter-error-param"), "policies[0].text");
  bad = ok_request;
  bad.set_content("");
  EXPECT_EQ(classify(bad, kKey, &ctx).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(trailer(*ctx, "arbiter-error-code"), "empty_content");
  bad = ok_request;
  bad.set_timeout(-1);
  EXPECT_EQ(classify(bad, kKey, &ctx).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(trailer(*ctx, "arbiter-error-param"), "timeout");
  bad = ok_request;
  bad.set_model("other-model");
  EXPECT_EQ(classify(bad, kKey, &ctx).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(trailer(*ctx, "arbiter-error-code"), "model_not_found");
  std::string long_content;
  for (int i = 0; i < 5000; ++i) long_content += " word" + std::to_string(i);
  bad = ok_request;
  bad.set_content(long_content);
  EXPECT_EQ(classify(bad, kKey, &ctx).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(trailer(*ctx, "arbiter-error-code"), "context_length_exceeded");

  // Unknown policy.
  bad = ok_request;
  bad.mutable_policies(0)->clear_text();
  bad.mutable_policies(0)->set_id("missing");
  s = classify(bad, kKey, &ctx);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(trailer(*ctx, "arbiter-error-code"), "policy_not_found");
  EXPECT_EQ(trailer(*ctx, "arbiter-error-param"), "policies[0].id");

  // A message over --max-body-bytes: RESOURCE_EXHAUSTED (gRPC's own check), the server lives on.
  bad = ok_request;
  bad.set_content(std::string(70000, 'x'));
  EXPECT_EQ(classify(bad, kKey, &ctx).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  // A message under the limit whose JSON form is over it (every control character is 6 bytes in
  // JSON): 413 from the server, also RESOURCE_EXHAUSTED, with its code.
  bad.set_content(std::string(20000, '\x01'));
  EXPECT_EQ(classify(bad, kKey, &ctx).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(trailer(*ctx, "arbiter-error-code"), "request_too_large");

  // Queue full (one request may wait): RESOURCE_EXHAUSTED with retry-after.
  {
    wire::ClassifyRequest many;
    many.set_content("burst");
    many.set_max_tokens(8);
    for (int k = 0; k < 4; ++k) {
      auto* p = many.add_policies();
      p->set_id("q" + std::to_string(k));
      p->set_text(kPolicyTexts[k]);
    }
    std::vector<grpc::StatusCode> codes(24);
    std::vector<std::string> retry(24), code(24);
    std::vector<std::thread> threads;
    for (int i = 0; i < 24; ++i)
      threads.emplace_back([&, i] {
        std::unique_ptr<grpc::ClientContext> c;
        codes[static_cast<size_t>(i)] = classify(many, kKey, &c).error_code();
        retry[static_cast<size_t>(i)] = trailer(*c, "retry-after");
        code[static_cast<size_t>(i)] = trailer(*c, "arbiter-error-code");
      });
    for (auto& t : threads) t.join();
    int ok = 0, full = 0;
    for (size_t i = 0; i < codes.size(); ++i) {
      if (codes[i] == grpc::StatusCode::OK) ++ok;
      if (codes[i] == grpc::StatusCode::RESOURCE_EXHAUSTED) {
        ++full;
        EXPECT_EQ(retry[i], "1");
        EXPECT_EQ(code[i], "queue_full");
      }
      EXPECT_TRUE(codes[i] == grpc::StatusCode::OK || codes[i] == grpc::StatusCode::RESOURCE_EXHAUSTED) << codes[i];
    }
    EXPECT_GE(ok, 1);
    EXPECT_GE(full, 1);
  }

  // An unknown method.
  grpc::GenericStub generic(grpc::CreateChannel("127.0.0.1:" + std::to_string(server.grpc), grpc::InsecureChannelCredentials()));
  EXPECT_EQ(raw_call(generic, kService + "Nothing", "").status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_TRUE(classify(ok_request, kKey).ok());
}

TEST_F(ApiGrpc, DeadlinesAndCancellationsReachTheScheduler) {
  Endpoints server = start_server(args(), file("cancel.log"));
  auto stub = stub_for(server.grpc);
  ASSERT_TRUE(wait_ready(*stub, 60)) << server.process->log();
  wire::ClassifyRequest slow;
  slow.set_content("tell me everything");
  slow.set_max_tokens(3000);
  auto* p = slow.add_policies();
  p->set_id("a");
  p->set_text("Policy A. Answer 0 or 1.");
  const std::string deadline_series = "arbiter_sequences_finished_total{reason=\"deadline\"}";
  const std::string cancelled_series = "arbiter_sequences_finished_total{reason=\"cancelled\"}";

  // A short client deadline: the client sees DEADLINE_EXCEEDED, and the server ended the sequence
  // at that deadline (not at its own 120 s timeout).
  const double deadlines_before = std::max(0.0, metric(server.http, deadline_series));
  {
    auto ctx = context(kKey, 0.5);
    wire::ClassifyResponse out;
    const auto t0 = Clock::now();
    EXPECT_EQ(stub->Classify(ctx.get(), slow, &out).error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
    EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
  }
  EXPECT_GE(wait_metric(server.http, deadline_series, deadlines_before + 1, 10), deadlines_before + 1) << metrics_text(server.http);
  // A request `timeout` longer than the deadline is shortened the same way; a stream too.
  {
    wire::ClassifyRequest r = slow;
    r.set_timeout(100);
    auto ctx = context(kKey, 0.5);
    auto reader = stub->ClassifyStream(ctx.get(), r);
    wire::ClassifyStreamEvent e;
    while (reader->Read(&e)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  EXPECT_GE(wait_metric(server.http, deadline_series, deadlines_before + 2, 10), deadlines_before + 2);

  // Cancelled calls (unary and streaming) cancel their generation.
  const double cancelled_before = std::max(0.0, metric(server.http, cancelled_series));
  {
    auto ctx = context();
    std::thread canceller([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(400));
      ctx->TryCancel();
    });
    wire::ClassifyResponse out;
    EXPECT_EQ(stub->Classify(ctx.get(), slow, &out).error_code(), grpc::StatusCode::CANCELLED);
    canceller.join();
  }
  EXPECT_GE(wait_metric(server.http, cancelled_series, cancelled_before + 1), cancelled_before + 1) << metrics_text(server.http);
  {
    auto ctx = context();
    auto reader = stub->ClassifyStream(ctx.get(), slow);
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    ctx->TryCancel();
    wire::ClassifyStreamEvent e;
    while (reader->Read(&e)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  EXPECT_GE(wait_metric(server.http, cancelled_series, cancelled_before + 2), cancelled_before + 2) << metrics_text(server.http);
  // Nothing ran to its end.
  EXPECT_LE(metric(server.http, "arbiter_sequences_finished_total{reason=\"length\"}"), 0);
}

TEST_F(ApiGrpc, RandomBytesAndRandomFieldsAlwaysGetAStatus) {
  Endpoints server = start_server(args(), file("fuzz.log"));
  auto stub = stub_for(server.grpc);
  ASSERT_TRUE(wait_ready(*stub, 60)) << server.process->log();
  grpc::GenericStub generic(grpc::CreateChannel("127.0.0.1:" + std::to_string(server.grpc), grpc::InsecureChannelCredentials()));
  const char* methods[] = {"Classify", "CreatePolicy", "ListPolicies", "GetPolicy", "DeletePolicy", "ListModels", "Health", "Ready"};
  // Server failures: a crash (UNAVAILABLE), an exception (UNKNOWN) or an internal error.
  auto server_failed = [](grpc::StatusCode c) {
    return c == grpc::StatusCode::UNAVAILABLE || c == grpc::StatusCode::UNKNOWN || c == grpc::StatusCode::INTERNAL;
  };

  // Bytes that are not a message: INVALID_ARGUMENT (a string that is not UTF-8; a truncated field).
  const std::string not_utf8 = std::string("\x12\x02\xff\xfe", 4);  // content = "\xff\xfe"
  RawResult r = raw_call(generic, kService + "Classify", not_utf8);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << r.status.error_message();
  r = raw_call(generic, kService + "GetPolicy", std::string("\x0a\x10xy", 4));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << r.status.error_message();
  // Valid bytes through the generic stub are a normal call.
  wire::ClassifyRequest good;
  good.set_content("hello");
  good.set_max_tokens(2);
  auto* gp = good.add_policies();
  gp->set_id("g");
  gp->set_text("Answer 0 or 1.");
  r = raw_call(generic, kService + "Classify", good.SerializeAsString());
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  wire::ClassifyResponse parsed;
  ASSERT_TRUE(parsed.ParseFromString(r.body));
  EXPECT_EQ(parsed.results_size(), 1);

  std::mt19937 rng(7);
  int invalid = 0, calls = 0;
  for (int i = 0; i < 240; ++i) {
    std::string junk(rng() % 200, '\0');
    for (char& c : junk) c = static_cast<char>(rng() % 256);
    const std::string method = methods[static_cast<size_t>(i) % std::size(methods)];
    r = raw_call(generic, kService + method, junk, kKey, 10);
    ++calls;
    if (r.status.error_code() == grpc::StatusCode::INVALID_ARGUMENT) ++invalid;
    EXPECT_FALSE(server_failed(r.status.error_code())) << method << ": " << r.status.error_code() << " " << r.status.error_message();
  }
  EXPECT_GT(invalid, calls / 4);  // most random bytes are not a valid message

  // Random field values through the typed stub.
  auto random_text = [&](size_t max_len) {
    static const std::string kAlphabet = "abcXYZ019 @._-/\n\t{}\"\\%\xc3\xa9";
    std::string s(rng() % (max_len + 1), ' ');
    for (char& c : s) c = kAlphabet[rng() % (kAlphabet.size() - 2)];
    if (rng() % 4 == 0) s += "\xc3\xa9";  // valid UTF-8 beyond ASCII
    return s;
  };
  const double numbers[] = {0, -1, 1e-9, 0.5, 3, 1e300, std::numeric_limits<double>::infinity(), std::nan("")};
  for (int i = 0; i < 60; ++i) {
    wire::ClassifyRequest req;
    if (rng() % 5) req.set_content(random_text(40));
    const int n = static_cast<int>(rng() % 4);
    for (int k = 0; k < n; ++k) {
      auto* p = req.add_policies();
      if (rng() % 3) p->set_id(random_text(12));
      if (rng() % 2) p->set_text(random_text(60));
      if (rng() % 4 == 0) p->add_labels(random_text(5));
      if (rng() % 6 == 0) p->add_violating_labels(random_text(5));
    }
    if (rng() % 3 == 0) req.set_reasoning_effort(rng() % 2 ? "low" : random_text(6));
    if (rng() % 5) req.set_max_tokens(static_cast<int32_t>(rng() % 3) == 0 ? -static_cast<int32_t>(rng() % 100) : static_cast<int32_t>(rng() % 6));
    if (rng() % 3 == 0) req.set_timeout(numbers[rng() % std::size(numbers)]);
    if (rng() % 5 == 0) req.set_model(random_text(8));
    if (rng() % 4 == 0) req.set_return_reasoning(rng() % 2);
    auto ctx = context(kKey, 20);
    wire::ClassifyResponse out;
    const grpc::Status s = stub->Classify(ctx.get(), req, &out);
    EXPECT_FALSE(server_failed(s.error_code())) << req.DebugString() << " -> " << s.error_code() << " " << s.error_message();
    if (!s.ok()) {
      EXPECT_NE(trailer(*ctx, "arbiter-error-code"), "<absent>") << req.DebugString() << s.error_message();
    }

    wire::PolicyCreateRequest pc;
    pc.set_id(random_text(10));
    if (rng() % 4) pc.set_text(random_text(50));
    if (rng() % 3 == 0) pc.add_labels(random_text(4));
    if (rng() % 3 == 0) pc.add_violating_labels(random_text(4));
    auto pctx = context();
    wire::Policy policy;
    const grpc::Status ps = stub->CreatePolicy(pctx.get(), pc, &policy);
    EXPECT_FALSE(server_failed(ps.error_code())) << pc.DebugString() << " -> " << ps.error_message();
    wire::PolicyRef ref;
    ref.set_id(random_text(10));
    auto gctx = context();
    const grpc::Status gs = stub->GetPolicy(gctx.get(), ref, &policy);
    EXPECT_TRUE(gs.error_code() == grpc::StatusCode::OK || gs.error_code() == grpc::StatusCode::NOT_FOUND ||
                gs.error_code() == grpc::StatusCode::INVALID_ARGUMENT)
        << ref.id() << " -> " << gs.error_code() << " " << gs.error_message();
  }

  // Still serving; grpc.health.v1 says so (HealthCheckResponse{status: SERVING} is 08 01).
  auto ctx = context();
  wire::ClassifyResponse out;
  EXPECT_TRUE(stub->Classify(ctx.get(), good, &out).ok());
  r = raw_call(generic, "/grpc.health.v1.Health/Check", "", "");
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.body, std::string("\x08\x01", 2));
  const std::string service = "arbiter.api.wire.Arbiter";
  r = raw_call(generic, "/grpc.health.v1.Health/Check", "\x0a" + std::string(1, static_cast<char>(service.size())) + service, "");
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.body, std::string("\x08\x01", 2));
}

}  // namespace
}  // namespace arbiter
