// Scheduler: planning and result handling driven directly with a fake model. Each fake rank keeps a
// KV "cache" of (token, position) per block slot, reads a sequence's context back through its block
// table and "samples" a deterministic function of it, so a wrong block table, a wrongly shared block
// or a lost position changes the output. Outputs are compared with a plain reference generation.
#include "scheduler/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <thread>

namespace arbiter {
namespace {

using Clock = std::chrono::steady_clock;

// What the fake model samples after a context.
struct FakeRules {
  int vocab = 40;       // ordinary tokens 0..vocab-1
  int stop_every = 0;   // > 0: <|return|> when the context hash is divisible by it
  int end_every = 0;    // > 0: <|end|> likewise (closes the analysis message)
};

uint64_t context_hash(const std::vector<int32_t>& tokens) {
  uint64_t h = 1469598103934665603ull;
  for (int32_t t : tokens) h = (h ^ static_cast<uint32_t>(t)) * 1099511628211ull;
  return h ^ (h >> 29);
}

int32_t fake_next(const std::vector<int32_t>& context, const FakeRules& rules) {
  const uint64_t h = context_hash(context);
  if (rules.stop_every > 0 && h % static_cast<uint64_t>(rules.stop_every) == 0) return kTokenReturn;
  if (rules.end_every > 0 && (h / 7) % static_cast<uint64_t>(rules.end_every) == 0) return kTokenEnd;
  return static_cast<int32_t>(h % static_cast<uint64_t>(rules.vocab));
}

// The generation the scheduler must reproduce, written straight from the rules in scheduler.h.
SequenceResult reference(const SequenceSpec& spec, const FakeRules& rules, int max_context) {
  SequenceResult r;
  std::vector<int32_t> tokens = spec.prompt;
  bool seen_end = false, closed = false;
  const auto room = [&] { return static_cast<int>(r.tokens.size()) < spec.max_new_tokens && static_cast<int>(tokens.size()) < max_context; };
  const auto force = [&] {
    if (closed || seen_end || spec.max_reasoning_tokens < 0 || spec.close_reasoning.empty()) return;
    if (static_cast<int>(r.tokens.size()) < spec.max_reasoning_tokens) return;
    closed = true;
    for (int32_t t : spec.close_reasoning) {
      if (!room()) break;
      tokens.push_back(t);
      r.tokens.push_back(GeneratedToken{t, 0, {}, true});
      if (t == kTokenEnd) seen_end = true;
    }
  };
  force();
  while (room()) {
    const int32_t t = fake_next(tokens, rules);
    tokens.push_back(t);
    r.tokens.push_back(GeneratedToken{t, -0.5f, {}, false});
    if (!seen_end) {
      if (t == kTokenEnd) seen_end = true;
      else ++r.reasoning_tokens;
    }
    if (std::count(spec.stop_tokens.begin(), spec.stop_tokens.end(), t)) {
      r.finish = FinishReason::kStop;
      return r;
    }
    force();
  }
  r.finish = FinishReason::kLength;
  return r;
}

std::vector<int32_t> token_ids(const std::vector<GeneratedToken>& tokens) {
  std::vector<int32_t> ids;
  for (const auto& t : tokens) ids.push_back(t.token);
  return ids;
}

// Every rank's fake engine. Checks each plan against the options and the KV it has seen written.
class FakeCluster {
 public:
  FakeCluster(const SchedulerOptions& options, FakeRules rules) : options_(options), rules_(rules), kv_(static_cast<size_t>(options.num_ranks)) {}

  std::vector<proto::StepResult> run(const std::vector<proto::StepPlan>& plans) {
    EXPECT_EQ(static_cast<int>(plans.size()), options_.num_ranks);
    std::vector<proto::StepResult> results(plans.size());
    for (size_t r = 0; r < plans.size(); ++r) {
      results[r].set_rank(static_cast<int32_t>(r));
      results[r].set_step(plans[r].step());
      if (fail_rank == static_cast<int>(r)) {
        results[r].set_error("injected failure");
        continue;
      }
      run_rank(static_cast<int>(r), plans[r], results[r]);
    }
    return results;
  }

  int fail_rank = -1;
  uint64_t input_tokens = 0;
  uint64_t max_step_tokens_seen = 0;

 private:
  // What one KV position holds in the fake cache: the token written there and its position.
  struct Slot {
    int32_t token = -1;
    int32_t position = -1;
  };

  void run_rank(int rank, const proto::StepPlan& plan, proto::StepResult& result) {
    auto& kv = kv_[static_cast<size_t>(rank)];
    const int bs = options_.block_size;
    int step_tokens = 0, samples = 0;
    std::map<int32_t, uint64_t> written;  // block -> sequence writing it this step
    std::map<int32_t, std::set<uint64_t>> readers;
    std::vector<std::vector<int32_t>> contexts;
    for (const auto& work : plan.sequences()) {
      const int n = work.tokens_size(), cached = work.num_cached();
      EXPECT_GE(n, 1);
      EXPECT_LE(n, options_.max_prefill_chunk);
      step_tokens += n;
      samples += work.sample() ? 1 : 0;
      EXPECT_GE(work.blocks_size() * bs, cached + n) << "block table too short";
      std::vector<int32_t> context;
      for (int p = 0; p < cached; ++p) {
        const int32_t block = work.blocks(p / bs);
        EXPECT_GT(block, 0) << "read through block 0";
        readers[block].insert(work.sequence_id());
        const Slot& slot = kv[block].at(static_cast<size_t>(p % bs));
        EXPECT_EQ(slot.position, p) << "sequence " << work.sequence_id() << " reads a position never written";
        context.push_back(slot.token);
      }
      for (int i = 0; i < n; ++i) {
        const int p = cached + i;
        const int32_t block = work.blocks(p / bs);
        EXPECT_GT(block, 0) << "write into block 0";
        const auto [it, fresh] = written.emplace(block, work.sequence_id());
        EXPECT_TRUE(fresh || it->second == work.sequence_id()) << "two sequences write block " << block;
        context.push_back(work.tokens(i));
      }
      contexts.push_back(std::move(context));
    }
    for (const auto& [block, writer] : written) {
      for (uint64_t reader : readers[block]) EXPECT_EQ(reader, writer) << "block " << block << " is read while written";
    }
    EXPECT_LE(step_tokens, options_.max_step_tokens);
    EXPECT_LE(samples, options_.max_step_samples);
    input_tokens += static_cast<uint64_t>(step_tokens);
    max_step_tokens_seen = std::max<uint64_t>(max_step_tokens_seen, static_cast<uint64_t>(step_tokens));
    // Write after reading everything (a step's writes are its own).
    for (int w = 0; w < plan.sequences_size(); ++w) {
      const auto& work = plan.sequences(w);
      for (int i = 0; i < work.tokens_size(); ++i) {
        const int p = work.num_cached() + i;
        auto& slots = kv[work.blocks(p / bs)];
        slots.resize(static_cast<size_t>(bs));
        slots[static_cast<size_t>(p % bs)] = Slot{work.tokens(i), p};
      }
      if (!work.sample()) continue;
      auto* sampled = result.add_samples();
      sampled->set_sequence_id(work.sequence_id());
      sampled->set_token(fake_next(contexts[static_cast<size_t>(w)], rules_));
      sampled->set_logprob(-0.5f);
      for (int k = 0; k < work.top_logprobs(); ++k) {
        auto* alt = sampled->add_top();
        alt->set_token(k);
        alt->set_logprob(-1.0f - static_cast<float>(k));
      }
    }
  }

