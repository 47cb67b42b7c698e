// Expert placement: contiguous defaults (even and uneven), the placement file format (one placement
// for every layer, or per-layer sections with sets that need not be contiguous), and its errors;
// placements balanced from expert-load statistics, and the statistics file's parser.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "parallel/expert_balance.h"
#include "parallel/expert_placement.h"
#include "runtime/expert_stats.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

void expect_error(const std::function<void()>& f, const std::string& part) {
  try {
    f();
    ADD_FAILURE() << "expected an error containing '" << part << "'";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

TEST(ExpertPlacement, ContiguousUneven) {
  const auto p = ExpertPlacement::contiguous(12, 8);
  ASSERT_EQ(p.num_ranks(), 8);
  for (int r = 0; r < 8; ++r) EXPECT_EQ(p.block_of(r).count, r < 4 ? 2 : 1) << r;
  EXPECT_EQ(p.block_of(4).first, 8);
  EXPECT_EQ(p.owner(11), 7);
  EXPECT_EQ(p.local_index(3), 1);
  const auto even = ExpertPlacement::contiguous(128, 4);
  EXPECT_EQ(even.block_of(3).first, 96);
  EXPECT_EQ(even.block_of(3).count, 32);
  const auto one = ExpertPlacement::contiguous(8, 1);
  EXPECT_EQ(one.block_of(0).count, 8);
}

TEST(ExpertPlacement, MoreRanksThanExperts) {
  expect_error([] { ExpertPlacement::contiguous(8, 9); }, "9 ranks but only 8 experts");
}

TEST(ExpertPlacement, ParsesTheFileFormat) {
  const auto p = ExpertPlacement::parse("# a comment\nexperts 12\n\nrank 1: 3 4,5-11   # tail\nrank 0 : 0-2\n", "t");
  EXPECT_EQ(p.num_ranks(), 2);
  EXPECT_EQ(p.block_of(0).count, 3);
  EXPECT_EQ(p.block_of(1).first, 3);
  EXPECT_EQ(p.block_of(1).count, 9);
  EXPECT_EQ(ExpertPlacement::parse(p.to_text(), "again").to_text(), p.to_text());
  EXPECT_NO_THROW(p.check_fits(12, 24, 2));
  expect_error([&] { p.check_fits(12, 24, 3); }, "expert placement t is for 2 ranks but 3 are running (it names ranks 0..1)");
  expect_error([&] { p.check_fits(16, 24, 2); }, "expert placement t is for 12 experts but the model has 16 per layer");
}

TEST(ExpertPlacement, FileErrorsAreClear) {
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0-1\nrank 1: 3\n", "f"); }, "no rank owns expert 2");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0-2\nrank 1: 2-3\n", "f"); },
               "expert 2 is listed for rank 0 and again for rank 1");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0 0 1\nrank 1: 2-3\n", "f"); }, "listed twice for rank 0");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0-3\nrank 0: 1\n", "f"); }, "f:3: rank 0 listed twice");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0-3\nrank 2: 1\n", "f"); }, "rank 1 is missing");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0-3\nrank 1:\n", "f"); }, "rank 1 owns no experts");
  expect_error([] { ExpertPlacement::parse("experts 2\nrank 0: 0\nrank 1: 1\nrank 2: 1\n", "f"); }, "3 ranks but only 2");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0-4\n", "f"); }, "expert 4, outside 0..3");
  expect_error([] { ExpertPlacement::parse("rank 0: 0\n", "f"); }, "missing 'experts N'");
  expect_error([] { ExpertPlacement::parse("experts x\n", "f"); }, "f:1: 'x' is not");
  expect_error([] { ExpertPlacement::parse("experts 4\nowner 0: 1\n", "f"); }, "f:2: unknown keyword 'owner'");
  expect_error([] { ExpertPlacement::load("/nonexistent/placement"); }, "cannot read expert placement file");
}

