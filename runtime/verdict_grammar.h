// Constrained final answers: a token-level grammar of the verdicts a policy's format admits, and a
// per-generation tracker that says which tokens the next position may take once the model is inside
// the final channel's content. With it a finished generation always carries a parseable verdict.
//
// The answers of a format are an automaton over bytes (answer_automaton.h: a label set's trie, or
// 0 / 1 / the JSON verdict with its optional free-text members). A token is allowed at a state when
// its bytes lead, byte by byte, to a state from which a whole answer can still be reached. That
// admits every tokenization of an answer the model could produce (not only the tokenizer's
// canonical one), so the model is never pushed off its own preferred spelling. At a state that
// completes an answer the stop token (<|return|>) is allowed too; after it nothing is.
//
// Free text (a rationale) has no length of its own, so the answer must still fit the generation:
// every state knows the fewest bytes to a whole answer (its distance), and a token is only offered
// when the answer can still be finished after it with the tokens left (each token is at least one
// byte: a token is offered when the distance it leads to is at most tokens_left - 2, the last token
// being the stop). So a constrained answer that started in time always ends in time, and with few
// tokens left only tokens that bring the answer closer remain (the closing set).
//
// Where the offered set is most of the vocabulary (inside a JSON string), the mask is sent as the
// refused tokens instead, with the closing set as a fallback (AnswerMask). Every mask of a state is
// a slice of one array: [never allowed | allowed tokens by the distance they lead to, farthest
// first | the stop token], so a mask for any number of tokens left is a suffix (offered) or a prefix
// (refused) of it, with nothing built per step.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "runtime/answer_automaton.h"
#include "runtime/harmony.h"
#include "runtime/tokenizer.h"

namespace arbiter {

// The well-formed answers of a label set (runtime/answer_automaton.h: label_answers), kept for the
// callers that list them. A policy without labels has no finite list (its JSON verdict carries free
// text): verdict_automaton({}) describes it.
std::vector<std::string> verdict_answers(const std::vector<std::string>& labels);

// Which tokens the next position may take. refused empty: exactly `allowed`. refused non-empty:
// every token except `refused`, and `allowed` is a non-empty subset of them to fall back on when
// none of the tokens a sampler looks at is permitted (the engine samples from its top candidates).
struct AnswerMask {
  std::span<const int32_t> allowed;  // in no particular order
  std::span<const int32_t> refused;  // in no particular order
  bool empty() const { return allowed.empty() && refused.empty(); }
};

// The token automaton of a policy's answers, with each state's allowed tokens precomputed. Immutable
// once built; shared by every sequence under the same format.
class VerdictGrammar {
 public:
  static constexpr int kDone = -2;     // state after the stop token: nothing more is allowed
  static constexpr int kInvalid = -1;  // a token outside the grammar was seen

  // Lifts `answers` to the vocabulary of `tokenizer` (special tokens never spell an answer; `stop`
  // ends a whole one). Throws std::invalid_argument when the start cannot reach a whole answer. The
  // tokenizer must outlive the grammar (trackers parse harmony with it).
  VerdictGrammar(const Tokenizer& tokenizer, const AnswerAutomaton& answers, int32_t stop = harmony_ids::kReturn);
  // The grammar of a finite set of answers (non-empty strings; throws std::invalid_argument for none
  // or an empty one).
  VerdictGrammar(const Tokenizer& tokenizer, const std::vector<std::string>& answers, int32_t stop = harmony_ids::kReturn);
  // The grammar of a policy's format: verdict_automaton(labels); nullptr when nothing can be
  // constrained (labels none of which the label parser could match).
  static std::shared_ptr<const VerdictGrammar> for_labels(const Tokenizer& tokenizer, const std::vector<std::string>& labels);

  int start() const { return 0; }
  // What may follow at `state` with `tokens_left` tokens still to generate (this one included): the
  // tokens after which the answer can still be finished in time (see the top of this file; when it
  // cannot be any more, the closing set). Empty for kDone / kInvalid.
  AnswerMask mask(int state, int tokens_left = std::numeric_limits<int>::max()) const;
  // Whether `token` is allowed at `state` (any number of tokens left).
  bool allows(int state, int32_t token) const { return advance(state, token) != kInvalid; }
  // The allowed tokens at `state`, ascending (the stop token included at a whole answer).
  std::vector<int32_t> allowed(int state) const;
  // The state after `token` at `state`: a state, kDone after the stop token at a complete answer, or
  // kInvalid when the token is not allowed there.
  int advance(int state, int32_t token) const;
  // Whether the text at `state` is a whole answer.
  bool complete(int state) const;
  // The fewest bytes from `state` to a whole answer (0 at one).
  int distance(int state) const;
  // The shortest text that reaches `state` (for a label set, whose states form a trie: the text so far).
  const std::string& text(int state) const;

  int32_t stop_token() const { return stop_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  size_t num_states() const { return states_.size(); }

 private:
  struct State {
    std::string text;
    bool complete = false;
    int distance = 0;
    std::vector<std::pair<int32_t, int>> next;  // (token, state), sorted by token; the stop token excluded
    // [never allowed (kept only where most of the vocabulary is allowed) | allowed tokens, the
    // distance they lead to descending | the stop token at a whole answer], and the distance of each
    // allowed token (parallel to that middle part; the stop counts as -1).
    std::vector<int32_t> tokens;
    size_t never = 0;
    std::vector<int> leads_to;
    bool refusing = false;  // most of the vocabulary is allowed: masks may be sent as refused tokens
  };
  const State* find(int state) const;

  const Tokenizer* tokenizer_;
  int32_t stop_;
  std::vector<State> states_;
};

// Follows one generation token by token (forced tokens included) with the harmony parser the
// classifier uses, and constrains the content of its final-channel message: from the token after
// `<|channel|>final ...<|message|>` on, mask() says what the grammar admits. Before that
// (the analysis channel, headers) and after the answer ended, nothing is constrained.
class FinalAnswerTracker {
 public:
  explicit FinalAnswerTracker(std::shared_ptr<const VerdictGrammar> grammar);

  // Consumes one generated token.
  void push(int32_t token);
  // Whether the next token is constrained (the model is inside the final message's content and the
  // answer has not ended).
  bool active() const { return state_ >= 0; }
  // What the next token may be when active(), with `tokens_left` tokens still to generate (this one
  // included); empty (free) when not active.
  AnswerMask mask(int tokens_left = std::numeric_limits<int>::max()) const;
  // kInvalid when a token outside the grammar was generated in the final content (an engine that
  // did not apply the mask); the rest of that generation is then left free.
  int state() const { return state_; }
  bool in_final() const { return in_final_; }

 private:
  std::shared_ptr<const VerdictGrammar> grammar_;
  HarmonyParser parser_;
  bool in_final_ = false;
  int state_ = VerdictGrammar::kInvalid;  // grammar state while in the final content
};

}  // namespace arbiter
