// Rank faults under `mpirun -np 2 arbiter serve` on a tiny random model: a worker rank stopped
// (SIGSTOP) during a classify request makes that request fail with 503 `rank_unavailable` within
// the heartbeat timeout, /ready 503 naming the rank, and new requests 503; once it continues
// (SIGCONT) /ready is 200 again, requests are answered and SIGTERM still drains to exit 0. A worker
// rank killed (SIGKILL) during a request: that request gets an HTTP 503 (not a closed connection)
// and the job ends with a non-zero status within a bounded time. SIGTERM while a rank stalls ends the
// job instead of hanging in the drain; an idle job outlives the communicator's timeout.
#include <gtest/gtest.h>
#include <httplib.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/api/serve_process.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

constexpr double kHeartbeatTimeout = 2;  // --heartbeat-timeout of these tests

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// A classify request that generates for a long time (tens of seconds on the tiny model).
std::string long_classify() {
  return json{{"content", "a long one"}, {"policies", {{{"text", "Policy A. Answer 0 or 1."}}}}, {"max_tokens", 3500}}.dump();
}
std::string short_classify() {
  return json{{"content", "a short one"}, {"policies", {{{"text", "Policy A. Answer 0 or 1."}}}}, {"max_tokens", 4}}.dump();
}

// A request in flight on a thread, with the time its reply came.
struct Background {
  Reply reply;
  Clock::time_point answered{};
  std::thread thread;
  Background(int port, const std::string& body)
      : thread([this, port, body] {
          reply = call(port, "POST", "/v1/classify", body);
          answered = Clock::now();
        }) {}
  ~Background() {
    if (thread.joinable()) thread.join();
  }
};

class RankFaults : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = std::make_unique<testing::TempDir>();
    ASSERT_EQ(make_tiny_model(tmp_->file("model"), 5), "");
  }
  static void TearDownTestSuite() { tmp_.reset(); }
  void SetUp() override {
    if (std::string(ARBITER_MPIEXEC).empty()) GTEST_SKIP() << "no mpiexec found at configure time: mpirun tests skipped";
  }
  static std::vector<std::string> args() {
    return {"--model", tmp_->file("model"), "--port", "0", "--device", "cpu", "--request-timeout", "300",
            "--heartbeat-timeout", std::to_string(kHeartbeatTimeout)};
  }
  static std::string file(const std::string& name) { return tmp_->file(name); }

  // Waits until the scheduler runs at least one sequence (the request is in flight, not queued).
  static bool wait_running(int port, double seconds) {
    const auto until = Clock::now() + std::chrono::duration<double>(seconds);
    while (Clock::now() < until) {
      if (metric(port, "arbiter_running_sequences") >= 1) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }

  static inline std::unique_ptr<testing::TempDir> tmp_;
};

TEST_F(RankFaults, StalledWorkerFailsRequestsAtOnceAndServingResumesWhenItContinues) {
  ServeProcess server(args(), file("stall.log"), true);
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 90)) << server.log();
  const pid_t worker = server.worker_pid();
  ASSERT_GT(worker, 0) << "rank 1's pid not found under mpirun" << server.log();
  ASSERT_NE(worker, server.server_pid());

  Background inflight(port, long_classify());
  ASSERT_TRUE(wait_running(port, 30)) << server.log();
  ASSERT_EQ(kill(worker, SIGSTOP), 0);
  const auto stopped = Clock::now();
  inflight.thread.join();
  const double took = std::chrono::duration<double>(inflight.answered - stopped).count();
  // The answer comes from the heartbeat, not from the communicator's timeout (300 s by default) or
  // the request's deadline (300 s here), nor from the generation finishing (it needs the worker).
  EXPECT_EQ(inflight.reply.status, 503) << inflight.reply.raw << server.log();
  EXPECT_EQ(inflight.reply.body["error"]["code"], "rank_unavailable") << inflight.reply.raw;
  EXPECT_NE(inflight.reply.raw.find("rank 1"), std::string::npos) << inflight.reply.raw;
  EXPECT_FALSE(inflight.reply.retry_after.empty());
  // (The last heartbeat before the stop may have left up to an interval earlier, later under load.)
  EXPECT_GE(took, kHeartbeatTimeout / 2) << "answered before the rank could count as stalled";
  EXPECT_LT(took, kHeartbeatTimeout + 3) << "the stall was not noticed within the heartbeat timeout";

  // While it stays stopped: /ready names it, /health still answers (rank 0 lives), new work gets 503.
  const Reply ready = call(port, "GET", "/ready");
  EXPECT_EQ(ready.status, 503) << ready.raw;
  EXPECT_EQ(ready.body["status"], "rank_fault") << ready.raw;
  EXPECT_NE(ready.body.value("message", "").find("rank 1 stalls"), std::string::npos) << ready.raw;
  EXPECT_FALSE(ready.retry_after.empty());
  EXPECT_EQ(call(port, "GET", "/health").status, 200);
  const auto fresh_start = Clock::now();
  const Reply fresh = call(port, "POST", "/v1/classify", short_classify());
  EXPECT_EQ(fresh.status, 503) << fresh.raw;
  EXPECT_EQ(fresh.body["error"]["code"], "rank_unavailable") << fresh.raw;
  EXPECT_LT(since(fresh_start), 1.0) << "a new request should be refused at once";
  const Reply chat = call(port, "POST", "/v1/chat/completions", json{{"messages", {{{"role", "user"}, {"content", "hi"}}}}}.dump());
  EXPECT_EQ(chat.status, 503) << chat.raw;
  EXPECT_EQ(metric(port, "arbiter_rank_fault"), 1);
  EXPECT_EQ(metric(port, "arbiter_ready"), 0);

  // It continues: the step it was in completes, the rank is healthy again, requests are answered.
  ASSERT_EQ(kill(worker, SIGCONT), 0);
  EXPECT_TRUE(wait_ready(port, 10)) << call(port, "GET", "/ready").raw << server.log();
  const Reply after = call(port, "POST", "/v1/classify", short_classify());
  EXPECT_EQ(after.status, 200) << after.raw << server.log();
  EXPECT_EQ(metric(port, "arbiter_rank_fault"), 0);
  // And a normal SIGTERM still drains the job to a clean exit.
  kill(server.server_pid(), SIGTERM);
  EXPECT_EQ(server.wait_exit(30), 0) << server.log();
}