  SchedulerOptions options_;
  FakeRules rules_;
  std::vector<std::map<int32_t, std::vector<Slot>>> kv_;
};

// Submitted requests and what came back.
struct Outcome {
  std::vector<SequenceResult> results;
  int done_calls = 0;
  std::vector<std::pair<int, int32_t>> streamed;  // (index, token)
  bool tokens_after_done = false;
  std::vector<std::pair<int, SequenceResult>> sequences_done;  // on_sequence_done, in call order
  bool sequence_done_after_done = false;
};

class Harness {
 public:
  explicit Harness(SchedulerOptions options, FakeRules rules = {})
      : options(options), rules(rules), scheduler(options), cluster(options, rules) {}

  SubmitStatus submit(const std::string& id, std::vector<SequenceSpec> sequences,
                      std::optional<Clock::time_point> deadline = std::nullopt) {
    RequestSpec request;
    request.id = id;
    request.sequences = std::move(sequences);
    request.deadline = deadline;
    Outcome* outcome = &storage.emplace_back();
    request.on_token = [outcome](int index, const GeneratedToken& t) {
      if (outcome->done_calls > 0) outcome->tokens_after_done = true;
      outcome->streamed.emplace_back(index, t.token);
    };
    request.on_sequence_done = [outcome](int index, const SequenceResult& result) {
      if (outcome->done_calls > 0) outcome->sequence_done_after_done = true;
      outcome->sequences_done.emplace_back(index, result);
    };
    request.on_done = [this, outcome, id](std::vector<SequenceResult> results) {
      ++outcome->done_calls;
      outcome->results = std::move(results);
      done_order.push_back(id);
    };
    std::string why;
    const SubmitStatus status = scheduler.submit(std::move(request), &why);
    if (status == SubmitStatus::kAccepted) outcomes[id] = outcome;
    return status;
  }

  // One step with invariant checks around it.
  void step() {
    const auto plans = scheduler.plan_step();
    ASSERT_EQ(scheduler.check_consistency(), "");
    for (const auto& plan : plans) {
      std::set<uint64_t> ids;
      for (const auto& w : plan.sequences()) EXPECT_TRUE(ids.insert(w.sequence_id()).second) << "sequence planned twice";
    }
    last_plans = plans;
    scheduler.complete_step(cluster.run(plans));
    ASSERT_EQ(scheduler.check_consistency(), "");
    ++steps;
  }

  void run(int max_steps = 100000) {
    for (int i = 0; i < max_steps && scheduler.has_work(); ++i) {
      step();
      if (::testing::Test::HasFatalFailure()) return;
    }
    EXPECT_FALSE(scheduler.has_work()) << "did not finish within " << max_steps << " steps";
  }

  // After everything finished: no block is referenced.
  void expect_all_blocks_released() {
    const auto st = scheduler.stats();
    for (const auto& rank : st.ranks) {
      EXPECT_EQ(rank.blocks_used, 0);
      EXPECT_LE(rank.blocks_cached, rank.blocks_total);
    }
    EXPECT_EQ(st.running_sequences, 0);
    EXPECT_EQ(st.waiting_sequences, 0);
  }

  SchedulerOptions options;
  FakeRules rules;
  Scheduler scheduler;
  FakeCluster cluster;
  const Outcome& outcome(const std::string& id) const { return *outcomes.at(id); }

  std::deque<Outcome> storage;  // stable addresses for the callbacks
  std::map<std::string, Outcome*> outcomes;  // accepted requests by id (the latest of an id)
  std::vector<std::string> done_order;
  std::vector<proto::StepPlan> last_plans;
  int steps = 0;
};

SequenceSpec make_spec(std::vector<int32_t> prompt, int max_new = 20) {
  SequenceSpec s;
  s.prompt = std::move(prompt);
  s.max_new_tokens = max_new;
  return s;
}

std::vector<int32_t> tokens_from(uint32_t seed, int count, int vocab = 40) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(count));
  for (auto& x : t) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
  return t;
}

std::vector<int32_t> concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

SchedulerOptions small_options() {
  SchedulerOptions o;
  o.num_ranks = 1;
  o.blocks_per_rank = 64;
  o.block_size = 4;
  o.max_step_tokens = 32;
  o.max_step_samples = 8;
  o.max_prefill_chunk = 16;
  o.max_context = 200;
  return o;
}

void expect_matches_reference(const SequenceResult& got, const SequenceSpec& spec, const FakeRules& rules, int max_context) {
  const SequenceResult want = reference(spec, rules, max_context);
  EXPECT_EQ(token_ids(got.tokens), token_ids(want.tokens));
  EXPECT_EQ(got.finish, want.finish) << to_string(got.finish) << " vs " << to_string(want.finish);
  EXPECT_EQ(got.reasoning_tokens, want.reasoning_tokens);
  ASSERT_EQ(got.tokens.size(), want.tokens.size());
  for (size_t i = 0; i < got.tokens.size(); ++i) EXPECT_EQ(got.tokens[i].forced, want.tokens[i].forced) << "token " << i;
}

