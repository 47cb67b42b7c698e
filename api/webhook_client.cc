#include "api/webhook_client.h"

#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <cctype>
#include <fstream>
#include <stdexcept>
#include <type_traits>

namespace arbiter::api {
namespace {

namespace net = boost::asio;
namespace ssl = boost::asio::ssl;
namespace beast = boost::beast;
namespace http = beast::http;

constexpr std::string_view kHttp = "http://", kHttps = "https://";
// A receiver's answer body is not used; it is read up to this size (a larger one fails the delivery).
constexpr uint64_t kAnswerLimit = 64 * 1024;

bool host_char(char c, bool bracketed) {
  if (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-') return true;
  return bracketed ? c == ':' : c == '_';
}

// The POST itself over a connected-to-be stream (plain TCP or TLS over TCP): resolve, connect, the
// TLS handshake where there is one, send, read the answer, all within `timeout`.
template <class Stream>
WebhookDelivery exchange(net::io_context& ioc, Stream& stream, const HttpUrl& url, http::request<http::string_body>& request,
                         std::chrono::milliseconds timeout) {
  constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;
  WebhookDelivery out;
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(kAnswerLimit);
  auto& tcp = beast::get_lowest_layer(stream);
  tcp.expires_after(timeout);
  net::ip::tcp::resolver resolver(ioc);
  const auto failed = [&out](const char* stage, const beast::error_code& ec) { out.error = std::string(stage) + ": " + ec.message(); };
  const auto send = [&] {
    http::async_write(stream, request, [&](beast::error_code ec, size_t) {
      if (ec) return failed("sending", ec);
      http::async_read(stream, buffer, parser, [&](beast::error_code ec2, size_t) {
        if (ec2) return failed("reading the answer", ec2);
        out.status = parser.get().result_int();
      });
    });
  };
  resolver.async_resolve(url.host, url.port, [&](beast::error_code ec, net::ip::tcp::resolver::results_type results) {
    if (ec) return failed("resolving the host", ec);
    tcp.async_connect(results, [&](beast::error_code ec2, const net::ip::tcp::endpoint&) {
      if (ec2) return failed("connecting", ec2);
      if constexpr (kTls) {
        stream.async_handshake(ssl::stream_base::client, [&](beast::error_code ec3) {
          if (ec3) return failed("TLS handshake", ec3);
          send();
        });
      } else {
        send();
      }
    });
  });
  ioc.run_for(timeout + std::chrono::milliseconds(100));
  if (out.status < 0 && out.error.empty()) out.error = "no answer within " + std::to_string(timeout.count()) + " ms";
  return out;
}

}  // namespace

std::optional<HttpUrl> parse_http_url(const std::string& url) {
  for (const char c : url)
    if (static_cast<unsigned char>(c) <= 0x20 || static_cast<unsigned char>(c) >= 0x7f) return std::nullopt;
  HttpUrl u;
  std::string rest;
  if (url.rfind(kHttp, 0) == 0) {
    rest = url.substr(kHttp.size());
  } else if (url.rfind(kHttps, 0) == 0) {
    u.tls = true;
    rest = url.substr(kHttps.size());
  } else {
    return std::nullopt;
  }
  const size_t end = rest.find_first_of("/?#");
  u.authority = rest.substr(0, end);
  u.target = end == std::string::npos ? "/" : rest.substr(end);
  if (u.target[0] == '?') u.target = "/" + u.target;
  if (u.target.find('#') != std::string::npos) return std::nullopt;
  if (u.authority.empty() || u.authority.find('@') != std::string::npos) return std::nullopt;
  std::string port;
  bool bracketed = false;
  if (u.authority[0] == '[') {
    const size_t close = u.authority.find(']');
    if (close == std::string::npos) return std::nullopt;
    bracketed = true;
    u.host = u.authority.substr(1, close - 1);
    const std::string after = u.authority.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') return std::nullopt;
      port = after.substr(1);
      if (port.empty()) return std::nullopt;
    }
  } else if (const size_t colon = u.authority.find(':'); colon != std::string::npos) {
    u.host = u.authority.substr(0, colon);
    port = u.authority.substr(colon + 1);
    if (port.empty()) return std::nullopt;
  } else {
    u.host = u.authority;
  }
  if (u.host.empty()) return std::nullopt;
  for (const char c : u.host)
    if (!host_char(c, bracketed)) return std::nullopt;
  if (bracketed) {  // only an IPv6 address goes in brackets
    boost::system::error_code ec;
    net::ip::make_address_v6(u.host, ec);
    if (ec) return std::nullopt;
  }
  if (!port.empty()) {
    if (port.size() > 5) return std::nullopt;
    for (const char c : port)
      if (!std::isdigit(static_cast<unsigned char>(c))) return std::nullopt;
    const int n = std::stoi(port);
    if (n < 1 || n > 65535) return std::nullopt;
    u.port = std::to_string(n);
  } else {
    u.port = u.tls ? "443" : "80";
  }
  return u;
}

bool valid_webhook_prefix(const std::string& prefix) {
  const std::optional<HttpUrl> u = parse_http_url(prefix);
  if (!u) return false;
  const size_t host_start = (u->tls ? kHttps : kHttp).size();
  // The host must be whole: "http://hooks.internal" alone would also allow
  // "http://hooks.internal.example.com".
  return prefix.size() > host_start + u->authority.size() && prefix[host_start + u->authority.size()] == '/';
}

bool webhook_allowed(const std::string& url, const std::vector<std::string>& allow) {
  if (!parse_http_url(url)) return false;
  for (const std::string& prefix : allow)
    if (valid_webhook_prefix(prefix) && url.rfind(prefix, 0) == 0) return true;
  return false;
}

struct WebhookClient::Tls {
  ssl::context context{ssl::context::tls_client};
};

WebhookClient::WebhookClient(const std::string& ca_file) : tls_(std::make_unique<Tls>()) {
  SSL_CTX_set_min_proto_version(tls_->context.native_handle(), TLS1_2_VERSION);
  tls_->context.set_default_verify_paths();
  if (!ca_file.empty()) {
    if (!std::ifstream(ca_file)) throw std::invalid_argument("--webhook-ca '" + ca_file + "' cannot be read");
    boost::system::error_code ec;
    tls_->context.load_verify_file(ca_file, ec);
    if (ec) throw std::invalid_argument("--webhook-ca '" + ca_file + "' holds no PEM certificate: " + ec.message());
  }
  tls_->context.set_verify_mode(ssl::verify_peer);
}

WebhookClient::~WebhookClient() = default;

WebhookDelivery WebhookClient::post(const std::string& url, const std::string& body,
                                    const std::vector<std::pair<std::string, std::string>>& headers, std::chrono::milliseconds timeout) {
  const std::optional<HttpUrl> u = parse_http_url(url);
  if (!u) return {-1, "not an http:// or https:// URL"};
  http::request<http::string_body> request{http::verb::post, u->target, 11};
  request.set(http::field::host, u->authority);
  request.set(http::field::content_type, "application/json");
  request.set(http::field::user_agent, "arbiter-webhook");
  for (const auto& [name, value] : headers) request.set(name, value);
  request.body() = body;
  request.prepare_payload();

  net::io_context ioc;
  if (!u->tls) {
    beast::tcp_stream stream(ioc);
    return exchange(ioc, stream, *u, request, timeout);
  }
  beast::ssl_stream<beast::tcp_stream> stream(ioc, tls_->context);
  SSL* session = stream.native_handle();
  X509_VERIFY_PARAM* verify = SSL_get0_param(session);
  boost::system::error_code not_ip;
  net::ip::make_address(u->host, not_ip);
  if (!not_ip) {
    // An IP literal: the certificate must name the address (an IP subjectAltName); no SNI.
    X509_VERIFY_PARAM_set1_ip_asc(verify, u->host.c_str());
  } else {
    SSL_set_tlsext_host_name(session, u->host.c_str());
    X509_VERIFY_PARAM_set_hostflags(verify, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    X509_VERIFY_PARAM_set1_host(verify, u->host.c_str(), 0);
  }
  return exchange(ioc, stream, *u, request, timeout);
}

}  // namespace arbiter::api