TEST_F(RankFaults, KilledWorkerGets503InsteadOfAClosedConnectionAndTheJobEnds) {
  ServeProcess server(args(), file("kill.log"), true);
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 90)) << server.log();
  const pid_t worker = server.worker_pid();
  ASSERT_GT(worker, 0) << "rank 1's pid not found under mpirun" << server.log();

  Background inflight(port, long_classify());
  ASSERT_TRUE(wait_running(port, 30)) << server.log();
  ASSERT_EQ(kill(worker, SIGKILL), 0);
  const auto killed = Clock::now();
  inflight.thread.join();
  EXPECT_EQ(inflight.reply.status, 503) << inflight.reply.raw << server.log();  // 0 would be a closed connection
  EXPECT_EQ(inflight.reply.body["error"]["code"], "rank_unavailable") << inflight.reply.raw;
  EXPECT_NE(inflight.reply.raw.find("rank 1 died"), std::string::npos) << inflight.reply.raw;
  EXPECT_LT(std::chrono::duration<double>(inflight.answered - killed).count(), 1.5) << "a dead rank should be seen at once";
  // The job ends by itself, with a failure status (rank 0 ends it with 75; mpirun may report its own).
  const int status = server.wait_exit(20);
  EXPECT_NE(status, -2) << "the job did not end within 20 s of losing a rank" << server.log();
  EXPECT_NE(status, 0) << server.log();
  EXPECT_NE(server.log().find("rank 1 died"), std::string::npos) << server.log();
}

TEST_F(RankFaults, SigtermWhileAWorkerStallsEndsTheJobInsteadOfHangingInTheDrain) {
  ServeProcess server(args(), file("stall-term.log"), true);
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 90)) << server.log();
  const pid_t worker = server.worker_pid();
  ASSERT_GT(worker, 0) << server.log();
  Background inflight(port, long_classify());
  ASSERT_TRUE(wait_running(port, 30)) << server.log();
  ASSERT_EQ(kill(worker, SIGSTOP), 0);
  inflight.thread.join();
  EXPECT_EQ(inflight.reply.status, 503) << inflight.reply.raw << server.log();
  // The drain cannot finish the step the stopped rank is in: rank 0 ends the job instead (mpirun
  // kills the stopped rank too) rather than waiting for the communicator's timeout.
  const auto term = Clock::now();
  kill(server.server_pid(), SIGTERM);
  const int status = server.wait_exit(20);
  EXPECT_NE(status, -2) << "the job hung after SIGTERM with a stalled rank" << server.log();
  EXPECT_NE(status, 0) << server.log();
  EXPECT_LT(since(term), 10) << server.log();
}

TEST_F(RankFaults, IdleJobOutlivesTheCommunicatorTimeout) {
  // The workers wait for the next plan inside a collective: without the loop's keep-alive steps an
  // idle job would end once that wait timed out (here after 2 s).
  ServeProcess server(args(), file("idle.log"), true, {"ARBITER_COMM_TIMEOUT=2"});
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 90)) << server.log();
  std::this_thread::sleep_for(std::chrono::seconds(5));
  EXPECT_EQ(call(port, "GET", "/ready").status, 200) << server.log();
  const Reply r = call(port, "POST", "/v1/classify", short_classify());
  EXPECT_EQ(r.status, 200) << r.raw << server.log();
  kill(server.server_pid(), SIGTERM);
  EXPECT_EQ(server.wait_exit(30), 0) << server.log();
}

}  // namespace
}  // namespace arbiter