TEST(Scheduler, FanOutSharesTheRequestAndReportsOnceInOrder) {
  FakeRules rules;
  rules.stop_every = 9;
  Harness h(small_options(), rules);
  std::vector<SequenceSpec> specs;
  for (int i = 0; i < 3; ++i) specs.push_back(make_spec(tokens_from(10 + static_cast<uint32_t>(i), 5 + 7 * i), 12 + i));
  ASSERT_EQ(h.submit("multi", specs), SubmitStatus::kAccepted);
  ASSERT_EQ(h.submit("single", {make_spec(tokens_from(99, 6), 3)}), SubmitStatus::kAccepted);
  EXPECT_EQ(h.submit("multi", {make_spec({1, 2})}), SubmitStatus::kInvalid);  // id in use
  h.run();
  const Outcome& multi = h.outcome("multi");
  EXPECT_EQ(multi.done_calls, 1);
  EXPECT_FALSE(multi.tokens_after_done);
  ASSERT_EQ(multi.results.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    SCOPED_TRACE(i);
    expect_matches_reference(multi.results[static_cast<size_t>(i)], specs[static_cast<size_t>(i)], rules, 200);
    EXPECT_EQ(multi.results[static_cast<size_t>(i)].prompt_tokens, static_cast<int>(specs[static_cast<size_t>(i)].prompt.size()));
    // What was streamed for sequence i is exactly its result.
    std::vector<int32_t> streamed;
    for (const auto& [index, token] : multi.streamed)
      if (index == i) streamed.push_back(token);
    EXPECT_EQ(streamed, token_ids(multi.results[static_cast<size_t>(i)].tokens));
  }
  // The short request finished first; the id is free again once done.
  ASSERT_EQ(h.done_order.size(), 2u);
  EXPECT_EQ(h.done_order[0], "single");
  EXPECT_EQ(h.submit("multi", {make_spec({1, 2}, 1)}), SubmitStatus::kAccepted);
  h.run();
  h.expect_all_blocks_released();
}

// Each sequence of a request is reported as it finishes (shorter ones first), with the result
// on_done gets later; a cancellation reports every unfinished sequence, once.
TEST(Scheduler, EachSequenceIsReportedWhenItFinishesBeforeTheRequest) {
  Harness h(small_options());
  std::vector<SequenceSpec> specs;
  for (int i = 0; i < 3; ++i) specs.push_back(make_spec(tokens_from(20 + static_cast<uint32_t>(i), 6), 30 - 10 * i));  // 30, 20, 10 tokens
  ASSERT_EQ(h.submit("fan", specs), SubmitStatus::kAccepted);
  int steps_at_first = -1;
  for (int i = 0; i < 1000 && h.scheduler.has_work(); ++i) {
    h.step();
    if (steps_at_first < 0 && !h.outcome("fan").sequences_done.empty()) {
      steps_at_first = h.steps;
      EXPECT_EQ(h.outcome("fan").done_calls, 0) << "the first sequence must be reported before the request";
    }
  }
  const Outcome& fan = h.outcome("fan");
  EXPECT_EQ(fan.done_calls, 1);
  EXPECT_FALSE(fan.sequence_done_after_done);
  ASSERT_EQ(fan.sequences_done.size(), 3u);
  EXPECT_EQ(fan.sequences_done[0].first, 2);  // the shortest first
  EXPECT_EQ(fan.sequences_done[1].first, 1);
  EXPECT_EQ(fan.sequences_done[2].first, 0);
  for (const auto& [index, result] : fan.sequences_done) {
    SCOPED_TRACE(index);
    EXPECT_EQ(result.finish, FinishReason::kLength);
    EXPECT_EQ(token_ids(result.tokens), token_ids(fan.results[static_cast<size_t>(index)].tokens));
    EXPECT_EQ(result.prompt_tokens, fan.results[static_cast<size_t>(index)].prompt_tokens);
  }

  ASSERT_EQ(h.submit("cut", {make_spec(tokens_from(5, 8), 100), make_spec(tokens_from(6, 8), 2)}), SubmitStatus::kAccepted);
  for (int i = 0; i < 6; ++i) h.step();
  ASSERT_EQ(h.outcome("cut").sequences_done.size(), 1u);  // the 2-token one is done
  h.scheduler.cancel("cut");
  h.run();
  const Outcome& cut = h.outcome("cut");
  ASSERT_EQ(cut.sequences_done.size(), 2u);
  EXPECT_EQ(cut.sequences_done[0].first, 1);
  EXPECT_EQ(cut.sequences_done[0].second.finish, FinishReason::kLength);
  EXPECT_EQ(cut.sequences_done[1].first, 0);
  EXPECT_EQ(cut.sequences_done[1].second.finish, FinishReason::kCancelled);
  EXPECT_EQ(cut.done_calls, 1);
  EXPECT_FALSE(cut.sequence_done_after_done);
  h.expect_all_blocks_released();
}

TEST(Scheduler, ChunkedPrefillStaysWithinTheStepBudgets) {
  SchedulerOptions o = small_options();
  o.max_step_tokens = 24;
  o.max_step_samples = 3;  // also the most sequences running at once
  o.max_prefill_chunk = 10;
  o.blocks_per_rank = 256;
  Harness h(o);
  std::vector<SequenceSpec> specs;
  for (int i = 0; i < 6; ++i) {
    specs.push_back(make_spec(tokens_from(200 + static_cast<uint32_t>(i), 37 + i), 9));
    ASSERT_EQ(h.submit("r" + std::to_string(i), {specs.back()}), SubmitStatus::kAccepted);
  }
  bool saw_mixed_step = false;
  while (h.scheduler.has_work()) {
    h.step();
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    int decodes = 0, prefills = 0;
    for (const auto& w : h.last_plans[0].sequences()) (w.tokens_size() == 1 && w.sample() ? decodes : prefills)++;
    if (decodes > 0 && prefills > 0) saw_mixed_step = true;
    // Decodes come first in the plan.
    bool prefill_seen = false;
    for (const auto& w : h.last_plans[0].sequences()) {
      if (w.tokens_size() > 1) {
        prefill_seen = true;
      } else if (w.sample()) {
        EXPECT_FALSE(prefill_seen) << "a decode after a prefill chunk";
      }
    }
  }
  EXPECT_TRUE(saw_mixed_step);  // continuous batching: decodes and prefill chunks share steps
  EXPECT_EQ(h.cluster.max_step_tokens_seen, 24u);
  for (int i = 0; i < 6; ++i) expect_matches_reference(h.outcome("r" + std::to_string(i)).results[0], specs[static_cast<size_t>(i)], h.rules, 200);
  h.expect_all_blocks_released();
  const auto st = h.scheduler.stats();
  EXPECT_EQ(st.finished[static_cast<int>(FinishReason::kLength)], 6u);
  EXPECT_EQ(st.decode_tokens, 6u * 9u);
}

