// HeartbeatMonitor / HeartbeatSender over loopback TCP: a healthy rank is never reported, a silent one
// is reported stalled after the timeout (and recovers when heard from again), a closed one dead at
// once, one that said goodbye is not reported, a rank that lags a step is stalled after the step
// timeout, bad tokens are dropped; and start_heartbeat over two thread ranks.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <thread>

#include "parallel/heartbeat.h"
#include "parallel/thread_comm.h"

namespace arbiter {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kToken = 0x1234567890abcdefull;

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// A raw peer that speaks the wire format itself (so the test can go silent or hang up at will).
class RawPeer {
 public:
  explicit RawPeer(int port) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) throw std::runtime_error("connect");
  }
  ~RawPeer() { hang_up(); }
  // One heartbeat: "ARHB", rank, token, completed steps, big-endian.
  void beat(uint32_t rank, uint64_t token = kToken, uint64_t steps = 0) {
    unsigned char b[24];
    auto put = [&](int at, uint64_t v, int bytes) {
      for (int i = bytes - 1; i >= 0; --i, v >>= 8) b[at + i] = static_cast<unsigned char>(v & 0xff);
    };
    put(0, 0x41524842, 4);
    put(4, rank, 4);
    put(8, token, 8);
    put(16, steps, 8);
    ASSERT_EQ(send(fd_, b, sizeof(b), MSG_NOSIGNAL), 24);
  }
  void hang_up() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// Polls `monitor.fault()` until `pred` holds or `seconds` pass; returns the last reading and the time.
