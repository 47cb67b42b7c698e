#include "scheduler/scheduler.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <span>
#include <stdexcept>
#include <unordered_map>

#include "scheduler/prefix_cache.h"

namespace arbiter {

const char* to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kDeadline: return "deadline";
    case FinishReason::kError: return "error";
  }
  return "unknown";
}

const char* to_string(SubmitStatus status) {
  switch (status) {
    case SubmitStatus::kAccepted: return "accepted";
    case SubmitStatus::kQueueFull: return "queue_full";
    case SubmitStatus::kTooLong: return "too_long";
    case SubmitStatus::kInvalid: return "invalid";
    case SubmitStatus::kShuttingDown: return "shutting_down";
  }
  return "unknown";
}

namespace {

using Clock = std::chrono::steady_clock;
// Callbacks collected under the lock and run after it is released.
using Events = std::vector<std::function<void()>>;

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Runs the callbacks collected during a plan or completion, after the lock is released. A callback
// that throws is the caller's bug; it must not end the step (and every other request with it).
void run_events(Events& events) {
  for (auto& event : events) {
    try {
      event();
    } catch (...) {
    }
  }
}

// A request while it is live: its callbacks, deadline, and the results of its finished sequences.
struct RequestState {
  std::string id;
  std::optional<Clock::time_point> deadline;
  bool background = false;
  std::function<void(int, const GeneratedToken&)> on_token;
  std::function<void(int, const SequenceResult&)> on_sequence_done;
  std::function<void(std::vector<SequenceResult>)> on_done;
  std::vector<SequenceResult> results;
  std::vector<uint64_t> sequence_ids;
  int unfinished = 0;
  mutable uint64_t counted = 0;  // queued_requests(): the last count that included this request
};

// One generation while it is live: its tokens so far, where it runs and what of it is computed there.
struct Sequence {
  uint64_t id = 0;
  std::shared_ptr<RequestState> request;  // null for a warm-up sequence
  int index = 0;                          // in the request
  SequenceSpec spec;
  bool warm = false;                      // computes its tokens into the cache, samples nothing
  int pinned_rank = -1;                   // warm-up sequences run on a given rank
  std::vector<int32_t> tokens;            // prompt + generated (forced included): every input so far
  int prompt_len = 0;
  SequenceResult result;
  bool seen_end = false;                  // an <|end|> was generated (the analysis message closed)
  bool reasoning_closed = false;          // the reasoning budget forced the closing tokens
  // The constrained final answer (spec.final_grammar): follows every generated token and gives the
  // allowed ids of the next one once the final content begins.
  std::optional<FinalAnswerTracker> final_answer;
  bool ever_placed = false;
  bool finished = false;

  // Placement on a rank (rank -1: waiting).
  int rank = -1;
  uint64_t placed_order = 0;              // larger: placed more recently
  int num_computed = 0;                   // positions in the rank's KV cache
  std::vector<int32_t> blocks;            // block table on the rank (all layers)
  int cached_chain = 0;                   // leading blocks registered in the rank's prefix cache
  bool chain_broken = false;              // a registration was refused: register no further blocks
  // Blocks [computing_begin, computing_end) of the table are announced to the rank as being
  // computed (State::computing), so a sequence with the same prefix can wait for them to be cached.
  std::vector<uint64_t> block_keys;       // content keys of the announced blocks (index = block)
  int computing_begin = 0;
  int computing_end = 0;

  // This step's work.
  int planned_tokens = 0;
  bool planned_sample = false;
  bool planned_decode = false;
  uint64_t preempted_at_step = std::numeric_limits<uint64_t>::max();

  int pending() const { return static_cast<int>(tokens.size()) - num_computed; }
  int generated() const { return static_cast<int>(result.tokens.size()); }
  bool background() const { return request && request->background; }
};

}  // namespace

// Everything the scheduler knows, guarded by `mutex`: live requests and sequences, the queue, each
// rank's prefix cache and placements, the step in flight, and the counters.
struct Scheduler::State {
  SchedulerOptions options;
  int max_context = 0;  // options.max_context, capped by what one rank's blocks hold
  mutable std::mutex mutex;
  std::condition_variable work_cv;
  bool accepting = true;
  bool step_in_flight = false;
  std::vector<PrefixCache> caches;
  std::map<uint64_t, std::unique_ptr<Sequence>> live;  // every unfinished sequence
  std::deque<Sequence*> waiting;                       // not placed on a rank, in admission order
  std::unordered_map<std::string, std::shared_ptr<RequestState>> requests;
  std::vector<std::weak_ptr<RequestState>> cancellations;  // cancel() calls since the last plan/completion
  std::multimap<Clock::time_point, std::weak_ptr<RequestState>> deadlines;
  std::vector<uint64_t> finished_ids;                      // finished, not yet swept
  uint64_t count_generation = 0;
  std::vector<std::vector<Sequence*>> placed;          // per rank: its sequences, in placement order
  // Per rank: content keys of whole blocks that placed sequences are computing and will cache (a
  // hint for routing only; KV is only ever shared through the PrefixCache, which compares tokens).
  std::vector<std::unordered_map<uint64_t, int>> computing;
  std::vector<std::vector<Sequence*>> planned;         // per rank: the step in flight
  int queued = 0;                                      // queued_requests(), kept between steps
  int placements_without_background = 0;               // foreground placements while background work waited
  uint64_t next_sequence_id = 1;
  uint64_t next_placement = 1;
  SchedulerStats stats;

