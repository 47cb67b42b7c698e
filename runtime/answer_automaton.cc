#include "runtime/answer_automaton.h"

#include <algorithm>
#include <map>
#include <stdexcept>

namespace arbiter {
namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

constexpr std::string_view kJsonWhitespace = " \t\n\r";

void add_unique(std::vector<std::string>& out, std::string answer) {
  if (std::find(out.begin(), out.end(), answer) == out.end()) out.push_back(std::move(answer));
}

// Builds the JSON verdict's automaton on top of an automaton whose start already leads to "0"/"1".
class JsonVerdictBuilder {
 public:
  explicit JsonVerdictBuilder(AnswerAutomaton& a) : a_(a) {}

  // The object; returns the state after its '{'.
  int object() {
    const int open = a_.add_state();
    const int end = a_.add_state();
    a_.set_complete(end);

    // {"violation": 0|1
    const int key = a_.add_state();
    a_.set_edge(open, '"', key);
    const int violation_key = a_.add_path(key, "violation\"");
    const int violation_value = a_.add_state();
    a_.set_edge(violation_key, ':', violation_value);
    const int after_value = a_.add_state();  // after any member's value: ',' or '}'
    a_.set_edge(violation_value, '0', after_value);
    a_.set_edge(violation_value, '1', after_value);
    a_.set_edge(after_value, '}', end);

    // , "name": value — the optional members.
    const int next_member = a_.add_state();
    a_.set_edge(after_value, ',', next_member);
    const int name = a_.add_state();
    a_.set_edge(next_member, '"', name);
    auto member = [&](std::string_view key_text) {
      const int k = a_.add_path(name, std::string(key_text) + "\"");
      const int value = a_.add_state();
      a_.set_edge(k, ':', value);
      spaced_.push_back(k);
      spaced_.push_back(value);
      return value;
    };
    const int category = member("policy_category");
    a_.set_edge(category, '"', string_to(after_value));
    path_to(category, "null", after_value);
    const int rules = member("rule_ids");
    const int list = a_.add_state(), after_item = a_.add_state(), next_item = a_.add_state();
    a_.set_edge(rules, '[', list);
    a_.set_edge(list, '"', string_to(after_item));
    a_.set_edge(list, ']', after_value);
    a_.set_edge(after_item, ',', next_item);
    a_.set_edge(after_item, ']', after_value);
    a_.set_edge(next_item, '"', string_to(after_item));
    const int confidence = member("confidence");
    a_.set_edge(confidence, '"', string_to(after_value));
    const int rationale = member("rationale");
    a_.set_edge(rationale, '"', string_to(after_value));

    // Whitespace where JSON allows it, each state's own edges complete by now.
    for (const int s : {open, violation_key, violation_value, after_value, next_member, list, after_item, next_item})
      spaced_.push_back(s);
    const std::vector<int> number_ends = number_from(confidence);
    for (const int s : spaced_) allow_whitespace(s);
    // Where a number may end, the edges of the state after a value (whitespace, ',' and '}').
    for (const int s : number_ends)
      for (int b = 0; b < 256; ++b)
        if (a_.next(s, static_cast<unsigned char>(b)) < 0 && a_.next(after_value, static_cast<unsigned char>(b)) >= 0)
          a_.set_edge(s, static_cast<unsigned char>(b), a_.next(after_value, static_cast<unsigned char>(b)));
    return open;
  }

 private:
  // `text` from `from`, its last byte leading to `to`.
  void path_to(int from, std::string_view text, int to) {
    const int before_last = a_.add_path(from, text.substr(0, text.size() - 1));
    a_.set_edge(before_last, static_cast<unsigned char>(text.back()), to);
  }

  // A copy of `state`'s edges except whitespace: the state after a run of whitespace.
  int copy_without_whitespace(int state) {
    const int copy = a_.add_state();
    for (int b = 0; b < 256; ++b)
      if (kJsonWhitespace.find(static_cast<char>(b)) == std::string_view::npos && a_.next(state, static_cast<unsigned char>(b)) >= 0)
        a_.set_edge(copy, static_cast<unsigned char>(b), a_.next(state, static_cast<unsigned char>(b)));
    return copy;
  }

  // Runs of 1..kMaxWhitespace whitespace bytes before any of `state`'s edges.
  void allow_whitespace(int state) {
    int prev = state;
    for (int run = 0; run < AnswerAutomaton::kMaxWhitespace; ++run) {
      const int after = copy_without_whitespace(state);
      for (const char c : kJsonWhitespace) a_.set_edge(prev, static_cast<unsigned char>(c), after);
      prev = after;
    }
  }