struct Reading {
  std::optional<RankFault> fault;
  double seconds = 0;
  bool matched = false;
};
Reading wait_for(const HeartbeatMonitor& monitor, double seconds, const std::function<bool(const std::optional<RankFault>&)>& pred) {
  const auto start = Clock::now();
  Reading r;
  while (since(start) < seconds) {
    r.fault = monitor.fault();
    if (pred(r.fault)) {
      r.matched = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  r.seconds = since(start);
  return r;
}

HeartbeatOptions quick(double timeout = 0.5, double step_timeout = 0) {
  HeartbeatOptions o;
  o.timeout = timeout;
  o.step_timeout = step_timeout;
  o.interval = 0.05;
  return o;
}

TEST(Heartbeat, HealthyRankIsNeverReportedAndGoodbyeIsNotDeath) {
  HeartbeatMonitor monitor(2, kToken, quick());
  auto sender = std::make_unique<HeartbeatSender>("127.0.0.1", monitor.port(), 1, kToken, 0.05);
  // Three timeouts' worth of readings: none reports a fault.
  const Reading r = wait_for(monitor, 1.5, [](const auto& f) { return f.has_value(); });
  EXPECT_FALSE(r.matched) << r.fault->message;
  // Steps reported as completed keep it healthy.
  monitor.step_started(1);
  sender->set_completed_steps(1);
  EXPECT_FALSE(wait_for(monitor, 0.3, [](const auto& f) { return f.has_value(); }).matched);
  // An orderly goodbye (destruction) is not a death, and silence afterwards is not a stall.
  sender.reset();
  const Reading after = wait_for(monitor, 1.0, [](const auto& f) { return f.has_value(); });
  EXPECT_FALSE(after.matched) << after.fault->message;
}

TEST(Heartbeat, SilentRankStallsAfterTheTimeoutAndRecovers) {
  HeartbeatMonitor monitor(2, kToken, quick(0.5));
  RawPeer peer(monitor.port());
  peer.beat(1);
  const auto silent_since = Clock::now();
  const Reading r = wait_for(monitor, 3, [](const auto& f) { return f.has_value(); });
  ASSERT_TRUE(r.matched) << "a silent rank was never reported";
  EXPECT_GE(since(silent_since) + 0.01, 0.5) << "reported before the timeout";  // (poll granularity)
  EXPECT_LT(r.seconds, 0.5 + 0.3) << "reported late";
  EXPECT_EQ(r.fault->rank, 1);
  EXPECT_FALSE(r.fault->fatal);
  EXPECT_NE(r.fault->message.find("rank 1 stalls"), std::string::npos) << r.fault->message;
  // Heard from again: healthy.
  peer.beat(1);
  const Reading back = wait_for(monitor, 1, [](const auto& f) { return !f.has_value(); });
  EXPECT_TRUE(back.matched) << back.fault->message;
}

TEST(Heartbeat, ClosedRankIsDeadAtOnce) {
  HeartbeatMonitor monitor(2, kToken, quick(5));
  RawPeer peer(monitor.port());
  peer.beat(1);
  EXPECT_FALSE(wait_for(monitor, 0.2, [](const auto& f) { return f.has_value(); }).matched);
  peer.hang_up();
  const Reading r = wait_for(monitor, 2, [](const auto& f) { return f.has_value(); });
  ASSERT_TRUE(r.matched);
  EXPECT_LT(r.seconds, 0.3) << "a closed connection should be seen at once, not after the 5 s timeout";
  EXPECT_EQ(r.fault->rank, 1);
  EXPECT_TRUE(r.fault->fatal);
  EXPECT_NE(r.fault->message.find("rank 1 died"), std::string::npos) << r.fault->message;
  // Dead stays dead.
  EXPECT_FALSE(wait_for(monitor, 0.2, [](const auto& f) { return !f || !f->fatal; }).matched);
}

TEST(Heartbeat, RankLaggingAStepStallsAfterTheStepTimeout) {
  HeartbeatMonitor monitor(2, kToken, quick(5, 0.4));
  HeartbeatSender sender("127.0.0.1", monitor.port(), 1, kToken, 0.05);
  monitor.step_started(1);
  const Reading r = wait_for(monitor, 3, [](const auto& f) { return f.has_value(); });
  ASSERT_TRUE(r.matched) << "a rank that never completes the step was never reported";
  EXPECT_GE(r.seconds, 0.39);
  EXPECT_LT(r.seconds, 0.4 + 0.3);
  EXPECT_EQ(r.fault->rank, 1);
  EXPECT_FALSE(r.fault->fatal);
  EXPECT_NE(r.fault->message.find("step 1"), std::string::npos) << r.fault->message;
  sender.set_completed_steps(1);  // the step completes: healthy with the next heartbeat
  EXPECT_TRUE(wait_for(monitor, 1, [](const auto& f) { return !f.has_value(); }).matched);
}

TEST(Heartbeat, WrongTokenOrMissingRankIsNotTakenForARank) {
  HeartbeatMonitor monitor(3, kToken, quick(0.4));
  HeartbeatSender rank1("127.0.0.1", monitor.port(), 1, kToken, 0.05);
  RawPeer stranger(monitor.port());
  stranger.beat(2, kToken ^ 1);  // rank 2 with the wrong token: dropped, rank 2 still unheard of
  const Reading r = wait_for(monitor, 3, [](const auto& f) { return f.has_value(); });
  ASSERT_TRUE(r.matched);
  EXPECT_EQ(r.fault->rank, 2);
  EXPECT_FALSE(r.fault->fatal) << "the stranger's dropped connection must not count as rank 2 dying";
  EXPECT_NE(r.fault->message.find("since start-up"), std::string::npos) << r.fault->message;
  EXPECT_THROW(HeartbeatSender("127.0.0.1", 1, 1, kToken, 0.05), std::runtime_error);  // nobody listens on port 1
}

TEST(Heartbeat, StartHeartbeatConnectsEveryRank) {
  run_thread_ranks(3, [](Communicator& comm) {
    HeartbeatOptions o = quick(0.5);
    Heartbeat hb = start_heartbeat(comm, o);
    EXPECT_EQ(hb.monitor != nullptr, comm.rank() == 0);
    EXPECT_EQ(hb.sender != nullptr, comm.rank() != 0);
    if (hb.monitor) {
      const Reading r = wait_for(*hb.monitor, 1.0, [](const auto& f) { return f.has_value(); });
      EXPECT_FALSE(r.matched) << r.fault->message;
    }
    comm.barrier();
    hb.sender.reset();  // workers leave in order
    comm.barrier();
    if (hb.monitor) {
      const Reading r = wait_for(*hb.monitor, 0.8, [](const auto& f) { return f.has_value(); });
      EXPECT_FALSE(r.matched) << r.fault->message;
    }
  });
}

}  // namespace
}  // namespace arbiter
