// Serves the embedded web console (api/console.h): maps paths to the files compiled in from
// console/, with the headers a browser needs to cache them correctly and to run nothing but them.
#include "api/console.h"

#include <cstdint>
#include <cstdio>
#include <string_view>

#include "api/errors.h"
#include "api/json_io.h"

namespace arbiter::api {
namespace {

// What the page may load: its own script, style sheet and API (same origin), nothing inline, no
// frames around it, no forms posting anywhere; images from itself or data: (its empty favicon).
constexpr const char* kContentSecurityPolicy =
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const ConsoleFile* find_file(std::string_view name) {
  for (size_t i = 0; i < kConsoleFileCount; ++i)
    if (name == kConsoleFiles[i].name) return &kConsoleFiles[i];
  return nullptr;
}

std::string content_type(std::string_view name) {
  auto ends_with = [&](std::string_view suffix) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (ends_with(".html")) return "text/html; charset=utf-8";
  if (ends_with(".js")) return "text/javascript; charset=utf-8";
  if (ends_with(".css")) return "text/css; charset=utf-8";
  return "application/octet-stream";
}

// A strong validator of the file's bytes: FNV-1a 64 (the files change only with the binary).
std::string etag(const ConsoleFile& f) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < f.size; ++i) h = (h ^ f.data[i]) * 0x100000001b3ull;
  char buf[24];
  std::snprintf(buf, sizeof(buf), "\"%016llx\"", static_cast<unsigned long long>(h));
  return buf;
}

ApiException not_found(const std::string& path) {
  return ApiException({404, "Unknown path " + path + ".", "not_found_error", "", "unknown_path", 0});
}

}  // namespace

bool is_console_path(const std::string& path) { return path == "/" || path.rfind("/console/", 0) == 0; }

HttpReply console_reply(const HttpRequest& request) {
  std::string name;
  if (request.path == "/") name = "index.html";
  else if (request.path.rfind("/console/", 0) == 0) name = request.path.substr(9);
  // The page is reached at "/" only; its files by their own names.
  const ConsoleFile* file = name.empty() || (name == "index.html" && request.path != "/") ? nullptr : find_file(name);
  if (!file) throw not_found(printable(request.path));
  if (request.method != "GET" && request.method != "HEAD")
    throw ApiException({405, "Method " + printable(request.method) + " is not allowed on " + request.path + ".",
                        "invalid_request_error", "", "method_not_allowed", 0});

  HttpReply reply;
  const std::string tag = etag(*file);
  reply.content_type = content_type(name);
  reply.headers = {{"Cache-Control", "no-cache"},
                   {"ETag", tag},
                   {"Content-Security-Policy", kContentSecurityPolicy},
                   {"X-Content-Type-Options", "nosniff"},
                   {"X-Frame-Options", "DENY"},
                   {"Referrer-Policy", "no-referrer"}};
  const auto match = request.headers.find("if-none-match");
  if (match != request.headers.end() && match->second.find(tag) != std::string::npos) {
    reply.status = 304;
    return reply;
  }
  reply.body.assign(reinterpret_cast<const char*>(file->data), file->size);
  return reply;
}

}  // namespace arbiter::api