TEST(ExpertPlacement, ShippedExamplesLoad) {
  const auto p = ExpertPlacement::load(std::string(ARBITER_SOURCE_DIR) + "/configs/placement/120b-ep3-uneven.placement");
  EXPECT_NO_THROW(p.check_fits(128, 36, 3));
  const auto q = ExpertPlacement::load(std::string(ARBITER_SOURCE_DIR) + "/configs/placement/12-experts-8-ranks.placement");
  EXPECT_NO_THROW(q.check_fits(12, 8, 8));
}

TEST(ExpertPlacement, NonContiguousSets) {
  const auto p = ExpertPlacement::parse("experts 6\nrank 0: 0 2 4\nrank 1: 5,1 3\n", "t");
  EXPECT_FALSE(p.per_layer());
  EXPECT_EQ(p.num_layers(), 0);
  EXPECT_EQ(p.owner(4), 0);
  EXPECT_EQ(p.owner(5), 1);
  EXPECT_EQ(p.local_index(5), 2);  // rank 1 holds 1, 3, 5 in that order
  EXPECT_EQ(p.local_index(2, 3), 1);  // any layer: the same
  expect_error([&] { p.block_of(1); }, "not one contiguous run");
  EXPECT_EQ(p.to_text(), "experts 6\nrank 0: 0 2 4\nrank 1: 1 3 5\n");
}

TEST(ExpertPlacement, PerLayerSections) {
  const std::string text =
      "experts 4\n"
      "rank 0: 0-1\n"
      "rank 1: 2-3\n"
      "layers 3\n"
      "layer 1   # layer 1 differs\n"
      "rank 1: 0\n"
      "rank 0: 1-3\n";
  const auto p = ExpertPlacement::parse(text, "t");
  EXPECT_TRUE(p.per_layer());
  EXPECT_EQ(p.num_layers(), 3);
  EXPECT_EQ(p.num_ranks(), 2);
  EXPECT_EQ(p.owner(0, 0), 0);
  EXPECT_EQ(p.owner(1, 0), 1);
  EXPECT_EQ(p.local_index(1, 3), 2);
  EXPECT_EQ(p.owner(2, 3), 1);
  EXPECT_EQ(p.max_experts_of(0), 3);
  EXPECT_EQ(p.max_experts_of(1), 2);
  const auto again = ExpertPlacement::parse(p.to_text(), "again");
  EXPECT_EQ(again.to_text(), p.to_text());
  for (int l = 0; l < 3; ++l)
    for (int e = 0; e < 4; ++e) EXPECT_EQ(again.owner(l, e), p.owner(l, e));
  EXPECT_NO_THROW(p.check_fits(4, 3, 2));
  expect_error([&] { p.check_fits(4, 24, 2); }, "expert placement t is for 3 layers but the model has 24");
}

TEST(ExpertPlacement, PerLayerErrors) {
  expect_error([] { ExpertPlacement::parse("experts 2\nlayer 0\nrank 0: 0-1\n", "f"); }, "f:2: a 'layer' section needs a 'layers N'");
  expect_error([] { ExpertPlacement::parse("experts 2\nlayers 2\nlayer 2\n", "f"); }, "f:3: layer 2 outside 0..1");
  expect_error([] { ExpertPlacement::parse("experts 2\nlayers 2\nlayer 0\nrank 0: 0-1\nlayer 0\n", "f"); },
               "f:5: layer 0 given twice");
  expect_error([] { ExpertPlacement::parse("experts 2\nlayers 2\nlayer 0\nrank 0: 0-1\n", "f"); },
               "f: layer 1 has no section and there are no default");
  expect_error([] { ExpertPlacement::parse("experts 2\nrank 0: 0-1\nlayers 2\nlayer 1\nrank 0: 0\nrank 1: 1\n", "f"); },
               "layer 1 has 2 ranks but layer 0 has 1");
  expect_error([] { ExpertPlacement::parse("experts 3\nrank 0: 0-2\nlayers 2\nlayer 1\nrank 0: 0 1\n", "f"); },
               "f: layer 1: no rank owns expert 2");
  expect_error([] { ExpertPlacement::parse("experts 3\nrank 0: 0-2\nlayers 2\nlayer 1\nrank 1: 0-2\n", "f"); },
               "f:4: layer 1: rank 0 is missing");
  expect_error([] { ExpertPlacement::parse("experts 2\nlayers 2\nlayers 3\n", "f"); }, "f:3: 'layers' given twice");
}

