// The HTTP front end of `arbiter serve` under real clients, over raw sockets against a real server on
// a tiny random model: keep-alive as cheap as a fresh connection, pipelining, half-close, deadlines
// for trickled heads and bodies, idle and slow connections that do not starve work, connection and
// waiting limits answered with 503/429, early 413, Expect: 100-continue, HTTP/1.0, malformed
// requests, start-up checks of contradicting limits, and a bounded soak of mixed clients in which
// every request gets exactly one answer, memory stays flat, and the decision log holds one decision
// per classification answered 200.
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/api/serve_process.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

// Rows in `table` of the SQLite file `db` (-1 when it cannot be read).
long sqlite_count(const std::string& db, const std::string& table) {
  sqlite3* raw = nullptr;
  long n = -1;
  if (sqlite3_open_v2(db.c_str(), &raw, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK) {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v2(raw, ("SELECT count(*) FROM " + table).c_str(), -1, &s, nullptr) == SQLITE_OK && sqlite3_step(s) == SQLITE_ROW)
      n = static_cast<long>(sqlite3_column_int64(s, 0));
    sqlite3_finalize(s);
  }
  sqlite3_close(raw);
  return n;
}

std::string get(const std::string& path, const std::string& extra_headers = "") {
  return "GET " + path + " HTTP/1.1\r\nHost: t\r\n" + extra_headers + "\r\n";
}

std::string post(const std::string& path, const std::string& body, const std::string& extra_headers = "") {
  return "POST " + path + " HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n" + extra_headers + "\r\n" + body;
}

std::string classify_body(const std::string& content, int max_tokens) {
  return json{{"content", content}, {"policies", {{{"id", "a"}, {"text", "Policy A. Answer 0 or 1."}}}}, {"max_tokens", max_tokens},
              {"reasoning_effort", "low"}}
      .dump();
}

double median_ms(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2] * 1000;
}

// Resident memory of a process in KiB (VmRSS), -1 when unreadable.
long rss_kib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

// This process needs descriptors for a thousand client sockets.
void raise_descriptor_limit() {
  rlimit l{};
  getrlimit(RLIMIT_NOFILE, &l);
  l.rlim_cur = l.rlim_max;
  setrlimit(RLIMIT_NOFILE, &l);
}

class HttpFrontEnd : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    raise_descriptor_limit();
    tmp_ = std::make_unique<testing::TempDir>();
    ASSERT_EQ(make_tiny_model(model_dir(), 7), "");
  }
  static void TearDownTestSuite() { tmp_.reset(); }
  static std::string model_dir() { return tmp_->file("model"); }
  static std::string file(const std::string& name) { return tmp_->file(name); }
  static std::vector<std::string> args(std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"--model", model_dir(), "--port", "0", "--device", "cpu", "--warm-efforts", "none"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  static inline std::unique_ptr<testing::TempDir> tmp_;
};

