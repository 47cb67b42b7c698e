// DeviceArena (kernels/device_arena.h) against a reference model: a bitmap of 256-byte units that
// predicts the exact address of every first-fit allocation, and whether it fails. Randomized
// allocate / free of random sizes and alignments, plus concurrent use from several threads.
#include "kernels/device_arena.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <thread>
#include <vector>

namespace arbiter {
namespace {

constexpr size_t kUnit = kDeviceArenaAlignment;

// Host memory standing in for a device region, starting at a 64 KiB boundary (so that alignments
// up to 64 KiB are tested against absolute addresses).
class Region {
 public:
  explicit Region(size_t bytes) : storage_(bytes + kBaseAlignment) {
    const auto v = reinterpret_cast<uintptr_t>(storage_.data());
    base_ = storage_.data() + ((kBaseAlignment - v % kBaseAlignment) % kBaseAlignment);
  }
  std::byte* base() { return base_; }

 private:
  static constexpr size_t kBaseAlignment = 64 << 10;
  std::vector<std::byte> storage_;
  std::byte* base_ = nullptr;
};

// What the arena must do: the lowest address that is a multiple of the alignment and starts a run
// of free units long enough (first fit over an address-ordered, fully merged free list is exactly that).
class Reference {
 public:
  Reference(uintptr_t base, size_t units) : base_(base), used_(units, false) {}
  // Offset in units, or -1 when nothing fits.
  long find(size_t units, size_t alignment) const {
    const size_t step = std::max<size_t>(alignment, kUnit) / kUnit;
    const size_t first = ((base_ + alignment - 1) / alignment * alignment - base_) / kUnit;
    for (size_t at = first; at + units <= used_.size(); at += step) {
      bool free = true;
      for (size_t u = at; u < at + units && free; ++u) free = !used_[u];
      if (free) return static_cast<long>(at);
    }
    return -1;
  }
  void mark(size_t at, size_t units, bool used) {
    for (size_t u = at; u < at + units; ++u) {
      ASSERT_NE(used_[u], used) << "unit " << u;
      used_[u] = used;
    }
  }