  // The content of a JSON string whose closing quote leads to `exit` (one per exit, shared).
  int string_to(int exit) {
    const auto found = strings_.find(exit);
    if (found != strings_.end()) return found->second;
    const int body = a_.add_state();
    strings_[exit] = body;
    a_.set_edge(body, '"', exit);
    for (int b = 0x20; b < 0x80; ++b)
      if (b != '"' && b != '\\') a_.set_edge(body, static_cast<unsigned char>(b), body);
    // Escapes: \" \\ \/ \b \f \n \r \t and \uXXXX, surrogates (D800..DFFF) only as a high-low pair.
    const int escape = a_.add_state();
    a_.set_edge(body, '\\', escape);
    for (const char c : std::string_view("\"\\/bfnrt")) a_.set_edge(escape, static_cast<unsigned char>(c), body);
    const int hex1 = a_.add_state(), hex2 = a_.add_state(), hex3 = a_.add_state(), hex4 = a_.add_state();
    const int hex2_after_d = a_.add_state();
    a_.set_edge(escape, 'u', hex1);
    for (const char c : std::string_view("0123456789abcdefABCDEF")) {
      const auto b = static_cast<unsigned char>(c);
      a_.set_edge(hex1, b, c == 'd' || c == 'D' ? hex2_after_d : hex2);
      a_.set_edge(hex2, b, hex3);
      a_.set_edge(hex3, b, hex4);
      a_.set_edge(hex4, b, body);
    }
    for (const char c : std::string_view("01234567")) a_.set_edge(hex2_after_d, static_cast<unsigned char>(c), hex3);
    // A high surrogate (D800..DBFF) only as the first half of a pair: \uD8xx..\uDBxx then \uDCxx..\uDFxx.
    const int high3 = a_.add_state(), high4 = a_.add_state(), high_done = a_.add_state(), low_escape = a_.add_state();
    const int low_u = a_.add_state(), low_d = a_.add_state(), low3 = a_.add_state(), low4 = a_.add_state();
    for (const char c : std::string_view("89abAB")) a_.set_edge(hex2_after_d, static_cast<unsigned char>(c), high3);
    for (const char c : std::string_view("0123456789abcdefABCDEF")) {
      const auto b = static_cast<unsigned char>(c);
      a_.set_edge(high3, b, high4);
      a_.set_edge(high4, b, high_done);
      a_.set_edge(low3, b, low4);
      a_.set_edge(low4, b, body);
    }
    a_.set_edge(high_done, '\\', low_escape);
    a_.set_edge(low_escape, 'u', low_u);
    a_.set_edge(low_u, 'd', low_d);
    a_.set_edge(low_u, 'D', low_d);
    for (const char c : std::string_view("cdefCDEF")) a_.set_edge(low_d, static_cast<unsigned char>(c), low3);
    // UTF-8 (RFC 3629): the lead byte fixes how many continuation bytes follow and, for E0, ED, F0
    // and F4, the range of the first one (no overlong forms, no surrogates, nothing past U+10FFFF).
    const int cont1 = a_.add_state(), cont2 = a_.add_state(), cont3 = a_.add_state();
    auto range = [&](int from, int lo, int hi, int to) {
      for (int b = lo; b <= hi; ++b) a_.set_edge(from, static_cast<unsigned char>(b), to);
    };
    range(cont1, 0x80, 0xBF, body);
    range(cont2, 0x80, 0xBF, cont1);
    range(cont3, 0x80, 0xBF, cont2);
    const int after_e0 = a_.add_state(), after_ed = a_.add_state(), after_f0 = a_.add_state(), after_f4 = a_.add_state();
    range(after_e0, 0xA0, 0xBF, cont1);
    range(after_ed, 0x80, 0x9F, cont1);
    range(after_f0, 0x90, 0xBF, cont2);
    range(after_f4, 0x80, 0x8F, cont2);
    range(body, 0xC2, 0xDF, cont1);
    a_.set_edge(body, 0xE0, after_e0);
    range(body, 0xE1, 0xEC, cont2);
    a_.set_edge(body, 0xED, after_ed);
    range(body, 0xEE, 0xEF, cont2);
    a_.set_edge(body, 0xF0, after_f0);
    range(body, 0xF1, 0xF3, cont3);
    a_.set_edge(body, 0xF4, after_f4);
    return body;
  }

