// Rank faults under `mpirun -np 2 arbiter serve` on a tiny random model: a worker rank stopped
// (SIGSTOP) during a classify request makes that request fail with 503 `rank_unavailable` within
// the heartbeat timeout, /ready 503 naming the rank, and new requests 503; once it continues
// (SIGCONT) /ready is 200 again, requests are answered and SIGTERM still drains to exit 0. A worker
// rank killed (SIGKILL) during a request: that request gets an HTTP 503 (not a closed connection)
// and the job ends with a non-zero status within a bounded time. SIGTERM while a rank stalls ends the
// job instead of hanging in the drain; an idle job outlives the communicator's timeout.
#include <gtest/gtest.h>
#include <httplib.h>

#include <dirent.h>
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

#include "tests/test_util.h"

namespace arbiter {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr double kHeartbeatTimeout = 2;  // --heartbeat-timeout of these tests

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// `mpirun -np 2 arbiter serve ...`, reaped when destroyed (SIGTERM to rank 0, then SIGKILL to mpirun).
class MpiServe {
 public:
  // env: extra NAME=VALUE settings for the job.
  MpiServe(const std::vector<std::string>& args, const std::string& log_file, const std::vector<std::string>& env = {})
      : log_(log_file) {
    std::vector<std::string> argv = {ARBITER_MPIEXEC, "--oversubscribe", "--allow-run-as-root", "-np", "2", ARBITER_BINARY, "serve"};
    argv.insert(argv.end(), args.begin(), args.end());
    int out[2];
    if (pipe(out) != 0) throw std::runtime_error("pipe");
    pid_ = fork();
    if (pid_ == 0) {
      dup2(out[1], STDOUT_FILENO);
      const int err = open(log_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (err >= 0) dup2(err, STDERR_FILENO);
      close(out[0]);
      setenv("OMPI_MCA_plm_rsh_agent", "", 1);
      setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 1);
      for (std::string e : env) putenv(strdup(e.c_str()));
      std::vector<char*> c;
      for (auto& a : argv) c.push_back(a.data());
      c.push_back(nullptr);
      execv(c[0], c.data());
      _exit(127);
    }
    close(out[1]);
    stdout_ = out[0];
    const std::regex address("listening on http://([0-9.]+):([0-9]+) \\(pid ([0-9]+)\\)");
    std::string text;
    std::smatch m;
    const auto give_up = Clock::now() + std::chrono::seconds(60);
    while (!std::regex_search(text, m, address)) {
      std::string failure;
      pollfd p{stdout_, POLLIN, 0};
      if (Clock::now() > give_up) failure = "no address printed";
      else if (poll(&p, 1, 200) > 0) {
        char buf[256];
        const ssize_t n = read(stdout_, buf, sizeof(buf));
        if (n <= 0) failure = "mpirun exited";
        else text.append(buf, static_cast<size_t>(n));
      }
      if (!failure.empty()) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
        reaped_ = true;
        throw std::runtime_error(failure + "; output: " + text + log());
      }
    }
    port_ = std::stoi(m[2]);
    rank0_pid_ = std::stoi(m[3]);
  }
  ~MpiServe() {
    if (!reaped_) {
      kill(rank0_pid_, SIGCONT);
      if (worker_pid_ > 0) kill(worker_pid_, SIGCONT);
      kill(rank0_pid_, SIGTERM);
      if (wait_exit(20) == -2) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
      }
    }
    close(stdout_);
  }
  MpiServe(const MpiServe&) = delete;
  MpiServe& operator=(const MpiServe&) = delete;

  int port() const { return port_; }
  pid_t rank0_pid() const { return rank0_pid_; }
  std::string log() const {
    std::ifstream in(log_);
    return "\n--- server log ---\n" + std::string(std::istreambuf_iterator<char>(in), {});
  }

  // The pid of rank 1: the descendant of mpirun whose environment says OMPI_COMM_WORLD_RANK=1.
  pid_t worker_pid() {
    if (worker_pid_ > 0) return worker_pid_;
    DIR* proc = opendir("/proc");
    if (!proc) return -1;
    std::vector<std::pair<pid_t, pid_t>> parent_of;  // (pid, ppid)
    while (dirent* e = readdir(proc)) {
      const pid_t pid = static_cast<pid_t>(std::atoi(e->d_name));
      if (pid <= 0) continue;
      std::ifstream stat("/proc/" + std::string(e->d_name) + "/stat");
      std::string line;
      std::getline(stat, line);
      const size_t close_paren = line.rfind(')');
      if (close_paren == std::string::npos) continue;
      std::istringstream rest(line.substr(close_paren + 2));
      char state = 0;
      pid_t ppid = 0;
      rest >> state >> ppid;
      parent_of.emplace_back(pid, ppid);
    }
    closedir(proc);
    auto descends_from_mpirun = [&](pid_t pid) {
      for (int depth = 0; depth < 8 && pid > 1; ++depth) {
        pid_t parent = 0;
        for (const auto& [p, pp] : parent_of)
          if (p == pid) parent = pp;
        if (parent == pid_) return true;
        pid = parent;
      }
      return false;
    };
    for (const auto& [pid, ppid] : parent_of) {
      if (!descends_from_mpirun(pid)) continue;
      std::ifstream env("/proc/" + std::to_string(pid) + "/environ");
      const std::string vars((std::istreambuf_iterator<char>(env)), {});
      if (vars.find(std::string("OMPI_COMM_WORLD_RANK=1") + '\0') != std::string::npos) worker_pid_ = pid;
    }
    return worker_pid_;
  }

  // mpirun's exit status once it ends within `seconds`; -2 when it did not; -1 killed by a signal.
  int wait_exit(double seconds) {
    const auto until = Clock::now() + std::chrono::duration<double>(seconds);
    while (Clock::now() < until) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        reaped_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -2;
  }

 private:
  std::string log_;
  pid_t pid_ = -1;
  int stdout_ = -1;
  int port_ = 0;
  pid_t rank0_pid_ = -1;
  pid_t worker_pid_ = -1;
  bool reaped_ = false;
};

