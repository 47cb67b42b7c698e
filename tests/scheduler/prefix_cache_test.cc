// PrefixCache: block hand-out, reference counts, hash-chain lookup with token comparison, duplicate
// registrations, LRU eviction (oldest release first, deepest first on ties) and its invariants.
#include "scheduler/prefix_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>

namespace arbiter {
namespace {

constexpr int kBs = 4;

std::vector<int32_t> seq(int start, int count) {
  std::vector<int32_t> t(static_cast<size_t>(count));
  std::iota(t.begin(), t.end(), start);
  return t;
}

// Allocates and registers a whole chain for `tokens` (full blocks only); returns its blocks, referenced.
std::vector<int32_t> cache_chain(PrefixCache& cache, const std::vector<int32_t>& tokens) {
  std::vector<int32_t> blocks;
  for (size_t i = 0; (i + 1) * kBs <= tokens.size(); ++i) {
    const int32_t b = cache.allocate();
    EXPECT_NE(b, PrefixCache::kNoBlock);
    const auto reg = cache.register_block(b, blocks.empty() ? PrefixCache::kNoBlock : blocks.back(),
                                          std::span<const int32_t>(tokens).subspan(i * kBs, kBs));
    EXPECT_TRUE(reg.cached);
    blocks.push_back(reg.block);
  }
  return blocks;
}

TEST(PrefixCache, HandsOutEveryBlockButZeroOnce) {
  PrefixCache cache(9, kBs);
  EXPECT_EQ(cache.usable_blocks(), 8);
  std::set<int32_t> got;
  for (int i = 0; i < 8; ++i) {
    const int32_t b = cache.allocate();
    EXPECT_GT(b, 0);
    EXPECT_LT(b, 9);
    got.insert(b);
  }
  EXPECT_EQ(got.size(), 8u);
  EXPECT_EQ(cache.allocate(), PrefixCache::kNoBlock);
  EXPECT_EQ(cache.used_blocks(), 8);
  const std::vector<int32_t> all(got.begin(), got.end());
  cache.release(all);
  EXPECT_EQ(cache.free_blocks(), 8);
  EXPECT_EQ(cache.check(), "");
  EXPECT_THROW(cache.release(all), std::logic_error);  // references never go negative
}

TEST(PrefixCache, MatchesTheLongestChainOfWholeBlocks) {
  PrefixCache cache(16, kBs);
  const auto tokens = seq(100, 14);  // 3 whole blocks + 2 tokens
  const auto chain = cache_chain(cache, tokens);
  ASSERT_EQ(chain.size(), 3u);
  EXPECT_EQ(cache.match(tokens, 10), chain);
  EXPECT_EQ(cache.match(tokens, 2), std::vector<int32_t>(chain.begin(), chain.begin() + 2));
  EXPECT_TRUE(cache.match(std::span<const int32_t>(tokens).first(3), 10).empty());  // no whole block
  auto other = tokens;
  other[9] = 7;  // differs inside block 2
  EXPECT_EQ(cache.match(other, 10), std::vector<int32_t>(chain.begin(), chain.begin() + 2));
  other = tokens;
  other[0] = 7;  // differs in block 0: nothing, even though later blocks hold the same tokens
  EXPECT_TRUE(cache.match(other, 10).empty());
  // The same tokens under a different parent are a different block.
  std::vector<int32_t> shifted = seq(200, 4);
  shifted.insert(shifted.end(), tokens.begin() + 4, tokens.begin() + 8);
  EXPECT_TRUE(cache.match(shifted, 10).empty());
  EXPECT_EQ(cache.check(), "");
}

TEST(PrefixCache, DuplicateRegistrationMovesTheReferenceToTheCachedBlock) {
  PrefixCache cache(16, kBs);
  const auto tokens = seq(1, 8);
  const auto first = cache_chain(cache, tokens);
  const int32_t mine = cache.allocate();
  const auto reg = cache.register_block(mine, PrefixCache::kNoBlock, std::span<const int32_t>(tokens).first(kBs));
  EXPECT_TRUE(reg.cached);
  EXPECT_EQ(reg.block, first[0]);
  EXPECT_EQ(cache.ref_count(first[0]), 2);
  EXPECT_EQ(cache.ref_count(mine), 0);
  EXPECT_FALSE(cache.is_cached(mine));
  EXPECT_EQ(cache.counters().duplicates, 1u);
  EXPECT_EQ(cache.check(), "");
}

TEST(PrefixCache, UnreferencedBlocksStayCachedAndReferencedOnesAreNeverEvicted) {
  PrefixCache cache(7, kBs);  // 6 usable
  const auto a = seq(10, 8), b = seq(50, 8);
  const auto chain_a = cache_chain(cache, a);
  const auto chain_b = cache_chain(cache, b);
  cache.release(chain_a);
  EXPECT_EQ(cache.cached_blocks(), 2);
  EXPECT_EQ(cache.available_blocks(), 4);
  // Four allocations: two free blocks, then chain a is evicted; chain b (referenced) stays.
  std::vector<int32_t> fresh;
  for (int i = 0; i < 4; ++i) fresh.push_back(cache.allocate());
  EXPECT_EQ(std::count(fresh.begin(), fresh.end(), PrefixCache::kNoBlock), 0);
  EXPECT_EQ(cache.allocate(), PrefixCache::kNoBlock);
  EXPECT_TRUE(cache.match(a, 10).empty());
  EXPECT_EQ(cache.match(b, 10), chain_b);
  EXPECT_EQ(cache.counters().evictions, 2u);
  EXPECT_EQ(cache.check(), "");
}

TEST(PrefixCache, EvictsTheLeastRecentlyReleasedDeepestBlockFirst) {
  PrefixCache cache(7, kBs);  // 6 usable
  const auto old_tokens = seq(10, 12), new_tokens = seq(50, 8);
  const auto old_chain = cache_chain(cache, old_tokens);  // 3 blocks
  const auto new_chain = cache_chain(cache, new_tokens);  // 2 blocks
  cache.release(old_chain);  // released first: older
  cache.release(new_chain);
  ASSERT_EQ(cache.free_blocks(), 1);
  std::vector<int32_t> held = {cache.allocate()};  // the free one
  held.push_back(cache.allocate());                // evicts old block 2 (deepest of the oldest release)
  EXPECT_EQ(cache.match(old_tokens, 10).size(), 2u);
  held.push_back(cache.allocate());  // old block 1
  EXPECT_EQ(cache.match(old_tokens, 10).size(), 1u);
  held.push_back(cache.allocate());  // old block 0
  EXPECT_TRUE(cache.match(old_tokens, 10).empty());
  EXPECT_EQ(cache.match(new_tokens, 10), new_chain);
  // Reusing the new chain makes it recent again: it goes last.
  for (int32_t b : new_chain) cache.acquire(b);
  EXPECT_EQ(cache.allocate(), PrefixCache::kNoBlock);
  cache.release(new_chain);
  EXPECT_EQ(cache.check(), "");
}

TEST(PrefixCache, EvictingABlockDropsTheChainsThatContinueIt) {
  PrefixCache cache(9, kBs);
  auto x = seq(1, 12), y = x;
  y[10] = 99;  // shares blocks 0 and 1 with x
  const auto chain_x = cache_chain(cache, x);
  std::vector<int32_t> chain_y = cache.match(y, 10);
  ASSERT_EQ(chain_y.size(), 2u);
  for (int32_t b : chain_y) cache.acquire(b);
  const int32_t own = cache.allocate();
  const auto reg = cache.register_block(own, chain_y.back(), std::span<const int32_t>(y).subspan(8, 4));
  ASSERT_TRUE(reg.cached);
  chain_y.push_back(reg.block);
  cache.release(chain_x);
  cache.release(chain_y);
  EXPECT_EQ(cache.cached_blocks(), 4);  // two shared + two leaves
  cache.clear_unreferenced();
  EXPECT_EQ(cache.cached_blocks(), 0);
  EXPECT_EQ(cache.free_blocks(), 8);
  EXPECT_TRUE(cache.match(x, 10).empty());
  EXPECT_EQ(cache.check(), "");
}

}  // namespace
}  // namespace arbiter
