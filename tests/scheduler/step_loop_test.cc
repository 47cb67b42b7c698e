// StepLoop on a real tiny random model: greedy outputs through the scheduler, the engine and the
// loop equal greedy_generate, alone and in a batch of 8, with prefix caching on and off; the loop's
// thread mode, drain, timing stats, and recovery from a step that fails; on two ranks, keep-alive steps
// while idle and a broken exchange (CommError) that stops the loop.
#include "scheduler/step_loop.h"

#include <gtest/gtest.h>

#include <functional>
#include <future>
#include <map>
#include <optional>
#include <thread>
#include <memory>
#include <random>

#include "kernels/cpu/cpu_backend.h"
#include "parallel/thread_comm.h"
#include "runtime/generate.h"
#include "runtime/safetensors.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

constexpr int kBlockSize = 4;
constexpr int kBlocks = 160;
constexpr int kStepRows = 48;
constexpr int kLogitRows = 8;
constexpr int kNewTokens = 10;

ModelOptions model_options() {
  ModelOptions o;
  o.max_step_rows = kStepRows;
  o.max_logit_rows = kLogitRows;
  o.kv.block_size = kBlockSize;
  o.kv.full_blocks = kBlocks;
  o.kv.sliding_blocks = kBlocks;
  return o;
}

SchedulerOptions scheduler_options(bool prefix_caching) {
  SchedulerOptions o;
  o.num_ranks = 1;
  o.blocks_per_rank = kBlocks;
  o.block_size = kBlockSize;
  o.max_step_tokens = kStepRows;
  o.max_step_samples = kLogitRows;
  o.max_prefill_chunk = 16;
  o.max_context = 256;
  o.prefix_caching = prefix_caching;
  return o;
}

// A small random checkpoint, one model for the reference (greedy_generate) and one to serve from.
class StepLoopModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = std::make_unique<testing::TempDir>();
    config_ = testing::small_config();
    make_random_model(config_, dir_->path());
  }
  static void TearDownTestSuite() { dir_.reset(); }

  void SetUp() override {
    checkpoint_ = std::make_unique<Checkpoint>(dir_->path());
    reference_model_ = std::make_unique<Model>(config_, *checkpoint_, reference_backend_, model_options());
    model_ = std::make_unique<Model>(config_, *checkpoint_, backend_, model_options());
    engine_ = std::make_unique<Engine>(*model_);
  }

  std::vector<std::vector<int32_t>> prompts() const {
    std::mt19937 rng(5);
    std::vector<int32_t> policy(22);
    for (auto& t : policy) t = static_cast<int32_t>(rng() % static_cast<uint32_t>(config_.vocab_size));
    std::vector<std::vector<int32_t>> out;
    for (int i = 0; i < 8; ++i) {
      std::vector<int32_t> p = i % 4 == 3 ? std::vector<int32_t>{} : policy;  // most share the policy
      const int extra = 3 + static_cast<int>(rng() % 11);
      for (int j = 0; j < extra; ++j) p.push_back(static_cast<int32_t>(rng() % static_cast<uint32_t>(config_.vocab_size)));
      out.push_back(std::move(p));
    }
    return out;
  }

  std::vector<int32_t> reference(const std::vector<int32_t>& prompt) {
    return greedy_generate(*reference_model_, prompt, kNewTokens);
  }

  static RequestSpec request(const std::string& id, const std::vector<int32_t>& prompt,
                             std::map<std::string, std::vector<int32_t>>* outputs) {
    RequestSpec r;
    r.id = id;
    SequenceSpec s;
    s.prompt = prompt;
    s.max_new_tokens = kNewTokens;
    s.stop_tokens = {};  // a random model: run to the length, like greedy_generate
    r.sequences = {s};
    r.on_done = [outputs, id](std::vector<SequenceResult> results) {
      std::vector<int32_t> ids;
      for (const auto& t : results[0].tokens) ids.push_back(t.token);
      (*outputs)[id] = ids;
      EXPECT_EQ(results[0].finish, FinishReason::kLength) << results[0].error;
    };
    return r;
  }

  static std::unique_ptr<testing::TempDir> dir_;
  static ModelConfig config_;
  std::unique_ptr<Checkpoint> checkpoint_;
  CpuBackend reference_backend_{1};
  CpuBackend backend_{1};
  std::unique_ptr<Model> reference_model_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<Engine> engine_;
  StepExchange exchange_{nullptr};  // for one loop per test
};

