// The whole model under expert parallelism over thread ranks against the single-rank model: every
// golden case over 2, 3 and 4 ranks (logits within 1e-5 relative, greedy continuations equal),
// uneven placements, per-layer placements balanced from measured expert load, ranks without tokens,
// ranks that receive nothing, the expert-load counters, and the start-up errors.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <thread>

#include "kernels/cpu/cpu_backend.h"
#include "parallel/expert_balance.h"
#include "parallel/expert_placement.h"
#include "parallel/moe_dispatch.h"
#include "parallel/thread_comm.h"
#include "runtime/expert_stats.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "tests/memory_ledger.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

using testing::GoldenCase;
using testing::load_golden_case;

ModelOptions small_options(Communicator* comm = nullptr, std::shared_ptr<const ExpertPlacement> placement = nullptr,
                           bool host_staged = false, int64_t capacity_limit = MoeDispatcher::kDefaultCapacityLimit) {
  ModelOptions o;
  o.ep_host_staged = host_staged;
  o.ep_capacity_limit = capacity_limit;
  o.max_step_rows = 64;
  o.max_logit_rows = 64;
  o.kv.block_size = 4;
  o.kv.full_blocks = 64;
  o.kv.sliding_blocks = 32;
  o.comm = comm;
  o.placement = std::move(placement);
  return o;
}

// One rank's model: its own checkpoint mapping and a one-thread backend (the ranks share 2 cores).
struct RankModel {
  explicit RankModel(const std::string& dir, Communicator* comm, std::shared_ptr<const ExpertPlacement> placement = nullptr,
                     bool host_staged = false, int64_t capacity_limit = MoeDispatcher::kDefaultCapacityLimit)
      : RankModel(dir, small_options(comm, std::move(placement), host_staged, capacity_limit)) {}
  RankModel(const std::string& dir, const ModelOptions& options)
      : config(load_model_config(dir + "/config.json")), ck(dir), backend(1), model(config, ck, backend, options) {}
  ModelConfig config;
  Checkpoint ck;
  CpuBackend backend;
  Model model;
};

// The expert-load counters: single rank (Backend::count_expert_load) and expert-parallel (counted in
// the dispatch's packing) count the same tokens, every token k times per layer.
TEST(EpModel, ExpertLoadCountersAgreeAcrossPaths) {
  const GoldenCase g = load_golden_case("tiny-b");
  const ModelConfig config = load_model_config(g.dir + "/config.json");
  Checkpoint ck(g.dir);
  CpuBackend backend(1);
  ModelOptions o = small_options();
  o.count_expert_load = true;
  Model single(config, ck, backend, o);
  compute_all_logits(single, g.tokens);
  const auto want = single.expert_load();
  ASSERT_EQ(want.size(), static_cast<size_t>(config.num_hidden_layers));
  for (const auto& row : want) {
    ASSERT_EQ(row.size(), static_cast<size_t>(config.num_local_experts));
    int64_t sum = 0;
    for (int64_t v : row) sum += v;
    EXPECT_EQ(sum, static_cast<int64_t>(g.tokens.size()) * config.num_experts_per_tok);
  }
  single.reset_expert_load();
  for (const auto& row : single.expert_load())
    for (int64_t v : row) EXPECT_EQ(v, 0);
  for (bool staged : {false, true}) {
    std::vector<std::vector<int64_t>> total;
    std::mutex mutex;
    run_thread_ranks(3, [&](Communicator& comm) {
      const GoldenCase& c = g;
      ModelConfig cfg = load_model_config(c.dir + "/config.json");
      Checkpoint own(c.dir);
      CpuBackend b(1);
      ModelOptions ro = small_options(&comm, nullptr, staged);
      ro.count_expert_load = true;
      Model m(cfg, own, b, ro);
      // The tokens split over the ranks: rank r runs its third of the prefixes' last tokens.
      if (comm.rank() == 0) compute_all_logits(m, c.tokens);
      m.serve_peers();
      const auto mine = m.expert_load();
      std::lock_guard<std::mutex> lock(mutex);
      add_expert_load(total, mine);
    });
    EXPECT_EQ(total, want) << (staged ? "host-staged" : "backend ops");
  }
}

std::vector<float> single_rank_logits(const std::string& dir, const std::vector<int32_t>& tokens) {
  RankModel m(dir, nullptr);
  return compute_all_logits(m.model, tokens);
}

