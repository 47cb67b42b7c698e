#include "runtime/harmony.h"

#include <stdexcept>

#include "runtime/utf8.h"

namespace arbiter {

using namespace harmony_ids;

const char* to_string(ReasoningEffort effort) {
  switch (effort) {
    case ReasoningEffort::kLow:
      return "low";
    case ReasoningEffort::kMedium:
      return "medium";
    case ReasoningEffort::kHigh:
      return "high";
  }
  return "medium";
}

ReasoningEffort parse_reasoning_effort(const std::string& text) {
  if (text == "low") return ReasoningEffort::kLow;
  if (text == "medium") return ReasoningEffort::kMedium;
  if (text == "high") return ReasoningEffort::kHigh;
  throw std::invalid_argument("reasoning effort must be low, medium or high, not '" + text + "'");
}

std::string system_message_text(const SystemOptions& o) {
  std::vector<std::string> sections;
  std::string top;
  auto line = [&](const std::string& s) {
    if (!top.empty()) top += '\n';
    top += s;
  };
  if (!o.model_identity.empty()) line(o.model_identity);
  if (!o.knowledge_cutoff.empty()) line("Knowledge cutoff: " + o.knowledge_cutoff);
  if (o.current_date && !o.current_date->empty()) line("Current date: " + *o.current_date);
  if (!top.empty()) sections.push_back(top);
  sections.push_back(std::string("Reasoning: ") + to_string(o.effort));
  if (!o.channels.empty()) {
    std::string c = "# Valid channels: ";
    for (size_t i = 0; i < o.channels.size(); ++i) c += (i ? ", " : "") + o.channels[i];
    c += '.';
    if (o.channels_required) c += " Channel must be included for every message.";
    if (o.function_tools) c += "\nCalls to these tools must go to the commentary channel: 'functions'.";
    sections.push_back(c);
  }
  std::string text;
  for (size_t i = 0; i < sections.size(); ++i) text += (i ? "\n\n" : "") + sections[i];
  return text;
}

// ---------------------------------------------------------------------------------------------

HarmonyRenderer::HarmonyRenderer(const Tokenizer& tokenizer) : tokenizer_(&tokenizer) {
  const std::pair<const char*, int32_t> required[] = {
      {"<|start|>", kStart},     {"<|end|>", kEnd},   {"<|message|>", kMessage}, {"<|channel|>", kChannel},
      {"<|constrain|>", kConstrain}, {"<|return|>", kReturn}, {"<|call|>", kCall},
  };
  for (const auto& [name, id] : required)
    if (tokenizer.special_id(name) != id)
      throw std::invalid_argument(std::string("tokenizer has no harmony special token ") + name + " = " +
                                  std::to_string(id));
}

HarmonyRenderer::HarmonyRenderer(const Tokenizer& tokenizer, EncodeBounds bounds) : HarmonyRenderer(tokenizer) {
  bounds_ = std::move(bounds);
}

void HarmonyRenderer::text(const std::string& s, std::vector<int32_t>& out) const {
  if (!bounds_) return tokenizer_->encode_append(s, out);
  EncodeBounds b = *bounds_;
  b.max_tokens = out.size() >= bounds_->max_tokens ? 0 : bounds_->max_tokens - out.size();
  const EncodeEnd end = tokenizer_->encode_bounded(s, out, b);
  if (end != EncodeEnd::kComplete) throw RenderStopped(end);
}

void HarmonyRenderer::render_message(const Message& m, std::vector<int32_t>& out) const {
  out.push_back(kStart);
  text(m.author, out);
  const bool has_recipient = !m.recipient.empty() && m.recipient != "all";
  if (has_recipient) text(" to=" + m.recipient, out);
  if (!m.channel.empty()) {
    out.push_back(kChannel);
    text(m.channel, out);
  }
  if (!m.content_type.empty()) {
    static const std::string kConstrainText = "<|constrain|>";
    if (m.content_type.rfind(kConstrainText, 0) == 0) {
      text(" ", out);
      out.push_back(kConstrain);
      if (m.content_type.size() > kConstrainText.size()) text(m.content_type.substr(kConstrainText.size()), out);
    } else {
      text(" " + m.content_type, out);
    }
  }
  out.push_back(kMessage);
  text(m.content, out);
  out.push_back(m.author == "assistant" && has_recipient ? kCall : kEnd);
}

void HarmonyRenderer::render_system(const SystemOptions& options, std::vector<int32_t>& out) const {
  render_message({"system", "", "", "", system_message_text(options)}, out);
}

void HarmonyRenderer::render_developer(const std::string& instructions, std::vector<int32_t>& out) const {
  render_message({"developer", "", "", "", instructions.empty() ? "" : "# Instructions\n\n" + instructions}, out);
}

void HarmonyRenderer::render_generation_prefix(std::vector<int32_t>& out) const {
  out.push_back(kStart);
  text("assistant", out);
}

std::vector<int32_t> HarmonyRenderer::render_conversation(const std::vector<Message>& messages,
                                                          bool generation_prefix) const {
  bool last_assistant_final = false;
  for (auto it = messages.rbegin(); it != messages.rend(); ++it)
    if (it->author == "assistant") {
      last_assistant_final = it->channel == "final";
      break;
    }
  size_t first_final = messages.size();
  for (size_t i = 0; i < messages.size(); ++i)
    if (messages[i].channel == "final") {
      first_final = i;
      break;
    }
  std::vector<int32_t> out;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (last_assistant_final && i < first_final && messages[i].channel == "analysis") continue;
    render_message(messages[i], out);
  }
  if (generation_prefix) render_generation_prefix(out);
  return out;
}