// Random placements (per layer or not) survive to_text / parse unchanged, and random edits of a
// valid file either parse or fail with an error naming the file (never crash).
TEST(ExpertPlacement, RandomizedRoundTripAndEdits) {
  std::mt19937 rng(11);
  for (int round = 0; round < 200; ++round) {
    const int experts = 1 + static_cast<int>(rng() % 12), ranks = 1 + static_cast<int>(rng() % experts);
    const int layers = 1 + static_cast<int>(rng() % 4);
    std::vector<ExpertPlacement::RankLists> all;
    for (int l = 0; l < layers; ++l) {
      std::vector<int> ids(static_cast<size_t>(experts));
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      ExpertPlacement::RankLists lists(static_cast<size_t>(ranks));
      for (int e = 0; e < experts; ++e)  // every rank one first, then at random
        lists[static_cast<size_t>(e < ranks ? e : static_cast<int>(rng() % ranks))].push_back(ids[static_cast<size_t>(e)]);
      all.push_back(lists);
    }
    const auto p = rng() % 2 ? ExpertPlacement::from_layer_lists(experts, all, "r") : ExpertPlacement::from_lists(experts, all[0], "r");
    const std::string text = p.to_text();
    const auto q = ExpertPlacement::parse(text, "r");
    ASSERT_EQ(q.to_text(), text);
    std::string edited = text;
    for (int k = 0; k < 3; ++k) edited[rng() % edited.size()] = "0123456789 -:,#\nrlx"[rng() % 19];
    try {
      (void)ExpertPlacement::parse(edited, "edited.placement");
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind("edited.placement", 0), 0u) << e.what();
    }
  }
}

// Greedy balancing: a skewed layer ends up even where an even split exists, capacity is respected,
// every rank gets an expert, and no layer gets worse than the contiguous placement.
TEST(ExpertBalance, BalancesMeasuredLoad) {
  const ExpertLoad load = {{100, 1, 1, 1, 100, 1, 1, 1}, {8, 8, 8, 8, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}};
  const auto p = balanced_placement(load, 2);
  ASSERT_TRUE(p.per_layer());
  for (int l = 0; l < 3; ++l)
    for (int r = 0; r < 2; ++r) EXPECT_EQ(p.experts_of(l, r).size(), 4u) << l << " " << r;
  EXPECT_NE(p.owner(0, 0), p.owner(0, 4)) << "the two hot experts on different ranks";
  const auto after = layer_imbalance(p, load);
  const auto before = layer_imbalance(ExpertPlacement::contiguous(8, 2), load);
  EXPECT_DOUBLE_EQ(after[0], 1.0);
  EXPECT_DOUBLE_EQ(after[1], 1.0);
  EXPECT_DOUBLE_EQ(before[1], 2.0);
  EXPECT_DOUBLE_EQ(after[2], 1.0);  // no tokens: even by definition
  // Uneven counts when capacity allows: one hot expert alone on a rank.
  const auto uneven = balanced_placement({{90, 10, 10, 10, 10, 10, 10, 10}}, 2, 7);
  EXPECT_EQ(uneven.experts_of(0, uneven.owner(0, 0)).size(), 1u);
  EXPECT_DOUBLE_EQ(layer_imbalance(uneven, {{90, 10, 10, 10, 10, 10, 10, 10}})[0], 90.0 / 80.0);
  expect_error([] { balanced_placement({{1, 2}}, 3); }, "3 ranks for 2 experts");
  expect_error([] { balanced_placement({{1, 2, 3}}, 2, 1); }, "cannot hold 3");
  expect_error([] { balanced_placement({{1, 2}, {1}}, 1); }, "layer 1 has 1 experts");
  expect_error([] { balanced_placement({{1, -2}}, 1); }, "negative token count");
  std::mt19937 rng(5);
  for (int round = 0; round < 100; ++round) {
    const int experts = 2 + static_cast<int>(rng() % 16), ranks = 1 + static_cast<int>(rng() % experts);
    ExpertLoad random(1 + rng() % 4, std::vector<int64_t>(static_cast<size_t>(experts)));
    for (auto& row : random)
      for (auto& v : row) v = rng() % 3 == 0 ? 0 : static_cast<int64_t>(rng() % 1000);
    const auto q = balanced_placement(random, ranks);
    const auto a = layer_imbalance(q, random);
    for (size_t l = 0; l < a.size(); ++l) {
      // LPT's bound: at most the mean plus the largest single expert's load.
      int64_t total = 0, most = 0;
      for (int64_t v : random[l]) {
        total += v;
        most = std::max(most, v);
      }
      if (total > 0) {
        EXPECT_LE(a[l], 1.0 + static_cast<double>(most) * ranks / static_cast<double>(total) + 1e-9);
      }
    }
    for (int l = 0; l < q.num_layers(); ++l)
      for (int r = 0; r < ranks; ++r) EXPECT_FALSE(q.experts_of(l, r).empty());
  }
}