TEST_F(HttpFrontEnd, KeepAlivePipeliningHalfCloseAndProtocolDetails) {
  ServeProcess server(args(), file("basic.log"));
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 60)) << server.log();

  // Keep-alive costs no more than a fresh connection: no delayed-ACK stall (it was ~40 ms a request).
  std::vector<double> kept, fresh;
  {
    RawConnection c(port);
    ASSERT_TRUE(c.ok());
    for (int i = 0; i < 40; ++i) {
      const auto t0 = Clock::now();
      ASSERT_TRUE(c.send_all(get("/health")));
      const auto r = c.read_response(10);
      ASSERT_TRUE(r && r->status == 200);
      kept.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    for (int i = 0; i < 40; ++i) {
      const auto t0 = Clock::now();
      RawConnection f(port);
      ASSERT_TRUE(f.send_all(get("/health", "Connection: close\r\n")));
      const auto r = f.read_response(10);
      ASSERT_TRUE(r && r->status == 200);
      EXPECT_EQ(r->header("connection"), "close");
      fresh.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    // A keep-alive classify too (the old transport sent its head and body in two writes), against
    // the same request on fresh connections, alternating.
    std::vector<double> classify_kept, classify_fresh;
    for (int i = 0; i < 10; ++i) {
      auto t0 = Clock::now();
      ASSERT_TRUE(c.send_all(post("/v1/classify", classify_body("keep-alive " + std::to_string(i), 1))));
      auto r = c.read_response(30);
      ASSERT_TRUE(r && r->status == 200) << (r ? r->body : "no reply");
      classify_kept.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      t0 = Clock::now();
      RawConnection f(port);
      ASSERT_TRUE(f.send_all(post("/v1/classify", classify_body("fresh " + std::to_string(i), 1), "Connection: close\r\n")));
      r = f.read_response(30);
      ASSERT_TRUE(r && r->status == 200) << (r ? r->body : "no reply");
      classify_fresh.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    // A delayed-ACK stall adds ~40 ms to every keep-alive request; compared with fresh connections
    // measured in the same run, so the machine's load cancels out.
    EXPECT_LT(median_ms(classify_kept), median_ms(classify_fresh) + 20) << "keep-alive classify stalls";
  }
  EXPECT_LT(median_ms(kept), median_ms(fresh) + 20) << "keep-alive /health stalls (delayed ACK?)";

  // Pipelined: three requests in one write, three answers in order; then a POST and a GET.
  {
    RawConnection c(port);
    ASSERT_TRUE(c.send_all(get("/health") + get("/v1/models") + get("/no/such/path")));
    const auto a = c.read_response(10), b = c.read_response(10), d = c.read_response(10);
    ASSERT_TRUE(a && b && d);
    EXPECT_EQ(a->status, 200);
    EXPECT_EQ(json::parse(a->body)["status"], "ok");
    EXPECT_EQ(b->status, 200);
    EXPECT_EQ(json::parse(b->body)["object"], "list");
    EXPECT_EQ(d->status, 404);
    ASSERT_TRUE(c.send_all(post("/v1/classify", classify_body("pipelined", 2)) + get("/ready")));
    const auto e = c.read_response(30), f = c.read_response(10);
    ASSERT_TRUE(e && f);
    EXPECT_EQ(e->status, 200);
    EXPECT_EQ(json::parse(e->body)["object"], "classification");
    EXPECT_EQ(f->status, 200);
    EXPECT_EQ(json::parse(f->body)["status"], "ready");
  }

  // Half-closed after a complete request: answered (an interim 102 may come first), not cancelled.
  const double classified = std::max(0.0, metric(port, "arbiter_http_requests_total{endpoint=\"/v1/classify\",status=\"200\"}"));
  const double cancelled = std::max(0.0, metric(port, "arbiter_sequences_finished_total{reason=\"cancelled\"}"));
  for (int max_tokens : {1, 300}) {  // answered before and after the server notices the end of stream
    RawConnection c(port);
    ASSERT_TRUE(c.send_all(post("/v1/classify", classify_body("half-closed", max_tokens))));
    c.shutdown_write();
    const auto r = c.read_response(60);
    ASSERT_TRUE(r) << "a half-closed request got no answer" << server.log();
    EXPECT_EQ(r->status, 200) << r->body;
    const json answer = json::parse(r->body);
    EXPECT_EQ(answer["object"], "classification");
    EXPECT_TRUE(answer["results"][0].contains("verdict"));
    EXPECT_GE(answer["results"][0]["usage"]["completion_tokens"].get<int>(), 1);
    for (int s : r->interim) EXPECT_EQ(s, 102);
    EXPECT_TRUE(c.wait_closed(5)) << "the server keeps a half-closed connection open after answering";
  }
  EXPECT_EQ(metric(port, "arbiter_http_requests_total{endpoint=\"/v1/classify\",status=\"200\"}"), classified + 2);
  EXPECT_EQ(std::max(0.0, metric(port, "arbiter_sequences_finished_total{reason=\"cancelled\"}")), cancelled);

  // Expect: 100-continue gets its interim answer before the body is sent.
  {
    RawConnection c(port);
    const std::string body = classify_body("expect", 1);
    const std::string head = "POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Length: " + std::to_string(body.size()) +
                             "\r\nExpect: 100-continue\r\n\r\n";
    ASSERT_TRUE(c.send_all(head));
    pollfd p{c.fd(), POLLIN, 0};
    ASSERT_EQ(poll(&p, 1, 5000), 1) << "no 100 Continue";
    ASSERT_TRUE(c.send_all(body));
    const auto r = c.read_response(30);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->interim, std::vector<int>{100});
    EXPECT_EQ(r->status, 200);
  }
  // A body over the limit is refused from its Content-Length, without being sent.
  {
    RawConnection c(port);
    ASSERT_TRUE(c.send_all("POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n"));
    const auto r = c.read_response(5);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 413);
    EXPECT_EQ(json::parse(r->body)["error"]["code"], "request_too_large");
  }
  // HTTP/1.0: answered in kind and closed; HEAD: headers only.
  {
    RawConnection c(port);
    ASSERT_TRUE(c.send_all("GET /health HTTP/1.0\r\n\r\n"));
    const auto r = c.read_response(5);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->version, "HTTP/1.0");
    EXPECT_EQ(r->status, 200);
    EXPECT_TRUE(c.wait_closed(5));
    RawConnection h(port);
    ASSERT_TRUE(h.send_all("HEAD /health HTTP/1.1\r\nHost: t\r\n\r\n" + get("/health")));
    const auto head = h.read_response(5, /*no_body=*/true);
    ASSERT_TRUE(head);
    EXPECT_EQ(head->status, 200);
    EXPECT_GT(std::stoi(head->header("content-length")), 0);
    // The GET that followed parses on its own: the HEAD reply carried no body.
    const auto after = h.read_response(5);
    ASSERT_TRUE(after && after->status == 200);
    EXPECT_EQ(json::parse(after->body, nullptr, false)["status"], "ok");
  }
  // Malformed requests: a 4xx answer (or a closed connection), never a crash.
  std::mt19937 rng(11);
  for (int i = 0; i < 200; ++i) {
    RawConnection c(port);
    std::string junk(1 + rng() % 200, '\0');
    for (char& ch : junk) ch = static_cast<char>(rng() % 256);
    if (i % 3 == 0) junk = "GET /" + junk + " HTTP/1.1\r\n";  // a start line with a bad target or version
    if (i % 5 == 0) junk = "POST /v1/classify HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
    c.send_all(junk + "\r\n\r\n");
    const auto r = c.read_response(5);
    if (r) {
      EXPECT_TRUE(r->status >= 400 && r->status < 500) << r->status << " for request " << i;
    }
  }
  EXPECT_EQ(call(port, "GET", "/health").status, 200) << server.log();
}