std::unique_ptr<testing::TempDir> StepLoopModel::dir_;
ModelConfig StepLoopModel::config_;

TEST_F(StepLoopModel, GreedyOutputsEqualGreedyGenerateAloneBatchedAndWithOrWithoutPrefixCaching) {
  const auto all = prompts();
  std::vector<std::vector<int32_t>> want;
  for (const auto& p : all) want.push_back(reference(p));
  for (bool caching : {true, false}) {
    SCOPED_TRACE(caching ? "prefix caching" : "no prefix caching");
    // Alone: one request at a time.
    {
      Scheduler scheduler(scheduler_options(caching));
      StepExchange exchange(nullptr);  // a loop shuts its exchange down when it ends
      StepLoop loop(scheduler, *engine_, exchange);
      std::map<std::string, std::vector<int32_t>> outputs;
      for (size_t i = 0; i < all.size(); ++i) {
        const std::string id = "alone" + std::to_string(i);
        ASSERT_EQ(scheduler.submit(request(id, all[i], &outputs)), SubmitStatus::kAccepted);
        loop.run_until_idle();
        EXPECT_EQ(outputs[id], want[i]) << id;
      }
      const auto st = scheduler.stats();
      if (caching) {
        EXPECT_GT(st.prefix_hits, 0u);
      } else {
        EXPECT_EQ(st.prefix_hits, 0u);
      }
      EXPECT_EQ(st.ranks[0].blocks_used, 0);
    }
    // Batched: all eight at once.
    {
      Scheduler scheduler(scheduler_options(caching));
      StepExchange exchange(nullptr);  // a loop shuts its exchange down when it ends
      StepLoop loop(scheduler, *engine_, exchange);
      std::map<std::string, std::vector<int32_t>> outputs;
      for (size_t i = 0; i < all.size(); ++i)
        ASSERT_EQ(scheduler.submit(request("batch" + std::to_string(i), all[i], &outputs)), SubmitStatus::kAccepted);
      loop.run_until_idle();
      for (size_t i = 0; i < all.size(); ++i) EXPECT_EQ(outputs["batch" + std::to_string(i)], want[i]) << i;
      const auto loop_stats = loop.stats();
      EXPECT_GT(loop_stats.steps, 0u);
      EXPECT_LT(loop_stats.steps, 8u * kNewTokens);  // sequences shared steps
      EXPECT_GT(loop_stats.forward_seconds, 0.0);
      uint64_t histogram = 0;
      for (uint64_t c : loop_stats.step_histogram) histogram += c;
      EXPECT_EQ(histogram, loop_stats.steps);
    }
  }
}

TEST_F(StepLoopModel, PreemptionOnARealModelKeepsGreedyOutputs) {
  const auto all = prompts();
  SchedulerOptions o = scheduler_options(true);
  o.blocks_per_rank = 20;  // 19 blocks of 4 positions for 8 sequences of ~40: they must take turns
  o.max_context = 19 * kBlockSize;
  Scheduler scheduler(o);
  StepLoop loop(scheduler, *engine_, exchange_);
  std::map<std::string, std::vector<int32_t>> outputs;
  for (size_t i = 0; i < all.size(); ++i)
    ASSERT_EQ(scheduler.submit(request("p" + std::to_string(i), all[i], &outputs)), SubmitStatus::kAccepted);
  loop.run_until_idle();
  for (size_t i = 0; i < all.size(); ++i) EXPECT_EQ(outputs["p" + std::to_string(i)], reference(all[i])) << i;
  EXPECT_GT(scheduler.stats().preemptions, 0u);
}

