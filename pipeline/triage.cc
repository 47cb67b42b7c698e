// The triage classifier over Debian's libfasttext (0.9.2): training through a temporary file in
// fastText's format, loading with the file's reads checked, prediction through the model's
// dictionary and FastText::predict (both const, so predictions need no lock).
#include "pipeline/triage.h"
#include "runtime/temp_folder.h"

#include <fasttext/fasttext.h>
#include <stdlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>

namespace arbiter {

namespace {

const std::string kLabelPrefix = "__label__";

bool is_ascii_punct(unsigned char c) {
  return (c >= 0x21 && c <= 0x2f) || (c >= 0x3a && c <= 0x40) || (c >= 0x5b && c <= 0x60) || (c >= 0x7b && c <= 0x7e);
}

// FastText with its header check (protected in the library) reachable, so a file is checked for
// fastText's magic number and version before its contents are read.
class CheckedFastText : public fasttext::FastText {
 public:
  bool check_header(std::istream& in) { return checkModel(in); }
};


// The answer as the model's label text: "0"/"1", or the label with whitespace, control characters
// and '%' percent-encoded (fastText's words end at whitespace; "INVALID + ESCALATE" becomes
// "INVALID%20+%20ESCALATE"). Throws for anything else.
std::string answer_text(const nlohmann::json& answer) {
  if (answer.is_boolean()) return answer.get<bool>() ? "1" : "0";
  if (answer.is_number_integer() || answer.is_number_unsigned()) {
    const auto n = answer.get<int64_t>();
    if (n == 0 || n == 1) return std::to_string(n);
  } else if (answer.is_string() && !answer.get_ref<const std::string&>().empty()) {
    static const char* const kHex = "0123456789ABCDEF";
    std::string out;
    for (const char ch : answer.get_ref<const std::string&>()) {
      const auto c = static_cast<unsigned char>(ch);
      if (c <= 0x20 || c == 0x7f || c == '%') {
        out += '%';
        out += kHex[c >> 4];
        out += kHex[c & 15];
      } else {
        out += ch;
      }
    }
    return out;
  }
  std::string shown = answer.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (shown.size() > 80) shown = shown.substr(0, 77) + "...";
  throw std::invalid_argument("triage answers are 0/1 or non-empty labels, got " + shown);
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

// The verdict a label text stands for: 0/1 as integers, else the label (percent-decoding undone).
nlohmann::json answer_verdict(const std::string& text) {
  if (text == "0") return 0;
  if (text == "1") return 1;
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '%' && i + 2 < text.size() && hex_digit(text[i + 1]) >= 0 && hex_digit(text[i + 2]) >= 0) {
      out += static_cast<char>(hex_digit(text[i + 1]) * 16 + hex_digit(text[i + 2]));
      i += 2;
    } else {
      out += text[i];
    }
  }
  return out;
}

void check_range(const char* name, double value, double low, double high, bool low_open = false) {
  if (!(low_open ? value > low : value >= low) || !(value <= high))
    throw std::invalid_argument(std::string("triage training: ") + name + " must be " + (low_open ? "above " : "from ") +
                                std::to_string(low) + (low_open ? " and at most " : " to ") + std::to_string(high) +
                                ", got " + std::to_string(value));
}

}  // namespace

std::string triage_text(std::string_view content) {
  std::string out;
  out.reserve(content.size() + content.size() / 4);
  bool space = false;  // a space is due before the next word character
  const auto put = [&](char c) {
    if (space && !out.empty()) out.push_back(' ');
    space = false;
    out.push_back(c);
  };
  for (const char ch : content) {
    const auto c = static_cast<unsigned char>(ch);
    if (c <= 0x20 || c == 0x7f) {
      space = true;
    } else if (is_ascii_punct(c)) {
      space = true;
      put(ch);
      space = true;
    } else {
      put(c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : ch);
    }
  }
  return out;
}

namespace {

// fastText's word hash: 32-bit FNV-1a over the bytes, each byte sign-extended first.
uint32_t word_hash(std::string_view word) {
  uint32_t h = 2166136261u;
  for (const char c : word) {
    h ^= static_cast<uint32_t>(static_cast<int8_t>(c));
    h *= 16777619u;
  }
  return h;
}

}  // namespace

