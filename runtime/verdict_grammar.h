// Constrained final answers: a token-level grammar of the verdicts a policy's format admits, and a
// per-generation tracker that says which tokens the next position may take once the model is inside
// the final channel's content. With it a finished generation always carries a parseable verdict.
//
// Every supported format has a finite set of well-formed answers, so one automaton serves them all:
// a trie over the answers' bytes. A state is a node of that trie (the answer text so far); a token
// is allowed at a node when its bytes lead to another node, i.e. when the text so far followed by
// the token is still a prefix of some answer. That admits every tokenization of an answer the model
// could produce (not only the tokenizer's canonical one), so the model is never pushed off its own
// preferred spelling. At a node that completes an answer the stop token (<|return|>) is allowed too;
// after it nothing is. The answers per format (verdict_answers):
//   - labels: each declared label, and the label after one space (the label parser trims);
//   - binary / JSON (a policy without labels, whose answer the classifier reads as 0/1 or as a JSON
//     object): "0", "1", and the JSON verdict shape {"violation": 0} / {"violation": 1} (also without
//     the space after the colon), each also after one space. The JSON shape is deliberately minimal:
//     only the required field, so that every answer is short and finite; optional fields (category,
//     rationale) need free text, which a small allowed-token list cannot describe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "runtime/harmony.h"
#include "runtime/tokenizer.h"

namespace arbiter {

// The well-formed answers of a policy: its labels (with leading-space variants) when it declares
// any, else 0/1 and the minimal JSON verdict shape (see the header comment). Labels that the label
// parser could never match (empty, or with leading/trailing whitespace) are left out; an empty
// result means nothing can be constrained.
std::vector<std::string> verdict_answers(const std::vector<std::string>& labels);

// A trie over the bytes of a finite set of answers, with the allowed tokens of every node
// precomputed. Immutable once built; shared by every sequence under the same answers.
class VerdictGrammar {
 public:
  static constexpr int kDone = -2;     // state after the stop token: nothing more is allowed
  static constexpr int kInvalid = -1;  // a token outside the grammar was seen

  // Builds the automaton over `answers` (non-empty strings; duplicates ignored) with the token
  // bytes of `tokenizer` (special tokens never appear in an answer). `stop` is allowed after a
  // complete answer. Throws std::invalid_argument for no answers or an empty one. The tokenizer
  // must outlive the grammar (trackers parse harmony with it).
  VerdictGrammar(const Tokenizer& tokenizer, std::vector<std::string> answers, int32_t stop = harmony_ids::kReturn);

  int start() const { return 0; }
  // Token ids allowed at `state` (ascending; never empty for a node). Empty for kDone / kInvalid.
  std::span<const int32_t> allowed(int state) const;
  // The state after `token` at `state`: a node, kDone after the stop token at a complete answer, or
  // kInvalid when the token is not allowed there.
  int advance(int state, int32_t token) const;
  // Whether the text at `state` is a whole answer.
  bool complete(int state) const;
  // The text an in-grammar state stands for (for tests and messages).
  const std::string& text(int state) const;

  const std::vector<std::string>& answers() const { return answers_; }
  int32_t stop_token() const { return stop_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  size_t num_states() const { return nodes_.size(); }

 private:
  struct Node {
    std::string text;                          // the answer prefix this node stands for
    bool complete = false;
    std::vector<int32_t> allowed;              // ascending
    std::vector<std::pair<int32_t, int>> next; // (token, node), sorted by token; the stop token excluded
  };
  int child(int node, unsigned char byte) const;

  const Tokenizer* tokenizer_;
  std::vector<std::string> answers_;
  int32_t stop_;
  std::vector<Node> nodes_;
  std::vector<std::vector<std::pair<unsigned char, int>>> bytes_;  // byte trie: per node, (byte, child)
};

// Follows one generation token by token (forced tokens included) with the harmony parser the
// classifier uses, and constrains the content of its final-channel message: from the token after
// `<|channel|>final ...<|message|>` on, allowed() lists the tokens the grammar admits. Before that
// (the analysis channel, headers) and after the answer ended, nothing is constrained.
class FinalAnswerTracker {
 public:
  explicit FinalAnswerTracker(std::shared_ptr<const VerdictGrammar> grammar);

  // Consumes one generated token.
  void push(int32_t token);
  // Whether the next token is constrained (the model is inside the final message's content and the
  // answer has not ended).
  bool active() const { return state_ >= 0; }
  // The allowed ids for the next token when active(), else empty (free).
  std::span<const int32_t> allowed() const;
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