TEST_F(StepLoopModel, ThreadServesUntilDrainedAndSurvivesAFailedStep) {
  SchedulerOptions o = scheduler_options(true);
  o.max_step_tokens = kStepRows + 16;  // more rows than the model takes: a long prefill step fails
  o.max_prefill_chunk = kStepRows + 16;
  Scheduler scheduler(o);
  StepLoop loop(scheduler, *engine_, exchange_);
  loop.start();
  std::promise<SequenceResult> failed;
  RequestSpec bad;
  bad.id = "too-many-rows";
  SequenceSpec s;
  s.prompt.assign(kStepRows + 10, 7);
  s.max_new_tokens = 3;
  bad.sequences = {s};
  bad.on_done = [&failed](std::vector<SequenceResult> r) { failed.set_value(r[0]); };
  ASSERT_EQ(scheduler.submit(std::move(bad)), SubmitStatus::kAccepted);
  auto failed_result = failed.get_future();
  ASSERT_EQ(failed_result.wait_for(std::chrono::seconds(60)), std::future_status::ready);
  const SequenceResult r = failed_result.get();
  EXPECT_EQ(r.finish, FinishReason::kError);
  EXPECT_FALSE(r.error.empty());

  // The loop is still serving.
  const auto prompt = prompts()[0];
  std::map<std::string, std::vector<int32_t>> outputs;
  std::promise<void> done;
  RequestSpec good = request("good", prompt, &outputs);
  auto record = good.on_done;
  good.on_done = [record, &done](std::vector<SequenceResult> results) {
    record(std::move(results));
    done.set_value();
  };
  ASSERT_EQ(scheduler.submit(std::move(good)), SubmitStatus::kAccepted);
  ASSERT_EQ(done.get_future().wait_for(std::chrono::seconds(60)), std::future_status::ready);
  EXPECT_EQ(outputs["good"], reference(prompt));

  // Drain: a request in flight finishes, new ones are refused.
  std::map<std::string, std::vector<int32_t>> late;
  ASSERT_EQ(scheduler.submit(request("in-flight", prompt, &late)), SubmitStatus::kAccepted);
  loop.stop(true);
  EXPECT_EQ(late["in-flight"], reference(prompt));
  EXPECT_EQ(scheduler.submit(request("after", prompt, &late)), SubmitStatus::kShuttingDown);
  EXPECT_GE(loop.stats().steps, 2u * kNewTokens);
}

TEST_F(StepLoopModel, TwoExpertParallelRanksServeTheSameGreedyOutputs) {
  const auto all = prompts();
  std::vector<std::vector<int32_t>> want;
  for (const auto& p : all) want.push_back(reference(p));
  std::map<std::string, std::vector<int32_t>> outputs;
  std::map<std::string, int> ranks;
  bool worker_returned = false;
  run_thread_ranks(
      2,
      [&](Communicator& comm) {
        ModelOptions mo = model_options();
        mo.comm = &comm;
        Checkpoint checkpoint(dir_->path());
        CpuBackend backend(1);
        Model model(config_, checkpoint, backend, mo);
        Engine engine(model);
        StepExchange exchange(&comm);
        if (exchange.rank() != 0) {
          exchange.serve(engine);
          worker_returned = true;
          return;
        }
        SchedulerOptions so = scheduler_options(true);
        so.num_ranks = 2;
        Scheduler scheduler(so);
        StepLoop loop(scheduler, engine, exchange);
        for (size_t i = 0; i < all.size(); ++i) {
          const std::string id = "ep" + std::to_string(i);
          RequestSpec r = request(id, all[i], &outputs);
          auto record = r.on_done;
          r.on_done = [record, &ranks, id](std::vector<SequenceResult> results) {
            ranks[id] = results[0].rank;
            record(std::move(results));
          };
          ASSERT_EQ(scheduler.submit(std::move(r)), SubmitStatus::kAccepted);
        }
        loop.run_until_idle();
        loop.stop(true);  // shuts the worker down
      },
      120);
  EXPECT_TRUE(worker_returned);
  std::map<int, int> per_rank;
  for (size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(outputs["ep" + std::to_string(i)], want[i]) << i;
    ++per_rank[ranks["ep" + std::to_string(i)]];
  }
  EXPECT_GT(per_rank[0], 0);
  EXPECT_GT(per_rank[1], 0);
}

