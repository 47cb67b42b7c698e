// `arbiter serve` end to end, as a subprocess on a tiny random model: concurrent classify requests
// all answered; greedy output the same alone, in a full batch, without prefix caching and under
// `mpirun -np 2`; prefix-cache hits in /metrics; every error status over real HTTP; a flood of
// malformed requests; client disconnects cancel; SIGTERM drains; the npm `openai` client; cost
// bounded before work starts (policies and contents that cannot fit are refused fast, with the
// numbers; a client that leaves while its prompts are rendered stops that work); start-up refuses
// contradicting budgets, unwritable or bad policy dbs; read-only policy dbs.
#include <gtest/gtest.h>
#include <httplib.h>
#include <sqlite3.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <filesystem>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "tests/api/serve_process.h"
#include "tests/test_util.h"
#include "tests/unwritable.h"

namespace arbiter {
namespace {

class ApiServe : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = std::make_unique<testing::TempDir>();
    ASSERT_EQ(make_tiny_model(model_dir(), 5), "");
  }
  static void TearDownTestSuite() { tmp_.reset(); }
  static std::string model_dir() { return tmp_->file("model"); }
  static std::string file(const std::string& name) { return tmp_->file(name); }

  static std::vector<std::string> base_args() {
    return {"--model", model_dir(), "--port", "0", "--device", "cpu", "--request-timeout", "120"};
  }

  // Registers p0..p3; returns each one's prefix length in tokens.
  static std::vector<int> register_policies(int port) {
    std::vector<int> prefix;
    for (int i = 0; i < 4; ++i) {
      json p = {{"id", "p" + std::to_string(i)}, {"text", kPolicyTexts[i]}};
      if (i == 2) p["labels"] = {"SAFE", "FRAUD"}, p["violating_labels"] = {"FRAUD"};
      const Reply r = call(port, "POST", "/v1/policies", p.dump());
      EXPECT_TRUE(r.status == 201 || r.status == 200) << r.raw;
      prefix.push_back(r.body.value("prompt_tokens", 0));
    }
    return prefix;
  }

  static json classify_body(const std::string& content, int max_tokens = 6) {
    return {{"content", content}, {"policies", {{{"id", "p0"}}, {{"id", "p1"}}, {{"id", "p2@1"}}, {{"id", "p3"}}}},
            {"reasoning_effort", "low"}, {"max_tokens", max_tokens}};
  }

  // What must be equal between runs of the same request.
  static json essence(const json& response) {
    json out = json::array();
    for (const auto& r : response["results"])
      out.push_back({r["policy_id"], r["verdict"], r["final"], r.value("reasoning", ""), r["finish_reason"],
                     r["usage"]["completion_tokens"], r["usage"]["reasoning_tokens"], r["usage"]["prompt_tokens"]});
    return out;
  }

  static inline std::unique_ptr<testing::TempDir> tmp_;
};

// mode "score": verdict, confidence and every allowed answer's probability from one position per
// policy (two where labels share their start), usage with the forced tokens; the same answer as
// the scores; bad values of mode / score_prefix / answer_format are 400 naming the field.
TEST_F(ApiServe, ScoreModeEndToEnd) {
  ServeProcess server(base_args(), file("score.log"));
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 60)) << server.log();
  const json body = {{"content", "Win a free cruise, click here"},
                     {"mode", "score"},
                     {"policies",
                      {{{"id", "bin"}, {"text", kPolicyTexts[0]}},
                       {{"id", "lab"}, {"text", "Label it."}, {"labels", {"SPAM_LOW", "SPAM_HIGH", "OK"}},
                        {"violating_labels", {"SPAM_HIGH"}}},
                       {{"id", "js"}, {"text", "Answer {\"violation\": 0 or 1}."}}}}};
  const Reply r = call(port, "POST", "/v1/classify", body.dump());
  ASSERT_EQ(r.status, 200) << r.raw << server.log();
  ASSERT_EQ(r.body["results"].size(), 3u);
  int forced_sum = 0, completion_sum = 0;
  for (const auto& p : r.body["results"]) {
    ASSERT_TRUE(p.contains("scores")) << p;
    double total = 0, best = -1;
    std::string argmax;
    for (const auto& [answer, prob] : p["scores"].items()) {
      total += prob.get<double>();
      if (prob.get<double>() > best) best = prob.get<double>(), argmax = answer;
    }
    EXPECT_NEAR(total, 1.0, 1e-6) << p;
    EXPECT_NEAR(p["confidence"].get<double>(), best, 1e-9) << p;
    if (p["verdict"].is_string()) EXPECT_EQ(p["verdict"], argmax);
    else EXPECT_EQ(std::to_string(p["verdict"].get<int>()), argmax);
    EXPECT_EQ(p.value("reasoning", ""), "");
    EXPECT_EQ(p["finish_reason"], "stop");
    EXPECT_GT(p["usage"]["prompt_tokens"].get<int>(), 30);
    forced_sum += p["usage"]["forced_tokens"].get<int>();
    completion_sum += p["usage"]["completion_tokens"].get<int>();
  }
  EXPECT_EQ(r.body["results"][0]["scores"].size(), 2u);
  EXPECT_EQ(r.body["results"][1]["scores"].size(), 3u);
  // 0/1: one position after the 9 forced tokens of the empty analysis and the final header.
  EXPECT_EQ(r.body["results"][0]["usage"]["completion_tokens"], 1);
  EXPECT_EQ(r.body["results"][0]["usage"]["forced_tokens"], 9);
  EXPECT_EQ(r.body["results"][1]["usage"]["completion_tokens"], 2);  // SPAM_LOW / SPAM_HIGH part ways later
  EXPECT_EQ(r.body["results"][2]["usage"]["completion_tokens"], 1);
  EXPECT_GT(r.body["results"][2]["usage"]["forced_tokens"].get<int>(), 9);  // + {"violation":
  EXPECT_EQ(r.body["usage"]["forced_tokens"], forced_sum);
  EXPECT_EQ(r.body["usage"]["completion_tokens"], completion_sum);
  EXPECT_EQ(r.body["usage"]["total_tokens"].get<int>(),
            r.body["usage"]["prompt_tokens"].get<int>() + forced_sum + completion_sum);
  EXPECT_EQ(r.body["results"][1]["violation"], r.body["results"][1]["verdict"] == "SPAM_HIGH");

  // The direct prefix forces the final header alone.
  json direct = body;
  direct["score_prefix"] = "direct";
  const Reply d = call(port, "POST", "/v1/classify", direct.dump());
  ASSERT_EQ(d.status, 200) << d.raw;
  EXPECT_EQ(d.body["results"][0]["usage"]["forced_tokens"], 3);

  for (const auto& [field, value, param] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"mode", "fast", "mode"}, {"mode", "SCORE", "mode"}, {"score_prefix", "none", "score_prefix"}}) {
    json bad = body;
    bad[field] = value;
    const Reply b = call(port, "POST", "/v1/classify", bad.dump());
    EXPECT_EQ(b.status, 400) << b.raw;
    EXPECT_EQ(b.body["error"]["param"], param) << b.raw;
  }
  json bad = body;
  bad["policies"][0]["answer_format"] = "labels";  // no labels
  Reply b = call(port, "POST", "/v1/classify", bad.dump());
  EXPECT_EQ(b.status, 400) << b.raw;
  EXPECT_EQ(b.body["error"]["param"], "policies[0].answer_format") << b.raw;
  bad["policies"][0]["answer_format"] = "yaml";
  b = call(port, "POST", "/v1/classify", bad.dump());
  EXPECT_EQ(b.status, 400) << b.raw;
  EXPECT_EQ(b.body["error"]["param"], "policies[0].answer_format") << b.raw;
}

