// OpenAI's harmony chat format for gpt-oss: renders conversations to token ids exactly as the
// harmony reference does (system message with identity / cutoff / date / reasoning effort /
// channels, developer "# Instructions", user, assistant prefix; no separators between messages;
// all text encoded in content mode so it can never contain special tokens), and parses generated
// tokens back into messages token by token (HarmonyParser).
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/tokenizer.h"

namespace arbiter {

enum class ReasoningEffort { kLow, kMedium, kHigh };
const char* to_string(ReasoningEffort effort);
// "low" | "medium" | "high"; throws std::invalid_argument otherwise.
ReasoningEffort parse_reasoning_effort(const std::string& text);

struct SystemOptions {
  std::string model_identity = "You are ChatGPT, a large language model trained by OpenAI.";
  std::string knowledge_cutoff = "2024-06";
  std::optional<std::string> current_date;  // YYYY-MM-DD; omitted by default (stable prefixes)
  ReasoningEffort effort = ReasoningEffort::kMedium;
  std::vector<std::string> channels = {"analysis", "commentary", "final"};
  bool channels_required = true;
  bool function_tools = false;  // adds the "Calls to these tools must go to ... 'functions'." line
};

// The text of the system message (no header, no <|end|>).
std::string system_message_text(const SystemOptions& options);

struct Message {
  std::string author;         // system | developer | user | assistant, or a tool name (functions.x)
  std::string recipient;      // empty or "all": none
  std::string channel;        // analysis | commentary | final | empty
  std::string content_type;   // e.g. "json" or "<|constrain|>json"; empty: none
  std::string content;
};

// Thrown by a bounded HarmonyRenderer when a text stops tokenizing (Tokenizer::encode_bounded):
// kOverLimit (the output would take more than the limit) or kStopped (the stop predicate).
class RenderStopped : public std::runtime_error {
 public:
  explicit RenderStopped(EncodeEnd end)
      : std::runtime_error(end == EncodeEnd::kOverLimit ? "rendering over its token limit" : "rendering stopped"), end_(end) {}
  EncodeEnd end() const { return end_; }

 private:
  EncodeEnd end_;
};

class HarmonyRenderer {
 public:
  explicit HarmonyRenderer(const Tokenizer& tokenizer);
  // Texts are tokenized under `bounds`: bounds.max_tokens limits the vector rendered into (what it
  // held before counts), bounds.stop may end the work; either throws RenderStopped.
  HarmonyRenderer(const Tokenizer& tokenizer, EncodeBounds bounds);

  // One message: <|start|>author[ to=R][<|channel|>C][ TYPE]<|message|>content<|end|>|<|call|>
  void render_message(const Message& message, std::vector<int32_t>& out) const;
  void render_system(const SystemOptions& options, std::vector<int32_t>& out) const;
  // "# Instructions\n\n" + instructions (harmony crate / vLLM form). Empty text: empty message.
  void render_developer(const std::string& instructions, std::vector<int32_t>& out) const;
  // <|start|>assistant
  void render_generation_prefix(std::vector<int32_t>& out) const;
  // A whole conversation; drops analysis messages as the harmony crate does (when the last
  // assistant message is in the final channel, every analysis message before the first final one
  // goes), then appends the generation prefix if asked.
  std::vector<int32_t> render_conversation(const std::vector<Message>& messages, bool generation_prefix) const;

  const Tokenizer& tokenizer() const { return *tokenizer_; }

 private:
  void text(const std::string& s, std::vector<int32_t>& out) const;
  const Tokenizer* tokenizer_;
  std::optional<EncodeBounds> bounds_;
};

// A message parsed from generated tokens.
struct ParsedMessage {
  std::string role;          // system | developer | user | assistant | tool
  std::string author;        // role, or the tool name for tool messages
  std::string recipient;
  std::string channel;
  std::string content_type;  // as written, e.g. "<|constrain|>json"
  std::string content;       // decoded text (valid UTF-8)
  std::vector<int32_t> content_tokens;
  size_t first_content_index = 0;  // index (in the stream pushed so far) of its first content token
  int32_t end_token = -1;          // <|end|>, <|return|>, <|call|>, or -1 when cut off
  bool complete() const { return end_token >= 0; }
};

// Streaming parser for model output. Starts expecting a header for `expected_role` (the prompt
// ended with <|start|>assistant), or in the between-messages state when expected_role is empty.
// push() never throws: anything unexpected is recorded in errors() and skipped. Like the harmony
// reference's non-strict mode, a message that ends inside its header (no <|message|>) keeps the
// header's role and channel and takes the words after them as its content ("<|channel|>final 1"
// is a final message "1"); unlike it, this holds for every message, not only the first, and for
// output cut off inside a header.
class HarmonyParser {
 public:
  enum class State { kExpectStart, kHeader, kContent, kStopped };
  // kGeneration: a stop token ends the output (later tokens are ignored). kTranscript: a whole
  // conversation, where <|return|> and <|call|> only end their message and parsing goes on.
  enum class Mode { kGeneration, kTranscript };

  explicit HarmonyParser(const Tokenizer& tokenizer, std::string expected_role = "assistant", Mode mode = Mode::kGeneration);

  // Consumes one generated token. Returns false once a stop token (<|return|>, <|call|>, or
  // <|endoftext|>) has been seen; later tokens are ignored (and reported). <|end|> only closes a
  // message.
  bool push(int32_t token) noexcept;
  // End of stream (e.g. max tokens): keeps a message cut off in its header or content, with
  // end_token -1. Idempotent.
  void finish() noexcept;

  State state() const { return state_; }
  bool stopped() const { return state_ == State::kStopped; }
  // Finished messages (and, after finish(), the one cut off).
  const std::vector<ParsedMessage>& messages() const { return messages_; }
  // The message being read (header fields known once in kContent).
  const ParsedMessage& current() const { return current_; }
  // Content text decoded by the last push() (or finish()), for streaming to a client: all of them
  // together are the messages' contents in order.
  const std::string& last_delta() const { return delta_; }
  const std::vector<std::string>& errors() const { return errors_; }
  size_t tokens_seen() const { return seen_; }

 private:
  void begin_header(std::string role_hint);
  void parse_header();
  void salvage_header();
  void close_message(int32_t end_token);
  void error(std::string what);

  const Tokenizer* tokenizer_;
  Mode mode_;
  State state_;
  std::string role_hint_;
  std::vector<int32_t> header_tokens_;
  std::vector<size_t> header_positions_;  // index of each header token in the stream
  ParsedMessage current_;
  StreamDecoder decoder_;
  std::vector<ParsedMessage> messages_;
  std::string delta_;
  std::vector<std::string> errors_;
  size_t seen_ = 0;
  bool finished_ = false;
};

// Parses a header text (tokens between <|start|> and <|message|>, decoded, specials as names)
// into role/author/recipient/channel/content type. Both recipient placements are accepted.
// Returns false with a reason for leftovers it cannot place or an empty channel; fields that
// could be read are still filled in.
bool parse_harmony_header(const std::string& header, const std::string& role_hint, ParsedMessage& out,
                          std::string* problem);
// Reads a header that was never closed by <|message|>: role, author and channel as above, and every
// word after them (joined by single spaces) as the content.
void salvage_harmony_header(const std::string& header, const std::string& role_hint, ParsedMessage& out);

}  // namespace arbiter