TEST(Scheduler, SecondRequestReusesThePolicyPrefix) {
  const std::vector<int32_t> policy = tokens_from(7, 41);  // 10 whole blocks + 1
  const auto first = make_spec(concat(policy, tokens_from(8, 9)), 6);
  const auto second = make_spec(concat(policy, tokens_from(9, 5)), 6);
  std::map<bool, std::vector<std::vector<int32_t>>> outputs;
  for (bool caching : {true, false}) {
    SchedulerOptions o = small_options();
    o.prefix_caching = caching;
    Harness h(o);
    ASSERT_EQ(h.submit("a", {first}), SubmitStatus::kAccepted);
    h.run();
    const uint64_t prefill_first = h.scheduler.stats().prefill_tokens;
    ASSERT_EQ(h.submit("b", {second}), SubmitStatus::kAccepted);
    h.run();
    const auto st = h.scheduler.stats();
    const uint64_t prefill_second = st.prefill_tokens - prefill_first;
    const auto& b = h.outcome("b").results[0];
    if (caching) {
      EXPECT_EQ(b.cached_tokens, 40);
      EXPECT_EQ(prefill_second, second.prompt.size() - 40);
      EXPECT_EQ(st.prefix_hits, 1u);
      EXPECT_EQ(st.cached_tokens, 40u);
      EXPECT_GT(st.ranks[0].blocks_cached, 0);
    } else {
      EXPECT_EQ(b.cached_tokens, 0);
      EXPECT_EQ(prefill_second, second.prompt.size());
      EXPECT_EQ(st.ranks[0].blocks_cached, 0);
    }
    EXPECT_EQ(h.outcome("a").results[0].cached_tokens, 0);
    for (const char* id : {"a", "b"}) outputs[caching].push_back(token_ids(h.outcome(id).results[0].tokens));
    expect_matches_reference(b, second, h.rules, 200);
    h.expect_all_blocks_released();
  }
  EXPECT_EQ(outputs[true], outputs[false]);
}

TEST(Scheduler, ABurstUnderANewPolicyComputesItOnce) {
  const std::vector<int32_t> policy = tokens_from(77, 40);
  std::map<bool, std::vector<std::vector<int32_t>>> outputs;
  for (bool caching : {true, false}) {
    SchedulerOptions o = small_options();
    o.prefix_caching = caching;
    o.max_step_tokens = 16;
    Harness h(o);
    std::vector<SequenceSpec> specs;
    for (uint32_t i = 0; i < 6; ++i) {
      specs.push_back(make_spec(concat(policy, tokens_from(900 + i, 5)), 4));
      ASSERT_EQ(h.submit("b" + std::to_string(i), {specs.back()}), SubmitStatus::kAccepted);
    }
    h.run();
    for (uint32_t i = 0; i < 6; ++i) {
      const auto& r = h.outcome("b" + std::to_string(i)).results[0];
      expect_matches_reference(r, specs[i], h.rules, 200);
      outputs[caching].push_back(token_ids(r.tokens));
      if (caching) {
        EXPECT_EQ(r.cached_tokens, i == 0 ? 0 : 40) << i;
      }
    }
    EXPECT_EQ(h.scheduler.stats().prefill_tokens, caching ? 40u + 6u * 5u : 6u * 45u);
  }
  EXPECT_EQ(outputs[true], outputs[false]);
}

TEST(Scheduler, FullyCachedPromptStillComputesItsLastToken) {
  Harness h(small_options());
  const auto spec = make_spec(tokens_from(3, 16), 4);  // exactly 4 blocks
  ASSERT_EQ(h.submit("a", {spec}), SubmitStatus::kAccepted);
  h.run();
  ASSERT_EQ(h.submit("b", {spec}), SubmitStatus::kAccepted);
  h.step();
  ASSERT_EQ(h.last_plans[0].sequences_size(), 1);
  const auto& w = h.last_plans[0].sequences(0);
  EXPECT_EQ(w.num_cached(), 12);  // capped at floor((16 - 1) / 4) blocks
  EXPECT_EQ(w.tokens_size(), 4);
  h.run();
  EXPECT_EQ(h.outcome("b").results[0].cached_tokens, 12);
  EXPECT_EQ(token_ids(h.outcome("b").results[0].tokens), token_ids(h.outcome("a").results[0].tokens));
}

TEST(Scheduler, LeastRecentlyUsedPrefixesAreEvictedUnderPressure) {
  SchedulerOptions o = small_options();
  o.blocks_per_rank = 21;  // 20 usable: room for about two cached 32-token prompts
  Harness h(o);
  std::vector<std::vector<int32_t>> prompts;
  for (uint32_t i = 0; i < 4; ++i) prompts.push_back(tokens_from(300 + i, 32));
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_EQ(h.submit("p" + std::to_string(i), {make_spec(prompts[i], 3)}), SubmitStatus::kAccepted);
    h.run();
  }
  EXPECT_GT(h.scheduler.stats().ranks[0].evictions, 0u);
  // The most recent prompt is still cached, the oldest was evicted.
  ASSERT_EQ(h.submit("again-new", {make_spec(concat(prompts[3], {1}), 2)}), SubmitStatus::kAccepted);
  h.run();
  EXPECT_EQ(h.outcome("again-new").results[0].cached_tokens, 32);
  ASSERT_EQ(h.submit("again-old", {make_spec(concat(prompts[0], {1}), 2)}), SubmitStatus::kAccepted);
  h.run();
  EXPECT_EQ(h.outcome("again-old").results[0].cached_tokens, 0);
  h.expect_all_blocks_released();
}

TEST(Scheduler, PreemptionUnderBlockPressureKeepsOutputsUnchanged) {
  FakeRules rules;
  rules.stop_every = 97;
  std::vector<SequenceSpec> specs;
  for (uint32_t i = 0; i < 8; ++i) specs.push_back(make_spec(tokens_from(400 + i, 10 + static_cast<int>(i) * 3), 30));
  std::map<int, std::vector<std::vector<int32_t>>> outputs;
  for (int blocks : {400, 24}) {
    SchedulerOptions o = small_options();
    o.blocks_per_rank = blocks;
    o.max_context = 80;
    Harness h(o, rules);
    for (size_t i = 0; i < specs.size(); ++i) ASSERT_EQ(h.submit("s" + std::to_string(i), {specs[i]}), SubmitStatus::kAccepted);
    h.run();
    int preempted = 0;
    for (size_t i = 0; i < specs.size(); ++i) {
      const auto& r = h.outcome("s" + std::to_string(i)).results[0];
      expect_matches_reference(r, specs[i], rules, 80);
      outputs[blocks].push_back(token_ids(r.tokens));
      preempted += r.preemptions;
    }
    const auto st = h.scheduler.stats();
    if (blocks == 24) {
      EXPECT_GT(st.preemptions, 0u);
      EXPECT_EQ(static_cast<uint64_t>(preempted), st.preemptions);
    } else {
      EXPECT_EQ(st.preemptions, 0u);
    }
    h.expect_all_blocks_released();
  }
  EXPECT_EQ(outputs[400], outputs[24]);
}