void expect_close(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  float max_err = 0, max_logit = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    max_err = std::max(max_err, std::fabs(got[i] - want[i]));
    max_logit = std::max(max_logit, std::fabs(want[i]));
  }
  EXPECT_LE(max_err, 1e-5f * max_logit) << what << ": max |logit| " << max_logit;
  EXPECT_GT(max_logit, 0.1f) << what;
}

std::shared_ptr<const ExpertPlacement> placement_text(const std::string& text) {
  return std::make_shared<const ExpertPlacement>(ExpertPlacement::parse(text, "test placement"));
}

class EpGoldenTest : public ::testing::TestWithParam<std::string> {};

// Rank 0 runs the sequence, the other ranks only serve their experts (zero tokens of their own).
TEST_P(EpGoldenTest, LogitsAndGreedyMatchSingleRank) {
  const GoldenCase g = load_golden_case(GetParam());
  const auto single = single_rank_logits(g.dir, g.tokens);
  for (int ranks : {2, 3, 4}) {
    std::vector<float> logits;
    std::vector<int32_t> greedy;
    run_thread_ranks(ranks, [&](Communicator& comm) {
      RankModel m(g.dir, &comm);
      if (comm.rank() == 0) {
        logits = compute_all_logits(m.model, g.tokens);
        greedy = greedy_generate(m.model, g.tokens, static_cast<int>(g.greedy.size()));
      }
      m.model.serve_peers();
    });
    expect_close(logits, single, GetParam() + " over " + std::to_string(ranks) + " ranks");
    EXPECT_EQ(greedy, g.greedy) << ranks << " ranks";
  }
}

// Backend::reserve under expert parallelism: each rank announces exactly what it allocates (its
// experts only, plus the dispatcher's staging buffers for rows from every rank), and its MoE calls
// for rows from every rank; steps allocate nothing (the staging buffers are sized up front).
TEST(EpReserve, EachRankAnnouncesExactlyWhatItAllocates) {
  const GoldenCase g = load_golden_case("tiny-a");  // 8 experts
  const int ranks = 3;
  const auto placement = placement_text("experts 8\nrank 0: 0-2\nrank 1: 3-6\nrank 2: 7");
  std::mutex mutex;
  std::vector<std::string> failures;
  run_thread_ranks(ranks, [&](Communicator& comm) {
    const ModelConfig config = load_model_config(g.dir + "/config.json");
    Checkpoint ck(g.dir);
    CpuBackend cpu(1);
    testing::MemoryLedger ledger(cpu);
    Model model(config, ck, ledger, small_options(&comm, placement));
    const size_t after_load = ledger.allocated_bytes;
    if (comm.rank() == 0) compute_all_logits(model, g.tokens);
    model.serve_peers();
    const int experts[] = {3, 4, 1};
    std::string why;
    if (ledger.reserve_calls != 1 || ledger.allocations_before_reserve != 0) why += " reserve not first/once;";
    if (ledger.reserved_bytes != after_load) why += " reserved " + std::to_string(ledger.reserved_bytes) + " != allocated " +
                                                   std::to_string(after_load) + ";";
    if (ledger.allocated_bytes != after_load) why += " steps allocated;";
    if (ledger.last_moe.max_rows != 64 * ranks || ledger.last_moe.experts != experts[comm.rank()]) why += " moe limits;";
    if (!why.empty()) {
      std::lock_guard<std::mutex> lock(mutex);
      failures.push_back("rank " + std::to_string(comm.rank()) + ":" + why);
    }
  });
  EXPECT_TRUE(failures.empty()) << ::testing::PrintToString(failures);
}

// Every rank runs its own sequence (data-parallel attention) in the same steps.
TEST_P(EpGoldenTest, EveryRankItsOwnSequence) {
  const GoldenCase g = load_golden_case(GetParam());
  const int ranks = 3;
  std::vector<std::vector<int32_t>> seqs;
  std::vector<std::vector<float>> single;
  for (int r = 0; r < ranks; ++r) {
    seqs.emplace_back(g.tokens.begin() + r * 3, g.tokens.end() - r * 5);
    single.push_back(single_rank_logits(g.dir, seqs.back()));
  }
  std::vector<std::vector<float>> got(ranks);
  run_thread_ranks(ranks, [&](Communicator& comm) {
    RankModel m(g.dir, &comm);
    got[static_cast<size_t>(comm.rank())] = compute_all_logits(m.model, seqs[static_cast<size_t>(comm.rank())]);
  });
  for (int r = 0; r < ranks; ++r) expect_close(got[static_cast<size_t>(r)], single[static_cast<size_t>(r)], "rank " + std::to_string(r));
}

