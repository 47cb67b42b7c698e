// The webhook client (api/webhook_client.h): URL parsing (a table, and random mutations that never
// let a URL past the allow-list unless its scheme, host and port are the allowed ones), and
// deliveries to loopback receivers over http and https: a receiver whose certificate the client
// trusts gets the POST (by IP address and by DNS name); one whose certificate is unknown, or names
// another host, gets nothing; an unreadable CA file is refused.
#include "api/webhook_client.h"

#include <gtest/gtest.h>
#include <httplib.h>

#include <chrono>
#include <fstream>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/api/tls_test_cert.h"
#include "tests/test_util.h"

namespace arbiter::api {
namespace {

using namespace std::chrono_literals;

TEST(WebhookUrl, ParsesWhatItShouldAndRefusesTheRest) {
  auto u = parse_http_url("http://hooks.internal/arbiter?x=1");
  ASSERT_TRUE(u);
  EXPECT_FALSE(u->tls);
  EXPECT_EQ(u->host, "hooks.internal");
  EXPECT_EQ(u->port, "80");
  EXPECT_EQ(u->authority, "hooks.internal");
  EXPECT_EQ(u->target, "/arbiter?x=1");
  u = parse_http_url("https://h.example:8443");
  ASSERT_TRUE(u);
  EXPECT_TRUE(u->tls);
  EXPECT_EQ(u->port, "8443");
  EXPECT_EQ(u->target, "/");
  u = parse_http_url("https://h.example?q");
  ASSERT_TRUE(u);
  EXPECT_EQ(u->port, "443");
  EXPECT_EQ(u->target, "/?q");
  u = parse_http_url("http://[::1]:9/x");
  ASSERT_TRUE(u);
  EXPECT_EQ(u->host, "::1");
  EXPECT_EQ(u->port, "9");
  EXPECT_EQ(u->authority, "[::1]:9");
  for (const char* bad : {"", "ftp://h/", "http://", "https://", "http:///x", "http://:80/", "http://user@h/", "http://u:p@h/x", "http://h:0/",
                          "http://h:65536/", "http://h:/", "http://h:8a/", "http://h/#frag", "http://h /", "http://h/\x01", "http://[::1/",
                          "http://[::1]x/", "http://h%2f/", "HTTP://h/", "http://h\xc3\xa9/", "http://[h.example]/"})
    EXPECT_FALSE(parse_http_url(bad)) << bad;
}

TEST(WebhookUrl, AllowListPrefixesKeepTheHostWhole) {
  EXPECT_TRUE(valid_webhook_prefix("http://hooks.internal/"));
  EXPECT_TRUE(valid_webhook_prefix("https://hooks.internal:8443/arbiter/"));
  EXPECT_FALSE(valid_webhook_prefix("http://hooks.internal"));
  EXPECT_FALSE(valid_webhook_prefix("http://hooks.internal?x"));
  EXPECT_FALSE(valid_webhook_prefix("hooks.internal/"));
  const std::vector<std::string> allow = {"http://hooks.internal/", "https://secure.example:8443/in/"};
  EXPECT_TRUE(webhook_allowed("http://hooks.internal/x", allow));
  EXPECT_TRUE(webhook_allowed("https://secure.example:8443/in/job", allow));
  EXPECT_FALSE(webhook_allowed("http://hooks.internal.example.com/x", allow));
  EXPECT_FALSE(webhook_allowed("https://hooks.internal/x", allow));
  EXPECT_FALSE(webhook_allowed("https://secure.example/in/job", allow));
  EXPECT_FALSE(webhook_allowed("https://secure.example:8443/out/", allow));
  EXPECT_FALSE(webhook_allowed("http://hooks.internal/x#f", allow));
  EXPECT_FALSE(webhook_allowed("http://hooks.internal/x", {"http://hooks.internal"}));  // an invalid prefix allows nothing
}

TEST(WebhookUrl, RandomMutationsNeverGetPastTheAllowList) {
  const std::vector<std::string> allow = {"http://127.0.0.1:8080/hook/", "https://[::1]:9443/h/"};
  const std::vector<std::string> seeds = {"http://127.0.0.1:8080/hook/a", "https://[::1]:9443/h/x?y=1", "http://evil.example/hook/",
                                          "https://127.0.0.1:8080/hook/", "http://127.0.0.1:80800/hook/"};
  const std::string alphabet = "/:@[]?#.%-_ahxtps0189\x01\x7f\xc3";
  std::mt19937 rng(20261206);
  int allowed = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string url = seeds[rng() % seeds.size()];
    for (int edits = 1 + static_cast<int>(rng() % 3); edits > 0; --edits) {
      const size_t at = url.empty() ? 0 : rng() % (url.size() + 1);
      switch (rng() % 3) {
        case 0: url.insert(url.begin() + static_cast<long>(at), alphabet[rng() % alphabet.size()]); break;
        case 1: if (at < url.size()) url.erase(at, 1); break;
        default: if (at < url.size()) url[at] = alphabet[rng() % alphabet.size()]; break;
      }
    }
    const auto u = parse_http_url(url);
    if (u) {
      EXPECT_FALSE(u->host.empty()) << url;
      EXPECT_EQ(u->target[0], '/') << url;
      const int port = std::stoi(u->port);
      EXPECT_TRUE(port >= 1 && port <= 65535) << url;
    }
    if (webhook_allowed(url, allow)) {
      ++allowed;
      ASSERT_TRUE(u) << url;
      const bool first = !u->tls && u->host == "127.0.0.1" && u->port == "8080" && u->target.rfind("/hook/", 0) == 0;
      const bool second = u->tls && u->host == "::1" && u->port == "9443" && u->target.rfind("/h/", 0) == 0;
      EXPECT_TRUE(first || second) << url;
    }
  }
  EXPECT_GT(allowed, 100);  // the mutations did reach allowed URLs
}

// A loopback receiver (plain or TLS) that answers 204 and keeps the bodies it got.
class Receiver {
 public:
  explicit Receiver(std::unique_ptr<httplib::Server> server) : server_(std::move(server)) {
    server_->Post("/hook/.*", [this](const httplib::Request& req, httplib::Response& res) {
      std::lock_guard<std::mutex> lock(mutex_);
      bodies_.push_back(req.body);
      signatures_.push_back(req.get_header_value("X-Signature"));
      res.status = 204;
    });
    port_ = server_->bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_->listen_after_bind(); });
    while (!server_->is_running()) std::this_thread::sleep_for(1ms);
  }
  ~Receiver() {
    server_->stop();
    thread_.join();
  }
  int port() const { return port_; }
  std::vector<std::string> bodies() {
    std::lock_guard<std::mutex> lock(mutex_);
    return bodies_;
  }
  std::vector<std::string> signatures() {
    std::lock_guard<std::mutex> lock(mutex_);
    return signatures_;
  }

 private:
  std::unique_ptr<httplib::Server> server_;
  int port_ = 0;
  std::thread thread_;
  std::mutex mutex_;
  std::vector<std::string> bodies_, signatures_;
};

class WebhookDeliveryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::make_self_signed_cert(tmp_.file("good.pem"), tmp_.file("good.key"), "DNS:localhost,IP:127.0.0.1"));
    ASSERT_TRUE(testing::make_self_signed_cert(tmp_.file("other.pem"), tmp_.file("other.key"), "DNS:other.example"));
    ASSERT_TRUE(testing::make_self_signed_cert(tmp_.file("unknown.pem"), tmp_.file("unknown.key"), "DNS:localhost,IP:127.0.0.1"));
    // The client trusts good.pem and other.pem, not unknown.pem.
    std::ofstream(tmp_.file("cas.pem")) << std::ifstream(tmp_.file("good.pem")).rdbuf() << std::ifstream(tmp_.file("other.pem")).rdbuf();
  }
  std::unique_ptr<httplib::Server> tls_server(const std::string& name) {
    return std::make_unique<httplib::SSLServer>(tmp_.file(name + ".pem").c_str(), tmp_.file(name + ".key").c_str());
  }
  testing::TempDir tmp_;
};

TEST_F(WebhookDeliveryTest, HttpsReachesOnlyAReceiverWithATrustedCertificateForItsName) {
  Receiver good(tls_server("good"));
  Receiver other(tls_server("other"));
  Receiver unknown(tls_server("unknown"));
  WebhookClient client(tmp_.file("cas.pem"));
  const std::string port = std::to_string(good.port());
  WebhookDelivery d = client.post("https://127.0.0.1:" + port + "/hook/ip", "{\"a\":1}", {{"X-Signature", "sig"}}, 5000ms);
  EXPECT_EQ(d.status, 204) << d.error;
  d = client.post("https://localhost:" + port + "/hook/name", "{\"b\":2}", {}, 5000ms);
  EXPECT_EQ(d.status, 204) << d.error;
  EXPECT_EQ(good.bodies(), (std::vector<std::string>{"{\"a\":1}", "{\"b\":2}"}));
  EXPECT_EQ(good.signatures()[0], "sig");

  // Trusted, but the certificate names another host.
  d = client.post("https://127.0.0.1:" + std::to_string(other.port()) + "/hook/x", "{}", {}, 5000ms);
  EXPECT_EQ(d.status, -1);
  EXPECT_NE(d.error.find("TLS handshake"), std::string::npos) << d.error;
  // The right name, but nobody the client trusts signed it.
  d = client.post("https://127.0.0.1:" + std::to_string(unknown.port()) + "/hook/x", "{}", {}, 5000ms);
  EXPECT_EQ(d.status, -1);
  EXPECT_NE(d.error.find("certificate verify failed"), std::string::npos) << d.error;
  // Without the CA file nothing here is trusted.
  WebhookClient system_only;
  d = system_only.post("https://127.0.0.1:" + port + "/hook/ip", "{}", {}, 5000ms);
  EXPECT_EQ(d.status, -1);
  EXPECT_TRUE(other.bodies().empty());
  EXPECT_TRUE(unknown.bodies().empty());
  EXPECT_EQ(good.bodies().size(), 2u);
}

