// PrefixCache: one rank's KV block manager for the central scheduler. It hands out the
// rank's KV blocks 1..N-1 (block 0 is reserved: the placeholder for table entries nobody reads),
// counts references to them, and keeps fully computed blocks for reuse by later sequences that
// start with the same tokens (a policy's rendered prefix is computed once per rank).
//
// Cached blocks form chains: the key of a sequence's block b is hash(key of block b-1, the block's
// tokens), and each registered block remembers its tokens and its parent, so a lookup walks the
// chain from the first block and compares tokens at every link: a hash collision can never share
// wrong KV. Unreferenced cached blocks stay until space is needed, then the least recently released
// goes first (the deepest block first among blocks released together); evicting a block also drops
// the cached blocks that continue its chain. A referenced block always has a referenced parent
// (sequences hold whole chains), so eviction never touches a block in use.
#pragma once

#include <cstdint>
#include <set>
#include <span>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace arbiter {

// What the cache has done since it was created.
struct PrefixCacheCounters {
  uint64_t allocations = 0;    // fresh blocks handed out
  uint64_t registrations = 0;  // blocks that joined the cache
  uint64_t duplicates = 0;     // registrations answered with an existing block of the same content
  uint64_t collisions = 0;     // registrations refused: same key, different content
  uint64_t evictions = 0;      // cached blocks dropped to make room (descendants included)
};

class PrefixCache {
 public:
  static constexpr int32_t kNoBlock = -1;

  // `num_blocks` includes the reserved block 0, so num_blocks - 1 blocks are usable.
  PrefixCache(int num_blocks, int block_size);

  int block_size() const { return block_size_; }
  int usable_blocks() const { return num_blocks_ - 1; }
  int free_blocks() const { return static_cast<int>(free_.size()); }       // unused, not cached
  int cached_blocks() const { return static_cast<int>(evictable_.size()); } // cached, unreferenced
  int used_blocks() const { return usable_blocks() - free_blocks() - cached_blocks(); }  // referenced
  // Blocks allocate() can still hand out (free + evictable).
  int available_blocks() const { return free_blocks() + cached_blocks(); }

  // The longest chain of cached blocks holding tokens [0, n * block_size), n <= max_blocks. Takes no
  // references; acquire() every returned block to use it.
  std::vector<int32_t> match(std::span<const int32_t> tokens, int max_blocks) const;

  // A fresh block with one reference, evicting cached blocks when none is free; kNoBlock when every
  // block is referenced.
  int32_t allocate();
  // One more reference to an allocated or cached block.
  void acquire(int32_t block);
  // Drops one reference from each block (one sequence's table, released at once: the blocks share
  // one LRU time, so the deepest ones are evicted first). A block with no references left is kept
  // when registered, freed otherwise.
  void release(std::span<const int32_t> blocks);

  // Result of register_block: the block that now holds the content for the caller (its own block,
  // or an already cached one with the same content, whose reference the caller now holds instead)
  // and whether the chain can go on from it.
  struct Registration {
    int32_t block = kNoBlock;
    bool cached = false;
  };
  // Offers a fully computed, referenced block holding `tokens` (block_size of them) whose chain
  // parent is `parent` (kNoBlock for a sequence's first block; otherwise a registered block the
  // caller references). If the same content is already cached under another block, the caller's
  // reference moves to that block (its own block is released) and that block is returned.
  Registration register_block(int32_t block, int32_t parent, std::span<const int32_t> tokens);

  int ref_count(int32_t block) const { return blocks_[static_cast<size_t>(block)].refs; }
  bool is_cached(int32_t block) const { return blocks_[static_cast<size_t>(block)].registered; }
  const PrefixCacheCounters& counters() const { return counters_; }

  // Drops every cached, unreferenced block (e.g. to compare with a cold cache).
  void clear_unreferenced();
  // Checks every invariant (free list, evictable set, reference counts, chains, key index); returns
  // a description of the first violation, empty when consistent.
  std::string check() const;

 private:
  // One block's bookkeeping: references, and for a cached block its place in a chain.
  struct Block {
    int refs = 0;
    bool registered = false;
    uint64_t key = 0;
    int32_t parent = kNoBlock;
    int depth = 0;                  // blocks before this one in its chain
    uint64_t last_use = 0;          // release time (LRU)
    std::vector<int32_t> tokens;    // registered blocks: their content
    std::vector<int32_t> children;  // registered blocks whose parent this is
  };
  // Evictable blocks in eviction order: oldest release first, deepest first on ties.
  using EvictKey = std::tuple<uint64_t, int, int32_t>;  // (last_use, -depth, block)
  EvictKey evict_key(int32_t block) const;

  uint64_t chain_key(int32_t parent, std::span<const int32_t> tokens) const;
  bool same_content(const Block& b, int32_t parent, std::span<const int32_t> tokens) const;
  void evict_one();
  // Unregisters an unreferenced cached block and its cached descendants, into the free list;
  // returns how many blocks it freed.
  int drop_registration(int32_t block);

  int num_blocks_;
  int block_size_;
  std::vector<Block> blocks_;
  std::vector<int32_t> free_;  // a stack of free block ids
  std::set<EvictKey> evictable_;
  std::unordered_map<uint64_t, int32_t> index_;  // chain key -> registered block
  uint64_t clock_ = 0;
  PrefixCacheCounters counters_;
};

}  // namespace arbiter