  explicit State(const SchedulerOptions& o) : options(o) {
    if (o.num_ranks < 1 || o.blocks_per_rank < 2 || o.block_size < 1 || o.max_step_tokens < 1 ||
        o.max_step_samples < 1 || o.max_prefill_chunk < 1 || o.max_context < 2 || o.max_queued_requests < 1 || o.background_every < 1)
      throw std::invalid_argument("SchedulerOptions: sizes and limits must be positive (blocks_per_rank >= 2)");
    max_context = std::min(o.max_context, (o.blocks_per_rank - 1) * o.block_size);
    for (int r = 0; r < o.num_ranks; ++r) caches.emplace_back(o.blocks_per_rank, o.block_size);
    placed.resize(static_cast<size_t>(o.num_ranks));
    computing.resize(static_cast<size_t>(o.num_ranks));
    planned.resize(static_cast<size_t>(o.num_ranks));
  }

  int bs() const { return options.block_size; }

  // Content keys of the first `count` whole blocks of `tokens` (key of block b covers blocks 0..b).
  std::vector<uint64_t> content_keys(const std::vector<int32_t>& tokens, int count) const {
    std::vector<uint64_t> keys;
    keys.reserve(static_cast<size_t>(count));
    uint64_t h = 0xcbf29ce484222325ull;
    for (int b = 0; b < count; ++b) {
      for (int i = b * bs(); i < (b + 1) * bs(); ++i) {
        h ^= static_cast<uint32_t>(tokens[static_cast<size_t>(i)]);
        h *= 0x100000001b3ull;
        h ^= h >> 32;
      }
      keys.push_back(h);
    }
    return keys;
  }

  // Announces the whole blocks the sequence is about to compute (from its cached prefix on).
  void announce_computing(Sequence& s) {
    if (!options.prefix_caching) return;
    const int whole = static_cast<int>(s.tokens.size()) / bs();
    s.computing_begin = s.cached_chain;
    s.computing_end = std::max(s.computing_begin, whole);
    if (s.computing_begin == s.computing_end) return;
    s.block_keys = content_keys(s.tokens, s.computing_end);
    auto& rank = computing[static_cast<size_t>(s.rank)];
    for (int b = s.computing_begin; b < s.computing_end; ++b) ++rank[s.block_keys[static_cast<size_t>(b)]];
  }

  // Withdraws announced blocks [computing_begin, up_to).
  void withdraw_computing(Sequence& s, int up_to) {
    if (s.rank < 0) return;
    auto& rank = computing[static_cast<size_t>(s.rank)];
    for (; s.computing_begin < std::min(up_to, s.computing_end); ++s.computing_begin) {
      const auto it = rank.find(s.block_keys[static_cast<size_t>(s.computing_begin)]);
      if (it != rank.end() && --it->second == 0) rank.erase(it);
    }
  }

  // --- finishing ---

  void unplace(Sequence& s) {
    if (s.rank < 0) return;
    withdraw_computing(s, s.computing_end);
    std::erase(placed[static_cast<size_t>(s.rank)], &s);
  }

  void release_blocks(Sequence& s) {
    if (s.rank >= 0 && !s.blocks.empty()) caches[static_cast<size_t>(s.rank)].release(s.blocks);
    s.blocks.clear();
    s.cached_chain = 0;
    s.chain_broken = false;
    s.num_computed = 0;
  }

  void finish(Sequence& s, FinishReason reason, const std::string& error, Events& events) {
    if (s.finished) return;
    s.finished = true;
    finished_ids.push_back(s.id);
    unplace(s);
    release_blocks(s);
    if (s.warm) return;
    ++stats.finished[static_cast<int>(reason)];
    s.result.finish = reason;
    s.result.error = error;
    s.result.prompt_tokens = s.prompt_len;
    RequestState& request = *s.request;
    request.results[static_cast<size_t>(s.index)] = std::move(s.result);
    // The event reads the stored result: it runs before on_done's (queued after it) moves them,
    // and nothing writes a finished sequence's result again.
    if (request.on_sequence_done)
      events.push_back([r = s.request, index = s.index] { r->on_sequence_done(index, r->results[static_cast<size_t>(index)]); });
    if (--request.unfinished == 0) {
      requests.erase(request.id);
      events.push_back([r = s.request] {
        if (r->on_done) r->on_done(std::move(r->results));
      });
    }
  }

  void finish_request(RequestState& request, FinishReason reason, const std::string& error, Events& events) {
    const std::vector<uint64_t> ids = request.sequence_ids;  // finishing the last one erases the request
    for (uint64_t id : ids) {
      const auto it = live.find(id);
      if (it != live.end()) finish(*it->second, reason, error, events);
    }
  }