struct TriageModel::Impl {
  CheckedFastText fasttext;
  std::shared_ptr<const fasttext::Dictionary> dictionary;
  std::vector<nlohmann::json> verdicts;  // by the model's label index
  // The dense softmax case (what train_triage writes) is predicted here rather than through
  // FastText::predict: the same arithmetic, with the rows a content needs prefetched together (a
  // model's input matrix is tens of MB, so a prediction waits mostly on memory) and no per-call
  // model state. Other models (quantized, other losses) go through FastText::predict.
  std::shared_ptr<const fasttext::DenseMatrix> input, output;  // null: not the dense softmax case
  int64_t dim = 0;
  // The dense softmax case also reads a content's word and word-n-gram ids here rather than through
  // Dictionary::getLine: fastText's word table has 30M slots (a cache and TLB miss per word), this
  // one a few per word of the vocabulary, so it stays in cache. Same ids: fastText's documented
  // FNV-1a word hash (checked against Dictionary::hash for every word at load), its n-gram mixing
  // and bucket modulus. Empty: getLine is used.
  struct Slot {
    uint32_t hash = 0;
    int32_t id = -1;
  };
  std::vector<Slot> slots;           // open addressing, a power of two in size
  std::vector<std::string> words;    // by id
  int32_t eos = -1;                  // the id of fastText's end-of-line token
  int32_t word_ngrams = 1;
  int64_t buckets = 0;

  // Builds the word table from the dictionary; leaves it empty where the model is not one whose ids
  // it reads exactly (subwords, a pruned dictionary, a hash that disagrees with the library's).
  void build_word_table(const fasttext::Args& args) {
    const fasttext::Dictionary& d = *dictionary;
    // isPruned only reads, but is not declared const.
    if (args.maxn > 0 || const_cast<fasttext::Dictionary&>(d).isPruned() || args.wordNgrams < 1) return;
    const int32_t n = d.nwords();
    size_t size = 16;
    while (size < 2 * static_cast<size_t>(n) + 1) size *= 2;
    std::vector<Slot> table(size);
    std::vector<std::string> by_id(static_cast<size_t>(n));
    for (int32_t id = 0; id < n; ++id) {
      std::string w = d.getWord(id);
      const uint32_t h = word_hash(w);
      if (h != d.hash(w)) return;
      size_t i = h & (size - 1);
      while (table[i].id >= 0) i = (i + 1) & (size - 1);
      table[i] = {h, id};
      by_id[static_cast<size_t>(id)] = std::move(w);
    }
    eos = d.getId(fasttext::Dictionary::EOS);
    if (eos < 0) return;
    slots = std::move(table);
    words = std::move(by_id);
    word_ngrams = args.wordNgrams;
    buckets = args.bucket;
  }

  // The ids Dictionary::getLine gives for one line of `text` (triage_text's output): each known
  // word's id, then the end-of-line token's, then the word n-grams' bucket rows (nwords + hash %
  // buckets) over the hashes of every word, known or not, and of the end of line.
  void line_ids(std::string_view text, std::vector<int32_t>& ids) const {
    thread_local std::vector<int32_t> hashes;
    ids.clear();
    hashes.clear();
    const size_t mask = slots.size() - 1;
    auto add = [&](std::string_view w) {
      const uint32_t h = word_hash(w);
      for (size_t i = h & mask; slots[i].id >= 0; i = (i + 1) & mask)
        if (slots[i].hash == h && words[static_cast<size_t>(slots[i].id)] == w) {
          ids.push_back(slots[i].id);
          break;
        }
      hashes.push_back(static_cast<int32_t>(h));
    };
    size_t start = std::string_view::npos;
    for (size_t i = 0; i <= text.size(); ++i) {
      const bool space = i == text.size() || text[i] == ' ' || text[i] == '\t' || text[i] == '\v' || text[i] == '\f' ||
                         text[i] == '\r' || text[i] == '\n' || text[i] == '\0';
      if (!space && start == std::string_view::npos) start = i;
      if (space && start != std::string_view::npos) {
        add(text.substr(start, i - start));
        start = std::string_view::npos;
      }
    }
    ids.push_back(eos);
    hashes.push_back(static_cast<int32_t>(word_hash(fasttext::Dictionary::EOS)));
    if (buckets <= 0) return;
    const int32_t nwords = static_cast<int32_t>(words.size());
    for (size_t i = 0; i < hashes.size(); ++i) {
      uint64_t h = static_cast<uint64_t>(static_cast<int64_t>(hashes[i]));  // sign-extended, as fastText does
      for (size_t j = i + 1; j < hashes.size() && j < i + static_cast<size_t>(word_ngrams); ++j) {
        h = h * 116049371u + static_cast<uint64_t>(static_cast<int64_t>(hashes[j]));
        ids.push_back(nwords + static_cast<int32_t>(h % static_cast<uint64_t>(buckets)));
      }
    }
  }
};

