#include "runtime/verdict_grammar.h"

#include <algorithm>
#include <array>
#include <deque>
#include <stdexcept>

namespace arbiter {
namespace {

constexpr int kFar = std::numeric_limits<int>::max();

}  // namespace

std::vector<std::string> verdict_answers(const std::vector<std::string>& labels) { return label_answers(labels); }

VerdictGrammar::VerdictGrammar(const Tokenizer& tokenizer, const std::vector<std::string>& answers, int32_t stop)
    : VerdictGrammar(tokenizer, answers.empty() ? throw std::invalid_argument("VerdictGrammar: no answers")
                                                : answers_automaton(answers),
                     stop) {}

VerdictGrammar::VerdictGrammar(const Tokenizer& tokenizer, const AnswerAutomaton& a, int32_t stop)
    : tokenizer_(&tokenizer), stop_(stop) {
  const size_t n = a.num_states();
  // Distance to a whole answer, by a breadth-first search backwards from the complete states; a
  // state with none (kFar) is dead: no token may lead into it.
  std::vector<std::vector<int>> into(n);
  for (size_t s = 0; s < n; ++s)
    for (int b = 0; b < 256; ++b)
      if (const int t = a.next(static_cast<int>(s), static_cast<unsigned char>(b)); t >= 0)
        into[static_cast<size_t>(t)].push_back(static_cast<int>(s));
  std::vector<int> distance(n, kFar);
  std::deque<int> queue;
  for (size_t s = 0; s < n; ++s)
    if (a.complete(static_cast<int>(s))) {
      distance[s] = 0;
      queue.push_back(static_cast<int>(s));
    }
  while (!queue.empty()) {
    const int t = queue.front();
    queue.pop_front();
    for (const int s : into[static_cast<size_t>(t)])
      if (distance[static_cast<size_t>(s)] == kFar) {
        distance[static_cast<size_t>(s)] = distance[static_cast<size_t>(t)] + 1;
        queue.push_back(s);
      }
  }
  if (distance[static_cast<size_t>(a.start())] == kFar) throw std::invalid_argument("VerdictGrammar: no whole answer");
  auto live = [&](int s) { return s >= 0 && distance[static_cast<size_t>(s)] != kFar; };

  // The live states reachable from the start, numbered in breadth-first order (the start is 0), each
  // with the shortest text that reaches it.
  std::vector<int> index(n, -1);
  std::vector<int> order = {a.start()};
  index[static_cast<size_t>(a.start())] = 0;
  states_.emplace_back();
  for (size_t i = 0; i < order.size(); ++i) {
    const int s = order[i];
    for (int b = 0; b < 256; ++b) {
      const int t = a.next(s, static_cast<unsigned char>(b));
      if (!live(t) || index[static_cast<size_t>(t)] >= 0) continue;
      index[static_cast<size_t>(t)] = static_cast<int>(order.size());
      order.push_back(t);
      State next;
      next.text = states_[i].text + static_cast<char>(b);
      states_.push_back(std::move(next));
    }
  }

  // The vocabulary's ordinary tokens by first byte: a state only looks at the tokens whose first
  // byte it takes.
  std::array<std::vector<int32_t>, 256> by_first;
  for (int32_t id = 0; id < tokenizer.num_ranks(); ++id) {
    const auto bytes = tokenizer.token_bytes(id);
    if (bytes && !bytes->empty() && id != stop_) by_first[static_cast<unsigned char>(bytes->front())].push_back(id);
  }
  const size_t vocab = static_cast<size_t>(tokenizer.vocab_size());
  for (size_t i = 0; i < order.size(); ++i) {
    const int s = order[i];
    State& state = states_[i];
    state.complete = a.complete(s);
    state.distance = distance[static_cast<size_t>(s)];
    for (int b = 0; b < 256; ++b) {
      const int first = a.next(s, static_cast<unsigned char>(b));
      if (!live(first)) continue;
      for (const int32_t id : by_first[static_cast<size_t>(b)]) {
        const std::string_view bytes = *tokenizer.token_bytes(id);
        int t = first;
        for (size_t k = 1; k < bytes.size() && live(t); ++k) t = a.next(t, static_cast<unsigned char>(bytes[k]));
        if (live(t)) state.next.emplace_back(id, index[static_cast<size_t>(t)]);
      }
    }
    std::sort(state.next.begin(), state.next.end());
    // The allowed tokens, the distance they lead to descending (then by id), the stop last.
    std::vector<std::pair<int, int32_t>> by_distance;
    by_distance.reserve(state.next.size() + 1);
    for (const auto& [token, to] : state.next)
      by_distance.emplace_back(distance[static_cast<size_t>(order[static_cast<size_t>(to)])], token);
    if (state.complete) by_distance.emplace_back(-1, stop_);
    std::sort(by_distance.begin(), by_distance.end(),
              [](const auto& x, const auto& y) { return x.first != y.first ? x.first > y.first : x.second < y.second; });
    // A state without a token that shortens its distance cannot happen for a byte-level vocabulary
    // (every single byte is a token); say so if a tokenizer lacks one.
    if (by_distance.empty() || by_distance.back().first >= state.distance)
      throw std::invalid_argument("VerdictGrammar: no token continues '" + state.text + "'");
    state.refusing = by_distance.size() > vocab / 2;
    if (state.refusing) {
      std::vector<int32_t> allowed;
      for (const auto& [d, token] : by_distance) allowed.push_back(token);
      std::sort(allowed.begin(), allowed.end());
      for (int32_t id = 0; id < static_cast<int32_t>(vocab); ++id)
        if (!std::binary_search(allowed.begin(), allowed.end(), id)) state.tokens.push_back(id);
      state.never = state.tokens.size();
    }
    for (const auto& [d, token] : by_distance) {
      state.tokens.push_back(token);
      state.leads_to.push_back(d);
    }
  }
}

std::shared_ptr<const VerdictGrammar> VerdictGrammar::for_labels(const Tokenizer& tokenizer,
                                                                 const std::vector<std::string>& labels) {
  if (!labels.empty() && label_answers(labels).empty()) return nullptr;
  return std::make_shared<const VerdictGrammar>(tokenizer, verdict_automaton(labels));
}

const VerdictGrammar::State* VerdictGrammar::find(int state) const {
  if (state < 0 || static_cast<size_t>(state) >= states_.size()) return nullptr;
  return &states_[static_cast<size_t>(state)];
}

AnswerMask VerdictGrammar::mask(int state, int tokens_left) const {
  const State* s = find(state);
  if (!s) return {};
  // Offer the tokens after which the answer can still be finished: those leading to a distance of
  // at most tokens_left - 2 (the stop takes the last token). When the answer cannot be finished in
  // time any more, offer the closing set, so that it comes as close as it can.
  const int64_t limit = std::max<int64_t>(int64_t{tokens_left} - 2, int64_t{s->distance} - 1);
  // leads_to is descending: the offered tokens are its tail.
  const auto first = std::partition_point(s->leads_to.begin(), s->leads_to.end(), [&](int d) { return d > limit; });
  const size_t offered_from = s->never + static_cast<size_t>(first - s->leads_to.begin());
  const std::span<const int32_t> all(s->tokens);
  const std::span<const int32_t> offered = all.subspan(offered_from);
  if (!s->refusing || offered.size() <= all.size() / 2) return {offered, {}};
  // Most of the vocabulary: send what is refused (everything before the offered tokens), with the
  // closing set (the tokens leading closer than this state) to fall back on.
  const auto closing = std::partition_point(s->leads_to.begin(), s->leads_to.end(), [&](int d) { return d >= s->distance; });
  return {all.subspan(s->never + static_cast<size_t>(closing - s->leads_to.begin())), all.first(offered_from)};
}

std::vector<int32_t> VerdictGrammar::allowed(int state) const {
  const State* s = find(state);
  if (!s) return {};
  std::vector<int32_t> out(s->tokens.begin() + static_cast<std::ptrdiff_t>(s->never), s->tokens.end());
  std::sort(out.begin(), out.end());
  return out;
}

int VerdictGrammar::advance(int state, int32_t token) const {
  const State* s = find(state);
  if (!s) return kInvalid;
  if (token == stop_) return s->complete ? kDone : kInvalid;
  const auto it = std::lower_bound(s->next.begin(), s->next.end(), std::make_pair(token, -1));
  return it != s->next.end() && it->first == token ? it->second : kInvalid;
}

bool VerdictGrammar::complete(int state) const {
  const State* s = find(state);
  return s && s->complete;
}

int VerdictGrammar::distance(int state) const {
  const State* s = find(state);
  return s ? s->distance : kFar;
}

const std::string& VerdictGrammar::text(int state) const {
  static const std::string none;
  const State* s = find(state);
  return s ? s->text : none;
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

AnswerMask FinalAnswerTracker::mask(int tokens_left) const {
  if (!active()) return {};
  return grammar_->mask(state_, tokens_left);
}

}  // namespace arbiter
