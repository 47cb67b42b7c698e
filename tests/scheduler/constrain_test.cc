// Constrained final answers (runtime/verdict_grammar.h): the grammars against a brute-force scan of
// the vocabulary, the tracker's reading of harmony, the engine's masked sampling, and classification
// on many tiny random models (with the real tokenizer) where every normally finished generation must
// carry a verdict, alone or batched, while the analysis channel and the unconstrained path stay as
// they were.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_backend.h"
#include "runtime/config.h"
#include "runtime/engine.h"
#include "runtime/generate.h"
#include "runtime/make_model.h"
#include "runtime/model.h"
#include "runtime/safeguard.h"
#include "runtime/tokenizer.h"
#include "runtime/verdict_grammar.h"
#include "runtime/weights.h"
#include "scheduler/classify.h"
#include "scheduler/scheduler.h"
#include "scheduler/step_loop.h"
#include "tests/test_util.h"

namespace arbiter {
namespace {

std::string tokenizer_dir() {
  const char* env = std::getenv("ARBITER_TOKENIZER_DIR");
  return env && *env ? env : ARBITER_TOKENIZER_DIR;
}

const Tokenizer& tokenizer() {
  static const Tokenizer t = [] {
    const std::string path = tokenizer_dir() + "/tokenizer.json";
    if (!std::filesystem::exists(path))
      throw std::runtime_error(path + " is missing: run scripts/fetch-tokenizer.sh (or set ARBITER_TOKENIZER_DIR)");
    return Tokenizer::from_hf_json(path);
  }();
  return t;
}

const std::vector<std::vector<std::string>>& label_sets() {
  static const std::vector<std::vector<std::string>> sets = {
      {},  // no labels: 0/1 or the JSON verdict
      {"SAFE", "UNSAFE"},
      {"SP0", "SP2", "spam", "spam-bot", "INVALID + ESCALATE"},
      {"违规", "合规"},
  };
  return sets;
}

// The label sets alone: formats with a finite list of answers.
std::vector<std::vector<std::string>> finite_sets() {
  std::vector<std::vector<std::string>> sets;
  for (const auto& labels : label_sets())
    if (!labels.empty()) sets.push_back(labels);
  return sets;
}

// The bytes of a token ("" for specials, which never spell an answer).
std::string bytes_of(int32_t id) {
  if (tokenizer().is_special(id)) return "";
  const auto b = tokenizer().token_bytes(id);
  return b ? std::string(*b) : std::string();
}

bool is_answer_prefix(const std::vector<std::string>& answers, const std::string& text) {
  for (const auto& a : answers)
    if (a.size() >= text.size() && a.compare(0, text.size(), text) == 0) return true;
  return false;
}

// ---------------------------------------------------------------------------------------------
// Grammars.

TEST(VerdictGrammar, AnswersPerFormat) {
  const AnswerAutomaton binary = verdict_automaton({});
  for (const std::string a : {"0", "1", " 0", " 1", "{\"violation\": 0}", "{\"violation\":1}", " {\"violation\": 1}"})
    EXPECT_TRUE(binary.accepts(a)) << a;
  EXPECT_TRUE(verdict_answers({}).empty());  // free text: no finite list
  EXPECT_EQ(verdict_answers({"A", "B"}), (std::vector<std::string>{"A", "B", " A", " B"}));
  // Labels the parser could never match have no spelling; none left: nothing to constrain.
  EXPECT_EQ(verdict_answers({"", " X", "Y\n", "Z"}), (std::vector<std::string>{"Z", " Z"}));
  EXPECT_TRUE(verdict_answers({" X"}).empty());
  EXPECT_EQ(VerdictGrammar::for_labels(tokenizer(), {" X"}), nullptr);
  // Every answer is one the classifier's parsers accept.
  for (const auto& labels : finite_sets())
    for (const auto& a : verdict_answers(labels)) {
      const Verdict v = parse_label_verdict(a, labels);
      EXPECT_TRUE(v.ok()) << a << ": " << v.error;
    }
}

// Every state's allowed ids equal a scan of the whole vocabulary: the tokens whose bytes keep the
// text a prefix of some answer, plus the stop token exactly where the text is a whole answer.
TEST(VerdictGrammar, EveryStateAdmitsExactlyTheTokensThatStayInsideAnAnswer) {
  for (const auto& labels : finite_sets()) {
    const auto answers = verdict_answers(labels);
    const VerdictGrammar g(tokenizer(), answers);
    std::vector<std::string> vocab(static_cast<size_t>(tokenizer().vocab_size()));
    for (int32_t id = 0; id < tokenizer().vocab_size(); ++id) vocab[static_cast<size_t>(id)] = bytes_of(id);
    for (int state = 0; state < static_cast<int>(g.num_states()); ++state) {
      const std::string& text = g.text(state);
      std::vector<int32_t> expected;
      for (int32_t id = 0; id < tokenizer().vocab_size(); ++id) {
        const std::string& b = vocab[static_cast<size_t>(id)];
        if (!b.empty() && is_answer_prefix(answers, text + b)) expected.push_back(id);
      }
      const bool whole = std::find(answers.begin(), answers.end(), text) != answers.end();
      if (whole) expected.push_back(harmony_ids::kReturn);
      std::sort(expected.begin(), expected.end());
      const auto allowed = g.allowed(state);
      EXPECT_EQ(std::vector<int32_t>(allowed.begin(), allowed.end()), expected) << "state '" << text << "'";
      EXPECT_EQ(g.complete(state), whole) << text;
      // Each allowed token leads to the state of the longer text.
      for (const int32_t t : allowed) {
        const int next = g.advance(state, t);
        if (t == harmony_ids::kReturn) {
          EXPECT_EQ(next, VerdictGrammar::kDone);
        } else {
          ASSERT_GE(next, 0);
          EXPECT_EQ(g.text(next), text + vocab[static_cast<size_t>(t)]);
        }
      }
      // And anything else is refused.
      EXPECT_EQ(g.advance(state, harmony_ids::kEnd), VerdictGrammar::kInvalid);
      if (!whole) {
        EXPECT_EQ(g.advance(state, harmony_ids::kReturn), VerdictGrammar::kInvalid);
      }
    }
    EXPECT_TRUE(g.allowed(VerdictGrammar::kDone).empty());
    EXPECT_TRUE(g.allowed(VerdictGrammar::kInvalid).empty());
  }
}

// Each answer's canonical tokenization is accepted token by token, the stop token only at the end
// (or where a shorter answer ends), and then nothing.
TEST(VerdictGrammar, EveryAnswerIsAcceptedTokenByTokenWithTheStopOnlyAtItsEnd) {
  for (const auto& labels : finite_sets()) {
    const auto answers = verdict_answers(labels);
    const VerdictGrammar g(tokenizer(), answers);
    for (const std::string& a : answers) {
      int state = g.start();
      for (const int32_t t : tokenizer().encode(a)) {
        const auto allowed = g.allowed(state);
        ASSERT_TRUE(std::binary_search(allowed.begin(), allowed.end(), t)) << a << " at '" << g.text(state) << "'";
        const bool stop_ok = std::binary_search(allowed.begin(), allowed.end(), harmony_ids::kReturn);
        EXPECT_EQ(stop_ok, std::find(answers.begin(), answers.end(), g.text(state)) != answers.end());
        state = g.advance(state, t);
        ASSERT_GE(state, 0) << a;
      }
      EXPECT_EQ(g.text(state), a);
      EXPECT_TRUE(g.complete(state));
      const auto allowed = g.allowed(state);
      EXPECT_TRUE(std::binary_search(allowed.begin(), allowed.end(), harmony_ids::kReturn));
      EXPECT_EQ(g.advance(state, harmony_ids::kReturn), VerdictGrammar::kDone);
    }
  }
}

// Random walks through the masks always end in a parseable verdict, within the tokens they were
// given: with a few tokens left only the closing set is offered, so free text ends in time.
TEST(VerdictGrammar, RandomWalksEndInParseableVerdictsWithinTheirTokens) {
  std::mt19937 rng(7);
  for (const auto& labels : label_sets()) {
    const auto g = VerdictGrammar::for_labels(tokenizer(), labels);
    ASSERT_TRUE(g);
    int long_walks = 0;
    for (int walk = 0; walk < 300; ++walk) {
      const int budget = g->distance(g->start()) + 1 + static_cast<int>(rng() % 60);
      int state = g->start();
      std::string text;
      int steps = 0;
      for (; state >= 0; ++steps) {
        ASSERT_LT(steps, budget) << text;
        const AnswerMask mask = g->mask(state, budget - steps);
        ASSERT_FALSE(mask.allowed.empty());
        int32_t t;
        if (!mask.refused.empty() && rng() % 4 != 0) {
          // Most of the vocabulary: draw until a permitted token comes up.
          std::vector<char> refused(static_cast<size_t>(tokenizer().vocab_size()), 0);
          for (const int32_t r : mask.refused) refused[static_cast<size_t>(r)] = 1;
          do t = static_cast<int32_t>(rng() % static_cast<uint32_t>(tokenizer().num_ranks()));
          while (refused[static_cast<size_t>(t)]);
        } else {
          t = mask.allowed[std::uniform_int_distribution<size_t>(0, mask.allowed.size() - 1)(rng)];
        }
        ASSERT_TRUE(g->allows(state, t)) << text;
        if (t != harmony_ids::kReturn) text += bytes_of(t);
        state = g->advance(state, t);
      }
      ASSERT_EQ(state, VerdictGrammar::kDone);
      if (steps > 8) ++long_walks;
      const bool json = text.find('{') != std::string::npos;
      const Verdict v = !labels.empty() ? parse_label_verdict(text, labels)
                                        : (json ? parse_json_verdict(text) : parse_binary_verdict(text));
      EXPECT_TRUE(v.ok()) << text << ": " << v.error;
    }
    if (labels.empty()) {
      EXPECT_GT(long_walks, 0) << "the JSON verdict's free text should make some walks long";
    }
  }
}

// The JSON verdict's automaton against the parser: every verdict the guide's shape allows (random
// members, strings with escapes and any Unicode, numbers, compact or indented) is accepted, and
// every text it accepts (valid verdicts mutated at random, byte by byte) is one the parser reads.
TEST(AnswerAutomaton, JsonVerdictAcceptsTheGuideShapeAndOnlyParseableText) {
  const AnswerAutomaton a = verdict_automaton({});
  std::mt19937 rng(3);
  auto random_text = [&] {
    static const std::vector<std::string> pieces = {"H2.f", " ", "quote \"", "back\\slash", "\n", "\t", "é",
                                                    "违规", "🙂", "ctl\x01", "/", "a", "Z9"};
    std::string out;
    for (int i = 0, n = static_cast<int>(rng() % 6); i < n; ++i) out += pieces[rng() % pieces.size()];
    return out;
  };
  std::vector<std::string> valid;
  for (int i = 0; i < 400; ++i) {
    nlohmann::ordered_json v;
    v["violation"] = static_cast<int>(rng() % 2);
    if (rng() % 2) v["policy_category"] = rng() % 3 ? nlohmann::ordered_json(random_text()) : nlohmann::ordered_json(nullptr);
    if (rng() % 2) {
      nlohmann::ordered_json ids = nlohmann::ordered_json::array();
      for (int k = 0, n = static_cast<int>(rng() % 3); k < n; ++k) ids.push_back(random_text());
      v["rule_ids"] = ids;
    }
    if (rng() % 2) {
      const int kind = static_cast<int>(rng() % 3);
      v["confidence"] = kind == 0 ? nlohmann::ordered_json("high") : kind == 1 ? nlohmann::ordered_json(0.75) : nlohmann::ordered_json(-3);
    }
    if (rng() % 2) v["rationale"] = random_text();
    const std::string text = (rng() % 2 ? " " : "") + v.dump(rng() % 2 ? -1 : 2, ' ', rng() % 2 == 0);
    EXPECT_TRUE(a.accepts(text)) << text;
    valid.push_back(text);
  }
  for (const std::string bad : {"{\"violation\": 2}", "{\"rationale\": \"x\"}", "{\"violation\": 1, \"x\": 1}",
                                "{\"violation\": 1, \"rationale\": \"\xff\"}", "{\"violation\": 1, \"rationale\": \"\\ud800\"}",
                                "{\"violation\": 1, \"rationale\": \"a\nb\"}", "{\"violation\": 1,}", "{\"violation\": 01}",
                                "{\"violation\": 1}}", "{\"violation\": 1, \"confidence\": 1.}", "{\"violation\":         1}"})
    EXPECT_FALSE(a.accepts(bad)) << bad;
  int accepted_mutants = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string text = valid[rng() % valid.size()];
    for (int m = 0, n = 1 + static_cast<int>(rng() % 3); m < n && !text.empty(); ++m) {
      const size_t at = rng() % text.size();
      static const std::string alphabet = "{}[]\",:\\ \n01-.eEnulvx\xc3\xa9\xff\x80";
      switch (rng() % 3) {
        case 0: text[at] = alphabet[rng() % alphabet.size()]; break;
        case 1: text.erase(at, 1); break;
        default: text.insert(at, 1, alphabet[rng() % alphabet.size()]); break;
      }
    }
    if (!a.accepts(text)) continue;
    ++accepted_mutants;
    const Verdict v = text.find('{') != std::string::npos ? parse_json_verdict(text) : parse_binary_verdict(text);
    EXPECT_TRUE(v.ok()) << text << ": " << v.error;
  }
  EXPECT_GT(accepted_mutants, 100);  // the mutations do reach accepted texts other than the originals
}

// The JSON grammar's states all lead to a whole answer, and its masks are the tokens whose bytes
// stay inside the automaton (checked against a scan of the vocabulary on a sample of states).
TEST(VerdictGrammar, JsonMasksEqualAScanOfTheVocabulary) {
  const AnswerAutomaton a = verdict_automaton({});
  const VerdictGrammar g(tokenizer(), a);
  std::vector<std::string> vocab(static_cast<size_t>(tokenizer().vocab_size()));
  for (int32_t id = 0; id < tokenizer().vocab_size(); ++id) vocab[static_cast<size_t>(id)] = bytes_of(id);
  int refusing = 0;
  for (int state = 0; state < static_cast<int>(g.num_states()); state += 7) {
    const int from = a.run(g.text(state));
    ASSERT_GE(from, 0) << g.text(state);
    EXPECT_LT(g.distance(state), 1000);
    std::vector<int32_t> expected;
    for (int32_t id = 0; id < tokenizer().vocab_size(); ++id) {
      const std::string& b = vocab[static_cast<size_t>(id)];
      if (!b.empty() && a.run(b, from) >= 0) expected.push_back(id);
    }
    if (a.complete(from)) expected.push_back(harmony_ids::kReturn);
    std::sort(expected.begin(), expected.end());
    EXPECT_EQ(g.allowed(state), expected) << "state '" << g.text(state) << "'";
    const AnswerMask mask = g.mask(state);
    if (!mask.refused.empty()) {
      ++refusing;
      for (const int32_t t : mask.refused) EXPECT_FALSE(std::binary_search(expected.begin(), expected.end(), t));
      EXPECT_EQ(mask.refused.size() + expected.size(), static_cast<size_t>(tokenizer().vocab_size()));
    }
    // The closing set shortens the distance, and is what is left when the tokens run out.
    const AnswerMask closing = g.mask(state, g.distance(state) + 1);
    EXPECT_TRUE(closing.refused.empty());
    ASSERT_FALSE(closing.allowed.empty());
    for (const int32_t t : closing.allowed) {
      if (t == harmony_ids::kReturn) continue;
      const int next = g.advance(state, t);
      ASSERT_GE(next, 0);
      EXPECT_LT(g.distance(next), g.distance(state));
    }
  }
  EXPECT_GT(refusing, 0) << "string contents allow most of the vocabulary and are sent as refused tokens";
}

// The tracker constrains the final channel's content only, however its header came.
TEST(FinalAnswerTracker, ConstrainsOnlyTheFinalContent) {
  auto g = VerdictGrammar::for_labels(tokenizer(), {});
  auto push_text = [&](FinalAnswerTracker& t, const std::string& text) {
    for (const int32_t id : tokenizer().encode_with_specials(text)) t.push(id);
  };
  {
    FinalAnswerTracker t(g);
    EXPECT_FALSE(t.active());
    push_text(t, "<|channel|>analysis<|message|>The content is spam.");
    EXPECT_FALSE(t.active());
    push_text(t, "<|end|><|start|>assistant<|channel|>commentary<|message|>x<|end|>");
    EXPECT_FALSE(t.active());  // other channels stay free
    push_text(t, "<|start|>assistant<|channel|>final");
    EXPECT_FALSE(t.active());  // still in the header
    push_text(t, "<|message|>");
    ASSERT_TRUE(t.active());
    std::vector<int32_t> first(t.mask().allowed.begin(), t.mask().allowed.end());
    std::sort(first.begin(), first.end());
    EXPECT_EQ(first, g->allowed(0));
    push_text(t, "1");
    EXPECT_EQ(std::vector<int32_t>(t.mask().allowed.begin(), t.mask().allowed.end()), std::vector<int32_t>{harmony_ids::kReturn});
    t.push(harmony_ids::kReturn);
    EXPECT_FALSE(t.active());
    EXPECT_EQ(t.state(), VerdictGrammar::kDone);
  }
  {
    // A header with a content type and the model's own spelling.
    FinalAnswerTracker t(g);
    push_text(t, "<|channel|>final <|constrain|>json<|message|>");
    EXPECT_TRUE(t.active());
    push_text(t, "{\"violation\": 0");
    EXPECT_TRUE(t.active());
    // The object may close or go on with an optional member; with two tokens left it must close.
    const auto allowed = g->allowed(t.state());
    for (const std::string ok : {"}", ",", ", \"", " "})
      EXPECT_TRUE(std::binary_search(allowed.begin(), allowed.end(), tokenizer().encode(ok).at(0))) << ok;
    EXPECT_FALSE(std::binary_search(allowed.begin(), allowed.end(), tokenizer().encode("x").at(0)));
    // With two tokens left: only tokens that close the object ("}", " }"), then the stop.
    const AnswerMask last = t.mask(2);
    ASSERT_FALSE(last.allowed.empty());
    EXPECT_NE(std::find(last.allowed.begin(), last.allowed.end(), tokenizer().encode("}").at(0)), last.allowed.end());
    for (const int32_t id : last.allowed) EXPECT_TRUE(g->complete(g->advance(t.state(), id))) << bytes_of(id);
    push_text(t, ", \"rationale\": \"Buy now");
    EXPECT_FALSE(t.mask().refused.empty());  // free text: most tokens allowed
    EXPECT_TRUE(t.mask(3).refused.empty());  // three tokens left: close the string and the object
  }
  {
    // A token outside the grammar (an engine that did not mask) leaves the rest free.
    FinalAnswerTracker t(g);
    push_text(t, "<|channel|>final<|message|>maybe");
    EXPECT_FALSE(t.active());
    EXPECT_EQ(t.state(), VerdictGrammar::kInvalid);
    EXPECT_TRUE(t.mask().empty());
  }
}

// ---------------------------------------------------------------------------------------------
// A tiny random model served in-process: Model, Engine, Scheduler, Classifier, StepLoop.

ClassifierOptions classifier_options() {
  ClassifierOptions o;
  o.budgets.low = 4;
  o.budgets.medium = 6;
  o.budgets.high = 8;
  o.answer_tokens = 40;  // the longest answer takes at most 20 tokens (one per byte) + the stop
  o.top_logprobs = 5;
  o.max_context = 1024;
  return o;
}

class Served {
 public:
  explicit Served(uint64_t seed)
      : dir_(), config_(make(dir_, seed)), ck_(dir_.path()), backend_(1), model_(config_, ck_, backend_, model_options()),
        engine_(model_), exchange_(nullptr), scheduler_(scheduler_options()),
        classifier_(tokenizer(), scheduler_, classifier_options()), loop_(scheduler_, engine_, exchange_) {}

