#include "runtime/generate.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <stdexcept>

namespace arbiter {

LocalSequence::LocalSequence(KvBlockPools& pools, int ring_blocks) : pools_(pools) {
  try {
    for (int i = 0; i < ring_blocks; ++i) sliding_blocks_.push_back(pools_.sliding.allocate());
  } catch (...) {
    for (int32_t b : sliding_blocks_) pools_.sliding.release(b);
    throw;
  }
}

LocalSequence::~LocalSequence() {
  for (int32_t b : full_blocks_) pools_.full.release(b);
  for (int32_t b : sliding_blocks_) pools_.sliding.release(b);
}

void LocalSequence::append_to_step(StepLayout& layout, const int32_t* tokens, int count, bool want_logits,
                                   bool all_logits) {
  const int64_t needed = (cached_ + count + layout.block_size - 1) / layout.block_size;
  while (static_cast<int64_t>(full_blocks_.size()) < needed) full_blocks_.push_back(pools_.full.allocate());
  SequenceStep s;
  s.first_row = static_cast<int32_t>(layout.tokens.size());
  s.num_new = count;
  s.num_cached = cached_;
  s.full_blocks = full_blocks_;
  s.sliding_blocks = sliding_blocks_;
  layout.tokens.insert(layout.tokens.end(), tokens, tokens + count);
  if (all_logits) {
    for (int i = 0; i < count; ++i) layout.logit_rows.push_back(s.first_row + i);
  } else if (want_logits && count > 0) {
    layout.logit_rows.push_back(s.first_row + count - 1);
  }
  layout.sequences.push_back(std::move(s));
}

std::vector<float> compute_all_logits(Model& model, const std::vector<int32_t>& tokens) {
  const auto& opt = model.options();
  KvBlockPools pools(opt.kv);
  LocalSequence seq(pools, model.kv_cache().ring_blocks_per_sequence());
  const int chunk = std::min(opt.max_step_rows, opt.max_logit_rows);
  std::vector<float> all;
  for (size_t begin = 0; begin < tokens.size(); begin += static_cast<size_t>(chunk)) {
    const int count = static_cast<int>(std::min(tokens.size() - begin, static_cast<size_t>(chunk)));
    StepLayout layout;
    layout.block_size = opt.kv.block_size;
    seq.append_to_step(layout, tokens.data() + begin, count, true, true);
    std::vector<float> logits = model.forward(layout);
    seq.commit(count);
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

std::vector<std::vector<float>> compute_batch_logits(Model& model, const std::vector<std::vector<int32_t>>& sequences) {
  const auto& opt = model.options();
  KvBlockPools pools(opt.kv);
  std::vector<std::unique_ptr<LocalSequence>> live;
  StepLayout layout;
  layout.block_size = opt.kv.block_size;
  for (const auto& s : sequences) {
    live.push_back(std::make_unique<LocalSequence>(pools, model.kv_cache().ring_blocks_per_sequence()));
    live.back()->append_to_step(layout, s.data(), static_cast<int>(s.size()), true, true);
  }
  const std::vector<float> all = model.forward(layout);
  const size_t vocab = static_cast<size_t>(model.config().vocab_size);
  std::vector<std::vector<float>> out;
  size_t offset = 0;
  for (const auto& s : sequences) {
    const size_t n = s.size() * vocab;
    out.emplace_back(all.begin() + static_cast<std::ptrdiff_t>(offset), all.begin() + static_cast<std::ptrdiff_t>(offset + n));
    offset += n;
  }
  return out;
}

std::vector<int32_t> greedy_generate(Model& model, const std::vector<int32_t>& prompt, int max_new_tokens,
                                     const std::vector<int32_t>& stop_tokens, GenerateTimings* timings) {
  if (prompt.empty()) throw std::invalid_argument("generate: empty prompt");
  using Clock = std::chrono::steady_clock;
  GenerateTimings times;
  auto start = Clock::now();
  const auto& opt = model.options();
  KvBlockPools pools(opt.kv);
  LocalSequence seq(pools, model.kv_cache().ring_blocks_per_sequence());
  std::vector<int32_t> out;
  int32_t next = -1;
  for (size_t begin = 0; begin < prompt.size(); begin += static_cast<size_t>(opt.max_step_rows)) {
    const int count = static_cast<int>(std::min(prompt.size() - begin, static_cast<size_t>(opt.max_step_rows)));
    StepLayout layout;
    layout.block_size = opt.kv.block_size;
    const bool last = begin + static_cast<size_t>(count) == prompt.size();
    seq.append_to_step(layout, prompt.data() + begin, count, last);
    const auto ids = model.forward_argmax(layout);
    seq.commit(count);
    if (last) next = ids.at(0);
  }
  times.prefill_tokens = static_cast<int>(prompt.size());
  times.prefill_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  start = Clock::now();
  while (static_cast<int>(out.size()) < max_new_tokens) {
    out.push_back(next);
    if (std::find(stop_tokens.begin(), stop_tokens.end(), next) != stop_tokens.end()) break;
    if (static_cast<int>(out.size()) == max_new_tokens) break;
    StepLayout layout;
    layout.block_size = opt.kv.block_size;
    seq.append_to_step(layout, &next, 1, true);
    next = model.forward_argmax(layout).at(0);
    seq.commit(1);
    ++times.decode_steps;
  }
  times.decode_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (timings) *timings = times;
  return out;
}

}  // namespace arbiter