  // A JSON number from `from`; returns the states where it may end.
  std::vector<int> number_from(int from) {
    const int minus = a_.add_state(), zero = a_.add_state(), integer = a_.add_state();
    const int dot = a_.add_state(), fraction = a_.add_state();
    const int exponent = a_.add_state(), exponent_sign = a_.add_state(), exponent_digits = a_.add_state();
    auto digits = [&](int s, char lo, int to) {
      for (char c = lo; c <= '9'; ++c) a_.set_edge(s, static_cast<unsigned char>(c), to);
    };
    for (const int s : {from, minus}) {
      a_.set_edge(s, '0', zero);
      digits(s, '1', integer);
    }
    a_.set_edge(from, '-', minus);
    digits(integer, '0', integer);
    for (const int s : {zero, integer}) a_.set_edge(s, '.', dot);
    digits(dot, '0', fraction);
    digits(fraction, '0', fraction);
    for (const int s : {zero, integer, fraction}) {
      a_.set_edge(s, 'e', exponent);
      a_.set_edge(s, 'E', exponent);
    }
    a_.set_edge(exponent, '+', exponent_sign);
    a_.set_edge(exponent, '-', exponent_sign);
    digits(exponent, '0', exponent_digits);
    digits(exponent_sign, '0', exponent_digits);
    digits(exponent_digits, '0', exponent_digits);
    return {zero, integer, fraction, exponent_digits};
  }

  AnswerAutomaton& a_;
  std::vector<int> spaced_;     // states that take whitespace before their edges
  std::map<int, int> strings_;  // exit state -> string body
};

}  // namespace

AnswerAutomaton::AnswerAutomaton() { add_state(); }

int AnswerAutomaton::add_state() {
  std::array<int32_t, 256> none;
  none.fill(kNone);
  edges_.push_back(none);
  complete_.push_back(0);
  return static_cast<int>(edges_.size()) - 1;
}

void AnswerAutomaton::set_edge(int from, unsigned char byte, int to) {
  if (from < 0 || to < 0 || static_cast<size_t>(from) >= edges_.size() || static_cast<size_t>(to) >= edges_.size())
    throw std::out_of_range("AnswerAutomaton: no such state");
  edges_[static_cast<size_t>(from)][byte] = to;
}

void AnswerAutomaton::set_complete(int state) { complete_.at(static_cast<size_t>(state)) = 1; }

int AnswerAutomaton::add_path(int from, std::string_view text) {
  int state = from;
  for (const char c : text) {
    const auto b = static_cast<unsigned char>(c);
    int to = next(state, b);
    if (to < 0) {
      to = add_state();
      set_edge(state, b, to);
    }
    state = to;
  }
  return state;
}

int AnswerAutomaton::run(std::string_view text, int from) const {
  int state = from;
  for (const char c : text) {
    if (state < 0) return kNone;
    state = next(state, static_cast<unsigned char>(c));
  }
  return state;
}

bool AnswerAutomaton::accepts(std::string_view text) const {
  const int state = run(text);
  return state >= 0 && complete(state);
}

AnswerAutomaton answers_automaton(const std::vector<std::string>& answers) {
  AnswerAutomaton a;
  for (const std::string& answer : answers) {
    if (answer.empty()) throw std::invalid_argument("AnswerAutomaton: an empty answer");
    a.set_complete(a.add_path(a.start(), answer));
  }
  return a;
}

std::vector<std::string> label_answers(const std::vector<std::string>& labels) {
  std::vector<std::string> base;
  // The label parser compares the trimmed answer with each label: a label that is empty or starts
  // or ends with whitespace can never be the answer, so it has no well-formed spelling.
  for (const std::string& label : labels)
    if (!label.empty() && !is_space(label.front()) && !is_space(label.back())) add_unique(base, label);
  std::vector<std::string> answers = base;
  for (const std::string& a : base) add_unique(answers, " " + a);
  return answers;
}

AnswerAutomaton verdict_automaton(const std::vector<std::string>& labels) {
  if (!labels.empty()) {
    const std::vector<std::string> answers = label_answers(labels);
    if (answers.empty()) throw std::invalid_argument("no label of the policy can be matched by the label parser");
    return answers_automaton(answers);
  }
  // A policy without labels is read as 0/1 or as a JSON verdict, whichever the answer looks like
  // (Classifier::interpret); the automaton admits both and the model picks by its first token.
  AnswerAutomaton a = answers_automaton({"0", "1", " 0", " 1"});
  const int open = JsonVerdictBuilder(a).object();
  a.set_edge(a.start(), '{', open);
  a.set_edge(a.next(a.start(), ' '), '{', open);
  return a;
}

}  // namespace arbiter