// ---------------------------------------------------------------------------------------------

namespace {

bool is_ascii_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && is_ascii_space(s[b])) ++b;
  while (e > b && is_ascii_space(s[e - 1])) --e;
  return s.substr(b, e - b);
}

bool is_role(const std::string& s) { return s == "system" || s == "developer" || s == "user" || s == "assistant"; }

}  // namespace

namespace {

// The part of header parsing both readings share: cuts out the channel, fills role and author, and
// returns the words left after the role. `why` gets the first problem found.
std::vector<std::string> header_words(const std::string& header, const std::string& role_hint, ParsedMessage& out,
                                      std::string& why) {
  std::string h = header;
  static const std::string kChannelText = "<|channel|>", kConstrainText = "<|constrain|>";
  if (const size_t at = h.find(kChannelText); at != std::string::npos) {
    const size_t from = at + kChannelText.size();
    size_t end = from;
    while (end < h.size() && !is_ascii_space(h[end]) && h[end] != '<') ++end;
    out.channel = h.substr(from, end - from);
    if (out.channel.empty()) why = "empty channel";
    h = h.substr(0, at) + h.substr(end);
  }
  h = trim(h);
  for (size_t at = h.find(kConstrainText); at != std::string::npos; at = h.find(kConstrainText, at + 2)) {
    h.insert(at, " ");
    ++at;
  }
  std::vector<std::string> parts;
  for (size_t i = 0; i < h.size();) {
    while (i < h.size() && is_ascii_space(h[i])) ++i;
    size_t j = i;
    while (j < h.size() && !is_ascii_space(h[j])) ++j;
    if (j > i) parts.push_back(h.substr(i, j - i));
    i = j;
  }
  size_t next = 0;
  if (!role_hint.empty()) {
    out.role = out.author = role_hint;
    if (!parts.empty() && parts[0] == role_hint) next = 1;
  } else if (parts.empty()) {
    if (why.empty()) why = "header has no role";
  } else if (is_role(parts[0])) {
    out.role = out.author = parts[0];
    next = 1;
  } else {
    // An unknown first word is a tool name when something follows it.
    out.role = parts.size() > 1 || parts[0].rfind("to=", 0) == 0 ? "tool" : parts[0];
    out.author = parts[0];
    if (out.role != "tool" && why.empty()) why = "unknown role '" + parts[0] + "'";
    next = 1;
  }
  return std::vector<std::string>(parts.begin() + static_cast<std::ptrdiff_t>(next), parts.end());
}

}  // namespace

bool parse_harmony_header(const std::string& header, const std::string& role_hint, ParsedMessage& out,
                          std::string* problem) {
  std::string why;
  std::vector<std::string> rest = header_words(header, role_hint, out, why);
  auto strip_to = [](const std::string& s) { return s.rfind("to=", 0) == 0 ? s.substr(3) : s; };
  if (!rest.empty()) {
    const std::string last = rest.back();
    const size_t count = rest.size();
    rest.pop_back();
    if (last.rfind("to=", 0) == 0) {
      out.recipient = last.substr(3);
    } else if (count == 1) {
      out.recipient = last;
    } else {
      out.content_type = last;
      out.recipient = strip_to(rest.back());
      rest.pop_back();
    }
  }
  if (!rest.empty() && why.empty()) {
    why = "unexpected words in header:";
    for (const auto& r : rest) why += " '" + r + "'";
  }
  if (problem) *problem = why;
  return why.empty();
}

void salvage_harmony_header(const std::string& header, const std::string& role_hint, ParsedMessage& out) {
  std::string why;
  const std::vector<std::string> rest = header_words(header, role_hint, out, why);
  out.content.clear();
  for (const auto& word : rest) out.content += (out.content.empty() ? "" : " ") + word;
}

// ---------------------------------------------------------------------------------------------

HarmonyParser::HarmonyParser(const Tokenizer& tokenizer, std::string expected_role, Mode mode)
    : tokenizer_(&tokenizer),
      mode_(mode),
      state_(expected_role.empty() ? State::kExpectStart : State::kHeader),
      role_hint_(std::move(expected_role)),
      decoder_(tokenizer) {}

void HarmonyParser::error(std::string what) {
  if (errors_.size() >= 1000) return;
  errors_.push_back(finished_ ? "end of output: " + std::move(what)
                              : "token " + std::to_string(seen_ - 1) + ": " + std::move(what));
}

void HarmonyParser::begin_header(std::string role_hint) {
  state_ = State::kHeader;
  role_hint_ = std::move(role_hint);
  header_tokens_.clear();
  header_positions_.clear();
  current_ = ParsedMessage{};
}