  // Cancellations and deadlines: the whole request ends.
  void apply_cancellations(Events& events) {
    std::vector<std::weak_ptr<RequestState>> cancelled;
    cancelled.swap(cancellations);
    for (const auto& weak : cancelled)
      if (const auto request = weak.lock(); request && request->unfinished > 0)
        finish_request(*request, FinishReason::kCancelled, "cancelled", events);
    const auto now = Clock::now();
    while (!deadlines.empty() && deadlines.begin()->first <= now) {
      const auto request = deadlines.begin()->second.lock();
      deadlines.erase(deadlines.begin());
      if (request && request->unfinished > 0) finish_request(*request, FinishReason::kDeadline, "deadline passed", events);
    }
  }

  // Drops finished sequences from the containers.
  void sweep() {
    if (!finished_ids.empty()) {
      std::erase_if(waiting, [](const Sequence* s) { return s->finished; });
      for (uint64_t id : finished_ids) live.erase(id);
      finished_ids.clear();
    }
    queued = queued_requests();
  }

  // --- tokens ---

  void push_token(Sequence& s, GeneratedToken token, Events& events) {
    s.tokens.push_back(token.token);
    if (s.final_answer) s.final_answer->push(token.token);
    s.result.tokens.push_back(token);
    if (s.request && s.request->on_token)
      events.push_back([r = s.request, index = s.index, token = std::move(token)] { r->on_token(index, token); });
  }

  bool out_of_room(const Sequence& s) const {
    return s.generated() >= s.spec.max_new_tokens || static_cast<int>(s.tokens.size()) >= max_context;
  }

  // The reasoning budget: once max_reasoning_tokens were generated without an <|end|>, the closing
  // tokens become the next inputs.
  void maybe_force(Sequence& s, Events& events) {
    if (s.warm || s.reasoning_closed || s.seen_end || s.spec.max_reasoning_tokens < 0 || s.spec.close_reasoning.empty())
      return;
    if (s.generated() < s.spec.max_reasoning_tokens) return;
    s.reasoning_closed = true;
    for (int32_t t : s.spec.close_reasoning) {
      if (out_of_room(s)) break;
      GeneratedToken forced;
      forced.token = t;
      forced.forced = true;
      push_token(s, std::move(forced), events);
      if (t == kTokenEnd) s.seen_end = true;
    }
    if (out_of_room(s)) finish(s, FinishReason::kLength, "", events);
  }

  void on_sampled(Sequence& s, const proto::SampledToken& sampled, Events& events) {
    GeneratedToken token;
    token.token = sampled.token();
    token.logprob = sampled.logprob();
    token.top.assign(sampled.top().begin(), sampled.top().end());
    token.candidates.assign(sampled.candidates().begin(), sampled.candidates().end());
    push_token(s, std::move(token), events);
    ++stats.decode_tokens;
    const int32_t t = sampled.token();
    if (!s.seen_end) {
      if (t == kTokenEnd) {
        s.seen_end = true;
      } else {
        ++s.result.reasoning_tokens;
      }
    }
    const auto& stops = s.spec.stop_tokens;
    if (std::find(stops.begin(), stops.end(), t) != stops.end()) {
      finish(s, FinishReason::kStop, "", events);
    } else if (out_of_room(s)) {
      finish(s, FinishReason::kLength, "", events);
    } else {
      maybe_force(s, events);
    }
  }

  // Registers the sequence's newly completed blocks in its rank's prefix cache.
  void register_full_blocks(Sequence& s) {
    if (!options.prefix_caching || s.chain_broken || s.rank < 0) return;
    PrefixCache& cache = caches[static_cast<size_t>(s.rank)];
    const int full = s.num_computed / bs();
    while (s.cached_chain < full) {
      const int i = s.cached_chain;
      const int32_t parent = i == 0 ? PrefixCache::kNoBlock : s.blocks[static_cast<size_t>(i - 1)];
      const auto content = std::span<const int32_t>(s.tokens).subspan(static_cast<size_t>(i * bs()), static_cast<size_t>(bs()));
      const auto reg = cache.register_block(s.blocks[static_cast<size_t>(i)], parent, content);
      if (!reg.cached) {
        s.chain_broken = true;
        withdraw_computing(s, s.computing_end);  // nothing more of it will be cached
        return;
      }
      s.blocks[static_cast<size_t>(i)] = reg.block;
      ++s.cached_chain;
    }
    withdraw_computing(s, s.cached_chain);
  }

  // --- planning ---

  // Grows the block table to cover `positions` positions; false when the rank ran out of blocks
  // (the blocks it did get stay in the table).
  bool ensure_capacity(Sequence& s, int positions) {
    PrefixCache& cache = caches[static_cast<size_t>(s.rank)];
    const size_t needed = static_cast<size_t>(ceil_div(positions, bs()));
    while (s.blocks.size() < needed) {
      const int32_t block = cache.allocate();
      if (block == PrefixCache::kNoBlock) return false;
      s.blocks.push_back(block);
    }
    return true;
  }

  // The sequence to preempt on `rank`: the most recently placed one not in this step's plan,
  // background work first.
  Sequence* pick_victim(int rank) const {
    const auto& seqs = placed[static_cast<size_t>(rank)];
    for (const bool background : {true, false})
      for (auto it = seqs.rbegin(); it != seqs.rend(); ++it)
        if ((*it)->planned_tokens == 0 && (!background || (*it)->background())) return *it;
    return nullptr;
  }