TEST(Scheduler, CancellationFinishesTheWholeRequest) {
  Harness h(small_options());
  ASSERT_EQ(h.submit("c", {make_spec(tokens_from(1, 20), 100), make_spec(tokens_from(2, 8), 100)}), SubmitStatus::kAccepted);
  ASSERT_EQ(h.submit("keep", {make_spec(tokens_from(3, 8), 10)}), SubmitStatus::kAccepted);
  for (int i = 0; i < 4; ++i) h.step();
  h.scheduler.cancel("c");
  h.scheduler.cancel("unknown");  // no-op
  EXPECT_EQ(h.outcome("c").done_calls, 0);  // takes effect at the next plan or completion
  h.step();
  const Outcome& c = h.outcome("c");
  EXPECT_EQ(c.done_calls, 1);
  ASSERT_EQ(c.results.size(), 2u);
  for (const auto& r : c.results) EXPECT_EQ(r.finish, FinishReason::kCancelled);
  EXPECT_FALSE(c.results[1].tokens.empty());  // partial output is kept
  h.scheduler.cancel("c");  // already done: no second on_done
  h.run();
  EXPECT_EQ(h.outcome("c").done_calls, 1);
  expect_matches_reference(h.outcome("keep").results[0], make_spec(tokens_from(3, 8), 10), h.rules, 200);
  EXPECT_EQ(h.scheduler.stats().finished[static_cast<int>(FinishReason::kCancelled)], 2u);
  h.expect_all_blocks_released();
}

// Background work (job items) waits behind foreground work, yet one placement in every
// background_every goes to it while it waits; its outputs are unchanged.
TEST(Scheduler, BackgroundWorkGoesAfterForegroundWorkButIsNeverStarved) {
  SchedulerOptions o = small_options();
  o.max_step_samples = 1;  // one sequence placed at a time: the placement order is the finishing order
  o.background_every = 4;
  Harness h(o);
  auto submit = [&](const std::string& id, uint32_t seed, bool background) {
    RequestSpec r;
    r.id = id;
    r.background = background;
    r.sequences = {make_spec(tokens_from(seed, 6), 3)};
    r.on_done = [&h, id](std::vector<SequenceResult> results) {
      EXPECT_EQ(results.at(0).finish, FinishReason::kLength);
      h.done_order.push_back(id);
    };
    std::string why;
    ASSERT_EQ(h.scheduler.submit(std::move(r), &why), SubmitStatus::kAccepted) << why;
  };
  for (int i = 0; i < 3; ++i) submit("b" + std::to_string(i), 100 + static_cast<uint32_t>(i), true);
  for (int i = 0; i < 10; ++i) submit("f" + std::to_string(i), 200 + static_cast<uint32_t>(i), false);
  h.run();
  EXPECT_EQ(h.done_order, (std::vector<std::string>{"f0", "f1", "f2", "b0", "f3", "f4", "f5", "b1", "f6", "f7", "f8", "b2", "f9"}));
  h.expect_all_blocks_released();

  // Alone, background work runs as any other.
  Harness alone(o);
  h.done_order.clear();
  for (int i = 0; i < 3; ++i) {
    RequestSpec r;
    r.id = "b" + std::to_string(i);
    r.background = true;
    r.sequences = {make_spec(tokens_from(100 + static_cast<uint32_t>(i), 6), 3)};
    r.on_done = [&alone, i](std::vector<SequenceResult> results) {
      expect_matches_reference(results.at(0), make_spec(tokens_from(100 + static_cast<uint32_t>(i), 6), 3), alone.rules, 200);
      alone.done_order.push_back("b" + std::to_string(i));
    };
    ASSERT_EQ(alone.scheduler.submit(std::move(r)), SubmitStatus::kAccepted);
  }
  alone.run();
  EXPECT_EQ(alone.done_order, (std::vector<std::string>{"b0", "b1", "b2"}));
}

