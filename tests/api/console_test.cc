// The web console as `arbiter serve` serves it (api/console.h): GET / is console/index.html byte
// for byte, its script and style sheet are under /console/, each with its Content-Type, an ETag
// that answers If-None-Match with 304, Cache-Control: no-cache and a Content-Security-Policy that
// allows nothing but the server itself; no key is needed to load it; other paths under /console/
// are 404 and other methods 405. Checked through ApiServer::handle and over a real socket (where
// the console is answered on the transport's event loop, as /health is).
#include <gtest/gtest.h>
#include <httplib.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "api/server.h"

namespace arbiter::api {
namespace {

std::string read_source(const std::string& relative) {
  std::ifstream in(std::string(ARBITER_SOURCE_DIR) + "/" + relative, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

HttpRequest request(const std::string& method, const std::string& path) {
  HttpRequest r;
  r.method = method;
  r.path = path;
  return r;
}

std::string header_of(const HttpReply& r, const std::string& name) {
  for (const auto& [k, v] : r.headers)
    if (k == name) return v;
  return "";
}

ApiOptions keyed_options() {
  ApiOptions o;
  o.keys = ApiKeys({"sk-console-test"});
  o.port = 0;
  return o;
}

TEST(Console, ServesEveryFileWithItsHeadersAndNoKey) {
  ApiServer server(keyed_options());
  const struct {
    const char* path;
    const char* file;
    const char* type;
  } files[] = {{"/", "console/index.html", "text/html; charset=utf-8"},
               {"/console/console.js", "console/console.js", "text/javascript; charset=utf-8"},
               {"/console/console.css", "console/console.css", "text/css; charset=utf-8"}};
  for (const auto& f : files) {
    SCOPED_TRACE(f.path);
    const HttpReply r = server.handle(request("GET", f.path));
    EXPECT_EQ(r.status, 200);
    EXPECT_EQ(r.content_type, f.type);
    const std::string source = read_source(f.file);
    ASSERT_FALSE(source.empty());
    EXPECT_EQ(r.body, source);  // the bytes compiled in are the file's
    EXPECT_EQ(header_of(r, "Cache-Control"), "no-cache");
    EXPECT_EQ(header_of(r, "X-Content-Type-Options"), "nosniff");
    const std::string csp = header_of(r, "Content-Security-Policy");
    EXPECT_EQ(csp.rfind("default-src 'self';", 0), 0u) << csp;
    EXPECT_NE(csp.find("script-src 'self';"), std::string::npos);
    EXPECT_EQ(csp.find("unsafe-inline"), std::string::npos);
    EXPECT_NE(csp.find("frame-ancestors 'none'"), std::string::npos);
    const std::string etag = header_of(r, "ETag");
    ASSERT_EQ(etag.size(), 18u) << etag;

    // HEAD: the same headers (the transport leaves the body out).
    const HttpReply head = server.handle(request("HEAD", f.path));
    EXPECT_EQ(head.status, 200);
    EXPECT_EQ(header_of(head, "ETag"), etag);

    // A browser's revalidation with the current tag: 304 without a body.
    HttpRequest again = request("GET", f.path);
    again.headers["if-none-match"] = etag;
    const HttpReply not_modified = server.handle(again);
    EXPECT_EQ(not_modified.status, 304);
    EXPECT_TRUE(not_modified.body.empty());
    again.headers["if-none-match"] = "\"0000000000000000\"";
    EXPECT_EQ(server.handle(again).status, 200);
  }
  // The page loads its own script and style sheet, and nothing inline.
  const std::string page = server.handle(request("GET", "/")).body;
  EXPECT_NE(page.find("<script src=\"/console/console.js\""), std::string::npos);
  EXPECT_NE(page.find("href=\"/console/console.css\""), std::string::npos);
  EXPECT_EQ(page.find("<style"), std::string::npos);
  EXPECT_EQ(page.find(" style="), std::string::npos);
  EXPECT_EQ(page.find("<script>"), std::string::npos);
  // The API behind it still needs the key.
  EXPECT_EQ(server.handle(request("GET", "/v1/policies")).status, 401);
}

TEST(Console, UnknownPathsAre404AndOtherMethods405) {
  ApiServer server(keyed_options());
  for (const char* path : {"/console/", "/console/nope.js", "/console/index.html", "/console/../server.cc", "/index.html",
                           "/console.js"}) {
    SCOPED_TRACE(path);
    const HttpReply r = server.handle(request("GET", path));
    EXPECT_EQ(r.status, 404);
    EXPECT_EQ(nlohmann::json::parse(r.body)["error"]["code"], "unknown_path");
  }
  for (const char* method : {"POST", "DELETE", "PUT"}) {
    SCOPED_TRACE(method);
    const HttpReply r = server.handle(request(method, "/"));
    EXPECT_EQ(r.status, 405);
    EXPECT_EQ(nlohmann::json::parse(r.body)["error"]["code"], "method_not_allowed");
  }
}

TEST(Console, OverHttp) {
  ApiServer server(keyed_options());
  const int port = server.bind();
  server.start();
  httplib::Client client("127.0.0.1", port);
  auto page = client.Get("/");
  ASSERT_TRUE(page);
  EXPECT_EQ(page->status, 200);
  EXPECT_EQ(page->get_header_value("Content-Type"), "text/html; charset=utf-8");
  EXPECT_EQ(page->get_header_value("Cache-Control"), "no-cache");
  EXPECT_EQ(page->get_header_value("Content-Security-Policy").rfind("default-src 'self';", 0), 0u);
  EXPECT_EQ(page->body, read_source("console/index.html"));
  auto script = client.Get("/console/console.js");
  ASSERT_TRUE(script);
  EXPECT_EQ(script->status, 200);
  EXPECT_EQ(script->get_header_value("Content-Type"), "text/javascript; charset=utf-8");
  EXPECT_EQ(script->body, read_source("console/console.js"));
  auto other_tag = client.Get("/console/console.css", {{"If-None-Match", script->get_header_value("ETag")}});
  ASSERT_TRUE(other_tag);
  EXPECT_EQ(other_tag->status, 200);  // another file's tag does not match
  auto style = client.Get("/console/console.css");
  ASSERT_TRUE(style);
  auto revalidated = client.Get("/console/console.css", {{"If-None-Match", style->get_header_value("ETag")}});
  ASSERT_TRUE(revalidated);
  EXPECT_EQ(revalidated->status, 304);
  EXPECT_TRUE(revalidated->body.empty());
  auto missing = client.Get("/console/missing.css");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
  // The API beside it is unchanged: it needs the key.
  auto policies = client.Get("/v1/policies");
  ASSERT_TRUE(policies);
  EXPECT_EQ(policies->status, 401);
  auto keyed = client.Get("/v1/policies", {{"Authorization", "Bearer sk-console-test"}});
  ASSERT_TRUE(keyed);
  EXPECT_EQ(keyed->status, 200);
  server.stop();
}

}  // namespace
}  // namespace arbiter::api
