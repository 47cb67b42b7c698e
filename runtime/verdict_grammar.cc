#include "runtime/verdict_grammar.h"

#include <algorithm>
#include <stdexcept>
#include <unordered_set>

namespace arbiter {
namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

void add_unique(std::vector<std::string>& out, std::string answer) {
  if (std::find(out.begin(), out.end(), answer) == out.end()) out.push_back(std::move(answer));
}

}  // namespace

std::vector<std::string> verdict_answers(const std::vector<std::string>& labels) {
  std::vector<std::string> base;
  if (!labels.empty()) {
    // The label parser compares the trimmed answer with each label: a label that is empty or starts
    // or ends with whitespace can never be the answer, so it has no well-formed spelling.
    for (const std::string& label : labels)
      if (!label.empty() && !is_space(label.front()) && !is_space(label.back())) add_unique(base, label);
  } else {
    // A policy without labels is read as 0/1 or as a JSON verdict, whichever the answer looks like
    // (Classifier::interpret); the grammar admits both and the model picks by its first token.
    base = {"0", "1", "{\"violation\": 0}", "{\"violation\": 1}", "{\"violation\":0}", "{\"violation\":1}"};
  }
  std::vector<std::string> answers;
  for (const std::string& a : base) add_unique(answers, a);
  for (const std::string& a : base) add_unique(answers, " " + a);  // every parser trims the answer
  return answers;
}

VerdictGrammar::VerdictGrammar(const Tokenizer& tokenizer, std::vector<std::string> answers, int32_t stop)
    : tokenizer_(&tokenizer), stop_(stop) {
  for (std::string& a : answers) {
    if (a.empty()) throw std::invalid_argument("VerdictGrammar: an empty answer");
    if (std::find(answers_.begin(), answers_.end(), a) == answers_.end()) answers_.push_back(std::move(a));
  }
  if (answers_.empty()) throw std::invalid_argument("VerdictGrammar: no answers");

  // The byte trie: node 0 is the empty text; each answer's path ends at a complete node.
  nodes_.push_back(Node{});
  bytes_.emplace_back();
  std::vector<std::vector<int>> paths;  // per answer: the node at each depth 0..size
  for (const std::string& a : answers_) {
    std::vector<int> path = {0};
    int node = 0;
    for (const char c : a) {
      const unsigned char b = static_cast<unsigned char>(c);
      int next = child(node, b);
      if (next < 0) {
        next = static_cast<int>(nodes_.size());
        Node n;
        n.text = nodes_[static_cast<size_t>(node)].text + c;
        nodes_.push_back(std::move(n));
        bytes_.emplace_back();
        bytes_[static_cast<size_t>(node)].emplace_back(b, next);
      }
      node = next;
      path.push_back(node);
    }
    nodes_[static_cast<size_t>(node)].complete = true;
    paths.push_back(std::move(path));
  }

  // Token edges: a token whose bytes are the answer's bytes [d, d + L) leads from the node at depth
  // d to the node at depth d + L. Every answer through a node is tried, so every way to spell every
  // answer with the vocabulary's tokens is covered.
  const size_t longest = std::max<size_t>(1, tokenizer.max_token_bytes());
  std::vector<std::unordered_set<int32_t>> seen(nodes_.size());
  for (size_t i = 0; i < answers_.size(); ++i) {
    const std::string& a = answers_[i];
    for (size_t d = 0; d < a.size(); ++d) {
      const int from = paths[i][d];
      for (size_t len = 1; len <= std::min(longest, a.size() - d); ++len) {
        const auto token = tokenizer.token_of_bytes(std::string_view(a).substr(d, len));
        if (!token || *token == stop_ || !seen[static_cast<size_t>(from)].insert(*token).second) continue;
        nodes_[static_cast<size_t>(from)].next.emplace_back(*token, paths[i][d + len]);
      }
    }
  }
  for (Node& n : nodes_) {
    std::sort(n.next.begin(), n.next.end());
    for (const auto& [token, to] : n.next) n.allowed.push_back(token);
    if (n.complete) n.allowed.push_back(stop_);
    std::sort(n.allowed.begin(), n.allowed.end());
    // A node every answer passes through without any token spelling its next bytes cannot happen
    // for a byte-level vocabulary (every single byte is a token); say so if a tokenizer lacks one.
    if (n.allowed.empty()) throw std::invalid_argument("VerdictGrammar: no token continues '" + n.text + "'");
  }
}

int VerdictGrammar::child(int node, unsigned char byte) const {
  for (const auto& [b, to] : bytes_[static_cast<size_t>(node)])
    if (b == byte) return to;
  return -1;
}

std::span<const int32_t> VerdictGrammar::allowed(int state) const {
  if (state < 0 || static_cast<size_t>(state) >= nodes_.size()) return {};
  return nodes_[static_cast<size_t>(state)].allowed;
}

int VerdictGrammar::advance(int state, int32_t token) const {
  if (state < 0 || static_cast<size_t>(state) >= nodes_.size()) return kInvalid;
  const Node& n = nodes_[static_cast<size_t>(state)];
  if (token == stop_) return n.complete ? kDone : kInvalid;
  const auto it = std::lower_bound(n.next.begin(), n.next.end(), std::make_pair(token, -1));
  return it != n.next.end() && it->first == token ? it->second : kInvalid;
}

bool VerdictGrammar::complete(int state) const {
  return state >= 0 && static_cast<size_t>(state) < nodes_.size() && nodes_[static_cast<size_t>(state)].complete;
}

const std::string& VerdictGrammar::text(int state) const {
  static const std::string none;
  if (state < 0 || static_cast<size_t>(state) >= nodes_.size()) return none;
  return nodes_[static_cast<size_t>(state)].text;
}

FinalAnswerTracker::FinalAnswerTracker(std::shared_ptr<const VerdictGrammar> grammar)
    : grammar_(std::move(grammar)), parser_(grammar_->tokenizer()) {}

void FinalAnswerTracker::push(int32_t token) {
  if (in_final_) {
    // Inside the final content every token walks the grammar; the harmony parser is not needed any
    // more (the answer ends the generation).
    if (state_ >= 0) state_ = grammar_->advance(state_, token);
    return;
  }
  parser_.push(token);
  // The final channel's content begins right after its header's <|message|> (generated by the
  // model, or forced when the reasoning budget closed the analysis): the same reading of the header
  // as the classifier's parser (channel "final", whatever content type or recipient follows).
  if (parser_.state() == HarmonyParser::State::kContent && parser_.current().channel == "final") {
    in_final_ = true;
    state_ = grammar_->start();
  }
}

std::span<const int32_t> FinalAnswerTracker::allowed() const {
  if (!active()) return {};
  return grammar_->allowed(state_);
}

}  // namespace arbiter