  // Releases the sequence's blocks and puts it back at the front of the queue; it recomputes its
  // tokens (prompt + generated) when placed again, mostly from the prefix cache.
  void preempt(Sequence& s) {
    unplace(s);
    release_blocks(s);
    s.rank = -1;
    ++s.result.preemptions;
    ++stats.preemptions;
    s.preempted_at_step = stats.steps;
    waiting.push_front(&s);
  }

  void plan(Sequence& s, int tokens, bool sample, bool decode) {
    s.planned_tokens = tokens;
    s.planned_sample = sample;
    s.planned_decode = decode;
    planned[static_cast<size_t>(s.rank)].push_back(&s);
  }

  // Per-rank budgets of the step being planned.
  struct Budget {
    int tokens = 0;
    int samples = 0;
  };

  // A prefill chunk (prompt, forced tokens, or a recompute) for `s`, within the budget and the blocks
  // the rank can give; preempts when it cannot get even one position.
  void plan_prefill(Sequence& s, Budget& budget) {
    const int pending = s.pending();
    int chunk = std::min({pending, options.max_prefill_chunk, budget.tokens});
    if (chunk <= 0) return;
    if (!s.warm && chunk == pending && budget.samples == 0) chunk = pending - 1;  // sample next step
    if (chunk <= 0) return;
    const int rank = s.rank;
    for (;;) {
      ensure_capacity(s, s.num_computed + chunk);
      const int room = static_cast<int>(s.blocks.size()) * bs() - s.num_computed;
      if (room >= 1) {
        chunk = std::min(chunk, room);
        break;
      }
      Sequence* victim = pick_victim(rank);
      preempt(*victim);
      if (victim == &s) return;
    }
    const bool sample = !s.warm && chunk == pending;
    plan(s, chunk, sample, false);
    budget.tokens -= chunk;
    if (sample) --budget.samples;
  }

  // Running sequences of one rank: every decode first, then prefill chunks first come first served.
  void plan_running(int rank, Budget& budget) {
    const std::vector<Sequence*> seqs = placed[static_cast<size_t>(rank)];  // a copy: preemption edits it
    for (Sequence* s : seqs) {
      if (budget.tokens == 0 || budget.samples == 0) break;
      if (s->rank != rank || s->warm || s->pending() != 1) continue;
      bool has_room = true;
      while (!ensure_capacity(*s, s->num_computed + 1)) {
        Sequence* victim = pick_victim(rank);
        preempt(*victim);
        if (victim == s) {
          has_room = false;
          break;
        }
      }
      if (!has_room) continue;
      plan(*s, 1, true, true);
      --budget.tokens;
      --budget.samples;
    }
    for (Sequence* s : seqs) {
      if (budget.tokens == 0) break;
      if (s->rank != rank || s->planned_tokens > 0 || (!s->warm && s->pending() == 1)) continue;
      plan_prefill(*s, budget);
    }
  }

  // Where a waiting sequence would go: the rank with the least estimated work (its own uncached
  // tokens there plus the rank's backlog), among those that can hold all its tokens now.
  struct Placement {
    int rank = -1;
    std::vector<int32_t> matched;
    bool wait = false;  // a rank is computing more of this prefix: waiting for it is cheaper
  };

  Placement choose_rank(const Sequence& s, const std::vector<int64_t>& backlog, const std::vector<int>& running,
                        const std::vector<Budget>& budgets) const {
    const int len = static_cast<int>(s.tokens.size());
    // A sequence that samples must compute at least its last token itself (it never writes a shared block).
    const int max_match = s.warm ? len / bs() : (len - 1) / bs();
    Placement best;
    int64_t best_cost = std::numeric_limits<int64_t>::max();
    int64_t best_soon_cost = std::numeric_limits<int64_t>::max();  // counting blocks being computed
    std::vector<uint64_t> keys;  // computed when some rank is computing blocks
    for (int r = 0; r < options.num_ranks; ++r) {
      if (s.pinned_rank >= 0 && r != s.pinned_rank) continue;
      const size_t ri = static_cast<size_t>(r);
      if (running[ri] >= options.max_step_samples) continue;
      // A rank whose step is full and that has two steps of prompt work queued takes no more for now
      // (the sequence stays in the queue, where a later step may route it better).
      if (running[ri] > 0 && budgets[ri].tokens == 0 && backlog[ri] >= 2LL * options.max_step_tokens) continue;
      const PrefixCache& cache = caches[ri];
      std::vector<int32_t> matched;
      if (options.prefix_caching) matched = cache.match(s.tokens, max_match);
      int held_elsewhere = 0;  // matched blocks nobody references count as available until acquired
      for (int32_t b : matched) held_elsewhere += cache.ref_count(b) == 0 ? 1 : 0;
      const int needed = ceil_div(len, bs()) - static_cast<int>(matched.size());
      if (needed > cache.available_blocks() - held_elsewhere) continue;
      const int64_t load = backlog[ri] + static_cast<int64_t>(options.route_load_tokens) * running[ri];
      const int64_t cost = load + len - static_cast<int64_t>(matched.size()) * bs();
      // Blocks after the cached ones that a sequence on this rank is computing right now.
      int soon = static_cast<int>(matched.size());
      if (!computing[ri].empty()) {
        if (keys.empty()) keys = content_keys(s.tokens, max_match);
        while (soon < max_match && computing[ri].count(keys[static_cast<size_t>(soon)])) ++soon;
      }
      best_soon_cost = std::min(best_soon_cost, load + len - static_cast<int64_t>(soon) * bs());
      if (cost < best_cost || (cost == best_cost && matched.size() > best.matched.size())) {
        best_cost = cost;
        best.rank = r;
        best.matched = std::move(matched);
      }
    }
    // Waiting pays when a rank will soon hold at least a block more of the prefix than the best
    // placement now gains over it (e.g. a burst of requests under a policy nobody has cached yet:
    // the first computes the policy once, the others reuse it).
    if (best.rank >= 0 && best_soon_cost + bs() <= best_cost) {
      best.rank = -1;
      best.matched.clear();
      best.wait = true;
    }
    return best;
  }

