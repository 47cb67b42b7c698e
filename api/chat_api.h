// POST /v1/chat/completions without the transport: turns an OpenAI chat request into a harmony
// prompt and a SequenceSpec (the system message carries reasoning_effort; the first
// system/developer message becomes the developer instructions; assistant history is rendered in
// the final channel with its reasoning as a preceding analysis message), and reads the generated
// tokens back (ChatOutput) as reasoning (analysis channel) and content (final channel and
// commentary without a recipient), with `stop` strings applied to the content.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "api/api.pb.h"
#include "runtime/harmony.h"
#include "scheduler/scheduler.h"

namespace arbiter::api {

// Server-side defaults and limits for chat requests.
struct ChatLimits {
  ReasoningEffort default_effort = ReasoningEffort::kMedium;
  int max_context = 4096;
};

// A checked chat request.
struct ChatPlan {
  SequenceSpec sequence;                 // prompt, max tokens, sampling
  bool stream = false;
  bool include_usage = false;            // stream_options.include_usage
  std::vector<std::string> stop;         // stop strings (content only)
  std::optional<double> timeout;         // seconds
};

// Throws ApiException (400) for what cannot be served: no messages, an unknown role, non-text
// content parts, n > 1, a bad sampling value, or a prompt that leaves no room in the context (the
// messages are tokenized only as far as they can fit). `stop` (optional) is polled while the
// messages are tokenized; true ends the work with RenderStopped (the client is gone, the deadline
// passed).
ChatPlan plan_chat(const wire::ChatCompletionRequest& body, const HarmonyRenderer& renderer, const ChatLimits& limits,
                   const std::function<bool()>& stop = {});

// Reads generated tokens into reasoning and content, token by token.
class ChatOutput {
 public:
  ChatOutput(const Tokenizer& tokenizer, std::vector<std::string> stop);

  // Text that became final with one token (or with finish()).
  struct Delta {
    std::string reasoning;
    std::string content;
    bool empty() const { return reasoning.empty() && content.empty(); }
  };
  Delta push(int32_t token);
  // End of generation: releases content held back while it could still start a stop string.
  Delta finish();

  const std::string& reasoning() const { return reasoning_; }
  const std::string& content() const { return content_; }
  // A stop string was found: the content ends before it and the rest of the generation is moot.
  bool stopped() const { return stopped_; }

 private:
  enum class Channel { kNone, kReasoning, kContent };  // where a message's text goes
  static Channel channel_of(const ParsedMessage& message);
  void add_content(const std::string& text, Delta& delta);
  void add_reasoning(const std::string& text, size_t message_index, Delta& delta);

  HarmonyParser parser_;
  std::vector<std::string> stop_;
  std::string reasoning_, content_, held_;
  size_t last_reasoning_message_ = static_cast<size_t>(-1);
  bool stopped_ = false;
};

}  // namespace arbiter::api