TEST(Scheduler, DeadlinesEndRequests) {
  Harness h(small_options());
  ASSERT_EQ(h.submit("past", {make_spec(tokens_from(1, 8), 50)}, Clock::now() - std::chrono::milliseconds(1)), SubmitStatus::kAccepted);
  ASSERT_EQ(h.submit("soon", {make_spec(tokens_from(2, 8), 100000)}, Clock::now() + std::chrono::milliseconds(30)), SubmitStatus::kAccepted);
  h.step();
  EXPECT_EQ(h.outcome("past").done_calls, 1);
  EXPECT_EQ(h.outcome("past").results[0].finish, FinishReason::kDeadline);
  EXPECT_TRUE(h.outcome("past").results[0].tokens.empty());
  const auto start = Clock::now();
  while (h.scheduler.has_work() && Clock::now() - start < std::chrono::seconds(10)) {
    h.step();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const auto& soon = h.outcome("soon").results;
  ASSERT_EQ(soon.size(), 1u);
  EXPECT_EQ(soon[0].finish, FinishReason::kDeadline);
  EXPECT_FALSE(soon[0].tokens.empty());
  h.expect_all_blocks_released();
}

TEST(Scheduler, StopTokensEndTheSequenceAndAreIncluded) {
  FakeRules rules;
  rules.stop_every = 5;
  Harness h(small_options(), rules);
  std::vector<SequenceSpec> specs;
  for (uint32_t i = 0; i < 6; ++i) {
    specs.push_back(make_spec(tokens_from(500 + i, 9), 200));
    ASSERT_EQ(h.submit("s" + std::to_string(i), {specs.back()}), SubmitStatus::kAccepted);
  }
  // A custom stop set: ordinary token 3 stops, <|return|> does not.
  SequenceSpec custom = make_spec(tokens_from(600, 9), 200);
  custom.stop_tokens = {3};
  ASSERT_EQ(h.submit("custom", {custom}), SubmitStatus::kAccepted);
  h.run();
  for (uint32_t i = 0; i < 6; ++i) {
    const auto& r = h.outcome("s" + std::to_string(i)).results[0];
    ASSERT_FALSE(r.tokens.empty());
    EXPECT_EQ(r.finish, FinishReason::kStop);
    EXPECT_EQ(r.tokens.back().token, kTokenReturn);
    expect_matches_reference(r, specs[i], rules, 200);
  }
  const auto& c = h.outcome("custom").results[0];
  EXPECT_EQ(c.tokens.back().token, 3);
  expect_matches_reference(c, custom, rules, 200);
}

TEST(Scheduler, MaxTokensAndContextLimitEndWithLength) {
  SchedulerOptions o = small_options();
  o.max_context = 30;
  Harness h(o);
  ASSERT_EQ(h.submit("max", {make_spec(tokens_from(1, 10), 5)}), SubmitStatus::kAccepted);
  ASSERT_EQ(h.submit("ctx", {make_spec(tokens_from(2, 10), 1000)}), SubmitStatus::kAccepted);
  ASSERT_EQ(h.submit("one", {make_spec(tokens_from(3, 29), 1000)}), SubmitStatus::kAccepted);  // room for one token
  h.run();
  EXPECT_EQ(h.outcome("max").results[0].tokens.size(), 5u);
  EXPECT_EQ(h.outcome("max").results[0].finish, FinishReason::kLength);
  EXPECT_EQ(h.outcome("ctx").results[0].tokens.size(), 20u);
  EXPECT_EQ(h.outcome("ctx").results[0].finish, FinishReason::kLength);
  EXPECT_EQ(h.outcome("one").results[0].tokens.size(), 1u);
  h.expect_all_blocks_released();
}

TEST(Scheduler, ReasoningBudgetForcesTheClosingTokensThenTheModelContinues) {
  FakeRules rules;  // never emits <|end|> on its own
  Harness h(small_options(), rules);
  SequenceSpec spec = make_spec(tokens_from(9, 11), 12);
  spec.max_reasoning_tokens = 4;
  spec.close_reasoning = {kTokenEnd, 200006, 101, 200005, 102, 200008};
  SequenceSpec zero = spec;
  zero.max_reasoning_tokens = 0;
  SequenceSpec none = spec;
  none.max_reasoning_tokens = -1;
  ASSERT_EQ(h.submit("budget", {spec, zero, none}), SubmitStatus::kAccepted);
  h.run();
  const auto& results = h.outcome("budget").results;
  ASSERT_EQ(results.size(), 3u);
  const auto& r = results[0];
  ASSERT_EQ(r.tokens.size(), 12u);
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(r.tokens[static_cast<size_t>(i)].forced);
  for (int i = 4; i < 10; ++i) {
    EXPECT_TRUE(r.tokens[static_cast<size_t>(i)].forced);
    EXPECT_EQ(r.tokens[static_cast<size_t>(i)].token, spec.close_reasoning[static_cast<size_t>(i - 4)]);
    EXPECT_EQ(r.tokens[static_cast<size_t>(i)].logprob, 0.0f);
  }
  EXPECT_FALSE(r.tokens[10].forced);  // the model answers after the forced header
  EXPECT_EQ(r.reasoning_tokens, 4);
  expect_matches_reference(r, spec, rules, 200);
  EXPECT_TRUE(results[1].tokens[0].forced);
  EXPECT_EQ(results[1].reasoning_tokens, 0);
  expect_matches_reference(results[1], zero, rules, 200);
  for (const auto& t : results[2].tokens) EXPECT_FALSE(t.forced);
  EXPECT_EQ(results[2].reasoning_tokens, 12);
}

TEST(Scheduler, AnEndBeforeTheBudgetMeansNoForcing) {
  FakeRules rules;
  rules.end_every = 12;
  Harness h(small_options(), rules);
  std::vector<SequenceSpec> specs;
  for (uint32_t i = 0; i < 8; ++i) {
    SequenceSpec s = make_spec(tokens_from(700 + i, 7), 16);
    s.max_reasoning_tokens = 6;
    s.close_reasoning = {kTokenEnd, 123};
    specs.push_back(s);
  }
  ASSERT_EQ(h.submit("r", specs), SubmitStatus::kAccepted);
  h.run();
  int forced_any = 0, natural_end = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const auto& r = h.outcome("r").results[i];
    expect_matches_reference(r, specs[i], rules, 200);
    forced_any += std::any_of(r.tokens.begin(), r.tokens.end(), [](const GeneratedToken& t) { return t.forced; });
    natural_end += std::any_of(r.tokens.begin(), r.tokens.end(), [](const GeneratedToken& t) { return !t.forced && t.token == kTokenEnd; });
  }
  EXPECT_GT(natural_end, 0);  // the test exercises both paths
  EXPECT_GT(forced_any, 0);
}

TEST(Scheduler, RoutingPrefersTheCachingRankButBalancesLoad) {
  SchedulerOptions o = small_options();
  o.num_ranks = 2;
  o.blocks_per_rank = 200;
  o.max_step_samples = 16;
  const std::vector<int32_t> policy = tokens_from(42, 64);
  Harness h(o);
  h.scheduler.warm(policy, 1);
  h.run();
  auto st = h.scheduler.stats();
  EXPECT_EQ(st.ranks[1].blocks_cached, 16);
  EXPECT_EQ(st.ranks[0].blocks_cached, 0);
  ASSERT_EQ(h.submit("first", {make_spec(concat(policy, {1, 2, 3}), 4)}), SubmitStatus::kAccepted);
  h.run();
  EXPECT_EQ(h.outcome("first").results[0].rank, 1);
  EXPECT_EQ(h.outcome("first").results[0].cached_tokens, 64);
  // A burst: the caching rank takes requests until its load outweighs the prefix it saves; then rank
  // 0 computes the policy once and shares it with the requests after.
  const uint64_t prefill_before = h.scheduler.stats().prefill_tokens;
  for (int i = 0; i < 12; ++i)
    ASSERT_EQ(h.submit("b" + std::to_string(i), {make_spec(concat(policy, tokens_from(50 + static_cast<uint32_t>(i), 3)), 40)}),
              SubmitStatus::kAccepted);
  h.run();
  std::map<int, int> per_rank;
  int cached_on_0 = 0;
  for (int i = 0; i < 12; ++i) {
    const auto& r = h.outcome("b" + std::to_string(i)).results[0];
    ++per_rank[r.rank];
    if (r.rank == 0 && r.cached_tokens == 64) ++cached_on_0;
  }
  EXPECT_GT(per_rank[1], 0);
  EXPECT_GT(per_rank[0], 1);
  EXPECT_EQ(cached_on_0, per_rank[0] - 1);
  EXPECT_EQ(h.outcome("b0").results[0].rank, 1);
  EXPECT_EQ(h.outcome("b0").results[0].cached_tokens, 64);
  EXPECT_EQ(h.scheduler.stats().prefill_tokens - prefill_before, 64u + 12u * 3u);  // the policy once, on rank 0
  // Unknown rank for warm-up.
  EXPECT_THROW(h.scheduler.warm(policy, 5), std::invalid_argument);
  h.expect_all_blocks_released();
}

