// Single-process drivers over a Model: LocalSequence owns one sequence's KV blocks (taken from
// BlockAllocators, returned on destruction), and the helpers run whole prompts through the model
// in chunked prefill steps and greedy decode steps. The scheduler replaces these for serving.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/kv_cache.h"
#include "runtime/model.h"

namespace arbiter {

// Block allocators for the two KV pools of one Model.
struct KvBlockPools {
  explicit KvBlockPools(const KvCacheOptions& options)
      : full(options.full_blocks), sliding(options.sliding_blocks) {}
  BlockAllocator full;
  BlockAllocator sliding;
};

class LocalSequence {
 public:
  LocalSequence(KvBlockPools& pools, int ring_blocks);
  ~LocalSequence();
  LocalSequence(const LocalSequence&) = delete;
  LocalSequence& operator=(const LocalSequence&) = delete;

  // Adds this sequence's next `count` tokens to a step (growing its block table as needed) at
  // rows starting at layout.tokens.size(). If want_logits, requests logits for the last of them
  // (all_logits: for every one of them).
  void append_to_step(StepLayout& layout, const int32_t* tokens, int count, bool want_logits, bool all_logits = false);
  // Marks the tokens of the last step as cached (call after the step ran).
  void commit(int count) { cached_ += count; }
  int cached() const { return cached_; }

 private:
  KvBlockPools& pools_;
  int cached_ = 0;
  std::vector<int32_t> full_blocks_;
  std::vector<int32_t> sliding_blocks_;
};

// Logits at every position of `tokens` ([tokens, vocab] row-major), via chunked prefill.
std::vector<float> compute_all_logits(Model& model, const std::vector<int32_t>& tokens);
// Logits at every position of several sequences run together in one prefill step: one
// [len_i, vocab] block per sequence, in input order. All of them must fit one step.
std::vector<std::vector<float>> compute_batch_logits(Model& model, const std::vector<std::vector<int32_t>>& sequences);
// Where a greedy continuation spent its time: the prefill (which also yields the first new token)
// and the decode steps after it, one per further token.
struct GenerateTimings {
  int prefill_tokens = 0;
  double prefill_seconds = 0;
  int decode_steps = 0;
  double decode_seconds = 0;
};

// Greedy continuation of `prompt`: prefill, then one decode step per new token through the cache.
// With `timings`, also records how long each part took.
std::vector<int32_t> greedy_generate(Model& model, const std::vector<int32_t>& prompt, int max_new_tokens,
                                     const std::vector<int32_t>& stop_tokens = {}, GenerateTimings* timings = nullptr);

}  // namespace arbiter