TEST_F(WebhookDeliveryTest, PlainHttpAndUnreachableReceivers) {
  Receiver plain(std::make_unique<httplib::Server>());
  WebhookClient client;
  WebhookDelivery d = client.post("http://127.0.0.1:" + std::to_string(plain.port()) + "/hook/plain", "{\"c\":3}", {}, 5000ms);
  EXPECT_EQ(d.status, 204) << d.error;
  EXPECT_EQ(plain.bodies(), std::vector<std::string>{"{\"c\":3}"});
  d = client.post("http://127.0.0.1:" + std::to_string(plain.port()) + "/elsewhere", "{}", {}, 5000ms);
  EXPECT_EQ(d.status, 404);
  // TLS spoken to a plain receiver fails the handshake.
  d = client.post("https://127.0.0.1:" + std::to_string(plain.port()) + "/hook/plain", "{}", {}, 5000ms);
  EXPECT_EQ(d.status, -1);
  EXPECT_FALSE(d.error.empty());
  d = client.post("ftp://127.0.0.1/", "{}", {}, 1000ms);
  EXPECT_EQ(d.status, -1);
}

TEST_F(WebhookDeliveryTest, AnUnreadableCaFileIsRefused) {
  EXPECT_THROW(WebhookClient(tmp_.file("missing.pem")), std::invalid_argument);
  std::ofstream(tmp_.file("junk.pem")) << "not a certificate\n";
  EXPECT_THROW(WebhookClient(tmp_.file("junk.pem")), std::invalid_argument);
}

}  // namespace
}  // namespace arbiter::api
