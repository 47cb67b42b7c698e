// Test helpers for a real `arbiter serve` subprocess: ServeProcess starts it (alone or under
// `mpirun -np 2`) and reads the address it prints; call() sends one HTTP request; wait_ready() and
// metric() read /ready and /metrics. Shared by the API test suites.
#pragma once

#include <gtest/gtest.h>
#include <httplib.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <map>
#include <optional>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "tests/test_util.h"

namespace arbiter {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

// A running `arbiter serve` (or `mpirun ... arbiter serve`); SIGTERM and reaped when destroyed.
class ServeProcess {
 public:
  // mpi: under `mpirun -np 2`; env: extra NAME=VALUE settings for the server.
  ServeProcess(const std::vector<std::string>& args, const std::string& log_file, bool mpi = false,
               const std::vector<std::string>& env = {})
      : log_(log_file) {
    std::vector<std::string> argv;
    if (mpi) argv = {ARBITER_MPIEXEC, "--oversubscribe", "--allow-run-as-root", "-np", "2"};
    argv.push_back(ARBITER_BINARY);
    argv.push_back("serve");
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
      for (const std::string& e : env) {
        const size_t eq = e.find('=');
        if (eq != std::string::npos) setenv(e.substr(0, eq).c_str(), e.substr(eq + 1).c_str(), 1);
      }
      std::vector<char*> c;
      for (auto& a : argv) c.push_back(a.data());
      c.push_back(nullptr);
      execv(c[0], c.data());
      _exit(127);
    }
    close(out[1]);
    stdout_ = out[0];
    // The address line comes first.
    const std::regex address("listening on http://([0-9.]+):([0-9]+) \\(pid ([0-9]+)\\)");
    std::string& text = output_;
    const auto give_up = Clock::now() + std::chrono::seconds(60);
    std::smatch m;
    while (!std::regex_search(text, m, address)) {
      std::string failure;
      pollfd p{stdout_, POLLIN, 0};
      if (Clock::now() > give_up) failure = "no address printed";
      else if (poll(&p, 1, 200) > 0) {
        char buf[256];
        const ssize_t n = read(stdout_, buf, sizeof(buf));
        if (n <= 0) failure = "arbiter serve exited";
        else text.append(buf, static_cast<size_t>(n));
      }
      if (!failure.empty()) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
        close(stdout_);
        throw std::runtime_error(failure + "; output: " + text + log());
      }
    }
    port_ = std::stoi(m[2]);
    server_pid_ = std::stoi(m[3]);
  }
  ~ServeProcess() {
    if (pid_ > 0 && !reaped_) {
      // A test may have stopped a rank (SIGSTOP): let them run to shut down.
      if (server_pid_ > 0) kill(server_pid_, SIGCONT);
      if (worker_pid_ > 0) kill(worker_pid_, SIGCONT);
      kill(server_pid_ > 0 ? server_pid_ : pid_, SIGTERM);
      if (wait_exit(20) < -1) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
      }
    }
    if (stdout_ >= 0) close(stdout_);
  }
  ServeProcess(const ServeProcess&) = delete;
  ServeProcess& operator=(const ServeProcess&) = delete;

  // Reads on in the server's standard output until `pattern` matches it (e.g. the gRPC address
  // printed after the HTTP one); the match refers to output(). Throws when the output ends or
  // `seconds` pass first.
  std::smatch wait_for_output(const std::regex& pattern, double seconds) {
    const auto give_up = Clock::now() + std::chrono::duration<double>(seconds);
    std::smatch m;
    while (!std::regex_search(output_, m, pattern)) {
      std::string failure;
      pollfd p{stdout_, POLLIN, 0};
      if (Clock::now() > give_up) failure = "no such output";
      else if (poll(&p, 1, 200) > 0) {
        char buf[256];
        const ssize_t n = read(stdout_, buf, sizeof(buf));
        if (n <= 0) failure = "arbiter serve exited";
        else output_.append(buf, static_cast<size_t>(n));
      }
      if (!failure.empty()) throw std::runtime_error(failure + "; output: " + output_ + log());
    }
    return m;
  }
  const std::string& output() const { return output_; }  // standard output read so far

  int port() const { return port_; }
  pid_t pid() const { return pid_; }            // what was started (mpirun, or arbiter)
  pid_t server_pid() const { return server_pid_; }  // the arbiter process serving HTTP (rank 0)
  // Under mpirun: the pid of rank 1, from the line it prints once its model is loaded; -1 when it
  // prints none within a minute.
  pid_t worker_pid() {
    if (worker_pid_ > 0) return worker_pid_;
    const std::smatch m = wait_for_output(std::regex("rank 1 of 2 running steps \\(pid ([0-9]+)\\)"), 60);
    if (!m.empty()) worker_pid_ = std::stoi(m[1]);
    return worker_pid_;
  }
  std::string log() const {
    std::ifstream in(log_);
    return "\n--- server log ---\n" + std::string(std::istreambuf_iterator<char>(in), {});
  }
  // Exit status once the process ends within `seconds`; -2 when it did not; -1 killed by a signal.
  int wait_exit(double seconds) {
    const auto until = Clock::now() + std::chrono::duration<double>(seconds);
    while (Clock::now() < until) {
      int status = 0;
      const pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        reaped_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return -2;
  }

 private:
  std::string log_;
  std::string output_;
  pid_t pid_ = -1;
  int stdout_ = -1;
  int port_ = 0;
  pid_t server_pid_ = -1;
  pid_t worker_pid_ = -1;
  bool reaped_ = false;
};