TEST_F(ApiServe, ConcurrentClassifyBatchInvariantPrefixCachedAndOpenAIClient) {
  ServeProcess server(base_args(), file("main.log"));
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 60)) << server.log();
  const std::vector<int> prefix = register_policies(port);

  // Alone.
  const Reply alone = call(port, "POST", "/v1/classify", classify_body("probe: win a free cruise").dump());
  ASSERT_EQ(alone.status, 200) << alone.raw;
  ASSERT_EQ(alone.body["results"].size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(alone.body["results"][i]["policy_id"], i == 2 ? "p2@1" : "p" + std::to_string(i));
  EXPECT_EQ(alone.body["results"][2]["policy_version"], 1);
  // Registered policies were warmed (at every effort): the first request of each already reuses
  // every whole block of the policy's prefix.
  for (int i = 0; i < 4; ++i) {
    EXPECT_GT(prefix[i], 16);
    EXPECT_GE(alone.body["results"][i]["usage"]["cached_tokens"].get<int>(), prefix[i] / 16 * 16) << alone.raw;
  }
  EXPECT_GT(metric(port, "arbiter_prefix_cache_hit_rate"), 0);
  EXPECT_GT(metric(port, "arbiter_prefix_cache_hits_total"), 0);

  // 64 at once, the probe among them.
  std::vector<Reply> replies(64);
  std::vector<std::thread> threads;
  for (int i = 0; i < 64; ++i)
    threads.emplace_back([&, i] {
      const std::string content = i == 37 ? "probe: win a free cruise" : "message number " + std::to_string(i) + " about cheap watches";
      replies[i] = call(port, "POST", "/v1/classify", classify_body(content).dump());
    });
  for (auto& t : threads) t.join();
  std::set<std::string> ids;
  for (int i = 0; i < 64; ++i) {
    ASSERT_EQ(replies[i].status, 200) << i << ": " << replies[i].raw << server.log();
    ASSERT_EQ(replies[i].body["results"].size(), 4u);
    for (int k = 0; k < 4; ++k)
      EXPECT_EQ(replies[i].body["results"][k]["policy_id"], k == 2 ? "p2@1" : "p" + std::to_string(k));
    ids.insert(replies[i].body["id"].get<std::string>());
  }
  EXPECT_EQ(ids.size(), 64u);
  EXPECT_EQ(essence(replies[37].body), essence(alone.body)) << "batch changed a greedy result";
  EXPECT_GT(metric(port, "arbiter_prefix_cache_token_hit_rate"), 0);
  EXPECT_EQ(metric(port, "arbiter_http_requests_total{endpoint=\"/v1/classify\",status=\"200\"}"), 65);
  EXPECT_GE(metric(port, "arbiter_step_latency_seconds_count"), 1);
  EXPECT_GE(metric(port, "arbiter_kv_blocks_total{rank=\"0\"}"), 1);

  // An inline policy: its first request computes the prefix, the second reuses it.
  const json inline_body = {{"content", "hello"}, {"policies", {{{"id", "x"}, {"text", "An inline policy. Answer 0 or 1."}}}},
                            {"max_tokens", 4}, {"return_reasoning", false}};
  const Reply first = call(port, "POST", "/v1/classify", inline_body.dump());
  const Reply second = call(port, "POST", "/v1/classify", inline_body.dump());
  ASSERT_EQ(second.status, 200) << second.raw;
  EXPECT_FALSE(second.body["results"][0].contains("reasoning"));
  EXPECT_GT(second.body["usage"]["cached_tokens"].get<int>(), first.body["usage"]["cached_tokens"].get<int>());

  // The npm openai client: non-streaming and streaming agree (greedy), reasoning under both names.
  const std::string node_modules = std::string(ARBITER_NODE_DIR) + "/node_modules";
  ASSERT_TRUE(std::filesystem::exists(node_modules + "/openai/package.json"))
      << "the npm openai client is missing: run scripts/fetch-tokenizer.sh";
  const auto node = testing::run_command("NODE_PATH=" + node_modules + " " + ARBITER_NODE + " " + ARBITER_SOURCE_DIR +
                                             "/tests/api/openai_client.cjs http://127.0.0.1:" + std::to_string(port) + "/v1 model",
                                         false);
  ASSERT_EQ(node.status, 0) << node.output << server.log();
  const json o = json::parse(node.output);
  EXPECT_EQ(o["plain"]["object"], "chat.completion");
  EXPECT_EQ(o["plain"]["content"], o["streamed"]["content"]);
  EXPECT_EQ(o["plain"]["reasoning"], o["streamed"]["reasoning"]);
  EXPECT_EQ(o["plain"]["reasoning_content"], o["plain"]["reasoning"]);
  EXPECT_EQ(o["streamed"]["reasoning_content"], o["streamed"]["reasoning"]);
  EXPECT_EQ(o["plain"]["finish_reason"], o["streamed"]["finish_reason"]);
  EXPECT_EQ(o["plain"]["usage"]["completion_tokens"], o["streamed"]["usage"]["completion_tokens"]);
  EXPECT_LE(o["plain"]["usage"]["completion_tokens"].get<int>(), 12);
  EXPECT_EQ(o["streamed"]["role"], "assistant");
  EXPECT_EQ(o["models"], json::array({"model"}));
  EXPECT_EQ(o["error"]["status"], 400);

  // Without prefix caching: the same answers, and no hits.
  ServeProcess cold([] {
    auto a = base_args();
    a.push_back("--no-prefix-cache");
    return a;
  }(), file("cold.log"));
  ASSERT_TRUE(wait_ready(cold.port(), 60)) << cold.log();
  register_policies(cold.port());
  const Reply cold_reply = call(cold.port(), "POST", "/v1/classify", classify_body("probe: win a free cruise").dump());
  ASSERT_EQ(cold_reply.status, 200) << cold_reply.raw;
  EXPECT_EQ(essence(cold_reply.body), essence(alone.body)) << "prefix caching changed a greedy result";
  EXPECT_EQ(cold_reply.body["usage"]["cached_tokens"], 0);
  EXPECT_EQ(metric(cold.port(), "arbiter_prefix_cache_hit_rate"), 0);

  // Under mpirun -np 2 (experts split over two processes): the same answers.
  ServeProcess ep(base_args(), file("mpi.log"), true);
  ASSERT_TRUE(wait_ready(ep.port(), 90)) << ep.log();
  EXPECT_EQ(call(ep.port(), "GET", "/ready").body["ranks"], 2);
  register_policies(ep.port());
  // Expert-load statistics: asked for before the traffic, collected from both ranks by its steps.
  const Reply no_stats = call(ep.port(), "GET", "/v1/stats/experts");
  ASSERT_EQ(no_stats.status, 200) << no_stats.raw;
  std::vector<Reply> ep_replies(8);
  std::vector<std::thread> ep_threads;
  for (int i = 0; i < 8; ++i)
    ep_threads.emplace_back([&, i] {
      ep_replies[i] = call(ep.port(), "POST", "/v1/classify",
                           classify_body(i == 3 ? "probe: win a free cruise" : "other " + std::to_string(i)).dump());
    });
  for (auto& t : ep_threads) t.join();
  for (const Reply& r : ep_replies) ASSERT_EQ(r.status, 200) << r.raw << ep.log();
  EXPECT_EQ(essence(ep_replies[3].body), essence(alone.body)) << "expert parallelism changed a greedy result";
  const Reply stats = call(ep.port(), "GET", "/v1/stats/experts");
  ASSERT_EQ(stats.status, 200) << stats.raw;
  EXPECT_TRUE(stats.body["ready"].get<bool>()) << stats.raw;
  EXPECT_EQ(stats.body["ranks"], 2);
  ASSERT_EQ(stats.body["rank_tokens"].size(), 2u) << stats.raw;
  for (const auto& t : stats.body["rank_tokens"]) EXPECT_GT(t.get<int64_t>(), 0) << stats.raw;
  int64_t per_layer = -1;
  for (const auto& row : stats.body["expert_load"]["layers"]) {
    int64_t sum = 0;
    for (const auto& v : row) sum += v.get<int64_t>();
    if (per_layer < 0) per_layer = sum;
    EXPECT_EQ(sum, per_layer) << "every routed token passes every layer: " << stats.raw;
  }
  EXPECT_GT(per_layer, 0);
  EXPECT_GT(metric(ep.port(), "arbiter_expert_tokens_routed_total"), 0);
  kill(ep.server_pid(), SIGTERM);  // rank 0 drains and releases the worker: mpirun exits 0
  EXPECT_EQ(ep.wait_exit(30), 0) << ep.log();
}