TEST_F(HttpFrontEnd, SlowAndIdleConnectionsDoNotStarveWork) {
  ServeProcess server(args({"--http-threads", "4", "--header-timeout", "2", "--body-timeout", "2", "--idle-timeout", "2"}),
                      file("slow.log"));
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 60)) << server.log();

  // 1000 connections that send nothing, and 40 that trickle a head or a body one byte at a time.
  std::vector<std::unique_ptr<RawConnection>> idle, slow_heads, slow_bodies;
  for (int i = 0; i < 1000; ++i) {
    idle.push_back(std::make_unique<RawConnection>(port));
    ASSERT_TRUE(idle.back()->ok()) << i;
  }
  const std::string head = get("/health");
  const std::string body_head = "POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Length: 400\r\n\r\n";
  for (int i = 0; i < 20; ++i) {
    slow_heads.push_back(std::make_unique<RawConnection>(port));
    slow_bodies.push_back(std::make_unique<RawConnection>(port));
    ASSERT_TRUE(slow_bodies.back()->send_all(body_head));
  }
  std::atomic<bool> trickling{true};
  std::thread trickle([&] {
    // One byte every 50 ms per connection, for longer than the deadlines (each byte arrives well
    // inside any per-read timeout).
    for (size_t k = 0; trickling.load() && k < 120; ++k) {
      for (auto& c : slow_heads) c->send_all(std::string(1, head[k % (head.size() - 4)]));
      for (auto& c : slow_bodies) c->send_all("x");
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });

  // Normal requests are served promptly meanwhile.
  std::vector<double> health, classify;
  for (int i = 0; i < 10; ++i) {
    auto t0 = Clock::now();
    ASSERT_EQ(call(port, "GET", "/health").status, 200);
    health.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    t0 = Clock::now();
    const Reply r = call(port, "POST", "/v1/classify", classify_body("while slow clients wait", 1));
    ASSERT_EQ(r.status, 200) << r.raw;
    classify.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  EXPECT_LT(median_ms(health), 100);
  EXPECT_LT(median_ms(classify), 500);

  // Trickled heads and bodies are cut at their deadline (2 s), whatever the pace of the bytes.
  const auto t0 = Clock::now();
  for (auto* group : {&slow_heads, &slow_bodies})
    for (auto& c : *group) {
      EXPECT_TRUE(c->wait_closed(6)) << "a trickled request outlived its deadline";
      const auto r = c->read_response(0.1);  // what arrived before the close
      EXPECT_TRUE(r && r->status == 408) << "no 408 for a request that did not arrive in time";
    }
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 6.5);
  trickling = false;
  trickle.join();
  // Connections that never sent a byte are closed after the head deadline too.
  for (size_t i = 0; i < idle.size(); i += 50) EXPECT_TRUE(idle[i]->wait_closed(5));
  EXPECT_GE(metric(port, "arbiter_http_rejected_total{reason=\"timeout\"}"), 40);
  EXPECT_EQ(call(port, "GET", "/health").status, 200);
}