struct Reply {
  int status = 0;
  json body;
  std::string raw;
  std::string retry_after;
};

inline Reply call(int port, const std::string& method, const std::string& path, const std::string& body = "",
           const std::string& key = "") {
  httplib::Client client("127.0.0.1", port);
  client.set_read_timeout(120, 0);
  client.set_connection_timeout(10, 0);
  httplib::Headers headers;
  if (!key.empty()) headers.emplace("Authorization", "Bearer " + key);
  httplib::Result r = method == "GET"      ? client.Get(path.c_str(), headers)
                      : method == "DELETE" ? client.Delete(path.c_str(), headers)
                                           : client.Post(path.c_str(), headers, body, "application/json");
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

inline bool wait_ready(int port, double seconds) {
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < until) {
    if (call(port, "GET", "/ready").status == 200) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

// The value of a metric line (name with labels, as printed); -1 when absent.
inline double metric(int port, const std::string& series) {
  const Reply r = call(port, "GET", "/metrics");
  std::istringstream in(r.raw);
  for (std::string line; std::getline(in, line);)
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  return -1;
}

// Four small policies the API tests register (a label set among them).
inline const char* kPolicyTexts[4] = {
    "# Spam\nSpam is unsolicited bulk advertising. Return exactly one character: 0 or 1.",
    "# Hate\nContent that attacks people for protected traits violates. Return exactly one character: 0 or 1.",
    "# Fraud\nPhishing and scams violate. Answer with a label: SAFE or FRAUD.",
    "# Self-harm\nInstructions for self-harm violate. Return exactly one character: 0 or 1.",
};

// Writes a tiny random model (with the real tokenizer) to `dir` with `arbiter make-model`; the
// command's output when it fails, "" when it worked.
inline std::string make_tiny_model(const std::string& dir, int seed) {
  const auto r = testing::run_command(std::string(ARBITER_BINARY) + " make-model --preset tiny --seed " + std::to_string(seed) +
                                      " --tokenizer-dir " + ARBITER_TOKENIZER_DIR + " --out " + dir);
  return r.status == 0 ? "" : "make-model failed: " + r.output;
}

// A TCP connection to 127.0.0.1:port; -1 when it cannot connect.
inline int connect_to(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// One HTTP response as read off a raw socket.
struct RawResponse {
  int status = 0;
  std::string version;                         // "HTTP/1.1"
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
  std::vector<int> interim;                    // 1xx statuses that came before it
  std::string header(const std::string& name) const {
    const auto it = headers.find(name);
    return it == headers.end() ? "" : it->second;
  }
};

// A raw client connection, for what an HTTP library hides: pipelining, half-close, trickled bytes,
// malformed requests. Closed when destroyed.
class RawConnection {
 public:
  explicit RawConnection(int port) : fd_(connect_to(port)) {}
  ~RawConnection() {
    if (fd_ >= 0) close(fd_);
  }
  RawConnection(const RawConnection&) = delete;
  RawConnection& operator=(const RawConnection&) = delete;

  bool ok() const { return fd_ >= 0; }
  int fd() const { return fd_; }
  bool send_all(std::string_view data) {
    while (!data.empty()) {
      const ssize_t n = send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      data.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }
  void shutdown_write() { shutdown(fd_, SHUT_WR); }

  // The next response (1xx interim responses are collected into it); nullopt when the connection
  // ends or nothing complete arrives within `seconds`. no_body: the answer to a HEAD request.
  std::optional<RawResponse> read_response(double seconds = 30, bool no_body = false) {
    const auto until = deadline(seconds);
    RawResponse r;
    for (;;) {
      size_t head_end;
      while ((head_end = buffer_.find("\r\n\r\n")) == std::string::npos)
        if (!fill(until)) return std::nullopt;
      const std::string head = buffer_.substr(0, head_end);
      buffer_.erase(0, head_end + 4);
      std::istringstream lines(head);
      std::string line;
      std::getline(lines, line);
      std::istringstream status_line(line);
      status_line >> r.version >> r.status;
      r.headers.clear();
      while (std::getline(lines, line)) {
        if (!line.empty() && line.back() == '\r') line.pop_back();
        const size_t colon = line.find(':');
        if (colon == std::string::npos) continue;
        std::string name = line.substr(0, colon);
        std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
        std::string value = line.substr(colon + 1);
        value.erase(0, value.find_first_not_of(' '));
        r.headers[name] = value;
      }
      if (r.status >= 100 && r.status < 200) {
        r.interim.push_back(r.status);
        continue;
      }
      break;
    }
    if (no_body) return r;
    if (r.headers.count("content-length")) {
      const size_t length = std::stoul(r.headers["content-length"]);
      while (buffer_.size() < length)
        if (!fill(until)) return std::nullopt;
      r.body = buffer_.substr(0, length);
      buffer_.erase(0, length);
    } else if (r.header("transfer-encoding") == "chunked") {
      for (;;) {
        size_t eol;
        while ((eol = buffer_.find("\r\n")) == std::string::npos)
          if (!fill(until)) return std::nullopt;
        const size_t size = std::stoul(buffer_.substr(0, eol), nullptr, 16);
        while (buffer_.size() < eol + 2 + size + 2)
          if (!fill(until)) return std::nullopt;
        r.body += buffer_.substr(eol + 2, size);
        buffer_.erase(0, eol + 2 + size + 2);
        if (size == 0) break;
      }
    } else {
      while (fill(until)) {
      }
      r.body = std::move(buffer_);
      buffer_.clear();
    }
    return r;
  }

  // Waits until the server closes the connection (end of stream or reset); false when it is still
  // open after `seconds`. Bytes that arrive meanwhile are kept for read_response().
  bool wait_closed(double seconds) {
    const auto until = deadline(seconds);
    while (Clock::now() < until)
      if (!fill(until)) return Clock::now() < until;
    return false;
  }

 private:
  static Clock::time_point deadline(double seconds) {
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  }
  // Reads more bytes; false at end of stream, on an error or at `until`.
  bool fill(Clock::time_point until) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
    if (left <= 0) return false;
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left)) <= 0) return false;
    char buf[16384];
    const ssize_t n = recv(fd_, buf, sizeof(buf), 0);
    if (n <= 0) return false;
    buffer_.append(buf, static_cast<size_t>(n));
    return true;
  }

  int fd_;
  std::string buffer_;
};

}  // namespace arbiter
