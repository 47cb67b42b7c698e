// Expert placement: contiguous defaults (even and uneven), the placement file format, and its errors.
#include <gtest/gtest.h>

#include "parallel/expert_placement.h"
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
  EXPECT_NO_THROW(p.check_fits(12, 2));
  expect_error([&] { p.check_fits(12, 3); }, "for 2 ranks but 3 are running");
  expect_error([&] { p.check_fits(16, 2); }, "for 12 experts but the model has 16");
}

TEST(ExpertPlacement, FileErrorsAreClear) {
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0-1\nrank 1: 3\n", "f"); }, "no rank owns expert 2");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0-2\nrank 1: 2-3\n", "f"); },
               "expert 2 is listed for rank 0 and again for rank 1");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0 0 1\nrank 1: 2-3\n", "f"); }, "listed twice for rank 0");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0-3\nrank 0: 1\n", "f"); }, "f:3: rank 0 listed twice");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0-3\nrank 2: 1\n", "f"); }, "rank 1 is missing");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0-3\nrank 1:\n", "f"); }, "rank 1 owns no experts");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0 2\nrank 1: 1 3\n", "f"); }, "not one contiguous run");
  expect_error([] { ExpertPlacement::parse("experts 2\nrank 0: 0\nrank 1: 1\nrank 2: 1\n", "f"); }, "3 ranks but only 2");
  expect_error([] { ExpertPlacement::parse("experts 4\nrank 0: 0-4\n", "f"); }, "expert 4, outside 0..3");
  expect_error([] { ExpertPlacement::parse("rank 0: 0\n", "f"); }, "missing 'experts N'");
  expect_error([] { ExpertPlacement::parse("experts x\n", "f"); }, "f:1: 'x' is not");
  expect_error([] { ExpertPlacement::parse("experts 4\nowner 0: 1\n", "f"); }, "f:2: unknown keyword 'owner'");
  expect_error([] { ExpertPlacement::load("/nonexistent/placement"); }, "cannot read expert placement file");
}

TEST(ExpertPlacement, ShippedExamplesLoad) {
  const auto p = ExpertPlacement::load(std::string(ARBITER_SOURCE_DIR) + "/configs/placement/120b-ep3-uneven.placement");
  EXPECT_NO_THROW(p.check_fits(128, 3));
  const auto q = ExpertPlacement::load(std::string(ARBITER_SOURCE_DIR) + "/configs/placement/12-experts-8-ranks.placement");
  EXPECT_NO_THROW(q.check_fits(12, 8));
}

}  // namespace
}  // namespace arbiter