TEST(ExpertStats, ParsesAndRejectsWithTheFileName) {
  const auto load = parse_expert_stats(R"({"model": {}, "expert_load": {"experts": 3, "layers": [[1, 2, 3], [0, 0, 7]]}})", "s.json");
  EXPECT_EQ(load, (ExpertLoad{{1, 2, 3}, {0, 0, 7}}));
  EXPECT_EQ(parse_expert_stats(R"({"layers": [[4]]})", "bare"), (ExpertLoad{{4}}));
  EXPECT_EQ(parse_expert_stats(expert_load_json(load).dump(), "again"), load);
  expect_error([] { parse_expert_stats("{", "s.json"); }, "s.json: not valid JSON");
  expect_error([] { parse_expert_stats("{}", "s.json"); }, "s.json: no \"expert_load\" object");
  expect_error([] { parse_expert_stats(R"({"layers": []})", "s.json"); }, "non-empty array");
  expect_error([] { parse_expert_stats(R"({"layers": [[1], [1, 2]]})", "s.json"); }, "s.json: layer 1 has 2 experts");
  expect_error([] { parse_expert_stats(R"({"layers": [[1, -1]]})", "s.json"); }, "non-negative integers");
  expect_error([] { parse_expert_stats(R"({"layers": [[1.5]]})", "s.json"); }, "non-negative integers");
  expect_error([] { parse_expert_stats(R"({"experts": 2, "layers": [[1]]})", "s.json"); }, "\"experts\" is 2");
  expect_error([] { load_expert_stats("/nonexistent/stats.json"); }, "cannot read expert statistics file");
  // Random mutations of a valid file: parsed or refused with the file's name, never a crash.
  const std::string good = nlohmann::json{{"expert_load", expert_load_json(load)}}.dump();
  std::mt19937 rng(3);
  for (int round = 0; round < 500; ++round) {
    std::string text = good;
    for (int k = 0; k < 1 + static_cast<int>(rng() % 3); ++k) {
      const size_t at = rng() % text.size();
      switch (rng() % 3) {
        case 0: text[at] = "{}[],:-0123456789\"ax "[rng() % 21]; break;
        case 1: text.erase(at, 1 + rng() % 4); break;
        default: text.insert(at, 1, "[]{},-9\""[rng() % 9]);
      }
      if (text.empty()) text = "x";
    }
    try {
      const auto got = parse_expert_stats(text, "m.json");
      for (const auto& row : got) EXPECT_EQ(row.size(), got[0].size());
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind("m.json: ", 0), 0u) << e.what();
    }
  }
}

}  // namespace
}  // namespace arbiter