// Raw HTTP on a socket we control (to hang up mid-request).
// Constrained final answers: whatever the tiny random model reasons, every policy that finishes
// normally answers in its format (never a null verdict); the mask can be switched off per request.
TEST_F(ApiServe, ConstrainedAnswersHaveAVerdictWheneverTheGenerationFinishes) {
  ServeProcess server({"--model", model_dir(), "--port", "0", "--device", "cpu", "--request-timeout", "120",
                       "--reasoning-budget", "8,16,32", "--answer-tokens", "32"},
                      file("constrain.log"));
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 60)) << server.log();
  const json policies = {{{"id", "binary"}, {"text", kPolicyTexts[0]}},
                         {{"id", "labels"}, {"text", kPolicyTexts[1]}, {"labels", {"SAFE", "FRAUD"}}, {"violating_labels", {"FRAUD"}}},
                         {{"id", "codes"}, {"text", kPolicyTexts[2]}, {"labels", {"SP0", "SP2", "spam", "spam-bot"}}}};
  int stopped = 0;
  for (const std::string effort : {"low", "medium", "high"})
    for (const std::string content : {"win a free cruise", "meeting at noon", "cheap watches here", "hello friend"}) {
      const Reply r = call(port, "POST", "/v1/classify",
                           json{{"content", content}, {"policies", policies}, {"reasoning_effort", effort}}.dump());
      ASSERT_EQ(r.status, 200) << r.raw;
      for (const json& result : r.body["results"]) {
        if (result["finish_reason"] != "stop") continue;
        ++stopped;
        EXPECT_FALSE(result["verdict"].is_null()) << r.raw;
        EXPECT_FALSE(result.contains("verdict_error")) << r.raw;
        if (result["policy_id"] == "binary") {
          EXPECT_TRUE(result["verdict"] == 0 || result["verdict"] == 1) << r.raw;
        }
        if (result["policy_id"] == "labels") {
          EXPECT_TRUE(result["verdict"] == "SAFE" || result["verdict"] == "FRAUD") << r.raw;
        }
      }
    }
  EXPECT_GE(stopped, 30) << "most of the 36 generations must finish normally";
  // Off per request: the same model answers freely, and malformed answers are null verdicts again.
  int free_null = 0;
  for (const std::string content : {"win a free cruise", "meeting at noon", "cheap watches here", "hello friend"}) {
    const Reply r = call(port, "POST", "/v1/classify",
                         json{{"content", content}, {"policies", policies}, {"reasoning_effort", "low"}, {"constrain", false}}.dump());
    ASSERT_EQ(r.status, 200) << r.raw;
    for (const json& result : r.body["results"]) free_null += result["verdict"].is_null() ? 1 : 0;
  }
  EXPECT_GT(free_null, 0) << "the random model answers malformed without the mask";
  // A non-boolean is refused.
  Reply r = call(port, "POST", "/v1/classify", json{{"content", "hello"}, {"policies", policies}, {"constrain", "yes"}}.dump());
  EXPECT_EQ(r.status, 400) << r.raw;
}

