// AnswerAutomaton: a deterministic automaton over bytes that accepts exactly the well-formed final
// answers of a policy's output format. The verdict grammar (verdict_grammar.h) lifts it to tokens.
//
// Two kinds are built here:
//   - a finite set of answers (a label set): a trie over their bytes (answers_automaton);
//   - a policy without labels (verdict_automaton({})): "0", "1", or the JSON verdict object the
//     safeguard guide describes, read by parse_json_verdict:
//       {"violation": 0|1}                                  required, and first
//       , "policy_category": "<text>" | null                 any of these after it, in any order
//       , "rule_ids": ["<text>", ...]
//       , "confidence": "<text>" | <number>
//       , "rationale": "<text>"
//     with JSON whitespace (runs of at most kMaxWhitespace bytes) between the tokens of the object,
//     strings that are valid JSON (escapes checked, \u surrogates only in pairs, UTF-8 checked as
//     RFC 3629 does), and numbers as JSON writes them.
//   Every answer may begin with one space (every parser trims the answer).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace arbiter {

class AnswerAutomaton {
 public:
  static constexpr int kNone = -1;        // no edge: the byte leaves every answer
  static constexpr int kMaxWhitespace = 8;  // bytes of one whitespace run inside the JSON verdict

  AnswerAutomaton();  // one state, the start (0), with no edges

  int add_state();
  void set_edge(int from, unsigned char byte, int to);
  void set_complete(int state);
  // Follows `text` from `from` over existing edges, creating states where none exists (a trie's
  // insertion); returns the state at its end.
  int add_path(int from, std::string_view text);

  int start() const { return 0; }
  int next(int state, unsigned char byte) const { return edges_[static_cast<size_t>(state)][byte]; }
  bool complete(int state) const { return complete_[static_cast<size_t>(state)] != 0; }
  size_t num_states() const { return edges_.size(); }
  // The state `text` leads to from `from`, or kNone when it leaves the automaton.
  int run(std::string_view text, int from = 0) const;
  // Whether `text` is a whole answer.
  bool accepts(std::string_view text) const;

 private:
  std::vector<std::array<int32_t, 256>> edges_;
  std::vector<uint8_t> complete_;
};

// The trie over a finite set of (non-empty) answers.
AnswerAutomaton answers_automaton(const std::vector<std::string>& answers);

// The answers of a label set: each label the label parser could match (not empty, no leading or
// trailing whitespace), and each after one space. Empty when no label can be matched.
std::vector<std::string> label_answers(const std::vector<std::string>& labels);

// The well-formed answers of a policy: its labels' trie, or for a policy without labels 0 / 1 /
// the JSON verdict (see the top of this file). Throws std::invalid_argument when labels are given
// but none can be matched (label_answers is empty).
AnswerAutomaton verdict_automaton(const std::vector<std::string>& labels);

}  // namespace arbiter