TEST(Scheduler, WarmUpOnEveryRankIsSilentAndCachesWholeBlocks) {
  SchedulerOptions o = small_options();
  o.num_ranks = 3;
  Harness h(o);
  h.scheduler.warm(tokens_from(5, 18));  // 4 whole blocks; the rest is dropped
  h.run();
  const auto st = h.scheduler.stats();
  for (const auto& rank : st.ranks) EXPECT_EQ(rank.blocks_cached, 4);
  EXPECT_EQ(st.decode_tokens, 0u);
  for (uint64_t f : st.finished) EXPECT_EQ(f, 0u);
  EXPECT_EQ(st.prefill_tokens, 3u * 16u);
  h.scheduler.warm(tokens_from(5, 16));  // already cached: nothing to compute
  h.run();
  EXPECT_EQ(h.scheduler.stats().prefill_tokens, 3u * 16u);
  // Off: a no-op.
  SchedulerOptions off = o;
  off.prefix_caching = false;
  Scheduler cold(off);
  cold.warm(tokens_from(5, 18));
  EXPECT_FALSE(cold.has_work());
}

TEST(Scheduler, RejectsWhatCannotBeServed) {
  SchedulerOptions o = small_options();
  o.max_queued_requests = 2;
  o.max_context = 50;
  Harness h(o);
  EXPECT_EQ(h.submit("long", {make_spec(tokens_from(1, 50))}), SubmitStatus::kTooLong);
  EXPECT_EQ(h.submit("fits", {make_spec(tokens_from(1, 49), 1)}), SubmitStatus::kAccepted);
  EXPECT_EQ(h.submit("empty", {make_spec({})}), SubmitStatus::kInvalid);
  EXPECT_EQ(h.submit("none", {}), SubmitStatus::kInvalid);
  EXPECT_EQ(h.submit("q2", {make_spec(tokens_from(2, 4))}), SubmitStatus::kAccepted);
  EXPECT_EQ(h.submit("q3", {make_spec(tokens_from(3, 4))}), SubmitStatus::kQueueFull);
  EXPECT_EQ(h.scheduler.stats().queued_requests, 2);
  h.step();  // both are placed: the queue has room again
  EXPECT_EQ(h.scheduler.stats().queued_requests, 0);
  EXPECT_EQ(h.submit("q3", {make_spec(tokens_from(3, 4))}), SubmitStatus::kAccepted);
  // The rank's blocks bound the context too.
  SchedulerOptions tiny = small_options();
  tiny.blocks_per_rank = 5;  // 4 blocks of 4 tokens
  Scheduler small(tiny);
  RequestSpec r;
  r.id = "x";
  r.sequences = {make_spec(tokens_from(1, 16))};
  EXPECT_EQ(small.submit(r), SubmitStatus::kTooLong);
  r.sequences = {make_spec(tokens_from(1, 15))};
  EXPECT_EQ(small.submit(r), SubmitStatus::kAccepted);
  h.scheduler.stop_accepting();
  EXPECT_EQ(h.submit("late", {make_spec(tokens_from(3, 4))}), SubmitStatus::kShuttingDown);
  h.run();
}

TEST(Scheduler, AFailedRankFailsOnlyItsSequences) {
  SchedulerOptions o = small_options();
  o.num_ranks = 2;
  Harness h(o);
  h.scheduler.warm(tokens_from(1, 8), 1);  // rank 1 holds this prefix: the request goes there
  h.run();
  ASSERT_EQ(h.submit("on1", {make_spec(concat(tokens_from(1, 8), {5}), 10)}), SubmitStatus::kAccepted);
  h.step();
  ASSERT_EQ(h.last_plans[1].sequences_size(), 1);
  h.cluster.fail_rank = 1;
  ASSERT_EQ(h.submit("other", {make_spec(tokens_from(2, 8), 3)}), SubmitStatus::kAccepted);
  h.run();
  const auto& failed = h.outcome("on1").results[0];
  EXPECT_EQ(failed.finish, FinishReason::kError);
  EXPECT_NE(failed.error.find("injected failure"), std::string::npos);
  EXPECT_EQ(h.outcome("other").results[0].rank, 0);
  EXPECT_EQ(h.outcome("other").results[0].finish, FinishReason::kLength);
  h.expect_all_blocks_released();
}

TEST(Scheduler, CallbacksMaySubmitAndCancelReentrantly) {
  Scheduler scheduler(small_options());
  FakeCluster cluster(small_options(), FakeRules{});
  int finished = 0;
  std::function<void(int)> chain = [&](int n) {
    RequestSpec r;
    r.id = "chain" + std::to_string(n);
    r.sequences = {make_spec(tokens_from(static_cast<uint32_t>(n), 6), 3)};
    r.on_token = [&scheduler, n](int, const GeneratedToken&) { scheduler.cancel("chain" + std::to_string(n + 100)); };
    r.on_done = [&, n](std::vector<SequenceResult>) {
      ++finished;
      if (n < 5) chain(n + 1);
    };
    EXPECT_EQ(scheduler.submit(std::move(r)), SubmitStatus::kAccepted);
  };
  chain(0);
  for (int i = 0; i < 1000 && scheduler.has_work(); ++i) scheduler.complete_step(cluster.run(scheduler.plan_step()));
  EXPECT_EQ(finished, 6);
}

TEST(Scheduler, AThrowingCallbackDoesNotDisturbOtherRequests) {
  Harness h(small_options());
  RequestSpec bad;
  bad.id = "throws";
  bad.sequences = {make_spec(tokens_from(1, 6), 3)};
  bad.on_token = [](int, const GeneratedToken&) { throw std::runtime_error("client bug"); };
  bad.on_done = [](std::vector<SequenceResult>) { throw std::runtime_error("client bug"); };
  ASSERT_EQ(h.scheduler.submit(std::move(bad)), SubmitStatus::kAccepted);
  const auto spec = make_spec(tokens_from(2, 6), 5);
  ASSERT_EQ(h.submit("fine", {spec}), SubmitStatus::kAccepted);
  h.run();
  expect_matches_reference(h.outcome("fine").results[0], spec, h.rules, 200);
  EXPECT_EQ(h.scheduler.stats().finished[static_cast<int>(FinishReason::kLength)], 2u);
}