 private:
  uintptr_t base_;
  std::vector<bool> used_;
};

TEST(DeviceArena, RoundsSizes) {
  EXPECT_EQ(device_arena_bytes(0), kUnit);
  EXPECT_EQ(device_arena_bytes(1), kUnit);
  EXPECT_EQ(device_arena_bytes(kUnit), kUnit);
  EXPECT_EQ(device_arena_bytes(kUnit + 1), 2 * kUnit);
}

TEST(DeviceArena, UnalignedBaseShrinksInwards) {
  Region r(64 * kUnit);
  DeviceArena arena(r.base() + 3, 10 * kUnit);
  EXPECT_EQ(arena.base(), r.base() + kUnit);
  EXPECT_EQ(arena.capacity(), 9 * kUnit);
  DeviceArena tiny(r.base() + 1, kUnit);  // no whole unit inside
  EXPECT_EQ(tiny.capacity(), 0u);
  EXPECT_EQ(tiny.allocate(1).data(), nullptr);
  DeviceArena null_region(nullptr, 1 << 20);
  EXPECT_EQ(null_region.capacity(), 0u);
  EXPECT_EQ(null_region.allocate(1).data(), nullptr);
}

TEST(DeviceArena, RejectsBadRequestsWithoutChangingState) {
  Region r(16 * kUnit);
  DeviceArena arena(r.base(), 16 * kUnit);
  DeviceBuffer a = arena.allocate(100);
  ASSERT_NE(a.data(), nullptr);
  EXPECT_EQ(a.bytes(), 100u);
  EXPECT_EQ(arena.allocate(1, 3).data(), nullptr);   // not a power of two
  EXPECT_EQ(arena.allocate(1, 0).data(), nullptr);
  EXPECT_EQ(arena.allocate(SIZE_MAX).data(), nullptr);
  EXPECT_EQ(arena.allocate(16 * kUnit).data(), nullptr);  // one unit is taken
  EXPECT_EQ(arena.live_allocations(), 1u);
  EXPECT_EQ(arena.bytes_in_use(), kUnit);
  DeviceBuffer b = arena.allocate(15 * kUnit);
  EXPECT_NE(b.data(), nullptr);
  EXPECT_EQ(arena.allocate(0).data(), nullptr);  // full
  a = DeviceBuffer();
  b = DeviceBuffer();
  EXPECT_EQ(arena.free_ranges(), 1u);
  EXPECT_EQ(arena.largest_free_range(), 16 * kUnit);
  EXPECT_EQ(arena.peak_bytes_in_use(), 16 * kUnit);
}

TEST(DeviceArena, MergesFreedNeighbours) {
  Region r(8 * kUnit);
  DeviceArena arena(r.base(), 8 * kUnit);
  std::vector<DeviceBuffer> b;
  for (int i = 0; i < 8; ++i) b.push_back(arena.allocate(kUnit));
  for (int i = 0; i < 8; ++i) EXPECT_EQ(b[static_cast<size_t>(i)].data(), r.base() + i * static_cast<long>(kUnit));
  b[1] = DeviceBuffer();
  b[3] = DeviceBuffer();
  EXPECT_EQ(arena.free_ranges(), 2u);
  b[2] = DeviceBuffer();  // joins 1 and 3
  EXPECT_EQ(arena.free_ranges(), 1u);
  EXPECT_EQ(arena.largest_free_range(), 3 * kUnit);
  DeviceBuffer three = arena.allocate(3 * kUnit);
  EXPECT_EQ(three.data(), r.base() + kUnit);
  b.clear();
  three = DeviceBuffer();
  EXPECT_EQ(arena.free_ranges(), 1u);
  EXPECT_EQ(arena.bytes_in_use(), 0u);
}

TEST(DeviceArena, KeepAliveIsReleasedAfterTheRange) {
  Region r(4 * kUnit);
  auto arena = std::make_shared<DeviceArena>(r.base(), 4 * kUnit);
  DeviceBuffer b = arena->allocate(10, kUnit, arena);
  std::weak_ptr<DeviceArena> weak = arena;
  arena.reset();  // the buffer keeps it alive
  ASSERT_FALSE(weak.expired());
  EXPECT_EQ(weak.lock()->live_allocations(), 1u);
  b = DeviceBuffer();
  EXPECT_TRUE(weak.expired());
}

TEST(DeviceArena, RandomizedAgainstReference) {
  constexpr size_t kUnits = 4096;  // 1 MiB
  Region r(kUnits * kUnit);
  DeviceArena arena(r.base(), kUnits * kUnit);
  Reference ref(reinterpret_cast<uintptr_t>(r.base()), kUnits);
  std::mt19937 rng(12345);
  struct Live {
    DeviceBuffer buffer;
    size_t at, units;
    std::byte tag;
  };
  std::vector<Live> live;
  size_t in_use = 0, peak = 0, failures = 0;
  const size_t alignments[] = {1, 16, 256, 512, 1024, 4096, 65536};
  auto check_tag = [&](const Live& l) {
    const auto* p = static_cast<const std::byte*>(l.buffer.data());
    for (size_t i = 0; i < l.buffer.bytes(); i += 97) ASSERT_EQ(p[i], l.tag);
    if (l.buffer.bytes()) {
      ASSERT_EQ(p[l.buffer.bytes() - 1], l.tag);
    }
  };
  for (int iter = 0; iter < 20000; ++iter) {
    const bool do_free = !live.empty() && (rng() % 100 < (in_use > kUnits * kUnit / 2 ? 55u : 40u));
    if (do_free) {
      const size_t i = rng() % live.size();
      check_tag(live[i]);
      ref.mark(live[i].at, live[i].units, false);
      in_use -= live[i].units * kUnit;
      std::swap(live[i], live.back());
      live.pop_back();
    } else {
      // Mostly small, some large (up to a quarter of the arena), some zero-byte.
      const size_t kind = rng() % 10;
      const size_t bytes = kind == 0 ? 0 : kind < 8 ? rng() % 5000 : rng() % (kUnits * kUnit / 4);
      const size_t alignment = alignments[rng() % std::size(alignments)];
      const size_t units = device_arena_bytes(bytes) / kUnit;
      const long expect = ref.find(units, alignment);
      DeviceBuffer b = arena.allocate(bytes, alignment);
      if (expect < 0) {
        ASSERT_EQ(b.data(), nullptr) << "iteration " << iter << ": nothing fits " << bytes << " bytes";
        ++failures;
      } else {
        ASSERT_EQ(b.data(), r.base() + expect * static_cast<long>(kUnit)) << "iteration " << iter;
        const auto v = reinterpret_cast<uintptr_t>(b.data());
        ASSERT_EQ(v % std::max<size_t>(alignment, kUnit), 0u);
        ASSERT_TRUE(arena.contains(b.data()));
        ASSERT_LE(v + units * kUnit, reinterpret_cast<uintptr_t>(r.base()) + kUnits * kUnit);
        ASSERT_EQ(b.bytes(), bytes);
        ref.mark(static_cast<size_t>(expect), units, true);
        const auto tag = static_cast<std::byte>(rng() % 256);
        std::memset(b.data(), static_cast<int>(tag), bytes);
        live.push_back({std::move(b), static_cast<size_t>(expect), units, tag});
        in_use += units * kUnit;
        peak = std::max(peak, in_use);
      }
    }
    ASSERT_EQ(arena.bytes_in_use(), in_use);
    ASSERT_EQ(arena.live_allocations(), live.size());
    ASSERT_EQ(arena.peak_bytes_in_use(), peak);
  }
  EXPECT_GT(failures, 100u) << "the test should fill the arena often";
  for (const Live& l : live) check_tag(l);
  live.clear();
  EXPECT_EQ(arena.bytes_in_use(), 0u);
  EXPECT_EQ(arena.live_allocations(), 0u);
  EXPECT_EQ(arena.free_ranges(), 1u);
  EXPECT_EQ(arena.largest_free_range(), kUnits * kUnit);
  DeviceBuffer whole = arena.allocate(kUnits * kUnit);
  EXPECT_EQ(whole.data(), r.base());
}

TEST(DeviceArena, ConcurrentAllocateAndFree) {
  constexpr size_t kUnits = 8192;
  Region r(kUnits * kUnit);
  DeviceArena arena(r.base(), kUnits * kUnit);
  constexpr int kThreads = 8;
  std::vector<std::thread> threads;
  std::vector<int> errors(kThreads, 0);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t) * 7919u + 1u);
      std::vector<std::pair<DeviceBuffer, std::byte>> mine;
      for (int i = 0; i < 5000; ++i) {
        if (!mine.empty() && rng() % 2 == 0) {
          const size_t k = rng() % mine.size();
          const auto* p = static_cast<const std::byte*>(mine[k].first.data());
          for (size_t j = 0; j < mine[k].first.bytes(); ++j) errors[static_cast<size_t>(t)] += p[j] != mine[k].second;
          std::swap(mine[k], mine.back());
          mine.pop_back();
        } else {
          DeviceBuffer b = arena.allocate(rng() % 3000, size_t{1} << (rng() % 12));
          if (!b.data()) continue;
          const auto tag = static_cast<std::byte>(t * 16 + static_cast<int>(rng() % 16));
          std::memset(b.data(), static_cast<int>(tag), b.bytes());
          mine.emplace_back(std::move(b), tag);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(errors[static_cast<size_t>(t)], 0) << "thread " << t << " saw overwritten bytes";
  EXPECT_EQ(arena.bytes_in_use(), 0u);
  EXPECT_EQ(arena.live_allocations(), 0u);
  EXPECT_EQ(arena.free_ranges(), 1u);
  EXPECT_GT(arena.peak_bytes_in_use(), 0u);
}

}  // namespace
}  // namespace arbiter
