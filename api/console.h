// The web console (console/: index.html, console.js, console.css) as `arbiter serve` serves it:
// GET / is the page, GET /console/<file> its script and style sheet. The files are compiled into
// the binary (console/embed.cmake writes their bytes into a generated source file), so serving
// them reads nothing from disk. The console is a client of the public API only; it needs no key to
// load (the page holds no data), and every API call it makes carries the key the user entered.
#pragma once

#include <cstddef>
#include <string>

#include "api/server.h"

namespace arbiter::api {

// One embedded file: its name in console/ and its bytes.
struct ConsoleFile {
  const char* name;
  const unsigned char* data;
  size_t size;
};
// Defined in the generated console_assets.cc.
extern const ConsoleFile kConsoleFiles[];
extern const size_t kConsoleFileCount;

// Whether a path belongs to the console: "/" and everything under "/console/".
bool is_console_path(const std::string& path);

// The reply to a request for a console path: the file with its Content-Type, an ETag (304 when
// If-None-Match names it), Cache-Control: no-cache (a browser revalidates, so a new binary's
// console is seen at once) and a strict Content-Security-Policy. Unknown files under /console/
// are 404, methods other than GET and HEAD 405 (both thrown as ApiException).
HttpReply console_reply(const HttpRequest& request);

}  // namespace arbiter::api