  void place(Sequence& s, Placement placement) {
    PrefixCache& cache = caches[static_cast<size_t>(placement.rank)];
    for (int32_t b : placement.matched) cache.acquire(b);
    const int matched_tokens = static_cast<int>(placement.matched.size()) * bs();
    s.rank = placement.rank;
    s.placed_order = next_placement++;
    placed[static_cast<size_t>(s.rank)].push_back(&s);
    s.blocks = std::move(placement.matched);
    s.cached_chain = static_cast<int>(s.blocks.size());
    s.chain_broken = false;
    s.num_computed = matched_tokens;
    if (!ensure_capacity(s, static_cast<int>(s.tokens.size())))
      throw std::logic_error("Scheduler: a placed sequence could not get its blocks");
    announce_computing(s);
    s.result.rank = s.rank;
    if (!s.ever_placed) {
      s.ever_placed = true;
      s.result.cached_tokens = std::min(matched_tokens, s.prompt_len);
    }
    if (!s.warm) {
      ++stats.prefix_lookups;
      if (matched_tokens > 0) ++stats.prefix_hits;
      stats.cached_tokens += static_cast<uint64_t>(matched_tokens);
    }
  }

  // The waiting sequences in the order they are offered a rank: foreground first, then background,
  // each first come first served; but when background work has waited through background_every - 1
  // placements, its oldest sequence goes first.
  std::vector<Sequence*> admission_order() const {
    std::vector<Sequence*> queue;
    queue.reserve(waiting.size());
    for (Sequence* s : waiting)
      if (!s->background()) queue.push_back(s);
    const size_t foreground = queue.size();
    for (Sequence* s : waiting)
      if (s->background()) queue.push_back(s);
    if (foreground < queue.size() && placements_without_background + 1 >= options.background_every)
      std::rotate(queue.begin(), queue.begin() + static_cast<std::ptrdiff_t>(foreground),
                  queue.begin() + static_cast<std::ptrdiff_t>(foreground) + 1);
    return queue;
  }

  // Places waiting sequences (in admission_order()) and plans their first chunk where the rank has
  // budget left.
  void admit_waiting(std::vector<Budget>& budgets, Events& events) {
    std::vector<int64_t> backlog(static_cast<size_t>(options.num_ranks), 0);
    std::vector<int> running(static_cast<size_t>(options.num_ranks), 0);
    for (int r = 0; r < options.num_ranks; ++r) {
      for (const Sequence* s : placed[static_cast<size_t>(r)]) backlog[static_cast<size_t>(r)] += s->pending() - s->planned_tokens;
      running[static_cast<size_t>(r)] = static_cast<int>(placed[static_cast<size_t>(r)].size());
    }
    const std::vector<Sequence*> queue = admission_order();
    bool blocked = false;  // a request sequence could not be placed: later ones wait their turn
    for (Sequence* s : queue) {
      if (s->finished || s->preempted_at_step == stats.steps) continue;
      if (blocked && !s->warm) continue;
      if (!s->ever_placed) {
        maybe_force(*s, events);  // a zero reasoning budget closes the analysis before anything runs
        if (s->finished) continue;
      }
      Placement placement = choose_rank(*s, backlog, running, budgets);
      if (placement.wait) continue;  // the prefix it needs is being computed: place it once cached
      if (placement.rank < 0) {
        if (!s->warm) blocked = true;
        continue;
      }
      if (s->warm && static_cast<int>(placement.matched.size()) * bs() >= static_cast<int>(s->tokens.size())) {
        finish(*s, FinishReason::kStop, "", events);  // already cached
        continue;
      }
      const int rank = placement.rank;
      place(*s, std::move(placement));
      std::erase(waiting, s);
      if (s->background()) placements_without_background = 0;
      else if (std::any_of(waiting.begin(), waiting.end(), [](const Sequence* w) { return w->background(); }))
        ++placements_without_background;
      backlog[static_cast<size_t>(rank)] += s->pending();
      ++running[static_cast<size_t>(rank)];
      Budget& budget = budgets[static_cast<size_t>(rank)];
      if (budget.tokens > 0) {
        plan_prefill(*s, budget);
        backlog[static_cast<size_t>(rank)] -= s->planned_tokens;
      }
    }
  }

