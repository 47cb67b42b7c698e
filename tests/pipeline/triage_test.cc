// The fastText triage classifier (pipeline/triage.h): training on a synthetic separable dataset and
// held-out accuracy, 0/1 and label answers, load errors, TriageModels' name checks and cache,
// triage_text, and concurrent predictions.
#include "pipeline/triage.h"

#include <fasttext/fasttext.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>

#include "tests/test_util.h"

namespace arbiter {
namespace {

using nlohmann::json;
using Examples = std::vector<std::pair<std::string, json>>;

const std::vector<std::string> kSpamWords = {"free",   "winner", "crypto", "click", "prize",   "cash",   "offer",
                                             "bonus",  "urgent", "claim",  "viagra", "casino", "deal",  "discount"};
const std::vector<std::string> kBenignWords = {"meeting", "lunch",   "project", "report", "family", "weather", "garden",
                                               "recipe",  "holiday", "library", "school", "concert", "coffee", "train"};
const std::vector<std::string> kCommonWords = {"the", "a", "to", "and", "you", "is", "for", "on", "this", "with"};

// A content of `words` words: mostly from `topic`, some common words, some punctuation.
std::string make_content(std::mt19937& rng, const std::vector<std::string>& topic, int words) {
  std::string s;
  for (int i = 0; i < words; ++i) {
    const auto& pool = rng() % 3 == 0 ? kCommonWords : topic;
    std::string w = pool[rng() % pool.size()];
    if (rng() % 7 == 0) w[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(w[0])));
    s += (i ? " " : "") + w;
    if (rng() % 9 == 0) s += rng() % 2 ? "!" : ",";
  }
  return s;
}

// `n` examples, alternating spam (answer `spam`) and benign (answer `benign`).
Examples make_examples(std::mt19937& rng, int n, const json& spam, const json& benign) {
  Examples out;
  for (int i = 0; i < n; ++i) {
    const bool is_spam = i % 2 == 0;
    out.emplace_back(make_content(rng, is_spam ? kSpamWords : kBenignWords, 8 + static_cast<int>(rng() % 20)),
                     is_spam ? spam : benign);
  }
  return out;
}

TriageTrainOptions small_options() {
  TriageTrainOptions o;
  o.epochs = 10;
  o.dimension = 16;
  o.buckets = 20000;
  return o;
}

TEST(TriageTextTest, OneNormalisedLine) {
  EXPECT_EQ(triage_text("Hello, World!!"), "hello , world ! !");
  EXPECT_EQ(triage_text("  line one\n\nline\ttwo\r\n"), "line one line two");
  EXPECT_EQ(triage_text(""), "");
  EXPECT_EQ(triage_text(" \n\t "), "");
  EXPECT_EQ(triage_text("FREE$$$cash"), "free $ $ $ cash");
  EXPECT_EQ(triage_text("__label__1 spam"), "_ _ label _ _ 1 spam");  // no word reads as a label
  EXPECT_EQ(triage_text("Caf\xc3\x89 CAF\xc3\xa9"), "caf\xc3\x89 caf\xc3\xa9");  // only ASCII is lower-cased
  EXPECT_EQ(triage_text(std::string("a\0b\x7f" "c", 5)), "a b c");
  EXPECT_EQ(triage_text("e-mail: a.b@c.d"), "e - mail : a . b @ c . d");
}

class TriageModelTest : public ::testing::Test {
 protected:
  testing::TempDir tmp_;
};

TEST_F(TriageModelTest, LearnsASeparableDatasetWithIntegerAnswers) {
  std::mt19937 rng(7);
  const Examples train = make_examples(rng, 400, 1, 0);
  const std::string path = tmp_.file("spam.bin");
  const TriageTrainReport report = train_triage(train, small_options(), path);
  EXPECT_EQ(report.examples, 400u);
  EXPECT_EQ(report.per_answer, (std::map<std::string, size_t>{{"0", 200}, {"1", 200}}));
  ASSERT_TRUE(std::filesystem::exists(path));
  EXPECT_FALSE(std::filesystem::exists(path + ".partial"));

  const auto model = TriageModel::load(path);
  const auto answers = model->answers();
  ASSERT_EQ(answers.size(), 2u);
  for (const json& a : answers) EXPECT_TRUE(a == json(0) || a == json(1)) << a;

  const Examples held_out = make_examples(rng, 200, 1, 0);
  int correct = 0;
  for (const auto& [content, answer] : held_out) {
    const TriagePrediction p = model->predict(content);
    ASSERT_TRUE(p.verdict.is_number_integer()) << p.verdict;
    EXPECT_GT(p.probability, 0.0);
    EXPECT_LE(p.probability, 1.0);
    correct += p.verdict == answer;
  }
  EXPECT_GE(correct / 200.0, 0.9) << correct << " of 200";
  // An empty content still gets an answer (the end-of-line word).
  const TriagePrediction empty = model->predict("");
  EXPECT_FALSE(empty.verdict.is_null());
}

TEST_F(TriageModelTest, LabelAnswersComeBackAsStrings) {
  std::mt19937 rng(11);
  Examples train = make_examples(rng, 300, "INVALID", "VALID");
  for (int i = 0; i < 60; ++i) train.emplace_back(make_content(rng, kCommonWords, 10), "UNSURE + 50%");
  const std::string path = tmp_.file("labels.bin");
  const auto report = train_triage(train, small_options(), path);
  EXPECT_EQ(report.per_answer.size(), 3u);
  EXPECT_EQ(report.per_answer.at("UNSURE + 50%"), 60u);
  const auto model = TriageModel::load(path);
  std::set<std::string> answers;
  for (const json& a : model->answers()) {
    ASSERT_TRUE(a.is_string()) << a;
    answers.insert(a.get<std::string>());
  }
  EXPECT_EQ(answers, (std::set<std::string>{"VALID", "INVALID", "UNSURE + 50%"}));
  EXPECT_EQ(model->predict("free crypto prize, claim your cash bonus now!").verdict, json("INVALID"));
  EXPECT_EQ(model->predict("Lunch meeting about the project report").verdict, json("VALID"));
}

TEST_F(TriageModelTest, TrainingErrors) {
  const std::string path = tmp_.file("x.bin");
  EXPECT_THROW(train_triage({}, small_options(), path), std::invalid_argument);
  EXPECT_THROW(train_triage({{"a", 1}, {"b", 1}}, small_options(), path), std::invalid_argument);
  EXPECT_THROW(train_triage({{"a", 1}, {"b", 2}}, small_options(), path), std::invalid_argument);
  EXPECT_THROW(train_triage({{"a", 1}, {"b", 0.5}}, small_options(), path), std::invalid_argument);
  EXPECT_THROW(train_triage({{"a", 1}, {"b", json::array()}}, small_options(), path), std::invalid_argument);
  EXPECT_THROW(train_triage({{"a", 1}, {"b", ""}}, small_options(), path), std::invalid_argument);
  TriageTrainOptions bad = small_options();
  bad.epochs = 0;
  EXPECT_THROW(train_triage({{"a", 1}, {"b", 0}}, bad, path), std::invalid_argument);
  bad = small_options();
  bad.learning_rate = 0;
  EXPECT_THROW(train_triage({{"a", 1}, {"b", 0}}, bad, path), std::invalid_argument);
  bad = small_options();
  bad.dimension = 0;
  EXPECT_THROW(train_triage({{"a", 1}, {"b", 0}}, bad, path), std::invalid_argument);
  EXPECT_FALSE(std::filesystem::exists(path));
  // An unwritable destination.
  EXPECT_THROW(train_triage({{"a", 1}, {"b", 0}}, small_options(), tmp_.file("no/such/folder/x.bin")), std::runtime_error);
}

TEST_F(TriageModelTest, LoadErrorsNameTheFile) {
  const auto message_of = [](const std::string& path) {
    try {
      TriageModel::load(path);
    } catch (const std::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string("(loaded)");
  };
  const std::string missing = tmp_.file("missing.bin");
  EXPECT_NE(message_of(missing).find(missing), std::string::npos) << message_of(missing);
  const std::string garbage = tmp_.file("garbage.bin");
  {
    std::ofstream out(garbage, std::ios::binary);
    std::mt19937 rng(3);
    for (int i = 0; i < 4096; ++i) out.put(static_cast<char>(rng()));
  }
  EXPECT_NE(message_of(garbage).find(garbage), std::string::npos) << message_of(garbage);
  const std::string empty = tmp_.file("empty.bin");
  std::ofstream(empty).close();
  EXPECT_NE(message_of(empty).find(empty), std::string::npos) << message_of(empty);
  EXPECT_NE(message_of(tmp_.file("")).find("not a regular file"), std::string::npos);

  // A real model cut short at several points: refused, never read past its end.
  std::mt19937 rng(5);
  const std::string good = tmp_.file("good.bin");
  train_triage(make_examples(rng, 40, 1, 0), small_options(), good);
  std::ifstream in(good, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (const size_t keep : {size_t{6}, size_t{12}, size_t{200}, bytes.size() / 2, bytes.size() - 1}) {
    const std::string cut = tmp_.file("cut.bin");
    std::ofstream(cut, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(keep));
    EXPECT_NE(message_of(cut).find(cut), std::string::npos) << keep << ": " << message_of(cut);
  }
}

// What fastText itself predicts for `content` from the model file: the label text and probability.
std::pair<std::string, double> fasttext_predict(const fasttext::FastText& model, const std::string& content) {
  std::istringstream in(triage_text(content) + "\n");
  std::vector<std::pair<fasttext::real, std::string>> predictions;
  model.predictLine(in, predictions, 1, 0.0);
  if (predictions.empty()) return {"", 0.0};
  return {predictions[0].second, static_cast<double>(predictions[0].first)};
}

TEST_F(TriageModelTest, AgreesWithFastTextsOwnPrediction) {
  std::mt19937 rng(19);
  Examples train = make_examples(rng, 300, 1, 0);
  // Ambiguous contents too, so probabilities away from 0 and 1 are compared.
  for (int i = 0; i < 100; ++i) train.emplace_back(make_content(rng, kCommonWords, 6), static_cast<int>(rng() % 2));
  const std::string path = tmp_.file("m.bin");
  train_triage(train, small_options(), path);
  const auto model = TriageModel::load(path);
  fasttext::FastText reference;
  reference.loadModel(path);
  Examples contents = make_examples(rng, 100, 1, 0);
  for (int i = 0; i < 100; ++i) contents.emplace_back(make_content(rng, rng() % 2 ? kCommonWords : kSpamWords, 1 + i % 9), 0);
  contents.emplace_back("words the model never saw: zebra quokka", 0);
  for (const auto& [content, answer] : contents) {
    const TriagePrediction mine = model->predict(content);
    const auto [label, probability] = fasttext_predict(reference, content);
    ASSERT_FALSE(label.empty()) << content;
    EXPECT_NEAR(mine.probability, probability, 1e-4) << content;  // fastText reports p + 1e-5
    if (std::fabs(probability - 0.5) > 1e-3) {
      EXPECT_EQ("__label__" + mine.verdict.dump(), label) << content;
    }
  }

  // A model of another loss (one-vs-all, written by fastText itself) goes through fastText's own
  // prediction path, with the same answers.
  const std::string text_path = tmp_.file("ova.txt");
  {
    std::ofstream out(text_path);
    for (const auto& [content, answer] : train) out << "__label__" << answer.dump() << " " << triage_text(content) << "\n";
  }
  fasttext::Args args;
  args.input = text_path;
  args.model = fasttext::model_name::sup;
  args.loss = fasttext::loss_name::ova;
  args.minCount = 1;
  args.minn = args.maxn = 0;
  args.bucket = 0;
  args.wordNgrams = 1;
  args.dim = 8;
  args.epoch = 5;
  args.thread = 1;
  args.verbose = 0;
  fasttext::FastText ova;
  ova.train(args);
  ova.saveModel(tmp_.file("ova.bin"));
  const auto ova_model = TriageModel::load(tmp_.file("ova.bin"));
  for (const auto& [content, answer] : contents) {
    const TriagePrediction mine = ova_model->predict(content);
    const auto [label, probability] = fasttext_predict(ova, content);
    EXPECT_EQ("__label__" + mine.verdict.dump(), label) << content;
    EXPECT_NEAR(mine.probability, std::min(probability, 1.0), 1e-6) << content;
  }
}

TEST_F(TriageModelTest, ConcurrentPredictionsEqualSingleThreaded) {
  std::mt19937 rng(13);
  const std::string path = tmp_.file("m.bin");
  train_triage(make_examples(rng, 200, 1, 0), small_options(), path);
  const auto model = TriageModel::load(path);
  const Examples contents = make_examples(rng, 300, 1, 0);
  std::vector<TriagePrediction> expected;
  for (const auto& c : contents) expected.push_back(model->predict(c.first));
  std::vector<std::vector<TriagePrediction>> got(2);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < 2; ++t)
    threads.emplace_back([&, t] {
      for (int round = 0; round < 5; ++round)
        for (const auto& c : contents) got[t].push_back(model->predict(c.first));
    });
  for (auto& th : threads) th.join();
  for (size_t t = 0; t < 2; ++t) {
    ASSERT_EQ(got[t].size(), contents.size() * 5);
    for (size_t i = 0; i < got[t].size(); ++i) {
      EXPECT_EQ(got[t][i].verdict, expected[i % contents.size()].verdict);
      EXPECT_EQ(got[t][i].probability, expected[i % contents.size()].probability);
    }
  }
}

TEST_F(TriageModelTest, ModelsFolderChecksNamesAndCaches) {
  std::mt19937 rng(17);
  train_triage(make_examples(rng, 40, 1, 0), small_options(), tmp_.file("spam.bin"));
  const TriageModels models(tmp_.file(""));
  const auto first = models.get("spam.bin");
  EXPECT_EQ(models.get("spam.bin"), first);  // loaded once
  for (const std::string bad : {"", ".", "..", "../spam.bin", "sub/spam.bin", "/etc/passwd"})
    EXPECT_THROW(models.get(bad), std::invalid_argument) << bad;
  try {
    models.get("nope.bin");
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("nope.bin"), std::string::npos) << e.what();
  }
  const TriageModels none("");
  try {
    none.get("spam.bin");
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("--triage-dir"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace arbiter