struct Reply {
  int status = 0;  // 0: no HTTP response at all
  json body;
  std::string raw;
  std::string retry_after;
};

// read_timeout bounds how long a test waits for an answer that, were the fault not seen, would come
// only at the communicator's or the request's timeout (minutes).
Reply call(int port, const std::string& method, const std::string& path, const std::string& body = "", int read_timeout = 30) {
  httplib::Client client("127.0.0.1", port);
  client.set_read_timeout(read_timeout, 0);
  client.set_connection_timeout(10, 0);
  httplib::Result r = method == "GET" ? client.Get(path.c_str()) : client.Post(path.c_str(), body, "application/json");
  Reply out;
  if (!r) {
    out.raw = "no response: " + httplib::to_string(r.error());
    return out;
  }
  out.status = r->status;
  out.raw = r->body;
  out.body = json::parse(r->body, nullptr, false);
  out.retry_after = r->get_header_value("Retry-After");
  return out;
}

bool wait_ready(int port, double seconds) {
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < until) {
    if (call(port, "GET", "/ready").status == 200) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

double metric(int port, const std::string& series) {
  std::istringstream in(call(port, "GET", "/metrics").raw);
  for (std::string line; std::getline(in, line);)
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  return -1;
}

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
    const auto r = testing::run_command(std::string(ARBITER_BINARY) + " make-model --preset tiny --seed 5 --tokenizer-dir " +
                                        ARBITER_TOKENIZER_DIR + " --out " + tmp_->file("model"));
    ASSERT_EQ(r.status, 0) << r.output;
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
  MpiServe server(args(), file("stall.log"));
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 90)) << server.log();
  const pid_t worker = server.worker_pid();
  ASSERT_GT(worker, 0) << "rank 1's pid not found under mpirun" << server.log();
  ASSERT_NE(worker, server.rank0_pid());

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
  kill(server.rank0_pid(), SIGTERM);
  EXPECT_EQ(server.wait_exit(30), 0) << server.log();
}

TEST_F(RankFaults, KilledWorkerGets503InsteadOfAClosedConnectionAndTheJobEnds) {
  MpiServe server(args(), file("kill.log"));
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
  MpiServe server(args(), file("stall-term.log"));
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
  kill(server.rank0_pid(), SIGTERM);
  const int status = server.wait_exit(20);
  EXPECT_NE(status, -2) << "the job hung after SIGTERM with a stalled rank" << server.log();
  EXPECT_NE(status, 0) << server.log();
  EXPECT_LT(since(term), 10) << server.log();
}

TEST_F(RankFaults, IdleJobOutlivesTheCommunicatorTimeout) {
  // The workers wait for the next plan inside a collective: without the loop's keep-alive steps an
  // idle job would end once that wait timed out (here after 2 s).
  MpiServe server(args(), file("idle.log"), {"ARBITER_COMM_TIMEOUT=2"});
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 90)) << server.log();
  std::this_thread::sleep_for(std::chrono::seconds(5));
  EXPECT_EQ(call(port, "GET", "/ready").status, 200) << server.log();
  const Reply r = call(port, "POST", "/v1/classify", short_classify());
  EXPECT_EQ(r.status, 200) << r.raw << server.log();
  kill(server.rank0_pid(), SIGTERM);
  EXPECT_EQ(server.wait_exit(30), 0) << server.log();
}

}  // namespace
}  // namespace arbiter