  std::vector<proto::StepPlan> build_plans() {
    std::vector<proto::StepPlan> plans(static_cast<size_t>(options.num_ranks));
    int step_tokens = 0;
    for (int r = 0; r < options.num_ranks; ++r) {
      proto::StepPlan& plan = plans[static_cast<size_t>(r)];
      plan.set_step(stats.steps);
      for (const Sequence* s : planned[static_cast<size_t>(r)]) {
        proto::SequenceWork* work = plan.add_sequences();
        work->set_sequence_id(s->id);
        const auto first = s->tokens.begin() + s->num_computed;
        work->mutable_tokens()->Add(first, first + s->planned_tokens);
        work->set_num_cached(s->num_computed);
        const int table = ceil_div(s->num_computed + s->planned_tokens, bs());
        work->mutable_blocks()->Add(s->blocks.begin(), s->blocks.begin() + table);
        work->set_sample(s->planned_sample);
        if (s->planned_sample) {
          *work->mutable_sampling() = s->spec.sampling;
          work->set_top_logprobs(s->spec.top_logprobs);
          if (s->final_answer && s->final_answer->active()) {
            // The answer must end within the tokens this sequence may still generate.
            const int left = std::min(s->spec.max_new_tokens - s->generated(), max_context - static_cast<int>(s->tokens.size()));
            const AnswerMask mask = s->final_answer->mask(left);
            work->mutable_allowed_tokens()->Add(mask.allowed.begin(), mask.allowed.end());
            work->mutable_refused_tokens()->Add(mask.refused.begin(), mask.refused.end());
          }
          work->mutable_candidate_tokens()->Add(s->spec.candidate_tokens.begin(), s->spec.candidate_tokens.end());
          work->set_candidates_only(s->spec.candidates_only);
        }
        step_tokens += s->planned_tokens;
      }
    }
    stats.last_step_tokens = step_tokens;
    return plans;
  }

  // Applies one rank's result to the sequences it ran.
  void apply_result(int rank, const proto::StepResult* result, Events& events) {
    std::string error = result ? result->error() : "no result";
    if (error.empty() && result->step() != stats.steps - 1)
      error = "result of step " + std::to_string(result->step()) + " for step " + std::to_string(stats.steps - 1);
    std::unordered_map<uint64_t, const proto::SampledToken*> samples;
    if (result && error.empty())
      for (const auto& sampled : result->samples()) samples[sampled.sequence_id()] = &sampled;
    for (Sequence* s : planned[static_cast<size_t>(rank)]) {
      const int tokens = s->planned_tokens;
      const bool sample = s->planned_sample;
      const bool decode = s->planned_decode;
      s->planned_tokens = 0;
      s->planned_sample = s->planned_decode = false;
      if (s->finished) continue;
      if (!error.empty()) {
        finish(*s, FinishReason::kError, "rank " + std::to_string(rank) + ": " + error, events);
        continue;
      }
      s->num_computed += tokens;
      if (!decode) stats.prefill_tokens += static_cast<uint64_t>(tokens);
      register_full_blocks(*s);
      if (s->warm) {
        if (s->pending() == 0) finish(*s, FinishReason::kStop, "", events);
        continue;
      }
      if (!sample) continue;
      const auto it = samples.find(s->id);
      if (it == samples.end()) {
        finish(*s, FinishReason::kError, "rank " + std::to_string(rank) + " returned no token for the sequence", events);
        continue;
      }
      on_sampled(*s, *it->second, events);
    }
    planned[static_cast<size_t>(rank)].clear();
  }

  int queued_requests() {
    const uint64_t generation = ++count_generation;
    int count = 0;
    for (const Sequence* s : waiting) {
      if (s->finished || !s->request || s->request->counted == generation) continue;
      s->request->counted = generation;
      ++count;
    }
    return count;
  }
};

Scheduler::Scheduler(const SchedulerOptions& options) : state_(std::make_unique<State>(options)) {}
Scheduler::~Scheduler() = default;