  // Runs every sequence together (one batch, as far as the step budgets allow); results in order.
  std::vector<SequenceResult> run(const std::vector<SequenceSpec>& specs) {
    std::vector<SequenceResult> out(specs.size());
    for (size_t i = 0; i < specs.size(); ++i) {
      RequestSpec r;
      r.id = "r" + std::to_string(next_id_++);
      r.sequences = {specs[i]};
      r.on_done = [&out, i](std::vector<SequenceResult> results) { out[i] = std::move(results.at(0)); };
      std::string why;
      EXPECT_EQ(scheduler_.submit(std::move(r), &why), SubmitStatus::kAccepted) << why;
    }
    loop_.run_until_idle();
    return out;
  }

  Classifier& classifier() { return classifier_; }
  Scheduler& scheduler() { return scheduler_; }
  Engine& engine() { return engine_; }
  Model& model() { return model_; }

 private:
  static ModelConfig make(const testing::TempDir& dir, uint64_t seed) {
    MakeModelOptions o;
    o.seed = seed;
    make_random_model(preset_config("tiny"), dir.path(), o);
    return load_model_config(dir.path() + "/config.json");
  }
  static ModelOptions model_options() {
    ModelOptions o;
    o.max_step_rows = 512;
    o.max_logit_rows = 64;
    o.kv.block_size = 16;
    o.kv.full_blocks = 512;
    o.kv.sliding_blocks = 512;
    return o;
  }
  static SchedulerOptions scheduler_options() {
    SchedulerOptions o;
    o.blocks_per_rank = 512;
    o.block_size = 16;
    o.max_step_tokens = 512;
    o.max_step_samples = 64;
    o.max_context = 1024;
    return o;
  }