TEST_F(HttpFrontEnd, LimitsAnswerWithRetryAfterInsteadOfWaiting) {
  // Connections: over the limit, 503 at once.
  {
    ServeProcess server(args({"--max-connections", "16"}), file("conn.log"));
    const int port = server.port();
    ASSERT_TRUE(wait_ready(port, 60)) << server.log();
    std::vector<std::unique_ptr<RawConnection>> held;
    for (int i = 0; i < 16; ++i) held.push_back(std::make_unique<RawConnection>(port));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // all accepted
    RawConnection extra(port);
    ASSERT_TRUE(extra.send_all(get("/health")));
    const auto r = extra.read_response(5);
    ASSERT_TRUE(r) << "no answer over the connection limit";
    EXPECT_EQ(r->status, 503);
    EXPECT_EQ(r->header("retry-after"), "1");
    EXPECT_EQ(json::parse(r->body)["error"]["code"], "too_many_connections");
    held.clear();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    EXPECT_EQ(call(port, "GET", "/health").status, 200);
  }
  // Requests waiting for a handler: one handler busy, one request waiting, the next gets 429 at once.
  {
    ServeProcess server(args({"--http-threads", "1", "--max-waiting", "1"}), file("wait.log"));
    const int port = server.port();
    ASSERT_TRUE(wait_ready(port, 60)) << server.log();
    RawConnection busy(port), waiting(port), refused(port);
    ASSERT_TRUE(busy.send_all(post("/v1/classify", classify_body("long", 3000))));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ASSERT_TRUE(waiting.send_all(post("/v1/classify", classify_body("waits", 1))));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const auto t0 = Clock::now();
    ASSERT_TRUE(refused.send_all(post("/v1/classify", classify_body("refused", 1))));
    const auto r = refused.read_response(10);
    ASSERT_TRUE(r);
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 1.0) << "the refusal waited for the model";
    EXPECT_EQ(r->status, 429) << r->body;
    EXPECT_EQ(r->header("retry-after"), "1");
    EXPECT_EQ(json::parse(r->body)["error"]["code"], "queue_full");
    // Health is answered even while every handler is busy.
    EXPECT_EQ(call(port, "GET", "/ready").status, 200);
    const auto a = busy.read_response(120), b = waiting.read_response(120);
    ASSERT_TRUE(a && b);
    EXPECT_EQ(a->status, 200);
    EXPECT_EQ(b->status, 200);
    EXPECT_GE(metric(port, "arbiter_http_rejected_total{reason=\"waiting\"}"), 1);
  }
  // Contradicting limits are refused at start-up.
  const auto bad = testing::run_command(std::string(ARBITER_BINARY) + " serve --port 0 --model " + model_dir() +
                                        " --http-threads 8 --max-queued 100");
  EXPECT_EQ(bad.status, 2) << bad.output;
  EXPECT_NE(bad.output.find("--max-queued (100) exceeds --http-threads (8)"), std::string::npos) << bad.output;
}