SubmitStatus Scheduler::submit(RequestSpec request, std::string* why) {
  const auto fail = [why](SubmitStatus status, const std::string& message) {
    if (why) *why = message;
    return status;
  };
  State& st = *state_;
  std::lock_guard lock(st.mutex);
  if (!st.accepting) return fail(SubmitStatus::kShuttingDown, "the server is shutting down");
  if (request.sequences.empty()) return fail(SubmitStatus::kInvalid, "the request has no sequences");
  if (st.requests.count(request.id)) return fail(SubmitStatus::kInvalid, "request id '" + request.id + "' is in use");
  for (size_t i = 0; i < request.sequences.size(); ++i) {
    const SequenceSpec& spec = request.sequences[i];
    const std::string which = "sequence " + std::to_string(i) + ": ";
    if (spec.prompt.empty()) return fail(SubmitStatus::kInvalid, which + "empty prompt");
    if (spec.max_new_tokens < 1) return fail(SubmitStatus::kInvalid, which + "max_new_tokens must be at least 1");
    if (spec.top_logprobs < 0 || spec.top_logprobs > 20) return fail(SubmitStatus::kInvalid, which + "top_logprobs must be 0..20");
    if (spec.candidate_tokens.size() > static_cast<size_t>(kMaxCandidateTokens))
      return fail(SubmitStatus::kInvalid, which + "at most " + std::to_string(kMaxCandidateTokens) + " candidate tokens");
    for (const int32_t t : spec.candidate_tokens)
      if (t < 0) return fail(SubmitStatus::kInvalid, which + "negative candidate token id");
    if (spec.candidates_only && spec.candidate_tokens.empty())
      return fail(SubmitStatus::kInvalid, which + "candidates_only needs candidate tokens");
    if (static_cast<int>(spec.prompt.size()) + 1 > st.max_context)
      return fail(SubmitStatus::kTooLong, which + "prompt of " + std::to_string(spec.prompt.size()) +
                                              " tokens leaves no room in a context of " + std::to_string(st.max_context));
  }
  if (!request.continuation && st.queued >= st.options.max_queued_requests)
    return fail(SubmitStatus::kQueueFull, "the queue holds " + std::to_string(st.options.max_queued_requests) + " requests");

  auto state = std::make_shared<RequestState>();
  state->id = request.id;
  state->deadline = request.deadline;
  state->background = request.background;
  state->on_token = std::move(request.on_token);
  state->on_sequence_done = std::move(request.on_sequence_done);
  state->on_done = std::move(request.on_done);
  state->results.resize(request.sequences.size());
  state->unfinished = static_cast<int>(request.sequences.size());
  for (size_t i = 0; i < request.sequences.size(); ++i) {
    auto seq = std::make_unique<Sequence>();
    seq->id = st.next_sequence_id++;
    seq->request = state;
    seq->index = static_cast<int>(i);
    seq->spec = std::move(request.sequences[i]);
    if (seq->spec.final_grammar) seq->final_answer.emplace(seq->spec.final_grammar);
    seq->tokens = seq->spec.prompt;
    seq->prompt_len = static_cast<int>(seq->tokens.size());
    state->sequence_ids.push_back(seq->id);
    st.waiting.push_back(seq.get());
    st.live.emplace(seq->id, std::move(seq));
  }
  if (state->deadline) st.deadlines.emplace(*state->deadline, state);
  st.requests.emplace(state->id, std::move(state));
  ++st.queued;
  st.work_cv.notify_all();
  return SubmitStatus::kAccepted;
}

void Scheduler::cancel(const std::string& request_id) {
  std::lock_guard lock(state_->mutex);
  const auto it = state_->requests.find(request_id);
  if (it == state_->requests.end()) return;
  state_->cancellations.push_back(it->second);
  state_->work_cv.notify_all();
}

void Scheduler::warm(std::vector<int32_t> prefix, int rank) {
  State& st = *state_;
  if (!st.options.prefix_caching) return;
  if (rank >= st.options.num_ranks) throw std::invalid_argument("Scheduler::warm: no rank " + std::to_string(rank));
  // Only whole blocks are cached; and no more than one rank holds.
  const int capacity = (st.options.blocks_per_rank - 1) * st.bs();
  const int keep = std::min(static_cast<int>(prefix.size()), capacity) / st.bs() * st.bs();
  if (keep == 0) return;
  prefix.resize(static_cast<size_t>(keep));
  std::lock_guard lock(st.mutex);
  for (int r = 0; r < st.options.num_ranks; ++r) {
    if (rank >= 0 && r != rank) continue;
    auto seq = std::make_unique<Sequence>();
    seq->id = st.next_sequence_id++;
    seq->warm = true;
    seq->pinned_rank = r;
    seq->tokens = prefix;
    seq->prompt_len = keep;
    st.waiting.push_back(seq.get());
    st.live.emplace(seq->id, std::move(seq));
  }
  st.work_cv.notify_all();
}

void Scheduler::stop_accepting() {
  std::lock_guard lock(state_->mutex);
  state_->accepting = false;
}

SchedulerStats Scheduler::stats() const {
  const State& st = *state_;
  std::lock_guard lock(st.mutex);
  SchedulerStats out = st.stats;
  out.queued_requests = st.queued;
  out.waiting_sequences = 0;
  out.running_sequences = 0;
  out.ranks.assign(static_cast<size_t>(st.options.num_ranks), RankStats{});
  for (const auto& [id, s] : st.live) {
    if (s->finished) continue;
    if (s->rank < 0) {
      ++out.waiting_sequences;
    } else {
      ++out.running_sequences;
      ++out.ranks[static_cast<size_t>(s->rank)].running;
    }
  }
  for (int r = 0; r < st.options.num_ranks; ++r) {
    const PrefixCache& cache = st.caches[static_cast<size_t>(r)];
    RankStats& rs = out.ranks[static_cast<size_t>(r)];
    rs.blocks_used = cache.used_blocks();
    rs.blocks_cached = cache.cached_blocks();
    rs.blocks_total = cache.usable_blocks();
    rs.evictions = cache.counters().evictions;
  }
  return out;
}

bool Scheduler::has_work() const {
  std::lock_guard lock(state_->mutex);
  return !state_->live.empty();
}

bool Scheduler::wait_for_work(std::chrono::milliseconds timeout) {
  std::unique_lock lock(state_->mutex);
  state_->work_cv.wait_for(lock, timeout, [this] { return !state_->live.empty(); });
  return !state_->live.empty();
}

