// The API's request parsing and validation without a model: bodies go through ApiServer::handle()
// (no sockets). Random bytes, every truncation of valid bodies and a wrong JSON type in every
// field of every request message all get a clean OpenAI-style 4xx error naming the field, never a
// crash; semantic checks (empty content, no policies, unknown policy, body limit, keys) answer
// with their codes.
#include <gtest/gtest.h>

#include <google/protobuf/descriptor.h>

#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "api/api.pb.h"
#include "api/json_io.h"
#include "api/server.h"

namespace arbiter::api {
namespace {

using nlohmann::json;

HttpRequest post(const std::string& path, const std::string& body) {
  HttpRequest r;
  r.method = "POST";
  r.path = path;
  r.body = body;
  return r;
}

HttpRequest get(const std::string& path) {
  HttpRequest r;
  r.method = "GET";
  r.path = path;
  return r;
}

// The reply is an error body of the documented shape; returns it.
json expect_error_body(const HttpReply& reply) {
  const json j = json::parse(reply.body, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << reply.body;
  if (j.is_discarded()) return json::object();
  EXPECT_TRUE(j.contains("error")) << reply.body;
  const json& e = j["error"];
  EXPECT_TRUE(e["message"].is_string()) << reply.body;
  EXPECT_TRUE(e["type"].is_string()) << reply.body;
  EXPECT_TRUE(e.contains("param") && (e["param"].is_null() || e["param"].is_string())) << reply.body;
  EXPECT_TRUE(e.contains("code") && (e["code"].is_null() || e["code"].is_string())) << reply.body;
  return e;
}

const char* kValidClassify =
    R"({"content": "buy cheap pills", "policies": [{"id": "spam", "text": "Spam is bad.", "labels": ["0", "1"],)"
    R"( "violating_labels": ["1"]}], "reasoning_effort": "low", "return_reasoning": true, "max_tokens": 16, "timeout": 5})";
const char* kValidChat =
    R"({"model": "m", "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],)"
    R"( "reasoning_effort": "low", "max_tokens": 8, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})";
const char* kValidPolicy = R"({"id": "spam", "text": "Spam is bad.", "labels": ["0", "1"], "violating_labels": ["1"], "description": "d"})";

TEST(ApiParse, ValidBodiesPassTheParser) {
  wire::ClassifyRequest c;
  parse_json(kValidClassify, c);
  EXPECT_EQ(c.content(), "buy cheap pills");
  EXPECT_EQ(c.policies(0).labels_size(), 2);
  EXPECT_TRUE(c.has_max_tokens());
  wire::ChatCompletionRequest chat;
  parse_json(kValidChat, chat);
  EXPECT_TRUE(chat.stream());
  EXPECT_EQ(chat.messages(1).content().string_value(), "hi");
}

TEST(ApiParse, UnknownFieldsAreIgnoredAndNullIsTheDefault) {
  wire::ChatCompletionRequest chat;
  parse_json(R"({"messages": [{"role": "user", "content": "x", "tool_calls": null}], "user": "u", "logit_bias": {"1": 2},)"
             R"( "frequency_penalty": 0, "max_tokens": null, "stop": null})",
             chat);
  EXPECT_FALSE(chat.has_max_tokens());
}

TEST(ApiParse, TypeErrorsNameTheField) {
  struct Case {
    const char* body;
    const char* param;
  };
  const Case cases[] = {
      {R"({"content": 5, "policies": []})", "content"},
      {R"({"content": "x", "policies": {}})", "policies"},
      {R"({"content": "x", "policies": [1]})", "policies[0]"},
      {R"({"content": "x", "policies": [{"id": "a", "text": 1}]})", "policies[0].text"},
      {R"({"content": "x", "policies": [{"id": "a", "labels": "0"}]})", "policies[0].labels"},
      {R"({"content": "x", "policies": [{"id": "a", "labels": [0]}]})", "policies[0].labels[0]"},
      {R"({"content": "x", "max_tokens": "7"})", "max_tokens"},
      {R"({"content": "x", "max_tokens": 1.5})", "max_tokens"},
      {R"({"content": "x", "max_tokens": 99999999999})", "max_tokens"},
      {R"({"content": "x", "return_reasoning": "true"})", "return_reasoning"},
      {R"({"content": "x", "timeout": "1"})", "timeout"},
      {R"({"content": "x", "policies": [null]})", "policies[0]"},
  };
  for (const Case& c : cases) {
    wire::ClassifyRequest out;
    try {
      parse_json(c.body, out);
      ADD_FAILURE() << "accepted " << c.body;
    } catch (const ApiException& e) {
      EXPECT_EQ(e.error().status, 400) << c.body;
      EXPECT_EQ(e.error().param, c.param) << c.body << ": " << e.error().message;
    }
  }
}

TEST(ApiParse, MalformedJsonIsA400) {
  for (const char* body : {"", "{", "[1]", "\"x\"", "nul", "{\"content\": \"\\ud800\"}", "{\"content\": \"\xff\"}",
                           "{\"a\":1,}", "{'a': 1}", "{\"content\": 1e999}"}) {
    wire::ClassifyRequest out;
    EXPECT_THROW(parse_json(body, out), ApiException) << body;
  }
  std::string deep(10000, '[');
  wire::ClassifyRequest out;
  EXPECT_THROW(parse_json("{\"content\": " + deep, out), ApiException);
}

// A JSON value of each type, for substitution.
std::vector<json> samples() { return {json(nullptr), json(true), json(7), json(1.5), json("s"), json::array({1}), json::object({{"k", 1}})}; }

bool type_fits(const json& v, const google::protobuf::FieldDescriptor& f, bool element) {
  using F = google::protobuf::FieldDescriptor;
  if (v.is_null()) return !element || (f.message_type() && f.message_type()->full_name() == "google.protobuf.Value");
  if (f.is_repeated() && !element) return v.is_array();
  switch (f.cpp_type()) {
    case F::CPPTYPE_STRING: return v.is_string();
    case F::CPPTYPE_BOOL: return v.is_boolean();
    case F::CPPTYPE_INT32:
    case F::CPPTYPE_INT64:
    case F::CPPTYPE_UINT32:
    case F::CPPTYPE_UINT64: return v.is_number_integer();
    case F::CPPTYPE_FLOAT:
    case F::CPPTYPE_DOUBLE: return v.is_number();
    case F::CPPTYPE_MESSAGE: {
      const std::string& n = f.message_type()->full_name();
      if (n == "google.protobuf.Value") return true;
      if (n == "google.protobuf.ListValue") return v.is_array();
      return v.is_object();
    }
    default: return true;
  }
}

// Every field path of a message type (nested messages through one level of arrays), with the
// descriptor of the field, so a wrong type can be put at each.
void field_paths(const google::protobuf::Descriptor& d, const json::json_pointer& at, const std::string& path, int depth,
                 std::vector<std::tuple<json::json_pointer, std::string, const google::protobuf::FieldDescriptor*, bool>>& out) {
  if (depth > 3) return;
  for (int i = 0; i < d.field_count(); ++i) {
    const auto* f = d.field(i);
    const std::string p = path.empty() ? f->name() : path + "." + f->name();
    out.emplace_back(at / f->name(), p, f, false);
    if (f->is_repeated()) out.emplace_back(at / f->name() / 0, p + "[0]", f, true);
    if (f->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_MESSAGE &&
        f->message_type()->full_name().rfind("google.protobuf.", 0) != 0) {
      if (f->is_repeated()) field_paths(*f->message_type(), at / f->name() / 0, p + "[0]", depth + 1, out);
      else field_paths(*f->message_type(), at / f->name(), p, depth + 1, out);
    }
  }
}

void wrong_types_everywhere(const std::string& endpoint, const char* valid, const google::protobuf::Descriptor& type) {
  ApiServer server(ApiOptions{});
  std::vector<std::tuple<json::json_pointer, std::string, const google::protobuf::FieldDescriptor*, bool>> paths;
  field_paths(type, json::json_pointer(), "", 0, paths);
  int checked = 0;
  for (const auto& [ptr, path, field, element] : paths) {
    for (const json& v : samples()) {
      if (type_fits(v, *field, element)) continue;
      json body = json::parse(valid);
      // Make room for the path (arrays get one element, objects are created).
      try {
        body[ptr] = v;
      } catch (const json::exception&) {
        continue;  // the parent is a scalar in the valid body
      }
      const HttpReply r = server.handle(post(endpoint, body.dump()));
      EXPECT_EQ(r.status, 400) << endpoint << " " << path << " = " << v.dump() << " -> " << r.body;
      const json e = expect_error_body(r);
      EXPECT_EQ(e.value("param", json()).is_string() ? e["param"].get<std::string>() : "", path)
          << endpoint << " " << path << " = " << v.dump() << " -> " << r.body;
      ++checked;
    }
  }
  EXPECT_GT(checked, 20) << endpoint;
}

TEST(ApiParse, WrongTypeInEveryClassifyFieldIsA400NamingIt) {
  wrong_types_everywhere("/v1/classify", kValidClassify, *wire::ClassifyRequest::descriptor());
}
TEST(ApiParse, WrongTypeInEveryChatFieldIsA400NamingIt) {
  wrong_types_everywhere("/v1/chat/completions", kValidChat, *wire::ChatCompletionRequest::descriptor());
}
TEST(ApiParse, WrongTypeInEveryPolicyFieldIsA400NamingIt) {
  wrong_types_everywhere("/v1/policies", kValidPolicy, *wire::PolicyCreateRequest::descriptor());
}

// Model endpoints without a model: bad input is 4xx, good input 503 (loading). Never anything else.
void expect_clean(const HttpReply& r, const std::string& what) {
  EXPECT_TRUE((r.status >= 400 && r.status < 500) || r.status == 503) << what << " -> " << r.status << " " << r.body;
  expect_error_body(r);
}

TEST(ApiFuzz, RandomBytesTruncationsAndMutationsGetCleanErrors) {
  ApiServer server(ApiOptions{});
  std::mt19937 rng(1234);
  const std::vector<std::pair<std::string, std::string>> valid = {
      {"/v1/classify", kValidClassify}, {"/v1/chat/completions", kValidChat}, {"/v1/policies", kValidPolicy}};
  int n = 0;
  for (const auto& [path, body] : valid) {
    // Every truncation.
    for (size_t len = 0; len < body.size(); ++len) {
      const HttpReply r = server.handle(post(path, body.substr(0, len)));
      EXPECT_EQ(r.status, 400) << path << " truncated to " << len;
      expect_error_body(r);
      ++n;
    }
    // Random bytes, and valid bodies with random bytes flipped.
    for (int i = 0; i < 300; ++i) {
      std::string junk(rng() % 200, '\0');
      for (char& c : junk) c = static_cast<char>(rng() % 256);
      expect_clean(server.handle(post(path, junk)), path + " random");
      std::string mutated = body;
      for (int k = 0, flips = 1 + static_cast<int>(rng() % 4); k < flips; ++k)
        mutated[rng() % mutated.size()] = static_cast<char>(rng() % 256);
      const HttpReply r = server.handle(post(path, mutated));
      if (r.status == 201 || r.status == 200) {
        EXPECT_EQ(path, "/v1/policies") << mutated;  // a policy can still be valid after a flip
        continue;
      }
      expect_clean(r, path + " mutated: " + mutated);
      n += 2;
    }
  }
  EXPECT_GT(n, 1000);
  // Still answering.
  EXPECT_EQ(server.handle(get("/health")).status, 200);
}

TEST(ApiValidation, SemanticErrorsHaveTheirStatusParamAndCode) {
  ApiOptions o;
  o.max_body_bytes = 4096;
  ApiServer server(o);
  struct Case {
    std::string path, body;
    int status;
    std::string param, code;
  };
  const std::vector<Case> cases = {
      {"/v1/classify", R"({"content": "", "policies": [{"text": "p"}]})", 400, "content", "empty_content"},
      {"/v1/classify", R"({"policies": [{"text": "p"}]})", 400, "content", "empty_content"},
      {"/v1/classify", R"({"content": "x", "policies": []})", 400, "policies", "no_policies"},
      {"/v1/classify", R"({"content": "x"})", 400, "policies", "no_policies"},
      {"/v1/classify", R"({"content": "x", "policies": [{"text": ""}]})", 400, "policies[0].text", "empty_policy"},
      {"/v1/classify", R"({"content": "x", "policies": [{}]})", 400, "policies[0]", "missing_policy"},
      {"/v1/classify", R"({"content": "x", "policies": [{"id": "nope"}]})", 404, "policies[0].id", "policy_not_found"},
      {"/v1/classify", R"({"content": "x", "policies": [{"id": "nope@2"}]})", 404, "policies[0].id", "policy_not_found"},
      {"/v1/classify", R"({"content": "x", "policies": [{"id": "bad id"}]})", 400, "policies[0].id", "invalid_value"},
      {"/v1/classify", R"({"content": "x", "policies": [{"text": "p"}], "reasoning_effort": "max"})", 400, "reasoning_effort", "invalid_value"},
      {"/v1/classify", R"({"content": "x", "policies": [{"text": "p"}], "max_tokens": 0})", 400, "max_tokens", "invalid_value"},
      {"/v1/classify", R"({"content": "x", "policies": [{"text": "p"}], "timeout": -1})", 400, "timeout", "invalid_value"},
      {"/v1/classify", R"({"content": "x", "policies": [{"text": "p", "labels": ["A"], "violating_labels": ["B"]}]})", 400,
       "policies[0].violating_labels[0]", "invalid_value"},
      {"/v1/classify", R"({"content": "x", "policies": [{"id": "a", "text": "p"}, {"id": "a", "text": "q"}]})", 400,
       "policies[1].id", "duplicate_policy"},
      {"/v1/classify", "{\"content\": \"" + std::string(5000, 'x') + "\"}", 413, "", "request_too_large"},
      {"/v1/classify", R"({"content": "x", "policies": [{"text": "p"}]})", 503, "", "model_loading"},
      {"/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}]})", 503, "", "model_loading"},
      {"/v1/policies", R"({"text": "p"})", 400, "id", "missing_required_parameter"},
      {"/v1/policies", R"({"id": "a/b", "text": "p"})", 400, "id", "invalid_value"},
      {"/v1/policies", R"({"id": "a", "text": ""})", 400, "text", "empty_policy"},
      {"/v1/nothing", "{}", 404, "", "unknown_path"},
  };
  for (const Case& c : cases) {
    const HttpReply r = server.handle(post(c.path, c.body));
    EXPECT_EQ(r.status, c.status) << c.path << " " << c.body.substr(0, 200) << " -> " << r.body;
    const json e = expect_error_body(r);
    EXPECT_EQ(e["param"].is_null() ? "" : e["param"].get<std::string>(), c.param) << c.body.substr(0, 200);
    EXPECT_EQ(e["code"].is_null() ? "" : e["code"].get<std::string>(), c.code) << c.body.substr(0, 200);
  }
  const HttpReply loading = server.handle(post("/v1/classify", R"({"content": "x", "policies": [{"text": "p"}]})"));
  bool retry_after = false;
  for (const auto& [k, v] : loading.headers) retry_after |= k == "Retry-After";
  EXPECT_TRUE(retry_after);
  HttpRequest wrong_method = get("/v1/classify");
  EXPECT_EQ(server.handle(wrong_method).status, 405);
  EXPECT_EQ(server.handle(get("/ready")).status, 503);
  EXPECT_EQ(server.handle(get("/health")).status, 200);
  EXPECT_EQ(server.handle(get("/v1/models")).status, 503);
}

TEST(ApiValidation, ApiKeys) {
  ApiOptions o;
  o.keys = ApiKeys({"secret-1", " secret-2 "});
  ApiServer server(o);
  HttpRequest r = get("/v1/policies");
  EXPECT_EQ(server.handle(r).status, 401);
  EXPECT_EQ(expect_error_body(server.handle(r))["code"], "invalid_api_key");
  r.headers["authorization"] = "Bearer wrong";
  EXPECT_EQ(server.handle(r).status, 401);
  r.headers["authorization"] = "Bearer secret-1x";
  EXPECT_EQ(server.handle(r).status, 401);
  r.headers["authorization"] = "Bearer secret-2";
  EXPECT_EQ(server.handle(r).status, 200);
  r.headers["authorization"] = "bearer secret-1";
  EXPECT_EQ(server.handle(r).status, 200);
  // Probes and the scraper need no key.
  EXPECT_EQ(server.handle(get("/health")).status, 200);
  EXPECT_EQ(server.handle(get("/metrics")).status, 200);
}

TEST(ApiPolicies, VersionsThroughTheEndpoints) {
  ApiServer server(ApiOptions{});
  auto body = [](const HttpReply& r) { return json::parse(r.body); };
  HttpReply r = server.handle(post("/v1/policies", R"({"id": "spam", "text": "v1 text"})"));
  ASSERT_EQ(r.status, 201) << r.body;
  EXPECT_EQ(body(r)["version"], 1);
  r = server.handle(post("/v1/policies", R"({"id": "spam", "text": "v1 text"})"));
  EXPECT_EQ(r.status, 200);  // unchanged: no new version
  EXPECT_EQ(body(r)["version"], 1);
  r = server.handle(post("/v1/policies", R"({"id": "spam", "text": "v2 text", "labels": ["0", "1"]})"));
  EXPECT_EQ(r.status, 201);
  EXPECT_EQ(body(r)["version"], 2);
  EXPECT_EQ(body(r)["versions"], json::array({1, 2}));
  EXPECT_EQ(body(server.handle(get("/v1/policies/spam")))["text"], "v2 text");
  EXPECT_EQ(body(server.handle(get("/v1/policies/spam@1")))["text"], "v1 text");
  EXPECT_EQ(server.handle(get("/v1/policies/spam@3")).status, 404);
  EXPECT_EQ(server.handle(get("/v1/policies/sp@m")).status, 400);
  ASSERT_EQ(server.handle(post("/v1/policies", R"({"id": "hate", "text": "h"})")).status, 201);
  const json list = body(server.handle(get("/v1/policies")));
  ASSERT_EQ(list["data"].size(), 2u);
  EXPECT_EQ(list["data"][0]["id"], "hate");
  EXPECT_EQ(list["data"][1]["version"], 2);
  HttpRequest del = get("/v1/policies/spam@2");
  del.method = "DELETE";
  r = server.handle(del);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(body(r)["versions"], json::array({2}));
  EXPECT_EQ(body(server.handle(get("/v1/policies/spam")))["version"], 1);  // back to the previous version
  r = server.handle(del);
  EXPECT_EQ(r.status, 404);
  // Referenced by a classify request: found (503 only because no model is loaded here) or not.
  EXPECT_EQ(server.handle(post("/v1/classify", R"({"content": "x", "policies": [{"id": "spam@1"}, {"id": "hate"}]})")).status, 503);
  EXPECT_EQ(server.handle(post("/v1/classify", R"({"content": "x", "policies": [{"id": "spam@2"}]})")).status, 404);
}

}  // namespace
}  // namespace arbiter::api
