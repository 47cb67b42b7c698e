// ThreadComm unit tests: all-to-all-v with zero, uneven and large counts, many peers, all-gather,
// broadcast, barrier, and the failure paths (timeouts, a rank that throws, mismatched calls).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <numeric>

#include "parallel/thread_comm.h"

namespace arbiter {
namespace {

// Bytes rank `from` sends to rank `to`: some zero, all different.
size_t count_for(int from, int to, size_t scale) { return ((from * 7 + to * 3) % 5) * scale; }
uint8_t byte_for(int from, int to, size_t i) { return static_cast<uint8_t>(from * 31 + to * 17 + i * 13); }

void check_all_to_all(Communicator& c, size_t scale, void* device_stream = nullptr) {
  const int n = c.size(), me = c.rank();
  std::vector<size_t> send_counts(static_cast<size_t>(n)), recv_counts(static_cast<size_t>(n));
  std::vector<uint8_t> send;
  for (int p = 0; p < n; ++p) {
    send_counts[static_cast<size_t>(p)] = count_for(me, p, scale);
    recv_counts[static_cast<size_t>(p)] = count_for(p, me, scale);
    for (size_t i = 0; i < send_counts[static_cast<size_t>(p)]; ++i) send.push_back(byte_for(me, p, i));
  }
  EXPECT_EQ(exchange_counts(c, send_counts), recv_counts);
  std::vector<uint8_t> recv(std::accumulate(recv_counts.begin(), recv_counts.end(), size_t{0}), 0xee);
  if (device_stream) {
    const Communicator::Part part{send.data(), send_counts, recv.data(), recv_counts};
    c.all_to_all_v_parts_device({&part, 1}, device_stream);
  } else {
    c.all_to_all_v(send.data(), send_counts, recv.data(), recv_counts);
  }
  size_t at = 0;
  for (int p = 0; p < n; ++p)
    for (size_t i = 0; i < recv_counts[static_cast<size_t>(p)]; ++i, ++at)
      ASSERT_EQ(recv[at], byte_for(p, me, i)) << "rank " << me << " from " << p << " byte " << i;
}

TEST(ThreadComm, AllToAllVZeroCounts) {
  run_thread_ranks(4, [](Communicator& c) {
    const std::vector<size_t> zeros(4, 0);
    c.all_to_all_v(nullptr, zeros, nullptr, zeros);
  });
}

TEST(ThreadComm, AllToAllVUnevenCounts) {
  for (int n : {1, 2, 3, 5}) run_thread_ranks(n, [](Communicator& c) { check_all_to_all(c, 11); });
}

TEST(ThreadComm, AllToAllVLargeMessages) {
  run_thread_ranks(2, [](Communicator& c) { check_all_to_all(c, size_t{6} << 20); });  // up to 24 MiB per peer
}

// Ranks that share a device exchange its buffers through the group's DeviceCopy (memcpy here, as
// cudaMemcpyAsync on one GPU): every copy and wait on the caller's stream, the same bytes as the
// host exchange; a copy that fails fails every rank instead of hanging; without a DeviceCopy the
// device exchange is refused.
TEST(ThreadComm, DeviceBuffersOfASharedDevice) {
  std::atomic<int> copies{0}, waits{0}, wrong_stream{0};
  int streams[5];
  DeviceCopy copy{[&](void* dst, const void* src, size_t bytes, void* stream) {
                    if (stream < static_cast<void*>(&streams[0]) || stream > static_cast<void*>(&streams[4])) ++wrong_stream;
                    ++copies;
                    std::memcpy(dst, src, bytes);
                  },
                  [&](void*) { ++waits; }};
  for (int n : {1, 2, 3, 5}) {
    run_thread_ranks(
        n,
        [&](Communicator& c) {
          EXPECT_TRUE(c.takes_device_buffers());
          check_all_to_all(c, 11, &streams[c.rank()]);
        },
        default_comm_timeout(), copy);
  }
  EXPECT_GT(copies.load(), 0);
  EXPECT_GT(waits.load(), 0);
  EXPECT_EQ(wrong_stream.load(), 0);

  DeviceCopy failing{[](void*, const void*, size_t, void*) {}, [](void*) { throw std::runtime_error("device lost"); }};
  EXPECT_THROW(run_thread_ranks(3, [&](Communicator& c) { check_all_to_all(c, 5, &streams[c.rank()]); }, 5.0, failing),
               std::exception);
  run_thread_ranks(2, [&](Communicator& c) {
    EXPECT_FALSE(c.takes_device_buffers());
    const std::vector<size_t> zeros(2, 0);
    const Communicator::Part part{nullptr, zeros, nullptr, zeros};
    EXPECT_THROW(c.all_to_all_v_parts_device({&part, 1}, nullptr), std::exception);
  });
}

TEST(ThreadComm, ManyPeers) {
  run_thread_ranks(16, [](Communicator& c) {
    for (int rep = 0; rep < 3; ++rep) check_all_to_all(c, 3);
  });
}

TEST(ThreadComm, AllGatherBroadcastBarrier) {
  run_thread_ranks(5, [](Communicator& c) {
    const uint64_t mine = 1000 + static_cast<uint64_t>(c.rank());
    std::vector<uint64_t> all(5);
    c.all_gather(&mine, sizeof mine, all.data());
    for (int p = 0; p < 5; ++p) EXPECT_EQ(all[static_cast<size_t>(p)], 1000u + static_cast<uint64_t>(p));
    for (int root = 0; root < 5; ++root) {
      std::vector<int> v(100, c.rank() == root ? root + 1 : -1);
      c.broadcast(v.data(), v.size() * sizeof(int), root);
      EXPECT_EQ(v, std::vector<int>(100, root + 1));
    }
    c.all_gather(nullptr, 0, nullptr);
    c.barrier();
  });
}

TEST(ThreadComm, CountsExchangeAndFingerprint) {
  run_thread_ranks(3, [](Communicator& c) { check_same_fingerprint(c, 42, "the test"); });
  try {
    run_thread_ranks(3, [](Communicator& c) { check_same_fingerprint(c, c.rank() == 2 ? 7 : 42, "the model"); });
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("ranks disagree on the model"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("rank 2 has"), std::string::npos) << e.what();
  }
}

TEST(ThreadComm, MissingRankTimesOut) {
  const auto start = std::chrono::steady_clock::now();
  try {
    run_thread_ranks(
        3,
        [](Communicator& c) {
          if (c.rank() == 2) return;  // never arrives
          c.barrier();
        },
        0.2);
    FAIL() << "expected a timeout";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("timed out"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(ThreadComm, ThrowingRankFailsThePeersFast) {
  const auto start = std::chrono::steady_clock::now();
  std::atomic<int> peer_errors = 0;
  try {
    run_thread_ranks(4, [&](Communicator& c) {
      if (c.rank() == 1) throw std::runtime_error("rank 1 broke");
      try {
        for (;;) c.barrier();
      } catch (const CommError&) {
        ++peer_errors;
        throw;
      }
    });  // default timeout (minutes): the abort, not the timeout, must end it
    FAIL() << "expected the error";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "rank 1 broke");
  }
  EXPECT_EQ(peer_errors.load(), 3);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(ThreadComm, MismatchedCallsAreErrors) {
  EXPECT_THROW(run_thread_ranks(2,
                                [](Communicator& c) {
                                  if (c.rank() == 0) c.barrier();
                                  else c.broadcast(nullptr, 0, 0);
                                }),
               CommError);
  EXPECT_THROW(run_thread_ranks(2,
                                [](Communicator& c) {
                                  std::vector<uint8_t> buf(8);
                                  const std::vector<size_t> send = {0, 4}, recv = {0, c.rank() == 0 ? 8u : 4u};
                                  c.all_to_all_v(buf.data(), send, buf.data(), recv);
                                }),
               CommError);
  EXPECT_THROW(run_thread_ranks(2, [](Communicator& c) {
                 uint32_t a = 0;
                 std::vector<uint32_t> all(2);
                 c.all_gather(&a, c.rank() == 0 ? 4 : 2, all.data());
               }),
               CommError);
}

}  // namespace
}  // namespace arbiter