std::vector<proto::StepPlan> Scheduler::plan_step() {
  State& st = *state_;
  Events events;
  std::vector<proto::StepPlan> plans;
  {
    std::lock_guard lock(st.mutex);
    if (st.step_in_flight) throw std::logic_error("Scheduler::plan_step: the previous step was not completed");
    st.apply_cancellations(events);
    std::vector<State::Budget> budgets(static_cast<size_t>(st.options.num_ranks),
                                       State::Budget{st.options.max_step_tokens, st.options.max_step_samples});
    for (int r = 0; r < st.options.num_ranks; ++r) st.plan_running(r, budgets[static_cast<size_t>(r)]);
    st.admit_waiting(budgets, events);
    plans = st.build_plans();
    st.step_in_flight = true;
    ++st.stats.steps;
    st.sweep();
  }
  run_events(events);
  return plans;
}

void Scheduler::complete_step(const std::vector<proto::StepResult>& results) {
  State& st = *state_;
  Events events;
  {
    std::lock_guard lock(st.mutex);
    if (!st.step_in_flight) return;  // fail_all() ended the step
    st.step_in_flight = false;
    for (int r = 0; r < st.options.num_ranks; ++r)
      st.apply_result(r, static_cast<size_t>(r) < results.size() ? &results[static_cast<size_t>(r)] : nullptr, events);
    st.apply_cancellations(events);
    st.sweep();
  }
  run_events(events);
}

void Scheduler::fail_all(const std::string& why) {
  State& st = *state_;
  Events events;
  {
    std::lock_guard lock(st.mutex);
    for (auto& per_rank : st.planned) {
      for (Sequence* s : per_rank) s->planned_tokens = 0, s->planned_sample = s->planned_decode = false;
      per_rank.clear();
    }
    st.step_in_flight = false;
    for (auto& [id, s] : st.live) st.finish(*s, FinishReason::kError, why, events);
    st.sweep();
  }
  run_events(events);
}

std::string Scheduler::check_consistency() const {
  const State& st = *state_;
  std::lock_guard lock(st.mutex);
  for (int r = 0; r < st.options.num_ranks; ++r) {
    const PrefixCache& cache = st.caches[static_cast<size_t>(r)];
    const std::string rank = "rank " + std::to_string(r) + ": ";
    if (std::string error = cache.check(); !error.empty()) return rank + error;
    std::vector<int> refs(static_cast<size_t>(st.options.blocks_per_rank), 0);
    for (const auto& [id, s] : st.live) {
      if (s->rank != r) continue;
      const std::string seq = rank + "sequence " + std::to_string(id) + ": ";
      if (s->num_computed < 0 || s->num_computed > static_cast<int>(s->tokens.size())) return seq + "computed past its tokens";
      if (static_cast<int>(s->blocks.size()) * st.bs() < s->num_computed) return seq + "table shorter than its cache";
      for (size_t i = 0; i < s->blocks.size(); ++i) {
        const int32_t b = s->blocks[i];
        if (b <= 0 || b >= st.options.blocks_per_rank) return seq + "invalid block in its table";
        ++refs[static_cast<size_t>(b)];
        const bool in_chain = static_cast<int>(i) < s->cached_chain;
        if (in_chain != cache.is_cached(b)) return seq + "table entry " + std::to_string(i) + " cached state differs";
        if (in_chain && static_cast<int>(i + 1) * st.bs() > s->num_computed) return seq + "a cached block is not fully computed";
      }
    }
    for (int32_t b = 1; b < st.options.blocks_per_rank; ++b) {
      if (refs[static_cast<size_t>(b)] != cache.ref_count(b))
        return rank + "block " + std::to_string(b) + " has " + std::to_string(cache.ref_count(b)) + " references, " +
               std::to_string(refs[static_cast<size_t>(b)]) + " table entries";
      if (refs[static_cast<size_t>(b)] > 1 && !cache.is_cached(b))
        return rank + "block " + std::to_string(b) + " is shared but still written";
    }
  }
  for (const Sequence* s : st.waiting)
    if (!s->finished && (s->rank >= 0 || !s->blocks.empty())) return "a waiting sequence holds blocks";
  size_t placed = 0;
  for (int r = 0; r < st.options.num_ranks; ++r) {
    const auto& seqs = st.placed[static_cast<size_t>(r)];
    placed += seqs.size();
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (seqs[i]->finished || seqs[i]->rank != r) return "rank " + std::to_string(r) + " lists a sequence that is not there";
      if (i > 0 && seqs[i - 1]->placed_order >= seqs[i]->placed_order) return "placement order broken";
    }
  }
  for (int r = 0; r < st.options.num_ranks; ++r) {
    std::unordered_map<uint64_t, int> announced;
    for (const Sequence* s : st.placed[static_cast<size_t>(r)])
      for (int b = s->computing_begin; b < s->computing_end; ++b) ++announced[s->block_keys[static_cast<size_t>(b)]];
    if (announced != st.computing[static_cast<size_t>(r)]) return "rank " + std::to_string(r) + ": blocks being computed miscounted";
  }
  size_t placed_live = 0;
  for (const auto& [id, s] : st.live) placed_live += s->rank >= 0 && !s->finished ? 1 : 0;
  if (placed != placed_live) return "placed sequences missing from their rank's list";
  return {};
}

void Scheduler::clear_prefix_cache() {
  std::lock_guard lock(state_->mutex);
  for (PrefixCache& cache : state_->caches) cache.clear_unreferenced();
}

}  // namespace arbiter