TEST(Scheduler, FailAllEndsEverythingOnce) {
  Harness h(small_options());
  ASSERT_EQ(h.submit("a", {make_spec(tokens_from(1, 30), 100), make_spec(tokens_from(2, 3), 100)}), SubmitStatus::kAccepted);
  h.scheduler.warm(tokens_from(3, 8));
  const auto plans = h.scheduler.plan_step();
  h.scheduler.fail_all("rank 1 died");
  h.scheduler.complete_step(h.cluster.run(plans));  // the step was abandoned: ignored
  EXPECT_EQ(h.outcome("a").done_calls, 1);
  for (const auto& r : h.outcome("a").results) {
    EXPECT_EQ(r.finish, FinishReason::kError);
    EXPECT_EQ(r.error, "rank 1 died");
  }
  EXPECT_FALSE(h.scheduler.has_work());
  EXPECT_EQ(h.scheduler.check_consistency(), "");
  h.expect_all_blocks_released();
}

TEST(Scheduler, TopLogprobsAndSamplingTravelWithThePlan) {
  Harness h(small_options());
  SequenceSpec s = make_spec(tokens_from(1, 5), 2);
  s.top_logprobs = 3;
  s.sampling.set_temperature(0.7f);
  s.sampling.set_seed(11);
  ASSERT_EQ(h.submit("t", {s}), SubmitStatus::kAccepted);
  h.step();
  ASSERT_EQ(h.last_plans[0].sequences_size(), 1);
  const auto& w = h.last_plans[0].sequences(0);
  EXPECT_TRUE(w.sample());
  EXPECT_EQ(w.top_logprobs(), 3);
  EXPECT_FLOAT_EQ(w.sampling().temperature(), 0.7f);
  EXPECT_EQ(w.sampling().seed(), 11u);
  h.run();
  const auto& r = h.outcome("t").results[0];
  ASSERT_EQ(r.tokens.size(), 2u);
  EXPECT_EQ(r.tokens[0].top.size(), 3u);
  EXPECT_FLOAT_EQ(r.tokens[0].logprob, -0.5f);
  SequenceSpec bad = s;
  bad.top_logprobs = 21;
  EXPECT_EQ(h.submit("bad", {bad}), SubmitStatus::kInvalid);
}

// Random submits, cancellations, warm-ups and deadlines on two ranks with few blocks; invariants are
// checked around every step, and every request that ran to its end matches the reference.
TEST(Scheduler, RandomizedStress) {
  FakeRules rules;
  rules.stop_every = 23;
  rules.end_every = 5;
  SchedulerOptions o = small_options();
  o.num_ranks = 2;
  o.blocks_per_rank = 40;
  o.max_context = 100;
  o.max_step_tokens = 20;
  o.max_step_samples = 4;
  o.max_prefill_chunk = 9;
  o.max_queued_requests = 12;
  Harness h(o, rules);
  // ARBITER_STRESS_SEED=n runs another random schedule.
  const char* seed = std::getenv("ARBITER_STRESS_SEED");
  std::mt19937 rng(seed ? static_cast<uint32_t>(std::stoul(seed)) : 1234u);
  const std::vector<std::vector<int32_t>> policies = {tokens_from(1, 21), tokens_from(2, 30), tokens_from(3, 12)};
  std::map<std::string, std::vector<SequenceSpec>> submitted;
  int next = 0;
  for (int step = 0; step < 1500; ++step) {
    const uint32_t roll = rng() % 100;
    if (roll < 25) {
      std::vector<SequenceSpec> specs;
      const int fan = 1 + static_cast<int>(rng() % 3);
      for (int i = 0; i < fan; ++i) {
        const auto& policy = policies[rng() % policies.size()];
        SequenceSpec s = make_spec(concat(policy, tokens_from(rng(), 1 + static_cast<int>(rng() % 15))), 1 + static_cast<int>(rng() % 40));
        if (rng() % 2) {
          s.max_reasoning_tokens = static_cast<int>(rng() % 8);
          s.close_reasoning = {kTokenEnd, 200006, 200005, 7, 200008};
        }
        specs.push_back(std::move(s));
      }
      std::optional<Clock::time_point> deadline;
      if (rng() % 10 == 0) deadline = Clock::now() + std::chrono::milliseconds(rng() % 20);
      const std::string id = "r" + std::to_string(next++);
      const SubmitStatus status = h.submit(id, specs, deadline);
      EXPECT_TRUE(status == SubmitStatus::kAccepted || status == SubmitStatus::kQueueFull) << to_string(status);
      if (status == SubmitStatus::kAccepted) submitted[id] = specs;
    } else if (roll < 30 && next > 0) {
      h.scheduler.cancel("r" + std::to_string(rng() % static_cast<uint32_t>(next)));
    } else if (roll < 32) {
      h.scheduler.warm(policies[rng() % policies.size()], static_cast<int>(rng() % 3) - 1);
    }
    if (h.scheduler.has_work()) h.step();
    ASSERT_FALSE(::testing::Test::HasFatalFailure()) << "step " << step;
  }
  h.run();
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  int checked = 0;
  for (const auto& [id, specs] : submitted) {
    const Outcome& out = h.outcome(id);
    ASSERT_EQ(out.done_calls, 1) << id;
    EXPECT_FALSE(out.tokens_after_done);
    ASSERT_EQ(out.results.size(), specs.size());
    for (size_t i = 0; i < specs.size(); ++i) {
      const auto& r = out.results[i];
      const SequenceResult want = reference(specs[i], rules, o.max_context);
      if (r.finish == FinishReason::kStop || r.finish == FinishReason::kLength) {
        expect_matches_reference(r, specs[i], rules, o.max_context);
        ++checked;
      } else {
        // Cut short: what it produced is a prefix of the full output.
        ASSERT_LE(r.tokens.size(), want.tokens.size());
        std::vector<int32_t> prefix = token_ids(want.tokens);
        prefix.resize(r.tokens.size());
        EXPECT_EQ(token_ids(r.tokens), prefix);
      }
    }
  }
  EXPECT_GT(checked, 50);
  const auto st = h.scheduler.stats();
  EXPECT_GT(st.preemptions, 0u);
  EXPECT_GT(st.prefix_hits, 0u);
  EXPECT_GT(st.finished[static_cast<int>(FinishReason::kCancelled)], 0u);
  h.expect_all_blocks_released();
}

}  // namespace
}  // namespace arbiter
