#include "scheduler/prefix_cache.h"

#include <algorithm>
#include <stdexcept>

namespace arbiter {

namespace {

uint64_t mix64(uint64_t x) {  // splitmix64's finalizer
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

constexpr uint64_t kRootKey = 0x6a09e667f3bcc908ull;

}  // namespace

PrefixCache::PrefixCache(int num_blocks, int block_size)
    : num_blocks_(num_blocks), block_size_(block_size), blocks_(static_cast<size_t>(std::max(num_blocks, 0))) {
  if (num_blocks < 2) throw std::invalid_argument("PrefixCache: need at least 2 blocks (block 0 is reserved)");
  if (block_size < 1) throw std::invalid_argument("PrefixCache: block_size must be positive");
  free_.reserve(static_cast<size_t>(num_blocks - 1));
  for (int32_t b = num_blocks - 1; b >= 1; --b) free_.push_back(b);  // block 1 is handed out first
}

uint64_t PrefixCache::chain_key(int32_t parent, std::span<const int32_t> tokens) const {
  uint64_t h = parent == kNoBlock ? kRootKey : blocks_[static_cast<size_t>(parent)].key;
  for (int32_t t : tokens) h = mix64(h ^ static_cast<uint32_t>(t));
  return h;
}

bool PrefixCache::same_content(const Block& b, int32_t parent, std::span<const int32_t> tokens) const {
  return b.registered && b.parent == parent && std::equal(b.tokens.begin(), b.tokens.end(), tokens.begin(), tokens.end());
}

PrefixCache::EvictKey PrefixCache::evict_key(int32_t block) const {
  const Block& b = blocks_[static_cast<size_t>(block)];
  return {b.last_use, -b.depth, block};
}

std::vector<int32_t> PrefixCache::match(std::span<const int32_t> tokens, int max_blocks) const {
  std::vector<int32_t> chain;
  int32_t parent = kNoBlock;
  const size_t bs = static_cast<size_t>(block_size_);
  for (size_t i = 0; static_cast<int>(i) < max_blocks && (i + 1) * bs <= tokens.size(); ++i) {
    const auto content = tokens.subspan(i * bs, bs);
    const auto it = index_.find(chain_key(parent, content));
    if (it == index_.end() || !same_content(blocks_[static_cast<size_t>(it->second)], parent, content)) break;
    chain.push_back(it->second);
    parent = it->second;
  }
  return chain;
}

int32_t PrefixCache::allocate() {
  if (free_.empty() && !evictable_.empty()) evict_one();
  if (free_.empty()) return kNoBlock;
  const int32_t block = free_.back();
  free_.pop_back();
  blocks_[static_cast<size_t>(block)].refs = 1;
  ++counters_.allocations;
  return block;
}

void PrefixCache::acquire(int32_t block) {
  if (block <= 0 || block >= num_blocks_) throw std::logic_error("PrefixCache::acquire: bad block");
  Block& b = blocks_[static_cast<size_t>(block)];
  if (b.refs == 0) {
    if (!b.registered) throw std::logic_error("PrefixCache::acquire: block is free");
    evictable_.erase(evict_key(block));
  }
  ++b.refs;
}

void PrefixCache::release(std::span<const int32_t> blocks) {
  ++clock_;
  for (int32_t block : blocks) {
    if (block <= 0 || block >= num_blocks_) throw std::logic_error("PrefixCache::release: bad block");
    Block& b = blocks_[static_cast<size_t>(block)];
    if (b.refs <= 0) throw std::logic_error("PrefixCache::release: block has no references");
    if (--b.refs > 0) continue;
    b.last_use = clock_;
    if (b.registered) {
      evictable_.insert(evict_key(block));
    } else {
      free_.push_back(block);
    }
  }
}

PrefixCache::Registration PrefixCache::register_block(int32_t block, int32_t parent, std::span<const int32_t> tokens) {
  Block& b = blocks_[static_cast<size_t>(block)];
  if (b.refs <= 0 || b.registered) throw std::logic_error("PrefixCache::register_block: block not private");
  if (static_cast<int>(tokens.size()) != block_size_) throw std::logic_error("PrefixCache::register_block: partial block");
  if (parent != kNoBlock) {
    const Block& p = blocks_[static_cast<size_t>(parent)];
    if (!p.registered || p.refs <= 0) throw std::logic_error("PrefixCache::register_block: parent not cached and held");
  }
  const uint64_t key = chain_key(parent, tokens);
  if (const auto it = index_.find(key); it != index_.end()) {
    if (!same_content(blocks_[static_cast<size_t>(it->second)], parent, tokens)) {
      ++counters_.collisions;
      return {block, false};
    }
    const int32_t existing = it->second;
    acquire(existing);
    const int32_t own[] = {block};
    release(own);
    ++counters_.duplicates;
    return {existing, true};
  }
  b.registered = true;
  b.key = key;
  b.parent = parent;
  b.depth = parent == kNoBlock ? 0 : blocks_[static_cast<size_t>(parent)].depth + 1;
  b.tokens.assign(tokens.begin(), tokens.end());
  if (parent != kNoBlock) blocks_[static_cast<size_t>(parent)].children.push_back(block);
  index_.emplace(key, block);
  ++counters_.registrations;
  return {block, true};
}

void PrefixCache::evict_one() {
  const int32_t victim = std::get<2>(*evictable_.begin());
  counters_.evictions += static_cast<uint64_t>(drop_registration(victim));
}

int PrefixCache::drop_registration(int32_t block) {
  Block& b = blocks_[static_cast<size_t>(block)];
  if (b.refs != 0 || !b.registered) throw std::logic_error("PrefixCache: evicting a block in use");
  int dropped = 0;
  // Children first (a copy: each removes itself from this block's list).
  const std::vector<int32_t> children = b.children;
  for (int32_t child : children) dropped += drop_registration(child);
  evictable_.erase(evict_key(block));
  if (b.parent != kNoBlock) {
    auto& siblings = blocks_[static_cast<size_t>(b.parent)].children;
    siblings.erase(std::find(siblings.begin(), siblings.end(), block));
  }
  index_.erase(b.key);
  b = Block{};
  free_.push_back(block);
  return dropped + 1;
}

void PrefixCache::clear_unreferenced() {
  while (!evictable_.empty()) drop_registration(std::get<2>(*evictable_.begin()));
}

std::string PrefixCache::check() const {
  const auto where = [](int32_t block) { return "block " + std::to_string(block) + ": "; };
  std::vector<int> seen(static_cast<size_t>(num_blocks_), 0);
  for (int32_t block : free_) {
    if (block <= 0 || block >= num_blocks_) return "free list holds an invalid block " + std::to_string(block);
    const Block& b = blocks_[static_cast<size_t>(block)];
    if (b.refs != 0 || b.registered) return where(block) + "free but referenced or cached";
    if (seen[static_cast<size_t>(block)]++) return where(block) + "twice in the free list";
  }
  for (const EvictKey& k : evictable_) {
    const int32_t block = std::get<2>(k);
    if (block <= 0 || block >= num_blocks_) return "evictable set holds an invalid block";
    const Block& b = blocks_[static_cast<size_t>(block)];
    if (b.refs != 0 || !b.registered) return where(block) + "evictable but referenced or not cached";
    if (k != evict_key(block)) return where(block) + "stale eviction key";
    if (seen[static_cast<size_t>(block)]++) return where(block) + "free and evictable";
  }
  const Block& reserved = blocks_[0];
  if (reserved.refs != 0 || reserved.registered || seen[0]) return "block 0 was handed out";
  size_t registered = 0;
  for (int32_t block = 1; block < num_blocks_; ++block) {
    const Block& b = blocks_[static_cast<size_t>(block)];
    if (b.refs < 0) return where(block) + "negative reference count";
    if (b.refs == 0 && !seen[static_cast<size_t>(block)]) return where(block) + "lost (unreferenced, not free, not cached)";
    if (b.refs > 0 && seen[static_cast<size_t>(block)]) return where(block) + "referenced yet free or evictable";
    if (!b.registered) {
      if (!b.children.empty()) return where(block) + "uncached block has cached children";
      continue;
    }
    ++registered;
    if (static_cast<int>(b.tokens.size()) != block_size_) return where(block) + "cached with a partial token list";
    const auto it = index_.find(b.key);
    if (it == index_.end() || it->second != block) return where(block) + "missing from the key index";
    if (b.key != chain_key(b.parent, b.tokens)) return where(block) + "key does not hash its chain";
    if (b.parent != kNoBlock) {
      const Block& p = blocks_[static_cast<size_t>(b.parent)];
      if (!p.registered) return where(block) + "parent not cached";
      if (std::count(p.children.begin(), p.children.end(), block) != 1) return where(block) + "not among its parent's children";
      if (b.depth != p.depth + 1) return where(block) + "wrong depth";
      if (b.refs > 0 && p.refs == 0) return where(block) + "referenced while its parent is not";
    } else if (b.depth != 0) {
      return where(block) + "root with nonzero depth";
    }
  }
  if (registered != index_.size()) return "key index size differs from the cached blocks";
  return {};
}

}  // namespace arbiter
