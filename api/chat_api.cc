#include "api/chat_api.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "api/classify_api.h"
#include "api/errors.h"
#include "api/json_io.h"

namespace arbiter::api {
namespace {

// A message's text: a string, or the concatenation of its text parts (joined by "\n").
std::string message_text(const google::protobuf::Value& content, const std::string& param, bool allow_null) {
  switch (content.kind_case()) {
    case google::protobuf::Value::kStringValue: return content.string_value();
    case google::protobuf::Value::KIND_NOT_SET:
    case google::protobuf::Value::kNullValue:
      if (allow_null) return "";
      throw bad_request("'" + param + "' must be a string or an array of text parts.", param, "invalid_type");
    case google::protobuf::Value::kListValue: {
      std::string text;
      const auto& parts = content.list_value().values();
      for (int i = 0; i < parts.size(); ++i) {
        const std::string part_param = param + "[" + std::to_string(i) + "]";
        if (parts[i].kind_case() != google::protobuf::Value::kStructValue)
          throw bad_request("Invalid type for '" + part_param + "': expected an object.", part_param, "invalid_type");
        const auto& fields = parts[i].struct_value().fields();
        const auto type = fields.find("type");
        if (type == fields.end() || type->second.string_value() != "text")
          throw bad_request("Only text content parts are supported ('" + part_param + ".type' must be 'text').",
                            part_param + ".type", "unsupported_content");
        const auto t = fields.find("text");
        if (t == fields.end() || t->second.kind_case() != google::protobuf::Value::kStringValue)
          throw bad_request("'" + part_param + ".text' must be a string.", part_param + ".text", "invalid_type");
        text += (i ? "\n" : "") + t->second.string_value();
      }
      return text;
    }
    default:
      throw bad_request("Invalid type for '" + param + "': expected a string or an array of text parts.", param, "invalid_type");
  }
}

std::vector<std::string> stop_strings(const google::protobuf::Value& stop) {
  std::vector<std::string> out;
  if (stop.kind_case() == google::protobuf::Value::kStringValue) {
    out.push_back(stop.string_value());
  } else if (stop.kind_case() == google::protobuf::Value::kListValue) {
    for (int i = 0; i < stop.list_value().values_size(); ++i) {
      const auto& v = stop.list_value().values(i);
      if (v.kind_case() != google::protobuf::Value::kStringValue)
        throw bad_request("Invalid type for 'stop[" + std::to_string(i) + "]': expected a string.",
                          "stop[" + std::to_string(i) + "]", "invalid_type");
      out.push_back(v.string_value());
    }
  } else if (stop.kind_case() != google::protobuf::Value::kNullValue && stop.kind_case() != google::protobuf::Value::KIND_NOT_SET) {
    throw bad_request("Invalid type for 'stop': expected a string or an array of strings.", "stop", "invalid_type");
  }
  if (out.size() > 4) throw bad_request("At most 4 stop sequences are supported.", "stop", "invalid_value");
  for (const auto& s : out)
    if (s.empty()) throw bad_request("Stop sequences must not be empty.", "stop", "invalid_value");
  return out;
}

}  // namespace

ChatPlan plan_chat(const wire::ChatCompletionRequest& body, const HarmonyRenderer& renderer, const ChatLimits& limits,
                   const std::function<bool()>& stop) {
  ChatPlan plan;
  if (body.messages().empty()) throw bad_request("'messages' must hold at least one message.", "messages", "invalid_value");
  if (body.has_n() && body.n() != 1) throw bad_request("Only n = 1 is supported.", "n", "invalid_value");
  if (!body.tools().empty()) throw bad_request("Tools are not supported by this server.", "tools", "unsupported_parameter");
  if (body.logprobs()) throw bad_request("Log probabilities are not supported by this server.", "logprobs", "unsupported_parameter");
  SystemOptions system;
  system.effort = effort_field(body.reasoning_effort(), limits.default_effort, "reasoning_effort");
  std::vector<Message> conversation;
  bool have_instructions = false;
  for (int i = 0; i < body.messages_size(); ++i) {
    const wire::ChatMessage& m = body.messages(i);
    const std::string param = "messages[" + std::to_string(i) + "]";
    if (m.role() == "system" || m.role() == "developer") {
      const std::string text = message_text(m.content(), param + ".content", false);
      // The first one is the developer instructions (the policy slot); later ones join them.
      if (!have_instructions) conversation.push_back({"developer", "", "", "", text.empty() ? "" : "# Instructions\n\n" + text});
      else conversation.push_back({"developer", "", "", "", text});
      have_instructions = true;
    } else if (m.role() == "user") {
      conversation.push_back({"user", "", "", "", message_text(m.content(), param + ".content", false)});
    } else if (m.role() == "assistant") {
      const std::string reasoning = m.has_reasoning() ? m.reasoning() : m.has_reasoning_content() ? m.reasoning_content() : "";
      if (!reasoning.empty()) conversation.push_back({"assistant", "", "analysis", "", reasoning});
      conversation.push_back({"assistant", "", "final", "", message_text(m.content(), param + ".content", true)});
    } else if (m.role().empty()) {
      throw bad_request("Missing required parameter: '" + param + ".role'.", param + ".role", "missing_required_parameter");
    } else {
      throw bad_request("Unsupported role '" + printable(m.role()) + "' (system, developer, user and assistant are).",
                        param + ".role", "invalid_value");
    }
  }
  std::vector<int32_t>& prompt = plan.sequence.prompt;
  renderer.render_system(system, prompt);
  // The messages are tokenized only as far as they can fit next to the system message.
  EncodeBounds bounds;
  bounds.max_tokens = static_cast<size_t>(std::max<int64_t>(0, int64_t{limits.max_context} - 1 - static_cast<int64_t>(prompt.size())));
  bounds.stop = stop;
  std::vector<int32_t> rest;
  try {
    rest = HarmonyRenderer(renderer.tokenizer(), bounds).render_conversation(conversation, true);
  } catch (const RenderStopped& e) {
    if (e.end() != EncodeEnd::kOverLimit) throw;
    throw bad_request("This model's maximum context length is " + std::to_string(limits.max_context) +
                          " tokens; the messages take more than " + std::to_string(limits.max_context - 1 - static_cast<int>(prompt.size())) +
                          " next to the system message.",
                      "messages", "context_length_exceeded");
  }
  prompt.insert(prompt.end(), rest.begin(), rest.end());
  if (static_cast<int>(prompt.size()) + 1 > limits.max_context)
    throw bad_request("This model's maximum context length is " + std::to_string(limits.max_context) +
                          " tokens; the messages take " + std::to_string(prompt.size()) + ".",
                      "messages", "context_length_exceeded");

  const int room = limits.max_context - static_cast<int>(prompt.size());
  int max_tokens = room;
  for (const auto& [present, value, name] : {std::tuple{body.has_max_completion_tokens(), body.max_completion_tokens(), "max_completion_tokens"},
                                             std::tuple{body.has_max_tokens(), body.max_tokens(), "max_tokens"}}) {
    if (!present) continue;
    if (value < 1) throw bad_request(std::string("'") + name + "' must be at least 1.", name, "invalid_value");
    max_tokens = std::min(value, room);
    break;
  }
  plan.sequence.max_new_tokens = max_tokens;

  const double temperature = body.has_temperature() ? body.temperature() : 1.0;
  if (!(temperature >= 0 && temperature <= 2)) throw bad_request("'temperature' must be between 0 and 2.", "temperature", "invalid_value");
  const double top_p = body.has_top_p() ? body.top_p() : 1.0;
  if (!(top_p > 0 && top_p <= 1)) throw bad_request("'top_p' must be in (0, 1].", "top_p", "invalid_value");
  plan.sequence.sampling.set_temperature(static_cast<float>(temperature));
  plan.sequence.sampling.set_top_p(static_cast<float>(top_p));
  if (body.has_seed()) {
    plan.sequence.sampling.set_seed(static_cast<uint64_t>(body.seed()));
  } else if (temperature > 0) {
    static thread_local std::mt19937_64 random_seeds{std::random_device{}()};
    plan.sequence.sampling.set_seed(random_seeds());
  }
  plan.stop = stop_strings(body.stop());
  plan.stream = body.stream();
  plan.include_usage = body.has_stream_options() && body.stream_options().include_usage();
  if (body.has_timeout()) {
    if (!(body.timeout() > 0)) throw bad_request("'timeout' must be a positive number of seconds.", "timeout", "invalid_value");
    plan.timeout = body.timeout();
  }
  return plan;
}

ChatOutput::Channel ChatOutput::channel_of(const ParsedMessage& message) {
  if (message.channel == "analysis") return Channel::kReasoning;
  if (message.channel == "final" || (message.channel == "commentary" && message.recipient.empty())) return Channel::kContent;
  return Channel::kNone;
}

ChatOutput::ChatOutput(const Tokenizer& tokenizer, std::vector<std::string> stop)
    : parser_(tokenizer), stop_(std::move(stop)) {}

void ChatOutput::add_reasoning(const std::string& text, size_t message_index, Delta& delta) {
  if (text.empty()) return;
  // Several analysis messages are joined by a newline.
  if (message_index != last_reasoning_message_ && !reasoning_.empty()) {
    reasoning_ += "\n";
    delta.reasoning += "\n";
  }
  last_reasoning_message_ = message_index;
  reasoning_ += text;
  delta.reasoning += text;
}

void ChatOutput::add_content(const std::string& text, Delta& delta) {
  if (stopped_ || text.empty()) return;
  held_ += text;
  // A complete stop string ends the content before it.
  size_t cut = std::string::npos;
  for (const auto& s : stop_) cut = std::min(cut, held_.find(s));
  if (cut != std::string::npos) {
    delta.content += held_.substr(0, cut);
    content_ += held_.substr(0, cut);
    held_.clear();
    stopped_ = true;
    return;
  }
  // Hold back the longest tail that could still begin a stop string.
  size_t keep = 0;
  for (const auto& s : stop_)
    for (size_t n = std::min(s.size() - 1, held_.size()); n > keep; --n)
      if (held_.compare(held_.size() - n, n, s, 0, n) == 0) {
        keep = n;
        break;
      }
  const std::string ready = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  delta.content += ready;
  content_ += ready;
}

ChatOutput::Delta ChatOutput::push(int32_t token) {
  Delta delta;
  const bool in_content = parser_.state() == HarmonyParser::State::kContent;
  Channel channel = in_content ? channel_of(parser_.current()) : Channel::kNone;
  const size_t index = parser_.messages().size();
  parser_.push(token);
  // A message that ended inside its header: its salvaged content arrives all at once.
  if (!in_content && parser_.messages().size() > index) channel = channel_of(parser_.messages()[index]);
  const std::string& text = parser_.last_delta();
  if (channel == Channel::kReasoning) add_reasoning(text, index, delta);
  else if (channel == Channel::kContent) add_content(text, delta);
  return delta;
}

ChatOutput::Delta ChatOutput::finish() {
  Delta delta;
  const bool in_content = parser_.state() == HarmonyParser::State::kContent;
  const bool in_header = parser_.state() == HarmonyParser::State::kHeader;
  const Channel channel = in_content ? channel_of(parser_.current()) : Channel::kNone;
  const size_t seen = in_content ? parser_.current().content.size() : 0;
  const size_t index = parser_.messages().size();
  parser_.finish();
  // A message cut off in its content: what the decoder still held; one cut off in its header: the
  // words salvaged from it.
  if (in_header && index < parser_.messages().size()) {
    const ParsedMessage& m = parser_.messages()[index];
    if (channel_of(m) == Channel::kReasoning) add_reasoning(m.content, index, delta);
    else if (channel_of(m) == Channel::kContent) add_content(m.content, delta);
  } else if (in_content && index < parser_.messages().size()) {
    const std::string& all = parser_.messages()[index].content;
    const std::string tail = all.size() > seen ? all.substr(seen) : "";
    if (channel == Channel::kReasoning) add_reasoning(tail, index, delta);
    else if (channel == Channel::kContent) add_content(tail, delta);
  }
  if (!stopped_ && !held_.empty()) {
    delta.content += held_;
    content_ += held_;
    held_.clear();
  }
  return delta;
}

}  // namespace arbiter::api