namespace {

// Softmax over the labels of the averaged input rows of `ids`: the best label and its probability,
// or label -1 when there is nothing to average.
std::pair<int32_t, double> dense_softmax(const fasttext::DenseMatrix& input, const fasttext::DenseMatrix& output,
                                         int64_t dim, const std::vector<int32_t>& ids) {
  const float* in = input.data();
  const int64_t rows = input.rows();
  constexpr int64_t kLineFloats = 64 / sizeof(float);
  for (const int32_t id : ids)
    if (id >= 0 && id < rows)
      for (int64_t j = 0; j < dim; j += kLineFloats) __builtin_prefetch(in + id * dim + j);
  // Per-thread scratch: predictions are frequent and small, so no allocation per call.
  thread_local std::vector<float> hidden, logits;
  hidden.assign(static_cast<size_t>(dim), 0.0f);
  size_t used = 0;
  for (const int32_t id : ids) {
    if (id < 0 || id >= rows) continue;
    const float* row = in + id * dim;
    for (int64_t j = 0; j < dim; ++j) hidden[static_cast<size_t>(j)] += row[j];
    ++used;
  }
  if (used == 0) return {-1, 0.0};
  const float scale = static_cast<float>(1.0 / static_cast<double>(used));
  for (float& h : hidden) h *= scale;
  const float* out = output.data();
  const int64_t labels = output.rows();
  logits.resize(static_cast<size_t>(labels));
  for (int64_t k = 0; k < labels; ++k) {
    float d = 0;
    const float* row = out + k * dim;
    for (int64_t j = 0; j < dim; ++j) d += row[j] * hidden[static_cast<size_t>(j)];
    logits[static_cast<size_t>(k)] = d;
  }
  const auto best = std::max_element(logits.begin(), logits.end());
  double z = 0;
  for (const float l : logits) z += std::exp(static_cast<double>(l) - *best);
  return {static_cast<int32_t>(best - logits.begin()), 1.0 / z};
}

}  // namespace

TriageModel::TriageModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TriageModel::~TriageModel() = default;

std::shared_ptr<const TriageModel> TriageModel::load(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    throw std::runtime_error("cannot load triage model " + path + ": " +
                             (std::filesystem::exists(path, ec) ? "not a regular file" : "no such file"));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot load triage model " + path + ": " + std::strerror(errno));
  auto impl = std::make_unique<Impl>();
  try {
    // Every read is checked: a short file ends the load with an exception rather than with
    // fastText reading on past its end.
    in.exceptions(std::ios::failbit | std::ios::badbit | std::ios::eofbit);
    if (!impl->fasttext.check_header(in)) throw std::runtime_error("not a fastText model (wrong magic number or version)");
    impl->fasttext.loadModel(in);
  } catch (const std::ios_base::failure&) {
    throw std::runtime_error("cannot load triage model " + path + ": the file is truncated or unreadable");
  } catch (const std::exception& e) {
    throw std::runtime_error("cannot load triage model " + path + ": " + e.what());
  }
  impl->dictionary = impl->fasttext.getDictionary();
  if (impl->fasttext.getArgs().model != fasttext::model_name::sup || impl->dictionary->nlabels() < 1)
    throw std::runtime_error("cannot load triage model " + path + ": not a fastText classifier (supervised model)");
  const fasttext::Args model_args = impl->fasttext.getArgs();
  if (!impl->fasttext.isQuant() && model_args.loss == fasttext::loss_name::softmax) {
    impl->input = impl->fasttext.getInputMatrix();
    impl->output = impl->fasttext.getOutputMatrix();
    impl->dim = impl->input->cols();
    if (impl->output->rows() != impl->dictionary->nlabels() || impl->output->cols() != impl->dim) impl->input.reset();
    if (impl->input) impl->build_word_table(model_args);
  }
  const std::string& prefix = model_args.label;
  for (int32_t i = 0; i < impl->dictionary->nlabels(); ++i) {
    std::string label = impl->dictionary->getLabel(i);
    if (label.rfind(prefix, 0) == 0) label.erase(0, prefix.size());
    impl->verdicts.push_back(answer_verdict(label));
  }
  return std::shared_ptr<const TriageModel>(new TriageModel(std::move(impl)));
}

