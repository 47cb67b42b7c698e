#include "parallel/communicator.h"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace arbiter {

double default_comm_timeout() {
  if (const char* env = std::getenv("ARBITER_COMM_TIMEOUT")) {
    char* end = nullptr;
    const double v = std::strtod(env, &end);
    if (end != env && *end == '\0' && v > 0) return v;
  }
  return 300.0;
}

void Communicator::all_to_all_v_parts(std::span<const Part> parts) {
  for (const Part& p : parts) all_to_all_v(p.send, p.send_counts, p.recv, p.recv_counts);
}

void Communicator::all_to_all_v_parts_device(std::span<const Part>, void*) {
  throw std::logic_error("Communicator: the " + name() + " transport takes host buffers only");
}

void Communicator::enqueue_all_to_all_v_parts_device(std::span<const Part>, void*) {
  throw std::logic_error("Communicator: the " + name() + " transport cannot enqueue device exchanges");
}

std::vector<size_t> exchange_counts(Communicator& comm, std::span<const size_t> send_counts) {
  const size_t n = static_cast<size_t>(comm.size());
  if (send_counts.size() != n) throw std::invalid_argument("exchange_counts: one count per rank expected");
  std::vector<size_t> recv(n);
  const std::vector<size_t> sizes(n, sizeof(size_t));
  comm.all_to_all_v(send_counts.data(), sizes, recv.data(), sizes);
  return recv;
}

uint64_t fnv1a64(const void* data, size_t bytes, uint64_t seed) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = seed;
  for (size_t i = 0; i < bytes; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

void check_same_fingerprint(Communicator& comm, uint64_t fingerprint, const std::string& what) {
  std::vector<uint64_t> all(static_cast<size_t>(comm.size()));
  comm.all_gather(&fingerprint, sizeof fingerprint, all.data());
  std::string bad;
  auto hex = [](uint64_t v) {
    char buf[24];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
    return std::string(buf);
  };
  for (size_t r = 1; r < all.size(); ++r)
    if (all[r] != all[0]) bad += (bad.empty() ? "" : ", ") + ("rank " + std::to_string(r) + " has " + hex(all[r]));
  if (!bad.empty())
    throw std::runtime_error("ranks disagree on " + what + ": rank 0 has fingerprint " + hex(all[0]) + ", " + bad +
                             " (start every rank with the same files and options)");
}

}  // namespace arbiter