// 64 clients for two rounds of a minute: keep-alive and pipelined classify and probes, malformed
// requests, slow (but in time) heads. Every request gets exactly one answer; memory stays flat; the
// decision log holds exactly one decision per classify answered 200.
TEST_F(HttpFrontEnd, SoakMixedClientsEveryRequestAnsweredOnceMemoryFlat) {
  ServeProcess server(args({"--header-timeout", "5", "--db", file("soak.db")}), file("soak.log"));
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 60)) << server.log();
  const double round_seconds = 60;
  struct Tally {
    std::atomic<long> sent{0}, answered{0}, wrong{0}, classified{0};
  };
  auto round = [&](Tally& tally) {
    std::vector<std::thread> clients;
    const auto until = Clock::now() + std::chrono::duration<double>(round_seconds);
    for (int id = 0; id < 64; ++id)
      clients.emplace_back([&, id] {
        std::mt19937 rng(static_cast<unsigned>(id * 7919 + 1));
        while (Clock::now() < until) {
          RawConnection c(port);
          if (!c.ok()) {
            ++tally.wrong;
            continue;
          }
          if (id < 40) {  // keep-alive: a few requests, sometimes two pipelined
            for (int k = 0; k < 5 && Clock::now() < until; ++k) {
              const bool pipelined = rng() % 4 == 0;
              const bool classify = rng() % 2;
              std::string req = classify ? post("/v1/classify", classify_body("soak " + std::to_string(rng()), 1))
                                         : get(rng() % 2 ? "/health" : "/v1/models");
              const int n = pipelined ? 2 : 1;
              if (pipelined) req += get("/health");
              if (!c.send_all(req)) break;
              tally.sent += n;
              for (int j = 0; j < n; ++j) {
                const auto r = c.read_response(60);
                if (!r) break;
                ++tally.answered;
                if (r->status != 200) ++tally.wrong;
                else if (classify && j == 0) ++tally.classified;
              }
            }
          } else if (id < 52) {  // malformed: one 4xx answer, then the connection closes
            std::string junk(1 + rng() % 100, '\0');
            for (char& ch : junk) ch = static_cast<char>(' ' + rng() % 90);
            if (!c.send_all(junk + "\r\n\r\n")) continue;
            ++tally.sent;
            const auto r = c.read_response(10);
            if (r) {
              ++tally.answered;
              if (r->status < 400 || r->status >= 500) ++tally.wrong;
            }
            if (c.read_response(2)) ++tally.wrong;  // a second answer to one request
          } else {  // slow but within the head deadline
            const std::string req = get("/health");
            bool ok = true;
            for (char ch : req) {
              ok = ok && c.send_all(std::string(1, ch));
              std::this_thread::sleep_for(std::chrono::milliseconds(20));
            }
            if (!ok) continue;
            ++tally.sent;
            const auto r = c.read_response(10);
            if (r) {
              ++tally.answered;
              if (r->status != 200) ++tally.wrong;
            }
          }
        }
      });
    for (auto& t : clients) t.join();
  };
  Tally first, second;
  round(first);
  const long rss_first = rss_kib(server.server_pid());
  round(second);
  const long rss_second = rss_kib(server.server_pid());
  for (const Tally* t : {&first, &second}) {
    EXPECT_GT(t->sent.load(), 500);
    EXPECT_EQ(t->answered.load(), t->sent.load()) << "requests without exactly one answer";
    EXPECT_EQ(t->wrong.load(), 0);
  }
  ASSERT_GT(rss_first, 0);
  EXPECT_LT(rss_second, rss_first + rss_first / 10 + 8 * 1024) << "memory grew from " << rss_first << " to " << rss_second << " KiB";
  EXPECT_EQ(call(port, "GET", "/health").status, 200) << server.log();
  // A 200 is sent only after its decision is committed: the log and the answers agree exactly.
  const long classified = first.classified.load() + second.classified.load();
  EXPECT_GT(classified, 100);
  EXPECT_EQ(sqlite_count(file("soak.db"), "decisions"), classified);
}

}  // namespace
}  // namespace arbiter