// Two thread ranks whose collectives time out after 0.4 s (set once the models are loaded).
// serve_worker = false: rank 1 never serves, so rank 0's first step cannot complete.
void run_two_ranks_with_short_timeout(const ModelConfig& config, const std::string& dir, bool serve_worker,
                                      const std::function<void(StepLoop&, Scheduler&, Engine&)>& lead,
                                      bool* worker_returned) {
  run_thread_ranks(
      2,
      [&](Communicator& comm) {
        ModelOptions mo = model_options();
        mo.comm = &comm;
        Checkpoint checkpoint(dir);
        CpuBackend backend(1);
        Model model(config, checkpoint, backend, mo);
        Engine engine(model);
        StepExchange exchange(&comm);
        comm.barrier();
        if (comm.rank() == 0) comm.set_timeout(0.4);  // one timeout for the whole group
        comm.barrier();
        if (exchange.rank() != 0) {
          if (serve_worker) exchange.serve(engine);
          *worker_returned = true;
          return;
        }
        SchedulerOptions so = scheduler_options(true);
        so.num_ranks = 2;
        Scheduler scheduler(so);
        StepLoop loop(scheduler, engine, exchange);
        lead(loop, scheduler, engine);
      },
      60);
}

TEST_F(StepLoopModel, AnIdleLoopKeepsTheWorkersWaitingForPlansAlive) {
  const auto prompt = prompts()[0];
  std::map<std::string, std::vector<int32_t>> outputs;
  bool worker_returned = false;
  std::optional<std::string> failure;
  run_two_ranks_with_short_timeout(config_, dir_->path(), true, [&](StepLoop& loop, Scheduler& scheduler, Engine&) {
    loop.start();
    // Idle for several collective timeouts: without keep-alive steps the worker's wait for the
    // next plan would time out and abort the group.
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    failure = loop.failure();
    std::promise<void> done;
    RequestSpec r = request("after-idle", prompt, &outputs);
    auto record = r.on_done;
    r.on_done = [record, &done](std::vector<SequenceResult> results) {
      record(std::move(results));
      done.set_value();
    };
    ASSERT_EQ(scheduler.submit(std::move(r)), SubmitStatus::kAccepted);
    ASSERT_EQ(done.get_future().wait_for(std::chrono::seconds(60)), std::future_status::ready);
    loop.stop(true);
  }, &worker_returned);
  EXPECT_FALSE(failure.has_value()) << *failure;
  EXPECT_EQ(outputs["after-idle"], reference(prompt));
  EXPECT_TRUE(worker_returned);
}

TEST_F(StepLoopModel, ABrokenExchangeStopsTheLoopAndIsReported) {
  const auto prompt = prompts()[0];
  bool worker_returned = false;
  std::optional<std::string> failure;
  std::optional<SequenceResult> result;
  double stop_seconds = -1;
  run_two_ranks_with_short_timeout(config_, dir_->path(), false, [&](StepLoop& loop, Scheduler& scheduler, Engine&) {
    std::promise<SequenceResult> finished;
    RequestSpec r;
    r.id = "lost";
    SequenceSpec s;
    s.prompt = prompt;
    s.max_new_tokens = kNewTokens;
    r.sequences = {s};
    r.on_done = [&finished](std::vector<SequenceResult> results) { finished.set_value(results[0]); };
    ASSERT_EQ(scheduler.submit(std::move(r)), SubmitStatus::kAccepted);
    loop.start();
    auto f = finished.get_future();
    ASSERT_EQ(f.wait_for(std::chrono::seconds(30)), std::future_status::ready);
    result = f.get();
    failure = loop.failure();
    // Stopping does not try to reach the workers through the broken exchange.
    const auto t0 = std::chrono::steady_clock::now();
    loop.stop(false);
    stop_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }, &worker_returned);
  ASSERT_TRUE(result.has_value());
  EXPECT_EQ(result->finish, FinishReason::kError);
  ASSERT_TRUE(failure.has_value()) << "a CommError must stop the loop for good";
  EXPECT_NE(failure->find("exchange with the other ranks failed"), std::string::npos) << *failure;
  EXPECT_EQ(result->error, *failure);
  EXPECT_GE(stop_seconds, 0);
  EXPECT_LT(stop_seconds, 0.3);
  EXPECT_TRUE(worker_returned);
}

}  // namespace
}  // namespace arbiter