// The backend's dispatch/combine operations (the default path) against the host-staged path: the
// same rows meet the same experts and are summed in the same order, so the logits are the same bits.
// Every rank runs its own sequence (rank 1 none), over 2, 3 and 4 ranks and an uneven placement.
TEST_P(EpGoldenTest, BackendOpsEqualHostStagedBitForBit) {
  const GoldenCase g = load_golden_case(GetParam());
  for (int ranks : {2, 3, 4}) {
    const auto placement =
        ranks == 3 ? placement_text("experts " + std::to_string(load_model_config(g.dir + "/config.json").num_local_experts) +
                                    "\nrank 0: 0\nrank 1: 1-2\nrank 2: 3-" +
                                    std::to_string(load_model_config(g.dir + "/config.json").num_local_experts - 1))
                   : nullptr;
    std::vector<std::vector<float>> ops(static_cast<size_t>(ranks)), host(static_cast<size_t>(ranks));
    run_thread_ranks(ranks, [&](Communicator& comm) {
      const int r = comm.rank();
      const std::vector<int32_t> mine(g.tokens.begin() + r * 2, g.tokens.end() - r * 3);
      for (bool staged : {false, true}) {
        RankModel m(g.dir, &comm, placement, staged);
        if (r != 1) (staged ? host : ops)[static_cast<size_t>(r)] = compute_all_logits(m.model, mine);
        m.model.serve_peers();
      }
    });
    for (int r = 0; r < ranks; ++r) {
      const auto& a = ops[static_cast<size_t>(r)];
      const auto& b = host[static_cast<size_t>(r)];
      ASSERT_EQ(a.size(), b.size());
      EXPECT_TRUE(a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0)
          << GetParam() << ", " << ranks << " ranks, rank " << r;
      if (r != 1) {
        EXPECT_FALSE(a.empty());
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, EpGoldenTest, ::testing::ValuesIn(testing::golden_case_names()));

TEST(EpModel, UnevenPlacements) {
  struct Case {
    std::string golden, placement;
    int ranks;
  };
  const std::vector<Case> cases = {
      {"tiny-a", "experts 8\nrank 0: 0-5\nrank 1: 6\nrank 2: 7\n", 3},
      {"tiny-b", "experts 16\nrank 0: 0\nrank 1: 1-2\nrank 2: 3-12\nrank 3: 13-15\n", 4},
      {"tiny-b", "", 3},  // default contiguous 6/5/5
  };
  for (const auto& c : cases) {
    const GoldenCase g = load_golden_case(c.golden);
    const auto placement = c.placement.empty() ? nullptr : placement_text(c.placement);
    std::vector<float> logits;
    std::vector<int32_t> greedy;
    run_thread_ranks(c.ranks, [&](Communicator& comm) {
      RankModel m(g.dir, &comm, placement);
      if (comm.rank() == 1) {  // not rank 0: any rank may lead
        logits = compute_all_logits(m.model, g.tokens);
        greedy = greedy_generate(m.model, g.tokens, static_cast<int>(g.greedy.size()));
      }
      m.model.serve_peers();
    });
    expect_close(logits, single_rank_logits(g.dir, g.tokens), c.golden + " placement\n" + c.placement);
    EXPECT_EQ(greedy, g.greedy) << c.placement;
  }
}

// A placement balanced from measured load (per layer; sets that are not one run, different in every
// layer) loads the listed experts only and gives the single-rank logits and greedy tokens.
TEST(EpModel, PlacementFromStatisticsGivesTheSameLogits) {
  for (const std::string name : {"tiny-a", "tiny-b"}) {
    const GoldenCase g = load_golden_case(name);
    const ModelConfig config = load_model_config(g.dir + "/config.json");
    Checkpoint ck(g.dir);
    CpuBackend backend(1);
    ModelOptions o = small_options();
    o.count_expert_load = true;
    Model single(config, ck, backend, o);
    const auto want = compute_all_logits(single, g.tokens);
    auto load = single.expert_load();
    // Skew it further so that the balanced sets are scattered and differ between layers.
    for (size_t l = 0; l < load.size(); ++l)
      for (size_t e = 0; e < load[l].size(); ++e) load[l][e] = load[l][e] * 10 + static_cast<int64_t>((e * 7 + l * 3) % 5);
    const auto stats = parse_expert_stats(nlohmann::json{{"expert_load", expert_load_json(load)}}.dump(), "stats");
    ASSERT_EQ(stats, load);
    for (int ranks : {2, 3}) {
      const auto placement = std::make_shared<const ExpertPlacement>(balanced_placement(stats, ranks));
      ASSERT_TRUE(placement->per_layer());
      bool scattered = false, layers_differ = false;
      for (int l = 0; l < config.num_hidden_layers; ++l)
        for (int r = 0; r < ranks; ++r) {
          const auto& ids = placement->experts_of(l, r);
          scattered |= ids.back() - ids.front() + 1 != static_cast<int>(ids.size());
          layers_differ |= ids != placement->experts_of(0, r);
        }
      EXPECT_TRUE(scattered) << placement->to_text();
      EXPECT_TRUE(layers_differ) << placement->to_text();
      const auto before = layer_imbalance(ExpertPlacement::contiguous(config.num_local_experts, ranks), stats);
      const auto after = layer_imbalance(*placement, stats);
      for (size_t l = 0; l < after.size(); ++l) EXPECT_LE(after[l], before[l] + 1e-9) << "layer " << l;
      std::vector<float> logits;
      std::vector<int32_t> greedy;
      run_thread_ranks(ranks, [&](Communicator& comm) {
        // (Each layer's dispatch checks that the rank holds as many experts as its set lists.)
        RankModel m(g.dir, &comm, placement);
        if (comm.rank() == ranks - 1) {
          logits = compute_all_logits(m.model, g.tokens);
          greedy = greedy_generate(m.model, g.tokens, static_cast<int>(g.greedy.size()));
        }
        m.model.serve_peers();
      });
      expect_close(logits, want, name + " balanced over " + std::to_string(ranks) + " ranks\n" + placement->to_text());
      EXPECT_EQ(greedy, g.greedy) << placement->to_text();
    }
  }
}

// Forwards to a real communicator and records, per rank, how many dispatches received no rows.
class CountingComm final : public Communicator {
 public:
  explicit CountingComm(Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string name() const override { return "counting"; }
  void all_to_all_v(const void* s, std::span<const size_t> sc, void* r, std::span<const size_t> rc) override {
    // The dispatcher's order per layer: counts exchange, dispatch, combine.
    size_t total = 0;
    for (size_t c : rc) total += c;
    if (calls_++ % 3 == 1 && total == 0) ++empty_dispatches;
    ++count_exchanges;
    inner_.all_to_all_v(s, sc, r, rc);
  }
  // The dispatch of the backend-operation path: rows, ids and weights in one collective.
  void all_to_all_v_parts(std::span<const Part> parts) override {
    size_t total = 0;
    for (const Part& p : parts)
      for (size_t c : p.recv_counts) total += c;
    if (calls_++ % 3 == 1 && total == 0) ++empty_dispatches;
    inner_.all_to_all_v_parts(parts);
  }
  void all_gather(const void* s, size_t b, void* r) override { inner_.all_gather(s, b, r); }
  void broadcast(void* d, size_t b, int root) override { inner_.broadcast(d, b, root); }
  void barrier() override { inner_.barrier(); }
  void abort(const std::string& reason, int code) noexcept override { inner_.abort(reason, code); }
  void set_timeout(double s) override { inner_.set_timeout(s); }
  double timeout() const override { return inner_.timeout(); }
  int empty_dispatches = 0;
  int count_exchanges = 0;  // all_to_all_v calls: the row-count exchanges of exact mode

 private:
  Communicator& inner_;
  long calls_ = 0;
};

// Decode steps of one token over 4 ranks: most layers send it to fewer than 4 ranks, so some ranks
// receive nothing at all, and ranks 1-3 never have tokens of their own. Exact mode, where an
// exchange that carries nothing is empty (capacity mode pads it).
TEST(EpModel, RanksWithoutTokensAndRanksThatReceiveNothing) {
  const GoldenCase g = load_golden_case("tiny-b");
  std::vector<int32_t> greedy;
  std::atomic<int> empty = 0;
  run_thread_ranks(4, [&](Communicator& comm) {
    CountingComm counting(comm);
    RankModel m(g.dir, &counting, nullptr, false, 0);
    if (comm.rank() == 0) greedy = greedy_generate(m.model, g.tokens, static_cast<int>(g.greedy.size()));
    m.model.serve_peers();
    empty += counting.empty_dispatches;
  });
  EXPECT_EQ(greedy, g.greedy);
  EXPECT_GT(empty.load(), 0);
}

// A placement of `experts` over `ranks` with its own sets in layer 1 (expert e on rank e mod ranks).
std::shared_ptr<const ExpertPlacement> per_layer_placement(int experts, int ranks, int layers) {
  std::string text = "experts " + std::to_string(experts) + "\n";
  for (int r = 0; r < ranks; ++r) {
    const auto ids = ExpertPlacement::contiguous(experts, ranks).experts_of(r);
    text += "rank " + std::to_string(r) + ": " + std::to_string(ids.front()) + "-" + std::to_string(ids.back()) + "\n";
  }
  text += "layers " + std::to_string(layers) + "\nlayer 1\n";
  for (int r = 0; r < ranks; ++r) {
    text += "rank " + std::to_string(r) + ":";
    for (int e = r; e < experts; e += ranks) text += " " + std::to_string(e);
    text += "\n";
  }
  return placement_text(text);
}

// The fixed-capacity exchange gives exact mode's bits in the whole model: every rank its own
// sequence (rank 1 none: it only serves), prefill steps of every rank's length, of 7 rows and of
// 300 rows, and decode steps of one row; over 2, 3 (per-layer placement) and 4 ranks. Exact mode
// exchanges row counts (all_to_all_v), capacity mode never does; under a limit of 100 rows per peer
// the 300-row step alone runs in exact mode.
TEST(EpModel, CapacityEqualsExactBitForBit) {
  for (const std::string name : {"tiny-a", "tiny-b"}) {
    const GoldenCase g = load_golden_case(name);
    const ModelConfig config = load_model_config(g.dir + "/config.json");
    std::vector<int32_t> long_prompt;
    while (long_prompt.size() < 300) long_prompt.push_back(g.tokens[long_prompt.size() % g.tokens.size()]);
    for (int ranks : {2, 3, 4}) {
      const auto placement =
          ranks == 3 ? per_layer_placement(config.num_local_experts, ranks, config.num_hidden_layers) : nullptr;
      const int64_t hundred_rows = int64_t{100} * ranks * config.hidden_size;
      struct Run {
        int64_t limit;
        const char* what;
      };
      const Run runs[] = {{0, "exact"}, {std::numeric_limits<int64_t>::max(), "capacity"}, {hundred_rows, "chosen"}};
      // [run][rank]: logits and greedy tokens of every step, concatenated; count exchanges.
      std::vector<std::vector<float>> logits(3 * static_cast<size_t>(ranks));
      std::vector<std::vector<int32_t>> greedy(logits.size());
      std::vector<int> counts(logits.size());
      run_thread_ranks(ranks, [&](Communicator& comm) {
        const int r = comm.rank();
        const std::vector<int32_t> mine(g.tokens.begin() + r * 2, g.tokens.end() - r * 3);
        for (size_t i = 0; i < 3; ++i) {
          CountingComm counting(comm);
          ModelOptions o = small_options(&counting, placement, false, runs[i].limit);
          o.max_step_rows = 320;
          o.max_logit_rows = 320;  // (compute_all_logits steps at most this many rows)
          o.kv.full_blocks = 96;
          RankModel m(g.dir, o);
          const size_t at = i * static_cast<size_t>(ranks) + static_cast<size_t>(r);
          if (r != 1) {
            const std::vector<int32_t>* const prompts[] = {&mine, &long_prompt};
            for (const std::vector<int32_t>* tokens : prompts) {
              const auto l = compute_all_logits(m.model, *tokens);
              logits[at].insert(logits[at].end(), l.begin(), l.end());
            }
            const std::vector<int32_t> seven(mine.begin(), mine.begin() + 7);
            const auto l = compute_all_logits(m.model, seven);
            logits[at].insert(logits[at].end(), l.begin(), l.end());
            greedy[at] = greedy_generate(m.model, mine, 4);
          }
          m.model.serve_peers();
          counts[at] = counting.count_exchanges;
        }
      });
      for (int r = 0; r < ranks; ++r) {
        const auto& exact = logits[static_cast<size_t>(r)];
        if (r != 1) {
          EXPECT_FALSE(exact.empty());
        }
        for (size_t i = 1; i < 3; ++i) {
          const size_t at = i * static_cast<size_t>(ranks) + static_cast<size_t>(r);
          ASSERT_EQ(logits[at].size(), exact.size());
          EXPECT_TRUE(exact.empty() || std::memcmp(logits[at].data(), exact.data(), exact.size() * sizeof(float)) == 0)
              << name << ", " << ranks << " ranks, rank " << r << ": " << runs[i].what;
          EXPECT_EQ(greedy[at], greedy[static_cast<size_t>(r)]) << runs[i].what;
        }
        EXPECT_GT(counts[static_cast<size_t>(r)], 0) << "exact mode exchanges row counts";
        EXPECT_EQ(counts[static_cast<size_t>(ranks + r)], 0) << "capacity mode never exchanges row counts";
        EXPECT_EQ(counts[static_cast<size_t>(2 * ranks + r)], config.num_hidden_layers)
            << "under the limit only the 300-row step exchanges row counts (once per layer)";
      }
    }
  }
}

// A rank that stops in the middle of a capacity-mode step (it never arrives at layer 1's dispatch):
// its peers fail with a CommError naming the timeout within the communication timeout (1 s), never
// hang; and a rank that dies there with an error ends its peers' waits at once (well inside a 60 s
// timeout).
TEST(EpModel, RankDyingMidExchangeFailsThePeers) {
  const std::string a = load_golden_case("tiny-a").dir;
  // Forwards to the inner communicator until its `at`-th all_to_all_v_parts, where the rank stops:
  // silent for `silent_s` seconds, then it throws.
  class DiesAtExchange final : public Communicator {
   public:
    DiesAtExchange(Communicator& inner, int at, double silent_s) : inner_(inner), at_(at), silent_s_(silent_s) {}
    int rank() const override { return inner_.rank(); }
    int size() const override { return inner_.size(); }
    std::string name() const override { return "dies"; }
    void all_to_all_v(const void* s, std::span<const size_t> sc, void* r, std::span<const size_t> rc) override {
      inner_.all_to_all_v(s, sc, r, rc);
    }
    void all_to_all_v_parts(std::span<const Part> parts) override {
      if (++calls_ == at_) {
        std::this_thread::sleep_for(std::chrono::duration<double>(silent_s_));
        throw std::runtime_error("rank " + std::to_string(rank()) + " died mid-exchange");
      }
      inner_.all_to_all_v_parts(parts);
    }
    void all_gather(const void* s, size_t b, void* r) override { inner_.all_gather(s, b, r); }
    void broadcast(void* d, size_t b, int root) override { inner_.broadcast(d, b, root); }
    void barrier() override { inner_.barrier(); }
    void abort(const std::string& reason, int code) noexcept override { inner_.abort(reason, code); }
    void set_timeout(double s) override { inner_.set_timeout(s); }
    double timeout() const override { return inner_.timeout(); }

   private:
    Communicator& inner_;
    int at_, calls_ = 0;
    double silent_s_;
  };
  for (const double silent_s : {0.0, 3.0}) {
    // Silent: a short timeout that the peers must hit; an error: a long one they must not wait for.
    const double timeout_s = silent_s > 0 ? 1.0 : 60.0;
    std::mutex mu;
    std::vector<std::string> peer_errors;
    std::vector<double> peer_seconds;
    try {
      run_thread_ranks(3, [&](Communicator& comm) {
        // Layer 0's dispatch and combine, then layer 1's dispatch: the third exchange.
        DiesAtExchange dying(comm, comm.rank() == 2 ? 3 : -1, silent_s);
        RankModel m(a, &dying, nullptr, false, std::numeric_limits<int64_t>::max());  // capacity mode
        const auto start = std::chrono::steady_clock::now();
        try {
          if (comm.rank() == 0) compute_all_logits(m.model, {1, 2, 3});
          m.model.serve_peers();
        } catch (const CommError& e) {
          std::lock_guard lk(mu);
          peer_errors.push_back(e.what());
          peer_seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
          throw;
        }
      }, timeout_s);
      ADD_FAILURE() << "expected an error";
    } catch (const std::exception& e) {
      if (silent_s == 0) EXPECT_STREQ(e.what(), "rank 2 died mid-exchange");
      else EXPECT_NE(std::string(e.what()).find("timed out"), std::string::npos) << e.what();
    }
    ASSERT_EQ(peer_errors.size(), 2u) << "both peers fail: " << ::testing::PrintToString(peer_errors);
    for (double s : peer_seconds) EXPECT_LT(s, silent_s > 0 ? timeout_s + 2.0 : 10.0) << "seconds to fail";
  }
}

// A step where rank 1 has a batch of two sequences and ranks 0 and 2 have none, then the reverse.
TEST(EpModel, MixedEmptyAndBatchedSteps) {
  const GoldenCase g = load_golden_case("tiny-a");
  const std::vector<int32_t> a(g.tokens.begin(), g.tokens.begin() + 9), b(g.tokens.begin() + 4, g.tokens.end());
  const auto la = single_rank_logits(g.dir, a), lb = single_rank_logits(g.dir, b);
  std::vector<float> batched, alone;
  run_thread_ranks(3, [&](Communicator& comm) {
    RankModel m(g.dir, &comm);
    KvBlockPools pools(m.model.options().kv);
    StepLayout layout;
    layout.block_size = m.model.options().kv.block_size;
    LocalSequence sa(pools, m.model.kv_cache().ring_blocks_per_sequence()), sb(pools, m.model.kv_cache().ring_blocks_per_sequence());
    if (comm.rank() == 1) {
      sa.append_to_step(layout, a.data(), static_cast<int>(a.size()), true, true);
      sb.append_to_step(layout, b.data(), static_cast<int>(b.size()), true, true);
    }
    const auto out = m.model.forward(layout);
    if (comm.rank() == 1) batched = out;
    else EXPECT_TRUE(out.empty());
    StepLayout second;
    second.block_size = layout.block_size;
    LocalSequence sc(pools, m.model.kv_cache().ring_blocks_per_sequence());
    if (comm.rank() != 1) sc.append_to_step(second, b.data(), static_cast<int>(b.size()), true, true);
    const auto out2 = m.model.forward(second);
    if (comm.rank() == 2) alone = out2;
  });
  std::vector<float> both = la;
  both.insert(both.end(), lb.begin(), lb.end());
  expect_close(batched, both, "batched on rank 1");
  expect_close(alone, lb, "rank 2");
}

void expect_error(int ranks, const std::function<void(Communicator&)>& body, const std::string& part) {
  try {
    run_thread_ranks(ranks, body, 20.0);
    ADD_FAILURE() << "expected an error containing '" << part << "'";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

TEST(EpModel, StartupErrors) {
  const std::string a = load_golden_case("tiny-a").dir, b = load_golden_case("tiny-b").dir;
  expect_error(2, [&](Communicator& comm) { RankModel m(comm.rank() == 0 ? a : b, &comm); },
               "ranks disagree on the model");
  expect_error(2,
               [&](Communicator& comm) {
                 RankModel m(a, &comm, placement_text(comm.rank() == 0 ? "experts 8\nrank 0: 0-3\nrank 1: 4-7"
                                                                       : "experts 8\nrank 0: 0-4\nrank 1: 5-7"));
               },
               "ranks disagree on the model");
  expect_error(9, [&](Communicator& comm) { RankModel m(a, &comm); }, "9 ranks but only 8 experts");
  expect_error(2, [&](Communicator& comm) { RankModel m(a, &comm, placement_text("experts 12\nrank 0: 0-5\nrank 1: 6-11")); },
               "expert placement test placement is for 12 experts but the model has 8");
  expect_error(3, [&](Communicator& comm) { RankModel m(a, &comm, placement_text("experts 8\nrank 0: 0-3\nrank 1: 4-7")); },
               "expert placement test placement is for 2 ranks but 3 are running");
  expect_error(2,
               [&](Communicator& comm) {
                 RankModel m(a, &comm, placement_text("experts 8\nrank 0: 0-3\nrank 1: 4-7\nlayers 40\nlayer 39\nrank 0: 0\nrank 1: 1-7"));
               },
               "expert placement test placement is for 40 layers but the model has");
}

TEST(EpModel, DeadRankFailsThePeersFast) {
  const std::string a = load_golden_case("tiny-a").dir;
  const auto start = std::chrono::steady_clock::now();
  try {
    run_thread_ranks(3, [&](Communicator& comm) {
      RankModel m(a, &comm);
      if (comm.rank() == 2) throw std::runtime_error("rank 2 lost its device");
      m.model.serve_peers();
    });  // default (long) timeout: the abort must end it, not the clock
    ADD_FAILURE() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "rank 2 lost its device");
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
}

}  // namespace
}  // namespace arbiter
