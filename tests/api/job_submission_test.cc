// The POST /v1/jobs body parser (api/jobs.h, parse_job_submission), randomized: byte mutations of
// valid JSON and JSONL submissions either parse into a submission that keeps the parser's promises
// (1..max items, unique custom_ids, a known url, every item's body checked) or are refused with an
// OpenAI-style 400 (ApiException, or JobItemsInvalid whose lines are within the body and whose body
// is JSON) — never another exception, never a crash.
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "api/errors.h"
#include "api/jobs.h"

namespace arbiter::api {
namespace {

std::string json_submission() {
  nlohmann::json items = nlohmann::json::array();
  for (int i = 0; i < 4; ++i)
    items.push_back({{"custom_id", "c" + std::to_string(i)}, {"body", {{"content", "text " + std::to_string(i)}, {"policies", {{{"id", "p"}}}}}}});
  items[1]["url"] = kChatUrl;
  return nlohmann::json({{"items", items}, {"idempotency_key", "k"}, {"webhook_url", "http://h/x"}, {"webhook_items", true}}).dump();
}

std::string jsonl_submission() {
  std::string out;
  for (int i = 0; i < 4; ++i)
    out += nlohmann::json({{"custom_id", "l" + std::to_string(i)}, {"method", "POST"}, {"url", i == 2 ? kChatUrl : kClassifyUrl},
                           {"body", {{"content", "line"}}}})
               .dump() +
           (i == 1 ? "\r\n\n" : "\n");
  return out;
}

TEST(JobSubmission, ValidBodiesParse) {
  int checked = 0;
  const auto check = [&](const std::string&, const std::string&) { ++checked; };
  const JobSubmission a = parse_job_submission(json_submission(), false, 100, check);
  ASSERT_EQ(a.items.size(), 4u);
  EXPECT_EQ(a.items[1].url, kChatUrl);
  EXPECT_EQ(a.items[0].url, kClassifyUrl);
  EXPECT_EQ(a.idempotency_key, "k");
  EXPECT_EQ(a.webhook_url, "http://h/x");
  EXPECT_TRUE(a.webhook_items);
  const JobSubmission b = parse_job_submission(jsonl_submission(), true, 100, check);
  ASSERT_EQ(b.items.size(), 4u);
  EXPECT_EQ(b.items[2].url, kChatUrl);
  EXPECT_FALSE(b.webhook_items);
  EXPECT_EQ(checked, 8);
  EXPECT_THROW(parse_job_submission(json_submission(), false, 3, check), ApiException);  // over the item limit
}

TEST(JobSubmission, RandomMutationsParseOrAreRefusedCleanly) {
  std::mt19937 rng(1206);
  const std::string alphabet = "{}[]\":,\\ \n\r0aéx\x01\xff";
  size_t accepted = 0, refused = 0, refused_items = 0;
  for (int round = 0; round < 6000; ++round) {
    const bool jsonl = round % 2;
    std::string body = jsonl ? jsonl_submission() : json_submission();
    for (int edits = 1 + static_cast<int>(rng() % 4); edits > 0; --edits) {
      const size_t at = rng() % (body.size() + 1);
      switch (rng() % 4) {
        case 0: body.insert(body.begin() + static_cast<long>(at), alphabet[rng() % alphabet.size()]); break;
        case 1: if (at < body.size()) body.erase(at, 1 + rng() % 8); break;
        case 2: if (at < body.size()) body[at] = alphabet[rng() % alphabet.size()]; break;
        default: body.insert(at, body.substr(rng() % body.size(), rng() % 40)); break;  // a repeated piece
      }
    }
    size_t checks = 0;
    const auto check = [&](const std::string& url, const std::string& text) {
      ++checks;
      EXPECT_TRUE(url == kClassifyUrl || url == kChatUrl) << url;
      const nlohmann::json parsed = nlohmann::json::parse(text, nullptr, false);
      if (parsed.is_discarded() || !parsed.is_object()) throw bad_request("The body must be an object.", "body", "invalid_type");
    };
    try {
      const JobSubmission sub = parse_job_submission(body, jsonl, 6, check);
      ++accepted;
      EXPECT_GE(sub.items.size(), 1u);
      EXPECT_LE(sub.items.size(), 6u);
      EXPECT_EQ(checks, sub.items.size());
      std::set<std::string> ids;
      for (const JobItemInput& item : sub.items) {
        EXPECT_FALSE(item.custom_id.empty());
        EXPECT_TRUE(ids.insert(item.custom_id).second) << "custom_id " << item.custom_id << " twice";
        EXPECT_TRUE(item.url == kClassifyUrl || item.url == kChatUrl);
        EXPECT_TRUE(nlohmann::json::parse(item.body, nullptr, false).is_object());
      }
    } catch (const JobItemsInvalid& e) {
      ++refused_items;
      EXPECT_FALSE(e.errors().empty());
      for (const JobItemError& error : e.errors()) {
        EXPECT_GE(error.line, 1u);
        EXPECT_LE(error.line, std::max<size_t>(e.items(), static_cast<size_t>(std::count(body.begin(), body.end(), '\n')) + 1));
        EXPECT_EQ(error.error.status, 400);
      }
      EXPECT_TRUE(nlohmann::json::parse(e.body(), nullptr, false).contains("error")) << e.body();
    } catch (const ApiException& e) {
      ++refused;
      EXPECT_GE(e.error().status, 400);
      EXPECT_LT(e.error().status, 500);
      EXPECT_FALSE(e.error().message.empty());
    }
  }
  // The mutations reached every outcome.
  EXPECT_GT(accepted, 100u);
  EXPECT_GT(refused, 100u);
  EXPECT_GT(refused_items, 100u);
}

}  // namespace
}  // namespace arbiter::api