TEST_F(ApiServe, CommandLine) {
  const auto help = testing::run_command(std::string(ARBITER_BINARY) + " serve --help");
  EXPECT_EQ(help.status, 0) << help.output;
  EXPECT_NE(help.output.find("--policy-db"), std::string::npos) << help.output;
  // A model that cannot be loaded ends the command with an error after the address was printed.
  const auto missing = testing::run_command(std::string(ARBITER_BINARY) + " serve --port 0 --model " + file("no-such-model"));
  EXPECT_EQ(missing.status, 1) << missing.output;
  EXPECT_NE(missing.output.find("no-such-model"), std::string::npos) << missing.output;
  const auto typo = testing::run_command(std::string(ARBITER_BINARY) + " serve --model " + model_dir() + " --prot 1");
  EXPECT_EQ(typo.status, 2) << typo.output;
}

TEST_F(ApiServe, ErrorStatusesFloodsAndDisconnects) {
  std::ofstream(file("keys")) << "# keys\nkey-one\n\nkey-two\n";
  auto args = base_args();
  // A small context needs small reasoning budgets (start-up refuses budgets that leave no room).
  args.insert(args.end(), {"--api-key-file", file("keys"), "--max-body-bytes", "65536", "--max-context", "512", "--max-queued", "1",
                           "--reasoning-budget", "16,32,64", "--answer-tokens", "32"});
  ServeProcess server(args, file("errors.log"));
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 60)) << server.log();
  auto post = [&](const std::string& path, const std::string& body, const std::string& k = "key-two") {
    return call(port, "POST", path, body, k);
  };
  auto code = [](const Reply& r) { return r.body["error"]["code"].is_string() ? r.body["error"]["code"].get<std::string>() : ""; };
  const json ok_body = {{"content", "hi"}, {"policies", {{{"id", "a"}, {"text", "Policy A. Answer 0 or 1."}}}}, {"max_tokens", 4}};

  EXPECT_EQ(post("/v1/classify", ok_body.dump()).status, 200);
  EXPECT_EQ(post("/v1/classify", ok_body.dump(), "").status, 401);
  EXPECT_EQ(post("/v1/classify", ok_body.dump(), "key-three").status, 401);
  EXPECT_EQ(call(port, "GET", "/health").status, 200);  // probes need no key
  Reply r = post("/v1/classify", "{\"content\": ");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(code(r), "invalid_json");
  r = post("/v1/classify", R"({"content": "x", "policies": [{"text": 1}]})");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.body["error"]["param"], "policies[0].text");
  EXPECT_EQ(post("/v1/classify", R"({"content": "", "policies": [{"text": "p"}]})").status, 400);
  EXPECT_EQ(post("/v1/classify", R"({"content": "x", "policies": []})").status, 400);
  r = post("/v1/classify", R"({"content": "x", "policies": [{"id": "missing"}]})");
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(code(r), "policy_not_found");
  std::string long_content;
  for (int i = 0; i < 700; ++i) long_content += " word" + std::to_string(i);
  r = post("/v1/classify", json{{"content", long_content}, {"policies", {{{"text", "p"}}}}}.dump());
  EXPECT_EQ(r.status, 400) << r.raw;
  EXPECT_EQ(code(r), "context_length_exceeded");
  r = post("/v1/chat/completions", json{{"messages", {{{"role", "user"}, {"content", long_content}}}}}.dump());
  EXPECT_EQ(r.status, 400) << r.raw;
  EXPECT_EQ(code(r), "context_length_exceeded");
  r = post("/v1/classify", json{{"content", std::string(70000, 'x')}, {"policies", {{{"text", "p"}}}}}.dump());
  EXPECT_EQ(r.status, 413) << r.raw;
  EXPECT_EQ(code(r), "request_too_large");
  json late = ok_body;
  late["timeout"] = 1e-6;
  late["max_tokens"] = 64;
  r = post("/v1/classify", late.dump());
  EXPECT_EQ(r.status, 504) << r.raw;
  EXPECT_EQ(code(r), "timeout");
  EXPECT_EQ(post("/v1/chat/completions", json{{"model", "other"}, {"messages", {{{"role", "user"}, {"content", "x"}}}}}.dump()).status, 404);

  // Queue full: only one request may wait for a rank; a burst gets 429 with Retry-After for the rest.
  std::vector<Reply> burst(24);
  {
    std::vector<std::thread> threads;
    json many = {{"content", "burst"}, {"max_tokens", 8}, {"policies", json::array()}};
    for (int k = 0; k < 4; ++k) many["policies"].push_back({{"id", "q" + std::to_string(k)}, {"text", kPolicyTexts[k]}});
    for (int i = 0; i < 24; ++i) threads.emplace_back([&, i] { burst[i] = post("/v1/classify", many.dump()); });
    for (auto& t : threads) t.join();
  }
  int ok = 0, full = 0;
  for (const Reply& b : burst) {
    if (b.status == 200) ++ok;
    if (b.status == 429) {
      ++full;
      EXPECT_EQ(code(b), "queue_full");
      EXPECT_EQ(b.retry_after, "1");
    }
    EXPECT_TRUE(b.status == 200 || b.status == 429) << b.raw;
  }
  EXPECT_GE(ok, 1);
  EXPECT_GE(full, 1);

  // A flood of malformed requests from several clients, then a normal request.
  {
    std::vector<std::thread> threads;
    std::atomic<int> bad{0};
    for (int t = 0; t < 8; ++t)
      threads.emplace_back([&, t] {
        std::mt19937 rng(static_cast<unsigned>(t));
        for (int i = 0; i < 40; ++i) {
          std::string junk(rng() % 300, '\0');
          for (char& c : junk) c = static_cast<char>(rng() % 256);
          const char* paths[] = {"/v1/classify", "/v1/chat/completions", "/v1/policies"};
          const Reply j = post(paths[i % 3], junk);
          if (j.status < 400 || j.status >= 500 || !j.body.contains("error")) ++bad;
        }
      });
    for (auto& t : threads) t.join();
    EXPECT_EQ(bad.load(), 0);
  }
  EXPECT_EQ(post("/v1/classify", ok_body.dump()).status, 200);

  // Hanging up cancels the work: a stream after its first chunk, a classify right after sending.
  const double cancelled_before = std::max(0.0, metric(port, "arbiter_sequences_finished_total{reason=\"cancelled\"}"));
  {
    const int fd = connect_to(port);
    ASSERT_GE(fd, 0);
    const std::string auth_body =
        json{{"messages", {{{"role", "user"}, {"content", "tell me a long story"}}}}, {"max_tokens", 400}, {"stream", true}}.dump();
    const std::string req = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-one\r\nContent-Length: " +
                            std::to_string(auth_body.size()) + "\r\n\r\n" + auth_body;
    ASSERT_EQ(write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
    std::string got;
    char buf[512];
    while (got.find("data: ") == std::string::npos) {
      const ssize_t n = read(fd, buf, sizeof(buf));
      if (n <= 0) break;
      got.append(buf, static_cast<size_t>(n));
    }
    EXPECT_NE(got.find("text/event-stream"), std::string::npos) << got;
    close(fd);
  }
  {
    const int fd = connect_to(port);
    ASSERT_GE(fd, 0);
    const std::string body = json{{"content", "x"}, {"policies", {{{"text", "p"}}}}, {"max_tokens", 400}}.dump();
    const std::string req = "POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-one\r\nContent-Length: " +
                            std::to_string(body.size()) + "\r\n\r\n" + body;
    // The stream's work is cancelled first; then the classify hangs up once its sequence is in the
    // scheduler (on a loaded machine a fixed wait could end before it was even read, and a request
    // dropped before admission has no work to cancel).
    const auto stream_gone = Clock::now() + std::chrono::seconds(20);
    while (metric(port, "arbiter_sequences_finished_total{reason=\"cancelled\"}") < cancelled_before + 1 && Clock::now() < stream_gone)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ASSERT_EQ(write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
    const auto admitted = Clock::now() + std::chrono::seconds(20);
    while (metric(port, "arbiter_running_sequences") + metric(port, "arbiter_waiting_sequences") < 1 && Clock::now() < admitted)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    close(fd);
  }
  const auto until = Clock::now() + std::chrono::seconds(20);
  while (metric(port, "arbiter_sequences_finished_total{reason=\"cancelled\"}") < cancelled_before + 2 && Clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_GE(metric(port, "arbiter_sequences_finished_total{reason=\"cancelled\"}"), cancelled_before + 2) << server.log();

}

TEST_F(ApiServe, SigtermDrainsRequestsInFlightAndPoliciesSurviveARestart) {
  auto args = base_args();
  args.insert(args.end(), {"--policy-db", file("policies.db")});
  auto server = std::make_unique<ServeProcess>(args, file("drain.log"));
  const int port = server->port();
  ASSERT_TRUE(wait_ready(port, 60)) << server->log();
  ASSERT_EQ(call(port, "POST", "/v1/policies", json{{"id", "kept"}, {"text", "A policy that must survive."}}.dump()).status, 201);
  ASSERT_EQ(call(port, "POST", "/v1/policies", json{{"id", "kept"}, {"text", "Its second version."}}.dump()).status, 201);
  auto submitted = [&] { return metric(port, "arbiter_running_sequences") + metric(port, "arbiter_waiting_sequences"); };
  // The registrations' warm-up sequences (one per version and effort) end first, so that they are not
  // counted as requests below.
  const auto warmed_by = Clock::now() + std::chrono::seconds(20);
  while (submitted() > 0 && Clock::now() < warmed_by) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::vector<Reply> inflight(6);
  std::vector<std::thread> threads;
  for (int i = 0; i < 6; ++i)
    threads.emplace_back([&, i] {
      const json body = {{"content", "in flight " + std::to_string(i)}, {"policies", {{{"text", "Policy A. Answer 0 or 1."}}}},
                         {"max_tokens", 160}};
      inflight[i] = call(port, "POST", "/v1/classify", body.dump());
    });
  // Every request is with the scheduler before the signal.
  const auto until = Clock::now() + std::chrono::seconds(20);
  // (Checked on the reading that ended the wait: a second reading may already miss finished ones.)
  double seen = 0;
  while ((seen = submitted()) < 6 && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  EXPECT_GE(seen, 6);
  kill(server->pid(), SIGTERM);
  for (auto& t : threads) t.join();
  for (const Reply& f : inflight) EXPECT_EQ(f.status, 200) << f.raw << server->log();
  EXPECT_EQ(server->wait_exit(30), 0) << server->log();
  server.reset();

  // Restarted on the same policy db: both versions are back.
  ServeProcess again(args, file("restart.log"));
  ASSERT_TRUE(wait_ready(again.port(), 60)) << again.log();
  const Reply kept = call(again.port(), "GET", "/v1/policies/kept");
  ASSERT_EQ(kept.status, 200) << kept.raw;
  EXPECT_EQ(kept.body["version"], 2);
  EXPECT_EQ(kept.body["versions"], json::array({1, 2}));
  EXPECT_EQ(call(again.port(), "GET", "/v1/policies/kept@1").body["text"], "A policy that must survive.");
  const Reply r = call(again.port(), "POST", "/v1/classify",
                       json{{"content", "x"}, {"policies", {{{"id", "kept"}}}}, {"max_tokens", 2}}.dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body["results"][0]["policy_version"], 2);
  // Loaded policies are warmed at start like registered ones.
  EXPECT_GE(r.body["results"][0]["usage"]["cached_tokens"].get<int>(), kept.body["prompt_tokens"].get<int>() / 16 * 16) << r.raw;
}

std::string words(size_t count) {
  std::string s;
  for (size_t i = 0; i < count; ++i) s += (i ? " word" : "word") + std::to_string(i % 97);
  return s;
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

TEST_F(ApiServe, CostIsBoundedBeforeWorkStarts) {
  ServeProcess server(base_args(), file("bounds.log"));  // the default context (8192) and budgets
  const int port = server.port();
  ASSERT_TRUE(wait_ready(port, 60)) << server.log();
  auto code = [](const Reply& r) { return r.body["error"]["code"].is_string() ? r.body["error"]["code"].get<std::string>() : ""; };
  auto message = [](const Reply& r) { return r.body["error"]["message"].is_string() ? r.body["error"]["message"].get<std::string>() : ""; };

  // A policy of 200,000 words: refused at once with the numbers (it used to be stored and warmed
  // for ~20 s although no prompt with it fits), and not stored.
  auto t0 = Clock::now();
  Reply r = call(port, "POST", "/v1/policies", json{{"id", "huge"}, {"text", words(200000)}}.dump());
  EXPECT_LT(seconds_since(t0), 3.0);
  EXPECT_EQ(r.status, 413) << r.raw;
  EXPECT_EQ(code(r), "policy_too_long");
  EXPECT_EQ(r.body["error"]["param"], "text");
  EXPECT_NE(message(r).find("takes at least"), std::string::npos) << r.raw;
  EXPECT_NE(message(r).find("518 tokens for the reasoning and the answer (low reasoning effort)"), std::string::npos) << r.raw;
  EXPECT_NE(message(r).find("the context is 8192 tokens"), std::string::npos) << r.raw;
  EXPECT_EQ(call(port, "GET", "/v1/policies/huge").status, 404);
  ASSERT_EQ(call(port, "POST", "/v1/policies", json{{"id", "small"}, {"text", "Answer 0 or 1."}}.dump()).status, 201);

  // The same policy inline: 413 before any scheduling, naming the policy.
  t0 = Clock::now();
  r = call(port, "POST", "/v1/classify",
           json{{"content", "hi"}, {"policies", {{{"id", "small"}}, {{"id", "big"}, {"text", words(200000)}}}}}.dump());
  EXPECT_LT(seconds_since(t0), 3.0);
  EXPECT_EQ(r.status, 413) << r.raw;
  EXPECT_EQ(code(r), "policy_too_long");
  EXPECT_EQ(r.body["error"]["param"], "policies[1].text");
  EXPECT_NE(message(r).find("Policy 'big'"), std::string::npos) << r.raw;
  EXPECT_NE(message(r).find("1286 tokens for the reasoning and the answer (medium reasoning effort)"), std::string::npos) << r.raw;

  // 1 MB of content under 32 policies: tokenized once and only as far as it can fit (this took 17 s
  // of tokenizing, 32 times over, on this kind of machine).
  json many = {{"content", std::string()}, {"policies", json::array()}};
  for (int i = 0; i < 32; ++i) many["policies"].push_back({{"id", "p" + std::to_string(i)}, {"text", "Policy " + std::to_string(i) + ". Answer 0 or 1."}});
  std::string content;
  while (content.size() < (1u << 20)) content += "win a free cruise now, click here! ";
  many["content"] = content;
  const double lookups_before = metric(port, "arbiter_prefix_cache_lookups_total");
  t0 = Clock::now();
  r = call(port, "POST", "/v1/classify", many.dump());
  const double took = seconds_since(t0);
  EXPECT_LT(took, 3.0) << "1 MB x 32 policies took " << took << " s";
  EXPECT_EQ(r.status, 400) << r.raw;
  EXPECT_EQ(code(r), "context_length_exceeded");
  EXPECT_EQ(r.body["error"]["param"], "content");
  EXPECT_NE(message(r).find("The content takes more than"), std::string::npos) << r.raw;
  EXPECT_NE(message(r).find("1286 tokens for the reasoning and the answer in the context of 8192 tokens"), std::string::npos) << r.raw;
  EXPECT_EQ(metric(port, "arbiter_prefix_cache_lookups_total"), lookups_before) << "a sequence reached the scheduler";
  EXPECT_EQ(metric(port, "arbiter_classify_prompts_stopped_total{reason=\"too_long\"}"), 2);

  // The deadline counts from receipt: rendering that outlives it ends with 504 before scheduling.
  many["timeout"] = 1e-6;
  r = call(port, "POST", "/v1/classify", many.dump());
  EXPECT_EQ(r.status, 504) << r.raw;
  EXPECT_EQ(code(r), "timeout");
  EXPECT_EQ(metric(port, "arbiter_classify_prompts_stopped_total{reason=\"deadline\"}"), 1);
  many.erase("timeout");

  // A client that hangs up as soon as it sent 4 MB: the rendering stops (499), nothing is scheduled.
  content.clear();
  while (content.size() < 4000000) content += "win a free cruise now, click here! ";
  many["content"] = content;
  {
    const std::string body = many.dump();
    const int fd = connect_to(port);
    ASSERT_GE(fd, 0);
    const std::string head = "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
                             std::to_string(body.size()) + "\r\n\r\n";
    const std::string req = head + body;
    size_t sent = 0;
    while (sent < req.size()) {
      const ssize_t n = write(fd, req.data() + sent, req.size() - sent);
      ASSERT_GT(n, 0);
      sent += static_cast<size_t>(n);
    }
    close(fd);
  }
  const auto until = Clock::now() + std::chrono::seconds(20);
  while (metric(port, "arbiter_classify_prompts_stopped_total{reason=\"client_gone\"}") < 1 && Clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(metric(port, "arbiter_classify_prompts_stopped_total{reason=\"client_gone\"}"), 1) << server.log();
  EXPECT_EQ(metric(port, "arbiter_http_requests_total{endpoint=\"/v1/classify\",status=\"499\"}"), 1);
  EXPECT_EQ(metric(port, "arbiter_prefix_cache_lookups_total"), lookups_before);

  // Requests that fit are still answered.
  r = call(port, "POST", "/v1/classify", json{{"content", "hi"}, {"policies", {{{"id", "small"}}}}, {"max_tokens", 2}}.dump());
  EXPECT_EQ(r.status, 200) << r.raw;
}

// Writes a row into a policy db directly (as another tool or a hand edit might).
void insert_policy_row(const std::string& db, const std::string& values) {
  sqlite3* raw = nullptr;
  ASSERT_EQ(sqlite3_open(db.c_str(), &raw), SQLITE_OK);
  const std::string sql =
      "INSERT INTO policies (id, version, text, labels, violating_labels, description, created) VALUES (" + values + ", '', 0)";
  char* error = nullptr;
  const int rc = sqlite3_exec(raw, sql.c_str(), nullptr, nullptr, &error);
  const std::string why = error ? error : "";
  sqlite3_free(error);
  sqlite3_close(raw);
  ASSERT_EQ(rc, SQLITE_OK) << why;
}

TEST_F(ApiServe, StartUpRefusesContradictionsAndPolicyDbsItCannotServe) {
  const std::string serve = std::string(ARBITER_BINARY) + " serve --port 0 --device cpu --model " + model_dir();
  // High effort's default budget (4096) + the answer fill a context of 4096: no request at high
  // effort could ever answer.
  auto r = testing::run_command(serve + " --max-context 4096");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("reasoning effort 'high'"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("4358 generated tokens"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("max context of 4096"), std::string::npos) << r.output;
  r = testing::run_command(serve + " --max-context 600 --reasoning-budget 64,128,600");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("reasoning effort 'high'"), std::string::npos) << r.output;
  r = testing::run_command(serve + " --reasoning-budget 1,2");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--reasoning-budget takes N or LOW,MEDIUM,HIGH"), std::string::npos) << r.output;
  r = testing::run_command(serve + " --policy-db-readonly");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--policy-db-readonly needs --policy-db"), std::string::npos) << r.output;

  // Policy dbs: a row the API could not address, an unwritable file or folder, a missing file in
  // read-only mode.
  const std::string db = file("startup.db");
  {
    ServeProcess first({"--model", model_dir(), "--port", "0", "--device", "cpu", "--policy-db", db}, file("startup.log"));
    ASSERT_TRUE(wait_ready(first.port(), 60)) << first.log();
    ASSERT_EQ(call(first.port(), "POST", "/v1/policies", json{{"id", "ok"}, {"text", "Answer 0 or 1."}}.dump()).status, 201);
  }
  insert_policy_row(db, "'spam@2', 1, 'x', '[]', '[]'");
  r = testing::run_command(serve + " --policy-db " + db);
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("the row with id 'spam@2' and version 1 cannot be served"), std::string::npos) << r.output;
  const std::string db2 = file("startup2.db");
  std::filesystem::copy_file(db, db2);
  insert_policy_row(db2, "'big', 4294967296, 'x', '[]', '[]'");
  r = testing::run_command(serve + " --policy-db " + db2 + " --policy-db-readonly");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("version 4294967296 cannot be served"), std::string::npos) << r.output;
  r = testing::run_command(serve + " --policy-db " + file("missing.db") + " --policy-db-readonly");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("does not exist"), std::string::npos) << r.output;
  const std::string folder = file("ro-folder");
  std::filesystem::create_directories(folder);
  {
    testing::Unwritable locked(folder, true);
    if (locked.ok()) {
      r = testing::run_command(serve + " --policy-db " + folder + "/policies.db");
      EXPECT_NE(r.status, 0) << r.output;
      EXPECT_NE(r.output.find("must be writable"), std::string::npos) << r.output;
    }
  }
}

TEST_F(ApiServe, ReadOnlyPolicyDbUnfitPoliciesAndHighEffortAnswers) {
  const std::string db = file("readonly.db");
  {
    // A larger context stores a policy that a later, smaller one cannot serve.
    ServeProcess wide({"--model", model_dir(), "--port", "0", "--device", "cpu", "--policy-db", db, "--max-context", "16384"},
                      file("wide.log"));
    ASSERT_TRUE(wait_ready(wide.port(), 60)) << wide.log();
    ASSERT_EQ(call(wide.port(), "POST", "/v1/policies", json{{"id", "kept"}, {"text", kPolicyTexts[0]}}.dump()).status, 201);
    const Reply r = call(wide.port(), "POST", "/v1/policies", json{{"id", "long"}, {"text", words(1500)}}.dump());
    ASSERT_EQ(r.status, 201) << r.raw;
    ASSERT_GT(r.body["prompt_tokens"].get<int>(), 2048);
  }
  const std::vector<std::string> small = {"--model", model_dir(), "--port", "0", "--device", "cpu", "--request-timeout", "120",
                                          "--policy-db", db, "--max-context", "2048", "--reasoning-budget", "64,128,512",
                                          "--answer-tokens", "32"};
  {
    ServeProcess narrow(small, file("narrow.log"));
    const int port = narrow.port();
    ASSERT_TRUE(wait_ready(port, 60)) << narrow.log();
    // Loaded from the db, not warmed, with a warning; kept, and refused by classify with 413.
    EXPECT_NE(narrow.log().find("warning: policy 'long' version 1 is not warmed"), std::string::npos) << narrow.log();
    EXPECT_EQ(call(port, "GET", "/v1/policies/long").status, 200);
    Reply r = call(port, "POST", "/v1/classify", json{{"content", "x"}, {"policies", {{{"id", "long"}}}}}.dump());
    EXPECT_EQ(r.status, 413) << r.raw;
    EXPECT_EQ(r.body["error"]["param"], "policies[0].id");
    EXPECT_NE(r.body["error"]["message"].get<std::string>().find("the context is 2048 tokens"), std::string::npos) << r.raw;
    // High effort with its whole budget: the reasoning is closed and the model answers in the final
    // channel (a budget that filled the context would end it with no final answer).
    r = call(port, "POST", "/v1/classify",
             json{{"content", "win a free cruise"}, {"policies", {{{"id", "kept"}}}}, {"reasoning_effort", "high"}, {"return_reasoning", false}}.dump());
    ASSERT_EQ(r.status, 200) << r.raw;
    const json& result = r.body["results"][0];
    EXPECT_TRUE(result["reasoning_truncated"].get<bool>()) << r.raw;
    EXPECT_EQ(result["usage"]["reasoning_tokens"], 512) << r.raw;
    EXPECT_EQ(result.value("verdict_error", "").find("no final answer"), std::string::npos) << r.raw;
  }
  {
    testing::Unwritable locked(db, false);
    if (!locked.ok()) GTEST_SKIP() << "cannot make a file unwritable here";
    std::string serve = std::string(ARBITER_BINARY) + " serve";
    for (const auto& a : small) serve += " '" + a + "'";
    const auto r = testing::run_command(serve);
    EXPECT_NE(r.status, 0) << r.output;
    EXPECT_NE(r.output.find("policy db " + db + " is read-only"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("--policy-db-readonly"), std::string::npos) << r.output;

    auto args = small;
    args.push_back("--policy-db-readonly");
    ServeProcess readonly(args, file("readonly.log"));
    const int port = readonly.port();
    ASSERT_TRUE(wait_ready(port, 60)) << readonly.log();
    EXPECT_EQ(call(port, "GET", "/v1/policies").body["data"].size(), 2u);
    Reply p = call(port, "POST", "/v1/policies", json{{"id", "new"}, {"text", "Answer 0 or 1."}}.dump());
    EXPECT_EQ(p.status, 403) << p.raw;
    EXPECT_EQ(p.body["error"]["code"], "policies_read_only");
    p = call(port, "DELETE", "/v1/policies/kept");
    EXPECT_EQ(p.status, 403) << p.raw;
    EXPECT_EQ(call(port, "GET", "/v1/policies/kept").status, 200);
    p = call(port, "POST", "/v1/classify", json{{"content", "x"}, {"policies", {{{"id", "kept"}}}}, {"max_tokens", 2}}.dump());
    EXPECT_EQ(p.status, 200) << p.raw;
  }
}

}  // namespace
}  // namespace arbiter
