// WebhookClient: how the job webhooks (api/jobs.h) reach their receivers. One POST per delivery over
// HTTP/1.1, plain (http://) or TLS (https://). Over TLS the receiver's certificate chain is verified
// against the system's CA store plus an optional PEM file (--webhook-ca), and its name against the
// URL's host (a DNS name, or an IP address for an IP literal), so that a job's webhook cannot be
// read or answered by anybody else on the path. Also the URL rules the allow-list uses.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace arbiter::api {

// An http:// or https:// URL taken apart. `host` is without brackets for IPv6 literals;
// `authority` is host[:port] as written (the Host header); `target` is the path and query ("/" if
// none). URLs with user info (user@host), a fragment, or bytes outside printable ASCII are refused.
struct HttpUrl {
  bool tls = false;
  std::string host, port, authority, target;
};
std::optional<HttpUrl> parse_http_url(const std::string& url);

// Whether `url` may be a webhook: a valid http(s) URL that starts with one of the allowed prefixes
// (each http(s)://HOST[:PORT]/[PATH], the host ended by '/', as `arbiter serve` checks them).
bool webhook_allowed(const std::string& url, const std::vector<std::string>& allow);

// Whether `prefix` is an acceptable --webhook-allow entry (see webhook_allowed).
bool valid_webhook_prefix(const std::string& prefix);

// What one delivery got: the HTTP status, or -1 with what went wrong (connection, TLS, timeout).
struct WebhookDelivery {
  int status = -1;
  std::string error;
};

// Sends webhook POSTs. Not thread-safe (the webhook sender's one thread uses it).
class WebhookClient {
 public:
  // `ca_file`: a PEM file of CAs trusted for https receivers besides the system's ("": none).
  // Throws std::invalid_argument when it cannot be read.
  explicit WebhookClient(const std::string& ca_file = "");
  ~WebhookClient();
  WebhookClient(const WebhookClient&) = delete;
  WebhookClient& operator=(const WebhookClient&) = delete;

  // POSTs `body` (application/json, plus `headers`) to `url`; connecting, the TLS handshake,
  // sending and the answer together get at most `timeout`.
  WebhookDelivery post(const std::string& url, const std::string& body,
                       const std::vector<std::pair<std::string, std::string>>& headers, std::chrono::milliseconds timeout);

 private:
  struct Tls;  // the TLS context, made once
  std::unique_ptr<Tls> tls_;
};

}  // namespace arbiter::api