  testing::TempDir dir_;
  ModelConfig config_;
  Checkpoint ck_;
  CpuBackend backend_;
  Model model_;
  Engine engine_;
  StepExchange exchange_;
  Scheduler scheduler_;
  Classifier classifier_;
  StepLoop loop_;
  int next_id_ = 0;
};

std::vector<int32_t> ids_of(const SequenceResult& r) {
  std::vector<int32_t> ids;
  for (const auto& g : r.tokens) ids.push_back(g.token);
  return ids;
}

// ---------------------------------------------------------------------------------------------
// The engine's masked sampling.

TEST(ConstrainedSampling, TheMaskPicksAmongTheAllowedAndReportsTheUnmaskedDistribution) {
  Served s(11);
  const std::vector<int32_t> prompt = tokenizer().encode("Some prompt to continue, with a few words.");
  const std::vector<float> logits = compute_all_logits(s.model(), prompt);
  const int64_t vocab = s.model().config().vocab_size;
  const float* last = logits.data() + (static_cast<int64_t>(prompt.size()) - 1) * vocab;
  double max = last[0];
  for (int64_t i = 0; i < vocab; ++i) max = std::max<double>(max, last[i]);
  double z = 0;
  for (int64_t i = 0; i < vocab; ++i) z += std::exp(last[i] - max);
  auto logprob = [&](int32_t t) { return last[t] - max - std::log(z); };

  auto step = [&](const std::vector<int32_t>& allowed, const proto::Sampling& sampling,
                  const std::vector<int32_t>& refused = {}) {
    proto::StepPlan plan;
    proto::SequenceWork* w = plan.add_sequences();
    w->set_sequence_id(1);
    w->mutable_tokens()->Add(prompt.begin(), prompt.end());
    const int blocks = static_cast<int>((prompt.size() + 15) / 16);
    for (int b = 0; b < blocks; ++b) w->add_blocks(b + 1);
    w->set_sample(true);
    *w->mutable_sampling() = sampling;
    w->set_top_logprobs(5);
    w->mutable_allowed_tokens()->Add(allowed.begin(), allowed.end());
    w->mutable_refused_tokens()->Add(refused.begin(), refused.end());
    return s.engine().run(plan).samples(0);
  };
  const proto::SampledToken free = step({}, proto::Sampling());
  const std::vector<int32_t> allowed = {15, 16, 4108, 90, 200002};  // "0", "1", "json", "{", <|return|>
  int32_t best = allowed[0];
  for (const int32_t t : allowed)
    if (last[t] > last[best]) best = t;
  const proto::SampledToken masked = step(allowed, proto::Sampling());
  EXPECT_EQ(masked.token(), best);
  EXPECT_NEAR(masked.logprob(), logprob(best), 1e-3);
  // The reported alternatives are the unmasked ones.
  ASSERT_EQ(masked.top_size(), free.top_size());
  for (int j = 0; j < free.top_size(); ++j) {
    EXPECT_EQ(masked.top(j).token(), free.top(j).token());
    EXPECT_EQ(masked.top(j).logprob(), free.top(j).logprob());
  }
  // Temperature sampling draws from the allowed ids only, for every seed.
  std::set<int32_t> drawn;
  for (uint64_t seed = 0; seed < 64; ++seed) {
    proto::Sampling t;
    t.set_temperature(50.0f);
    t.set_seed(seed);
    const proto::SampledToken x = step(allowed, t);
    EXPECT_TRUE(std::find(allowed.begin(), allowed.end(), x.token()) != allowed.end()) << x.token();
    EXPECT_NEAR(x.logprob(), logprob(x.token()), 1e-3);
    drawn.insert(x.token());
  }
  EXPECT_GT(drawn.size(), 1u);  // a high temperature spreads over them
  // A mask given by its refused tokens: greedy takes the most likely token not refused.
  std::vector<int32_t> by_logit(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) by_logit[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  std::stable_sort(by_logit.begin(), by_logit.end(), [&](int32_t a, int32_t b) { return last[a] > last[b]; });
  const std::vector<int32_t> fallback = {by_logit[500], by_logit[900]};
  const proto::SampledToken third = step(fallback, proto::Sampling(), {by_logit[0], by_logit[1]});
  EXPECT_EQ(third.token(), by_logit[2]);
  EXPECT_NEAR(third.logprob(), logprob(by_logit[2]), 1e-3);
  // Temperature sampling never draws a refused token.
  for (uint64_t seed = 0; seed < 32; ++seed) {
    proto::Sampling t;
    t.set_temperature(5.0f);
    t.set_seed(seed);
    const int32_t x = step(fallback, t, {by_logit[0], by_logit[1], by_logit[2]}).token();
    EXPECT_TRUE(x != by_logit[0] && x != by_logit[1] && x != by_logit[2]) << x;
  }
  // Every one of the candidates the sampler looks at refused: the fallback list decides.
  const std::vector<int32_t> top_refused(by_logit.begin(), by_logit.begin() + 200);
  const proto::SampledToken fell_back = step(fallback, proto::Sampling(), top_refused);
  EXPECT_EQ(fell_back.token(), by_logit[500]);
  EXPECT_NEAR(fell_back.logprob(), logprob(by_logit[500]), 1e-3);
  EXPECT_THROW(step({}, proto::Sampling(), {by_logit[0]}), std::invalid_argument);  // nothing to fall back on
  EXPECT_THROW(step(fallback, proto::Sampling(), {static_cast<int32_t>(vocab)}), std::invalid_argument);
  // An id outside the vocabulary is a malformed plan.
  EXPECT_THROW(step({-1}, proto::Sampling()), std::invalid_argument);
  EXPECT_THROW(step({static_cast<int32_t>(vocab)}, proto::Sampling()), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Classification on many random models.

struct ClassifyRun {
  ClassifyPolicy policy;
  SequenceSpec spec;
};

std::vector<ClassifyRun> make_runs(Classifier& classifier, bool constrain, int contents, uint64_t seed) {
  std::vector<ClassifyRun> runs;
  std::mt19937_64 rng(seed);
  const std::vector<std::string> words = {"buy", "now", "cheap", "hello", "friend", "link", "password", "free",
                                          "meeting", "at", "noon", "winner", "click", "here", "thanks"};
  for (size_t f = 0; f < label_sets().size(); ++f) {
    for (int c = 0; c < contents; ++c) {
      ClassifyPolicy p;
      p.id = "P" + std::to_string(f);
      p.labels = label_sets()[f];
      p.text = p.labels.empty() ? "# Spam\nAnswer 1 if the content is spam, else 0."
                                : "# Labels\nAnswer with one label of the set.";
      ClassifyRequest req;
      req.id = "x";
      req.effort = static_cast<ReasoningEffort>(rng() % 3);
      req.constrain = constrain;
      std::string content;
      for (int w = 0; w < 3 + static_cast<int>(rng() % 12); ++w) content += words[rng() % words.size()] + " ";
      req.content = content;
      req.policies = {p};
      SequenceSpec spec = classifier.sequence(req, p);
      if (rng() % 2) {  // half with temperature sampling
        spec.sampling.set_temperature(1.0f);
        spec.sampling.set_top_p(rng() % 2 ? 1.0f : 0.9f);
        spec.sampling.set_seed(rng());
      }
      runs.push_back({p, std::move(spec)});
    }
  }
  return runs;
}

TEST(ConstrainedClassification, EveryNormalFinishHasAVerdictOnManyRandomModels) {
  int total = 0, stopped = 0, constrained_runs = 0;
  int free_null = 0;
  for (uint64_t seed : {1, 2, 3, 4}) {
    Served s(seed);
    const std::vector<ClassifyRun> runs = make_runs(s.classifier(), true, 13, seed * 101);
    std::vector<SequenceSpec> specs;
    for (const ClassifyRun& r : runs) specs.push_back(r.spec);
    const std::vector<SequenceResult> batched = s.run(specs);
    for (size_t i = 0; i < runs.size(); ++i) {
      ASSERT_TRUE(runs[i].spec.final_grammar) << "policy " << runs[i].policy.id;
      const PolicyResult r = s.classifier().interpret(runs[i].policy, batched[i], false);
      ++total;
      ++constrained_runs;
      if (batched[i].finish != FinishReason::kStop) continue;
      ++stopped;
      EXPECT_FALSE(r.verdict.is_null()) << "seed " << seed << " run " << i << ": final '" << r.final_text
                                        << "': " << r.verdict_error;
      EXPECT_TRUE(r.verdict_error.empty()) << r.verdict_error;
      if (runs[i].policy.labels.empty()) {
        EXPECT_TRUE(r.verdict == 0 || r.verdict == 1) << r.verdict.dump();
      } else {
        EXPECT_TRUE(r.verdict.is_string()) << r.verdict.dump();
      }
    }
    // The same sequences without the mask: identical up to the final content (the analysis channel
    // and the headers are never touched), and the random models do answer malformed there.
    const std::vector<ClassifyRun> free_runs = make_runs(s.classifier(), false, 13, seed * 101);
    std::vector<SequenceSpec> free_specs;
    for (const ClassifyRun& r : free_runs) {
      EXPECT_FALSE(r.spec.final_grammar);
      free_specs.push_back(r.spec);
    }
    const std::vector<SequenceResult> free = s.run(free_specs);
    for (size_t i = 0; i < runs.size(); ++i) {
      const SafeguardOutput a = parse_safeguard_output(tokenizer(), ids_of(batched[i]));
      const SafeguardOutput b = parse_safeguard_output(tokenizer(), ids_of(free[i]));
      const PolicyResult fr = s.classifier().interpret(free_runs[i].policy, free[i], false);
      if (fr.verdict.is_null()) ++free_null;
      if (!a.has_final || a.final_first_index < 0) continue;
      // The constrained final content begins right after its header: everything before it is free.
      const auto ta = ids_of(batched[i]), tb = ids_of(free[i]);
      ASSERT_GE(static_cast<int64_t>(tb.size()), a.final_first_index) << i;
      EXPECT_TRUE(std::equal(ta.begin(), ta.begin() + a.final_first_index, tb.begin())) << i;
      EXPECT_TRUE(b.has_final) << i;
    }
    // Batch invariance: a few of them alone give the same tokens as in the batch.
    for (size_t i = 0; i < runs.size(); i += 9) {
      const std::vector<SequenceResult> alone = s.run({runs[i].spec});
      EXPECT_EQ(ids_of(alone[0]), ids_of(batched[i])) << "seed " << seed << " run " << i;
    }
  }
  std::printf("constrained runs %d, finished normally %d; unconstrained null verdicts %d\n", constrained_runs, stopped,
              free_null);
  EXPECT_GE(constrained_runs, 200);
  EXPECT_GE(stopped, total * 9 / 10) << "most generations must reach their answer";
  EXPECT_GT(free_null, 0) << "without the mask the random models should answer malformed sometimes";
}

// Plans carry allowed ids only for constrained sequences, only inside the final content.
TEST(ConstrainedClassification, PlansCarryTheMaskOnlyInTheFinalContent) {
  Served s(5);
  ClassifyPolicy p;
  p.id = "P";
  p.text = "# Spam\nAnswer 1 if the content is spam, else 0.";
  ClassifyRequest req;
  req.id = "x";
  req.effort = ReasoningEffort::kLow;
  req.content = "buy now";
  req.policies = {p};
  SequenceSpec on = s.classifier().sequence(req, p);
  req.constrain = false;
  SequenceSpec off = s.classifier().sequence(req, p);
  for (const SequenceSpec& spec : {on, off}) {
    RequestSpec r;
    r.id = spec.final_grammar ? "on" : "off";
    r.sequences = {spec};
    ASSERT_EQ(s.scheduler().submit(std::move(r)), SubmitStatus::kAccepted);
  }
  std::map<uint64_t, std::vector<int32_t>> tokens;  // per sequence: the tokens fed so far
  std::map<uint64_t, int> masked_steps;
  std::map<uint64_t, bool> free_after_mask;
  for (int step = 0; step < 200 && s.scheduler().has_work(); ++step) {
    const std::vector<proto::StepPlan> plans = s.scheduler().plan_step();
    for (const auto& w : plans[0].sequences()) {
      auto& t = tokens[w.sequence_id()];
      t.insert(t.end(), w.tokens().begin(), w.tokens().end());
      if (w.allowed_tokens_size() > 0) {
        ++masked_steps[w.sequence_id()];
        // The mask begins only after <|channel|>final<|message|>.
        const std::vector<int32_t> header = {harmony_ids::kChannel, tokenizer().encode("final")[0], harmony_ids::kMessage};
        EXPECT_NE(std::search(t.begin(), t.end(), header.begin(), header.end()), t.end());
      } else if (masked_steps.count(w.sequence_id()) && w.sample()) {
        free_after_mask[w.sequence_id()] = true;
      }
    }
    s.scheduler().complete_step({s.engine().run(plans[0])});
  }
  ASSERT_EQ(masked_steps.size(), 1u) << "exactly one sequence (the constrained one) is masked";
  EXPECT_GE(masked_steps.begin()->second, 2);  // at least the answer and its stop
  EXPECT_TRUE(free_after_mask.empty());
}

}  // namespace
}  // namespace arbiter
