// ServeProcess: a running `arbiter serve` (or `mpirun -np 2 arbiter serve`) for end-to-end tests of
// the HTTP and gRPC APIs: started with a pipe on its standard output, which is read until the
// address line; SIGTERM (to rank 0) and reaped when destroyed. Needs ARBITER_BINARY, and
// ARBITER_MPIEXEC for mpi runs.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <regex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace arbiter::testing {

// A running `arbiter serve` (or `mpirun ... arbiter serve`); SIGTERM and reaped when destroyed.
class ServeProcess {
 public:
  ServeProcess(const std::vector<std::string>& args, const std::string& log_file, bool mpi = false) : log_(log_file) {
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
      std::vector<char*> c;
      for (auto& a : argv) c.push_back(a.data());
      c.push_back(nullptr);
      execv(c[0], c.data());
      _exit(127);
    }
    close(out[1]);
    stdout_ = out[0];
    // The address line comes first.
    std::smatch m;
    try {
      m = wait_for_output(std::regex("listening on http://([0-9.]+):([0-9]+) \\(pid ([0-9]+)\\)"), 60);
    } catch (...) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      close(stdout_);
      stdout_ = -1;
      reaped_ = true;
      throw;
    }
    port_ = std::stoi(m[2]);
    server_pid_ = std::stoi(m[3]);
  }
  ~ServeProcess() {
    if (pid_ > 0 && !reaped_) {
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

  // Reads the server's standard output until `pattern` matches it (within `seconds`); the match
  // (its groups refer to output()). Throws when the output ends or the time runs out first.
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
  using Clock = std::chrono::steady_clock;
  std::string log_;
  std::string output_;
  pid_t pid_ = -1;
  int stdout_ = -1;
  int port_ = 0;
  pid_t server_pid_ = -1;
  bool reaped_ = false;
};

}  // namespace arbiter::testing