TriagePrediction TriageModel::predict(std::string_view content) const {
  std::string text = triage_text(content);
  thread_local std::vector<int32_t> words, labels;  // getLine clears them
  if (!impl_->slots.empty()) {
    impl_->line_ids(text, words);
  } else {
    text.push_back('\n');  // the end of the line, as in training
    std::istringstream in(std::move(text));
    impl_->dictionary->getLine(in, words, labels);
  }
  int32_t label = -1;
  double probability = 0;
  if (impl_->input) {
    std::tie(label, probability) = dense_softmax(*impl_->input, *impl_->output, impl_->dim, words);
  } else {
    fasttext::Predictions predictions;
    impl_->fasttext.predict(1, words, predictions, 0.0);
    if (!predictions.empty()) {
      label = predictions[0].second;
      probability = std::exp(static_cast<double>(predictions[0].first));  // fastText gives log(p + 1e-5)
    }
  }
  if (label < 0 || static_cast<size_t>(label) >= impl_->verdicts.size()) return {};
  TriagePrediction out;
  out.verdict = impl_->verdicts[static_cast<size_t>(label)];
  out.probability = std::clamp(probability, 1e-12, 1.0);
  return out;
}

std::vector<nlohmann::json> TriageModel::answers() const { return impl_->verdicts; }

TriageTrainReport train_triage(const std::vector<std::pair<std::string, nlohmann::json>>& examples,
                               const TriageTrainOptions& options, const std::string& out_path) {
  check_range("epochs", options.epochs, 1, 1000);
  check_range("learning rate", options.learning_rate, 0, 10, true);
  check_range("word n-grams", options.word_ngrams, 1, 5);
  check_range("dimension", options.dimension, 1, 1000);
  check_range("threads", options.threads, 1, 256);
  check_range("buckets", options.buckets, 1, 10000000);
  if (examples.empty()) throw std::invalid_argument("triage training: no examples");
  TriageTrainReport report;
  std::vector<std::string> answers;
  answers.reserve(examples.size());
  for (const auto& [content, answer] : examples) {
    answers.push_back(answer_text(answer));
    const nlohmann::json verdict = answer_verdict(answers.back());
    ++report.per_answer[verdict.is_string() ? verdict.get<std::string>() : verdict.dump()];
  }
  report.examples = examples.size();
  if (report.per_answer.size() < 2)
    throw std::invalid_argument("triage training needs examples of at least two different answers, got only \"" +
                                report.per_answer.begin()->first + "\"");

  const TempFolder tmp("arbiter-triage");
  const std::string train_path = tmp.file("train.txt");
  {
    std::ofstream out(train_path, std::ios::binary);
    for (size_t i = 0; i < examples.size(); ++i) out << kLabelPrefix << answers[i] << ' ' << triage_text(examples[i].first) << '\n';
    out.flush();
    if (!out) throw std::runtime_error("cannot write the training file " + train_path);
  }

  fasttext::Args args;
  args.input = train_path;
  args.model = fasttext::model_name::sup;
  args.loss = fasttext::loss_name::softmax;
  args.label = kLabelPrefix;
  args.minCount = 1;
  args.minCountLabel = 0;
  args.minn = 0;  // no character n-grams: words (and word n-grams) only
  args.maxn = 0;
  args.epoch = options.epochs;
  args.lr = options.learning_rate;
  args.wordNgrams = options.word_ngrams;
  args.dim = options.dimension;
  args.thread = options.threads;
  args.bucket = options.word_ngrams > 1 ? options.buckets : 0;  // buckets hold word n-grams only
  args.verbose = 0;
  fasttext::FastText model;
  try {
    model.train(args);
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("triage training failed: ") + e.what());
  }

  // Written aside and renamed over the destination, so a server never loads half a model.
  const std::string partial = out_path + ".partial";
  try {
    model.saveModel(partial);
  } catch (const std::exception& e) {
    std::error_code ignored;
    std::filesystem::remove(partial, ignored);
    throw std::runtime_error("cannot write triage model " + out_path + ": " + e.what());
  }
  std::error_code ec;
  std::filesystem::rename(partial, out_path, ec);
  if (ec) {
    std::filesystem::remove(partial, ec);
    throw std::runtime_error("cannot write triage model " + out_path + ": " + ec.message());
  }
  return report;
}

std::shared_ptr<const TriageModel> TriageModels::get(const std::string& name) const {
  if (folder_.empty())
    throw std::invalid_argument("triage model \"" + name + "\": no triage folder is set (arbiter serve --triage-dir)");
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
      name.find('\0') != std::string::npos)
    throw std::invalid_argument("triage model \"" + name + "\": must be a plain file name in the triage folder");
  const std::lock_guard lock(mutex_);
  if (const auto it = loaded_.find(name); it != loaded_.end()) return it->second;
  std::shared_ptr<const TriageModel> model;
  try {
    model = TriageModel::load((std::filesystem::path(folder_) / name).string());
  } catch (const std::runtime_error& e) {
    throw std::invalid_argument(e.what());
  }
  loaded_.emplace(name, model);
  return model;
}

}  // namespace arbiter