void HarmonyParser::parse_header() {
  std::string text;
  for (const int32_t t : header_tokens_) text.append(*tokenizer_->token_bytes(t));
  text = utf8::repair(text);
  current_ = ParsedMessage{};
  std::string problem;
  if (!parse_harmony_header(text, role_hint_, current_, &problem)) error("header '" + text + "': " + problem);
  current_.first_content_index = seen_;
  header_tokens_.clear();
  header_positions_.clear();
  role_hint_.clear();
}

void HarmonyParser::salvage_header() {
  std::string text;
  for (const int32_t t : header_tokens_) text.append(*tokenizer_->token_bytes(t));
  current_ = ParsedMessage{};
  salvage_harmony_header(utf8::repair(text), role_hint_, current_);
  // The content's tokens: the shortest run of trailing header tokens that reads as the content.
  if (!current_.content.empty()) {
    std::string tail;
    for (size_t k = header_tokens_.size(); k-- > 0 && !tokenizer_->is_special(header_tokens_[k]);) {
      tail.insert(0, *tokenizer_->token_bytes(header_tokens_[k]));
      if (trim(utf8::repair(tail)) == current_.content) {
        current_.content_tokens.assign(header_tokens_.begin() + static_cast<std::ptrdiff_t>(k), header_tokens_.end());
        current_.first_content_index = header_positions_[k];
        break;
      }
      if (tail.size() > current_.content.size() + 64) break;
    }
  }
  delta_ = current_.content;
  header_tokens_.clear();
  header_positions_.clear();
  role_hint_.clear();
}

void HarmonyParser::close_message(int32_t end_token) {
  const std::string tail = decoder_.flush();
  current_.content += tail;
  if (!tail.empty()) delta_ += tail;
  current_.end_token = end_token;
  messages_.push_back(std::move(current_));
  current_ = ParsedMessage{};
}

bool HarmonyParser::push(int32_t token) noexcept {
  try {
    ++seen_;
    delta_.clear();
    if (state_ == State::kStopped) {
      error("token " + std::to_string(token) + " after the stop token ignored");
      return false;
    }
    if (finished_) {
      error("token after finish() ignored");
      return state_ != State::kStopped;
    }
    if (!tokenizer_->contains(token)) {
      error("id " + std::to_string(token) + " is not in the vocabulary; ignored");
      return true;
    }
    // In a whole transcript a stop token only ends its message; in generation it ends the output.
    const bool stop = mode_ == Mode::kGeneration && (token == kReturn || token == kCall || token == kEndOfText);
    const bool ends_message = token == kEnd || token == kReturn || token == kCall || token == kEndOfText;
    switch (state_) {
      case State::kExpectStart:
        if (token == kStart) {
          begin_header("");
        } else if (stop) {
          state_ = State::kStopped;
        } else if (ends_message) {
          error("message end outside a message; ignored");
        } else {
          error("expected <|start|>, got id " + std::to_string(token) + "; ignored");
        }
        break;
      case State::kHeader:
        if (token == kMessage) {
          parse_header();
          state_ = State::kContent;
        } else if (ends_message) {
          // No <|message|>: as the harmony reference's non-strict mode does, the header's fields are
          // read (role, channel) and the words after them are the content, e.g. "<|channel|>final 1".
          error("message ended inside its header (no <|message|>); its words after the channel kept as content");
          salvage_header();
          close_message(token);
          state_ = stop ? State::kStopped : State::kExpectStart;
        } else if (token == kStart) {
          error("<|start|> inside a header; header restarted");
          begin_header("");
        } else {
          header_tokens_.push_back(token);
          header_positions_.push_back(seen_ - 1);
        }
        break;
      case State::kContent:
        if (ends_message) {
          close_message(token);
          state_ = stop ? State::kStopped : State::kExpectStart;
        } else if (token == kStart) {
          error("<|start|> before the message ended; message closed as cut off");
          close_message(-1);
          begin_header("");
        } else if (tokenizer_->is_special(token)) {
          error("special token " + std::string(*tokenizer_->token_bytes(token)) + " in content ignored");
        } else {
          if (current_.content_tokens.empty()) current_.first_content_index = seen_ - 1;
          current_.content_tokens.push_back(token);
          delta_ = decoder_.push(token);
          current_.content += delta_;
        }
        break;
      case State::kStopped:
        break;
    }
  } catch (const std::exception& e) {  // only allocation failure can get here
    error(std::string("internal: ") + e.what());
  }
  return state_ != State::kStopped;
}

void HarmonyParser::finish() noexcept {
  if (finished_) return;
  finished_ = true;
  delta_.clear();
  try {
    if (state_ == State::kHeader && !header_tokens_.empty()) {
      error("output cut off inside a header; its words after the channel kept as content");
      salvage_header();
      close_message(-1);
    } else if (state_ == State::kContent) {
      close_message(-1);
    }
  } catch (const std::exception& e) {
    error(std::string("internal: ") + e.what());
  }
}

}  // namespace arbiter
